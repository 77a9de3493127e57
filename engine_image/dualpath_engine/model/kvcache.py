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

Both hold KV in the model dtype, K after RoPE, exactly as a layer computed it, so reading it back
(:meth:`DeviceKV.read`) gives identical bytes from either store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from dualpath_engine.model import llama


class KVCacheError(ValueError):
    """A store used wrongly (unknown sequence, range outside its KV, a sequence twice in a step)."""


class DecodeStep(Protocol):
    """One decode step over a batch of sequences, layer by layer."""

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Store each sequence's new ``key``/``value`` [batch, kv_heads, hd] at its next position for
        ``layer`` and return the attention of ``query`` [batch, heads, hd] over the sequence's KV
        including the new token: [batch, heads * hd]."""
        ...

    def commit(self) -> None:
        """Every layer has run: each sequence is one token longer."""
        ...


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

    def begin_step(self, seq_ids: Sequence[str]) -> DecodeStep:
        """Make room for one more token of each (distinct, known) sequence and start a decode step."""
        ...


def _check_distinct_known(seq_ids: Sequence[str], known: dict[str, int]) -> list[int]:
    if len(set(seq_ids)) != len(seq_ids):
        raise KVCacheError("a decode step lists a sequence twice")
    unknown = [seq for seq in seq_ids if seq not in known]
    if unknown:
        raise KVCacheError(f"decode of unknown sequences {unknown}")
    return [known[seq] for seq in seq_ids]


class SequenceKV:
    """One growing device tensor per sequence; attention per sequence in place."""

    def __init__(self, geo: llama.Geometry, device: torch.device) -> None:
        self._geo = geo
        self._device = device
        self._kv: dict[str, torch.Tensor] = {}
        self._len: dict[str, int] = {}

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

    def length(self, seq_id: str) -> int:
        """See :meth:`DeviceKV.length`."""
        if seq_id not in self._len:
            raise KVCacheError(f"unknown sequence {seq_id}")
        return self._len[seq_id]

    def read(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """See :meth:`DeviceKV.read`."""
        _check_range(seq_id, start, end, self.length(seq_id))
        return self._kv[seq_id][:, start:end]

    def release(self, seq_id: str) -> None:
        """See :meth:`DeviceKV.release`."""
        self._kv.pop(seq_id, None)
        self._len.pop(seq_id, None)

    def begin_step(self, seq_ids: Sequence[str]) -> _SequenceStep:
        """See :meth:`DeviceKV.begin_step`."""
        lengths = _check_distinct_known(seq_ids, self._len)
        stores = [self._reserve(seq, n + 1) for seq, n in zip(seq_ids, lengths, strict=True)]
        return _SequenceStep(self, list(seq_ids), stores, lengths)


class _SequenceStep:
    def __init__(
        self, owner: SequenceKV, seq_ids: list[str], stores: list[torch.Tensor], lengths: list[int]
    ) -> None:
        self._owner = owner
        self._seq_ids = seq_ids
        self._stores = stores
        self._lengths = lengths

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        new_kv = torch.stack((key, value), dim=1)
        outs = []
        for index, (store, n) in enumerate(zip(self._stores, self._lengths, strict=True)):
            view = store[layer, : n + 1]
            view[n] = new_kv[index]
            outs.append(llama.attend(query[index : index + 1], view, llama.Segment(cached=n, length=1)))
        return torch.cat(outs, dim=0).flatten(1)

    def commit(self) -> None:
        for seq in self._seq_ids:
            self._owner._len[seq] += 1


class PagedKV:
    """A paged pool shared by all sequences; one gather and one attention call per layer and step."""

    def __init__(
        self, geo: llama.Geometry, device: torch.device, *, page_tokens: int, initial_tokens: int
    ) -> None:
        if page_tokens < 1 or initial_tokens < 1:
            raise KVCacheError(
                f"page_tokens ({page_tokens}) and initial_tokens ({initial_tokens}) must be >= 1"
            )
        self._geo = geo
        self._device = device
        self.page_tokens = page_tokens
        self._initial_pages = math.ceil(initial_tokens / page_tokens)
        self._pool: torch.Tensor | None = None
        self._free: list[int] = []
        self._pages: dict[str, list[int]] = {}
        self._len: dict[str, int] = {}

    @property
    def capacity_pages(self) -> int:
        """Pages the pool holds now (0 before the first sequence)."""
        return 0 if self._pool is None else self._pool.shape[1] // self.page_tokens

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds."""
        return len(self._free)

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
        self._free.extend(range(pages - 1, old - 1, -1))

    def _take(self, seq_id: str, tokens: int) -> list[int]:
        pages = self._pages.setdefault(seq_id, [])
        missing = math.ceil(tokens / self.page_tokens) - len(pages)
        if missing > len(self._free):
            needed = self.capacity_pages + missing - len(self._free)
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
            pool = self._pool
            assert pool is not None
            pool.index_copy_(1, self._slots(seq_id, 0, tokens), kv.to(pool.dtype))

    def length(self, seq_id: str) -> int:
        """See :meth:`DeviceKV.length`."""
        if seq_id not in self._len:
            raise KVCacheError(f"unknown sequence {seq_id}")
        return self._len[seq_id]

    def read(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """See :meth:`DeviceKV.read`."""
        _check_range(seq_id, start, end, self.length(seq_id))
        pool = self._pool
        assert pool is not None
        return pool.index_select(1, self._slots(seq_id, start, end))

    def release(self, seq_id: str) -> None:
        """See :meth:`DeviceKV.release`."""
        self._len.pop(seq_id, None)
        self._free.extend(reversed(self._pages.pop(seq_id, [])))

    def begin_step(self, seq_ids: Sequence[str]) -> _PagedStep:
        """See :meth:`DeviceKV.begin_step`."""
        lengths = _check_distinct_known(seq_ids, self._len)
        tables = [self._take(seq, n + 1) for seq, n in zip(seq_ids, lengths, strict=True)]
        width = max(len(table) for table in tables)
        batch = len(seq_ids)
        # One host array, one copy to the device: [page table (batch x width) | write slot | lengths].
        packed = np.zeros(batch * width + 2 * batch, dtype=np.int64)
        for row, table in enumerate(tables):
            packed[row * width : row * width + len(table)] = table
        n = np.asarray(lengths, dtype=np.int64)
        table_end = batch * width
        packed[table_end : table_end + batch] = (
            packed[np.arange(batch) * width + n // self.page_tokens] * self.page_tokens + n % self.page_tokens
        )
        packed[table_end + batch :] = n + 1
        on_device = torch.from_numpy(packed).to(self._device)
        assert self._pool is not None
        return _PagedStep(
            self,
            list(seq_ids),
            table=on_device[:table_end].view(batch, width),
            write=on_device[table_end : table_end + batch],
            lengths=on_device[table_end + batch :],
        )


class _PagedStep:
    def __init__(
        self,
        owner: PagedKV,
        seq_ids: list[str],
        table: torch.Tensor,
        write: torch.Tensor,
        lengths: torch.Tensor,
    ) -> None:
        self._owner = owner
        self._seq_ids = seq_ids
        self._table = table
        self._write = write
        self._lengths = lengths

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        owner = self._owner
        pool = owner._pool
        assert pool is not None
        layer_kv = pool[layer]
        layer_kv.index_copy_(0, self._write, torch.stack((key, value), dim=1))
        pages = layer_kv.view(-1, owner.page_tokens, *layer_kv.shape[1:])
        batch, width = self._table.shape
        gathered = pages[self._table].view(batch, width * owner.page_tokens, *layer_kv.shape[1:])
        return llama.attend_padded(query, gathered, self._lengths).flatten(1)

    def commit(self) -> None:
        for seq in self._seq_ids:
            self._owner._len[seq] += 1


def _check_range(seq_id: str, start: int, end: int, length: int) -> None:
    if not 0 <= start <= end <= length:
        raise KVCacheError(f"{seq_id}: range {start}..{end} outside 0..{length}")
