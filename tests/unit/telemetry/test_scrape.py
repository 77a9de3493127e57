"""ScrapeCollector against fake engine and scheduler ``/metrics`` built from the engine's real metric
classes: rates from two scrapes (with a controlled clock), counter resets, histogram quantiles, and
unreachable / unparsable / first-scrape / too-old-history problems."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest

from dualpath_operator.telemetry import sample, scrape
from tests.cluster import processes
from tests.unit.telemetry import servers

pytestmark = pytest.mark.timeout(30)

WINDOW = 10.0


class Clock:
    """A monotonic clock the test advances."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Rig:
    """A PE on n0 and a DE on n1 (storage NIC at half rate), a scheduler and a collector on a test clock."""

    pe: servers.FakeEngine
    de: servers.FakeEngine
    sched: servers.FakeScheduler
    collector: scrape.ScrapeCollector
    clock: Clock
    targets: list[sample.EngineTarget]


@contextlib.asynccontextmanager
async def cluster(**settings: object) -> AsyncIterator[Rig]:
    pe = servers.FakeEngine(role="prefill")
    de = servers.FakeEngine(role="decode", snic_budget=12.5e9)
    sched = servers.FakeScheduler()
    clock = Clock()
    async with (
        servers.serve(pe.handle) as pe_url,
        servers.serve(de.handle) as de_url,
        servers.serve(sched.handle) as s_url,
    ):
        targets = [
            sample.EngineTarget("pe-0", "n0", "prefill", f"{pe_url}/metrics"),
            sample.EngineTarget("de-0", "n1", "decode", f"{de_url}/metrics"),
        ]
        collector = scrape.ScrapeCollector(
            settings=sample.CollectorSettings.model_validate(settings),
            scheduler_url=f"{s_url}/metrics",
            clock=clock,
        )
        async with collector:
            yield Rig(pe, de, sched, collector, clock, targets)


async def test_rates_come_from_two_scrapes_and_gauges_from_the_latest() -> None:
    async with cluster() as r:
        first = await r.collector.collect(r.targets, window_s=WINDOW)
        assert not first.complete
        assert "engine pe-0: no earlier scrape within 2 windows (20s): no rates yet" in first.problems
        # 4 s of traffic: the PE reads 800 MB on its storage NIC (600 MB of it KV, PE path), sends 200 MB.
        await r.pe.storage.receive(800_000_000)
        r.pe.traffic.read_bytes.labels("pe_read").inc(600_000_000)
        await r.pe.compute.transmit(200_000_000)
        await r.de.storage.receive(400_000_000)
        r.de.traffic.read_bytes.labels("de_read").inc(400_000_000)
        await r.de.compute.receive(200_000_000)
        r.pe.running_tokens.labels("prefill").set(4096)
        r.pe.running_requests.labels("prefill").set(2)
        r.de.running_tokens.labels("decode").set(300)
        r.de.running_requests.labels("decode").set(3)
        r.pe.transport.sent(1 << 20, 0.001)
        for seconds in (0.3, 0.6, 0.9, 1.2, 4.0):
            r.sched.metrics.time_to_first_token.observe(seconds)
        r.clock.now += 4
        s = await r.collector.collect(r.targets, window_s=WINDOW)
    assert s.problems == ()
    n0, n1 = s.nodes["n0"], s.nodes["n1"]
    assert n0.snic_rx_bps == pytest.approx(2e8)
    assert n0.snic_kv_rx_bps == pytest.approx(1.5e8)
    assert n0.snic_capacity_bps == 25e9  # the emulated budget
    assert n0.cnic_tx_bps == pytest.approx(0.5e8)
    assert n0.cnic_rx_bps == 0.0
    assert n0.cnic_capacity_bps == 50e9
    assert n1.snic_rx_bps == pytest.approx(1e8)
    assert n1.snic_capacity_bps == 12.5e9  # a degraded NIC's budget
    pe_s, de_s = s.engines
    assert (pe_s.queued_tokens, pe_s.inflight_requests, pe_s.read_queue_tokens) == (4096, 2, 0)
    assert pe_s.kv_read_pe_bps == pytest.approx(1.5e8)
    assert pe_s.kv_read_de_bps == 0.0
    assert de_s.kv_read_pe_bps == 0.0
    assert de_s.kv_read_de_bps == pytest.approx(1e8)
    assert (de_s.queued_tokens, de_s.inflight_requests) == (300, 3)
    assert pe_s.transport == "tcp"
    assert pe_s.transport_rate_bps == pytest.approx((1 << 20) / 0.001)
    # p90 of {0.3, 0.6, 0.9, 1.2, 4.0} by Prometheus' bucket interpolation: rank 4.5 in (2.5, 5].
    assert pe_s.ttft_p90_s == pytest.approx(2.5 + 2.5 * (4.5 - 4) / 1)
    assert pe_s.tpot_p90_s is None  # no finished requests: not measured, and not a problem


