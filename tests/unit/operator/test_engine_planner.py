"""The pure engine-pod planner: scale, drain-first removal, bounded replacement, ordinals."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_operator.planning import engines
from dualpath_operator.planning import observed as obs

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)
H = {"prefill": "hp", "decode": "hd"}


def pod(ordinal: int, role: str = "prefill", *, ready: bool = True, tmpl: str | None = None,
        draining: float | None = None, terminating: bool = False) -> obs.ObservedPod:  # fmt: skip
    since = None if draining is None else (NOW - dt.timedelta(seconds=draining)).isoformat()
    return obs.ObservedPod(
        name=f"c-engine-{ordinal}",
        role=role,  # type: ignore[arg-type]
        ordinal=ordinal,
        template_hash=tmpl if tmpl is not None else H[role],
        phase="Running",
        ready=ready,
        terminating=terminating,
        draining_since=since,
    )


def plan(pods: list[obs.ObservedPod], p: int, d: int, **kw: object) -> engines.EnginePlan:
    return engines.plan_engines(pods, {"prefill": p, "decode": d}, H, NOW, drain_timeout_s=30, **kw)  # type: ignore[arg-type]


def test_empty_cluster_creates_every_group_on_the_lowest_ordinals() -> None:
    ep = plan([], 1, 2)
    assert ep.create == (("prefill", 0), ("decode", 1), ("decode", 2))
    assert not ep.delete and not ep.mark_draining


def test_converged_cluster_plans_nothing() -> None:
    ep = plan([pod(0), pod(1, "decode"), pod(2, "decode")], 1, 2)
    assert not ep.busy


def test_scale_down_marks_the_highest_ordinal_draining_first() -> None:
    ep = plan([pod(0, "decode"), pod(1, "decode"), pod(2, "decode")], 0, 2)
    assert ep.mark_draining == ("c-engine-2",)
    assert not ep.delete


@pytest.mark.parametrize(
    ("draining_for", "idle", "deleted"),
    [(5.0, False, False), (5.0, True, True), (31.0, False, True)],
    ids=["still-draining", "idle-early", "timeout"],
)
def test_a_draining_pod_is_deleted_once_idle_or_after_the_timeout(
    draining_for: float, idle: bool, deleted: bool
) -> None:
    pods = [pod(0, "decode"), pod(1, "decode", draining=draining_for)]
    ep = plan(pods, 0, 1, idle=frozenset({"c-engine-1"}) if idle else frozenset())
    assert bool(ep.delete) is deleted
    assert (ep.waiting_drain == ("c-engine-1",)) is (not deleted)


def test_a_pod_that_is_not_ready_is_deleted_without_a_drain() -> None:
    ep = plan([pod(0, "decode"), pod(1, "decode", ready=False)], 0, 1)
    assert [n for n, _ in ep.delete] == ["c-engine-1"]


def test_outdated_pods_are_replaced_one_per_role_at_a_time() -> None:
    pods = [
        pod(0, tmpl="old"),
        pod(1, "decode", tmpl="old"),
        pod(2, "decode", tmpl="old"),
        pod(3, "decode", tmpl="old"),
    ]
    ep = plan(pods, 1, 3)
    assert set(ep.mark_draining) == {"c-engine-0", "c-engine-1"}  # one prefill, one decode
    assert set(ep.outdated) == {f"c-engine-{i}" for i in range(4)}


def test_no_replacement_starts_while_a_group_of_that_role_is_unavailable() -> None:
    pods = [pod(0, "decode", tmpl="old"), pod(1, "decode", ready=False)]
    ep = plan(pods, 0, 2)
    assert not ep.mark_draining and not ep.delete


def test_a_terminating_pods_ordinal_is_not_reused() -> None:
    pods = [pod(0, "decode", terminating=True)]
    ep = plan(pods, 0, 1)
    assert ep.create == (("decode", 1),)


roles = st.sampled_from(["prefill", "decode"])
pod_lists = st.lists(
    st.builds(
        lambda o, r, ready, old, term: pod(o, r, ready=ready, tmpl="old" if old else None, terminating=term),
        st.integers(0, 12), roles, st.booleans(), st.booleans(), st.booleans(),
    ),
    max_size=10,
    unique_by=lambda p: p.ordinal,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pods=pod_lists, p=st.integers(0, 5), d=st.integers(0, 5))
def test_properties_hold_for_any_world(pods: list[obs.ObservedPod], p: int, d: int) -> None:
    ep = plan(pods, p, d)
    live = [x for x in pods if not x.terminating]
    names = {x.name for x in live}
    # Only live pods are ever deleted or marked; nothing is both deleted and marked.
    assert {n for n, _ in ep.delete} <= names and set(ep.mark_draining) <= names
    assert not ({n for n, _ in ep.delete} & set(ep.mark_draining))
    # New ordinals are unique and never collide with any existing pod (terminating included).
    new = [o for _, o in ep.create]
    assert len(new) == len(set(new)) and not (set(new) & {x.ordinal for x in pods})
    # After the creations the count of each role reaches at least its target (removals come later).
    for role, want in (("prefill", p), ("decode", d)):
        have = sum(1 for x in live if x.role == role) + sum(1 for r, _ in ep.create if r == role)
        assert have >= want
    # Bounded unavailability: at most one ready, up-to-date-count pod per role is taken down per pass
    # for replacement (surplus pods of a scale-down are not counted).
    for role, want in (("prefill", p), ("decode", d)):
        kept = sorted((x for x in live if x.role == role), key=lambda x: x.ordinal)[:want]
        taken = [x for x in kept if x.ready and x.name in set(ep.mark_draining)]
        assert len(taken) <= 1
