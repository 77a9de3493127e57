"""TCP transport: real KV bytes between two engines on 127.0.0.1, counted on both compute NICs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import prometheus_client
import pytest

from dualpath_engine.transfer import base, tcp

pytestmark = pytest.mark.timeout(20)


class Engine:
    def __init__(self, device: str, *, checksum: bool = False, budget: float | None = None) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.nic = base.Nic(
            device,
            base.NicKind.COMPUTE,
            50e9,
            emulate=budget is not None,
            budget_bytes_per_s=budget,
            metrics=base.NicMetrics(self.registry),
        )
        self.transport = tcp.TcpTransport(
            self.nic,
            host="127.0.0.1",
            checksum=checksum,
            ack_timeout_s=5,
            metrics=base.TransportMetrics("tcp", self.registry),
        )
        self.inbox = base.Inbox()

    async def start(self) -> base.PeerAddress:
        return await self.transport.start(self.inbox)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Engine, Engine, base.PeerAddress]]:
    pe, de = Engine("mlx5_0"), Engine("mlx5_1", checksum=True)
    await pe.start()
    de_address = await de.start()
    yield pe, de, de_address
    await pe.transport.close()
    await de.transport.close()


def layer_blocks(
    request: str, layer: int, count: int, size: int, seed: int
) -> list[tuple[base.TransferMeta, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (base.TransferMeta(request, layer, index, 64), rng.integers(0, 256, size, dtype=np.uint8))
        for index in range(count)
    ]


async def test_layer_blocks_arrive_intact_and_are_counted_on_both_nics(
    pair: tuple[Engine, Engine, base.PeerAddress],
) -> None:
    pe, de, address = pair
    items = [*layer_blocks("req-1", 0, 5, 256 * 1024, 1), *layer_blocks("req-1", 1, 5, 256 * 1024, 2)]
    full = (base.TransferMeta("req-1", base.ALL_LAYERS, 9, 13), np.arange(1000, dtype=np.uint8))
    await pe.transport.send(address, [*items, full])
    for layer in (0, 1):
        got = await asyncio.wait_for(de.inbox.take("req-1", layer, 5), 5)
        sent = [item for item in items if item[0].layer == layer]
        assert [meta for meta, _ in got] == [meta for meta, _ in sent]
        assert all(payload == array.tobytes() for (_, payload), (_, array) in zip(got, sent, strict=True))
    ((meta, payload),) = await asyncio.wait_for(de.inbox.take("req-1", base.ALL_LAYERS, 1), 5)
    assert meta.is_full_block and meta.tokens == 13 and payload == full[1].tobytes()

    moved = 10 * 256 * 1024 + 1000
    assert pe.nic.counters.tx_bytes == moved and pe.nic.counters.rx_bytes == 0
    assert de.nic.counters.rx_bytes == moved and de.nic.counters.tx_bytes == 0
    assert pe.registry.get_sample_value("dualpath_engine_transport_info", {"kind": "tcp"}) == 1
    assert pe.registry.get_sample_value("dualpath_engine_transport_bytes_total", {"direction": "tx"}) == moved
    assert de.registry.get_sample_value("dualpath_engine_transport_bytes_total", {"direction": "rx"}) == moved
    rate = pe.registry.get_sample_value("dualpath_engine_transport_rate_bytes_per_second")
    assert rate is not None and rate > 0
    labels = {"nic": "mlx5_1", "direction": "rx", "kind": "compute"}
    assert de.registry.get_sample_value("dualpath_engine_nic_bytes_total", labels) == moved


async def test_payload_larger_than_the_stream_buffer_arrives_intact(
    pair: tuple[Engine, Engine, base.PeerAddress],
) -> None:
    pe, de, address = pair
    big = np.random.default_rng(11).integers(0, 256, tcp._STREAM_LIMIT + 12345, dtype=np.uint8)
    await pe.transport.send(address, [(base.TransferMeta("big", base.ALL_LAYERS, 0, 64), big)])
    ((_, payload),) = await asyncio.wait_for(de.inbox.take("big", base.ALL_LAYERS, 1), 10)
    assert payload == big.tobytes()


async def test_rejected_payload_fails_the_send_with_the_reason_and_the_link_stays_usable(
    pair: tuple[Engine, Engine, base.PeerAddress],
) -> None:
    pe, de, address = pair
    de.inbox.close_request("gone")
    with pytest.raises(base.TransportError, match=r"request gone layer 0 block 0.*no longer expecting"):
        await pe.transport.send(address, layer_blocks("gone", 0, 2, 100, 3))
    await pe.transport.send(address, layer_blocks("ok", 0, 1, 100, 4))
    assert len(await asyncio.wait_for(de.inbox.take("ok", 0, 1), 5)) == 1


async def test_dead_or_absent_peer_raises_instead_of_hanging(
    pair: tuple[Engine, Engine, base.PeerAddress],
) -> None:
    pe, de, address = pair
    await pe.transport.send(address, layer_blocks("a", 0, 1, 100, 5))
    await de.transport.close()  # the decode engine dies
    with pytest.raises(base.TransportError):
        await pe.transport.send(address, layer_blocks("a", 1, 3, 1 << 20, 6))
    with pytest.raises(base.TransportError, match="cannot connect"):
        await pe.transport.send(address, layer_blocks("a", 2, 1, 100, 7))


async def test_corrupted_frame_is_detected_by_the_checksum(
    pair: tuple[Engine, Engine, base.PeerAddress],
) -> None:
    _pe, de, address = pair
    meta, payload = layer_blocks("c", 0, 1, 1000, 8)[0]
    # Write a frame whose crc does not match its payload, as a faulty link would deliver it.
    reader, writer = await asyncio.open_connection(address.host, address.port)
    request = meta.request_id.encode()
    header = tcp._FRAME.pack(tcp._FRAME_MAGIC, 1, 3, len(request), 0, 0, 64, payload.size, 12345)
    writer.write(header + request + payload.tobytes())
    await writer.drain()
    status, message = await asyncio.wait_for(tcp.TcpTransport._read_ack(reader), 5)
    writer.close()
    await writer.wait_closed()
    assert status == 1 and "checksum mismatch" in message
    assert de.inbox.pending("c", 0) == 0


async def test_emulated_compute_nic_paces_the_sender() -> None:
    sender, receiver = Engine("mlx5_0", budget=10e6), Engine("mlx5_1")
    await sender.start()
    address = await receiver.start()
    try:
        burst = base.TokenBucket.default_burst(10e6)
        started = time.monotonic()
        await sender.transport.send(address, layer_blocks("p", 0, 20, 150_000, 9))  # 3 MB at 10 MB/s
        elapsed = time.monotonic() - started
        expected = (3_000_000 - burst) / 10e6
        assert expected * 0.95 <= elapsed <= expected * 1.5, (elapsed, expected)
        assert receiver.nic.counters.rx_bytes == 3_000_000
    finally:
        await sender.transport.close()
        await receiver.transport.close()
