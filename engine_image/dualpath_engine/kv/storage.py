"""Full Block storage behind one async interface, plus the in-memory backend and store metrics.

:class:`BlockStore` is what the read queue and the traffic manager call: ``read_into`` fills a caller's
buffer (an arena slot) and returns whether the block was a valid hit; ``write`` persists a Full Block
(idempotent: a block that exists is not rewritten). ``claim`` / ``release_claim`` let the engines that
share a store agree on one writer per block before spending storage-NIC budget on it: a second engine
that would write the same block meanwhile (its request recomputed KV whose write was still queued)
skips it. A claim expires after ``CLAIM_TTL_S``, so a writer that died holds nothing for long. Every
outcome is counted in :class:`StoreMetrics`.
A block that fails validation is a miss: never returned, counted by reason, and removed so that a later
write can replace it. The filesystem backend lives in :mod:`dualpath_engine.kv.filestore`;
:func:`open_store` picks the backend from configuration.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Sequence

import numpy as np
import prometheus_client

from dualpath_engine import config
from dualpath_engine.kv import hashing, layout

CLAIM_TTL_S = 60.0
"""How long a write claim holds if its writer never releases it (the writer died)."""


class ReadResult(enum.Enum):
    """Outcome of reading one block."""

    HIT = "hit"
    """Valid; the output buffer holds the block."""
    ABSENT = "absent"
    """No such block."""
    INVALID = "invalid"
    """Present but corrupt, torn or of another geometry; the output buffer must not be used."""


class Claim(enum.Enum):
    """What asking to write a block found (:meth:`BlockStore.claim`)."""

    TAKEN = "taken"
    """The caller holds the claim: write the block, then release it."""
    STORED = "stored"
    """The block exists already: nothing to write."""
    ELSEWHERE = "elsewhere"
    """Another writer holds a live claim: it writes and reports the block."""


class InvalidReason(enum.Enum):
    """Why a stored block was rejected."""

    CORRUPT = "corrupt"
    """Bad magic, version, name or checksum."""
    TORN = "torn"
    """Shorter or longer than its header says (an interrupted or overlapping write)."""
    GEOMETRY = "geometry"
    """Written with another layer count, block size or token width."""
    IO_ERROR = "io_error"
    """The object could not be read."""


class StoreMetrics:
    """Counters of one store; exported through ``registry`` (a private one when None)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.reads = prometheus_client.Counter(
            "dualpath_engine_kv_block_reads",
            "Full Block reads from storage by result (hit, absent, invalid).",
            ["result"],
            registry=self.registry,
        )
        self.invalid = prometheus_client.Counter(
            "dualpath_engine_kv_invalid_blocks",
            "Stored Full Blocks rejected on read (treated as misses) by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.writes = prometheus_client.Counter(
            "dualpath_engine_kv_block_writes",
            "Full Block writes by result (written, exists, claimed: another writer holds its claim).",
            ["result"],
            registry=self.registry,
        )
        self.read_bytes = prometheus_client.Counter(
            "dualpath_engine_kv_storage_read_bytes",
            "Payload bytes of valid blocks read.",
            registry=self.registry,
        )
        self.write_bytes = prometheus_client.Counter(
            "dualpath_engine_kv_storage_write_bytes",
            "Payload bytes of blocks written.",
            registry=self.registry,
        )
        for result in ReadResult:
            self.reads.labels(result.value)
        for reason in InvalidReason:
            self.invalid.labels(reason.value)
        for written in ("written", "exists", "claimed"):
            self.writes.labels(written)

    def value(self, name: str, **labels: str) -> float:
        """Current value of one of this object's series (``name`` without ``_total``), for tests and stats."""
        sample = self.registry.get_sample_value(f"{name}_total", labels)
        return sample if sample is not None else 0.0


