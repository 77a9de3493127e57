"""Traffic manager: both read paths end to end on loopback, persisting, staging and device copies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import prometheus_client
import pytest

from dualpath_engine import config
from dualpath_engine.kv import filestore, hashing, layout, storage
from dualpath_engine.transfer import base, host, manager, tcp

pytestmark = pytest.mark.timeout(20)

GEO = layout.BlockGeometry(num_layers=3, block_tokens=4, bytes_per_token_layer=32)
ROOT = hashing.root_hash("manager-test")
TOKENS = list(range(4 * GEO.block_tokens + 2))  # four Full Blocks and a partial one
CHAIN = hashing.chain_hashes(TOKENS, GEO.block_tokens, ROOT)


def block_data(index: int) -> layout.ByteArray:
    return np.random.default_rng(index).integers(0, 256, GEO.full_shape, dtype=np.uint8)


def make_manager(store: storage.BlockStore, device: str, slots: int = 8) -> manager.TrafficManager:
    registry = prometheus_client.CollectorRegistry()
    metrics = base.NicMetrics(registry)
    nics = base.EngineNics(
        storage=base.Nic(f"{device}_s0", base.NicKind.STORAGE, 25e9, metrics=metrics),
        compute=base.Nic(f"{device}_0", base.NicKind.COMPUTE, 50e9, metrics=metrics),
    )
    transport = tcp.TcpTransport(
        nics.compute, host="127.0.0.1", metrics=base.TransportMetrics("tcp", registry)
    )
    arena = host.HostArena(slots * GEO.full_block_bytes, GEO.full_block_bytes)
    copier = host.NumpyCopier(arena, num_layers=GEO.num_layers, layer_block_bytes=GEO.layer_block_bytes)
    return manager.TrafficManager(
        geometry=GEO,
        store=store,
        nics=nics,
        transport=transport,
        arena=arena,
        copier=copier,
        registry=registry,
    )


def sample(m: manager.TrafficManager, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


@pytest.fixture
async def shared_store() -> AsyncIterator[storage.MemoryStore]:
    store = storage.MemoryStore(GEO)
    for index, block in enumerate(CHAIN[:3]):  # the first three blocks are cached
        await store.write(block, block_data(index))
    yield store


async def test_pe_read_path_stages_hits_and_charges_only_the_pe_storage_nic(
    shared_store: storage.MemoryStore,
) -> None:
    pe = make_manager(shared_store, "pe")
    staged = await pe.load(CHAIN, "pe_read", extra=1)
    assert staged.hits == 3 and len(staged.slots) == 5
    for index in range(3):
        assert np.array_equal(pe.block(staged.slots[index]), block_data(index))
    assert pe.nics.storage.counters.rx_bytes == 3 * GEO.full_block_bytes
    assert sample(pe, "dualpath_engine_kv_read_bytes_total", path="pe_read") == 3 * GEO.full_block_bytes
    assert sample(pe, "dualpath_engine_kv_read_bytes_total", path="de_read") == 0
    assert pe.read_queue.depth_tokens == 0
    assert sample(pe, "dualpath_engine_host_buffer_bytes", state="used") == 5 * GEO.full_block_bytes
    await pe.unstage(staged.slots)
    assert sample(pe, "dualpath_engine_host_buffer_bytes", state="used") == 0


async def test_de_read_path_moves_hit_layers_to_the_pe_over_tcp(shared_store: storage.MemoryStore) -> None:
    pe, de = make_manager(shared_store, "pe"), make_manager(shared_store, "de")
    inbox = base.Inbox()
    pe_address = await pe.transport.start(inbox)
    await de.transport.start(base.Inbox())
    try:
        # DE reads the hit blocks into its host buffer, then streams them layer by layer to the PE.
        staged = await de.load(CHAIN, "de_read")
        assert staged.hits == 3
        pe_slots = await pe.stage(staged.hits)
        for layer in range(GEO.num_layers):
            items = de.layer_items("r1", staged.slots[: staged.hits], layer)
            await de.send(pe_address, items, "de_to_pe")
            for meta, payload in await asyncio.wait_for(inbox.take("r1", layer, staged.hits), 5):
                pe.place(pe_slots[meta.block_index], meta, payload)
        for index in range(3):
            assert np.array_equal(pe.block(pe_slots[index]), block_data(index))  # byte-identical Full Blocks
        moved = 3 * GEO.full_block_bytes
        assert de.nics.storage.counters.rx_bytes == moved and pe.nics.storage.counters.rx_bytes == 0
        assert de.nics.compute.counters.tx_bytes == moved and pe.nics.compute.counters.rx_bytes == moved
        assert sample(de, "dualpath_engine_pe_de_transfer_bytes_total", direction="de_to_pe") == moved
        assert sample(de, "dualpath_engine_kv_read_bytes_total", path="de_read") == moved
    finally:
        await pe.close()
        await de.close()


async def test_partial_last_block_travels_as_a_short_layer_block(shared_store: storage.MemoryStore) -> None:
    de = make_manager(shared_store, "de")
    (slot,) = await de.stage(1)
    de.block(slot)[...] = block_data(7)
    items = de.layer_items("r2", [slot], 1, first_block_index=4, last_block_tokens=2)
    ((meta, view),) = items
    assert (meta.block_index, meta.tokens, meta.layer) == (4, 2, 1)
    assert view.tobytes() == block_data(7)[1, :2].tobytes()
    pe = make_manager(shared_store, "pe")
    (target,) = await pe.stage(1)
    pe.place(target, meta, view.tobytes())
    assert np.array_equal(pe.block(target)[1, :2], block_data(7)[1, :2])
    with pytest.raises(ValueError, match="does not fit"):
        pe.place(target, meta, b"short")


async def test_corrupt_block_ends_the_usable_prefix(tmp_path: Path) -> None:
    store = filestore.FilesystemStore(tmp_path, GEO, fsync=False)
    m = make_manager(store, "pe")
    try:
        for index, block in enumerate(CHAIN):
            await store.write(block, block_data(index))
        path = store.path_of(CHAIN[1])
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x55
        path.write_bytes(bytes(raw))
        staged = await m.load(CHAIN, "pe_read")
        assert staged.hits == 1
        assert store.metrics.value("dualpath_engine_kv_invalid_blocks", reason="corrupt") == 1
        await m.unstage(staged.slots)
    finally:
        await m.close()


async def test_persist_goes_through_the_storage_nic_once() -> None:
    store = storage.MemoryStore(GEO)
    m = make_manager(store, "de")
    assert await m.persist(CHAIN[0], block_data(0))
    assert not await m.persist(CHAIN[0], block_data(0))
    assert m.nics.storage.counters.tx_bytes == GEO.full_block_bytes
    assert sample(m, "dualpath_engine_kv_persisted_blocks_total") == 1
    assert sample(m, "dualpath_engine_kv_write_bytes_total") == GEO.full_block_bytes
    got = await store.read(CHAIN[0])
    assert got is not None and np.array_equal(got, block_data(0))


async def test_layer_copies_are_batched_per_run_and_round_trip() -> None:
    m = make_manager(storage.MemoryStore(GEO), "pe")
    slots = await m.stage(3)
    for position, slot in enumerate(slots):
        m.block(slot)[...] = block_data(position)
    device = np.zeros(3 * GEO.layer_block_bytes, np.uint8)
    m.h2d_layer(slots, 2, device)
    expected = layout.layer_run([block_data(i) for i in range(3)], 2)
    assert np.array_equal(device.reshape(expected.shape), expected)
    assert sample(m, "dualpath_engine_kv_copy_ops_total", direction="h2d") == 1  # one run, one copy
    assert sample(m, "dualpath_engine_kv_copy_bytes_total", direction="h2d") == 3 * GEO.layer_block_bytes
    other = await m.stage(3)
    m.d2h_layer(device, other, 2)
    for position, slot in enumerate(other):
        assert np.array_equal(m.block(slot)[2], block_data(position)[2])
    with pytest.raises(ValueError, match="at least"):
        m.h2d_layer(slots, 0, np.zeros(5, np.uint8))


async def test_staging_waits_for_free_slots_instead_of_failing() -> None:
    m = make_manager(storage.MemoryStore(GEO), "pe", slots=2)
    first = await m.stage(2)
    waiter = asyncio.ensure_future(m.stage(1))

    async def waits_counted() -> None:
        while sample(m, "dualpath_engine_host_buffer_alloc_waits_total") < 1:  # noqa: ASYNC110 - metric poll
            await asyncio.sleep(0)

    await asyncio.wait_for(waits_counted(), 5)
    assert not waiter.done()
    await m.unstage(first[:1])
    assert await asyncio.wait_for(waiter, 5) == (first[0],)
    with pytest.raises(ValueError, match="cannot lease"):
        await m.stage(3)


def test_manager_rejects_mismatched_parts() -> None:
    other = layout.BlockGeometry(2, 4, 32)
    with pytest.raises(ValueError, match="geometry"):
        manager.TrafficManager(
            geometry=GEO,
            store=storage.MemoryStore(other),
            nics=base.build_engine_nics(config.EngineConfig(role="prefill"), base.NicMetrics()),
            transport=tcp.TcpTransport(base.Nic("x", base.NicKind.COMPUTE, 1e9), host="127.0.0.1"),
            arena=host.HostArena(GEO.full_block_bytes, GEO.full_block_bytes),
        )


def test_host_arena_leases_runs_and_refuses_double_release() -> None:
    arena = host.HostArena(4 * GEO.full_block_bytes + 10, GEO.full_block_bytes)
    assert (arena.num_slots, arena.free_slots) == (4, 4)
    a = arena.allocate(1)
    b = arena.allocate(2)
    assert (a, b) == ([0], [1, 2])
    arena.release(a)
    with pytest.raises(base.ArenaFullError, match="no 2 consecutive"):
        arena.allocate(2)  # slots 0 and 3 are free but not adjacent
    with pytest.raises(RuntimeError, match="released twice"):
        arena.release(a)
    with pytest.raises(IndexError):
        arena.slot_array(4)
    arena.slot_array(1)[:] = 9
    assert arena.buffer[GEO.full_block_bytes] == 9
