"""The operator against the real local control plane and fake GPU/RDMA nodes: create, converge,
roll out, degrade, survive a crash, delete. The operator runs as a real subprocess."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Event, Pod, Secret, Service
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.policy_v1 import PodDisruptionBudget

from tests.cluster import harness, nodes
from tests.integration import conftest as itc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ENGINE_SELECTOR = "dualpath.io/component"


def engine_pods(kube: Client, ns: str, name: str, *, live_only: bool = True) -> list[Pod]:
    pods = list(kube.list(Pod, namespace=ns, labels={"dualpath.io/cluster": name, ENGINE_SELECTOR: "engine"}))
    if live_only:
        pods = [p for p in pods if p.metadata is not None and p.metadata.deletionTimestamp is None]
    return pods


def role_of(p: Pod) -> str:
    return (p.metadata.labels or {}).get("dualpath.io/role", "") if p.metadata else ""


def is_ready(p: Pod) -> bool:
    conds = (p.status.conditions if p.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (body.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None


def wait_status(kube: Client, ns: str, name: str, check: Callable[[dict[str, Any]], bool], what: str,
                timeout_s: float = 120) -> dict[str, Any]:  # fmt: skip
    seen: list[dict[str, Any]] = [{}]

    def probe() -> bool:
        seen[0] = itc.get_dpc(kube, ns, name)
        return check(seen[0])

    try:
        harness.wait_for(f"{ns}/{name}: {what}", probe, timeout_s)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nlast status: {yaml.safe_dump(seen[0].get('status'))}") from e
    return seen[0]


def ready_with(p: int, d: int) -> Callable[[dict[str, Any]], bool]:
    def check(body: dict[str, Any]) -> bool:
        st = body.get("status") or {}
        ready = condition(body, "Ready")
        return (
            ready is not None
            and ready["status"] == "True"
            and st.get("observedGeneration") == body["metadata"]["generation"]
            and st.get("prefill", {}).get("ready") == p
            and st.get("decode", {}).get("ready") == d
        )

    return check


def fast_drain(body: dict[str, Any]) -> dict[str, Any]:
    body["spec"].setdefault("rebalance", {})["drainTimeout"] = "2s"
    return body


def test_apply_creates_scheduler_and_engine_pods_on_rdma_nodes_and_reports_ready(
    kube: Client, namespace: str, operator: itc.OperatorProcess, pool: tuple[str, list[nodes.NodeSpec]]
) -> None:
    label, pool_nodes = pool
    created = itc.apply_dpc(kube, namespace, itc.cluster_body("c1", label, prefill=1, decode=2))
    uid = created["metadata"]["uid"]

    body = wait_status(kube, namespace, "c1", ready_with(1, 2), "Ready with 1P:2D")

    st = body["status"]
    assert st["ratio"] == "1P:2D" and st["desiredRatio"] == "1P:2D"
    assert st["scheduler"]["ready"] is True
    assert st["scheduler"]["endpoint"] == f"http://c1-scheduler.{namespace}.svc:8000"
    assert condition(body, "Degraded")["status"] == "False"  # type: ignore[index]
    pods = engine_pods(kube, namespace, "c1")
    assert sorted(role_of(p) for p in pods) == ["decode", "decode", "prefill"]
    pool_names = {n.name for n in pool_nodes}
    placed = [p.spec.nodeName for p in pods if p.spec]
    assert set(placed) <= pool_names and len(set(placed)) == 3  # one engine group per node
    for p in pods:
        assert p.spec is not None and p.metadata is not None
        c = p.spec.containers[0]
        limits = (c.resources.limits if c.resources else None) or {}
        assert limits[nodes.GPU_RESOURCE] == "8"
        assert limits[nodes.COMPUTE_NIC_RESOURCE] == "8"
        assert limits[nodes.STORAGE_NIC_RESOURCE] == "1"
        assert c.resources is not None and c.resources.requests == limits  # Guaranteed QoS
        sc = c.securityContext
        assert sc is not None and sc.capabilities is not None and sc.capabilities.add == ["IPC_LOCK"]
        assert sc.allowPrivilegeEscalation is False and sc.runAsNonRoot is True
        assert p.spec.automountServiceAccountToken is False
        assert c.readinessProbe is not None and c.readinessProbe.httpGet is not None
        assert c.readinessProbe.httpGet.path == "/healthz"
        assert [r.uid for r in p.metadata.ownerReferences or []] == [uid]
    for kind, obj_name in (
        (Deployment, "c1-scheduler"),
        (Service, "c1-scheduler"),
        (ConfigMap, "c1-engine-config"),
        (PodDisruptionBudget, "c1-engines"),
        (NetworkPolicy, "c1-engines"),
        (Secret, "c1-scheduler-admin"),
    ):
        obj: Any = kube.get(kind, name=obj_name, namespace=namespace)
        assert [r.uid for r in obj.metadata.ownerReferences] == [uid], kind
    cm = kube.get(ConfigMap, name="c1-engine-config", namespace=namespace)
    engine_yaml = yaml.safe_load((cm.data or {})["engine.yaml"])
    assert engine_yaml["model"]["num_layers"] == 16
    assert engine_yaml["scheduler_url"] == f"http://c1-scheduler.{namespace}.svc:8000"


def test_changing_the_counts_converges_drain_first(
    kube: Client, namespace: str, operator: itc.OperatorProcess, pool: tuple[str, list[nodes.NodeSpec]]
) -> None:
    label, _ = pool
    body = fast_drain(itc.cluster_body("c2", label, prefill=1, decode=2))
    itc.apply_dpc(kube, namespace, body)
    wait_status(kube, namespace, "c2", ready_with(1, 2), "Ready with 1P:2D")

    body["spec"]["ratio"].update({"prefill": 2, "decode": 1})
    itc.apply_dpc(kube, namespace, body)

    final = wait_status(kube, namespace, "c2", ready_with(2, 1), "Ready with 2P:1D")
    assert sorted(role_of(p) for p in engine_pods(kube, namespace, "c2")) == ["decode", "prefill", "prefill"]
    assert final["status"]["lastDecision"]["action"] == "Scale"
    reasons = {e.reason for e in kube.list(Event, namespace=namespace)}
    assert {"EngineGroupCreated", "EngineGroupDraining", "EngineGroupDeleted"} <= reasons


def test_image_change_replaces_pods_one_group_at_a_time(
    kube: Client, namespace: str, operator: itc.OperatorProcess, pool: tuple[str, list[nodes.NodeSpec]]
) -> None:
    label, _ = pool
    body = fast_drain(itc.cluster_body("c3", label, prefill=1, decode=2))
    itc.apply_dpc(kube, namespace, body)
    wait_status(kube, namespace, "c3", ready_with(1, 2), "Ready with 1P:2D")

    body["spec"]["engine"]["image"] = "dualpath-engine:0.2.0"
    itc.apply_dpc(kube, namespace, body)

    worst = {"prefill": 1, "decode": 2}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pods = engine_pods(kube, namespace, "c3")
        for role in worst:
            ready = sum(1 for p in pods if role_of(p) == role and is_ready(p))
            worst[role] = min(worst[role], ready)
        images = {p.spec.containers[0].image for p in pods if p.spec}
        if images == {"dualpath-engine:0.2.0"} and len(pods) == 3 and all(is_ready(p) for p in pods):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(
            f"rollout did not finish; pods: {[(p.metadata.name, role_of(p)) for p in pods if p.metadata]}"
        )
    # Bounded unavailability: at most one engine group of a role is down at any moment.
    assert worst["decode"] >= 1
    assert worst["prefill"] >= 0
    wait_status(kube, namespace, "c3", ready_with(1, 2), "Ready after the rollout")


def test_not_enough_gpus_reports_degraded_naming_the_unschedulable_pods(
    kube: Client, namespace: str, operator: itc.OperatorProcess, pool: tuple[str, list[nodes.NodeSpec]]
) -> None:
    label, _ = pool  # three nodes: one engine group each, so 4 groups cannot all be placed
    body = itc.cluster_body("c4", label, prefill=2, decode=2)
    itc.apply_dpc(kube, namespace, body)

    def degraded(b: dict[str, Any]) -> bool:
        c = condition(b, "Degraded")
        return c is not None and c["status"] == "True" and c["reason"] == "Unschedulable"

    got = wait_status(kube, namespace, "c4", degraded, "Degraded/Unschedulable")
    msg = condition(got, "Degraded")["message"]  # type: ignore[index]
    stuck = [
        p.metadata.name
        for p in engine_pods(kube, namespace, "c4")
        if p.spec and not p.spec.nodeName and p.metadata
    ]
    assert len(stuck) == 1
    assert stuck[0] in msg
    assert condition(got, "Ready")["status"] == "False"  # type: ignore[index]
    warnings = [e for e in kube.list(Event, namespace=namespace) if e.reason == "Unschedulable"]
    assert warnings and warnings[0].type == "Warning"


def test_operator_killed_mid_creation_and_restarted_leaves_no_duplicates_or_orphans(
    kube: Client, namespace: str, operator: itc.OperatorProcess, node_factory: nodes.NodeFactory
) -> None:
    label = f"pool-kill-{namespace[-6:]}"
    node_factory.create_many(label, 8, "h200", labels={itc.POOL_LABEL: label})
    body = itc.cluster_body("c5", label, prefill=4, decode=4)
    body["spec"]["prefill"]["max"] = 4
    body["spec"]["decode"]["max"] = 4
    itc.apply_dpc(kube, namespace, body)
    harness.wait_for(
        "first engine pod", lambda: len(engine_pods(kube, namespace, "c5")) >= 1, 60, interval_s=0.01
    )
    operator.kill()
    operator.start()

    final = wait_status(kube, namespace, "c5", ready_with(4, 4), "Ready with 4P:4D after a restart", 180)
    pods = engine_pods(kube, namespace, "c5", live_only=False)
    names = [p.metadata.name for p in pods if p.metadata]
    assert len(names) == len(set(names)) == 8
    uid = final["metadata"]["uid"]
    # No orphans: every engine pod in the namespace is owned by this cluster, and so is the one scheduler.
    all_engines = list(kube.list(Pod, namespace=namespace, labels={ENGINE_SELECTOR: "engine"}))
    assert len(all_engines) == 8
    assert all(p.metadata and [r.uid for r in p.metadata.ownerReferences or []] == [uid] for p in all_engines)
    deps = list(kube.list(Deployment, namespace=namespace))
    assert [d.metadata.name for d in deps if d.metadata] == ["c5-scheduler"]
    assert deps[0].metadata is not None and [r.uid for r in deps[0].metadata.ownerReferences or []] == [uid]


def test_deleting_the_cluster_garbage_collects_every_child(
    kube: Client, namespace: str, operator: itc.OperatorProcess, pool: tuple[str, list[nodes.NodeSpec]]
) -> None:
    label, _ = pool
    itc.apply_dpc(kube, namespace, itc.cluster_body("c6", label, prefill=1, decode=1))
    wait_status(kube, namespace, "c6", ready_with(1, 1), "Ready with 1P:1D")
    got = itc.get_dpc(kube, namespace, "c6")
    assert not got["metadata"].get("finalizers")  # deletion never waits for the operator

    itc.delete_dpc(kube, namespace, "c6")

    def all_gone() -> bool:
        sel: dict[str, Any] = {"dualpath.io/cluster": "c6"}
        kind: Any
        for kind in (Pod, Deployment, Service, ConfigMap, PodDisruptionBudget, NetworkPolicy, Secret):
            if list(kube.list(kind, namespace=namespace, labels=sel)):
                return False
        return True

    harness.wait_for("every child garbage-collected", all_gone, 120)
    with pytest.raises(ApiError):
        itc.get_dpc(kube, namespace, "c6")
