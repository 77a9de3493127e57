"""Properties of the ratio planner: never outside its bounds, quiet under constant input, monotone in
pressure, and never acting on missing telemetry."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualpath_operator.api.v1alpha1 import common
from dualpath_operator.planning import bounds, ratio, telemetry
from tests.unit.planning import samples

pytestmark = pytest.mark.timeout(120)

T0 = samples.T0
PARAMS = ratio.RatioParams()

_role = st.tuples(st.integers(1, 4), st.integers(0, 6)).map(lambda t: (t[0], t[0] + t[1]))


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    prefill, decode = draw(_role), draw(_role)
    gpus = draw(st.sampled_from([2, 4, 8]))
    floor = gpus * (prefill[0] + decode[0])
    budget = draw(st.none() | st.integers(floor, floor + 6 * gpus))
    return {
        "prefill": prefill,
        "decode": decode,
        "gpus": gpus,
        "budget": budget,
        "windows": draw(st.integers(1, 4)),
        "max_step": draw(st.integers(1, 3)),
        "cooldown": draw(st.sampled_from(["30s", "1m", "2m", "5m"])),
        "slo": draw(st.none() | st.just((2000, 50))),
    }


@st.composite
def loads(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "ttft_s": draw(st.floats(0, 20)),
        "tpot_s": draw(st.floats(0, 0.5)),
        "pe_queue": draw(st.floats(0, 2e6)),
        "de_queue": draw(st.floats(0, 2e7)),
        "hbm": draw(st.floats(0, 1)),
    }


def _limits(spec_kw: dict[str, Any]) -> bounds.Limits:
    spec = samples.spec(**spec_kw)
    shape = bounds.shape_from_spec(
        spec, cnic_gbps=PARAMS.cnic_gbps, memory_bytes_per_s=PARAMS.memory_bytes_per_s
    )
    return bounds.limits_from_spec(spec, shape)


def _simulate(
    spec_kw: dict[str, Any], current: tuple[int, int], load: dict[str, Any], intervals: int
) -> list[ratio.Outcome]:
    spec = samples.spec(**spec_kw)
    state = ratio.RatioState()
    out = []
    for i in range(intervals):
        now = T0 + dt.timedelta(seconds=30 * i)
        outcome, state = ratio.decide(spec, current, samples.load(current, at=now, **load), state, now)
        out.append(outcome)
        current = (outcome.prefill, outcome.decode)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_kw=specs(), load=loads(), pick=st.integers(0, 10_000), intervals=st.integers(1, 8))
def test_never_outside_min_max_budget_and_validity_bound(
    spec_kw: dict[str, Any], load: dict[str, Any], pick: int, intervals: int
) -> None:
    limits = _limits(spec_kw)
    pairs = bounds.feasible_pairs(limits)
    start = pairs[pick % len(pairs)]
    for o in _simulate(spec_kw, start, load, intervals):
        assert limits.feasible(o.prefill, o.decode), o.decision


@settings(max_examples=100, deadline=None)
@given(spec_kw=specs(), load=loads(), p=st.integers(0, 12), d=st.integers(1, 12))
def test_a_ratio_outside_the_bounds_is_brought_inside(
    spec_kw: dict[str, Any], load: dict[str, Any], p: int, d: int
) -> None:
    limits = _limits(spec_kw)
    (o,) = _simulate(spec_kw, (p, d), load, 1)
    assert limits.feasible(o.prefill, o.decode)
    assert (o.decision.action == "ClampedToBounds") == (not limits.feasible(p, d))


@settings(max_examples=100, deadline=None)
@given(
    spec_kw=specs(),
    pick=st.integers(0, 10_000),
    # Either every signal at most 0.8 of its objective (nobody under pressure), or both roles equally
    # far over (or under) it: the pressures are balanced either way.
    level=st.one_of(
        st.tuples(*[st.floats(0, 0.8)] * 5),
        st.floats(0, 5).map(lambda x: (x, x, x, x, x)),
    ),
)
def test_balanced_pressure_never_changes_the_ratio(
    spec_kw: dict[str, Any], pick: int, level: tuple[float, ...]
) -> None:
    pairs = bounds.feasible_pairs(_limits(spec_kw))
    start = pairs[pick % len(pairs)]
    gpus = spec_kw["gpus"]
    load = {
        "ttft_s": 2.0 * level[0],
        "tpot_s": 0.05 * level[1],
        "pe_queue": PARAMS.beta_tokens_per_gpu * gpus * level[2],
        "de_queue": PARAMS.decode_queue_tokens_per_gpu * gpus * level[3],
        # HBM use cannot exceed 1; decode pressure is the largest part, so the others keep it at level.
        "hbm": min(1.0, PARAMS.hbm_high * level[4]),
    }
    outcomes = _simulate(spec_kw, start, load, 25)
    assert all(not o.changed for o in outcomes)
    assert {o.decision.action for o in outcomes} == {"Hold"}


@settings(max_examples=100, deadline=None)
@given(spec_kw=specs(), load=loads(), pick=st.integers(0, 10_000))
def test_constant_imbalance_moves_one_way_at_most_once_per_cooldown(
    spec_kw: dict[str, Any], load: dict[str, Any], pick: int
) -> None:
    pairs = bounds.feasible_pairs(_limits(spec_kw))
    start = pairs[pick % len(pairs)]
    outcomes = _simulate(spec_kw, start, load, 25)
    changes = [(i, o) for i, o in enumerate(outcomes) if o.changed]
    directions = {_rank(o) for _, o in changes}
    assert len(directions) <= 1, [o.decision.action for _, o in changes]
    cooldown = common.parse_duration(spec_kw["cooldown"])
    windows = spec_kw["windows"]
    for (a, _), (b, _) in itertools.pairwise(changes):
        assert (b - a) * 30 >= cooldown
        assert b - a >= windows
    # The ratio walks monotonically in one direction.
    ps = [start[0]] + [o.prefill for o in outcomes]
    assert ps == sorted(ps) or ps == sorted(ps, reverse=True)


def _rank(o: ratio.Outcome) -> int:
    a = o.decision.action
    return 1 if a in ("ShiftToPrefill", "AddPrefill") else -1 if a in ("ShiftToDecode", "AddDecode") else 0


@settings(max_examples=200, deadline=None)
@given(
    spec_kw=specs(),
    load=loads(),
    pick=st.integers(0, 10_000),
    more_ttft=st.floats(0, 20),
    more_queue=st.floats(0, 2e6),
    streak=st.integers(0, 5),
    direction=st.sampled_from([None, "prefill", "decode"]),
)
def test_more_prefill_pressure_never_yields_a_move_toward_decode(
    spec_kw: dict[str, Any],
    load: dict[str, Any],
    pick: int,
    more_ttft: float,
    more_queue: float,
    streak: int,
    direction: ratio.Direction | None,
) -> None:
    spec = samples.spec(**spec_kw)
    pairs = bounds.feasible_pairs(_limits(spec_kw))
    current = pairs[pick % len(pairs)]
    state = ratio.RatioState(direction=direction, streak=streak)
    base = samples.load(current, **load)
    more = samples.load(
        current, **(load | {"ttft_s": load["ttft_s"] + more_ttft, "pe_queue": load["pe_queue"] + more_queue})
    )
    o_base, _ = ratio.decide(spec, current, base, state, T0)
    o_more, _ = ratio.decide(spec, current, more, state, T0)
    assert _rank(o_more) >= min(_rank(o_base), 0)
    if _rank(o_base) == 1:
        assert o_more.decision.action in ("ShiftToPrefill", "AddPrefill")
    assert not (_rank(o_more) == -1 and _rank(o_base) != -1)


@settings(max_examples=150, deadline=None)
@given(
    spec_kw=specs(),
    load=loads(),
    pick=st.integers(0, 10_000),
    streak=st.integers(0, 10),
    hole=st.sampled_from(["problem", "queue", "hbm", "no-decode", "no-prefill"]),
)
def test_no_action_on_missing_telemetry(
    spec_kw: dict[str, Any], load: dict[str, Any], pick: int, streak: int, hole: str
) -> None:
    spec = samples.spec(**spec_kw)
    pairs = bounds.feasible_pairs(_limits(spec_kw))
    current = pairs[pick % len(pairs)]
    s = samples.load(current, **load)
    engines = list(s.engines)
    if hole == "problem":
        s = telemetry.TelemetrySample(s.taken_at, s.window_s, s.nodes, s.engines, ("series stale",))
    elif hole == "queue":
        engines[0] = telemetry.EngineSample(pod="pe-0", node="n-p0", role="prefill")
    elif hole == "hbm":
        engines[-1] = telemetry.EngineSample(pod="de-x", node="n-d0", role="decode", queued_tokens=0)
    else:
        role = "decode" if hole == "no-decode" else "prefill"
        engines = [e for e in engines if e.role != role]
    if hole != "problem":
        s = telemetry.TelemetrySample(s.taken_at, s.window_s, s.nodes, tuple(engines))
    state = ratio.RatioState(direction="prefill", streak=streak, last_change_at=T0 - dt.timedelta(hours=1))
    o, new_state = ratio.decide(spec, current, s, state, T0)
    assert o.decision.action == "HoldNoTelemetry"
    assert (o.prefill, o.decode) == current and not o.changed
    assert new_state.streak == 0 and new_state.last_change_at == state.last_change_at
