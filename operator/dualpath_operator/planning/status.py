"""PURE: the whole status of a DualPathCluster from one pass's view and pod plan, plus the events of
the transitions it contains (a condition flipping, engine groups created or deleted).

Status is recomputed whole every pass; fields that did not change keep their old values
(``lastTransitionTime`` moves only on a flip, ``lastDecision`` only when a new decision is taken), so an
unchanged world yields a byte-identical status and the applier writes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dualpath_operator.api import conditions as cond
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import engines, observed, plans, rebalance
from dualpath_operator.rendering import engine_config

if TYPE_CHECKING:
    from dualpath_operator.planning.planner import View

C, S, R = cond.ConditionType, cond.ConditionStatus, cond.Reason

# Condition flips that deserve an event: (type, new status) -> event type.
_FLIP_EVENTS: dict[tuple[cond.ConditionType, cond.ConditionStatus], plans.EventType] = {
    (C.READY, S.TRUE): "Normal",
    (C.READY, S.FALSE): "Warning",
    (C.DEGRADED, S.TRUE): "Warning",
    (C.DEGRADED, S.FALSE): "Normal",
    (C.TELEMETRY_AVAILABLE, S.FALSE): "Warning",
    (C.TELEMETRY_AVAILABLE, S.TRUE): "Normal",
    (C.RDMA_READY, S.FALSE): "Warning",
    (C.REBALANCING, S.TRUE): "Normal",
}


def converged(obs: observed.Observed, want: dict[str, int], sched: observed.ObservedScheduler) -> bool:
    for role in engines.ROLES:
        pods = [p for p in obs.pods if p.role == role and not p.terminating]
        if len(pods) != want[role] or not all(p.ready for p in pods):
            return False
    return sched.exists and sched.ready_replicas >= 1


def _role_status(obs: observed.Observed, role: str) -> api_status.RoleStatus:
    pods = [p for p in obs.pods if p.role == role and not p.terminating]
    return api_status.RoleStatus(replicas=len(pods), ready=sum(1 for p in pods if p.ready))


def _unschedulable_message(obs: observed.Observed) -> str | None:
    stuck = [p for p in obs.pods if p.unschedulable and not p.terminating]
    if not stuck:
        return None
    parts = [f"{p.name} ({p.role}): {p.unschedulable}" for p in stuck]
    return "engine pods cannot be scheduled: " + "; ".join(parts)


def _nic_missing(message: str | None, spec_nics: tuple[str, ...]) -> bool:
    return message is not None and any(n in message for n in spec_nics)


@dataclass
class _Facts:
    """What the conditions are computed from."""

    want: dict[str, int]
    have: dict[str, int]
    prefill: api_status.RoleStatus
    decode: api_status.RoleStatus
    desired: str
    sched_ready: bool
    engines_ready: bool
    unschedulable: str | None
    failed: list[str]


def _facts(obs: observed.Observed, want: dict[str, int]) -> _Facts:
    p, d = _role_status(obs, "prefill"), _role_status(obs, "decode")
    return _Facts(
        want=want,
        have={"prefill": p.replicas, "decode": d.replicas},
        prefill=p,
        decode=d,
        desired=api_status.format_ratio(want["prefill"], want["decode"]),
        sched_ready=obs.scheduler.exists and obs.scheduler.ready_replicas >= 1,
        engines_ready=p.ready == want["prefill"] and d.ready == want["decode"],
        unschedulable=_unschedulable_message(obs),
        failed=sorted(p.name for p in obs.pods if p.phase == "Failed" and not p.terminating),
    )


Setter = Callable[[cond.ConditionType, cond.ConditionStatus, cond.Reason, str], None]


def _health(put: Setter, f: _Facts, ep: engines.EnginePlan) -> None:
    """Degraded, Ready and Progressing."""
    if f.unschedulable is not None:
        put(C.DEGRADED, S.TRUE, R.UNSCHEDULABLE, f.unschedulable)
    elif f.failed:
        put(C.DEGRADED, S.TRUE, R.ENGINE_FAILED, f"engine pods failed: {', '.join(f.failed)}")
    else:
        put(C.DEGRADED, S.FALSE, R.AS_EXPECTED, "no problem detected")

    if f.sched_ready and f.engines_ready and not ep.busy:
        put(C.READY, S.TRUE, R.ALL_READY, f"scheduler and {f.desired} engine groups ready")
    elif not f.sched_ready:
        put(C.READY, S.FALSE, R.SCHEDULER_NOT_READY, "the scheduler has no ready replica")
    else:
        ready = api_status.format_ratio(f.prefill.ready, f.decode.ready)
        put(C.READY, S.FALSE, R.ENGINES_NOT_READY, f"ready {ready} of desired {f.desired}")

    have = api_status.format_ratio(f.have["prefill"], f.have["decode"])
    if any(f.have[r] < f.want[r] for r in engines.ROLES):
        put(C.PROGRESSING, S.TRUE, R.SCALING_UP, f"{have} -> {f.desired}")
    elif any(f.have[r] > f.want[r] for r in engines.ROLES):
        put(C.PROGRESSING, S.TRUE, R.SCALING_DOWN, f"{have} -> {f.desired}")
    elif ep.busy:
        put(C.PROGRESSING, S.TRUE, R.ROLLING_OUT, "; ".join(ep.reasons) or "replacing outdated engine pods")
    elif not f.sched_ready or not f.engines_ready:
        put(C.PROGRESSING, S.TRUE, R.CREATING, "waiting for pods to become ready")
    else:
        put(C.PROGRESSING, S.FALSE, R.UP_TO_DATE, f"{f.desired} up to date")


def _telemetry_reason(problems: tuple[str, ...]) -> cond.Reason:
    text = " ".join(problems).lower()
    if "unreachable" in text or "refused" in text or "timeout" in text or "timed out" in text:
        return R.TELEMETRY_UNREACHABLE
    if "stale" in text:
        return R.TELEMETRY_STALE
    return R.TELEMETRY_INCOMPLETE


def _telemetry(put: Setter, view: View, conds: list[cond.Condition], tick: rebalance.Tick | None) -> None:
    if not view.spec.rebalance.enabled:
        put(
            C.TELEMETRY_AVAILABLE,
            S.UNKNOWN,
            R.DISABLED,
            "spec.rebalance.enabled is false: no telemetry is taken",
        )
    elif tick is not None and tick.sample.complete:
        s = tick.sample
        put(
            C.TELEMETRY_AVAILABLE,
            S.TRUE,
            R.TELEMETRY_FRESH,
            f"{len(s.nodes)} node(s), {len(s.engines)} engine group(s) over {s.window_s:.0f}s",
        )
    elif tick is not None:
        msg = "; ".join(tick.sample.problems)[:2000] + " (holding: no rebalancing action)"
        put(C.TELEMETRY_AVAILABLE, S.FALSE, _telemetry_reason(tick.sample.problems), msg)
    elif cond.find_condition(conds, C.TELEMETRY_AVAILABLE) is None:
        put(C.TELEMETRY_AVAILABLE, S.UNKNOWN, R.PENDING, "no telemetry sample taken yet")


def switching_pods(view: View, ep: engines.EnginePlan) -> list[str]:
    """Pods whose role label and scheduler role disagree (a switch in flight), plus switches planned now."""
    out = [n for n, _ in ep.switch]
    for p in view.observed.pods:
        g = view.observed.group_on(p.node)
        if g is not None and not p.terminating and (g.switching_to is not None or g.role != p.role):
            out.append(p.name)
    return sorted(set(out))


def _rebalancing(
    put: Setter, view: View, f: _Facts, ep: engines.EnginePlan, tick: rebalance.Tick | None
) -> None:
    """True while a ratio change is in flight in either mode (a Fixed count edit moves groups too)."""
    spec = view.spec
    switching = switching_pods(view, ep)
    moving = any(f.have[r] != f.want[r] for r in engines.ROLES)
    if switching:
        put(C.REBALANCING, S.TRUE, R.SWITCHING_ROLE, f"switching role in place: {', '.join(switching)}")
    elif moving and (ep.mark_draining or ep.waiting_drain):
        put(C.REBALANCING, S.TRUE, R.DRAINING, f"draining before moving to {f.desired}")
    elif moving:
        put(C.REBALANCING, S.TRUE, R.RECREATING, f"moving to {f.desired}")
    elif spec.ratio.mode is specs.RatioMode.FIXED:
        put(C.REBALANCING, S.FALSE, R.DISABLED, "spec.ratio.mode is Fixed: the ratio is not rebalanced")
    elif tick is not None and tick.outcome is not None and tick.outcome.decision.action == "HoldCooldown":
        put(C.REBALANCING, S.FALSE, R.COOLING_DOWN, tick.outcome.decision.reason)
    elif tick is not None and tick.outcome is not None:
        put(C.REBALANCING, S.FALSE, R.STABLE, f"{f.desired}: {tick.outcome.decision.reason}")
    elif cond.find_condition(view.previous.conditions or [], C.REBALANCING) is None:
        put(C.REBALANCING, S.UNKNOWN, R.PENDING, "the rebalancer has not evaluated this cluster yet")
    else:
        before = cond.find_condition(view.previous.conditions or [], C.REBALANCING)
        if before is not None and before.status is S.TRUE:
            put(C.REBALANCING, S.FALSE, R.STABLE, f"{f.desired} reached")


def _rdma(
    put: Setter, view: View, conds: list[cond.Condition], f: _Facts, tick: rebalance.Tick | None
) -> None:
    spec, obs = view.spec, view.observed
    nic_names = (spec.network.compute_nic.resource_name, spec.network.storage_nic.resource_name)
    live = [p for p in obs.pods if not p.terminating]
    problem = rebalance.transport_problem(tick.sample) if tick is not None else None
    verified = rebalance.verified_transport(tick.sample) if tick is not None else None
    before = cond.find_condition(conds, C.RDMA_READY)
    if _nic_missing(f.unschedulable, nic_names):
        put(C.RDMA_READY, S.FALSE, R.NIC_RESOURCES_MISSING, f.unschedulable or "")
    elif problem is not None:
        put(C.RDMA_READY, S.FALSE, R.KV_OVER_TCP, problem)
    elif verified is not None:
        put(C.RDMA_READY, S.TRUE, R.TRANSPORT_VERIFIED, verified)
    elif tick is None and before is not None and before.reason in (R.KV_OVER_TCP, R.TRANSPORT_VERIFIED):
        return  # between ticks the last measured verdict stands
    elif live and all(p.node for p in live):
        put(
            C.RDMA_READY,
            S.TRUE,
            R.NICS_ALLOCATED,
            "every engine pod was granted its compute and storage NICs",
        )
    else:
        put(C.RDMA_READY, S.UNKNOWN, R.PENDING, "engine pods are not all scheduled yet")


def _flip_events(prev: list[cond.Condition], conds: list[cond.Condition]) -> list[plans.Event]:
    events: list[plans.Event] = []
    for c in conds:
        before = cond.find_condition(prev, cond.ConditionType(c.type))
        if before is not None and before.status is c.status:
            continue
        if before is None and not (c.type == C.DEGRADED and c.status is S.TRUE):
            continue  # first observation: only a problem is news
        ev_type = _FLIP_EVENTS.get((cond.ConditionType(c.type), c.status))
        if ev_type is not None:
            events.append(plans.Event(ev_type, c.reason, f"{c.type}={c.status.value}: {c.message}"))
    return events


def _pod_events(ep: engines.EnginePlan) -> list[plans.Event]:
    events = [
        plans.Event("Normal", "EngineGroupSwitching", f"switching {n} to {r} in place") for n, r in ep.switch
    ]
    events += [
        plans.Event("Normal", "EngineGroupCreated", f"creating {r} engine group #{o}") for r, o in ep.create
    ]
    events += [
        plans.Event("Normal", "EngineGroupDraining", f"draining {n} before removal") for n in ep.mark_draining
    ]
    events += [plans.Event("Normal", "EngineGroupDeleted", f"deleting {n}: {why}") for n, why in ep.delete]
    return events


def _decision(
    view: View, f: _Facts, ep: engines.EnginePlan, tick: rebalance.Tick | None
) -> api_status.Decision | None:
    prev = view.previous.last_decision
    if tick is not None and tick.outcome is not None:
        d = tick.outcome.decision
        # A repeated Hold with the same reason is not news: keep the old entry (and spare a status write).
        if tick.outcome.changed or prev is None or (d.action, d.reason) != (prev.action, prev.reason):
            return d
        return prev
    if not (ep.create or ep.delete or ep.mark_draining or ep.switch):
        return prev
    scaling = any(f.have[r] != f.want[r] for r in engines.ROLES)
    return api_status.Decision(
        time=view.now.astimezone(dt.UTC).replace(microsecond=0),
        action="Scale" if scaling else "Replace",
        reason="; ".join(ep.reasons) or "converging",
        inputs={
            "mode": str(view.spec.ratio.mode),
            "desired": f.desired,
            "current": api_status.format_ratio(f.have["prefill"], f.have["decode"]),
        },
    )


def compute(
    view: View, want: dict[str, int], ep: engines.EnginePlan, tick: rebalance.Tick | None = None
) -> tuple[dict[str, Any], list[plans.Event]]:
    """Return (status as a camelCase dict, events)."""
    prev = list(view.previous.conditions or [])
    conds = prev

    def put(t: cond.ConditionType, s: cond.ConditionStatus, r: cond.Reason, msg: str) -> None:
        nonlocal conds
        conds = cond.set_condition(conds, t, s, r, msg, view.now, observed_generation=view.generation)

    f = _facts(view.observed, want)
    _health(put, f, ep)
    _rebalancing(put, view, f, ep, tick)
    _telemetry(put, view, conds, tick)
    _rdma(put, view, conds, f, tick)
    events = _flip_events(prev, conds) + _pod_events(ep)
    if tick is not None and tick.outcome is not None and tick.outcome.changed:
        d = tick.outcome.decision
        events.append(plans.Event("Normal", d.action, f"{d.reason} ({f.desired})"))
    new = api_status.DualPathClusterStatus(
        observed_generation=view.generation,
        conditions=conds,
        prefill=f.prefill,
        decode=f.decode,
        ratio=api_status.format_ratio(f.prefill.ready, f.decode.ready),
        desired_ratio=f.desired,
        scheduler=api_status.SchedulerStatus(
            endpoint=engine_config.scheduler_url(view.ref.name, view.ref.namespace, view.spec),
            ready=f.sched_ready,
        ),
        path_weights=tick.weights.path_weights() if tick is not None else view.previous.path_weights,
        last_decision=_decision(view, f, ep, tick),
    )
    return new.model_dump(by_alias=True, exclude_none=True, mode="json"), events
