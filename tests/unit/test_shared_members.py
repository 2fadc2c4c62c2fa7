"""The admin API's member changes shared by every worker: the supervisor's side
(``AdmissionCoordinator``, ``MemberChanges``) and each worker's ``RemoteAdmission``, over real Unix
socket pairs in one event loop. Every live worker is told, in one order; the asker's answer waits
for all of them within a bound, and for none that died; a worker that starts later is told what
was changed so far.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from vllm_gateway.proxy.admission import Admission
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.runtime import coordinator as coordinator_module
from vllm_gateway.runtime.coordinator import AdmissionCoordinator, MemberChanges

pytestmark = pytest.mark.timeout(20)

URL = "http://10.0.0.1:8000"


class _Worker:
    """A worker's end: records each member change it is sent and answers it (unless mute)."""

    def __init__(self, remote: RemoteAdmission) -> None:
        self.remote = remote
        self.seen: list[list[Any]] = []
        self.mute = False
        self.synced = asyncio.Event()
        self.told = asyncio.Event()  # a change came
        remote.on_members = self._on_members

    def _on_members(self, message: list[Any]) -> None:
        if message[0] == "Y":
            self.synced.set()
            return
        self.seen.append(message[2:])
        self.told.set()
        if message[1] and not self.mute:
            self.remote.member_op_done(message[1], None)


async def _worker(coordinator: AdmissionCoordinator, name: str) -> _Worker:
    ours, theirs = socket.socketpair()
    remote = RemoteAdmission(4, 4, 5.0)
    worker = _Worker(remote)
    await coordinator.attach(ours, name)
    await remote.connect(theirs)
    return worker


async def test_a_change_reaches_every_worker_and_the_asker_hears_when_all_applied_it() -> None:
    coordinator = AdmissionCoordinator(Admission(4, 4, 5.0))
    a, b, c = [await _worker(coordinator, f"w{i}") for i in range(3)]
    answer = await a.remote.share_member_op("drain", URL, 10)
    assert answer == [3, 3, None]
    for w in (a, b, c):
        assert w.seen == [["drain", URL]]
    await coordinator.aclose()


async def test_a_worker_that_dies_mid_change_is_not_waited_for() -> None:
    coordinator = AdmissionCoordinator(Admission(4, 4, 5.0))
    a, b = [await _worker(coordinator, f"w{i}") for i in range(2)]
    b.mute = True  # it takes the change but dies before it answers
    asking = asyncio.create_task(a.remote.share_member_op("drain", URL, 10))
    await asyncio.wait_for(b.told.wait(), 5)
    assert not asking.done()
    assert b.remote.channel is not None
    b.remote.channel.close()
    # Answered as soon as the coordinator sees it gone, well before MEMBER_WAIT.
    answer = await asyncio.wait_for(asking, coordinator_module.MEMBER_WAIT / 2)
    assert answer == [1, 2, None]
    await coordinator.aclose()


async def test_a_worker_that_never_answers_holds_the_asker_for_the_bound_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coordinator_module, "MEMBER_WAIT", 0.2)
    coordinator = AdmissionCoordinator(Admission(4, 4, 5.0))
    a, b = [await _worker(coordinator, f"w{i}") for i in range(2)]
    b.mute = True  # alive, stuck
    answer = await a.remote.share_member_op("undrain", URL, 10)
    assert answer == [1, 2, None]
    await coordinator.aclose()


async def test_a_worker_started_later_is_told_the_changes_made_so_far() -> None:
    coordinator = AdmissionCoordinator(Admission(4, 4, 5.0))
    a = await _worker(coordinator, "w0")
    added = "http://10.0.0.2:8000"
    for op, url in [("drain", URL), ("add", added), ("drain", added), ("undrain", added)]:
        assert (await a.remote.share_member_op(op, url, 10)) == [1, 1, None]
    late = await _worker(coordinator, "w1")
    await asyncio.wait_for(late.synced.wait(), 5)
    assert late.seen == [["drain", URL], ["add", added]]
    await coordinator.aclose()


def test_the_replay_is_the_last_word_per_member_and_bounded() -> None:
    changes = MemberChanges(cap=3)
    changes.note("drain", "http://a")  # a source's member, drained
    changes.note("add", "http://b")
    changes.note("drain", "http://b")  # added, then drained: both replayed
    changes.note("add", "http://c")
    changes.note("remove", "http://c")  # added, then removed: nothing to replay
    changes.note("drain", "http://d")
    changes.note("undrain", "http://d")  # a source's member back as it was: nothing
    assert changes.replay() == [("drain", "http://a"), ("add", "http://b"), ("drain", "http://b")]
    changes.note("remove", "http://e")
    changes.note("remove", "http://f")  # over the cap: the oldest is forgotten
    assert changes.replay() == [
        ("add", "http://b"),
        ("drain", "http://b"),
        ("remove", "http://e"),
        ("remove", "http://f"),
    ]
