"""PURE: the P/D ratio decision of one rebalance interval (``ratio.mode: Auto``).

``decide(spec, current, sample, state, now)`` weighs prefill pressure against decode pressure, each
a number where 1.0 means "at its objective":

* prefill: TTFT p90 / ``slo.ttftMs``; queued tokens per prefill group / beta (the paper's
  unfinished-token limit, per GPU times the group's GPUs);
* decode: TPOT p90 / ``slo.tpotMs``; HBM use / ``hbm_high``; queued tokens per decode group /
  ``decode_queue_tokens_per_gpu`` times the group's GPUs.

Without an SLO only the load signals count. The side whose pressure is above 1 and exceeds the other
by more than ``deadband`` is the direction; otherwise the cluster is balanced. A direction acts only
after ``stabilizationWindows`` consecutive intervals agree (the streak lives in :class:`RatioState`,
kept in memory by the operator: a restart only delays action), and not within ``cooldown`` of the
last ratio change. A move switches at most ``maxStep`` groups from the other role (P+D unchanged),
the number that best lowers the larger projected pressure (pressure scales with 1/groups); when no
switch helps (the other role at its minimum) it may add groups instead, within max and gpuBudget.
Every candidate is checked against :mod:`planning.bounds` (min/max, gpuBudget, validity bound);
a move cut short by a bound says so. Missing telemetry never moves the ratio; only a ratio outside
its limits (which needs no telemetry) is brought to the nearest allowed one (``ClampedToBounds``).

Called by :mod:`planning.planner` (Auto mode), the preview CLI and the simulator.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import common
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import bounds, telemetry

Direction = Literal["prefill", "decode"]

#: Decision actions (UpperCamelCase). ``CHANGES`` are the ones that change the ratio.
HOLD = "Hold"
HOLD_NO_TELEMETRY = "HoldNoTelemetry"
HOLD_CONVERGING = "HoldConverging"
HOLD_STABILIZING = "HoldStabilizing"
HOLD_COOLDOWN = "HoldCooldown"
HOLD_AT_BOUNDS = "HoldAtBounds"
SHIFT_TO_PREFILL = "ShiftToPrefill"
SHIFT_TO_DECODE = "ShiftToDecode"
ADD_PREFILL = "AddPrefill"
ADD_DECODE = "AddDecode"
CLAMPED_TO_BOUNDS = "ClampedToBounds"
CHANGES = frozenset({SHIFT_TO_PREFILL, SHIFT_TO_DECODE, ADD_PREFILL, ADD_DECODE, CLAMPED_TO_BOUNDS})


class RatioParams(BaseModel):
    """Thresholds and hardware figures of the ratio planner (operator settings, not the CR)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta_tokens_per_gpu: float = Field(
        20000.0,
        gt=0,
        description="Queued prefill tokens one GPU clears in about 5 s (the paper's beta); pressure 1 there.",
    )
    decode_queue_tokens_per_gpu: float = Field(
        200000.0, gt=0, description="Queued decode tokens per GPU at which decode pressure is 1."
    )
    hbm_high: float = Field(
        0.9, gt=0, le=1, description="KV memory (HBM) use fraction at which decode pressure is 1."
    )
    deadband: float = Field(
        0.2,
        ge=0,
        le=10,
        description="How much one side's pressure must exceed the other's before the ratio moves.",
    )
    allow_growth: bool = Field(
        True, description="Add groups (within max and gpuBudget) when switching one cannot help."
    )
    enforce_validity_bound: bool = Field(True, description="Keep P/D within the paper's eq. 9.")
    cnic_gbps: float = Field(400.0, gt=0, description="Line rate of one compute NIC (B), Gbit/s.")
    memory_bytes_per_s: float = Field(
        500e9, gt=0, description="Host memory bandwidth of an engine node (M), bytes/s."
    )
    interval_slack: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="A sample counts as a new interval once taken (1 - slack) * interval after the last one.",
    )


@dataclass(frozen=True)
class RatioState:
    """What the planner remembers between intervals (in memory; lost on restart, which only delays)."""

    #: Direction the last counted intervals agreed on, and for how many consecutive intervals.
    direction: Direction | None = None
    streak: int = 0
    #: ``taken_at`` of the last sample that counted as an interval.
    last_counted_at: dt.datetime | None = None
    #: When this planner last changed the ratio.
    last_change_at: dt.datetime | None = None


@dataclass(frozen=True)
class Outcome:
    """A decision and the ratio it leaves: ``(prefill, decode)`` is the desired ratio afterwards."""

    decision: api_status.Decision
    prefill: int
    decode: int

    @property
    def changed(self) -> bool:
        return self.decision.action in CHANGES


