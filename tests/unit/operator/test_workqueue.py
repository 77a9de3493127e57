"""The reconcile work queue: coalescing, one worker per key, requeue, retry with backoff."""

from __future__ import annotations

import asyncio

import pytest

from dualpath_operator import workqueue

pytestmark = pytest.mark.timeout(10)


async def test_many_adds_before_processing_collapse_into_one_pass() -> None:
    calls: list[str] = []

    async def process(key: str) -> float | None:
        calls.append(key)
        return None

    q: workqueue.WorkQueue[str] = workqueue.WorkQueue(process)
    for _ in range(50):
        q.add("a")
    q.add("b")
    q.start()
    await q.wait_idle(5)
    await q.stop()
    assert sorted(calls) == ["a", "b"]


async def test_a_key_is_never_processed_concurrently_and_an_add_during_processing_reruns_it() -> None:
    running = 0
    max_running = 0
    passes = 0
    release = asyncio.Event()
    started = asyncio.Event()

    async def process(key: str) -> float | None:
        nonlocal running, max_running, passes
        running += 1
        max_running = max(max_running, running)
        passes += 1
        started.set()
        if passes == 1:
            await release.wait()
        running -= 1
        return None

    q: workqueue.WorkQueue[str] = workqueue.WorkQueue(process)
    q.start()
    q.add("a")
    await asyncio.wait_for(started.wait(), 5)
    q.add("a")  # arrives while the first pass is running: marks it dirty
    q.add("a")
    release.set()
    await q.wait_idle(5)
    await q.stop()
    assert max_running == 1
    assert passes == 2


async def test_requeue_after_runs_the_key_again_later() -> None:
    times: list[float] = []
    loop = asyncio.get_running_loop()
    third = asyncio.Event()

    async def process(key: str) -> float | None:
        times.append(loop.time())
        if len(times) == 3:
            third.set()
        return 0.05 if len(times) < 3 else None

    q: workqueue.WorkQueue[str] = workqueue.WorkQueue(process)
    q.start()
    q.add("a")
    await asyncio.wait_for(third.wait(), 5)
    await q.stop()
    assert times[1] - times[0] >= 0.045
    assert times[2] - times[1] >= 0.045


async def test_failures_are_retried_with_growing_backoff_and_success_resets_it() -> None:
    times: list[float] = []
    loop = asyncio.get_running_loop()
    third = asyncio.Event()

    async def process(key: str) -> float | None:
        times.append(loop.time())
        if len(times) == 3:
            third.set()
        if len(times) <= 2:
            raise RuntimeError("conflict")
        return None

    q: workqueue.WorkQueue[str] = workqueue.WorkQueue(process, base_backoff_s=0.05, max_backoff_s=1)
    q.start()
    q.add("a")
    await asyncio.wait_for(third.wait(), 5)
    await q.stop()
    assert times[1] - times[0] >= 0.045  # first retry after base
    assert times[2] - times[1] >= 0.095  # second after 2 x base


async def test_forget_drops_a_pending_delayed_run() -> None:
    calls: list[str] = []

    async def process(key: str) -> float | None:
        calls.append(key)
        return None

    q: workqueue.WorkQueue[str] = workqueue.WorkQueue(process)
    q.start()
    q.add_after("gone", 0.05)
    q.forget("gone")
    q.add("kept")
    await q.wait_idle(2)
    await asyncio.sleep(0.1)
    await q.stop()
    assert calls == ["kept"]
