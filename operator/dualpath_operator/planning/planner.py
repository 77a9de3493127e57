"""PURE: ``plan(view) -> Plan``, the whole decision of one reconcile pass.

It renders the desired children (:mod:`rendering.manifests`), decides pod actions
(:mod:`planning.engines`), picks the desired P/D counts (:func:`desired_counts`: ``Fixed`` takes the
spec's counts; ``Auto`` asks the rebalance planner, see :mod:`planning.ratio`), computes the whole
status (:mod:`planning.status`) and the events of transitions. No I/O, no clock: ``now`` is passed in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import rebalancing
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import engines, observed, plans, ratio, rebalance, status, telemetry
from dualpath_operator.rendering import labels, manifests

#: How often a converging cluster is looked at again even without a watch event.
PROGRESS_REQUEUE_S = 2.0


@dataclass(frozen=True)
class View:
    """Inputs of one pass."""

    ref: manifests.ClusterRef
    generation: int
    spec: api.DualPathClusterSpec
    observed: observed.Observed
    previous: api_status.DualPathClusterStatus
    now: dt.datetime
    drain_timeout_s: float = 30.0
    #: A telemetry sample when this pass is a rebalance tick, else None.
    sample: telemetry.TelemetrySample | None = None
    #: The ratio planner's memory from the previous tick (in memory; a restart starts afresh).
    ratio_state: ratio.RatioState = field(default_factory=ratio.RatioState)


def desired_counts(
    spec: api.DualPathClusterSpec, previous: api_status.DualPathClusterStatus
) -> dict[str, int]:
    """The P/D engine-group counts to converge to.

    Fixed: exactly ``spec.ratio.prefill``/``decode``. Auto: the last desired ratio the rebalancer
    recorded in status, clamped into the current bounds; on first sight ``spec.ratio.prefill``/``decode``
    if given (a starting point), else the bounds' minimums.
    """
    r = spec.ratio
    if r.mode is specs.RatioMode.FIXED and r.prefill is not None and r.decode is not None:
        return {"prefill": r.prefill, "decode": r.decode}
    p = r.prefill if r.prefill is not None else spec.prefill.min
    d = r.decode if r.decode is not None else spec.decode.min
    if previous.desired_ratio:
        with contextlib.suppress(ValueError):
            p, d = api_status.parse_ratio(previous.desired_ratio)
    p = min(max(p, spec.prefill.min), spec.prefill.max)
    d = min(max(d, spec.decode.min), spec.decode.max)
    return {"prefill": p, "decode": d}


def _idle(view: View) -> frozenset[str]:
    """Draining pods whose scheduler group is drained and has nothing in flight."""
    out = set()
    for p in view.observed.pods:
        g = view.observed.group_on(p.node)
        if p.draining_since is not None and g is not None and g.drained and g.in_flight == 0:
            out.add(p.name)
    return frozenset(out)


def _switchable(view: View) -> frozenset[str]:
    """Pods that may switch role in place: RoleSwitch mode and a group the scheduler knows, not switching."""
    if view.spec.rebalance.mode is not rebalancing.RebalanceMode.ROLE_SWITCH or view.observed.groups is None:
        return frozenset()
    out = set()
    for p in view.observed.pods:
        g = view.observed.group_on(p.node)
        if g is not None and g.switching_to is None and not p.terminating:
            out.add(p.name)
    return frozenset(out)


def _tick(view: View, current: dict[str, int]) -> rebalance.Tick | None:
    if view.sample is None or not view.spec.rebalance.enabled:
        return None
    return rebalance.step(
        view.spec,
        view.previous,
        (current["prefill"], current["decode"]),
        view.sample,
        view.ratio_state,
        view.now,
    )


def plan(view: View) -> plans.Plan:
    spec, ref = view.spec, view.ref
    config_hash, children = manifests.static_children(ref, spec)
    want = desired_counts(spec, view.previous)
    tick = _tick(view, want)
    if tick is not None and tick.outcome is not None:
        want = {"prefill": tick.outcome.prefill, "decode": tick.outcome.decode}
    hashes = {role: manifests.engine_template_hash(ref, spec, role, config_hash) for role in engines.ROLES}
    ep = engines.plan_engines(
        view.observed.pods,
        want,  # type: ignore[arg-type]  # keys are exactly the two roles
        hashes,
        view.now,
        drain_timeout_s=view.drain_timeout_s,
        idle=_idle(view),
        switchable=_switchable(view),
    )
    new_pods = [manifests.engine_pod(ref, spec, role, ordinal, config_hash) for role, ordinal in ep.create]
    stamp = view.now.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    by_name = {p.name: p for p in view.observed.pods}
    actions: list[plans.SchedulerAction] = []
    patches: list[plans.PodMetadataPatch] = []
    for name in ep.mark_draining:
        g = view.observed.group_on(by_name[name].node)
        if g is not None:
            actions.append(plans.SchedulerAction("drain", g.group_id))
        patches.append(plans.PodMetadataPatch(name=name, annotations={labels.DRAINING: stamp}))
    for name, role in ep.switch:
        g = view.observed.group_on(by_name[name].node)
        if g is not None:
            actions.append(plans.SchedulerAction("role", g.group_id, role))
            patches.append(plans.PodMetadataPatch(name=name, labels={labels.ROLE: role}))
    deletes = tuple(plans.PodDelete(name=n, reason=why) for n, why in ep.delete)
    new_status, events = status.compute(view, want, ep, tick)
    requeue: float | None = None
    if (
        ep.busy
        or status.switching_pods(view, ep)
        or not status.converged(view.observed, want, view.observed.scheduler)
    ):
        requeue = PROGRESS_REQUEUE_S
    secrets: tuple[dict[str, Any], ...] = ()
    if not view.observed.admin_secret_exists:
        secrets = (manifests.admin_secret(ref),)
    decision: tuple[str, str] | None = None
    if tick is not None and tick.outcome is not None and tick.outcome.changed:
        action = tick.outcome.decision.action
        decision = (action, "Bounds" if action == ratio.CLAMPED_TO_BOUNDS else "Telemetry")
    elif ep.create or ep.delete or ep.mark_draining:
        scaling = any(
            sum(1 for p in view.observed.pods if p.role == r and not p.terminating) != want[r]
            for r in engines.ROLES
        )
        decision = ("Scale" if scaling else "Replace", "SpecChange" if scaling else "TemplateChange")
    return plans.Plan(
        apply=(*children, *new_pods),
        create_secrets=secrets,
        patch_pods=tuple(patches),
        delete_pods=deletes,
        status=new_status,
        events=tuple(events),
        requeue_after_s=requeue,
        scheduler_actions=tuple(actions),
        push_capacities=tick.capacities() if tick is not None and not tick.weights.held else None,
        ratio_state=tick.ratio_state if tick is not None else view.ratio_state,
        decision=decision,
    )
