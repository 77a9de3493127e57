"""Filesystem backend of :class:`~dualpath_engine.kv.storage.BlockStore`: one object per Full Block.

Object ``<root>/<hh>/<hash>.kvb`` (``hh`` = first two hex digits) holds a 64-byte header followed by
the payload (the Full Block's bytes, ``[layers, tokens, bytes]`` in C order)::

    offset size  field
    0      4     magic b"DPKV"
    4      2     format version (1)
    6      2     header size (64)
    8      4     layers
    12     4     block tokens
    16     4     bytes per token per layer
    20     8     payload length
    28     16    the block's chained hash (guards against misnamed objects)
    44     16    blake2b-128 of the header (with this field zeroed) and the payload
    60     4     zero padding

Writes go to a uniquely named temp file in the same directory, are fsynced, then ``os.replace``d onto
the final name (and the directory fsynced), so a reader sees a whole object or none; concurrent writers
of one block each replace it with identical bytes. Every read re-verifies size, header, name, geometry
and checksum; a failure is a miss, and the bad object is removed so a later write can replace it.
Leftover temp files of crashed writers are never read and are removed by :meth:`sweep_temp_files`.
A write claim is a file ``.<hash>.kvb.claim`` beside the object, created with ``O_EXCL`` (one creator
wins on a shared filesystem) and holding its owner's token; one older than ``CLAIM_TTL_S`` is taken over.
All file I/O runs on the store's own bounded thread pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import os
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from dualpath_engine.kv import hashing, layout, storage

MAGIC = b"DPKV"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<4sHHIIIQ16s16s4x")
_CHECKSUM_OFFSET = 44
SUFFIX = ".kvb"
_P = ParamSpec("_P")
_T = TypeVar("_T")
TEMP_SUFFIX = ".tmp"
CLAIM_SUFFIX = ".claim"


class FilesystemStore(storage.BlockStore):
    """Full Blocks as files under a (shared) directory."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        geometry: layout.BlockGeometry,
        metrics: storage.StoreMetrics | None = None,
        *,
        workers: int = 4,
        fsync: bool = True,
    ) -> None:
        super().__init__(geometry, metrics)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-store")
        self._closed = False
        self._token = f"{os.getpid()}.{uuid.uuid4().hex}".encode()
        """What this store writes into its claim files (a claim is released only by its owner)."""

    def path_of(self, block: hashing.BlockHash) -> Path:
        """Where a block's object lives."""
        name = block.hex()
        return self.root / name[:2] / f"{name}{SUFFIX}"

    async def contains(self, block: hashing.BlockHash) -> bool:
        return await self._run(self.path_of(block).exists)

    async def stored(self, blocks: Sequence[hashing.BlockHash]) -> list[bool]:
        return await self._run(lambda: [self.path_of(block).exists() for block in blocks])

    async def delete(self, block: hashing.BlockHash) -> None:
        await self._run(self._unlink, self.path_of(block))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)

    def sweep_temp_files(self, older_than_s: float = 600.0) -> int:
        """Remove temp and claim files older than ``older_than_s`` (left by crashed writers); returns how
        many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for suffix in (TEMP_SUFFIX, CLAIM_SUFFIX):
            for temp in self.root.glob(f"*/.*{suffix}"):
                with contextlib.suppress(FileNotFoundError):
                    if temp.stat().st_mtime < cutoff:
                        temp.unlink()
                        removed += 1
        return removed

    def claim_path(self, block: hashing.BlockHash) -> Path:
        """Where a block's write claim lives."""
        final = self.path_of(block)
        return final.parent / f".{final.name}{CLAIM_SUFFIX}"

    async def _claim(self, block: hashing.BlockHash, now: float) -> storage.Claim:
        return await self._run(self._claim_sync, block, now)

    async def _release_claim(self, block: hashing.BlockHash) -> None:
        await self._run(self._release_claim_sync, block)

    def _claim_sync(self, block: hashing.BlockHash, now: float) -> storage.Claim:
        if self.path_of(block).exists():
            return storage.Claim.STORED
        path = self.claim_path(block)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    age = now - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if age < storage.CLAIM_TTL_S:
                    return storage.Claim.ELSEWHERE
                self._unlink(path)  # its writer died: take it over
                continue
            try:
                _write_all(fd, memoryview(self._token))
            finally:
                os.close(fd)
            return storage.Claim.TAKEN
        return storage.Claim.ELSEWHERE  # lost the race for a claim twice: another writer has it

    def _release_claim_sync(self, block: hashing.BlockHash) -> None:
        path = self.claim_path(block)
        with contextlib.suppress(FileNotFoundError):
            if path.read_bytes() == self._token:
                path.unlink()

    async def _read_into(
        self, block: hashing.BlockHash, out: layout.ByteArray
    ) -> tuple[storage.ReadResult, storage.InvalidReason | None]:
        return await self._run(self._read_sync, block, out)

    async def _write(self, block: hashing.BlockHash, flat: layout.ByteArray) -> bool:
        return await self._run(self._write_sync, block, flat)

    async def _run(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # The thread may be writing into a caller's buffer (an arena slot): on cancellation wait for it
        # to finish before letting the caller reuse the buffer.
        if self._closed:
            raise RuntimeError(f"store {self.root} is closed")
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(func, *args, **kwargs)
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def _header(self, block: hashing.BlockHash, checksum: bytes) -> bytes:
        geo = self.geometry
        return _HEADER.pack(
            MAGIC,
            VERSION,
            HEADER_BYTES,
            geo.num_layers,
            geo.block_tokens,
            geo.bytes_per_token_layer,
            geo.full_block_bytes,
            block,
            checksum,
        )

    def _checksum(self, header: bytes, payload: layout.ByteArray) -> bytes:
        digest = hashlib.blake2b(digest_size=16, person=b"dualpath-kvb")
        digest.update(header[:_CHECKSUM_OFFSET])
        digest.update(bytes(16))
        digest.update(header[_CHECKSUM_OFFSET + 16 :])
        digest.update(payload.data)
        return digest.digest()

    def _write_sync(self, block: hashing.BlockHash, flat: layout.ByteArray) -> bool:
        final = self.path_of(block)
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        header = self._header(block, bytes(16))
        header = self._header(block, self._checksum(header, flat))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, memoryview(header))
                _write_all(fd, flat.data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            self._unlink(temp)
            raise
        if self._fsync:
            _fsync_dir(final.parent)
        return True

    def _read_sync(
        self, block: hashing.BlockHash, out: layout.ByteArray
    ) -> tuple[storage.ReadResult, storage.InvalidReason | None]:
        path = self.path_of(block)
        try:
            with path.open("rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                header = file.read(HEADER_BYTES)
                reason = self._check_header(block, header, size)
                if reason is None:
                    got = file.readinto(out.data)
                    if got != out.size:
                        reason = storage.InvalidReason.TORN
                    elif self._checksum(header, out) != header[_CHECKSUM_OFFSET : _CHECKSUM_OFFSET + 16]:
                        reason = storage.InvalidReason.CORRUPT
        except FileNotFoundError:
            return storage.ReadResult.ABSENT, None
        except OSError:
            return storage.ReadResult.INVALID, storage.InvalidReason.IO_ERROR
        if reason is None:
            return storage.ReadResult.HIT, None
        self._unlink(path)
        return storage.ReadResult.INVALID, reason

    def _check_header(
        self, block: hashing.BlockHash, header: bytes, size: int
    ) -> storage.InvalidReason | None:
        if len(header) < HEADER_BYTES:
            return storage.InvalidReason.TORN
        magic, version, header_bytes, layers, tokens, width, payload, name, _ = _HEADER.unpack(header)
        if magic != MAGIC or version != VERSION or header_bytes != HEADER_BYTES or name != block:
            return storage.InvalidReason.CORRUPT
        geo = self.geometry
        if (layers, tokens, width) != (geo.num_layers, geo.block_tokens, geo.bytes_per_token_layer):
            return storage.InvalidReason.GEOMETRY
        if payload != geo.full_block_bytes:
            return storage.InvalidReason.CORRUPT
        if size != HEADER_BYTES + payload:
            return storage.InvalidReason.TORN
        return None

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
