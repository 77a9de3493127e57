"""The read queue: bounded concurrency, depth in tokens/bytes while reads are pending, NIC charging."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dualpath_engine.kv import hashing, layout, readqueue, storage

pytestmark = pytest.mark.timeout(10)

GEO = layout.BlockGeometry(num_layers=2, block_tokens=4, bytes_per_token_layer=8)
ROOT = hashing.root_hash("rq")


class GatedStore(storage.MemoryStore):
    """A memory store whose reads wait for the test to open a gate, counting reads in progress."""

    def __init__(self) -> None:
        super().__init__(GEO)
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.entered = asyncio.Condition()

    async def _read_into(
        self, block: hashing.BlockHash, out: layout.ByteArray
    ) -> tuple[storage.ReadResult, storage.InvalidReason | None]:
        async with self.entered:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.entered.notify_all()
        try:
            await self.gate.wait()
            return await super()._read_into(block, out)
        finally:
            self.in_flight -= 1


class CountingNic:
    def __init__(self) -> None:
        self.received = 0

    async def receive(self, nbytes: int) -> None:
        self.received += nbytes


def chain(n: int) -> list[hashing.BlockHash]:
    return hashing.chain_hashes(list(range(n * GEO.block_tokens)), GEO.block_tokens, ROOT)


async def test_depth_is_visible_while_reads_wait_and_concurrency_is_bounded() -> None:
    store = GatedStore()
    blocks = chain(5)
    for index, block in enumerate(blocks[:3]):
        await store.write(block, np.full(GEO.full_shape, index, np.uint8))
    nic = CountingNic()
    queue = readqueue.ReadQueue(store, workers=2, nic=nic)
    outs = [layout.empty_full_block(GEO) for _ in blocks]
    task = asyncio.create_task(queue.read_prefix(blocks, outs))
    async with store.entered:
        await asyncio.wait_for(store.entered.wait_for(lambda: store.in_flight == 2), 5)
    assert queue.depth_blocks == 5
    assert queue.depth_tokens == 5 * GEO.block_tokens
    assert queue.depth_bytes == 5 * GEO.full_block_bytes
    assert queue.registry.get_sample_value("dualpath_engine_storage_read_queue_tokens") == 20
    store.gate.set()
    assert await asyncio.wait_for(task, 5) == 3
    assert store.max_in_flight == 2
    assert (queue.depth_tokens, queue.depth_bytes, queue.depth_blocks) == (0, 0, 0)
    assert queue.registry.get_sample_value("dualpath_engine_storage_read_queue_bytes") == 0
    assert nic.received == 3 * GEO.full_block_bytes  # only blocks that moved bytes are charged
    for index in range(3):
        assert np.all(outs[index] == index)


async def test_cancelled_reads_leave_no_phantom_depth() -> None:
    store = GatedStore()
    queue = readqueue.ReadQueue(store, workers=1)
    blocks = chain(4)
    reads = queue.read(blocks, [layout.empty_full_block(GEO) for _ in blocks])
    task = asyncio.ensure_future(reads)
    async with store.entered:
        await asyncio.wait_for(store.entered.wait_for(lambda: store.in_flight == 1), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (queue.depth_tokens, queue.depth_bytes, queue.depth_blocks) == (0, 0, 0)


async def test_mismatched_outputs_are_refused() -> None:
    queue = readqueue.ReadQueue(storage.MemoryStore(GEO), workers=1)
    with pytest.raises(ValueError, match="output buffers"):
        await queue.read(chain(2), [layout.empty_full_block(GEO)])
    with pytest.raises(ValueError, match="workers"):
        readqueue.ReadQueue(storage.MemoryStore(GEO), workers=0)
