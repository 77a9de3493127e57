"""The scheduler service: ``scheduler.state`` plus asyncio (long-poll fetches, timers, client streams).

Created once per scheduler process by ``dualpath_engine.server`` (the aiohttp app) and driven by its
handlers: ``generate`` for OpenAI requests, ``fetch``/``results`` for engine group leaders, and the
admin methods. It owns the clock (monotonic by default; tests inject one), the expiry timer that
declares silent groups lost and times out old requests, and one queue per client request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from prometheus_client import registry as prom_registry

from dualpath_engine import config as config_mod
from dualpath_engine.kv import hashing
from dualpath_engine.scheduler import metrics as metrics_mod
from dualpath_engine.scheduler import protocol, records, state

Clock = Callable[[], float]


def block_hasher(cfg: config_mod.SchedulerConfig) -> records.BlockHasher:
    """The engines' chained block hashes (hex) for the configured model and block size."""
    root = hashing.root_hash(hashing.namespace_for(cfg.model, cfg.kv))
    block_tokens = cfg.kv.block_tokens

    def hasher(tokens: Sequence[int]) -> list[str]:
        return [h.hex() for h in hashing.chain_hashes(tokens, block_tokens, root)]

    return hasher


class SchedulerService:
    """One scheduler: state, metrics, wake-ups of waiting fetches, and client streams."""

    def __init__(
        self,
        cfg: config_mod.SchedulerConfig,
        registry: prom_registry.CollectorRegistry | None = None,
        clock: Clock = time.monotonic,
        hasher: records.BlockHasher | None = None,
        expiry_interval_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry if registry is not None else prom_registry.CollectorRegistry()
        self.metrics = metrics_mod.SchedulerMetrics(self.registry)
        self._clock = clock
        self._streams: dict[str, asyncio.Queue[records.RequestUpdate]] = {}
        self._group_events: dict[str, asyncio.Event] = {}
        self._started: dict[str, float] = {}
        self._roles_told: dict[str, protocol.Role] = {}
        self.state = state.SchedulerState(
            cfg,
            hasher if hasher is not None else block_hasher(cfg),
            self.metrics,
            on_update=self._route,
            on_group_work=self._wake,
        )
        self.registry.register(metrics_mod.StateCollector(self.state.sample))
        self._expiry_interval = expiry_interval_s or min(0.5, cfg.engine_timeout_s / 4)
        self._expiry_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the expiry timer."""
        if self._expiry_task is None:
            self._expiry_task = asyncio.create_task(self._expire_loop(), name="scheduler-expiry")

    async def stop(self) -> None:
        """Stop the expiry timer."""
        task, self._expiry_task = self._expiry_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- clients ---------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampling: protocol.SamplingParams) -> str:
        """Admit a request and return its id; consume it with ``updates`` (which cleans up).

        Raises ``records.AdmissionError`` when too many requests wait (the API answers 503).
        """
        request_id = self.state.submit(prompt, sampling, self._clock())
        self._streams[request_id] = asyncio.Queue()
        self._started[request_id] = self._clock()
        return request_id

    async def updates(self, request_id: str) -> AsyncGenerator[records.RequestUpdate, None]:
        """Yield a submitted request's updates until the final one (finish or error).

        If the consumer stops early (client disconnected), the request is cancelled on the engines.
        """
        queue = self._streams[request_id]
        start = self._started.pop(request_id)
        first: float | None = None
        produced = 0
        finished = False
        try:
            while True:
                # The expiry timer ends the request at its deadline; the margin guards the timer.
                remaining = start + self.cfg.request_timeout_s + 2 * self._expiry_interval + 1 - self._clock()
                try:
                    update = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.001))
                except TimeoutError:
                    update = records.RequestUpdate(
                        request_id, error="request timed out waiting for engines", error_kind="timeout"
                    )
                if update.token_ids:
                    now = self._clock()
                    if first is None:
                        first = now
                        self.metrics.time_to_first_token.observe(now - start)
                    produced += len(update.token_ids)
                if update.final:
                    finished = True
                    if update.error is None:
                        end = self._clock()
                        self.metrics.request_duration.observe(end - start)
                        if first is not None and produced > 1:
                            self.metrics.time_per_output_token.observe((end - first) / (produced - 1))
                yield update
                if update.final:
                    return
        finally:
            if not finished:
                self.release(request_id)
            self._streams.pop(request_id, None)

    def release(self, request_id: str) -> None:
        """Forget a submitted request; if it has not finished, cancel it on the engines. Idempotent."""
        self._streams.pop(request_id, None)
        self._started.pop(request_id, None)
        if request_id in self.state.requests:
            self.state.cancel(request_id, "client went away")

    # --- engines ---------------------------------------------------------------------------------

    async def fetch(self, message: protocol.FetchRequest) -> protocol.FetchReply:
        """A leader's long-poll fetch: answer at once with work, else wait up to ``wait_s``."""
        deadline = self._clock() + message.wait_s
        while True:
            event = self._group_events.setdefault(message.group_id, asyncio.Event())
            event.clear()
            started = time.perf_counter()
            reply = self.state.fetch(message, self._clock())
            self.metrics.fetch_seconds.labels(role=message.role).observe(time.perf_counter() - started)
            remaining = deadline - self._clock()
            # A role change is news once; a leader that keeps its old role is not answered in a loop.
            role_news = reply.role != message.role and self._roles_told.get(message.group_id) != reply.role
            if reply.assignments or reply.cancels or role_news or remaining <= 0:
                self._roles_told[message.group_id] = reply.role
                return reply
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=remaining)
            if not event.is_set():
                reply = self.state.fetch(message, self._clock())
                self._roles_told[message.group_id] = reply.role
                return reply

    def results(self, batch: protocol.ResultBatch) -> protocol.ResultAck:
        """Apply engine events."""
        return self.state.record(batch, self._clock())

    # --- admin -----------------------------------------------------------------------------------

    def set_weights(self, weights: dict[str, float]) -> None:
        """Per-node usable storage-NIC capacity in bytes/s (weights-aware read side)."""
        self.state.set_weights(weights)

    def set_drained(self, group_id: str, drained: bool) -> None:
        """Drain or undrain a group (``records.UnknownGroupError`` if unknown)."""
        self.state.set_drained(group_id, drained)

    def set_role(self, group_id: str, role: protocol.Role) -> None:
        """Switch a group's role in place, drain-first (``records.UnknownGroupError`` if unknown)."""
        self.state.set_role(group_id, role, self._clock())

    def status(self) -> dict[str, Any]:
        """Groups with role, drain/switch state and in-flight work, plus weights and queues."""
        groups = []
        for group in self.state.groups.values():
            groups.append(
                {
                    "group_id": group.group_id,
                    "role": group.role,
                    "node": group.node,
                    "drained": group.drained,
                    "switching_to": group.switch_to,
                    "in_flight": self.state.in_flight(group.group_id),
                    "engines": sorted(group.engines),
                }
            )
        sample = self.state.sample()
        return {"groups": groups, "weights": sample.path_weights, "queues": sample.queues}

    # --- internals -------------------------------------------------------------------------------

    def _route(self, update: records.RequestUpdate) -> None:
        queue = self._streams.get(update.request_id)
        if queue is not None:
            queue.put_nowait(update)

    def _wake(self, group_id: str) -> None:
        event = self._group_events.get(group_id)
        if event is not None:
            event.set()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self._expiry_interval)
            self.state.expire(self._clock())
