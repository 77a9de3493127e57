"""Frozen snapshots of the world that the pure planner reads.

``k8s.gather`` builds them from API objects; tests build them by hand. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class ObservedPod:
    """One engine pod owned by the cluster, as the API server last showed it."""

    name: str
    role: Role
    ordinal: int
    template_hash: str
    phase: str = "Pending"
    ready: bool = False
    node: str | None = None
    pod_ip: str | None = None
    terminating: bool = False
    #: Message of a PodScheduled=False/Unschedulable condition, if any.
    unschedulable: str | None = None
    #: ``dualpath.io/draining`` annotation value (RFC 3339 start time) when a drain is in progress.
    draining_since: str | None = None
    created: str | None = None


@dataclass(frozen=True)
class ObservedScheduler:
    """The scheduler Deployment's rollout state."""

    exists: bool = False
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    template_hash: str | None = None
    pod_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObservedGroup:
    """An engine group as the central scheduler reports it (admin API ``/admin/v1/status``)."""

    group_id: str
    node: str | None
    role: str
    drained: bool = False
    in_flight: int = 0
    #: Role the group is being switched to (drain, then flip in place), if any.
    switching_to: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything one reconcile pass knows about a DualPathCluster's children."""

    pods: tuple[ObservedPod, ...] = ()
    scheduler: ObservedScheduler = field(default_factory=ObservedScheduler)
    #: Names of owned objects that exist, per kind (``ConfigMap``, ``Service``, ``Secret`` ...).
    existing: frozenset[tuple[str, str]] = frozenset()
    #: The admin-token Secret exists (its value is never read into the plan).
    admin_secret_exists: bool = False
    #: Engine groups as the scheduler sees them; ``None`` when the scheduler was not asked or not reachable.
    groups: tuple[ObservedGroup, ...] | None = None

    def group_on(self, node: str | None) -> ObservedGroup | None:
        """The scheduler's group on ``node`` (one engine group per node and cluster)."""
        if node is None or self.groups is None:
            return None
        return next((g for g in self.groups if g.node == node), None)

    def pods_of(self, role: Role) -> tuple[ObservedPod, ...]:
        return tuple(p for p in self.pods if p.role == role)
