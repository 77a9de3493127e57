"""The pure pass planner: rendered children, desired counts, whole status, events, idempotence."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import observed as obs
from dualpath_operator.planning import planner
from dualpath_operator.rendering import manifests

REPO = Path(__file__).resolve().parents[3]
NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)
REF = manifests.ClusterRef(name="c", namespace="ns", uid="uid-1")


def spec(**ratio: Any) -> api.DualPathClusterSpec:
    body = yaml.safe_load((REPO / "examples" / "dualpathcluster-fixed.yaml").read_text())
    body["spec"]["ratio"].update(ratio)
    return api.DualPathCluster.model_validate(body).spec


def view(
    s: api.DualPathClusterSpec, o: obs.Observed, prev: dict[str, Any] | None = None, now: dt.datetime = NOW
) -> planner.View:
    return planner.View(
        ref=REF,
        generation=3,
        spec=s,
        observed=o,
        previous=api_status.DualPathClusterStatus.model_validate(prev or {}),
        now=now,
    )


def converged_world(s: api.DualPathClusterSpec, p: int, d: int) -> obs.Observed:
    """What the cluster looks like once the plan for (p, d) has been carried out and everything is ready."""
    first = planner.plan(view(s, obs.Observed()))
    pods = []
    for m in first.apply:
        if m["kind"] != "Pod":
            continue
        labels = m["metadata"]["labels"]
        pods.append(
            obs.ObservedPod(
                name=m["metadata"]["name"],
                role=labels["dualpath.io/role"],
                ordinal=int(labels["dualpath.io/ordinal"]),
                template_hash=m["metadata"]["annotations"]["dualpath.io/template-hash"],
                phase="Running",
                ready=True,
                node=f"node-{labels['dualpath.io/ordinal']}",
            )
        )
    assert len(pods) == p + d
    sched = obs.ObservedScheduler(exists=True, replicas=1, ready_replicas=1, updated_replicas=1)
    return obs.Observed(pods=tuple(pods), scheduler=sched, admin_secret_exists=True)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_first_pass_renders_every_child_and_creates_the_fixed_counts() -> None:
    p = planner.plan(view(spec(), obs.Observed()))
    kinds = [m["kind"] for m in p.apply]
    assert kinds[:5] == ["ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"]
    assert sorted(m["metadata"]["labels"]["dualpath.io/role"] for m in p.apply if m["kind"] == "Pod") == [
        "decode", "decode", "prefill",
    ]  # fmt: skip
    assert [s["kind"] for s in p.create_secrets] == ["Secret"]
    assert all(m["metadata"]["ownerReferences"][0]["uid"] == "uid-1" for m in p.apply)
    st = p.status
    assert st["desiredRatio"] == "1P:2D" and st["ratio"] == "0P:0D"
    assert cond(st, "Ready")["status"] == "False" and cond(st, "Progressing")["reason"] == "ScalingUp"
    assert p.requeue_after_s is not None
    assert p.decision == ("Scale", "SpecChange")


def test_a_converged_cluster_is_ready_and_a_second_pass_changes_nothing() -> None:
    s = spec()
    world = converged_world(s, 1, 2)
    first = planner.plan(view(s, world))
    assert cond(first.status, "Ready")["status"] == "True"
    assert cond(first.status, "Progressing")["status"] == "False"
    assert first.status["ratio"] == "1P:2D"
    assert not first.delete_pods and not first.patch_pods
    assert [m for m in first.apply if m["kind"] == "Pod"] == []
    later = planner.plan(view(s, world, first.status, NOW + dt.timedelta(minutes=5)))
    assert later.status == first.status  # lastTransitionTime kept: no write on the server
    assert later.events == () and later.decision is None and later.requeue_after_s is None


def test_fixed_count_change_scales_and_records_a_decision_with_inputs() -> None:
    s = spec()
    world = converged_world(s, 1, 2)
    settled = planner.plan(view(s, world)).status
    p = planner.plan(view(spec(prefill=2, decode=1), world, settled))
    assert [m["metadata"]["labels"]["dualpath.io/role"] for m in p.apply if m["kind"] == "Pod"] == ["prefill"]
    assert len(p.patch_pods) == 1  # the surplus decode group is drained first
    last = p.status["lastDecision"]
    assert (
        last["action"] == "Scale"
        and last["inputs"]["desired"] == "2P:1D"
        and last["inputs"]["current"] == "1P:2D"
    )
    assert {e.reason for e in p.events} >= {"EngineGroupCreated", "EngineGroupDraining"}


def test_unschedulable_pods_make_the_cluster_degraded_with_their_names() -> None:
    s = spec()
    world = converged_world(s, 1, 2)
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu"
    stuck = dataclasses.replace(world.pods[2], ready=False, node=None, unschedulable=msg)
    o = obs.Observed(pods=(*world.pods[:2], stuck), scheduler=world.scheduler, admin_secret_exists=True)
    settled = planner.plan(view(s, world)).status
    p = planner.plan(view(s, o, settled))
    deg = cond(p.status, "Degraded")
    assert deg["status"] == "True" and deg["reason"] == "Unschedulable" and stuck.name in deg["message"]
    assert cond(p.status, "Ready")["status"] == "False"
    assert any(e.type == "Warning" and e.reason == "Unschedulable" for e in p.events)


def test_a_condition_keeps_its_transition_time_until_it_flips() -> None:
    s = spec()
    world = converged_world(s, 1, 2)
    t0 = planner.plan(view(s, world)).status
    t1 = planner.plan(view(s, world, t0, NOW + dt.timedelta(hours=1))).status
    assert cond(t1, "Ready")["lastTransitionTime"] == cond(t0, "Ready")["lastTransitionTime"]
    not_ready = obs.Observed(
        pods=tuple(dataclasses.replace(p, ready=False) for p in world.pods),
        scheduler=world.scheduler,
        admin_secret_exists=True,
    )
    t2 = planner.plan(view(s, not_ready, t1, NOW + dt.timedelta(hours=2))).status
    assert cond(t2, "Ready")["status"] == "False"
    assert cond(t2, "Ready")["lastTransitionTime"] != cond(t1, "Ready")["lastTransitionTime"]


def test_auto_mode_starts_from_the_spec_hint_and_then_follows_status() -> None:
    body = yaml.safe_load((REPO / "examples" / "dualpathcluster-auto.yaml").read_text())
    s = api.DualPathCluster.model_validate(body).spec
    want = planner.desired_counts(s, api_status.DualPathClusterStatus())
    assert s.prefill.min <= want["prefill"] <= s.prefill.max
    moved = planner.desired_counts(
        s, api_status.DualPathClusterStatus(desired_ratio=f"{s.prefill.max}P:{s.decode.min}D")
    )
    assert moved == {"prefill": s.prefill.max, "decode": s.decode.min}
    clamped = planner.desired_counts(s, api_status.DualPathClusterStatus(desired_ratio="99P:99D"))
    assert clamped == {"prefill": s.prefill.max, "decode": s.decode.max}
