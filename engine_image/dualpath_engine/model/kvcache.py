"""Device-resident KV of the sequences a decode engine holds, and the attention of a decode step over it.

Two stores behind one interface (:class:`DeviceKV`), chosen by ``model.runner.TorchRunner``:

- :class:`SequenceKV`: one tensor ``[layers, capacity, 2, kv_heads, head_dim]`` per sequence, grown by
  doubling. A decode step writes each sequence's new KV into its tensor and attends over it in place:
  no copy of the past, but one attention call per sequence and layer, so a step's kernel count (and on
  a GPU its time, launch-bound for a small model) grows with the batch. The CPU default: there the
  arithmetic dominates and copying the past would only add to it.
- :class:`PagedKV`: one pool ``[layers, pages * page_tokens, 2, kv_heads, head_dim]`` carved into
  pages of ``page_tokens``, a page table per sequence. A decode step writes all new KV with one
  indexed copy and attends the whole batch with one page gather and one attention call per layer
  (``llama.attend_padded``), whatever the batch size. The CUDA default. The pool is allocated on the
  first sequence (prefill-only engines never allocate it) and doubles when it runs out of pages.
  Steps run padded to a bucket (batch and page-table width rounded up to powers of two; padded rows
  write and read page 0, which no sequence owns), so on CUDA each bucket's whole step (embedding,
  every layer, logits) is captured once as a CUDA graph and replayed: one launch per step instead of
  hundreds of Python-issued kernels, which a small model's decode is otherwise bound by.

Both hold KV in the model dtype, K after RoPE, exactly as a layer computed it, so reading it back
(:meth:`DeviceKV.read`) gives identical bytes from either store.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from dualpath_engine.model import llama

log = logging.getLogger(__name__)


class KVCacheError(ValueError):
    """A store used wrongly (unknown sequence, range outside its KV, a sequence twice in a step)."""


class DeviceKV(Protocol):
    """Device KV of a set of sequences (see the module docstring)."""

    def load(self, seq_id: str, kv: torch.Tensor) -> None:
        """Hold ``kv`` [layers, tokens, 2, kv_heads, hd] (already on the device) as ``seq_id``'s KV,
        replacing any earlier KV of ``seq_id``."""
        ...

    def length(self, seq_id: str) -> int:
        """Tokens of KV held for ``seq_id``; KVCacheError when unknown."""
        ...

    def read(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Tokens ``start..end-1`` of ``seq_id``: [layers, end - start, 2, kv_heads, hd]."""
        ...

    def release(self, seq_id: str) -> None:
        """Free ``seq_id``'s KV (unknown ids are ignored)."""
        ...

    def decode(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """One decode step: feed ``tokens[i]`` to (distinct, known) sequence ``seq_ids[i]``, store its
        KV, and return float32 logits [batch, vocab] of each sequence's next token; each sequence is
        one token longer afterwards."""
        ...


class _Lengths:
    """Tokens of KV each held sequence has: what both stores count the same way."""

    def __init__(self) -> None:
        self._len: dict[str, int] = {}

    def length(self, seq_id: str) -> int:
        """See :meth:`DeviceKV.length`."""
        if seq_id not in self._len:
            raise KVCacheError(f"unknown sequence {seq_id}")
        return self._len[seq_id]

    def _step_lengths(self, seq_ids: Sequence[str]) -> list[int]:
        """The lengths of a decode step's sequences, which must be distinct and held."""
        if len(set(seq_ids)) != len(seq_ids):
            raise KVCacheError("a decode step lists a sequence twice")
        unknown = [seq for seq in seq_ids if seq not in self._len]
        if unknown:
            raise KVCacheError(f"decode of unknown sequences {unknown}")
        return [self._len[seq] for seq in seq_ids]

    def _advance(self, seq_ids: Sequence[str]) -> None:
        """A decode step ran: each of its sequences holds one more token."""
        for seq in seq_ids:
            self._len[seq] += 1


class SequenceKV(_Lengths):
    """One growing device tensor per sequence; attention per sequence in place."""

    def __init__(self, model: llama.Decoder, device: torch.device) -> None:
        super().__init__()
        self._model = model
        self._geo = model.geo
        self._device = device
        self._kv: dict[str, torch.Tensor] = {}

    def _reserve(self, seq_id: str, tokens: int) -> torch.Tensor:
        store = self._kv.get(seq_id)
        if store is not None and store.shape[1] >= tokens:
            return store
        capacity = max(64, 1 << (max(tokens, 1) - 1).bit_length())
        geo = self._geo
        grown = torch.empty(
            (geo.num_layers, capacity, 2, geo.num_kv_heads, geo.head_dim),
            dtype=geo.dtype,
            device=self._device,
        )
        if store is not None:
            grown[:, : self._len[seq_id]] = store[:, : self._len[seq_id]]
        self._kv[seq_id] = grown
        return grown

    def load(self, seq_id: str, kv: torch.Tensor) -> None:
        """See :meth:`DeviceKV.load`."""
        self.release(seq_id)
        tokens = kv.shape[1]
        self._reserve(seq_id, tokens + 1)[:, :tokens] = kv
        self._len[seq_id] = tokens

    def read(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """See :meth:`DeviceKV.read`."""
        _check_range(seq_id, start, end, self.length(seq_id))
        return self._kv[seq_id][:, start:end]

    def release(self, seq_id: str) -> None:
        """See :meth:`DeviceKV.release`."""
        self._kv.pop(seq_id, None)
        self._len.pop(seq_id, None)

    def decode(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """See :meth:`DeviceKV.decode`."""
        lengths = self._step_lengths(seq_ids)
        stores = [self._reserve(seq, n + 1) for seq, n in zip(seq_ids, lengths, strict=True)]

        def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            new_kv = torch.stack((key, value), dim=1)
            outs = []
            for index, (store, n) in enumerate(zip(stores, lengths, strict=True)):
                view = store[layer, : n + 1]
                view[n] = new_kv[index]
                segment = llama.Segment(cached=n, length=1)
                outs.append(llama.attend(query[index : index + 1], view, segment))
            return torch.cat(outs, dim=0).flatten(1)

        ids = torch.tensor(list(tokens), dtype=torch.long).to(self._device)
        positions = torch.tensor(lengths, dtype=torch.long).to(self._device)
        logits = self._model.decode_step(ids, positions, attend)
        self._advance(seq_ids)
        return logits


GRAPH_MAX_BATCH = 256
"""Largest batch bucket captured as a CUDA graph; larger batches run the same padded step eagerly."""

TRASH_PAGE = 0
"""The pool page padded rows write to and read from; never given to a sequence."""


def _bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


class PagedKV(_Lengths):
    """A paged pool shared by all sequences; one gather and one attention call per layer and step."""

    def __init__(
        self,
        model: llama.Decoder,
        device: torch.device,
        *,
        page_tokens: int,
        initial_tokens: int,
        cuda_graphs: bool = True,
    ) -> None:
        if page_tokens < 1 or initial_tokens < 1:
            raise KVCacheError(
                f"page_tokens ({page_tokens}) and initial_tokens ({initial_tokens}) must be >= 1"
            )
        super().__init__()
        self._model = model
        self._geo = model.geo
        self._device = device
        self.page_tokens = page_tokens
        self._initial_pages = math.ceil(initial_tokens / page_tokens) + 1  # + the trash page
        self._graphs = cuda_graphs and device.type == "cuda"
        self._pool: torch.Tensor | None = None
        self._free: list[int] = []
        self._pages: dict[str, list[int]] = {}
        self._steps: dict[tuple[int, int], _BucketStep] = {}
        self._graph_pool: Any = None  # torch.cuda.graph_pool_handle(), shared by every bucket's graph

    @property
    def pool(self) -> torch.Tensor:
        """The pool [layers, pages * page_tokens, 2, kv_heads, hd]; KVCacheError before the first load."""
        if self._pool is None:
            raise KVCacheError("the KV pool is allocated with the first sequence")
        return self._pool

    @property
    def capacity_pages(self) -> int:
        """Pages the pool holds now, the trash page included (0 before the first sequence)."""
        return 0 if self._pool is None else self._pool.shape[1] // self.page_tokens

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds (the trash page excluded)."""
        return len(self._free)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(batch, page-table width) buckets prepared so far (captured as CUDA graphs on CUDA)."""
        return sorted(self._steps)

    def _grow(self, pages: int) -> None:
        old = self.capacity_pages
        geo = self._geo
        # Zeros, not empty: padded keys are masked, but masked values still meet a 0 weight, and
        # 0 * NaN from uninitialised memory would be NaN.
        pool = torch.zeros(
            (geo.num_layers, pages * self.page_tokens, 2, geo.num_kv_heads, geo.head_dim),
            dtype=geo.dtype,
            device=self._device,
        )
        if self._pool is not None:
            pool[:, : self._pool.shape[1]] = self._pool
        self._pool = pool
        self._free.extend(range(pages - 1, max(old, TRASH_PAGE + 1) - 1, -1))
        self._steps.clear()  # prepared steps (and captured graphs) point at the old pool

    def _take(self, seq_id: str, tokens: int) -> list[int]:
        pages = self._pages.setdefault(seq_id, [])
        missing = math.ceil(tokens / self.page_tokens) - len(pages)
        if missing > len(self._free):
            needed = max(self.capacity_pages, TRASH_PAGE + 1) + missing - len(self._free)
            self._grow(max(needed, 2 * self.capacity_pages, self._initial_pages))
        for _ in range(max(0, missing)):
            pages.append(self._free.pop())
        return pages

    def _slots(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Pool token indices of ``seq_id``'s tokens ``start..end-1`` (on the device)."""
        positions = np.arange(start, end)
        pages = np.asarray(self._pages[seq_id], dtype=np.int64)
        slots = pages[positions // self.page_tokens] * self.page_tokens + positions % self.page_tokens
        return torch.from_numpy(slots).to(self._device)

    def load(self, seq_id: str, kv: torch.Tensor) -> None:
        """See :meth:`DeviceKV.load`."""
        self.release(seq_id)
        tokens = kv.shape[1]
        self._take(seq_id, tokens + 1)
        self._len[seq_id] = tokens
        if tokens:
            self.pool.index_copy_(1, self._slots(seq_id, 0, tokens), kv.to(self.pool.dtype))

    def read(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """See :meth:`DeviceKV.read`."""
        _check_range(seq_id, start, end, self.length(seq_id))
        return self.pool.index_select(1, self._slots(seq_id, start, end))

    def release(self, seq_id: str) -> None:
        """See :meth:`DeviceKV.release`."""
        self._len.pop(seq_id, None)
        self._free.extend(reversed(self._pages.pop(seq_id, [])))

    def decode(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """See :meth:`DeviceKV.decode`."""
        lengths = self._step_lengths(seq_ids)
        tables = [self._take(seq, n + 1) for seq, n in zip(seq_ids, lengths, strict=True)]
        step = self._step(_bucket(len(seq_ids)), _bucket(max(len(table) for table in tables)))
        step.fill(tokens, lengths, tables)
        logits = step.run()[: len(seq_ids)]
        self._advance(seq_ids)
        return logits

    @property
    def graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs (off on the CPU, or after a failed capture)."""
        return self._graphs

    def warm_up(self, max_batch: int, max_tokens: int) -> int:
        """Prepare every bucket up to ``max_batch`` sequences of up to ``max_tokens`` tokens now (on CUDA:
        capture its graph), so that serving never stops for a capture; returns the buckets ready.

        A capture runs the step three times (two warm-up runs, then the recording); done while serving,
        it stalls every sequence of that step. Buckets beyond these, and all of them after the pool
        grows, are captured on demand.
        """
        if self._pool is None:
            self._grow(self._initial_pages)
        widest = _bucket(math.ceil(max_tokens / self.page_tokens))
        batch = 1
        while batch <= _bucket(max_batch):
            width = 1
            while width <= widest:
                self._step(batch, width)
                width *= 2
            batch *= 2
        return len(self._steps)

    def _step(self, batch: int, width: int) -> _BucketStep:
        """The prepared step of a bucket, prepared (and on CUDA captured) the first time it is needed."""
        step = self._steps.get((batch, width))
        if step is None:
            step = self._steps[(batch, width)] = self._prepare(batch, width)
        return step

    def _prepare(self, batch: int, width: int) -> _BucketStep:
        step = _BucketStep(self, batch, width)
        if self._graphs and batch <= GRAPH_MAX_BATCH:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            started = time.perf_counter()
            try:
                step.capture(self._graph_pool)
                log.info(
                    "captured the decode graph of %d sequences x %d pages in %.1f ms",
                    batch,
                    width,
                    (time.perf_counter() - started) * 1e3,
                )
            except RuntimeError:  # torch.AcceleratorError is a RuntimeError
                # A capture the driver refuses must not take the engine down: the same padded step
                # runs eagerly (slower, identical results) from now on.
                log.exception(
                    "CUDA graph capture of decode bucket %s failed; decoding without graphs", (batch, width)
                )
                self._graphs = False
                step = _BucketStep(self, batch, width)
        return step

    def forward(self, inputs: _StepInputs) -> torch.Tensor:
        """The padded decode step over the pool: float32 logits [batch, vocab] (captured on CUDA)."""
        pool = self.pool
        batch, width = inputs.table.shape

        def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            layer_kv = pool[layer]
            layer_kv.index_copy_(0, inputs.write, torch.stack((key, value), dim=1))
            pages = layer_kv.view(-1, self.page_tokens, *layer_kv.shape[1:])
            gathered = pages[inputs.table].view(batch, width * self.page_tokens, *layer_kv.shape[1:])
            return llama.attend_padded(query, gathered, inputs.lengths).flatten(1)

        return self._model.decode_step(inputs.ids, inputs.positions, attend)


class _StepInputs:
    """Device views of one bucket's input buffer: ids, positions, write slots, lengths [batch] and the
    page table [batch, width]."""

    def __init__(self, buffer: torch.Tensor, batch: int, width: int) -> None:
        self.ids = buffer[:batch]
        self.positions = buffer[batch : 2 * batch]
        self.write = buffer[2 * batch : 3 * batch]
        self.lengths = buffer[3 * batch : 4 * batch]
        self.table = buffer[4 * batch :].view(batch, width)


class _BucketStep:
    """One (batch, width) bucket: a device input buffer, its host staging, and on CUDA a graph."""

    def __init__(self, owner: PagedKV, batch: int, width: int) -> None:
        self._owner = owner
        self.batch = batch
        self.width = width
        size = 4 * batch + batch * width
        device = owner._device
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._device_buffer = torch.zeros(size, dtype=torch.int64, device=device)
        self._inputs = _StepInputs(self._device_buffer, batch, width)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None
        self._pad()

    def _pad(self) -> None:
        """Every row a padding row: token 0 at position 0, writing and reading the trash page."""
        host = self._host.numpy()
        host[:] = 0
        host[3 * self.batch : 4 * self.batch] = 1
        host[4 * self.batch :] = TRASH_PAGE
        host[2 * self.batch : 3 * self.batch] = TRASH_PAGE * self._owner.page_tokens
        self._device_buffer.copy_(self._host)

    def fill(self, tokens: Sequence[int], lengths: Sequence[int], tables: Sequence[Sequence[int]]) -> None:
        """Load the real rows (the rest stay padding) and copy the buffer to the device.

        The host staging is rewritten only after the previous step's logits were read back (the
        runner synchronises on them), so the asynchronous copy never races the next fill.
        """
        batch, width, page = self.batch, self.width, self._owner.page_tokens
        host = self._host.numpy()
        rows = len(tokens)
        n = np.asarray(lengths, dtype=np.int64)
        table = host[4 * batch :].reshape(batch, width)
        table[:] = TRASH_PAGE
        for row, pages in enumerate(tables):
            table[row, : len(pages)] = pages
        host[:rows] = tokens
        host[rows:batch] = 0
        host[batch : batch + rows] = n
        host[batch + rows : 2 * batch] = 0
        host[2 * batch : 2 * batch + rows] = table[np.arange(rows), n // page] * page + n % page
        host[2 * batch + rows : 3 * batch] = TRASH_PAGE * page
        host[3 * batch : 3 * batch + rows] = n + 1
        host[3 * batch + rows : 4 * batch] = 1
        self._device_buffer.copy_(self._host, non_blocking=True)

    def capture(self, pool: Any) -> None:
        """Warm up on a side stream (padding rows only: writes go to the trash page), then capture."""
        side = torch.cuda.Stream(self._device_buffer.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self._device_buffer.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._owner.forward(self._inputs)
        torch.cuda.current_stream(self._device_buffer.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Captured on the warmed-up side stream (its cuBLAS workspace exists already: creating one
        # is not allowed while capturing). thread_local: the engine's transport threads may use the
        # device on their own streams while the device thread captures.
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            self._out = self._owner.forward(self._inputs)
        self._graph = graph

    def run(self) -> torch.Tensor:
        """Logits [batch bucket, vocab] of the filled inputs."""
        if self._graph is None:
            return self._owner.forward(self._inputs)
        self._graph.replay()
        assert self._out is not None
        return self._out


def _check_range(seq_id: str, start: int, end: int, length: int) -> None:
    if not 0 <= start <= end <= length:
        raise KVCacheError(f"{seq_id}: range {start}..{end} outside 0..{length}")
