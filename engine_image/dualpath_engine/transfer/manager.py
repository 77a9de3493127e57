"""The traffic manager: one per engine, owning every byte path of the engine's KV (torch-free).

- **Storage reads** go through the engine's :class:`~dualpath_engine.kv.readqueue.ReadQueue` (bounded,
  observable depth) and are charged to the node's storage NIC; hits land directly in host arena slots.
- **Storage writes** (persisting Full Blocks) are charged to the storage NIC's transmit side.
- **H2D / D2H** copies go through an injected :class:`~dualpath_engine.transfer.base.DeviceCopier`
  (``transfer.cuda.LayerCopier`` on GPUs, ``transfer.host.NumpyCopier`` on CPU) between arena slots and
  device KV, one batched call per layer.
- **PE<->DE** transfers go over the injected :class:`~dualpath_engine.transfer.base.Transport`, counted
  on the compute NICs of both ends.

The arena (``transfer.host.HostArena`` or ``transfer.cuda.PinnedArena``) is allocated once by the
caller; :meth:`TrafficManager.stage` leases runs of slots and waits while the arena is full. Built by
the engine's ``__main__``; called by the prefill and decode loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import numpy as np
import prometheus_client

from dualpath_engine.kv import hashing, layout, readqueue, storage
from dualpath_engine.transfer import base

ReadPath = Literal["pe_read", "de_read"]
"""Which read path a storage read serves (paper section 4): into the PE's or the DE's host buffer."""

PeDeDirection = Literal["pe_to_de", "de_to_pe"]
"""Direction of a PE<->DE transfer."""


@dataclasses.dataclass(frozen=True)
class Staged:
    """Arena slots leased for one request's Full Blocks, and how many leading ones hold storage hits."""

    slots: tuple[int, ...]
    """Leased slots, one per block, in block order."""
    hits: int
    """``slots[:hits]`` hold valid blocks read from storage; the rest are for KV computed or received."""


