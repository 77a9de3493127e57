"""PrometheusCollector against a fake Prometheus HTTP API: which PromQL it sends, how answers become a
TelemetrySample, and that every failure (unreachable, slow, error, empty, garbage, stale, missing
nodes, failed infiniband collector) is a problem in the sample and never an exception."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import pytest

from dualpath_operator.api.v1alpha1 import rebalancing
from dualpath_operator.telemetry import prometheus, sample
from tests.cluster import processes
from tests.unit.telemetry import servers

pytestmark = pytest.mark.timeout(30)

WINDOW = 30.0
TARGETS = (
    sample.EngineTarget(pod="pe-0", node="n0", role="prefill"),
    sample.EngineTarget(pod="de-0", node="n1", role="decode"),
)


@contextlib.asynccontextmanager
async def fake(
    queries: prometheus.PrometheusQueries | None = None, **settings: object
) -> AsyncIterator[tuple[servers.FakePrometheus, prometheus.PrometheusCollector]]:
    prom = servers.FakePrometheus()
    async with servers.serve(prom.handle) as url:
        collector = prometheus.PrometheusCollector(
            url, settings=sample.CollectorSettings.model_validate(settings), queries=queries
        )
        async with collector:
            yield prom, collector


def answer(
    prom: servers.FakePrometheus,
    collector: prometheus.PrometheusCollector,
    name: str,
    rows: list[servers.Row],
) -> None:
    template = getattr(collector.queries, name)
    prom.answers[collector.render(template, WINDOW)] = rows


def healthy(prom: servers.FakePrometheus, collector: prometheus.PrometheusCollector) -> None:
    """Answers of a healthy 1P1D cluster on nodes n0 and n1."""
    now = prom.eval_time
    answer(prom, collector, "snic_rx", [({"node": "n0"}, 10e9), ({"node": "n1"}, 2e9)])
    answer(prom, collector, "snic_capacity", [({"node": "n0"}, 25e9), ({"node": "n1"}, 25e9)])
    answer(prom, collector, "cnic_tx", [({"node": "n0"}, 1e9), ({"node": "n1"}, 3e9)])
    answer(prom, collector, "cnic_rx", [({"node": "n0"}, 4e9), ({"node": "n1"}, 0.5e9)])
    answer(prom, collector, "cnic_capacity", [({"node": "n0"}, 50e9), ({"node": "n1"}, 50e9)])
    answer(prom, collector, "node_freshness", [({"node": "n0"}, now - 1), ({"node": "n1"}, now - 2)])
    answer(prom, collector, "engine_freshness", [({"pod": "pe-0"}, now - 1), ({"pod": "de-0"}, now - 1)])
    answer(prom, collector, "queued_tokens", [({"pod": "pe-0"}, 4096), ({"pod": "de-0"}, 100)])
    answer(prom, collector, "inflight_requests", [({"pod": "pe-0"}, 3), ({"pod": "de-0"}, 7)])
    answer(prom, collector, "read_queue_tokens", [({"pod": "pe-0"}, 512), ({"pod": "de-0"}, 0)])
    answer(
        prom,
        collector,
        "kv_read",
        [
            # The engine service labels paths pe/de; the traffic manager's series say pe_read/de_read.
            ({"pod": "pe-0", "path": "pe"}, 6e9),
            ({"pod": "pe-0", "path": "de"}, 0.0),
            ({"pod": "de-0", "path": "pe_read"}, 0.0),
            ({"pod": "de-0", "path": "de_read"}, 1.5e9),
        ],
    )
    answer(
        prom,
        collector,
        "transport_info",
        [({"pod": "pe-0", "kind": "tcp"}, 1), ({"pod": "de-0", "kind": "rdma"}, 1)],
    )
    answer(prom, collector, "transport_rate", [({"pod": "pe-0"}, 2e9), ({"pod": "de-0"}, 20e9)])
    answer(prom, collector, "ttft", [({}, 0.8)])
    answer(prom, collector, "tpot", [({}, 0.05)])


async def test_healthy_cluster_gives_a_complete_sample_with_every_signal() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert s.problems == ()
    assert s.complete
    assert s.window_s == WINDOW
    n0, n1 = s.nodes["n0"], s.nodes["n1"]
    assert (n0.snic_rx_bps, n0.snic_capacity_bps, n0.cnic_tx_bps, n0.cnic_rx_bps, n0.cnic_capacity_bps) == (
        10e9,
        25e9,
        1e9,
        4e9,
        50e9,
    )
    # The KV part of a node's storage-NIC traffic is its engines' KV reads (both paths).
    assert n0.snic_kv_rx_bps == 6e9
    assert n1.snic_kv_rx_bps == 1.5e9
    pe, de = s.engines
    assert (pe.pod, pe.node, pe.role) == ("pe-0", "n0", "prefill")
    assert (pe.queued_tokens, pe.inflight_requests, pe.read_queue_tokens) == (4096, 3, 512)
    assert (pe.kv_read_pe_bps, pe.kv_read_de_bps) == (6e9, 0.0)
    assert (de.kv_read_pe_bps, de.kv_read_de_bps) == (0.0, 1.5e9)
    assert (pe.transport, pe.transport_rate_bps) == ("tcp", 2e9)
    assert (de.transport, de.transport_rate_bps) == ("rdma", 20e9)
    # The scheduler's cluster-wide quantiles go on every engine.
    assert (pe.ttft_p90_s, pe.tpot_p90_s, de.ttft_p90_s, de.tpot_p90_s) == (0.8, 0.05, 0.8, 0.05)


async def test_default_queries_use_node_exporter_series_device_regexes_and_the_window() -> None:
    async with fake() as (prom, collector):
        await collector.collect(TARGETS, window_s=WINDOW)
    snic = (
        'rate(node_infiniband_port_data_received_bytes_total{device=~"mlx5_storage\\\\d+|mlx5_s\\\\d+"}[30s])'
    )
    assert f"sum by (node) ({snic})" in prom.queries
    assert (
        'sum by (node) (node_infiniband_rate_bytes_per_second{device=~"mlx5_storage\\\\d+|mlx5_s\\\\d+"})'
        in prom.queries
    )
    assert any(
        'node_infiniband_port_data_transmitted_bytes_total{device=~"mlx5_\\\\d+"}[30s]' in q
        for q in prom.queries
    )
    assert "sum by (pod, path) (rate(dualpath_engine_kv_read_bytes_total{}[30s]))" in prom.queries
    assert any(
        "histogram_quantile(0.9" in q and "time_to_first_token_seconds_bucket" in q for q in prom.queries
    )


async def test_spec_overrides_replace_their_queries_and_keep_the_others() -> None:
    overrides = rebalancing.TelemetryQueries(
        snic_read_bytes="sum by (node) (rate(my_snic_rx[$window]))",
        cnic_bytes="sum by (node, direction) (my_cnic)",
        ttft_seconds="my_ttft",
        tpot_seconds=None,
    )
    queries = prometheus.queries_for(overrides)
    async with fake(queries) as (prom, collector):
        healthy(prom, collector)
        answer(
            prom,
            collector,
            "cnic_total",
            [
                ({"node": "n0", "direction": "tx"}, 7.0),
                ({"node": "n0", "direction": "rx"}, 9.0),
                ({"node": "n1"}, 5.0),
            ],
        )
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert "sum by (node) (rate(my_snic_rx[30s]))" in prom.queries
    assert "my_ttft" in prom.queries
    assert not any("node_infiniband_port_data_transmitted_bytes_total" in q for q in prom.queries)
    assert any("time_per_output_token_seconds_bucket" in q for q in prom.queries)  # tpot kept its default
    assert (s.nodes["n0"].cnic_tx_bps, s.nodes["n0"].cnic_rx_bps) == (7.0, 9.0)
    # Without a direction label the total bounds both directions.
    assert (s.nodes["n1"].cnic_tx_bps, s.nodes["n1"].cnic_rx_bps) == (5.0, 5.0)
    assert prometheus.queries_for(None) == prometheus.PrometheusQueries()


async def test_unreachable_prometheus_is_one_clear_problem_and_no_values() -> None:
    url = f"http://127.0.0.1:{processes.free_port()}"
    async with prometheus.PrometheusCollector(
        url, settings=sample.CollectorSettings(request_timeout_s=2)
    ) as c:
        s = await c.collect(TARGETS, window_s=WINDOW)
    assert not s.complete
    assert any(p.startswith(f"Prometheus at {url} unreachable") for p in s.problems)
    assert s.nodes["n0"].snic_rx_bps is None
    assert all(e.queued_tokens is None for e in s.engines)


async def test_a_server_that_does_not_answer_times_out_into_a_problem() -> None:
    async with fake(request_timeout_s=0.3) as (prom, collector):
        prom.hang.set()
        try:
            s = await asyncio.wait_for(collector.collect(TARGETS, window_s=WINDOW), 10)
        finally:
            prom.release.set()
    assert any("did not answer within 0.3s" in p for p in s.problems)


async def test_query_errors_and_empty_results_are_problems() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        broken = collector.render(collector.queries.read_queue_tokens, WINDOW)
        prom.errors[broken] = (400, "parse error at char 7")
        answer(prom, collector, "snic_rx", [])
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert any("parse error at char 7" in p and "HTTP 400" in p for p in s.problems)
    assert any(p.startswith("Prometheus query snic_rx returned no series") for p in s.problems)
    assert "node n0: no storage-NIC receive rate" in s.problems
    assert "engine pe-0: no read_queue_tokens" in s.problems


async def test_garbage_values_are_dropped_with_a_reason() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        answer(
            prom, collector, "snic_rx", [({"node": "n0"}, math.nan), ({"node": "n1"}, 60e9)]
        )  # 2.4x line rate
        answer(prom, collector, "cnic_tx", [({"node": "n0"}, -5.0), ({"node": "n1"}, 1e9)])
        answer(prom, collector, "queued_tokens", [({"pod": "pe-0"}, math.inf), ({"pod": "de-0"}, 1)])
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert "garbage: node n0 snic_rx_bps is NaN" in s.problems
    assert any(
        p.startswith("garbage: node n1 snic_rx_bps is 6e+10 B/s, above 2x line rate") for p in s.problems
    )
    assert "garbage: node n0 cnic_tx_bps is negative (-5)" in s.problems
    assert "garbage: engine pe-0 queued_tokens is infinite" in s.problems
    assert s.nodes["n0"].snic_rx_bps is None and s.nodes["n1"].snic_rx_bps is None
    assert s.nodes["n0"].cnic_tx_bps is None
    assert s.engines[0].queued_tokens is None
    assert s.nodes["n1"].cnic_tx_bps == 1e9  # good values next to garbage survive


async def test_no_latency_observations_is_not_a_problem() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        answer(prom, collector, "ttft", [({}, math.nan)])  # histogram_quantile without requests
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert s.complete
    assert s.engines[0].ttft_p90_s is None


async def test_missing_node_and_engine_are_named() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        answer(prom, collector, "snic_rx", [({"node": "n0"}, 10e9), ({"node": "elsewhere"}, 1e9)])
        answer(prom, collector, "queued_tokens", [({"pod": "pe-0"}, 1)])
        extra = (*TARGETS, sample.EngineTarget(pod="de-1", node="n2", role="decode"))
        s = await collector.collect(extra, window_s=WINDOW, nodes=["n0", "n1"])
    assert "node n1: no storage-NIC receive rate" in s.problems
    assert "node n2: no storage-NIC receive rate" in s.problems
    assert "engine de-1 (node n2): no metrics" in s.problems
    assert "engine de-0: no queued_tokens" in s.problems
    assert "node n0: no storage-NIC receive rate" not in s.problems
    assert "elsewhere" not in s.nodes  # another cluster's node is not ours


async def test_series_older_than_two_windows_are_stale() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        now = prom.eval_time
        answer(prom, collector, "node_freshness", [({"node": "n0"}, now - 61), ({"node": "n1"}, now - 59)])
        answer(
            prom, collector, "engine_freshness", [({"pod": "pe-0"}, now - 1), ({"pod": "de-0"}, now - 300)]
        )
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert "stale: node n0 series are 61s old (more than 2 windows, 60s)" in s.problems
    assert "stale: engine de-0 series are 300s old (more than 2 windows, 60s)" in s.problems
    assert s.nodes["n0"].snic_rx_bps is None
    assert s.nodes["n1"].snic_rx_bps == 2e9
    assert s.engines[1].queued_tokens is None


async def test_failed_infiniband_collector_is_reported() -> None:
    async with fake() as (prom, collector):
        healthy(prom, collector)
        answer(prom, collector, "collector_failures", [({"node": "n1", "collector": "infiniband"}, 0)])
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert s.problems == ("node n1: node_exporter's infiniband collector failed (no NIC counters)",)


async def test_capacity_falls_back_to_the_spec_line_rate() -> None:
    async with fake(snic_capacity_fallback_bps=50e9) as (prom, collector):
        healthy(prom, collector)
        answer(prom, collector, "snic_capacity", [({"node": "n0"}, 12.5e9)])
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert s.complete
    assert (s.nodes["n0"].snic_capacity_bps, s.nodes["n1"].snic_capacity_bps) == (12.5e9, 50e9)


def test_window_durations() -> None:
    assert prometheus.promql_duration(60) == "60s"
    assert prometheus.promql_duration(2.5) == "2500ms"
    with pytest.raises(ValueError):
        prometheus.promql_duration(0)


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (502, b"<html>bad gateway</html>", "Prometheus answered HTTP 502 with a body that is not JSON"),
        (200, b"\xff\xfe\x00", "answered bytes that are not text"),
        (
            200,
            b'{"status": "success", "data": {"resultType": "matrix", "result": []}}',
            "not an instant vector",
        ),
        (
            200,
            b'{"status": "success", "data": {"resultType": "vector", "result": [{"value": 1}]}}',
            "malformed",
        ),
    ],
)
async def test_answers_that_are_not_query_results_are_problems(
    status: int, body: bytes, problem: str
) -> None:
    async with fake() as (prom, collector):
        prom.raw = (status, body)
        s = await collector.collect(TARGETS, window_s=WINDOW)
    assert any(problem in p for p in s.problems), s.problems
    assert not s.complete