@dataclass(frozen=True)
class Pressure:
    """Normalised pressures (1.0 = at the objective) and the numbers behind them."""

    prefill: float
    decode: float
    inputs: dict[str, str]


def due(
    spec: api.DualPathClusterSpec,
    state: RatioState,
    sample: telemetry.TelemetrySample,
    params: RatioParams | None = None,
) -> bool:
    """Whether ``sample`` starts a new rebalance interval, so :func:`decide` counts it. A caller that
    runs more often than ``spec.rebalance.interval`` calls :func:`decide` only when this is true."""
    return _due(spec, state, sample, params or RatioParams())


def last_change_from_status(decision: api_status.Decision | None) -> dt.datetime | None:
    """``status.lastDecision.time`` when that decision changed the ratio, else ``None``: the
    ``last_change`` argument of :func:`decide` after an operator restart."""
    if decision is None or decision.action not in CHANGES:
        return None
    return decision.time


def pressure(
    spec: api.DualPathClusterSpec, sample: telemetry.TelemetrySample, params: RatioParams
) -> Pressure | list[str]:
    """The prefill and decode pressures of ``sample``, or the list of what is missing."""
    missing = list(sample.problems)
    pes, des = sample.engines_of("prefill"), sample.engines_of("decode")
    if not pes:
        missing.append("no prefill engine sample")
    if not des:
        missing.append("no decode engine sample")
    missing += [f"{e.pod}: queued_tokens" for e in (*pes, *des) if not _ok(e.queued_tokens)]
    missing += [f"{e.pod}: hbm_used_ratio" for e in des if not _ok(e.hbm_used_ratio)]
    slo = spec.rebalance.slo
    if slo is not None:
        missing += _latency_missing(pes, "ttft_p90_s") + _latency_missing(des, "tpot_p90_s")
    if missing:
        return missing
    g_p, g_d = spec.prefill.gpus_per_pod, spec.decode.gpus_per_pod
    q_pe = sum(_v(e.queued_tokens) for e in pes) / len(pes)
    q_de = sum(_v(e.queued_tokens) for e in des) / len(des)
    hbm = max(_v(e.hbm_used_ratio) for e in des)
    p_parts = {"prefillQueue": q_pe / (params.beta_tokens_per_gpu * g_p)}
    d_parts = {
        "decodeQueue": q_de / (params.decode_queue_tokens_per_gpu * g_d),
        "hbm": hbm / params.hbm_high,
    }
    inputs = {
        "queuedTokensPerPrefillGroup": f"{q_pe:.0f}",
        "betaTokensPerPrefillGroup": f"{params.beta_tokens_per_gpu * g_p:.0f}",
        "queuedTokensPerDecodeGroup": f"{q_de:.0f}",
        "hbmUsedMax": f"{hbm:.3f}",
    }
    rq = [e.read_queue_tokens for e in sample.engines if _ok(e.read_queue_tokens)]
    if rq:
        inputs["readQueueTokensMax"] = f"{max(_v(r) for r in rq):.0f}"
    if slo is not None:
        ttft = _mean([e.ttft_p90_s for e in pes])
        tpot = _mean([e.tpot_p90_s for e in des])
        d_parts["tpot"] = tpot / (slo.tpot_ms / 1000)
        if hbm >= params.hbm_high:
            # TTFT counts from arrival and a request is bound only once a decode engine has memory for it:
            # with decode memory full, a long TTFT is decode pressure, not a lack of prefill groups.
            inputs["ttftDiscounted"] = "decode KV memory is full: TTFT includes waiting for decode memory"
        else:
            p_parts["ttft"] = ttft / (slo.ttft_ms / 1000)
        inputs |= {
            "ttftP90Ms": f"{ttft * 1000:.1f}",
            "ttftSloMs": str(slo.ttft_ms),
            "tpotP90Ms": f"{tpot * 1000:.1f}",
            "tpotSloMs": str(slo.tpot_ms),
        }
    p, d = max(p_parts.values()), max(d_parts.values())
    inputs |= {
        "prefillPressure": f"{p:.3f} ({_top(p_parts)})",
        "decodePressure": f"{d:.3f} ({_top(d_parts)})",
    }
    return Pressure(prefill=p, decode=d, inputs=inputs)


def direction(p: Pressure, params: RatioParams) -> Direction | None:
    """Which role needs groups: the one above 1 that exceeds the other by more than ``deadband``."""
    if p.prefill > 1.0 and p.prefill - p.decode > params.deadband:
        return "prefill"
    if p.decode > 1.0 and p.decode - p.prefill > params.deadband:
        return "decode"
    return None


