"""A keyed, coalescing work queue for level-triggered reconciliation (controller-runtime's shape).

- ``add(key)`` schedules a reconcile of ``key`` now; many adds before it runs collapse into one.
- ``add_after(key, delay)`` schedules one later (the earliest pending time wins).
- A key is never processed by two workers at once; an add that arrives while it is being processed
  marks it dirty, and it is processed once more right after.
- At most ``workers`` keys are processed concurrently.
- A failing pass is retried with exponential backoff (capped), and a success resets the backoff.

Kopf event handlers and the operator's periodic resync feed it; the process function is
``reconcile``. It holds no Kubernetes code.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Due(Generic[K]):
    at: float
    seq: int
    key: K = field(compare=False)


class WorkQueue(Generic[K]):
    """Coalescing work queue; see the module docstring. ``process`` returns an optional requeue delay."""

    def __init__(
        self,
        process: Callable[[K], Awaitable[float | None]],
        *,
        workers: int = 4,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process = process
        self._workers = workers
        self._base = base_backoff_s
        self._max = max_backoff_s
        self._clock = clock
        self._heap: list[_Due[K]] = []
        self._pending: dict[K, float] = {}
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- producers ---------------------------------------------------------------------------------
    def add(self, key: K) -> None:
        self.add_after(key, 0.0)

    def add_after(self, key: K, delay_s: float) -> None:
        if key in self._active and delay_s <= 0:
            self._dirty.add(key)
            return
        at = self._clock() + max(0.0, delay_s)
        current = self._pending.get(key)
        if current is not None and current <= at:
            return
        self._pending[key] = at
        self._seq += 1
        heapq.heappush(self._heap, _Due(at, self._seq, key))
        self._idle.clear()
        self._wake.set()

    def forget(self, key: K) -> None:
        """Drop any pending run and backoff state of ``key`` (e.g. the object was deleted)."""
        self._pending.pop(key, None)
        self._dirty.discard(key)
        self._failures.pop(key, None)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="dualpath-workqueue")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def wait_idle(self, timeout_s: float) -> None:
        """Wait until nothing is pending now (delayed items in the future do not count) or active."""
        deadline = self._clock() + timeout_s
        while True:
            due_now = any(at <= self._clock() for at in self._pending.values())
            if not due_now and not self._active and not self._dirty:
                return
            if self._clock() > deadline:
                raise TimeoutError("work queue did not become idle")
            await asyncio.sleep(0.01)

    # ---- internals ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            now = self._clock()
            while self._heap and (self._heap[0].at <= now):
                due = heapq.heappop(self._heap)
                if self._pending.get(due.key) != due.at:
                    continue  # superseded by an earlier add, or forgotten
                if due.key in self._active:
                    self._dirty.add(due.key)
                    del self._pending[due.key]
                    continue
                del self._pending[due.key]
                await self._sem.acquire()
                self._active.add(due.key)
                task = asyncio.create_task(self._one(due.key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            timeout = None if not self._heap else max(0.0, self._heap[0].at - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _one(self, key: K) -> None:
        try:
            requeue: float | None = None
            try:
                requeue = await self._process(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(self._max, self._base * 2 ** (n - 1))
                log.exception("reconcile of %s failed (attempt %d); retrying in %.1fs", key, n, delay)
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                if requeue is not None:
                    self.add_after(key, requeue)
        finally:
            self._active.discard(key)
            self._sem.release()
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            self._wake.set()
