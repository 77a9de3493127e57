"""The real API server enforces the DualPathCluster schema: every invalid spec is rejected with a
message naming the offending field, valid edge cases are accepted and stored as the models expect.

Runs against the local control plane (``cluster``/``kube``/``namespace`` fixtures of tests/conftest.py).
The CRDs come from ``crds/*.yaml`` (what ``make crds`` generated), applied by a module fixture that
waits for them to be Established. The invalid cases live in ``tests/unit/api/specs.py``, where the
unit tests check that the pydantic models reject them too.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client, codecs
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Namespace
from lightkube.types import PatchType

from dualpath_operator.api.v1alpha1 import cluster
from tests.unit.api import specs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
DualPathCluster = create_namespaced_resource(
    "dualpath.io", "v1alpha1", "DualPathCluster", "dualpathclusters", verbs=None
)
DualPathClusterStatus = DualPathCluster.Status
"""The status subresource: the only way the operator writes a DualPathCluster."""


def _wait(what: str, predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def crds(kube: Client) -> list[str]:
    """Apply every CRD in crds/ (server-side) and wait until each is Established."""
    names = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = codecs.from_dict(yaml.safe_load(path.read_text()))
        kube.apply(crd, field_manager="dualpath-tests", force=True)
        assert crd.metadata is not None and crd.metadata.name is not None
        names.append(crd.metadata.name)

    def established(name: str) -> bool:
        got = kube.get(CustomResourceDefinition, name)
        return any(
            c.type == "Established" and c.status == "True"
            for c in (got.status and got.status.conditions) or []
        )

    for name in names:
        _wait(f"CRD {name} Established", lambda name=name: established(name))
    return names


@pytest.fixture(scope="module")
def rejects_ns(kube: Client, crds: list[str]) -> Iterator[str]:
    """One namespace for all rejected creates: nothing is ever stored in it."""
    name = f"t-validation-{uuid.uuid4().hex[:6]}"
    kube.create(Namespace(metadata=ObjectMeta(name=name, labels={"dualpath.io/test": "true"})))
    yield name
    kube.delete(Namespace, name=name)


def _as_dict(obj: Any) -> dict[str, Any]:
    """A generic resource (a dict subclass) as a plain dict with plain metadata."""
    out = dict(obj)
    if isinstance(out.get("metadata"), ObjectMeta):
        out["metadata"] = out["metadata"].to_dict()
    return out


def _create(kube: Client, body: dict[str, Any], namespace: str) -> dict[str, Any]:
    return _as_dict(kube.create(DualPathCluster(**copy.deepcopy(body)), namespace=namespace))


def _rejection(kube: Client, body: dict[str, Any], namespace: str) -> str:
    with pytest.raises(ApiError) as err:
        _create(kube, body, namespace)
    assert err.value.status.code == 422, err.value.status
    return str(err.value.status.message)


@pytest.mark.parametrize("case", specs.INVALID, ids=lambda c: c.id)
def test_invalid_spec_is_rejected_naming_the_field(kube: Client, rejects_ns: str, case: specs.Case) -> None:
    message = _rejection(kube, case.body(), rejects_ns)
    assert case.names in message, message


def test_there_are_at_least_thirty_invalid_cases() -> None:
    assert len(specs.INVALID) >= 30


def test_minimal_spec_is_stored_with_the_models_defaults(
    kube: Client, crds: list[str], namespace: str
) -> None:
    body = specs.valid_cluster("minimal")
    stored = _create(kube, body, namespace)
    parsed = cluster.DualPathCluster.model_validate(body)
    assert stored["spec"] == parsed.model_dump(mode="json", by_alias=True, exclude_none=True)["spec"]
    # and what the server stored parses back to the same model
    assert (
        cluster.DualPathCluster.model_validate({**stored, "metadata": {"name": "minimal"}}).spec
        == parsed.spec
    )


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples").glob("dualpathcluster-*.yaml")), ids=lambda p: p.name
)
def test_examples_are_accepted(kube: Client, crds: list[str], namespace: str, path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    stored = _create(kube, body, namespace)
    assert stored["spec"]["ratio"] == {**{"mode": "Fixed"}, **body["spec"]["ratio"]}


def _edge(name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    body = specs.valid_cluster(name)
    for key, value in sections.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    return body


VALID_EDGES: dict[str, dict[str, Any]] = {
    "sixteen-gpus-tensor-parallel-16": _edge(
        "tp16",
        model={"name": "tiny", "source": "random", "tensorParallel": 16},
        prefill={"gpusPerPod": 16},
        decode={"gpusPerPod": 16},
        ratio={"prefill": 1, "decode": 1, "gpuBudget": 32},
    ),
    "counts-at-bounds-budget-exact": _edge(
        "bounds",
        prefill={"min": 2, "max": 2, "gpusPerPod": 4},
        decode={"min": 3, "max": 3, "gpusPerPod": 4},
        ratio={"prefill": 2, "decode": 3, "gpuBudget": 20},
    ),
    "auto-without-counts-or-budget": _edge("auto", ratio={"mode": "Auto", "prefill": None, "decode": None}),
    "quantities-int-and-string": _edge(
        "quantities",
        prefill={"resources": {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"cpu": "2500m"}}},
    ),
    "compound-durations-equal": _edge(
        "durations",
        rebalance={"interval": "1m30s", "cooldown": "90s"},
        telemetry={"interval": "1s", "window": "1000ms"},
    ),
    "env-from-secret-and-field": _edge(
        "env",
        engine={
            "image": "dualpath-engine:0.1.0",
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
        },
    ),
    "prometheus-telemetry": _edge(
        "prom", telemetry={"source": "Prometheus", "prometheusUrl": "http://prometheus.monitoring:9090"}
    ),
    "scheduling-constraints": _edge(
        "placement",
        prefill={
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "dualpath.io/network-block", "operator": "In", "values": ["b1"]}
                                ]
                            }
                        ]
                    }
                },
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": {"matchLabels": {"app": "other"}},
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }
                    ]
                },
            },
        },
    ),
    "name-of-forty-characters": specs.valid_cluster("a" * 40),
}


@pytest.mark.parametrize("name", sorted(VALID_EDGES))
def test_valid_edge_case_is_accepted_and_parses(
    kube: Client, crds: list[str], namespace: str, name: str
) -> None:
    body = VALID_EDGES[name]
    cluster.DualPathCluster.model_validate(body)
    stored = _create(kube, body, namespace)
    parsed = cluster.DualPathCluster.model_validate(
        {**stored, "metadata": {"name": stored["metadata"]["name"]}}
    )
    expected = cluster.DualPathCluster.model_validate(body).spec
    assert parsed.spec == expected


def test_volume_source_is_kept_verbatim(kube: Client, crds: list[str], namespace: str) -> None:
    volume = {
        "csi": {"driver": "3fs.csi.example.com", "volumeAttributes": {"cluster": "kv", "nested": "yes"}}
    }
    body = specs.valid_cluster("csi")
    body["spec"]["storage"]["volume"] = volume
    assert _create(kube, body, namespace)["spec"]["storage"]["volume"] == volume


def test_unknown_spec_fields_are_pruned(kube: Client, crds: list[str], namespace: str) -> None:
    body = specs.valid_cluster("pruned")
    body["spec"]["ratio"]["prefil"] = 3
    stored = _create(kube, body, namespace)
    assert "prefil" not in stored["spec"]["ratio"]


@pytest.mark.parametrize(("case_id", "mutate", "names"), specs.IMMUTABLE, ids=[c[0] for c in specs.IMMUTABLE])
def test_destructive_changes_are_refused_on_update(
    kube: Client, crds: list[str], namespace: str, case_id: str, mutate: Any, names: str
) -> None:
    stored = _create(kube, specs.valid_cluster("immutable"), namespace)
    changed = copy.deepcopy(stored)
    mutate(changed)
    with pytest.raises(ApiError) as err:
        kube.replace(DualPathCluster(**changed))
    assert err.value.status.code == 422
    assert names in str(err.value.status.message) and "immutable" in str(err.value.status.message)


def test_other_changes_are_accepted_on_update(kube: Client, crds: list[str], namespace: str) -> None:
    stored = _create(kube, specs.valid_cluster("mutable"), namespace)
    changed = copy.deepcopy(stored)
    changed["spec"]["ratio"]["decode"] = 3
    changed["spec"]["model"]["maxContextTokens"] = 65536
    replaced = _as_dict(kube.replace(DualPathCluster(**changed)))
    assert replaced["spec"]["ratio"]["decode"] == 3
    assert replaced["metadata"]["generation"] == stored["metadata"]["generation"] + 1


def test_status_written_through_the_subresource_round_trips(
    kube: Client, crds: list[str], namespace: str
) -> None:
    from datetime import UTC, datetime

    from dualpath_operator.api import conditions
    from dualpath_operator.api.v1alpha1 import status as statuses

    stored = _create(kube, specs.valid_cluster("withstatus"), namespace)
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    conds = conditions.set_condition(
        [],
        conditions.ConditionType.READY,
        conditions.ConditionStatus.FALSE,
        conditions.Reason.CREATING,
        "",
        now,
        1,
    )
    status = statuses.DualPathClusterStatus(
        observed_generation=1,
        conditions=conds,
        prefill=statuses.RoleStatus(replicas=1, ready=0),
        decode=statuses.RoleStatus(replicas=2, ready=0),
        ratio=statuses.format_ratio(0, 0),
        desired_ratio=statuses.format_ratio(1, 2),
        path_weights=[
            statuses.PathWeight(
                node="n1", snic_capacity_bps=5 * 10**10, snic_utilization=0.25, cnic_headroom=1, weight=0.5
            )
        ],
    )
    body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    patched = _as_dict(
        kube.patch(
            DualPathClusterStatus,
            "withstatus",
            {"status": body},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )
    )
    assert patched["status"] == body
    assert patched["metadata"]["generation"] == stored["metadata"]["generation"]
    assert statuses.DualPathClusterStatus.model_validate(patched["status"]) == status
