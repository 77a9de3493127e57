"""Fixtures for operator tests against the real local control plane.

- ``crds`` (session): ``crds/*.yaml`` applied and Established.
- ``operator`` (function): the operator as a real subprocess (``python -m dualpath_operator``) with the
  cluster's kubeconfig, liveness-checked, stopped by PID afterwards. Tests may kill and restart it.
- ``dpc``: helpers to apply/read DualPathClusters.
- ``pool``: a set of fake GPU/RDMA nodes labelled for one test, so tests never share capacity.
"""

from __future__ import annotations

import copy
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

from tests.cluster import harness, nodes, processes

REPO = harness.REPO_ROOT
DPC = create_namespaced_resource("dualpath.io", "v1alpha1", "DualPathCluster", "dualpathclusters")
POOL_LABEL = "dualpath.io/test-pool"


@pytest.fixture(scope="session")
def crds(kube: Client) -> list[str]:
    names = []
    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        kube.apply(cast(CustomResourceDefinition, CustomResourceDefinition.from_dict(body)), force=True)
        names.append(body["metadata"]["name"])

    def established() -> bool:
        for n in names:
            crd = kube.get(CustomResourceDefinition, name=n)
            conds = (crd.status.conditions if crd.status else None) or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    harness.wait_for("CRDs Established", established, 60)
    return names


class OperatorProcess:
    """The operator subprocess; ``restart`` after ``kill`` reuses the same settings."""

    def __init__(
        self, cluster: harness.Cluster, log_dir: Path, env: dict[str, str], kubeconfig: Path | None = None
    ) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.log_dir = log_dir
        self.env = env
        self.proc: processes.Managed | None = None
        self.runs = 0
        self.metrics_port = 0

    def start(self) -> None:
        port = processes.free_port()
        self.metrics_port = processes.free_port()
        self.runs += 1
        self.proc = processes.start(
            f"operator-{self.runs}",
            [sys.executable, "-m", "dualpath_operator", f"--liveness=http://127.0.0.1:{port}/healthz"],
            self.log_dir,
            env={
                "KUBECONFIG": str(self.kubeconfig),
                "DUALPATH_OPERATOR_METRICS_PORT": str(self.metrics_port),
                **self.env,
            },
            cwd=REPO,
        )
        proc = self.proc

        def live() -> bool:
            if not proc.alive():
                raise harness.ClusterError(f"operator exited:\n{proc.log_tail(60)}")
            return harness.http_get(f"http://127.0.0.1:{port}/healthz") != b""

        harness.wait_for("operator liveness", live, 60)

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of ``name`` (optionally with a label fragment) on the operator's /metrics."""
        text = harness.http_get(f"http://127.0.0.1:{self.metrics_port}/metrics").decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (not labels or labels in line) and not line.startswith("#"):
                head = line.split(" ")[0]
                if head == name or head.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        """SIGKILL, like a node loss or an OOM kill (no graceful shutdown)."""
        if self.proc is not None:
            self.proc.stop(grace_s=0)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return self.proc.log_tail(200) if self.proc else ""


@pytest.fixture
def operator(
    cluster: harness.Cluster, crds: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    env = {"DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS": "3"}
    op = OperatorProcess(cluster, tmp_path / "operator", env)
    op.start()
    yield op
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(op.log())
    op.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


def example(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    return body


@pytest.fixture
def pool(node_factory: nodes.NodeFactory) -> Iterator[tuple[str, list[nodes.NodeSpec]]]:
    """Three 8-GPU RDMA nodes that only this test's engine pods select."""
    label = f"pool-{uuid.uuid4().hex[:8]}"
    specs = node_factory.create_many(label, 3, "h200", labels={POOL_LABEL: label})
    yield label, specs


def cluster_body(
    name: str, pool_label: str, *, prefill: int = 1, decode: int = 2, image: str = "dualpath-engine:0.1.0"
) -> dict[str, Any]:
    """The Fixed example retargeted at one test's node pool."""
    body = copy.deepcopy(example("dualpathcluster-fixed.yaml"))
    body["metadata"] = {"name": name}
    spec = body["spec"]
    spec["engine"]["image"] = image
    spec["ratio"].update({"mode": "Fixed", "prefill": prefill, "decode": decode})
    spec["prefill"].update({"min": 1, "max": 4})
    spec["decode"].update({"min": 1, "max": 4})
    for role in ("prefill", "decode"):
        spec[role]["nodeSelector"] = {POOL_LABEL: pool_label}
    return body


def get_dpc(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kube.get(DPC, name=name, namespace=namespace).to_dict()  # type: ignore[no-untyped-call]
    return obj


def apply_dpc(
    kube: Client, namespace: str, body: dict[str, Any], manager: str = "argocd-controller"
) -> dict[str, Any]:
    obj = DPC.from_dict({**body, "metadata": {**body["metadata"], "namespace": namespace}})
    out: dict[str, Any] = kube.apply(obj, field_manager=manager, force=True).to_dict()
    return out


def delete_dpc(kube: Client, namespace: str, name: str) -> None:
    try:
        kube.delete(DPC, name=name, namespace=namespace)
    except ApiError as e:
        if e.status.code != 404:
            raise


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
