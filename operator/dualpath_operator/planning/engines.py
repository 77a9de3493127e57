"""PURE: which engine pods to create, drain, delete or relabel to reach the desired P/D counts and the
current pod template, with bounded unavailability.

Algorithm (one call per reconcile pass; the planner is stateless, everything comes from ``Observed``):

1. Live pods (not terminating) are grouped by role. Pods of a role beyond its desired count are
   surplus: the highest ordinals go first.
2. Surplus and outdated pods (template hash differs from the desired one) are removed drain-first:
   the first pass marks the pod ``dualpath.io/draining=<now>`` (the scheduler stops routing new work
   to it); a later pass deletes it once it is idle (``idle`` set from the scheduler) or the drain
   timeout has passed. A pod that is not ready carries no work and is deleted at once.
3. Replacement of outdated pods is bounded: per role, at most ``max_unavailable`` pods may be
   unavailable (not ready, draining, or missing) before another outdated pod is taken down.
4. Missing pods of a role are created on the lowest ordinals no existing pod (even a terminating one)
   uses, so a name is never reused while its old pod still exists.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from dualpath_operator.planning import observed as obs

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, Role] = ("prefill", "decode")


@dataclass(frozen=True)
class EnginePlan:
    """Pod-level actions of one pass."""

    create: tuple[tuple[Role, int], ...] = ()
    #: In-place role switches (RoleSwitch mode): (pod name, new role). No restart, no model reload.
    switch: tuple[tuple[str, Role], ...] = ()
    mark_draining: tuple[str, ...] = ()
    delete: tuple[tuple[str, str], ...] = ()  # (pod name, why)
    outdated: tuple[str, ...] = ()
    waiting_drain: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def busy(self) -> bool:
        return bool(
            self.create
            or self.switch
            or self.mark_draining
            or self.delete
            or self.outdated
            or self.waiting_drain
        )


def _parse_time(text: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def drain_elapsed(pod: obs.ObservedPod, now: dt.datetime) -> float | None:
    if pod.draining_since is None:
        return None
    started = _parse_time(pod.draining_since)
    if started is None:
        return float("inf")  # garbage annotation: treat the drain as long over
    return (now - started).total_seconds()


@dataclass
class _Acc:
    """Mutable accumulator of one planning call."""

    now: dt.datetime
    drain_timeout_s: float
    idle: frozenset[str]
    used_ordinals: set[int]
    create: list[tuple[Role, int]] = field(default_factory=list)
    switch: list[tuple[str, Role]] = field(default_factory=list)
    mark: list[str] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def remove(self, p: obs.ObservedPod, why: str) -> None:
        """Drain-first removal: mark, wait for idle or the timeout, then delete."""
        if not p.ready:
            self.delete.append((p.name, f"{why} (not ready: nothing in flight)"))
            return
        elapsed = drain_elapsed(p, self.now)
        if elapsed is None:
            self.mark.append(p.name)
        elif p.name in self.idle:
            self.delete.append((p.name, f"{why} (drained: idle)"))
        elif elapsed >= self.drain_timeout_s:
            self.delete.append((p.name, f"{why} (drain timeout {self.drain_timeout_s:.0f}s reached)"))
        else:
            self.waiting.append(p.name)

    def next_ordinal(self) -> int:
        ordinal = 0
        while ordinal in self.used_ordinals:
            ordinal += 1
        self.used_ordinals.add(ordinal)
        return ordinal


def _plan_role(
    acc: _Acc, role: Role, mine: list[obs.ObservedPod], want: int, tmpl: str, max_unavailable: int
) -> None:
    surplus = mine[want:] if len(mine) > want else []
    keep = mine[: len(mine) - len(surplus)]
    for p in reversed(surplus):
        acc.remove(p, f"scale down {role} to {want}")
    if surplus:
        acc.reasons.append(f"{role}: {len(mine)} -> {want}")
    outdated = [p for p in keep if p.template_hash != tmpl]
    acc.outdated += [p.name for p in outdated]
    # Unavailable now: missing pods, not-ready pods, pods already draining for replacement.
    missing = max(0, want - len(keep))
    unavailable = missing + sum(1 for p in keep if not p.ready or p.draining_since is not None)
    for p in outdated:
        if p.draining_since is not None:
            acc.remove(p, f"replace outdated {role} pod")
    budget = max_unavailable - unavailable
    for p in outdated:
        if budget <= 0:
            break
        if p.draining_since is None:
            acc.remove(p, f"replace outdated {role} pod")
            budget -= 1
    if outdated:
        acc.reasons.append(f"{role}: {len(outdated)} pod(s) on an outdated template")
    for _ in range(missing):
        acc.create.append((role, acc.next_ordinal()))
    if missing:
        acc.reasons.append(f"{role}: create {missing}")


def _switch_roles(
    acc: _Acc,
    live: list[obs.ObservedPod],
    desired: Mapping[Role, int],
    template_hash: Mapping[Role, str],
    switchable: frozenset[str],
) -> list[obs.ObservedPod]:
    """Move surplus pods of one role to a role short of pods, in place; returns the pods as relabelled."""
    if not switchable or template_hash["prefill"] != template_hash["decode"]:
        return live
    count: dict[Role, int] = {r: sum(1 for p in live if p.role == r) for r in ROLES}
    out = list(live)
    pairs: tuple[tuple[Role, Role], ...] = (("prefill", "decode"), ("decode", "prefill"))
    for src, dst in pairs:
        moves = min(count[src] - desired[src], desired[dst] - count[dst])
        if moves <= 0:
            continue
        candidates = sorted(
            (
                p
                for p in out
                if p.role == src and p.name in switchable and p.ready and p.draining_since is None
            ),
            key=lambda p: -p.ordinal,
        )
        for p in candidates[:moves]:
            acc.switch.append((p.name, dst))
            acc.reasons.append(f"switch {p.name} {src} -> {dst} in place")
            out = [dataclasses.replace(x, role=dst) if x.name == p.name else x for x in out]
            count[src] -= 1
            count[dst] += 1
    return out


def plan_engines(
    pods: Iterable[obs.ObservedPod],
    desired: Mapping[Role, int],
    template_hash: Mapping[Role, str],
    now: dt.datetime,
    *,
    drain_timeout_s: float,
    idle: frozenset[str] = frozenset(),
    max_unavailable: int = 1,
    switchable: frozenset[str] = frozenset(),
) -> EnginePlan:
    """Plan pod actions; see the module docstring. ``idle``: draining pods the scheduler reports idle.

    ``switchable``: pods that may flip role in place (RoleSwitch mode, both roles' templates equal, the
    scheduler knows the group). A role with a surplus gives such pods to a role with a deficit instead
    of deleting one and creating another; the scheduler drains the group and flips it.
    """
    all_pods = list(pods)
    acc = _Acc(
        now=now, drain_timeout_s=drain_timeout_s, idle=idle, used_ordinals={p.ordinal for p in all_pods}
    )
    live = [p for p in all_pods if not p.terminating]
    live = _switch_roles(acc, live, desired, template_hash, switchable)
    for role in ROLES:
        mine = sorted((p for p in live if p.role == role), key=lambda p: p.ordinal)
        _plan_role(acc, role, mine, desired[role], template_hash[role], max_unavailable)
    return EnginePlan(
        create=tuple(acc.create),
        switch=tuple(acc.switch),
        mark_draining=tuple(acc.mark),
        delete=tuple(acc.delete),
        outdated=tuple(acc.outdated),
        waiting_drain=tuple(acc.waiting),
        reasons=tuple(acc.reasons),
    )