class BlockStore(abc.ABC):
    """Async storage of Full Blocks of one geometry, addressed by chained block hash."""

    def __init__(self, geometry: layout.BlockGeometry, metrics: StoreMetrics | None = None) -> None:
        self.geometry = geometry
        self.metrics = metrics if metrics is not None else StoreMetrics()

    async def read_into(self, block: hashing.BlockHash, out: layout.ByteArray) -> ReadResult:
        """Read a block into ``out`` (a ``uint8`` buffer of exactly one Full Block); counted."""
        if out.size != self.geometry.full_block_bytes or out.dtype != np.uint8:
            raise ValueError(f"output buffer must hold {self.geometry.full_block_bytes} uint8 bytes")
        if not out.flags.c_contiguous:
            raise ValueError("output buffer must be C-contiguous")
        flat = out.reshape(-1)
        result, reason = await self._read_into(block, flat)
        self.metrics.reads.labels(result.value).inc()
        if result is ReadResult.HIT:
            self.metrics.read_bytes.inc(self.geometry.full_block_bytes)
        elif reason is not None:
            self.metrics.invalid.labels(reason.value).inc()
        return result

    async def read(self, block: hashing.BlockHash) -> layout.ByteArray | None:
        """A valid block as a new ``[layers, tokens, bytes]`` array, or None on any miss."""
        out = layout.empty_full_block(self.geometry)
        return out if await self.read_into(block, out) is ReadResult.HIT else None

    async def write(self, block: hashing.BlockHash, data: layout.ByteArray | bytes) -> bool:
        """Persist a Full Block atomically; False if it already existed (not rewritten)."""
        flat = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.ascontiguousarray(data)
        flat = flat.reshape(-1)
        if flat.dtype != np.uint8 or flat.size != self.geometry.full_block_bytes:
            raise ValueError(
                f"a Full Block has {self.geometry.full_block_bytes} uint8 bytes, got {flat.size} {flat.dtype}"
            )
        written = await self._write(block, flat)
        self.metrics.writes.labels("written" if written else "exists").inc()
        if written:
            self.metrics.write_bytes.inc(flat.size)
        return written

    async def stored(self, blocks: Sequence[hashing.BlockHash]) -> list[bool]:
        """Which of ``blocks`` exist, in order (one call: the filesystem backend checks them in one task
        of its pool instead of one round trip per block)."""
        return [await self.contains(block) for block in blocks]

    async def claim(self, block: hashing.BlockHash) -> bool:
        """Reserve the write of ``block``: True if the caller should write it (not stored, no live claim
        of another writer), then the caller writes and calls :meth:`release_claim`; False otherwise
        (counted as ``claimed`` when another writer holds it). One backend call: the existence check
        and the claim run together."""
        outcome = await self._claim(block, time.time())
        if outcome is Claim.ELSEWHERE:
            self.metrics.writes.labels("claimed").inc()
        return outcome is Claim.TAKEN

    async def release_claim(self, block: hashing.BlockHash) -> None:
        """End this store's claim of ``block`` (after writing it, or giving up)."""
        await self._release_claim(block)

    async def longest_stored_prefix(self, chain: list[hashing.BlockHash]) -> int:
        """How many leading blocks of ``chain`` exist (not validated: a later read may still miss)."""
        for count, block in enumerate(chain):
            if not await self.contains(block):
                return count
        return len(chain)

    @abc.abstractmethod
    async def contains(self, block: hashing.BlockHash) -> bool:
        """Whether an object for the block exists (without validating it)."""

    @abc.abstractmethod
    async def delete(self, block: hashing.BlockHash) -> None:
        """Remove a block if present."""

    async def close(self) -> None:
        """Release resources (threads, handles). Idempotent."""
        return None

    @abc.abstractmethod
    async def _read_into(
        self, block: hashing.BlockHash, out: layout.ByteArray
    ) -> tuple[ReadResult, InvalidReason | None]: ...

    @abc.abstractmethod
    async def _write(self, block: hashing.BlockHash, flat: layout.ByteArray) -> bool: ...

    @abc.abstractmethod
    async def _claim(self, block: hashing.BlockHash, now: float) -> Claim:
        """``STORED`` if the block exists, else take its claim unless another holder's claim is younger
        than ``CLAIM_TTL_S`` (``ELSEWHERE``)."""

    @abc.abstractmethod
    async def _release_claim(self, block: hashing.BlockHash) -> None: ...


class MemoryStore(BlockStore):
    """Blocks in process memory (tests, single-process runs, the simulator)."""

    def __init__(self, geometry: layout.BlockGeometry, metrics: StoreMetrics | None = None) -> None:
        super().__init__(geometry, metrics)
        self._blocks: dict[hashing.BlockHash, bytes] = {}
        self._claims: dict[hashing.BlockHash, float] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    async def contains(self, block: hashing.BlockHash) -> bool:
        return block in self._blocks

    async def delete(self, block: hashing.BlockHash) -> None:
        self._blocks.pop(block, None)

    async def _read_into(
        self, block: hashing.BlockHash, out: layout.ByteArray
    ) -> tuple[ReadResult, InvalidReason | None]:
        data = self._blocks.get(block)
        if data is None:
            return ReadResult.ABSENT, None
        out[:] = np.frombuffer(data, dtype=np.uint8)
        return ReadResult.HIT, None

    async def _write(self, block: hashing.BlockHash, flat: layout.ByteArray) -> bool:
        if block in self._blocks:
            return False
        self._blocks[block] = flat.tobytes()
        return True

    async def _claim(self, block: hashing.BlockHash, now: float) -> Claim:
        if block in self._blocks:
            return Claim.STORED
        if now - self._claims.get(block, -CLAIM_TTL_S) < CLAIM_TTL_S:
            return Claim.ELSEWHERE
        self._claims[block] = now
        return Claim.TAKEN

    async def _release_claim(self, block: hashing.BlockHash) -> None:
        self._claims.pop(block, None)


def open_store(
    kv: config.KVConfig, geometry: layout.BlockGeometry, metrics: StoreMetrics | None = None
) -> BlockStore:
    """The backend named by ``kv.storage_backend``."""
    if kv.storage_backend == "memory":
        return MemoryStore(geometry, metrics)
    from dualpath_engine.kv import filestore

    return filestore.FilesystemStore(
        kv.storage_path, geometry, metrics, workers=kv.read_workers, fsync=kv.fsync
    )
