"""The operator's run-time loop around :func:`reconcile.reconcile`: a coalescing work queue fed by
Kopf watch events and by one periodic resync task.

There is deliberately no Kopf timer or daemon on DualPathCluster (those put a finalizer on every
object; see docs/design/0001-timers-vs-finalizers.md). Instead:

- every watch event of a DualPathCluster or of one of its children enqueues the cluster;
- each pass may ask to run again after a delay (rollout in progress, drain, rebalance interval);
- a resync task enqueues every known cluster every ``resync_interval_s`` as a safety net.

Our own status writes come back as watch events; the pass they trigger finds nothing to change and
writes nothing, so the loop settles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dualpath_operator import workqueue

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Controller:
    """Owns the work queue and the resync task; ``reconcile_one`` runs one pass, returns a requeue delay."""

    reconcile_one: Callable[[Key], Awaitable[float | None]]
    resync_interval_s: float = 60.0
    workers: int = 4
    known: set[Key] = field(default_factory=set)
    queue: workqueue.WorkQueue[Key] = field(init=False)
    _resync: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.queue = workqueue.WorkQueue(self._process, workers=self.workers)

    async def _process(self, key: Key) -> float | None:
        t0 = time.monotonic()
        delay = await self.reconcile_one(key)
        log.debug("reconciled %s/%s in %.3fs (requeue %s)", key[0], key[1], time.monotonic() - t0, delay)
        return delay

    def start(self) -> None:
        self.queue.start()
        if self._resync is None:
            self._resync = asyncio.create_task(self._resync_loop(), name="dualpath-resync")

    async def stop(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
            self._resync = None
        await self.queue.stop()

    def cluster_seen(self, key: Key) -> None:
        self.known.add(key)
        self.queue.add(key)

    def cluster_gone(self, key: Key) -> None:
        self.known.discard(key)
        self.queue.forget(key)

    def child_changed(self, key: Key) -> None:
        if key in self.known:
            self.queue.add(key)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval_s)
            for key in list(self.known):
                self.queue.add(key)
