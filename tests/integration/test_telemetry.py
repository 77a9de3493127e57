"""The Prometheus collector against the REAL Debian Prometheus scraping REAL node_exporters, which read
fake sysfs trees written by the engine's own ``SysfsWriter`` from the same ``Nic`` objects that engine
``/metrics`` endpoints export (as in an engine process). The test moves bytes at a known rate on one
node's storage NIC and checks the sample; then a node_exporter dies (its node goes missing) and
Prometheus stops (the sample is incomplete, with a clear problem). Needs no Kubernetes, but takes
tens of seconds (1 s scrapes, 5 s window), hence the ``integration`` marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dualpath_engine.transfer import sysfs
from dualpath_operator.planning import telemetry as types
from dualpath_operator.telemetry import prometheus, sample, scrape
from tests import telemetry_stack
from tests.cluster import processes
from tests.engine import harness
from tests.unit.telemetry import servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RATE = 200e6
"""Bytes/s the test moves through node n0's storage NIC."""
WINDOW = 5.0
TARGETS = (
    sample.EngineTarget(pod="pe-0", node="n0", role="prefill"),
    sample.EngineTarget(pod="de-0", node="n1", role="decode"),
)


async def poll(
    what: str,
    collect: Callable[[], Awaitable[types.TelemetrySample]],
    condition: Callable[[types.TelemetrySample], bool],
    timeout_s: float = 60,
) -> types.TelemetrySample:
    """Collect until ``condition`` holds for a sample; fail with the last sample after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = await collect()
        if condition(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:g}s; last sample: {s}")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def moving(
    pe: servers.FakeEngine, sched: servers.FakeScheduler, writers: list[sysfs.SysfsWriter]
) -> AsyncIterator[None]:
    """Moves RATE bytes/s into pe's storage NIC (3/4 of it KV reads on the PE path) and RATE/4 out of
    its compute NIC, mirrors the counters to sysfs like an engine does, and records 0.2 s TTFTs."""

    async def run() -> None:
        start = time.monotonic()
        moved = 0
        while True:
            due = int(RATE * (time.monotonic() - start)) - moved
            if due > 0:
                await pe.storage.receive(due)
                pe.traffic.read_bytes.labels("pe_read").inc(due * 3 // 4)
                await pe.compute.transmit(due // 4)
                moved += due
            sched.metrics.time_to_first_token.observe(0.2)
            for writer in writers:
                await asyncio.to_thread(writer.flush)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_prometheus_collector_on_real_prometheus_and_node_exporters(tmp_path: Path) -> None:
    pe = servers.FakeEngine(role="prefill", emulate=False)
    de = servers.FakeEngine(role="decode", emulate=False)
    sched = servers.FakeScheduler()
    writers = []
    exporters: list[telemetry_stack.NodeExporter] = []
    prom: telemetry_stack.Prometheus | None = None
    try:
        for node, engine in (("n0", pe), ("n1", de)):
            root = tmp_path / node / "sys"
            writer = sysfs.SysfsWriter(root, [engine.storage, engine.compute], sysfs.writer_id(node))
            writer.flush()
            writers.append(writer)
            exporters.append(
                await asyncio.to_thread(
                    telemetry_stack.start_node_exporter, root, processes.free_port(), tmp_path / node
                )
            )
        for exporter in exporters:
            assert await asyncio.to_thread(exporter.infiniband_ok), exporter.process.log_tail()
        async with (
            servers.serve(pe.handle) as pe_url,
            servers.serve(de.handle) as de_url,
            servers.serve(sched.handle) as sched_url,
            moving(pe, sched, writers),
        ):
            targets = [
                (exporters[0].url, {"node": "n0"}),
                (exporters[1].url, {"node": "n1"}),
                (f"{pe_url}/metrics", {"pod": "pe-0", "node": "n0"}),
                (f"{de_url}/metrics", {"pod": "de-0", "node": "n1"}),
                (f"{sched_url}/metrics", {"component": "scheduler"}),
            ]
            prom = await asyncio.to_thread(telemetry_stack.start_prometheus, targets, tmp_path / "prometheus")
            settings = sample.CollectorSettings(request_timeout_s=3)
            async with prometheus.PrometheusCollector(prom.url, settings=settings) as collector:

                async def collect() -> types.TelemetrySample:
                    return await collector.collect(TARGETS, window_s=WINDOW)

                def steady(s: types.TelemetrySample) -> bool:
                    # Both series need a full window at the moved rate: the node exporter's (sysfs) and
                    # the engine's (its /metrics), which Prometheus scrapes at different times; on a busy
                    # machine one can lag the other by a scrape.
                    rx, kv = s.nodes["n0"].snic_rx_bps, s.nodes["n0"].snic_kv_rx_bps
                    return (
                        s.complete
                        and rx is not None
                        and abs(rx - RATE) < 0.1 * RATE
                        and kv is not None
                        and abs(kv - RATE * 3 / 4) < 0.1 * RATE * 3 / 4
                    )

                s = await poll("a complete sample with n0 at the moved rates", collect, steady)
                n0, n1 = s.nodes["n0"], s.nodes["n1"]
                assert n0.snic_rx_bps == pytest.approx(RATE, rel=0.1)
                assert n1.snic_rx_bps == 0.0
                # rate file "200 Gb/sec (4X)" and "400 Gb/sec (4X)" as the exporter converts them
                assert (n0.snic_capacity_bps, n1.snic_capacity_bps) == (25e9, 25e9)
                assert (n0.cnic_capacity_bps, n1.cnic_capacity_bps) == (50e9, 50e9)
                assert n0.cnic_tx_bps == pytest.approx(RATE / 4, rel=0.15)
                assert n0.cnic_rx_bps == 0.0
                assert n0.snic_kv_rx_bps == pytest.approx(RATE * 3 / 4, rel=0.15)
                assert n1.snic_kv_rx_bps == 0.0
                pe_s, de_s = s.engines
                assert pe_s.kv_read_pe_bps == pytest.approx(RATE * 3 / 4, rel=0.15)
                assert (pe_s.queued_tokens, pe_s.read_queue_tokens, de_s.queued_tokens) == (0, 0, 0)
                assert (pe_s.transport, de_s.transport) == ("tcp", "tcp")
                assert pe_s.ttft_p90_s is not None and 0.1 < pe_s.ttft_p90_s <= 0.25

                # Freshness queries see both nodes' and engines' latest samples (else staleness is blind).
                for name, label in (("node_freshness", "node"), ("engine_freshness", "pod")):
                    fresh = await collector.query(collector.render(getattr(collector.queries, name), WINDOW))
                    assert sorted(f.labels[label] for f in fresh) == (
                        ["n0", "n1"] if label == "node" else ["de-0", "pe-0"]
                    )
                    assert all(0 <= f.time - f.value < 2 * WINDOW for f in fresh)

                # n1's node_exporter dies: once its last samples leave the window, n1 is missing.
                exporters[1].stop()
                s = await poll(
                    "n1 reported missing",
                    collect,
                    lambda s: "node n1: no storage-NIC receive rate" in s.problems,
                    timeout_s=4 * WINDOW + 30,
                )
                assert not s.complete
                assert s.nodes["n0"].snic_rx_bps == pytest.approx(RATE, rel=0.15)

                await asyncio.to_thread(prom.stop)
                s = await collect()
                assert not s.complete
                assert any(p.startswith(f"Prometheus at {prom.url} unreachable") for p in s.problems), (
                    s.problems
                )
                assert s.nodes["n0"].snic_rx_bps is None
    finally:
        if prom is not None:
            await asyncio.to_thread(prom.stop)
        for exporter in exporters:
            await asyncio.to_thread(exporter.stop)


def test_scrape_collector_on_real_engine_processes(tmp_path: Path) -> None:
    """The direct-scrape collector on the real scheduler + PE + 2 DE processes: every signal the
    planners need is there, and the KV read rate matches the bytes the PE reports having read."""
    times: list[float] = []

    def clock() -> float:
        times.append(time.monotonic())
        return times[-1]

    with harness.cluster(tmp_path, policy="pe-only") as c:
        targets = [
            sample.EngineTarget("pe0", "node-a", "prefill", c.prefill.http + "/metrics"),
            sample.EngineTarget("de0", "node-b", "decode", c.decodes[0].http + "/metrics"),
            sample.EngineTarget("de1", "node-c", "decode", c.decodes[1].http + "/metrics"),
        ]
        settings = sample.CollectorSettings(snic_capacity_fallback_bps=25e9, request_timeout_s=5)
        collector = scrape.ScrapeCollector(settings=settings, scheduler_url=c.url + "/metrics", clock=clock)

        async def scenario() -> tuple[types.TelemetrySample, types.TelemetrySample, float]:
            async with collector:
                first = await collector.collect(targets, window_s=600)
                before = c.prefill.metric("dualpath_engine_kv_read_bytes_total", path="pe")
                prompt = list(range(1, 80))
                for _ in range(2):  # the second turn hits the KV the first one persisted
                    result = await asyncio.to_thread(c.complete, prompt, 4)
                    prompt = [*prompt, *result["choices"][0]["token_ids"], 7, 8, 9]
                moved = c.prefill.metric("dualpath_engine_kv_read_bytes_total", path="pe") - before
                second = await collector.collect(targets, window_s=600)
                return first, second, moved

        first, second, moved = asyncio.run(scenario())
    assert any(p.startswith("engine pe0: no earlier scrape") for p in first.problems)
    assert second.problems == ()
    assert moved > 0, "the second turn read no KV from storage"
    half = len(times) // 2
    # The two scrapes of the PE happened at some clock readings of each collect: the rate the collector
    # computed must lie between the bytes over the longest and over the shortest possible span.
    longest = max(times[half:]) - min(times[:half])
    shortest = min(times[half:]) - max(times[:half])
    pe = second.engines[0]
    assert pe.kv_read_pe_bps is not None
    assert moved / longest * 0.98 <= pe.kv_read_pe_bps <= moved / shortest * 1.02
    assert pe.kv_read_de_bps == 0.0
    assert all(e.transport == "tcp" for e in second.engines)
    assert all(e.queued_tokens == 0 and e.read_queue_tokens == 0 for e in second.engines)  # all done
    assert pe.ttft_p90_s is not None and pe.ttft_p90_s > 0
    node = second.nodes["node-a"]
    # The PE's KV reads went through its storage NIC: the node's rx covers them.
    assert node.snic_kv_rx_bps == pytest.approx(pe.kv_read_pe_bps)
    assert node.snic_rx_bps is not None and node.snic_kv_rx_bps is not None
    assert node.snic_rx_bps >= node.snic_kv_rx_bps
    assert node.snic_capacity_bps == 25e9
    assert second.nodes["node-b"].snic_rx_bps == 0.0
