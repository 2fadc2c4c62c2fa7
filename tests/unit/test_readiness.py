"""The backend's one shared health check, as the readiness probes and the gauge's sampler use it:
single flight, a short-lived answer, a bounded wait."""

from __future__ import annotations

import asyncio

from vllm_gateway.observability.health import BackendHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Check:
    """A backend health check the test answers: each call waits for ``answer``."""

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.answer: asyncio.Future[bool] | None = None
        self.called = asyncio.Event()

    async def __call__(self, timeout: float) -> bool:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.answer = asyncio.get_running_loop().create_future()
            self.called.set()
            return await self.answer
        finally:
            self.in_flight -= 1

    async def next_call(self) -> asyncio.Future[bool]:
        """The answer of the call the readiness makes now (waited for, bounded)."""
        await asyncio.wait_for(self.called.wait(), 1.0)
        self.called.clear()
        assert self.answer is not None
        return self.answer


async def test_every_probe_shares_one_check_and_its_answer_for_the_interval() -> None:
    clock, check = Clock(), Check()
    health = BackendHealth(check, timeout=2.0, ttl=1.0, clock=clock)
    probes = [asyncio.create_task(health.check()) for _ in range(500)]
    (await check.next_call()).set_result(True)
    assert await asyncio.gather(*probes) == [True] * 500
    assert check.most_in_flight == 1
    clock.now += 0.9
    assert await health.check() is True and check.calls == 1  # the answer still serves
    clock.now += 0.2
    probe = asyncio.create_task(health.check())
    (await check.next_call()).set_result(False)
    assert await probe is False and check.calls == 2
    assert await health.check() is False and check.calls == 2  # "not ready" is kept as long


async def test_a_check_that_never_answers_bounds_every_probe_and_is_not_repeated() -> None:
    check = Check()
    health = BackendHealth(check, timeout=0.2, ttl=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.create_task(health.check())
    await check.next_call()
    late = [asyncio.create_task(health.check()) for _ in range(50)]  # join the check in flight
    assert await first is False
    assert await asyncio.gather(*late) == [False] * 50
    assert loop.time() - started < 0.2 + 0.15  # none waited past the check's own bound
    assert check.calls == 1 and check.in_flight == 0  # the check itself was cut at its bound
    assert await health.check() is False and check.calls == 1


async def test_a_probe_that_leaves_does_not_cancel_the_check_the_others_wait_for() -> None:
    check = Check()
    health = BackendHealth(check, timeout=2.0)
    leaving = asyncio.create_task(health.check())
    staying = asyncio.create_task(health.check())
    answer = await check.next_call()
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert not answer.cancelled()
    answer.set_result(True)
    assert await staying is True and check.calls == 1


async def test_a_failing_check_reads_as_not_ready() -> None:
    async def broken(timeout: float) -> bool:
        raise RuntimeError("boom")

    assert await BackendHealth(broken, timeout=1.0).check() is False


async def test_probes_join_the_sampler_s_call_and_the_gauge_reads_every_answer() -> None:
    clock, check = Clock(), Check()
    health = BackendHealth(check, timeout=2.0, ttl=1.0, clock=clock)
    assert health.healthy is None  # no answer yet: the gauge has no sample
    sampler = asyncio.create_task(health.sample(interval=5.0))
    answer = await check.next_call()
    probes = [asyncio.create_task(health.check()) for _ in range(20)]  # join the sampler's call
    answer.set_result(False)
    assert await asyncio.gather(*probes) == [False] * 20
    assert check.calls == 1 and check.most_in_flight == 1 and health.healthy is False
    # The sampler's answer does not stand in for a probe's: the next probe asks the backend,
    # and its answer is the gauge's too.
    probe = asyncio.create_task(health.check())
    (await check.next_call()).set_result(True)
    assert await probe is True and health.healthy is True and check.calls == 2
    assert await health.check() is True and check.calls == 2  # a probe's answer serves probes
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    await health.aclose()


async def test_aclose_ends_the_check_in_flight() -> None:
    check = Check()
    health = BackendHealth(check, timeout=2.0)
    probe = asyncio.create_task(health.check())
    answer = await check.next_call()
    await health.aclose()
    assert answer.cancelled() and check.in_flight == 0
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
