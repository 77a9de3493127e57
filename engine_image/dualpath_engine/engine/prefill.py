"""The prefill engine (PE) loop: layer-wise prefill over hit KV loaded on both read paths, chunked under
the compute quota, streaming the prompt KV to the decode engine's buffer (torch-free).

Built by ``engine.service`` with an injected ``ModelRunner``; fed by the group leader (``assign``,
``cancel``) and by the KV transport (``handle``). One step = schedule (``scheduler.batching`` picks the
chunk of each queued task under the quota) -> execute (the runner, layer by layer) -> update (progress,
KV sent to the DE, events to the scheduler).

Read paths per hit block (``engine.tasks.read_sides``):
- PE side: storage -> PE host buffer through this node's read queue (storage NIC); the PE then sends
  those layers to the DE too (the PE path ships hit + miss KV).
- DE side: the DE reads, reports which blocks were valid (``HitReport``) and streams each layer
  (``DeLayer``); layer ``l`` is awaited just before layer ``l`` runs, so loading overlaps compute. Only
  miss KV goes back. ``basic`` reads everything on the PE side and is not layer-wise (every layer's KV
  is present before compute; KV goes to the DE after the last layer); ``oracle`` bypasses the read
  queue and the NIC budgets (blocks come straight from the store).
A block that is absent or corrupt ends the usable prefix; the rest is computed, so output never changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from dualpath_engine import config
from dualpath_engine.engine import messages, tasks
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.kv import layout, readqueue, storage
from dualpath_engine.scheduler import batching, protocol

log = logging.getLogger(__name__)

EventSink = Callable[[protocol.TaskEvent], None]

TASK_PARTS = ("read", "queue", "compute", "send")
"""Where a prefill task's time goes, assignment to ``PrefillDone`` delivered: ``read`` (until both read
paths have reported its hit blocks), ``queue`` (until its first forward batch starts), ``compute`` (until
its last batch ends: its chunks, other tasks' chunks batched between them, waits for DE-read layers),
``send`` (flushing its KV and ``PrefillDone`` to the decode engine)."""


@dataclasses.dataclass(eq=False)
class _Task:
    assignment: protocol.Assignment
    sides: dict[int, protocol.Side]
    outbox: tasks.Outbox
    pe_blocks: dict[int, layout.ByteArray] = dataclasses.field(default_factory=dict)
    pe_valid: set[int] = dataclasses.field(default_factory=set)
    pe_read_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    de_valid: set[int] | None = None
    de_report: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    de_layers: dict[int, messages.DeLayer] = dataclasses.field(default_factory=dict)
    de_layer_arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cached: int | None = None
    progress: int = 0
    computed: list[list[layout.ByteArray]] = dataclasses.field(default_factory=list)
    hits_sent: bool = False
    read_bytes_pe: int = 0
    failed: str | None = None
    assigned_at: float = dataclasses.field(default_factory=time.monotonic)
    ready_at: float | None = None
    started_at: float | None = None

    @property
    def task_id(self) -> str:
        return self.assignment.task_id

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.assignment.prompt_token_ids

    @property
    def hit_tokens(self) -> int:
        """The usable hit prefix; only known once the task is ready (both sides' reads reported)."""
        if self.cached is None:
            raise RuntimeError(f"{self.task_id}: hit prefix used before it was decided")
        return self.cached

    def needs_de(self) -> bool:
        return any(side == "de" for side in self.sides.values())


class PrefillEngine:
    """One prefill engine: a FIFO of tasks, batches under the quota, layer-wise execution."""

    def __init__(
        self,
        *,
        engine_config: config.EngineConfig,
        runner: runner_api.ModelRunner,
        reads: readqueue.ReadQueue,
        links: messages.PeerLinks,
        events: EventSink,
        time_model: batching.AttentionTime,
    ) -> None:
        self._config = engine_config
        self._runner = runner
        self._reads = reads
        self._links = links
        self._events = events
        self._time_model = time_model
        self._geometry = layout.BlockGeometry.from_config(engine_config.model, engine_config.kv)
        self._tasks: dict[str, _Task] = {}
        self._early: dict[str, list[messages.Message]] = {}
        self._finished = tasks.RecentIds()
        self._wakeup = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.batches_run = 0
        """Forward batches executed (each may hold chunks of several tasks)."""
        self.read_bytes_total = 0
        """KV bytes this engine read from storage for the PE read path."""
        self.layer_wait_seconds = 0.0
        """Time the forward pass stalled waiting for DE-read layers (I/O, not compute, bound prefill)."""
        self.tasks_done = 0
        """Tasks whose prefill completed and whose KV reached the decode engine."""
        self.task_seconds = dict.fromkeys(TASK_PARTS, 0.0)
        """Summed over completed tasks, where the time from assignment to ``PrefillDone`` delivered went
        (:data:`TASK_PARTS`): this engine's share of TTFT, by cause."""

    @property
    def engine_id(self) -> str:
        """This engine's name."""
        return self._config.name

    def load(self) -> tuple[int, int]:
        """``(seq, tok)`` for the leader's report: unfinished tasks and their prompt tokens."""
        return len(self._tasks), sum(len(task.prompt) for task in self._tasks.values())

    def kv_used_ratio(self) -> float:
        """Fraction of the KV capacity (``kv.host_buffer_bytes``) the running prompts' KV takes, 0..1."""
        _, tokens = self.load()
        return min(1.0, tokens * self._geometry.bytes_per_token / self._config.kv.host_buffer_bytes)

    def assign(self, assignment: protocol.Assignment) -> None:
        """Take a task (repeats of a known or finished task id are ignored)."""
        if assignment.task_id in self._tasks or assignment.task_id in self._finished:
            return
        if assignment.block_tokens != self._geometry.block_tokens:
            self._report(assignment.task_id, error=f"block_tokens {assignment.block_tokens} != engine's")
            return
        task_id = assignment.task_id

        async def failed(reason: str) -> None:
            await self._fail(task_id, reason, notify_peer=False)

        task = _Task(
            assignment=assignment,
            sides=tasks.read_sides(assignment, self._config.mode),
            outbox=tasks.Outbox(self._links, assignment.decode.transport, failed),
            computed=[[] for _ in range(self._runner.num_layers)],
        )
        self._tasks[task_id] = task
        self._spawn(self._read_pe_side(task))
        for message in self._early.pop(task_id, []):
            self._accept(task, message)
        self._wakeup.set()

    def knows(self, task_id: str) -> bool:
        """Whether the task is running here."""
        return task_id in self._tasks

    def cancel(self, task_id: str) -> None:
        """Drop a task (the scheduler no longer wants it)."""
        task = self._tasks.pop(task_id, None)
        self._finished.add(task_id)
        self._early.pop(task_id, None)
        if task is not None:
            task.outbox.abort()

    async def handle(self, message: messages.Message) -> None:
        """A message from a decode engine."""
        task = self._tasks.get(message.task_id)
        if task is None:
            if message.task_id not in self._finished:
                self._early.setdefault(message.task_id, []).append(message)
            return
        self._accept(task, message)

    def _accept(self, task: _Task, message: messages.Message) -> None:
        if isinstance(message, messages.HitReport):
            task.de_valid = set(message.valid_blocks)
            task.de_report.set()
        elif isinstance(message, messages.DeLayer):
            task.de_layers[message.layer] = message
            task.de_layer_arrived.set()
        elif isinstance(message, messages.TaskAbort):
            self._spawn(
                self._fail(task.task_id, f"decode engine aborted: {message.reason}", notify_peer=False)
            )
        self._wakeup.set()

    async def _read_pe_side(self, task: _Task) -> None:
        indices = [i for i, side in sorted(task.sides.items()) if side == "pe"]
        by_index = {block.index: block for block in task.assignment.hit_blocks}
        outs = [layout.empty_full_block(self._geometry) for _ in indices]
        hashes = [bytes.fromhex(by_index[i].hash) for i in indices]
        try:
            if self._config.mode == "oracle":
                results = [
                    await self._reads.store.read_into(h, out) for h, out in zip(hashes, outs, strict=True)
                ]
            else:
                results = await self._reads.read(hashes, outs)
        except (OSError, ValueError) as exc:
            log.warning("%s: PE-side storage read failed: %s", task.task_id, exc)
            results = [storage.ReadResult.INVALID] * len(indices)
        for index, out, result in zip(indices, outs, results, strict=True):
            if result is storage.ReadResult.HIT:
                task.pe_blocks[index] = out
                task.pe_valid.add(index)
                if self._config.mode != "oracle":
                    task.read_bytes_pe += self._geometry.full_block_bytes
                    self.read_bytes_total += self._geometry.full_block_bytes
        task.pe_read_done.set()
        self._wakeup.set()

    def _ready(self, task: _Task) -> bool:
        """Decide the usable hit prefix once both sides' reads are known."""
        if task.cached is not None:
            return True
        if not task.pe_read_done.is_set() or (task.needs_de() and not task.de_report.is_set()):
            return False
        valid = task.pe_valid | (task.de_valid or set())
        task.cached = tasks.usable_prefix_tokens(
            task.sides, valid, self._geometry.block_tokens, len(task.prompt)
        )
        task.progress = task.cached
        task.ready_at = time.monotonic()
        return True

    def _next_batch(self) -> list[batching.BatchEntry]:
        queue = [
            batching.PrefillItem(task.task_id, task.progress, len(task.prompt) - task.progress)
            for task in self._tasks.values()
            if task.failed is None and self._ready(task)
        ]
        if not queue:
            return []
        quota = self._tasks[queue[0].request_id].assignment.chunk_plan.compute_quota_ms / 1000.0
        return list(batching.build_prefill_batch(queue, self._time_model, quota))

    async def run(self) -> None:
        """The engine loop; runs until cancelled."""
        while True:
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = time.monotonic()
            for entry in batch:
                task = self._tasks[entry.request_id]
                task.started_at = started if task.started_at is None else task.started_at
            await self._run_batch(batch)

    def _hit_rows(self, task: _Task, layer: int) -> layout.ByteArray:
        """Layer ``layer`` of the usable hit prefix ``[cached, bytes]`` (must be available)."""
        tokens = self._geometry.block_tokens
        blocks = -(-task.hit_tokens // tokens)
        rows = np.empty((blocks * tokens, self._geometry.bytes_per_token_layer), np.uint8)
        de_layer = task.de_layers.get(layer)
        de_pos = {index: pos for pos, index in enumerate(de_layer.blocks)} if de_layer else {}
        for index in range(blocks):
            if task.sides[index] == "pe":
                rows[index * tokens : (index + 1) * tokens] = task.pe_blocks[index][layer]
            else:
                if de_layer is None:
                    raise RuntimeError(f"{task.task_id}: layer {layer} of DE-read KV used before it arrived")
                pos = de_pos[index]
                rows[index * tokens : (index + 1) * tokens] = de_layer.data[pos * tokens : (pos + 1) * tokens]
        return rows[: task.hit_tokens]

    async def _wait_layer(self, task: _Task, layer: int) -> None:
        """Wait until the DE-side KV of ``layer`` has arrived (if the usable prefix needs any)."""
        needs = any(task.sides[i] == "de" for i in range(-(-task.hit_tokens // self._geometry.block_tokens)))
        started = asyncio.get_running_loop().time()
        deadline = started + tasks.peer_timeout_s(self._config)
        try:
            await self._wait_layer_until(task, layer, needs, deadline)
        finally:
            self.layer_wait_seconds += asyncio.get_running_loop().time() - started

    async def _wait_layer_until(self, task: _Task, layer: int, needs: bool, deadline: float) -> None:
        while needs and layer not in task.de_layers:
            if task.failed is not None:
                raise _TaskFailedError(task.failed)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                task.failed = f"layer {layer} KV from the decode engine did not arrive in time"
                raise _TaskFailedError(task.failed)
            task.de_layer_arrived.clear()
            try:
                await asyncio.wait_for(task.de_layer_arrived.wait(), remaining)
            except TimeoutError:
                continue

    def _cached_kv(self, task: _Task, layer: int, cached: int) -> layout.ByteArray:
        parts = [self._hit_rows(task, layer)] if task.hit_tokens else []
        parts += task.computed[layer]
        if not parts:
            return np.zeros((0, self._geometry.bytes_per_token_layer), np.uint8)
        kv = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if kv.shape[0] != cached:
            raise RuntimeError(f"{task.task_id}: assembled {kv.shape[0]} cached tokens, expected {cached}")
        return kv

    def _send_layer(self, task: _Task, layer: int, start: int, new_kv: layout.ByteArray) -> None:
        """Queue layer KV for the DE: PE-side hits (first time) and the newly computed tokens."""
        if not task.hits_sent and task.hit_tokens:
            rows = self._hit_rows(task, layer)
            tokens = self._geometry.block_tokens
            index = 0
            while index * tokens < task.hit_tokens:
                if task.sides[index] != "pe":
                    index += 1
                    continue
                first = index
                while index * tokens < task.hit_tokens and task.sides[index] == "pe":
                    index += 1
                end = min(index * tokens, task.hit_tokens)
                task.outbox.put(
                    messages.PeLayer(task.task_id, layer, first * tokens, rows[first * tokens : end])
                )
        task.outbox.put(messages.PeLayer(task.task_id, layer, start, new_kv))

    async def _run_batch(self, batch: list[batching.BatchEntry]) -> None:
        entries = [(self._tasks[entry.request_id], entry) for entry in batch]
        items = [
            runner_api.PrefillItem(
                task.task_id,
                entry.cached,
                task.prompt[entry.cached : entry.cached + entry.bsz],
                tasks.sampling_of(task.assignment.sampling, task.task_id),
            )
            for task, entry in entries
        ]
        layerwise = self._config.use_layerwise
        try:
            if not layerwise:
                for task, _ in entries:
                    for layer in range(self._runner.num_layers):
                        await self._wait_layer(task, layer)
            prefill = self._runner.begin_prefill(items)
            outputs: list[list[layout.ByteArray]] = []
            for layer in range(self._runner.num_layers):
                for task, _ in entries:
                    await self._wait_layer(task, layer)
                cached_kv = [self._cached_kv(task, layer, entry.cached) for task, entry in entries]
                new = await asyncio.to_thread(prefill.run_layer, layer, cached_kv)
                outputs.append(new)
                if layerwise:
                    for (task, entry), kv in zip(entries, new, strict=True):
                        self._send_layer(task, layer, entry.cached, kv)
            firsts = await asyncio.to_thread(prefill.finish)
        except _TaskFailedError:
            for task, _ in entries:
                if task.failed is not None:
                    await self._fail(task.task_id, task.failed, notify_peer=True)
            return
        self.batches_run += 1
        for index, ((task, entry), first) in enumerate(zip(entries, firsts, strict=True)):
            for layer in range(self._runner.num_layers):
                kv = outputs[layer][index]
                task.computed[layer].append(kv)
                if not layerwise:
                    self._send_layer(task, layer, entry.cached, kv)
            task.hits_sent = True
            task.progress = entry.cached + entry.bsz
            if task.progress == len(task.prompt):
                self._spawn(self._complete(task, first))

    async def _complete(self, task: _Task, first_token: int) -> None:
        computed = time.monotonic()
        task.outbox.put(messages.PrefillDone(task.task_id, task.hit_tokens, first_token))
        await task.outbox.close()
        self._tasks.pop(task.task_id, None)
        self._finished.add(task.task_id)
        if task.outbox.failed or task.failed is not None:
            return
        self._count_task(task, computed)
        self._report(
            task.task_id,
            prefill_done=True,
            cached_tokens=task.hit_tokens,
            kv_read_bytes_pe=task.read_bytes_pe,
        )

    def _count_task(self, task: _Task, computed: float) -> None:
        """Add a completed task's time to :attr:`task_seconds`, by part (a task completes only after it
        was ready and ran, so both times are set; accounting never stands in the way of reporting)."""
        if task.ready_at is None or task.started_at is None:
            log.warning("%s: completed without ready/start times; not counted in task_seconds", task.task_id)
            return
        parts = {
            "read": task.ready_at - task.assigned_at,
            "queue": task.started_at - task.ready_at,
            "compute": computed - task.started_at,
            "send": time.monotonic() - computed,
        }
        for part, seconds in parts.items():
            self.task_seconds[part] += seconds
        self.tasks_done += 1

    async def _fail(self, task_id: str, reason: str, *, notify_peer: bool) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            return
        task.failed = reason
        self._finished.add(task_id)
        task.outbox.abort()
        log.warning("%s: prefill failed: %s", task_id, reason)
        self._report(task_id, error=reason)
        if notify_peer:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await self._links.send(task.assignment.decode.transport, messages.TaskAbort(task_id, reason))

    def _report(self, task_id: str, **fields: object) -> None:
        self._events(
            protocol.TaskEvent.model_validate({"task_id": task_id, "engine_id": self.engine_id, **fields})
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _TaskFailedError(Exception):
    """A task in the batch cannot proceed (its peer's KV did not arrive)."""
