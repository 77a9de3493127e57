"""Counter rates with resets and histogram quantiles, as Prometheus computes them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualpath_operator.telemetry import rates

pytestmark = pytest.mark.timeout(60)

INF = math.inf


@pytest.mark.parametrize(
    ("values", "increase"),
    [
        ([], 0.0),
        ([5.0], 0.0),
        ([1.0, 4.0, 10.0], 9.0),
        ([100.0, 30.0], 30.0),  # reset: the new value is what was counted since
        ([10.0, 20.0, 5.0, 8.0], 10.0 + 5.0 + 3.0),
        ([7.0, 7.0], 0.0),
    ],
)
def test_counter_increase(values: list[float], increase: float) -> None:
    assert rates.counter_increase(values) == increase


def test_counter_rate_needs_two_points_spanning_time() -> None:
    assert rates.counter_rate([(0.0, 1.0)]) is None
    assert rates.counter_rate([(3.0, 1.0), (3.0, 5.0)]) is None
    assert rates.counter_rate([(0.0, 0.0), (2.0, 10.0), (4.0, 30.0)]) == 7.5


@given(
    start=st.floats(0, 1e15),
    steps=st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 1e12)), min_size=1, max_size=20),
)
def test_a_counter_that_never_resets_rates_to_its_total_growth_over_the_span(
    start: float, steps: list[tuple[float, float]]
) -> None:
    t, v = 0.0, start
    points = [(t, v)]
    for dt, dv in steps:
        t, v = t + dt, v + dv
        points.append((t, v))
    rate = rates.counter_rate(points)
    assert rate is not None
    assert rate >= 0
    assert rate == pytest.approx((v - start) / t, rel=1e-6, abs=1e-6)


@given(st.lists(st.floats(0, 1e12), min_size=2, max_size=30))
def test_an_increase_is_never_negative_whatever_the_resets(values: list[float]) -> None:
    assert rates.counter_increase(values) >= 0


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(1.0, 0.0), (2.0, 10.0), (INF, 10.0)], 1.5),
        (0.9, [(0.5, 1.0), (1.0, 4.0), (2.5, 4.0), (5.0, 5.0), (INF, 5.0)], 3.75),
        (0.99, [(1.0, 5.0), (INF, 10.0)], 1.0),  # rank in +Inf: the highest finite bound
        (0.1, [(1.0, 10.0), (INF, 10.0)], 0.1),  # first bucket starts at 0
        (0.5, [(1.0, 0.0), (INF, 0.0)], None),  # no observations
        (0.5, [(1.0, 3.0), (2.0, 5.0)], None),  # no +Inf bucket
    ],
)
def test_histogram_quantile(q: float, buckets: list[tuple[float, float]], expected: float | None) -> None:
    got = rates.histogram_quantile(q, buckets)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_histogram_quantile_rejects_a_bad_quantile() -> None:
    with pytest.raises(ValueError):
        rates.histogram_quantile(1.5, [(INF, 1.0)])


def test_histogram_increase_per_bucket_with_reset() -> None:
    before = {1.0: 5.0, INF: 8.0}
    after = {1.0: 7.0, INF: 12.0}
    restarted = {1.0: 1.0, INF: 1.0}
    assert rates.histogram_increase([before, after]) == [(1.0, 2.0), (INF, 4.0)]
    assert rates.histogram_increase([before, after, restarted]) == [(1.0, 3.0), (INF, 5.0)]
