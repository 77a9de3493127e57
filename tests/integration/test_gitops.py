"""GitOps friendliness against the real API server with the operator running: re-applying the same
DualPathCluster (as Argo CD's server-side apply does) changes nothing, and a settled cluster sees no
writes at all from the operator (status and children keep their resourceVersions across resyncs)."""

from __future__ import annotations

from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Pod, Service

from tests.cluster import harness, nodes
from tests.integration import conftest as itc
from tests.integration.test_operator import ready_with, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def managed(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted(
        (m["manager"], m["operation"], m.get("subresource", ""))
        for m in body["metadata"].get("managedFields", [])
    )


def child_versions(kube: Client, ns: str, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    sel: dict[str, Any] = {"dualpath.io/cluster": name}
    kind: Any
    for kind in (Pod, Deployment, Service, ConfigMap):
        for obj in kube.list(kind, namespace=ns, labels=sel):
            out[f"{kind.__name__}/{obj.metadata.name}"] = obj.metadata.resourceVersion
    return out


def test_reapplying_the_same_spec_changes_nothing_and_a_settled_cluster_sees_no_writes(
    kube: Client, namespace: str, operator: itc.OperatorProcess, pool: tuple[str, list[nodes.NodeSpec]]
) -> None:
    label, _ = pool
    body = itc.cluster_body("gitops", label, prefill=1, decode=1)
    itc.apply_dpc(kube, namespace, body, manager="argocd-controller")
    settled = wait_status(kube, namespace, "gitops", ready_with(1, 1), "Ready with 1P:1D")

    again = itc.apply_dpc(kube, namespace, body, manager="argocd-controller")

    assert again["metadata"]["generation"] == settled["metadata"]["generation"]
    assert again["spec"] == settled["spec"]
    assert again["metadata"]["resourceVersion"] == settled["metadata"]["resourceVersion"]
    assert managed(again) == managed(settled)
    # The operator owns status only; the spec belongs to Argo CD alone.
    owners = {(m["manager"], m.get("subresource", "")) for m in again["metadata"]["managedFields"]}
    assert owners == {("argocd-controller", ""), ("dualpath-operator", "status")}

    before_children = child_versions(kube, namespace, "gitops")
    start = operator.metric("dualpath_operator_reconcile_total", 'result="success"')
    harness.wait_for(
        "three more reconcile passes (resync)",
        lambda: operator.metric("dualpath_operator_reconcile_total", 'result="success"') >= start + 3,
        60,
    )
    after = itc.get_dpc(kube, namespace, "gitops")
    assert after["metadata"]["resourceVersion"] == settled["metadata"]["resourceVersion"]
    assert managed(after) == managed(settled)
    assert child_versions(kube, namespace, "gitops") == before_children