async def test_counter_reset_counts_from_zero_instead_of_going_negative() -> None:
    async with cluster() as r:
        r.pe.traffic.read_bytes.labels("pe_read").inc(9e9)
        await r.collector.collect(r.targets, window_s=WINDOW)
        # The engine restarts: a fresh registry whose counter has only 1 GB.
        fresh = servers.FakeEngine()
        fresh.traffic.read_bytes.labels("pe_read").inc(1e9)
        r.pe.registry = fresh.registry
        r.clock.now += 2
        s = await r.collector.collect(r.targets, window_s=WINDOW)
    assert s.engines[0].kv_read_pe_bps == pytest.approx(0.5e9)


async def test_unreachable_and_unparsable_engines_are_problems_and_the_rest_is_kept() -> None:
    async with cluster() as r:
        dead = f"http://127.0.0.1:{processes.free_port()}/metrics"
        gone = sample.EngineTarget("de-1", "n2", "decode", dead)
        await r.collector.collect([*r.targets, gone], window_s=WINDOW)
        r.de.broken = True
        r.clock.now += 2
        s = await r.collector.collect([*r.targets, gone], window_s=WINDOW)
    assert any(p.startswith(f"engine de-1: {dead} unreachable") for p in s.problems)
    assert any(p.startswith("engine de-0: ") and "not Prometheus exposition format" in p for p in s.problems)
    assert "engine de-0 (node n1): no metrics" in s.problems
    assert "node n2: no storage-NIC receive rate" in s.problems
    assert s.engines[0].kv_read_pe_bps == 0.0
    assert s.nodes["n0"].snic_rx_bps == 0.0


async def test_history_older_than_two_windows_gives_no_rate() -> None:
    async with cluster() as r:
        await r.collector.collect(r.targets, window_s=WINDOW)
        r.clock.now += 2 * WINDOW + 1
        s = await r.collector.collect(r.targets, window_s=WINDOW)
        assert "engine pe-0: no earlier scrape within 2 windows (20s): no rates yet" in s.problems
        r.clock.now += WINDOW  # the next scrape has the previous one, a window back
        again = await r.collector.collect(r.targets, window_s=WINDOW)
    assert again.complete


async def test_unreachable_scheduler_and_missing_url_are_problems() -> None:
    async with cluster() as r:
        r.collector.scheduler_url = f"http://127.0.0.1:{processes.free_port()}/metrics"
        pending = sample.EngineTarget("pe-1", "n0", "prefill", None)
        s = await r.collector.collect([*r.targets, pending], window_s=WINDOW)
    assert any(p.startswith("scheduler: ") and "unreachable" in p for p in s.problems)
    assert "engine pe-1: no metrics URL (pod has no IP yet?)" in s.problems


async def test_unemulated_nics_use_the_configured_line_rate() -> None:
    engine = servers.FakeEngine(emulate=False)
    async with servers.serve(engine.handle) as url:
        target = sample.EngineTarget("pe-0", "n0", "prefill", f"{url}/metrics")
        clock = Clock()
        settings = sample.CollectorSettings(snic_capacity_fallback_bps=50e9)
        async with scrape.ScrapeCollector(settings=settings, clock=clock) as collector:
            await collector.collect([target], window_s=WINDOW)
            clock.now += 1
            s = await collector.collect([target], window_s=WINDOW)
    assert s.complete
    assert s.nodes["n0"].snic_capacity_bps == 50e9
    assert s.nodes["n0"].cnic_capacity_bps is None


async def test_engines_sharing_a_node_add_their_traffic_but_not_their_storage_nic() -> None:
    first, second = servers.FakeEngine(role="decode"), servers.FakeEngine(role="decode")
    async with servers.serve(first.handle) as url1, servers.serve(second.handle) as url2:
        targets = [
            sample.EngineTarget("de-0", "n1", "decode", f"{url1}/metrics"),
            sample.EngineTarget("de-1", "n1", "decode", f"{url2}/metrics"),
        ]
        clock = Clock()
        async with scrape.ScrapeCollector(clock=clock) as collector:
            await collector.collect(targets, window_s=WINDOW)
            await first.storage.receive(30_000_000)
            await second.storage.receive(10_000_000)
            first.traffic.read_bytes.labels("de_read").inc(20_000_000)
            second.traffic.read_bytes.labels("de_read").inc(10_000_000)
            clock.now += 2
            s = await collector.collect(targets, window_s=WINDOW)
    assert s.complete
    n1 = s.nodes["n1"]
    assert n1.snic_rx_bps == pytest.approx(20e6)
    assert n1.snic_kv_rx_bps == pytest.approx(15e6)
    assert n1.snic_capacity_bps == 25e9  # one shared storage NIC, not 2 x 25e9
    assert n1.cnic_capacity_bps == 100e9  # each engine its own compute NIC


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (200, b"\xff\xfe\x00garbage", "answered bytes that are not text"),
        (503, b"overloaded", "answered HTTP 503"),
    ],
)
async def test_engine_answers_that_are_not_metrics_are_problems(
    status: int, body: bytes, problem: str
) -> None:
    engine = servers.FakeEngine()
    engine.raw = (status, body)
    async with servers.serve(engine.handle) as url:
        target = sample.EngineTarget("pe-0", "n0", "prefill", f"{url}/metrics")
        async with scrape.ScrapeCollector() as collector:
            s = await collector.collect([target], window_s=WINDOW)
    assert any(p.startswith(f"engine pe-0: {url}/metrics {problem}") for p in s.problems), s.problems
