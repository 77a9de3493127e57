"""Per-node path weights: usable storage-NIC capacity, compute-NIC headroom, smoothing, bounds, hold."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_operator.planning import telemetry, weights
from tests.unit.planning import samples

pytestmark = pytest.mark.timeout(60)

GB = samples.GB
NO_SMOOTHING = weights.WeightParams(alpha=1.0, floor=0.0, ceiling=100.0)


def sample_of(*nodes: telemetry.NodeSample, problems: tuple[str, ...] = ()) -> telemetry.TelemetrySample:
    return telemetry.TelemetrySample(
        taken_at=samples.T0, window_s=60, nodes={n.node: n for n in nodes}, problems=problems
    )


def by_node(result: weights.WeightsResult) -> dict[str, weights.NodeWeight]:
    return {w.node: w for w in result.weights}


def test_equal_nodes_get_equal_weights_and_the_scheduler_their_capacity() -> None:
    r = weights.compute(sample_of(samples.node("a"), samples.node("b")), [], NO_SMOOTHING)
    assert not r.held
    assert [w.weight for w in r.weights] == pytest.approx([0.5, 0.5])
    assert weights.admin_body(r.weights) == {
        "weights": [
            {"node": "a", "capacity_bytes_per_second": pytest.approx(50 * GB)},
            {"node": "b", "capacity_bytes_per_second": pytest.approx(50 * GB)},
        ]
    }


@pytest.mark.parametrize(
    ("node", "usable"),
    [
        (samples.node("x", rx=10 * GB), 50 * GB),  # all traffic is KV: the full line rate is usable
        (samples.node("x", rx=30 * GB, kv=10 * GB), 30 * GB),  # 20 GB/s of foreign traffic
        (samples.node("x", snic_gbps=200), 25 * GB),  # degraded link at half rate
        (samples.node("x", rx=60 * GB, kv=0.0), 0.0),  # foreign traffic fills the NIC
        # Compute NIC nearly full: 5 GB/s free + 10 GB/s of KV it already carries.
        (samples.node("x", cnic_gbps=800, cnic_tx=95 * GB, cnic_rx=1 * GB), 15 * GB),
    ],
)
def test_usable_capacity(node: telemetry.NodeSample, usable: float) -> None:
    r = weights.compute(sample_of(node, samples.node("y")), [], NO_SMOOTHING)
    assert by_node(r)["x"].snic_capacity_bps == pytest.approx(usable)


def test_utilization_and_headroom_reported() -> None:
    n = samples.node("x", rx=25 * GB, cnic_gbps=800, cnic_tx=75 * GB, cnic_rx=10 * GB)
    w = by_node(weights.compute(sample_of(n), [], NO_SMOOTHING))["x"]
    assert w.snic_utilization == pytest.approx(0.5)
    assert w.cnic_headroom == pytest.approx(0.25)
    pw = w.to_path_weight()
    assert (pw.node, pw.snic_capacity_bps, pw.weight) == ("x", 50_000_000_000, 1.0)


def test_node_at_half_rate_gets_a_third() -> None:
    """Both sides finish together: bytes proportional to capacity."""
    r = weights.compute(sample_of(samples.node("a"), samples.node("b", snic_gbps=200)), [], NO_SMOOTHING)
    assert by_node(r)["a"].weight == pytest.approx(2 / 3)
    assert by_node(r)["b"].weight == pytest.approx(1 / 3)


def test_smoothing_moves_halfway_per_interval() -> None:
    params = weights.WeightParams(alpha=0.5, floor=0.0, ceiling=100.0)
    healthy = sample_of(samples.node("a"), samples.node("b"))
    degraded = sample_of(samples.node("a"), samples.node("b", snic_gbps=0.001))
    first = weights.compute(healthy, [], params)
    second = weights.compute(degraded, first.weights, params)
    third = weights.compute(degraded, second.weights, params)
    assert by_node(second)["b"].snic_capacity_bps == pytest.approx(25 * GB, rel=1e-3)
    assert by_node(third)["b"].snic_capacity_bps == pytest.approx(12.5 * GB, rel=1e-3)
    assert by_node(first)["b"].weight > by_node(second)["b"].weight > by_node(third)["b"].weight > 0


def test_floor_keeps_a_healthy_node_in_play_and_ceiling_caps() -> None:
    params = weights.WeightParams(alpha=1.0, floor=0.5, ceiling=1.5)
    r = weights.compute(
        sample_of(samples.node("a"), samples.node("b"), samples.node("c", snic_gbps=4)), [], params
    )
    w = by_node(r)
    assert w["c"].weight == pytest.approx(0.5 / 3)
    assert w["a"].weight == pytest.approx(w["b"].weight)
    assert sum(x.weight for x in r.weights) == pytest.approx(1.0)
    capped = weights.compute(
        sample_of(samples.node("a", snic_gbps=3200), samples.node("b"), samples.node("c")), [], params
    )
    assert by_node(capped)["a"].weight == pytest.approx(0.5)
    # The scheduler sees the bounded share of the total, not the raw capacity (a: 350 GB/s of free
    # compute NIC + 10 GB/s of KV it carries, below its 400 GB/s storage NIC).
    assert by_node(capped)["a"].snic_capacity_bps == pytest.approx(360 * GB)
    assert by_node(capped)["c"].scheduler_capacity_bps == pytest.approx(0.25 * (360 + 50 + 50) * GB)


def test_node_without_capacity_gets_zero_and_the_rest_share() -> None:
    r = weights.compute(
        sample_of(samples.node("a"), samples.node("b", rx=60 * GB, kv=0.0)), [], weights.WeightParams()
    )
    assert by_node(r)["b"].weight == 0.0
    assert by_node(r)["a"].weight == pytest.approx(1.0)
    assert "no usable capacity on b" in r.reason


@pytest.mark.parametrize(
    ("sample", "why"),
    [
        (sample_of(samples.node("a"), problems=("prometheus unreachable",)), "prometheus unreachable"),
        (sample_of(dataclasses.replace(samples.node("a"), snic_rx_bps=None)), "node a: missing or invalid"),
        (sample_of(dataclasses.replace(samples.node("a"), cnic_tx_bps=float("nan"))), "cnic_tx_bps"),
        (sample_of(dataclasses.replace(samples.node("a"), snic_kv_rx_bps=-1.0)), "snic_kv_rx_bps"),
        (sample_of(), "no node samples"),
        (
            dataclasses.replace(
                sample_of(samples.node("a")),
                engines=(telemetry.EngineSample(pod="p", node="z", role="prefill"),),
            ),
            "node z: no NIC sample",
        ),
        (sample_of(samples.node("a", rx=60 * GB, kv=0.0)), "no node has usable"),
    ],
)
def test_incomplete_sample_holds_previous_weights(sample: telemetry.TelemetrySample, why: str) -> None:
    previous = weights.compute(sample_of(samples.node("a"), samples.node("b")), [], NO_SMOOTHING).weights
    r = weights.compute(sample, previous)
    assert r.held
    assert r.weights == previous
    assert why in r.reason


def test_status_round_trip_keeps_weights() -> None:
    r = weights.compute(sample_of(samples.node("a"), samples.node("b", snic_gbps=200)), [], NO_SMOOTHING)
    back = weights.from_status(r.path_weights())
    assert [w.node for w in back] == [w.node for w in r.weights]
    # The status keeps 3 decimals / 3 significant digits (noise must not rewrite it every interval).
    assert [w.weight for w in back] == pytest.approx([w.weight for w in r.weights], abs=5e-4)
    assert [w.scheduler_capacity_bps for w in back] == pytest.approx(
        [w.scheduler_capacity_bps for w in r.weights], rel=5e-3
    )


_nodes = st.lists(st.tuples(st.floats(1, 3200), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12)


def _sample(spec: list[tuple[float, float, float]]) -> telemetry.TelemetrySample:
    nodes = []
    for i, (gbps, load, foreign) in enumerate(spec):
        cap = gbps * GB / 8
        rx = cap * load
        nodes.append(samples.node(f"n{i:02}", snic_gbps=gbps, rx=rx, kv=rx * (1 - foreign)))
    return sample_of(*nodes)


@settings(max_examples=200, deadline=None)
@given(
    first=_nodes,
    alpha=st.floats(0.05, 1),
    floor=st.floats(0, 1),
    ceiling=st.floats(1, 10),
)
def test_weights_sum_to_one_over_healthy_nodes_within_floor_and_ceiling(
    first: list[tuple[float, float, float]], alpha: float, floor: float, ceiling: float
) -> None:
    params = weights.WeightParams(alpha=alpha, floor=floor, ceiling=ceiling)
    r = weights.compute(_sample(first), [], params)
    if r.held:
        assert all(load * foreign >= 1 - 1e-9 for _, load, foreign in first)
        return
    healthy = [w for w in r.weights if w.snic_capacity_bps > 0]
    n = len(healthy)
    assert sum(w.weight for w in healthy) == pytest.approx(1.0)
    for w in healthy:
        assert floor / n - 1e-9 <= w.weight <= min(1.0, ceiling / n) + 1e-9
        if floor > 0:
            assert w.weight > 0
    assert all(w.weight == 0 for w in r.weights if w.snic_capacity_bps <= 0)


@settings(max_examples=200, deadline=None)
@given(
    first=st.lists(st.floats(10, 3200), min_size=2, max_size=8),
    which=st.integers(0, 7),
    factor=st.floats(0.05, 0.95),
    alpha=st.floats(0.05, 1),
)
def test_degraded_node_weight_falls(first: list[float], which: int, factor: float, alpha: float) -> None:
    """Lower one node's line rate: its weight falls (or stays at the floor), nobody else's falls."""
    params = weights.WeightParams(alpha=alpha)
    base = _sample([(g, 0.2, 0.0) for g in first])
    steady = weights.compute(base, [], params)
    i = which % len(first)
    changed = [(g * factor if j == i else g, 0.2, 0.0) for j, g in enumerate(first)]
    after = weights.compute(_sample(changed), steady.weights, params)
    before_w = {w.node: w.weight for w in steady.weights}
    after_w = {w.node: w.weight for w in after.weights}
    target = f"n{i:02}"
    assert after_w[target] <= before_w[target] + 1e-9
    assert all(after_w[k] >= before_w[k] - 1e-9 for k in after_w if k != target)
    assert after_w[target] > 0