def decide(
    spec: api.DualPathClusterSpec,
    current: tuple[int, int],
    sample: telemetry.TelemetrySample,
    state: RatioState,
    now: dt.datetime,
    *,
    last_change: dt.datetime | None = None,
    params: RatioParams | None = None,
) -> tuple[Outcome, RatioState]:
    """One interval's ratio decision. ``current`` is the (prefill, decode) the operator converges to
    now (``planner.desired_counts``, not the ready counts: while the sample's engines differ from it
    the decision is ``HoldConverging``);
    ``last_change`` is the time of the last ratio change known outside memory (status.lastDecision
    when its action changed the ratio); the later of it and ``state.last_change_at`` starts the
    cooldown. Pure: the same inputs always give the same outputs."""
    params = params or RatioParams()
    p_now, d_now = current
    shape = bounds.shape_from_spec(
        spec, cnic_gbps=params.cnic_gbps, memory_bytes_per_s=params.memory_bytes_per_s
    )
    limits = bounds.limits_from_spec(spec, shape, enforce_bound=params.enforce_validity_bound)
    base = {"current": api_status.format_ratio(p_now, d_now)}
    if limits.bound is not None:
        base["validityBound"] = limits.bound.describe()
    base |= {f"note{i}": n for i, n in enumerate(limits.notes)}

    def out(
        action: str, reason: str, inputs: dict[str, str], new: tuple[int, int], st: RatioState
    ) -> tuple[Outcome, RatioState]:
        ins = {**base, **inputs}
        if new != current:
            ins["desired"] = api_status.format_ratio(*new)
        decision = api_status.Decision(time=now, action=action, reason=reason[:1024], inputs=_cap(ins))
        return Outcome(decision, new[0], new[1]), st

    found = pressure(spec, sample, params)
    problems = limits.violations(p_now, d_now)
    target = bounds.nearest_feasible(limits, p_now, d_now) if problems else None
    if target is not None and target != current:
        # Limits need no telemetry: a ratio outside them is corrected even while telemetry is out.
        moved = RatioState(last_change_at=now)
        return out(
            CLAMPED_TO_BOUNDS,
            "current ratio breaks its limits (" + "; ".join(problems) + "): moved to the nearest allowed",
            {} if isinstance(found, list) else dict(found.inputs),
            target,
            moved,
        )
    if isinstance(found, list):
        reset = RatioState(last_counted_at=state.last_counted_at, last_change_at=state.last_change_at)
        return out(
            HOLD_NO_TELEMETRY,
            "telemetry incomplete, no ratio change: " + "; ".join(found),
            {},
            current,
            reset,
        )
    ins = dict(found.inputs)
    seen = (len(sample.engines_of("prefill")), len(sample.engines_of("decode")))
    if seen != current:
        reason = (
            f"sample covers {seen[0]}P:{seen[1]}D, cluster runs {p_now}P:{d_now}D: waiting for the "
            "last change to settle"
        )
        return out(HOLD_CONVERGING, reason, ins, current, RatioState(last_change_at=state.last_change_at))
    if not _due(spec, state, sample, params):
        return out(HOLD, "sample within the interval already counted", ins, current, state)

    want = direction(found, params)
    streak = state.streak + 1 if want is not None and want == state.direction else (1 if want else 0)
    st = RatioState(
        direction=want, streak=streak, last_counted_at=sample.taken_at, last_change_at=state.last_change_at
    )
    ins["streak"] = f"{streak}/{spec.rebalance.stabilization_windows}"
    if want is None:
        return out(HOLD, _balanced_reason(found, params), ins, current, st)
    if streak < spec.rebalance.stabilization_windows:
        reason = (
            f"{want} pressure for {streak} of {spec.rebalance.stabilization_windows} intervals: waiting "
            "for it to hold"
        )
        return out(HOLD_STABILIZING, reason, ins, current, st)
    changed_at = max((t for t in (last_change, state.last_change_at) if t is not None), default=None)
    cooldown = common.parse_duration(spec.rebalance.cooldown)
    if changed_at is not None and (now - changed_at).total_seconds() < cooldown:
        left = cooldown - (now - changed_at).total_seconds()
        ins["cooldownLeftS"] = f"{left:.0f}"
        reason = f"{want} pressure holds, but the last ratio change was under {spec.rebalance.cooldown} ago"
        return out(HOLD_COOLDOWN, reason, ins, current, st)

    move = _best_move(want, found, current, limits, spec.rebalance.max_step, params)
    if move is None:
        blocked = _blocked_reason(want, current, limits)
        return out(HOLD_AT_BOUNDS, f"{want} pressure holds but {blocked}", ins, current, st)
    action, new, why = move
    acted = RatioState(last_counted_at=sample.taken_at, last_change_at=now)
    return out(action, why, ins, new, acted)