class TrafficMetrics:
    """Data-plane series of the traffic manager."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.read_bytes = prometheus_client.Counter(
            "dualpath_engine_kv_read_bytes",
            "KV bytes read from storage (valid hits) per read path.",
            ["path"],
            registry=registry,
        )
        self.write_bytes = prometheus_client.Counter(
            "dualpath_engine_kv_write_bytes", "KV bytes persisted to storage.", registry=registry
        )
        self.persisted = prometheus_client.Counter(
            "dualpath_engine_kv_persisted_blocks", "Full Blocks persisted to storage.", registry=registry
        )
        self.copy_bytes = prometheus_client.Counter(
            "dualpath_engine_kv_copy_bytes",
            "Bytes moved by H2D/D2H copies.",
            ["direction"],
            registry=registry,
        )
        self.copy_ops = prometheus_client.Counter(
            "dualpath_engine_kv_copy_ops",
            "Copy submissions (bytes / ops = mean copy size; small means un-coalesced Layer Blocks).",
            ["direction"],
            registry=registry,
        )
        self.pe_de_bytes = prometheus_client.Counter(
            "dualpath_engine_pe_de_transfer_bytes",
            "KV bytes this engine sent to its PE/DE peers over the compute network.",
            ["direction"],
            registry=registry,
        )
        self.arena_bytes = prometheus_client.Gauge(
            "dualpath_engine_host_buffer_bytes", "Host staging arena use.", ["state"], registry=registry
        )
        self.arena_waits = prometheus_client.Counter(
            "dualpath_engine_host_buffer_alloc_waits",
            "Slot leases that had to wait for the arena to free up.",
            registry=registry,
        )
        for path in ("pe_read", "de_read"):
            self.read_bytes.labels(path)
        for direction in ("h2d", "d2h"):
            self.copy_bytes.labels(direction)
            self.copy_ops.labels(direction)
        for pe_de in ("pe_to_de", "de_to_pe"):
            self.pe_de_bytes.labels(pe_de)


class TrafficManager:
    """Storage reads/writes, staging, device copies and PE<->DE transfers of one engine."""

    def __init__(
        self,
        *,
        geometry: layout.BlockGeometry,
        store: storage.BlockStore,
        nics: base.EngineNics,
        transport: base.Transport,
        arena: base.Arena,
        copier: base.DeviceCopier | None = None,
        read_workers: int = 4,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        if arena.slot_bytes != geometry.full_block_bytes:
            raise ValueError(
                f"arena slots hold {arena.slot_bytes} bytes, a Full Block {geometry.full_block_bytes}"
            )
        if store.geometry != geometry:
            raise ValueError(f"store geometry {store.geometry} differs from {geometry}")
        self.geometry = geometry
        self.store = store
        self.nics = nics
        self.transport = transport
        self.arena = arena
        self.copier = copier
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.read_queue = readqueue.ReadQueue(
            store, workers=read_workers, nic=nics.storage, registry=self.registry
        )
        self.metrics = TrafficMetrics(self.registry)
        self._arena_changed = asyncio.Condition()
        self._update_arena_gauges()

    # ---------------------------------------------------------------------------------- staging

    async def stage(self, count: int) -> tuple[int, ...]:
        """Lease ``count`` consecutive arena slots, waiting while the arena is too full."""
        if count < 1 or count > self.arena.num_slots:
            raise ValueError(f"cannot lease {count} slots from an arena of {self.arena.num_slots}")
        async with self._arena_changed:
            waited = False
            while True:
                try:
                    slots = tuple(self.arena.allocate(count))
                    break
                except RuntimeError:  # ArenaFullError of whichever arena implementation
                    if not waited:
                        self.metrics.arena_waits.inc()
                        waited = True
                    await self._arena_changed.wait()
        self._update_arena_gauges()
        return slots

    async def unstage(self, slots: Sequence[int]) -> None:
        """Return leased slots to the arena."""
        async with self._arena_changed:
            self.arena.release(list(slots))
            self._arena_changed.notify_all()
        self._update_arena_gauges()

    @contextlib.asynccontextmanager
    async def staged(self, count: int) -> AsyncIterator[tuple[int, ...]]:
        """``async with manager.staged(n) as slots:`` leases slots and always returns them."""
        slots = await self.stage(count)
        try:
            yield slots
        finally:
            await self.unstage(slots)

    def block(self, slot: int) -> layout.ByteArray:
        """The Full Block ``[layers, tokens, bytes]`` held in ``slot`` (a view)."""
        return layout.as_full_block(self.arena.slot_array(slot), self.geometry)

    # ---------------------------------------------------------------------------------- storage

    async def load(self, blocks: Sequence[hashing.BlockHash], path: ReadPath, *, extra: int = 0) -> Staged:
        """Lease ``len(blocks) + extra`` slots and read ``blocks`` into the first ones via the read queue.

        Returns the slots and the number of leading valid hits (a corrupt or missing block ends the
        usable prefix; the caller recomputes from there). The caller must :meth:`unstage` the slots.
        """
        slots = await self.stage(len(blocks) + extra)
        try:
            outs = [self.arena.slot_array(slot) for slot in slots[: len(blocks)]]
            hits = await self.read_queue.read_prefix(blocks, outs) if blocks else 0
        except BaseException:
            await self.unstage(slots)
            raise
        self.metrics.read_bytes.labels(path).inc(hits * self.geometry.full_block_bytes)
        return Staged(slots=slots, hits=hits)

    async def persist(self, block: hashing.BlockHash, data: layout.ByteArray) -> bool:
        """Write a Full Block to storage through the storage NIC; False if it was already stored."""
        if await self.store.contains(block):
            return False
        await self.nics.storage.transmit(self.geometry.full_block_bytes)
        written = await self.store.write(block, data)
        if written:
            self.metrics.write_bytes.inc(self.geometry.full_block_bytes)
            self.metrics.persisted.inc()
        return written

    # ----------------------------------------------------------------------------- device copies

    def h2d_layer(self, slots: Sequence[int], layer: int, dst: Any) -> object:
        """Layer ``layer`` of the staged blocks into device KV ``dst`` with one batched copier call."""
        copier = self._require_copier()
        before = _copies(copier)
        handle = copier.h2d_layer(slots, layer, dst)
        self._count_copy("h2d", len(slots), before, _copies(copier))
        return handle

    def d2h_layer(self, src: Any, slots: Sequence[int], layer: int) -> object:
        """Device KV ``src`` (one layer of ``len(slots)`` blocks) into layer ``layer`` of the slots."""
        copier = self._require_copier()
        before = _copies(copier)
        handle = copier.d2h_layer(src, slots, layer)
        self._count_copy("d2h", len(slots), before, _copies(copier))
        return handle

    def _require_copier(self) -> base.DeviceCopier:
        if self.copier is None:
            raise RuntimeError("this traffic manager has no device copier")
        return self.copier

    def _count_copy(self, direction: str, blocks: int, before: int | None, after: int | None) -> None:
        # Copiers that count their submissions (copies_issued) report real ops; others count one call.
        ops = after - before if before is not None and after is not None else 1
        self.metrics.copy_bytes.labels(direction).inc(blocks * self.geometry.layer_block_bytes)
        self.metrics.copy_ops.labels(direction).inc(ops)

    # ------------------------------------------------------------------------------- PE <-> DE

    def layer_items(
        self,
        request_id: str,
        slots: Sequence[int],
        layer: int,
        *,
        first_block_index: int = 0,
        last_block_tokens: int | None = None,
    ) -> list[tuple[base.TransferMeta, layout.ByteArray]]:
        """Layer Blocks of staged blocks as transfer items (zero-copy views; the last may be partial)."""
        items: list[tuple[base.TransferMeta, layout.ByteArray]] = []
        for position, slot in enumerate(slots):
            tokens = self.geometry.block_tokens
            if position == len(slots) - 1 and last_block_tokens is not None:
                tokens = last_block_tokens
            view = layout.layer_block(self.block(slot), layer)[:, :tokens]
            meta = base.TransferMeta(
                request_id=request_id, layer=layer, block_index=first_block_index + position, tokens=tokens
            )
            items.append((meta, view))
        return items

    async def send(
        self,
        peer: base.PeerAddress,
        items: Sequence[tuple[base.TransferMeta, layout.ByteArray | bytes]],
        direction: PeDeDirection,
    ) -> None:
        """Send payloads to a peer engine (raises ``TransportError`` if it fails)."""
        await self.transport.send(peer, items)
        self.metrics.pe_de_bytes.labels(direction).inc(sum(_nbytes(payload) for _, payload in items))

    def place(self, slot: int, meta: base.TransferMeta, payload: bytes) -> None:
        """Write a received Layer Block (or Full Block) payload into a staged slot."""
        block = self.block(slot)
        width = self.geometry.bytes_per_token_layer
        if meta.is_full_block:
            expected = self.geometry.num_layers * meta.tokens * width
            target = block[:, : meta.tokens]
        else:
            expected = meta.tokens * width
            target = layout.layer_block(block, meta.layer)[:, : meta.tokens]
        if len(payload) != expected or meta.tokens > self.geometry.block_tokens:
            raise ValueError(f"payload of {len(payload)} bytes does not fit {meta} (expected {expected})")
        target[...] = np.frombuffer(payload, dtype=np.uint8).reshape(target.shape)

    async def close(self) -> None:
        """Close the transport and the store."""
        await self.transport.close()
        await self.store.close()

    def _update_arena_gauges(self) -> None:
        free = self.arena.free_slots * self.arena.slot_bytes
        self.metrics.arena_bytes.labels("free").set(free)
        self.metrics.arena_bytes.labels("used").set(self.arena.num_slots * self.arena.slot_bytes - free)


def _copies(copier: base.DeviceCopier) -> int | None:
    value = getattr(copier, "copies_issued", None)
    return value if isinstance(value, int) else None


def _nbytes(payload: layout.ByteArray | bytes) -> int:
    return len(payload) if isinstance(payload, bytes) else int(payload.nbytes)
