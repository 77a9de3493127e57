"""Tests of :mod:`dualpath_operator.metrics` against a private registry and a real HTTP scrape."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dualpath_operator import metrics

pytestmark = pytest.mark.timeout(10)


class FakeTime:
    """A settable clock for both wall time and the monotonic timer."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _view(
    name: str, *, ready: bool = True, namespace: str = "team-a", **counts: int
) -> metrics.ClusterMetricsView:
    values = {
        "prefill_replicas": 2,
        "prefill_ready": 2,
        "prefill_desired": 2,
        "decode_replicas": 4,
        "decode_ready": 4,
        "decode_desired": 4,
    }
    values.update(counts)
    return metrics.ClusterMetricsView(
        namespace=namespace, name=name, ready=ready, degraded=not ready, **values
    )


def _make(
    views: list[metrics.ClusterMetricsView] | None = None,
) -> tuple[CollectorRegistry, metrics.OperatorMetrics, FakeTime, FakeTime, list[metrics.ClusterMetricsView]]:
    registry = CollectorRegistry()
    wall, mono = FakeTime(5_000.0), FakeTime(10.0)
    current = views if views is not None else []

    def provider() -> Iterable[metrics.ClusterMetricsView]:
        return list(current)

    return (
        registry,
        metrics.OperatorMetrics(registry, provider, clock=wall, monotonic=mono),
        wall,
        mono,
        current,
    )


def test_reconcile_counter_exports_both_outcomes_from_the_start() -> None:
    registry, _, _, _, _ = _make()
    assert registry.get_sample_value("dualpath_operator_reconcile_total", {"result": "success"}) == 0
    assert registry.get_sample_value("dualpath_operator_reconcile_total", {"result": "error"}) == 0


def test_a_successful_pass_is_counted_timed_and_stamped() -> None:
    registry, m, wall, mono, _ = _make()
    with m.time_reconcile():
        mono.now += 0.3
        wall.now = 6_000.0
    assert registry.get_sample_value("dualpath_operator_reconcile_total", {"result": "success"}) == 1
    assert registry.get_sample_value("dualpath_operator_reconcile_duration_seconds_count") == 1
    assert registry.get_sample_value("dualpath_operator_reconcile_duration_seconds_sum") == pytest.approx(0.3)
    bucket = "dualpath_operator_reconcile_duration_seconds_bucket"
    assert registry.get_sample_value(bucket, {"le": "0.25"}) == 0
    assert registry.get_sample_value(bucket, {"le": "0.5"}) == 1
    assert (
        registry.get_sample_value("dualpath_operator_last_successful_reconcile_timestamp_seconds") == 6_000.0
    )


def test_a_failing_pass_counts_as_error_and_keeps_the_last_success_time() -> None:
    registry, m, wall, mono, _ = _make()
    m.observe_reconcile("success", 0.01)
    wall.now += 100
    with pytest.raises(RuntimeError, match="apply failed"), m.time_reconcile():
        mono.now += 2.0
        raise RuntimeError("apply failed")
    assert registry.get_sample_value("dualpath_operator_reconcile_total", {"result": "error"}) == 1
    assert registry.get_sample_value("dualpath_operator_reconcile_total", {"result": "success"}) == 1
    assert (
        registry.get_sample_value("dualpath_operator_last_successful_reconcile_timestamp_seconds") == 5_000.0
    )
    assert registry.get_sample_value("dualpath_operator_reconcile_duration_seconds_sum") == pytest.approx(
        2.01
    )


def test_a_cancelled_pass_is_not_an_outcome() -> None:
    registry, m, _, _, _ = _make()
    with pytest.raises(asyncio.CancelledError), m.time_reconcile():
        raise asyncio.CancelledError
    assert registry.get_sample_value("dualpath_operator_reconcile_total", {"result": "error"}) == 0
    assert registry.get_sample_value("dualpath_operator_reconcile_duration_seconds_count") == 0


