"""Full Block storage: round trips, and every kind of bad object is a counted miss that is never used."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from dualpath_engine import config
from dualpath_engine.kv import filestore, hashing, layout, storage

pytestmark = pytest.mark.timeout(30)

GEO = layout.BlockGeometry(num_layers=3, block_tokens=4, bytes_per_token_layer=16)
ROOT = hashing.root_hash("storage-test")


def block_data(seed: int, geo: layout.BlockGeometry = GEO) -> layout.ByteArray:
    return np.random.default_rng(seed).integers(0, 256, geo.full_shape, dtype=np.uint8)


def name(seed: int) -> hashing.BlockHash:
    return hashing.block_hash(ROOT, [seed] * GEO.block_tokens)


@pytest.fixture
async def fs_store(tmp_path: Path) -> AsyncIterator[filestore.FilesystemStore]:
    store = filestore.FilesystemStore(tmp_path / "kv", GEO, workers=3)
    yield store
    await store.close()


@pytest.mark.parametrize("backend", ["memory", "filesystem"])
async def test_round_trip_and_idempotent_write(backend: str, tmp_path: Path) -> None:
    kv = config.KVConfig(storage_backend=backend, storage_path=str(tmp_path / "kv"), fsync=False)  # type: ignore[arg-type]
    store = storage.open_store(kv, GEO)
    try:
        data = block_data(1)
        assert await store.read(name(1)) is None
        assert await store.write(name(1), data)
        assert not await store.write(name(1), data)  # already there: not rewritten
        got = await store.read(name(1))
        assert got is not None and got.shape == GEO.full_shape and np.array_equal(got, data)
        assert await store.longest_stored_prefix([name(1), name(2), name(1)]) == 1
        assert await store.stored([name(2), name(1), name(2)]) == [False, True, False]
        m = store.metrics
        assert m.value("dualpath_engine_kv_block_reads", result="hit") == 1
        assert m.value("dualpath_engine_kv_block_reads", result="absent") == 1
        assert m.value("dualpath_engine_kv_block_writes", result="exists") == 1
        assert m.value("dualpath_engine_kv_storage_read_bytes") == GEO.full_block_bytes
        await store.delete(name(1))
        assert not await store.contains(name(1))
    finally:
        await store.close()


async def test_wrong_sized_write_is_refused(fs_store: filestore.FilesystemStore) -> None:
    with pytest.raises(ValueError, match="Full Block has"):
        await fs_store.write(name(1), b"\x00" * 5)


def corrupt_payload(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[filestore.HEADER_BYTES + 7] ^= 0xFF
    path.write_bytes(bytes(raw))


def corrupt_header_name(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[30] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 10])


def truncate_inside_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def append_garbage(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"xx")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_payload, "corrupt"),
        (corrupt_header_name, "corrupt"),
        (truncate, "torn"),
        (truncate_inside_header, "torn"),
        (append_garbage, "torn"),
    ],
)
async def test_damaged_object_is_a_counted_miss_and_can_be_rewritten(
    fs_store: filestore.FilesystemStore, damage: object, reason: str
) -> None:
    data = block_data(2)
    await fs_store.write(name(2), data)
    damage(fs_store.path_of(name(2)))  # type: ignore[operator]
    out = layout.empty_full_block(GEO)
    assert await fs_store.read_into(name(2), out) is storage.ReadResult.INVALID
    assert fs_store.metrics.value("dualpath_engine_kv_invalid_blocks", reason=reason) == 1
    assert fs_store.metrics.value("dualpath_engine_kv_block_reads", result="hit") == 0
    # The bad object is gone, so recomputed KV can be persisted again and then read back.
    assert not await fs_store.contains(name(2))
    assert await fs_store.write(name(2), data)
    got = await fs_store.read(name(2))
    assert got is not None and np.array_equal(got, data)


async def test_block_of_another_geometry_is_a_miss(tmp_path: Path) -> None:
    other = layout.BlockGeometry(num_layers=2, block_tokens=4, bytes_per_token_layer=24)  # same byte size
    assert other.full_block_bytes == GEO.full_block_bytes
    writer = filestore.FilesystemStore(tmp_path, other, fsync=False)
    reader = filestore.FilesystemStore(tmp_path, GEO, fsync=False)
    try:
        await writer.write(name(3), block_data(3, other))
        assert await reader.read(name(3)) is None
        assert reader.metrics.value("dualpath_engine_kv_invalid_blocks", reason="geometry") == 1
    finally:
        await writer.close()
        await reader.close()


async def test_crashed_writer_leaves_only_a_temp_file_which_is_never_read(
    fs_store: filestore.FilesystemStore,
) -> None:
    # Simulate a writer killed after writing part of its temp file: no object under the block's name.
    final = fs_store.path_of(name(4))
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.999.dead{filestore.TEMP_SUFFIX}"
    temp.write_bytes(b"DPKV" + b"\x00" * 40)
    assert await fs_store.read(name(4)) is None
    assert fs_store.metrics.value("dualpath_engine_kv_block_reads", result="absent") == 1
    assert await fs_store.write(name(4), block_data(4))  # a later writer succeeds
    old = 10_000.0
    mtime = temp.stat().st_mtime - old
    os.utime(temp, (mtime, mtime))
    assert fs_store.sweep_temp_files(older_than_s=old / 2) == 1
    assert not temp.exists() and final.exists()


async def test_concurrent_writers_of_one_block_leave_one_valid_object(tmp_path: Path) -> None:
    data = block_data(5)
    stores = [filestore.FilesystemStore(tmp_path, GEO, workers=4, fsync=False) for _ in range(4)]
    try:
        for _round in range(10):
            for store in stores[:1]:
                await store.delete(name(5))
            results = await asyncio.gather(*(s.write(name(5), data) for s in stores for _ in range(3)))
            assert any(results)
            for store in stores:
                got = await store.read(name(5))
                assert got is not None and np.array_equal(got, data)
        leftovers = [
            p for p in (tmp_path / name(5).hex()[:2]).iterdir() if p.name.endswith(filestore.TEMP_SUFFIX)
        ]
        assert leftovers == []
    finally:
        for store in stores:
            await store.close()


async def test_reads_see_whole_objects_while_a_block_is_rewritten(tmp_path: Path) -> None:
    # Readers racing a writer that keeps replacing the object never see a torn block.
    store = filestore.FilesystemStore(tmp_path, GEO, workers=4, fsync=False)
    data = block_data(6)
    try:
        await store.write(name(6), data)

        async def rewrite() -> None:
            for _ in range(30):
                await store.delete(name(6))
                await store.write(name(6), data)

        async def read() -> None:
            for _ in range(60):
                got = await store.read(name(6))
                assert got is None or np.array_equal(got, data)

        await asyncio.gather(rewrite(), read(), read())
        assert store.metrics.value("dualpath_engine_kv_invalid_blocks", reason="torn") == 0
        assert store.metrics.value("dualpath_engine_kv_invalid_blocks", reason="corrupt") == 0
    finally:
        await store.close()


async def test_read_into_rejects_unusable_buffers(fs_store: filestore.FilesystemStore) -> None:
    with pytest.raises(ValueError, match="must hold"):
        await fs_store.read_into(name(1), np.zeros(3, np.uint8))
    strided = np.zeros((GEO.full_block_bytes * 2,), np.uint8)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        await fs_store.read_into(name(1), strided)


async def test_one_writer_per_block_between_engines_sharing_the_filesystem(tmp_path: Path) -> None:
    # Two engines' stores on one directory (like two decode engines on shared storage).
    first = filestore.FilesystemStore(tmp_path, GEO, fsync=False)
    second = filestore.FilesystemStore(tmp_path, GEO, fsync=False)
    try:
        assert await first.claim(name(6))
        assert not await second.claim(name(6))  # the first is writing it: skip, do not spend the NIC
        assert second.metrics.value("dualpath_engine_kv_block_writes", result="claimed") == 1
        await second.release_claim(name(6))  # not its claim: no effect
        assert not await second.claim(name(6))
        assert await first.write(name(6), block_data(6))
        await first.release_claim(name(6))
        assert not first.claim_path(name(6)).exists()
        assert not await second.claim(name(6))  # stored now: nothing to write, not a claim conflict
        assert second.metrics.value("dualpath_engine_kv_block_writes", result="claimed") == 2
        # A claim whose writer died is taken over once it is older than the TTL, and swept.
        assert await first.claim(name(7))
        path = first.claim_path(name(7))
        stale = path.stat().st_mtime - storage.CLAIM_TTL_S - 1
        os.utime(path, (stale, stale))
        assert await second.claim(name(7))
        await first.release_claim(name(7))  # the dead owner's late release leaves the new claim alone
        assert path.read_bytes() == second._token and not await first.claim(name(7))
        os.utime(path, (stale - 600, stale - 600))
        assert second.sweep_temp_files(older_than_s=600) == 1 and not path.exists()
    finally:
        await first.close()
        await second.close()


async def test_memory_store_claims_expire_and_release() -> None:
    store = storage.MemoryStore(GEO)
    assert await store.claim(name(8)) and not await store.claim(name(8))
    await store.release_claim(name(8))
    assert await store.claim(name(8))
    store._claims[name(8)] -= storage.CLAIM_TTL_S + 1  # its writer died long ago
    assert await store.claim(name(8))
    await store.write(name(8), block_data(8))
    await store.release_claim(name(8))
    assert not await store.claim(name(8))  # stored
