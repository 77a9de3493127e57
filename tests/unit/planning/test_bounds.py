"""The P/D validity bound (paper eq. 9) and the feasible ratios within min/max and the GPU budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_operator.planning import bounds
from tests.unit.planning import samples

pytestmark = pytest.mark.timeout(60)

PAPER = bounds.NodeShape(gpus=8, cnic_bytes_per_s=50e9, snic_bytes_per_s=50e9, memory_bytes_per_s=500e9)


def test_paper_worked_example_is_one_seventh_to_seven_halves() -> None:
    b = bounds.validity_bound(PAPER)
    assert b.lower == pytest.approx(1 / 7)
    assert dict(b.terms) == pytest.approx(
        {
            "DE compute-NIC read (g-2s)/s": 6.0,
            "DE compute-NIC write (g-s)/(2s)": 3.5,
            "DE memory (M/(Bs)-3)/2": 3.5,
        }
    )
    assert b.upper == pytest.approx(3.5)
    assert b.describe() == "1/7 <= P/D <= 3.5"


@pytest.mark.parametrize(
    ("prefill", "decode", "inside"),
    [
        (2, 4, True),  # DS 660B default, P/D 0.5
        (1, 1, True),
        (1, 7, True),  # exactly the lower bound
        (7, 2, True),  # exactly the upper bound
        (1, 8, False),  # PE compute-NIC write over line rate
        (4, 1, False),  # DE compute-NIC write and DE DRAM over
        (1, 0, False),
    ],
)
def test_paper_table_of_configurations(prefill: int, decode: int, inside: bool) -> None:
    assert bounds.validity_bound(PAPER).contains(prefill, decode) is inside


@pytest.mark.parametrize(
    ("gpus", "snic", "memory", "lower", "upper"),
    [
        (8, 100e9, 2000e9, 2 / 6, 1.5),  # s = 2: (8-2)/(2*2) = 1.5 binds
        (8, 50e9, 300e9, 1 / 7, 1.5),  # slow memory: (300/50 - 3)/2 = 1.5 binds
        (4, 50e9, 500e9, 1 / 3, 1.5),  # g = 4: (4-1)/2 = 1.5
    ],
)
def test_bound_terms(gpus: int, snic: float, memory: float, lower: float, upper: float) -> None:
    b = bounds.validity_bound(
        bounds.NodeShape(gpus=gpus, cnic_bytes_per_s=50e9, snic_bytes_per_s=snic, memory_bytes_per_s=memory)
    )
    assert (b.lower, b.upper) == pytest.approx((lower, upper))


def test_one_gpu_nodes_have_an_empty_bound_which_is_not_enforced() -> None:
    shape = bounds.NodeShape(gpus=1, cnic_bytes_per_s=50e9, snic_bytes_per_s=50e9, memory_bytes_per_s=500e9)
    b = bounds.validity_bound(shape)
    assert b.empty and math.isinf(b.lower)
    limits = bounds.limits_from_spec(samples.spec(gpus=1), shape)
    assert limits.bound is None
    assert "not enforced" in limits.notes[0]
    assert (1, 1) in bounds.feasible_pairs(limits)


def test_feasible_pairs_respect_min_max_budget_and_bound() -> None:
    spec = samples.spec(prefill=(1, 4), decode=(1, 8), budget=48)
    limits = bounds.limits_from_spec(spec, PAPER)
    pairs = bounds.feasible_pairs(limits)
    assert (2, 4) in pairs and (1, 5) in pairs
    assert (1, 6) not in pairs  # 56 GPUs over the budget
    assert (4, 1) not in pairs  # P/D = 4 over 3.5
    assert all(1 <= p <= 4 and 1 <= d <= 8 and 8 * (p + d) <= 48 for p, d in pairs)
    assert all(1 / 7 <= p / d <= 3.5 for p, d in pairs)
    assert limits.violations(4, 1) == ["P/D = 4/1 outside the validity bound 1/7 <= P/D <= 3.5"]
    assert limits.violations(5, 2) == ["prefill 5 outside [1, 4]", "56 GPUs over gpuBudget 48"]


def test_bound_dropped_when_min_max_leave_no_pair_within_it() -> None:
    limits = bounds.limits_from_spec(samples.spec(prefill=(4, 8), decode=(1, 1)), PAPER)
    assert limits.bound is None
    assert "no pair within min/max" in limits.notes[0]


def test_shape_from_spec_uses_the_smaller_group_and_storage_nics() -> None:
    body = samples.cluster_body()
    body["spec"]["decode"]["gpusPerPod"] = 4
    body["spec"]["network"]["storageNic"] |= {"gbps": 200, "count": 2}
    from dualpath_operator.api.v1alpha1 import cluster as api

    shape = bounds.shape_from_spec(
        api.DualPathCluster.model_validate(body).spec, cnic_gbps=400, memory_bytes_per_s=5e11
    )
    assert shape.gpus == 4
    assert shape.s == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("start", "expected"),
    [((1, 8), (1, 7)), ((5, 1), (5, 2)), ((9, 9), (8, 8))],
)
def test_nearest_feasible_moves_fewest_groups(start: tuple[int, int], expected: tuple[int, int]) -> None:
    limits = bounds.limits_from_spec(samples.spec(), PAPER)
    assert bounds.nearest_feasible(limits, *start) == expected


@settings(max_examples=200, deadline=None)
@given(
    gpus=st.integers(1, 16),
    s=st.floats(0.1, 4),
    m_over_bs=st.floats(1, 40),
    p=st.integers(1, 16),
    d=st.integers(1, 16),
)
def test_inside_the_bound_no_link_is_over_its_line_rate(
    gpus: int, s: float, m_over_bs: float, p: int, d: int
) -> None:
    """Eqs. 2-8 themselves: within the bound every compute-NIC and DRAM load fits (B = 1)."""
    shape = bounds.NodeShape(
        gpus=gpus, cnic_bytes_per_s=1.0, snic_bytes_per_s=s, memory_bytes_per_s=m_over_bs * s
    )
    if not bounds.validity_bound(shape).contains(p, d):
        return
    r = p / d
    eps = 1e-9
    assert (s / gpus) * (1 + 1 / r) <= 1 + eps  # PE CNIC write
    assert (s / gpus) * (r + 2) <= 1 + eps  # DE CNIC read
    assert (s / gpus) * (2 * r + 1) <= 1 + eps  # DE CNIC write
    assert (3 + 2 * r) * s <= m_over_bs * s + eps  # DE DRAM


@settings(max_examples=200, deadline=None)
@given(
    prefill=st.tuples(st.integers(1, 6), st.integers(0, 6)),
    decode=st.tuples(st.integers(1, 6), st.integers(0, 6)),
    gpus=st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8])),
    budget=st.none() | st.integers(2, 120),
    shape=st.none() | st.tuples(st.integers(2, 16), st.floats(0.2, 3), st.floats(4, 30)),
    at=st.tuples(st.integers(0, 14), st.integers(0, 14)),
)
def test_ranges_and_nearest_agree_with_brute_force(
    prefill: tuple[int, int],
    decode: tuple[int, int],
    gpus: tuple[int, int],
    budget: int | None,
    shape: tuple[int, float, float] | None,
    at: tuple[int, int],
) -> None:
    bound = None
    if shape is not None:
        g, s, m = shape
        b = bounds.validity_bound(
            bounds.NodeShape(gpus=g, cnic_bytes_per_s=1.0, snic_bytes_per_s=s, memory_bytes_per_s=m * s)
        )
        bound = None if b.empty else b
    limits = bounds.Limits(
        prefill_min=prefill[0],
        prefill_max=prefill[0] + prefill[1],
        decode_min=decode[0],
        decode_max=decode[0] + decode[1],
        prefill_gpus=gpus[0],
        decode_gpus=gpus[1],
        gpu_budget=budget,
        bound=bound,
    )
    brute = [
        (p, d)
        for p in range(limits.prefill_min, limits.prefill_max + 1)
        for d in range(limits.decode_min, limits.decode_max + 1)
        if limits.feasible(p, d)
    ]
    assert bounds.feasible_pairs(limits) == brute
    nearest = bounds.nearest_feasible(limits, *at)
    if not brute:
        assert nearest is None
        return
    assert nearest in brute
    dist = abs(nearest[0] - at[0]) + abs(nearest[1] - at[1])
    assert dist == min(abs(p - at[0]) + abs(d - at[1]) for p, d in brute)


def test_large_clusters_are_cheap() -> None:
    spec = samples.spec(prefill=(1, 1024), decode=(1, 1024))
    limits = bounds.limits_from_spec(spec, PAPER)
    ranges = bounds.feasible_ranges(limits)
    assert ranges[0] == (1, 1, 7) and ranges[-1] == (1024, 293, 1024)
    assert bounds.nearest_feasible(limits, 1000, 1) == (1000, 286)
