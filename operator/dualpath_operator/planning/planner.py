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
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import engines, observed, plans, status
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
    #: Draining pods the scheduler reports idle (no request in flight).
    idle: frozenset[str] = field(default_factory=frozenset)


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


def plan(view: View) -> plans.Plan:
    spec, ref = view.spec, view.ref
    config_hash, children = manifests.static_children(ref, spec)
    want = desired_counts(spec, view.previous)
    hashes = {role: manifests.engine_template_hash(ref, spec, role, config_hash) for role in engines.ROLES}
    ep = engines.plan_engines(
        view.observed.pods,
        want,  # type: ignore[arg-type]  # keys are exactly the two roles
        hashes,
        view.now,
        drain_timeout_s=view.drain_timeout_s,
        idle=view.idle,
    )
    new_pods = [manifests.engine_pod(ref, spec, role, ordinal, config_hash) for role, ordinal in ep.create]
    stamp = view.now.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    patches = tuple(
        plans.PodMetadataPatch(name=n, annotations={labels.DRAINING: stamp}) for n in ep.mark_draining
    )
    deletes = tuple(plans.PodDelete(name=n, reason=why) for n, why in ep.delete)
    new_status, events = status.compute(view, want, ep)
    requeue: float | None = None
    if ep.busy or not status.converged(view.observed, want, view.observed.scheduler):
        requeue = PROGRESS_REQUEUE_S
    secrets: tuple[dict[str, Any], ...] = ()
    if not view.observed.admin_secret_exists:
        secrets = (manifests.admin_secret(ref),)
    decision: tuple[str, str] | None = None
    if ep.create or ep.delete or ep.mark_draining:
        scaling = any(
            sum(1 for p in view.observed.pods if p.role == r and not p.terminating) != want[r]
            for r in engines.ROLES
        )
        decision = ("Scale" if scaling else "Replace", "SpecChange" if scaling else "TemplateChange")
    return plans.Plan(
        apply=(*children, *new_pods),
        create_secrets=secrets,
        patch_pods=patches,
        delete_pods=deletes,
        status=new_status,
        events=tuple(events),
        requeue_after_s=requeue,
        decision=decision,
    )