def test_bad_observations_are_rejected() -> None:
    _, m, _, _, _ = _make()
    with pytest.raises(ValueError, match="unknown reconcile result"):
        m.observe_reconcile("maybe", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        m.observe_reconcile("success", -1.0)
    with pytest.raises(ValueError, match="non-empty"):
        m.record_decision("", "SnicSaturated")


def test_decisions_are_counted_by_action_and_reason() -> None:
    registry, m, _, _, _ = _make()
    m.record_decision("ScaleDecode", "DecodePressure")
    m.record_decision("ScaleDecode", "DecodePressure")
    m.record_decision("Hold", "TelemetryStale")
    name = "dualpath_operator_decisions_total"
    assert registry.get_sample_value(name, {"action": "ScaleDecode", "reason": "DecodePressure"}) == 2
    assert registry.get_sample_value(name, {"action": "Hold", "reason": "TelemetryStale"}) == 1


def test_cluster_gauges_follow_the_provider_at_each_scrape() -> None:
    registry, _, _, _, views = _make()
    views.append(_view("alpha", prefill_ready=1))
    views.append(_view("beta", ready=False, namespace="team-b", decode_desired=6))
    alpha = {"namespace": "team-a", "cluster": "alpha"}
    beta = {"namespace": "team-b", "cluster": "beta"}

    assert registry.get_sample_value("dualpath_operator_cluster_ready", alpha) == 1
    assert registry.get_sample_value("dualpath_operator_cluster_ready", beta) == 0
    assert registry.get_sample_value("dualpath_operator_cluster_degraded", beta) == 1
    assert registry.get_sample_value("dualpath_operator_cluster_replicas", {**alpha, "role": "prefill"}) == 2
    assert (
        registry.get_sample_value("dualpath_operator_cluster_ready_replicas", {**alpha, "role": "prefill"})
        == 1
    )
    assert (
        registry.get_sample_value("dualpath_operator_cluster_desired_replicas", {**beta, "role": "decode"})
        == 6
    )
    assert registry.get_sample_value("dualpath_operator_cluster_collector_up") == 1

    views.clear()
    views.append(_view("beta", namespace="team-b"))
    assert registry.get_sample_value("dualpath_operator_cluster_ready", alpha) is None, (
        "deleted cluster lingers"
    )
    assert registry.get_sample_value("dualpath_operator_cluster_ready", beta) == 1


def test_registration_does_not_call_the_provider() -> None:
    calls: list[int] = []

    def provider() -> Iterable[metrics.ClusterMetricsView]:
        calls.append(1)
        return []

    registry = CollectorRegistry()
    metrics.OperatorMetrics(registry, provider)
    assert calls == []
    generate_latest(registry)
    assert calls == [1]


def test_a_failing_provider_does_not_break_the_scrape() -> None:
    def provider() -> Iterable[metrics.ClusterMetricsView]:
        raise KeyError("index not ready")

    registry = CollectorRegistry()
    m = metrics.OperatorMetrics(registry, provider)
    m.observe_reconcile("success", 0.1)
    text = generate_latest(registry).decode()
    assert "dualpath_operator_cluster_collector_up 0.0" in text
    assert 'dualpath_operator_reconcile_total{result="success"} 1.0' in text


def test_metrics_are_served_over_http_on_loopback() -> None:
    registry, m, _, _, views = _make()
    views.append(_view("alpha"))
    m.record_decision("SetWeights", "SnicImbalance")
    server = metrics.start_server(registry, "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()
    assert not server.thread.is_alive()
    assert 'dualpath_operator_cluster_ready{cluster="alpha",namespace="team-a"} 1.0' in body
    assert 'dualpath_operator_decisions_total{action="SetWeights",reason="SnicImbalance"} 1.0' in body
    assert "# TYPE dualpath_operator_reconcile_duration_seconds histogram" in body
