"""Request ids: the client's when sane, else fresh ones that never repeat (across forks too) and
tell nothing of the next."""

from __future__ import annotations

import os
import re
import warnings

from vllm_gateway.ids import fresh_id, new_request_id


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
