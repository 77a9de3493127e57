"""The decision-cost micro-benchmark runs at the paper's scale and reports sane numbers."""

from __future__ import annotations

import pytest

from dualpath_engine.scheduler import benchmark

pytestmark = pytest.mark.timeout(60)


def test_decision_cost_at_1152_engines_is_reported_and_small() -> None:
    cost = benchmark.measure_decision_cost(engines=1152, engines_per_group=8, requests_per_fetch=32, rounds=5)
    assert cost.engines == 1152
    assert cost.groups == 144
    assert cost.pe_fetch_seconds_median > 0
    assert cost.de_fetch_seconds_median > 0
    # Generous bound (shared 2-core CI machine): a fetch decision must stay far below a second.
    assert cost.pe_fetch_seconds_median < 0.5
    assert cost.de_fetch_seconds_median < 0.5
