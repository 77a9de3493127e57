"""The P/D ratio decision, rule by rule: pressure, hysteresis, cooldown, max step, bounds, holds."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from dualpath_operator.planning import ratio
from tests.unit.planning import samples

pytestmark = pytest.mark.timeout(60)

T0 = samples.T0
INTERVAL = dt.timedelta(seconds=30)


def run(
    spec_kw: dict[str, Any],
    current: tuple[int, int],
    intervals: int,
    state: ratio.RatioState | None = None,
    *,
    last_change: dt.datetime | None = None,
    start: dt.datetime = T0,
    **load: Any,
) -> list[tuple[ratio.Outcome, ratio.RatioState]]:
    """``intervals`` decisions, one per interval, with the same per-engine signals; the ratio follows
    each decision (as if the operator applied it at once)."""
    spec = samples.spec(**spec_kw)
    state = state or ratio.RatioState()
    out = []
    for i in range(intervals):
        now = start + i * INTERVAL
        sample = samples.load(current, at=now, **load)
        outcome, state = ratio.decide(spec, current, sample, state, now, last_change=last_change)
        out.append((outcome, state))
        current = (outcome.prefill, outcome.decode)
    return out


def actions(seq: list[tuple[ratio.Outcome, ratio.RatioState]]) -> list[str]:
    return [o.decision.action for o, _ in seq]


def test_balanced_cluster_holds_with_reason_and_inputs() -> None:
    ((outcome, state),) = run({}, (2, 4), 1)
    d = outcome.decision
    assert (d.action, outcome.prefill, outcome.decode, outcome.changed) == ("Hold", 2, 4, False)
    assert "within their objectives" in d.reason
    assert d.time == T0
    assert d.inputs is not None
    assert d.inputs["ttftP90Ms"] == "1000.0" and d.inputs["ttftSloMs"] == "2000"
    assert d.inputs["current"] == "2P:4D"
    assert d.inputs["validityBound"] == "1/7 <= P/D <= 3.5"
    assert d.inputs["prefillPressure"].startswith("0.500")
    assert state.streak == 0 and state.direction is None


def test_prefill_pressure_shifts_a_group_after_the_stabilization_windows() -> None:
    seq = run({"windows": 3}, (2, 4), 3, ttft_s=3.0)
    assert actions(seq) == ["HoldStabilizing", "HoldStabilizing", "ShiftToPrefill"]
    assert [s.streak for _, s in seq[:2]] == [1, 2]
    last, state = seq[-1]
    assert (last.prefill, last.decode, last.changed) == (3, 3, True)
    assert last.decision.inputs is not None and last.decision.inputs["desired"] == "3P:3D"
    assert "switch 1 group(s) to prefill" in last.decision.reason
    assert state == ratio.RatioState(last_counted_at=T0 + 2 * INTERVAL, last_change_at=T0 + 2 * INTERVAL)


def test_decode_pressure_shifts_toward_decode() -> None:
    seq = run({"windows": 1}, (3, 3), 1, tpot_s=0.08)
    outcome, _ = seq[0]
    assert (outcome.decision.action, outcome.prefill, outcome.decode) == ("ShiftToDecode", 2, 4)


@pytest.mark.parametrize(
    ("load", "action"),
    [
        ({"hbm": 0.99, "tpot_s": 0.01}, "ShiftToDecode"),  # HBM nearly full
        ({"de_queue": 4e6}, "ShiftToDecode"),  # decode queue 2.5x
        ({"pe_queue": 4e5}, "ShiftToPrefill"),  # prefill queue 2.5x beta
        ({"ttft_s": 2.2, "tpot_s": 0.05}, "Hold"),  # 1.1 vs 1.0: inside the deadband
        ({"ttft_s": 2.6, "tpot_s": 0.04}, "ShiftToPrefill"),  # 1.3 vs 0.8: over it
        # 1.3 vs 1.02: over it, but taking a decode group would push decode to 1.53: add one instead.
        ({"ttft_s": 2.6, "tpot_s": 0.051}, "AddPrefill"),
        ({"ttft_s": 1.9, "tpot_s": 0.01, "pe_queue": 0}, "Hold"),  # nothing over its objective
    ],
)
def test_which_signal_moves_the_ratio(load: dict[str, Any], action: str) -> None:
    ((outcome, _),) = run({"windows": 1}, (3, 3), 1, **load)
    assert outcome.decision.action == action


def test_without_slo_latency_is_ignored_and_load_decides() -> None:
    ((held, _),) = run({"windows": 1, "slo": None}, (3, 3), 1, ttft_s=30.0)
    assert held.decision.action == "Hold"
    assert held.decision.inputs is not None and "ttftP90Ms" not in held.decision.inputs
    ((moved, _),) = run({"windows": 1, "slo": None}, (3, 3), 1, pe_queue=4e5)
    assert moved.decision.action == "ShiftToPrefill"


def test_direction_flip_and_missing_telemetry_reset_the_streak() -> None:
    spec = samples.spec(windows=2)
    st = ratio.RatioState()
    _, st = ratio.decide(spec, (3, 3), samples.load((3, 3), ttft_s=3.0), st, T0)
    assert (st.direction, st.streak) == ("prefill", 1)
    at = T0 + INTERVAL
    _, st = ratio.decide(spec, (3, 3), samples.load((3, 3), tpot_s=0.1, at=at), st, at)
    assert (st.direction, st.streak) == ("decode", 1)
    at += INTERVAL
    o, st = ratio.decide(spec, (3, 3), samples.load((3, 3), tpot_s=0.1, at=at, problems=("stale",)), st, at)
    assert o.decision.action == "HoldNoTelemetry" and st.streak == 0
    at += INTERVAL
    o, st = ratio.decide(spec, (3, 3), samples.load((3, 3), tpot_s=0.1, at=at), st, at)
    assert o.decision.action == "HoldStabilizing" and st.streak == 1


def test_cooldown_holds_then_allows_the_next_step() -> None:
    seq = run({"windows": 1, "cooldown": "2m", "max_step": 1}, (2, 4), 6, ttft_s=6.0)
    assert actions(seq) == [
        "ShiftToPrefill",  # t=0
        "HoldCooldown",
        "HoldCooldown",
        "HoldCooldown",
        "ShiftToPrefill",  # t=120s: cooldown over
        "HoldCooldown",
    ]
    assert [(o.prefill, o.decode) for o, _ in seq] == [(3, 3)] * 4 + [(4, 2)] * 2
    assert "last ratio change was under 2m ago" in seq[1][0].decision.reason


def test_stabilization_restarts_after_a_change() -> None:
    seq = run({"windows": 2, "cooldown": "30s"}, (2, 4), 5, ttft_s=6.0)
    assert actions(seq) == [
        "HoldStabilizing",
        "ShiftToPrefill",
        "HoldStabilizing",
        "ShiftToPrefill",
        "HoldStabilizing",
    ]


def test_cooldown_from_status_last_decision() -> None:
    ((o, _),) = run({"windows": 1}, (2, 4), 1, last_change=T0 - dt.timedelta(minutes=1), ttft_s=6.0)
    assert o.decision.action == "HoldCooldown"
    assert o.decision.inputs is not None and o.decision.inputs["cooldownLeftS"] == "240"
    ((o, _),) = run({"windows": 1}, (2, 4), 1, last_change=T0 - dt.timedelta(minutes=6), ttft_s=6.0)
    assert o.decision.action == "ShiftToPrefill"


def test_max_step_bounds_the_move_and_the_best_count_is_taken() -> None:
    ((o, _),) = run({"windows": 1, "max_step": 3}, (2, 4), 1, ttft_s=4.0)  # prefill 2.0, decode 0.56
    assert (o.prefill, o.decode) == (4, 2)  # k=2 gives max(1.0, 1.11); k=3 would overload decode
    ((o, _),) = run({"windows": 1, "max_step": 1}, (2, 4), 1, ttft_s=4.0)
    assert (o.prefill, o.decode) == (3, 3)


def test_move_cut_short_by_the_role_minimum_says_so() -> None:
    ((o, _),) = run({"windows": 1, "max_step": 2}, (2, 2), 1, ttft_s=6.0)
    assert (o.decision.action, o.prefill, o.decode) == ("ShiftToPrefill", 3, 1)
    assert "clamped from 2 by decode 0 outside [1, 8]" in o.decision.reason


def test_growth_clamped_by_the_validity_bound() -> None:
    ((o, _),) = run({"windows": 1, "max_step": 2}, (1, 6), 1, tpot_s=0.15)
    assert (o.decision.action, o.prefill, o.decode) == ("AddDecode", 1, 7)
    assert "P/D = 1/8 outside the validity bound 1/7 <= P/D <= 3.5" in o.decision.reason


def test_growth_when_the_other_role_is_at_its_minimum() -> None:
    ((o, _),) = run({"windows": 1, "decode": (4, 8)}, (2, 4), 1, ttft_s=3.0)
    assert (o.decision.action, o.prefill, o.decode) == ("AddPrefill", 3, 4)


def test_no_allowed_move_holds_at_bounds_naming_them() -> None:
    ((o, _),) = run({"windows": 1, "decode": (4, 8), "budget": 48}, (2, 4), 1, ttft_s=3.0)
    assert (o.decision.action, o.prefill, o.decode) == ("HoldAtBounds", 2, 4)
    assert "decode 3 outside [4, 8]" in o.decision.reason
    assert "56 GPUs over gpuBudget 48" in o.decision.reason
    ((o, _),) = run({"windows": 1, "prefill": (1, 3)}, (3, 1), 1, ttft_s=3.0)
    assert o.decision.action == "HoldAtBounds"


def test_current_ratio_outside_the_bounds_is_clamped() -> None:
    ((o, st),) = run({}, (4, 1), 1)
    assert (o.decision.action, o.prefill, o.decode) == ("ClampedToBounds", 3, 1)
    assert "outside the validity bound" in o.decision.reason
    assert st.last_change_at == T0


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        ({"problems": ("prometheus: connection refused",)}, "connection refused"),
        ({"hbm": None}, "de-0: hbm_used_ratio"),
        ({"tpot_s": None}, "tpot_p90_s (work is queued"),
    ],
)
def test_missing_telemetry_never_moves_the_ratio(change: dict[str, Any], missing: str) -> None:
    ((o, st),) = run({"windows": 1}, (2, 4), 1, ttft_s=10.0, **change)
    assert (o.decision.action, o.prefill, o.decode, o.changed) == ("HoldNoTelemetry", 2, 4, False)
    assert missing in o.decision.reason
    assert st.streak == 0


def test_engine_without_queue_signal_or_without_a_role_is_missing() -> None:
    spec = samples.spec(windows=1)
    base = samples.load((1, 1), ttft_s=10.0)
    pe = dataclasses.replace(base.engines[0], queued_tokens=None)
    o, _ = ratio.decide(
        spec, (1, 1), dataclasses.replace(base, engines=(pe, base.engines[1])), ratio.RatioState(), T0
    )
    assert o.decision.action == "HoldNoTelemetry" and "pe-0: queued_tokens" in o.decision.reason
    o, _ = ratio.decide(
        spec, (1, 1), dataclasses.replace(base, engines=base.engines[:1]), ratio.RatioState(), T0
    )
    assert "no decode engine sample" in o.decision.reason


def test_idle_role_without_latency_is_not_missing() -> None:
    ((o, _),) = run({"windows": 1}, (2, 4), 1, ttft_s=None, pe_queue=0)
    assert o.decision.action == "Hold"


def test_sample_from_a_different_ratio_waits_for_convergence() -> None:
    spec = samples.spec(windows=1)
    o, st = ratio.decide(spec, (3, 3), samples.load((2, 4), ttft_s=9.0), ratio.RatioState(streak=5), T0)
    assert (o.decision.action, o.prefill, o.decode) == ("HoldConverging", 3, 3)
    assert st.streak == 0


def test_a_second_call_within_the_interval_does_not_count() -> None:
    spec = samples.spec(windows=2)
    sample = samples.load((2, 4), ttft_s=3.0)
    _, st = ratio.decide(spec, (2, 4), sample, ratio.RatioState(), T0)
    assert ratio.due(spec, st, sample) is False
    o, st2 = ratio.decide(spec, (2, 4), sample, st, T0 + dt.timedelta(seconds=5))
    assert o.decision.action == "Hold" and st2 == st
    later = dataclasses.replace(sample, taken_at=T0 + dt.timedelta(seconds=28))  # within 10 % slack
    assert ratio.due(spec, st, later)
    o, _ = ratio.decide(spec, (2, 4), later, st, T0 + dt.timedelta(seconds=28))
    assert o.decision.action == "ShiftToPrefill"


def test_decision_is_a_valid_status_value() -> None:
    ((o, _),) = run({"windows": 1, "max_step": 2}, (2, 2), 1, ttft_s=6.0)
    from dualpath_operator.api.v1alpha1 import status as api_status

    body = o.decision.model_dump(mode="json", by_alias=True)
    assert api_status.Decision.model_validate(body) == o.decision
    assert all(isinstance(v, str) for v in (o.decision.inputs or {}).values())


def test_last_change_from_status_only_counts_changes() -> None:
    ((moved, _),) = run({"windows": 1}, (2, 4), 1, ttft_s=6.0)
    ((held, _),) = run({"windows": 1}, (2, 4), 1)
    assert ratio.last_change_from_status(moved.decision) == T0
    assert ratio.last_change_from_status(held.decision) is None
    assert ratio.last_change_from_status(None) is None


def test_a_long_ttft_with_decode_memory_full_is_not_read_as_prefill_pressure() -> None:
    # Requests bind only once a decode engine has memory: with decode KV memory full, TTFT grows because
    # of decode, and adding prefill groups would make it worse (found with the simulator, bench/sim).
    seq = run({"windows": 1}, (3, 3), 1, ttft_s=3.0, hbm=0.99)
    outcome, _ = seq[0]
    assert outcome.decision.action == "ShiftToDecode"
    assert outcome.decision.inputs is not None and "ttftDiscounted" in outcome.decision.inputs
    plain = run({"windows": 1}, (3, 3), 1, ttft_s=3.0, hbm=0.5)
    assert plain[0][0].decision.action == "ShiftToPrefill"
