"""The decode engine (DE) loop: DE-side storage reads streamed to the PE layer by layer, the DE buffer
where the full prompt KV assembles, decoding of all running requests in every step, persistence of each
Full Block as it fills, and token streaming to the scheduler (torch-free).

Built by ``engine.service`` with an injected ``ModelRunner``; fed by the group leader (``assign``,
``cancel``) and by the KV transport (``handle``). One step = schedule (every decoding request) ->
execute (``runner.decode``) -> update (tokens, finish, block persistence, events).

The DE buffer of a task is a host array ``[layers, prompt_tokens, bytes]``: DE-side hit blocks are read
into it from storage (this node's read queue and storage NIC) and sent to the PE one layer at a time;
the PE fills in every other token range (``PeLayer``). On ``PrefillDone`` the buffer is loaded onto the
device and freed. The DE persists the prompt's Full Blocks that storage lacks, then every block that
fills during decoding (paper section 4: "persisted right away"), and reports their hashes.

Decode steps must not wait behind the KV traffic the DE read path adds (the paper's requirement that
DualPath leaves TPOT unchanged). So the event loop only schedules: every runner call (decode steps,
loading a sequence, reading KV back for persistence, freeing) runs in order on one device thread, and
the byte work of a DE-side read (copying blocks into the buffer, gathering each layer for the PE) and of
large incoming ``PeLayer`` messages runs in worker threads (numpy releases the GIL while copying).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import numpy as np

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.engine import messages, tasks
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.kv import hashing, layout, readqueue, storage
from dualpath_engine.scheduler import protocol

log = logging.getLogger(__name__)

EventSink = Callable[[protocol.TaskEvent], None]

OFFLOAD_BYTES = 256 * 1024
"""Incoming ``PeLayer`` KV at least this large is copied into the DE buffer in a worker thread."""


class ByteSender(Protocol):
    """Something bytes leave through (the storage NIC, for block writes)."""

    async def transmit(self, nbytes: int) -> None:
        """Account ``nbytes`` sent; may wait to respect a bandwidth budget."""
        ...


@dataclasses.dataclass(eq=False)
class _Task:
    assignment: protocol.Assignment
    sides: dict[int, protocol.Side]
    outbox: tasks.Outbox
    buffer: layout.ByteArray | None
    done: messages.PrefillDone | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    reported: int = 0
    hashes: list[hashing.BlockHash] = dataclasses.field(default_factory=list)
    persisted: int = 0
    new_hashes: list[str] = dataclasses.field(default_factory=list)
    read_bytes_de: int = 0
    decoding: bool = False
    kv_tokens: int = 0
    """Tokens whose KV the device holds (the prompt once loaded, then one more per decode step)."""
    persist_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    deadline: float = 0.0

    @property
    def task_id(self) -> str:
        return self.assignment.task_id


class DecodeEngine:
    """One decode engine."""

    def __init__(
        self,
        *,
        engine_config: config.EngineConfig,
        runner: runner_api.ModelRunner,
        reads: readqueue.ReadQueue,
        links: messages.PeerLinks,
        events: EventSink,
        storage_nic: ByteSender | None = None,
    ) -> None:
        self._config = engine_config
        self._runner = runner
        self._reads = reads
        self._links = links
        self._events = events
        self._storage_nic = storage_nic
        self._geometry = layout.BlockGeometry.from_config(engine_config.model, engine_config.kv)
        self._root = hashing.root_hash(hashing.namespace_for(engine_config.model, engine_config.kv))
        self._tasks: dict[str, _Task] = {}
        self._early: dict[str, list[messages.Message]] = {}
        self._finished = tasks.RecentIds()
        self._wakeup = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._device = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{engine_config.name}-decode-device"
        )
        self.steps_run = 0
        """Decode steps executed."""
        self.read_bytes_total = 0
        """KV bytes this engine read from storage for the DE read path."""
        self.persisted_blocks = 0
        """Full Blocks this engine wrote to storage."""
        self.step_seconds = {"compute": 0.0, "queue": 0.0, "host": 0.0}
        """Where decode-step time went: the runner's decode (``compute``), waiting on the device thread
        behind loads and KV read-backs (``queue``), and the event loop between one step's result and
        the next step's submission (``host``). TPOT = their sum per step."""
        self.batch_steps: dict[str, int] = {}
        """Decode steps by batch-size bucket (:func:`batch_bucket`)."""
        self.batch_tokens: dict[str, int] = {}
        """Tokens decoded by batch-size bucket (a step of ``n`` sequences decodes ``n``)."""
        self.batch_seconds: dict[str, float] = {}
        """Decode-step time (compute + queue + host) by batch-size bucket: the step time at equal batch,
        which TPOT alone cannot give (TPOT also follows how many requests decode at once)."""

    @property
    def engine_id(self) -> str:
        """This engine's name."""
        return self._config.name

    async def _on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a runner call on the device thread (calls run one at a time, in submission order)."""
        return await asyncio.get_running_loop().run_in_executor(self._device, functools.partial(fn, *args))

    def _release(self, task_id: str) -> None:
        """Free a sequence's device KV after every runner call submitted before (fire and forget)."""
        with contextlib.suppress(RuntimeError):  # the device thread is shut down: the engine is stopping
            self._device.submit(self._runner.release, task_id)

    def close(self) -> None:
        """Stop the device thread once queued runner calls are done (the engine is shutting down)."""
        self._device.shutdown(wait=False)

    def load(self) -> tuple[int, int]:
        """``(seq, tok)``: unfinished tasks and their tokens (prompt + generated)."""
        tokens = sum(len(t.assignment.prompt_token_ids) + len(t.generated) for t in self._tasks.values())
        return len(self._tasks), tokens

    def used_kv_bytes(self) -> int:
        """KV bytes the running requests hold (prompt + generated tokens, all layers)."""
        _, tokens = self.load()
        return tokens * self._geometry.bytes_per_token

    def free_kv_bytes(self) -> int:
        """KV memory left for new requests (the configured buffer minus what running requests hold)."""
        return max(0, self._config.kv.host_buffer_bytes - self.used_kv_bytes())

    def kv_used_ratio(self) -> float:
        """Fraction of the KV capacity (``kv.host_buffer_bytes``) in use, 0..1; ``1 - ratio`` is the
        fraction the leader reports as free (``free_kv_bytes``)."""
        return min(1.0, self.used_kv_bytes() / self._config.kv.host_buffer_bytes)

    def assign(self, assignment: protocol.Assignment) -> None:
        """Take a task (repeats are ignored); start DE-side reads."""
        task_id = assignment.task_id
        if task_id in self._tasks or task_id in self._finished:
            return

        async def failed(reason: str) -> None:
            await self._fail(task_id, reason, notify_peer=False)

        prompt = len(assignment.prompt_token_ids)
        task = _Task(
            assignment=assignment,
            sides=tasks.read_sides(assignment, self._config.mode),
            outbox=tasks.Outbox(self._links, assignment.prefill.transport, failed),
            buffer=np.empty(
                (self._geometry.num_layers, prompt, self._geometry.bytes_per_token_layer), np.uint8
            ),
        )
        task.deadline = asyncio.get_running_loop().time() + tasks.ORPHAN_TIMEOUT_S
        self._tasks[task_id] = task
        if any(side == "de" for side in task.sides.values()):
            self._spawn(self._read_de_side(task))
        for message in self._early.pop(task_id, []):
            self._accept(task, message)
        self._spawn(self._watchdog(task))

    def knows(self, task_id: str) -> bool:
        """Whether the task is running here."""
        return task_id in self._tasks

    def cancel(self, task_id: str) -> None:
        """Drop a task."""
        task = self._tasks.pop(task_id, None)
        self._finished.add(task_id)
        self._early.pop(task_id, None)
        if task is not None:
            task.outbox.abort()
            if task.decoding:
                self._release(task_id)

    async def handle(self, message: messages.Message) -> None:
        """A message from a prefill engine."""
        task = self._tasks.get(message.task_id)
        if task is None:
            if message.task_id not in self._finished:
                self._early.setdefault(message.task_id, []).append(message)
            return
        if isinstance(message, messages.PeLayer) and message.data.nbytes >= OFFLOAD_BYTES:
            # The transport delivers a peer's messages one at a time, so the copy finishes before the
            # next message (and the final PrefillDone) of this task is accepted.
            buffer = task.buffer
            if buffer is not None:
                end = message.start + message.data.shape[0]
                await asyncio.to_thread(_copy_rows, buffer, message.layer, message.start, end, message.data)
            return
        self._accept(task, message)

    def _accept(self, task: _Task, message: messages.Message) -> None:
        if isinstance(message, messages.PeLayer):
            if task.buffer is not None:
                end = message.start + message.data.shape[0]
                task.buffer[message.layer, message.start : end] = message.data
        elif isinstance(message, messages.PrefillDone):
            task.done = message
            self._wakeup.set()
        elif isinstance(message, messages.TaskAbort):
            self._spawn(
                self._fail(task.task_id, f"prefill engine aborted: {message.reason}", notify_peer=False)
            )

    async def _read_de_side(self, task: _Task) -> None:
        buffer = task.buffer
        if buffer is None:
            raise RuntimeError(f"{task.task_id}: DE-side read after the buffer was released")
        indices = [i for i, side in sorted(task.sides.items()) if side == "de"]
        by_index = {block.index: block for block in task.assignment.hit_blocks}
        outs = [layout.empty_full_block(self._geometry) for _ in indices]
        hashes = [bytes.fromhex(by_index[i].hash) for i in indices]
        try:
            results = await self._reads.read(hashes, outs)
        except (OSError, ValueError) as exc:
            log.warning("%s: DE-side storage read failed: %s", task.task_id, exc)
            results = [storage.ReadResult.INVALID] * len(indices)
        valid = [i for i, result in zip(indices, results, strict=True) if result is storage.ReadResult.HIT]
        blocks = {i: out for i, out in zip(indices, outs, strict=True)}
        layers = await asyncio.to_thread(self._assemble, buffer, valid, blocks, task.assignment)
        task.read_bytes_de = len(valid) * self._geometry.full_block_bytes
        self.read_bytes_total += task.read_bytes_de
        task.outbox.put(messages.HitReport(task.task_id, tuple(valid)))
        for layer, data in enumerate(layers):
            task.outbox.put(messages.DeLayer(task.task_id, layer, tuple(valid), data))

    def _assemble(
        self,
        buffer: layout.ByteArray,
        valid: list[int],
        blocks: dict[int, layout.ByteArray],
        assignment: protocol.Assignment,
    ) -> list[layout.ByteArray]:
        """(worker thread) Copy the valid blocks into the DE buffer; gather each layer for the PE."""
        tokens = self._geometry.block_tokens
        prompt = len(assignment.prompt_token_ids)
        for index in valid:
            end = min((index + 1) * tokens, prompt)
            buffer[:, index * tokens : end] = blocks[index][:, : end - index * tokens]
        if not valid:
            empty = np.zeros((0, self._geometry.bytes_per_token_layer), np.uint8)
            return [empty] * self._geometry.num_layers
        return [
            np.concatenate([blocks[i][layer] for i in valid]) for layer in range(self._geometry.num_layers)
        ]

    async def _watchdog(self, task: _Task) -> None:
        """Give a task up if its prefill never completes (the PE died): the scheduler retries it."""
        loop = asyncio.get_running_loop()
        while task.task_id in self._tasks and task.done is None:
            if loop.time() >= task.deadline:
                await self._fail(task.task_id, "prefill did not complete in time", notify_peer=True)
                return
            await asyncio.sleep(min(1.0, max(0.0, task.deadline - loop.time())))

    async def run(self) -> None:
        """The engine loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        last: float | None = None  # when the previous step's result arrived (None: idle since)
        try:
            while True:
                await self._start_ready()
                active = [t for t in self._tasks.values() if t.decoding]
                if not active:
                    last = None
                    self._wakeup.clear()
                    if not any(t.done is not None and not t.decoding for t in self._tasks.values()):
                        await self._wakeup.wait()
                    continue
                steps = [(t.task_id, t.generated[-1]) for t in active]
                submitted = loop.time()
                host = submitted - last if last is not None else 0.0
                outputs, compute = await self._on_device(self._timed_decode, steps)
                last = loop.time()
                queue = max(0.0, last - submitted - compute)
                self._count_step(len(steps), compute=compute, queue=queue, host=host)
                for task, token in zip(active, outputs, strict=True):
                    task.kv_tokens += 1
                    if task.task_id in self._tasks:
                        self._advance(task, token)
                await asyncio.sleep(0)
        finally:
            self.close()

    def _count_step(self, batch: int, *, compute: float, queue: float, host: float) -> None:
        """Account one decode step's time by part and by batch-size bucket."""
        self.steps_run += 1
        self.step_seconds["compute"] += compute
        self.step_seconds["queue"] += queue
        self.step_seconds["host"] += host
        bucket = batch_bucket(batch)
        self.batch_steps[bucket] = self.batch_steps.get(bucket, 0) + 1
        self.batch_tokens[bucket] = self.batch_tokens.get(bucket, 0) + batch
        self.batch_seconds[bucket] = self.batch_seconds.get(bucket, 0.0) + compute + queue + host

    def _timed_decode(self, steps: list[tuple[str, int]]) -> tuple[list[int], float]:
        """(device thread) One decode step and the seconds it took."""
        started = time.perf_counter()
        outputs = self._runner.decode(steps)
        return outputs, time.perf_counter() - started

    async def _start_ready(self) -> None:
        for task in list(self._tasks.values()):
            if task.done is None or task.decoding or task.buffer is None:
                continue
            sampling = tasks.sampling_of(task.assignment.sampling, task.task_id)
            buffer, task.buffer = task.buffer, None
            await self._on_device(self._runner.load_sequence, task.task_id, buffer, sampling)
            if self._tasks.get(task.task_id) is not task:  # cancelled or failed while loading
                self._release(task.task_id)
                continue
            task.kv_tokens = buffer.shape[1]
            # The usable hit prefix was just read from storage: only the blocks after it can be missing
            # (a prompt's blocks are mostly hits; checking each costs the event loop a store round trip).
            task.persisted = task.done.cached_tokens // self._geometry.block_tokens
            task.decoding = True
            self._spawn(task.outbox.close())
            self._advance(task, task.done.first_token)

    def _advance(self, task: _Task, token: int) -> None:
        """Record one generated token: finish checks, block persistence, event."""
        sampling = task.assignment.sampling
        stop_ids = set(sampling.stop_token_ids) | ({tok.EOS} if not sampling.ignore_eos else set())
        finish: protocol.FinishReason | None = None
        if token in stop_ids:
            finish = "stop"
        else:
            task.generated.append(token)
            if len(task.generated) >= sampling.max_tokens:
                finish = "length"
        filled = (len(task.assignment.prompt_token_ids) + len(task.generated)) // self._geometry.block_tokens
        if filled > task.persisted and finish is None:
            self._spawn(self._persist(task))  # a Full Block may have filled: persist it right away
        self._emit(task, finish)
        if finish is not None:
            self._tasks.pop(task.task_id, None)
            self._finished.add(task.task_id)
            self._spawn(self._release_after_persist(task))

    async def _release_after_persist(self, task: _Task) -> None:
        """Persist what is left of a finished sequence, free it, and report the blocks written after
        its final event (else the scheduler would never learn of them and a rerun would miss them)."""
        await self._persist(task)
        async with task.persist_lock:
            self._release(task.task_id)
        if task.new_hashes:
            hashes, task.new_hashes = tuple(task.new_hashes), []
            self._events(
                protocol.TaskEvent(
                    task_id=task.task_id,
                    engine_id=self.engine_id,
                    first_index=task.reported,
                    persisted_block_hashes=hashes,
                )
            )

    def _emit(self, task: _Task, finish: protocol.FinishReason | None) -> None:
        fresh = tuple(task.generated[task.reported :])
        first = task.reported
        task.reported = len(task.generated)
        hashes, task.new_hashes = tuple(task.new_hashes), []
        read_bytes, task.read_bytes_de = task.read_bytes_de, 0
        self._events(
            protocol.TaskEvent(
                task_id=task.task_id,
                engine_id=self.engine_id,
                first_index=first,
                token_ids=fresh,
                finish_reason=finish,
                kv_read_bytes_de=read_bytes,
                persisted_block_hashes=hashes,
            )
        )

    async def _persist(self, task: _Task) -> None:
        """Write every Full Block of the sequence's KV that has filled and storage lacks.

        The blocks to write are read back from the device in ONE runner call (a contiguous token
        range), so a prompt's many fresh blocks cost one trip through the device thread, not one each.
        """
        async with task.persist_lock:
            if not task.decoding:
                return
            length = task.kv_tokens
            tokens = [*task.assignment.prompt_token_ids, *task.generated][:length]
            block_tokens = self._geometry.block_tokens
            while len(task.hashes) < length // block_tokens:
                start = len(task.hashes) * block_tokens
                parent = task.hashes[-1] if task.hashes else self._root
                task.hashes.append(hashing.block_hash(parent, tokens[start : start + block_tokens]))
            candidates = range(task.persisted, len(task.hashes))
            present = await self._reads.store.stored([task.hashes[index] for index in candidates])
            missing = [index for index, there in zip(candidates, present, strict=True) if not there]
            if missing:
                first, end = missing[0], missing[-1] + 1
                try:
                    data = await self._on_device(
                        self._runner.read_kv, task.task_id, first * block_tokens, end * block_tokens
                    )
                except runner_api.RunnerError:
                    return  # released meanwhile (cancelled or failed)
                for index in missing:
                    offset = (index - first) * block_tokens
                    await self._write_block(task, task.hashes[index], data[:, offset : offset + block_tokens])
            task.persisted = len(task.hashes)

    async def _write_block(self, task: _Task, block: hashing.BlockHash, data: layout.ByteArray) -> None:
        """Write one Full Block unless it is stored or another engine is writing it (its claim): a turn
        that recomputed KV whose write was still queued must not spend the storage NIC on it again."""
        store = self._reads.store
        if not await store.claim(block):
            return
        try:
            if self._storage_nic is not None and self._config.mode != "oracle":
                await self._storage_nic.transmit(self._geometry.full_block_bytes)
            if await store.write(block, data):
                task.new_hashes.append(block.hex())
                self.persisted_blocks += 1
        finally:
            await store.release_claim(block)

    async def _fail(self, task_id: str, reason: str, *, notify_peer: bool) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            return
        self._finished.add(task_id)
        task.outbox.abort()
        if task.decoding:
            self._release(task_id)
        log.warning("%s: decode failed: %s", task_id, reason)
        self._events(protocol.TaskEvent(task_id=task_id, engine_id=self.engine_id, error=reason))
        if notify_peer:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await self._links.send(task.assignment.prefill.transport, messages.TaskAbort(task_id, reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def batch_bucket(size: int) -> str:
    """The label of a decode batch of ``size`` sequences: ``"1"``, ``"2"``, then power-of-two ranges
    ``"3-4"``, ``"5-8"``, ... (the batch buckets the paged store's CUDA graphs are captured for)."""
    if size < 1:
        raise ValueError(f"a decode batch has at least one sequence, got {size}")
    if size <= 2:
        return str(size)
    upper = 1 << (size - 1).bit_length()
    return f"{upper // 2 + 1}-{upper}"


def _copy_rows(buffer: layout.ByteArray, layer: int, start: int, end: int, data: layout.ByteArray) -> None:
    """(worker thread) Place a PE layer's token rows into the DE buffer."""
    buffer[layer, start:end] = data
