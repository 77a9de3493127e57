"""The storage read queue: async Full Block reads by a bounded worker pool, with observable depth.

Engines submit reads here (never to the store directly) so that the node's pending read volume is
known: :attr:`ReadQueue.depth_tokens` is the scheduler's read-queue length (compared with alpha) and is
exported with the byte depth as gauges. Each read that moved bytes is charged to the storage NIC
(:class:`ByteThrottle`, implemented by ``dualpath_engine.transfer.base.Nic``), which counts the bytes and,
when NIC emulation is on, paces them through the NIC's token bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

import prometheus_client

from dualpath_engine.kv import hashing, layout, storage


class ByteThrottle(Protocol):
    """Something bytes flow through on their way in (the storage NIC)."""

    async def receive(self, nbytes: int) -> None:
        """Account ``nbytes`` received; may wait to respect a bandwidth budget."""
        ...


class ReadQueue:
    """Bounded-concurrency reads from one :class:`~dualpath_engine.kv.storage.BlockStore`."""

    def __init__(
        self,
        store: storage.BlockStore,
        *,
        workers: int,
        nic: ByteThrottle | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._store = store
        self._nic = nic
        self._slots = asyncio.Semaphore(workers)
        self._tokens = 0
        self._bytes = 0
        self._blocks = 0
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._depth_tokens = prometheus_client.Gauge(
            "dualpath_engine_storage_read_queue_tokens",
            "Tokens of Full Blocks queued or being read from storage (the scheduler's read queue).",
            registry=self.registry,
        )
        self._depth_bytes = prometheus_client.Gauge(
            "dualpath_engine_storage_read_queue_bytes",
            "Bytes of Full Blocks queued or being read from storage.",
            registry=self.registry,
        )
        self._latency = prometheus_client.Histogram(
            "dualpath_engine_storage_read_seconds",
            "Time to read one Full Block from storage, queueing excluded.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )

    @property
    def store(self) -> storage.BlockStore:
        """The store read from."""
        return self._store

    @property
    def depth_tokens(self) -> int:
        """Tokens queued or in flight."""
        return self._tokens

    @property
    def depth_bytes(self) -> int:
        """Bytes queued or in flight."""
        return self._bytes

    @property
    def depth_blocks(self) -> int:
        """Blocks queued or in flight."""
        return self._blocks

    async def read(
        self, blocks: Sequence[hashing.BlockHash], outs: Sequence[layout.ByteArray]
    ) -> list[storage.ReadResult]:
        """Read each block into the matching output buffer concurrently; results in input order."""
        if len(blocks) != len(outs):
            raise ValueError(f"{len(blocks)} blocks but {len(outs)} output buffers")
        geometry = self._store.geometry
        self._add(len(blocks), geometry.block_tokens * len(blocks), geometry.full_block_bytes * len(blocks))
        pending = [True] * len(blocks)

        async def one(index: int) -> storage.ReadResult:
            try:
                async with self._slots:
                    started = time.perf_counter()
                    result = await self._store.read_into(blocks[index], outs[index])
                    self._latency.observe(time.perf_counter() - started)
                    if result is not storage.ReadResult.ABSENT and self._nic is not None:
                        await self._nic.receive(geometry.full_block_bytes)
                    return result
            finally:
                pending[index] = False
                self._add(-1, -geometry.block_tokens, -geometry.full_block_bytes)

        try:
            return list(await asyncio.gather(*(one(index) for index in range(len(blocks)))))
        finally:
            # Reads cancelled before their task started never ran ``one``'s finally.
            # gather has settled every child by now, so ``pending`` is final.
            left = sum(pending)
            if left:
                self._add(-left, -geometry.block_tokens * left, -geometry.full_block_bytes * left)

    async def read_prefix(self, blocks: Sequence[hashing.BlockHash], outs: Sequence[layout.ByteArray]) -> int:
        """Read a chain's blocks; returns how many leading blocks are valid hits (later ones are unusable)."""
        results = await self.read(blocks, outs)
        for count, result in enumerate(results):
            if result is not storage.ReadResult.HIT:
                return count
        return len(results)

    def _add(self, blocks: int, tokens: int, nbytes: int) -> None:
        self._blocks += blocks
        self._tokens += tokens
        self._bytes += nbytes
        self._depth_tokens.set(self._tokens)
        self._depth_bytes.set(self._bytes)
