"""Sample assembly: whatever numbers a source hands over, the sample holds only plausible values and
names every dropped one in ``problems``; settings and the collector choice follow the cluster spec."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from dualpath_operator.api.v1alpha1 import cluster
from dualpath_operator.telemetry import factory, prometheus, sample, scrape

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "dualpathcluster-auto.yaml"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NODE_FIELDS: tuple[sample.NodeField, ...] = (
    "snic_rx_bps",
    "snic_capacity_bps",
    "cnic_tx_bps",
    "cnic_rx_bps",
    "cnic_capacity_bps",
)
ENGINE_FIELDS: tuple[sample.EngineField, ...] = (
    "queued_tokens",
    "read_queue_tokens",
    "inflight_requests",
    "hbm_used_ratio",
    "ttft_p90_s",
    "tpot_p90_s",
    "kv_read_pe_bps",
    "kv_read_de_bps",
    "transport_rate_bps",
)
anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e9, 25e9, 60e9, 1e13])
)


def spec(**telemetry: Any) -> cluster.DualPathClusterSpec:
    doc = yaml.safe_load(EXAMPLE.read_text())["spec"]
    doc["telemetry"] = {**doc["telemetry"], **telemetry}
    return cluster.DualPathClusterSpec.model_validate(doc)


@given(
    node_values=st.lists(st.tuples(st.sampled_from(NODE_FIELDS), anything), max_size=12),
    engine_values=st.lists(st.tuples(st.sampled_from(ENGINE_FIELDS), anything), max_size=12),
)
def test_only_plausible_values_survive_and_every_drop_is_explained(
    node_values: list[tuple[sample.NodeField, float]], engine_values: list[tuple[sample.EngineField, float]]
) -> None:
    settings = sample.CollectorSettings()
    builder = sample.SampleBuilder(settings, 30.0, [sample.EngineTarget("pe-0", "n0", "prefill")])
    for node_field, value in node_values:
        builder.set_node("n0", node_field, value)
    for engine_field, value in engine_values:
        builder.set_engine("pe-0", engine_field, value)
    s = builder.build(NOW)
    node = s.nodes["n0"]
    kept = {name: getattr(node, name) for name in (*NODE_FIELDS, "snic_kv_rx_bps")}
    for name, value in kept.items():
        if value is None:
            continue
        assert math.isfinite(value) and value >= 0
        capacity = node.cnic_capacity_bps if name.startswith("cnic_") else node.snic_capacity_bps
        if name.endswith("_capacity_bps"):
            continue
        ceiling = 2 * capacity if capacity is not None else settings.max_rate_bps
        assert value <= ceiling
    engine = s.engines[0]
    for engine_field in ENGINE_FIELDS:
        value = getattr(engine, engine_field)
        assert value is None or (math.isfinite(value) and value >= 0)
    assert engine.hbm_used_ratio is None or engine.hbm_used_ratio <= 1
    last_node = dict(node_values)
    garbage = [v for v in last_node.values() if not math.isfinite(v) or v < 0]
    if garbage:
        assert any(p.startswith("garbage: node n0") for p in s.problems)
    if "snic_rx_bps" not in last_node:
        assert "node n0: no storage-NIC receive rate" in s.problems
    assert s.complete == (not s.problems)


def test_settings_follow_the_spec_line_rate() -> None:
    settings = sample.settings_for(spec(), request_timeout_s=2)
    assert settings.snic_capacity_fallback_bps == 400e9 / 8
    assert settings.request_timeout_s == 2
    with pytest.raises(ValueError):
        sample.CollectorSettings(absurd_rate_factor=0.5)


async def test_the_spec_source_picks_the_collector() -> None:
    scrape_spec = spec()
    collector = factory.build(scrape_spec, scheduler_metrics_url="http://127.0.0.1:1/metrics")
    assert isinstance(collector, scrape.ScrapeCollector)
    assert collector.scheduler_url == "http://127.0.0.1:1/metrics"
    assert factory.window_s(scrape_spec) == 30.0
    await collector.close()
    prom_spec = spec(
        source="Prometheus",
        prometheusUrl="http://prometheus.monitoring:9090",
        queries={"snicReadBytes": "sum by (node) (rate(x[$window]))"},
    )
    chosen = factory.build(prom_spec)
    assert isinstance(chosen, prometheus.PrometheusCollector)
    assert chosen.base_url == "http://prometheus.monitoring:9090"
    assert chosen.queries.snic_rx == "sum by (node) (rate(x[$window]))"
    assert chosen.settings.snic_capacity_fallback_bps == 50e9
    await chosen.close()


def test_an_engine_rate_above_the_ceiling_is_garbage() -> None:
    builder = sample.SampleBuilder(
        sample.CollectorSettings(), 30.0, [sample.EngineTarget("de-0", "n1", "decode")]
    )
    builder.set_engine("de-0", "kv_read_de_bps", 5e12)
    builder.set_engine("de-0", "hbm_used_ratio", 1.5)
    s = builder.build(NOW)
    assert s.engines[0].kv_read_de_bps is None
    assert s.engines[0].hbm_used_ratio is None
    assert any(p.startswith("garbage: engine de-0 kv_read_de_bps is 5e+12 B/s") for p in s.problems)
    assert "garbage: engine de-0 hbm_used_ratio is 1.5 (above 1)" in s.problems
