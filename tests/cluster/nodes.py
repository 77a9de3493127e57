"""Fake GPU/RDMA nodes for kwok: capacity, GPU feature discovery labels, topology, loopback pod CIDRs.

A node advertises ``nvidia.com/gpu`` (NVIDIA device plugin), one compute-network SR-IOV RDMA VF per
GPU (``nvidia.com/sriov_rdma``, sriov-network-device-plugin as NVIDIA's network operator names it) and
a storage NIC (``rdma/hca_shared_devices_a``, k8s-rdma-shared-dev-plugin). Its ``spec.podCIDR`` is a
loopback /24 (127.<base>.<index>.0/24), so kwok gives every pod on it a 127.x address that a real local
process can bind (tests/cluster docs; local-kubernetes.md 11.4).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node

from tests.cluster.harness import KWOK_NODE_ANNOTATION, wait_for

GPU_RESOURCE = "nvidia.com/gpu"
COMPUTE_NIC_RESOURCE = "nvidia.com/sriov_rdma"
STORAGE_NIC_RESOURCE = "rdma/hca_shared_devices_a"


@dataclass(frozen=True)
class Profile:
    """A kind of GPU server: GPU product label, count, memory (MiB), NICs."""

    name: str
    product: str
    family: str
    gpus: int
    gpu_memory_mib: int
    compute_nics_per_gpu: int = 1
    storage_nics: int = 1
    cpu: str = "128"
    memory: str = "2Ti"


PROFILES: dict[str, Profile] = {
    "h200": Profile("h200", "NVIDIA-H200", "hopper", 8, 143771),
    "h100": Profile("h100", "NVIDIA-H100-80GB-HBM3", "hopper", 8, 81559),
}


@dataclass(frozen=True)
class NodeSpec:
    """What one fake node offers. ``compute_nics``/``storage_nics`` of 0 leave that resource out."""

    name: str
    index: int
    profile: Profile = PROFILES["h200"]
    gpus: int | None = None
    compute_nics: int | None = None
    storage_nics: int | None = None
    zone: str = "zone-a"
    block: str = "block-1"
    cidr_base: int = 10
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod_cidr(self) -> str:
        if not 0 <= self.index <= 255:
            raise ValueError(f"node index {self.index} outside 0..255 (one loopback /24 per node)")
        return f"127.{self.cidr_base}.{self.index}.0/24"

    def manifest(self) -> dict[str, Any]:
        p = self.profile
        gpus = p.gpus if self.gpus is None else self.gpus
        cnics = gpus * p.compute_nics_per_gpu if self.compute_nics is None else self.compute_nics
        snics = p.storage_nics if self.storage_nics is None else self.storage_nics
        resources = {
            "cpu": p.cpu,
            "memory": p.memory,
            "pods": "110",
            "ephemeral-storage": "10Ti",
            GPU_RESOURCE: str(gpus),
        }
        if cnics:
            resources[COMPUTE_NIC_RESOURCE] = str(cnics)
        if snics:
            resources[STORAGE_NIC_RESOURCE] = str(snics)
        labels = {
            "type": "kwok",
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "topology.kubernetes.io/zone": self.zone,
            "dualpath.io/network-block": self.block,
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": p.product,
            "nvidia.com/gpu.family": p.family,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(p.gpu_memory_mib),
            **self.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": labels,
            },
            "spec": {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr]},
            # The node strategy keeps status on create; kwok keeps capacity it finds.
            "status": {"capacity": resources, "allocatable": resources},
        }


def node_ready(node: Node) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


class NodeFactory:
    """Creates fake nodes, waits until kwok marks them Ready, deletes what it created."""

    def __init__(self, client: Client, *, cidr_base: int = 10) -> None:
        self.client = client
        self.cidr_base = cidr_base
        self.created: list[str] = []
        self._next_index = 0

    def _free_index(self) -> int:
        used = set()
        for n in self.client.list(Node):
            cidr = n.spec.podCIDR if n.spec else None
            if cidr and cidr.startswith(f"127.{self.cidr_base}."):
                used.add(int(cidr.split(".")[2]))
        while self._next_index in used:
            self._next_index += 1
        idx = self._next_index
        self._next_index += 1
        return idx

    def create(self, name: str, profile: str = "h200", *, wait: bool = True, **overrides: Any) -> NodeSpec:
        spec = NodeSpec(
            name=name,
            index=self._free_index(),
            profile=PROFILES[profile],
            cidr_base=self.cidr_base,
            **overrides,
        )
        self.client.create(cast(Node, Node.from_dict(spec.manifest())))
        self.created.append(name)
        if wait:
            self.wait_ready([name])
        return spec

    def create_many(self, prefix: str, count: int, profile: str = "h200", **overrides: Any) -> list[NodeSpec]:
        specs = [self.create(f"{prefix}-{i}", profile, wait=False, **overrides) for i in range(count)]
        self.wait_ready([s.name for s in specs])
        return specs

    def wait_ready(self, names: list[str], timeout_s: float = 60.0) -> None:
        def all_ready() -> bool:
            return all(node_ready(self.client.get(Node, name=n)) for n in names)

        wait_for(f"nodes {names} Ready", all_ready, timeout_s)

    def delete_all(self, timeout_s: float = 60.0) -> None:
        for name in self.created:
            try:
                self.client.delete(Node, name=name)
            except ApiError as e:
                if e.status.code != 404:
                    raise
        deadline = time.monotonic() + timeout_s
        for name in self.created:
            while time.monotonic() < deadline:
                try:
                    self.client.get(Node, name=name)
                except ApiError as e:
                    if e.status.code == 404:
                        break
                    raise
                time.sleep(0.2)
        self.created.clear()


def iter_nodes(client: Client) -> Iterator[Node]:
    yield from client.list(Node)
