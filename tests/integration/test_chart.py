"""The Helm chart on the real local cluster: install it, then run the operator as a local process
with the chart's ServiceAccount token, so every API call goes through the chart's RBAC."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from tests.cluster import harness, nodes
from tests.integration import conftest as itc
from tests.integration.test_operator import ready_with, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def run(cluster: harness.Cluster, *argv: str) -> str:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture
def release(cluster: harness.Cluster, crds: list[str]) -> Iterator[tuple[str, str]]:
    """The chart installed in its own namespace (CRDs already present: --skip-crds)."""
    ns = f"dp-system-{uuid.uuid4().hex[:6]}"
    name = "dp"
    helm = str(cluster.bin_dir / "helm")
    chart = str(itc.REPO / "charts" / "dualpath-operator")
    run(cluster, helm, "install", name, chart, "-n", ns, "--create-namespace", "--skip-crds", "--wait=false")
    yield ns, name
    run(cluster, helm, "uninstall", name, "-n", ns)
    run(cluster, str(cluster.bin_dir / "kubectl"), "delete", "namespace", ns, "--wait=false")


def test_operator_with_the_charts_service_account_reconciles_and_cannot_write_specs(
    cluster: harness.Cluster,
    kube: Client,
    namespace: str,
    release: tuple[str, str],
    pool: tuple[str, list[nodes.NodeSpec]],
    tmp_path: Path,
) -> None:
    ns, name = release
    sa = f"{name}-dualpath-operator"
    token = run(cluster, str(cluster.bin_dir / "kubectl"), "-n", ns, "create", "token", sa).strip()
    kubeconfig = cluster.token_kubeconfig(
        tmp_path / "sa.kubeconfig", token, user=f"system:serviceaccount:{ns}:{sa}"
    )
    op = itc.OperatorProcess(
        cluster,
        tmp_path / "operator",
        {"DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS": "3"},
        kubeconfig=kubeconfig,
    )
    op.start()
    try:
        label, _ = pool
        itc.apply_dpc(kube, namespace, itc.cluster_body("rbac", label, prefill=1, decode=1))
        wait_status(kube, namespace, "rbac", ready_with(1, 1), "Ready under the chart's RBAC")
        assert op.metric("dualpath_operator_reconcile_total", 'result="error"') == 0, op.log()
    finally:
        op.stop()

    as_operator = Client(KubeConfig.from_file(str(kubeconfig)), field_manager="dualpath-operator")
    with pytest.raises(ApiError) as denied:
        as_operator.patch(
            itc.DPC,
            "rbac",
            {"spec": {"ratio": {"decode": 2}}},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )
    assert denied.value.status.code == 403
    with pytest.raises(ApiError) as no_list:
        list(as_operator.list(Secret, namespace=namespace))
    assert no_list.value.status.code == 403