def _best_move(
    want: Direction,
    p: Pressure,
    current: tuple[int, int],
    limits: bounds.Limits,
    max_step: int,
    params: RatioParams,
) -> tuple[str, tuple[int, int], str] | None:
    """The move toward ``want``: a role switch of k <= max_step groups minimising the larger projected
    pressure; else, if allowed, adding groups. ``None`` if no feasible move lowers the pressure."""
    pn, dn = current
    recv, give = (pn, dn) if want == "prefill" else (dn, pn)
    r_pr, g_pr = (p.prefill, p.decode) if want == "prefill" else (p.decode, p.prefill)
    wanted = min(max_step, max(1, math.ceil(r_pr * recv) - recv))
    worst_now = max(r_pr, g_pr)

    def pair(r: int, g: int) -> tuple[int, int]:
        return (r, g) if want == "prefill" else (g, r)

    best: tuple[float, int] | None = None
    cut_by: list[str] = []
    for k in range(1, max_step + 1):
        if give - k < 0:
            break
        if not limits.feasible(*pair(recv + k, give - k)):
            if k <= wanted:
                cut_by = limits.violations(*pair(recv + k, give - k))
            continue
        worst = max(r_pr * recv / (recv + k), g_pr * give / (give - k))
        if worst < worst_now - 1e-9 and (best is None or worst < best[0] - 1e-9):
            best = (worst, k)
    label = "prefill" if want == "prefill" else "decode"
    if best is not None:
        k = best[1]
        new = pair(recv + k, give - k)
        why = (
            f"{label} pressure {r_pr:.2f} over {g_pr:.2f} held for the stabilization windows: switch {k} "
            f"group(s) to {label} (projected larger pressure {best[0]:.2f})"
        )
        if k < wanted and cut_by:
            why += f"; clamped from {wanted} by " + "; ".join(cut_by)
        return (SHIFT_TO_PREFILL if want == "prefill" else SHIFT_TO_DECODE), new, why
    if not params.allow_growth:
        return None
    for k in range(min(max_step, wanted), 0, -1):
        new = pair(recv + k, give)
        if limits.feasible(*new):
            why = (
                f"{label} pressure {r_pr:.2f} over {g_pr:.2f} held, and switching groups would not lower "
                f"it: add {k} {label} group(s) within max and gpuBudget"
            )
            if k < wanted:
                why += f"; clamped from {wanted} by " + "; ".join(
                    limits.violations(*pair(recv + wanted, give))
                )
            return (ADD_PREFILL if want == "prefill" else ADD_DECODE), new, why
    return None


def _blocked_reason(want: Direction, current: tuple[int, int], limits: bounds.Limits) -> str:
    pn, dn = current
    switch = (pn + 1, dn - 1) if want == "prefill" else (pn - 1, dn + 1)
    add = (pn + 1, dn) if want == "prefill" else (pn, dn + 1)
    why = limits.violations(*switch) or ["it would overload the other role"]
    why_add = limits.violations(*add) or ["growth is off"]
    return f"no allowed move: switching one group: {'; '.join(why)}; adding one: {'; '.join(why_add)}"


def _balanced_reason(p: Pressure, params: RatioParams) -> str:
    if p.prefill <= 1.0 and p.decode <= 1.0:
        return f"both roles within their objectives (prefill {p.prefill:.2f}, decode {p.decode:.2f})"
    return (
        f"pressures prefill {p.prefill:.2f} and decode {p.decode:.2f} differ by at most the deadband "
        f"{params.deadband:.2f}"
    )


def _due(
    spec: api.DualPathClusterSpec,
    state: RatioState,
    sample: telemetry.TelemetrySample,
    params: RatioParams,
) -> bool:
    if state.last_counted_at is None:
        return True
    interval = common.parse_duration(spec.rebalance.interval)
    elapsed = (sample.taken_at - state.last_counted_at).total_seconds()
    return elapsed >= (1 - params.interval_slack) * interval


def _latency_missing(engines: Sequence[telemetry.EngineSample], attr: str) -> list[str]:
    """A latency is missing when no engine of the role reports it while the role has queued work
    (an idle role has nothing to measure and no latency pressure)."""
    if any(_ok(getattr(e, attr)) for e in engines):
        return []
    if all(_v(e.queued_tokens) == 0 for e in engines if _ok(e.queued_tokens)):
        return []
    return [f"{attr} (work is queued but no engine reports it)"]


def _mean(values: Sequence[float | None]) -> float:
    got = [_v(v) for v in values if _ok(v)]
    return sum(got) / len(got) if got else 0.0


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v >= 0


def _v(v: float | None) -> float:
    return v if v is not None else 0.0


def _top(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items()))


def _cap(inputs: dict[str, str]) -> dict[str, str]:
    """Decision.inputs allows 64 entries; values are kept short."""
    return {k: v[:256] for k, v in list(inputs.items())[:64]}
