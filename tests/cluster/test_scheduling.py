"""Proof that the local control plane is a real Kubernetes: kube-scheduler binds pods by extended
GPU/RDMA resources, kwok runs them with loopback pod IPs, and the garbage collector removes dependents.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any, cast

import pytest
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import ConfigMap, Pod

from tests.cluster import harness, nodes

pytestmark = pytest.mark.integration


def gpu_pod(name: str, pool: str, *, gpus: int, vfs: int, snics: int) -> Pod:
    limits = {nodes.GPU_RESOURCE: str(gpus)}
    if vfs:
        limits[nodes.COMPUTE_NIC_RESOURCE] = str(vfs)
    if snics:
        limits[nodes.STORAGE_NIC_RESOURCE] = str(snics)
    body = {
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"dualpath.io/test-pool": pool},
            "containers": [
                {"name": "engine", "image": "dualpath/engine:test", "resources": {"limits": limits}}
            ],
        },
    }
    return cast(Pod, Pod.from_dict(body))


def wait_pod(kube: Client, ns: str, name: str, check: Any, what: str, timeout_s: float = 60) -> Pod:
    found: list[Pod] = []

    def probe() -> bool:
        pod = kube.get(Pod, name=name, namespace=ns)
        found[:] = [pod]
        return bool(check(pod))

    harness.wait_for(f"pod {ns}/{name} {what}", probe, timeout_s)
    return found[0]


def running(pod: Pod) -> bool:
    return pod.status is not None and pod.status.phase == "Running" and bool(pod.status.podIP)


def unschedulable(pod: Pod) -> bool:
    conds = (pod.status.conditions if pod.status else None) or []
    return any(
        c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable" for c in conds
    )


def pool() -> str:
    return f"pool-{uuid.uuid4().hex[:8]}"


def test_full_gpu_rdma_pod_is_bound_and_runs_with_a_loopback_ip(
    kube: Client, namespace: str, node_factory: nodes.NodeFactory
) -> None:
    p = pool()
    spec = node_factory.create(f"{p}-h200", "h200", labels={"dualpath.io/test-pool": p})
    kube.create(gpu_pod("engine", p, gpus=8, vfs=8, snics=1), namespace=namespace)

    pod = wait_pod(kube, namespace, "engine", running, "Running")

    assert pod.spec is not None and pod.spec.nodeName == spec.name
    ip = ipaddress.ip_address(pod.status.podIP if pod.status and pod.status.podIP else "")
    assert ip.is_loopback
    assert ip in ipaddress.ip_network(spec.pod_cidr)


def test_pod_larger_than_any_node_stays_pending_unschedulable(
    kube: Client, namespace: str, node_factory: nodes.NodeFactory
) -> None:
    p = pool()
    node_factory.create(f"{p}-h200", "h200", labels={"dualpath.io/test-pool": p})
    kube.create(gpu_pod("too-big", p, gpus=16, vfs=16, snics=1), namespace=namespace)

    pod = wait_pod(kube, namespace, "too-big", unschedulable, "Unschedulable")

    assert pod.status is not None and pod.status.phase == "Pending"
    assert pod.spec is not None and not pod.spec.nodeName
    msg = " ".join(c.message or "" for c in (pod.status.conditions or []))
    assert "nvidia.com/gpu" in msg


def test_node_without_the_rdma_resource_is_never_chosen_for_an_rdma_pod(
    kube: Client, namespace: str, node_factory: nodes.NodeFactory
) -> None:
    p = pool()
    labels = {"dualpath.io/test-pool": p}
    rdma = node_factory.create(f"{p}-rdma", "h200", labels=labels)
    plain = node_factory.create(f"{p}-plain", "h200", labels=labels, compute_nics=0, storage_nics=0, gpus=16)

    kube.create(gpu_pod("first", p, gpus=8, vfs=8, snics=1), namespace=namespace)
    first = wait_pod(kube, namespace, "first", running, "Running")
    assert first.spec is not None and first.spec.nodeName == rdma.name

    # The RDMA node is now full; the plain node still has 16 free GPUs but no RDMA VFs or storage NIC.
    kube.create(gpu_pod("second", p, gpus=8, vfs=8, snics=1), namespace=namespace)
    second = wait_pod(kube, namespace, "second", unschedulable, "Unschedulable")
    assert second.spec is not None and not second.spec.nodeName

    # A pod that needs no RDMA is happily placed on the plain node: the node itself is schedulable.
    kube.create(gpu_pod("no-rdma", p, gpus=8, vfs=0, snics=0), namespace=namespace)
    no_rdma = wait_pod(kube, namespace, "no-rdma", running, "Running")
    assert no_rdma.spec is not None and no_rdma.spec.nodeName == plain.name


def test_deleting_an_owner_garbage_collects_its_dependents(kube: Client, namespace: str) -> None:
    owner_body = cast(ConfigMap, ConfigMap.from_dict({"metadata": {"name": "owner"}, "data": {"k": "v"}}))
    owner = kube.create(owner_body, namespace=namespace)
    assert owner.metadata is not None
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    for i in range(3):
        kube.create(
            cast(
                ConfigMap,
                ConfigMap.from_dict({"metadata": {"name": f"dependent-{i}", "ownerReferences": [ref]}}),
            ),
            namespace=namespace,
        )

    kube.delete(ConfigMap, name="owner", namespace=namespace)

    def dependents_gone() -> bool:
        for i in range(3):
            try:
                kube.get(ConfigMap, name=f"dependent-{i}", namespace=namespace)
            except ApiError as e:
                if e.status.code == 404:
                    continue
                raise
            return False
        return True

    harness.wait_for("dependents garbage-collected", dependents_gone, 60)
