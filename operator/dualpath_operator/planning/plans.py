"""The Plan: everything one reconcile pass will write, as data. Built by :mod:`planning.planner`,
carried out by ``reconcile`` through ``k8s.apply``; tests inspect it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class PodDelete:
    """Delete an owned engine pod, and why (recorded in events and lastDecision)."""

    name: str
    reason: str


@dataclass(frozen=True)
class PodMetadataPatch:
    """Merge-patch an owned pod's labels/annotations (``None`` removes a key)."""

    name: str
    labels: dict[str, str | None] = field(default_factory=dict)
    annotations: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerAction:
    """A call to the central scheduler's admin API: drain a group, or switch its role in place."""

    kind: Literal["drain", "role"]
    group_id: str
    role: str | None = None


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """Writes of one pass, in the order reconcile performs them."""

    #: Manifests to server-side apply (config, services, scheduler, PDB, network policy, new pods).
    apply: tuple[dict[str, Any], ...] = ()
    #: Create-once Secret manifests (no data: the applier fills a fresh random token).
    create_secrets: tuple[dict[str, Any], ...] = ()
    patch_pods: tuple[PodMetadataPatch, ...] = ()
    delete_pods: tuple[PodDelete, ...] = ()
    #: The whole status to write (always computed whole, never patched piecemeal).
    status: dict[str, Any] = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    #: Admin API calls, made before the pod writes (a drain before its mark, a role switch before its label).
    scheduler_actions: tuple[SchedulerAction, ...] = ()
    #: Per-node usable storage-NIC capacity (bytes/s) to push to the scheduler (a rebalance tick).
    push_capacities: dict[str, float] | None = None
    #: The ratio planner's memory after this pass (kept in the operator's memory per cluster).
    ratio_state: Any = None
    #: (action, reason) counted in dualpath_operator_decisions_total when the pass changed something.
    decision: tuple[str, str] | None = None
    #: Seconds until this cluster should be reconciled again even if nothing changes (None: resync only).
    requeue_after_s: float | None = None
