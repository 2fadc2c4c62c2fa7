"""Request ids: the client's when sane, else fresh ones that never repeat (across forks too) and
tell nothing of the next; stored Responses' ids that only their tenant can name."""

from __future__ import annotations

import os
import re
import warnings

import pytest

from vllm_gateway.ids import ResponseIds, fresh_id, new_request_id


def _scope(*headers: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return list(headers)


def test_a_sane_client_id_is_kept_and_a_bad_one_replaced() -> None:
    assert new_request_id(_scope((b"x-request-id", b"abc-123"))) == "abc-123"
    bad = new_request_id(_scope((b"x-request-id", b"has space\r\n")))
    assert bad != "has space\r\n" and re.fullmatch(r"[0-9a-f]{24,}", bad)
    # A final line break is not part of a sane id (``$`` would have let it through).
    assert new_request_id(_scope((b"x-request-id", b"abc-123\n"))) != "abc-123\n"


def test_fresh_ids_do_not_repeat() -> None:
    ids = {new_request_id(_scope()) for _ in range(100_000)}
    assert len(ids) == 100_000
    assert all(re.fullmatch(r"[0-9a-f]{24,}", i) for i in list(ids)[:100])


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when a process with threads forks; the child only computes ids.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write_end, " ".join(new_request_id(_scope()) for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_ids = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent_ids = {new_request_id(_scope()) for _ in range(5)}
    assert len(child_ids) == 5
    assert not child_ids & parent_ids
    assert {i[:16] for i in child_ids}.isdisjoint({i[:16] for i in parent_ids})


def test_fresh_ids_share_nothing_a_client_could_count_on() -> None:
    ids = [fresh_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    # Neither a per-process prefix nor a counter: any 8 digits of them are as good as random.
    assert len({i[:8] for i in ids}) == 1000 and len({i[-8:] for i in ids}) == 1000


ENTRIES = ["ka:alpha", "ka2:alpha", "kb:beta", "kc"]


def test_a_response_id_is_its_tenant_s_only() -> None:
    ids = ResponseIds(ENTRIES)
    rid = ids.mint("alpha")
    assert re.fullmatch(r"resp_[0-9a-f]{64}", rid)
    assert ids.owns("alpha", rid)
    assert not ids.owns("beta", rid) and not ids.owns("anonymous", rid)
    assert not ResponseIds().owns("alpha", rid)  # another configuration: another key
    # Any other spelling of it is no one's.
    for other in (
        rid + "\n",
        rid[:-1],
        rid.upper(),
        "resp_" + rid[5:].upper(),
        rid[:40] + " " + rid[41:],
    ):
        assert not ids.owns("alpha", other), other
    flipped = rid[:-1] + ("0" if rid[-1] != "0" else "1")
    assert not ids.owns("alpha", flipped)
    assert not ids.owns("alpha", "resp_doesnotexist")


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_response_ids_survive_a_restart_and_other_tenants_changing(secret: str | None) -> None:
    rid = ResponseIds(ENTRIES, secret).mint("alpha")
    assert ResponseIds(list(reversed(ENTRIES)), secret).owns("alpha", rid)
    # A tenant added, another removed: alpha's ids stay alpha's.
    assert ResponseIds(["ka:alpha", "ka2:alpha", "kd:delta"], secret).owns("alpha", rid)


def test_rotating_a_tenant_s_keys_forgets_its_ids_unless_a_secret_is_set() -> None:
    rotated = ["ka3:alpha", "kb:beta"]
    assert not ResponseIds(rotated).owns("alpha", ResponseIds(ENTRIES).mint("alpha"))
    rid = ResponseIds(ENTRIES, "s3cret").mint("alpha")
    assert ResponseIds(rotated, "s3cret").owns("alpha", rid)
    assert not ResponseIds(rotated, "other").owns("alpha", rid)
    assert not ResponseIds(rotated, "s3cret").owns("beta", rid)
