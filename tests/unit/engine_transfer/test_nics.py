"""NIC model: token-bucket pacing is accurate, budgets change at run time, counters always count."""

from __future__ import annotations

import asyncio
import time

import prometheus_client
import pytest

from dualpath_engine import config
from dualpath_engine.transfer import base

pytestmark = pytest.mark.timeout(20)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_arithmetic_with_a_fake_clock() -> None:
    clock = FakeClock()
    bucket = base.TokenBucket(1000.0, burst_bytes=100.0, clock=clock)
    assert bucket.reserve(100) == 0.0  # the burst is free
    assert bucket.reserve(500) == pytest.approx(0.5)  # then 1000 B/s
    assert bucket.reserve(500) == pytest.approx(1.0)  # queued behind the previous caller
    clock.now = 1.0
    assert bucket.reserve(0) == pytest.approx(0.0)
    bucket.set_rate(2000.0)  # a faster budget applies to later calls
    assert bucket.reserve(1000) == pytest.approx(0.5)
    clock.now = 100.0
    assert bucket.reserve(100) == 0.0  # idle time refills at most the burst
    assert bucket.reserve(100) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="positive"):
        bucket.set_rate(0)


async def test_bucket_rate_is_accurate_over_about_a_second_of_concurrent_transfers() -> None:
    rate = 4_000_000.0
    bucket = base.TokenBucket(rate, burst_bytes=40_000.0)
    chunk = 32 * 1024
    chunks_per_sender = 31
    senders = 4
    total = chunk * chunks_per_sender * senders  # ~4.06 MB -> ~1 s at 4 MB/s

    async def sender() -> None:
        for _ in range(chunks_per_sender):
            await bucket.consume(chunk)

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(senders)))
    elapsed = time.monotonic() - started
    expected = (total - 40_000.0) / rate
    assert expected * 0.97 <= elapsed <= expected * 1.05, (elapsed, expected)


async def test_degraded_budget_slows_transfers_at_run_time() -> None:
    metrics = base.NicMetrics(prometheus_client.CollectorRegistry())
    nic = base.Nic("mlx5_s0", base.NicKind.STORAGE, 8e6, emulate=True, metrics=metrics)
    burst = base.TokenBucket.default_burst(8e6)
    await nic.receive(int(burst))  # drain the burst
    nic.set_budget(2e6)  # "degraded" storage NIC
    assert (
        metrics.registry.get_sample_value("dualpath_engine_nic_budget_bytes_per_second", {"nic": "mlx5_s0"})
        == 2e6
    )
    started = time.monotonic()
    await nic.receive(500_000)
    elapsed = time.monotonic() - started
    assert 0.24 <= elapsed <= 0.30, elapsed  # 0.5 MB at 2 MB/s
    nic.set_budget(None)  # back to line rate
    assert nic.budget_bytes_per_s == 8e6
    throttled = metrics.registry.get_sample_value(
        "dualpath_engine_nic_throttled_seconds_total", {"nic": "mlx5_s0", "direction": "rx"}
    )
    assert throttled is not None and throttled >= 0.24


async def test_counters_count_without_emulation_and_are_exported() -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = base.NicMetrics(registry)
    engine = config.EngineConfig(role="prefill", network=config.NetworkConfig(emulate=False))
    nics = base.build_engine_nics(engine, metrics)
    assert not nics.storage.emulated and nics.storage.budget_bytes_per_s is None
    await nics.storage.receive(10_000)
    await nics.compute.transmit(5_000)
    await nics.compute.transmit(4_096)
    assert nics.storage.counters.rx_bytes == 10_000 and nics.storage.counters.rx_packets == 3
    assert nics.compute.counters.tx_bytes == 9_096 and nics.compute.counters.tx_packets == 3

    def value(nic: str, direction: str, kind: str) -> float | None:
        labels = {"nic": nic, "direction": direction, "kind": kind}
        return registry.get_sample_value("dualpath_engine_nic_bytes_total", labels)

    assert value("mlx5_s0", "rx", "storage") == 10_000
    assert value("mlx5_0", "tx", "compute") == 9_096
    assert value("mlx5_0", "rx", "compute") == 0
    with pytest.raises(RuntimeError, match="not emulated"):
        nics.storage.set_budget(1e9)


def test_emulated_nic_uses_configured_budget() -> None:
    network = config.NetworkConfig(
        emulate=True, storage_nic=config.NicConfig(device="mlx5_s0", budget_bytes_per_s=1e9)
    )
    nics = base.build_engine_nics(config.EngineConfig(role="decode", network=network), base.NicMetrics())
    assert nics.storage.budget_bytes_per_s == 1e9
    assert nics.compute.budget_bytes_per_s == nics.compute.line_rate_bytes_per_s == 50e9


def test_lowering_the_rate_shrinks_a_default_burst_so_small_transfers_feel_it() -> None:
    now = [0.0]
    bucket = base.TokenBucket(25e9, clock=lambda: now[0])
    bucket.set_rate(1e6)
    # One megabyte right after the change must wait about a second, not pass on an old 125 MB burst.
    wait = bucket.reserve(1_000_000)
    assert 0.9 <= wait <= 1.0
