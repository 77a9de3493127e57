"""The chart renders valid Kubernetes 1.36 objects with least-privilege RBAC; runs helm lint/template."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import kubernetes_validate
import pytest

from dualpath_operator import settings
from tests.unit.chart.conftest import CHART, KUBE_VERSION, NAMESPACE, Render, RenderRaw

pytestmark = pytest.mark.timeout(120)

NON_DEFAULT_VALUES: dict[str, Any] = {
    "fullnameOverride": "dpo",
    "image": {"repository": "registry.local/dpo", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": ["regcred"],
    "watchNamespaces": ["team-a", "team-b"],
    "serviceAccount": {"create": True, "name": "dpo-sa", "annotations": {"example.com/role": "operator"}},
    "operator": {
        "fieldManager": "dpo",
        "resyncIntervalSeconds": 30,
        "postingLevel": "ERROR",
        "logFormat": "json",
        "verbose": True,
        "timeouts": {
            "watchServerSeconds": 60,
            "watchClientSeconds": 90,
            "watchConnectSeconds": 5,
            "watchInactivitySeconds": 65,
            "requestSeconds": 15,
            "requestConnectSeconds": 5,
        },
    },
    "liveness": {
        "port": 8181,
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 5,
    },
    "metrics": {
        "port": 9191,
        "service": {"enabled": True, "port": 8443, "annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "5s",
            "labels": {"release": "kps"},
        },
    },
    "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
    "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
    "podAnnotations": {"example.com/pod": "yes"},
    "podLabels": {"team": "ml"},
    "commonAnnotations": {"argocd.argoproj.io/sync-wave": "-1"},
    "commonLabels": {"cost-center": "inference"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}]
            }
        }
    },
    "priorityClassName": "system-cluster-critical",
}

# Kinds without a schema in kubernetes-validate (CRD-defined), checked structurally instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = find(docs, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def validate_all(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            assert doc["metadata"]["name"] and doc["spec"], doc
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def rules_of(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind, role document, rule) for every rule of every Role and ClusterRole."""
    return [(d["kind"], d, rule) for d in docs if d["kind"] in {"Role", "ClusterRole"} for rule in d["rules"]]


def grants(
    docs: list[dict[str, Any]], group: str, resource: str, *, namespace: str | None = None
) -> set[str]:
    """Verbs granted on ``group/resource`` (Roles only in ``namespace`` when given)."""
    verbs: set[str] = set()
    for kind, role, rule in rules_of(docs):
        if kind == "Role" and namespace is not None and role["metadata"]["namespace"] != namespace:
            continue
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs.update(rule["verbs"])
    return verbs


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def test_helm_lint_passes_strict(helm: str) -> None:
    for extra in (
        [],
        ["--set", "watchNamespaces={team-a,team-b}", "--set", "metrics.serviceMonitor.enabled=true"],
    ):
        result = subprocess.run(
            [helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["defaults", "non-defaults"])
def test_rendered_objects_are_valid_for_kubernetes_1_36(
    render: Render, values: dict[str, Any] | None
) -> None:
    docs = render(values)
    validate_all(docs)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= kinds


def test_chart_rejects_a_cluster_older_than_1_30(render_raw: RenderRaw) -> None:
    result = render_raw(None, "--kube-version", "1.29.0")
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr or "1.29" in result.stderr, result.stderr


def test_operator_runs_as_one_standalone_replica_replaced_with_recreate(render: Render) -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = container(docs)["args"]
    assert "--standalone" in args
    assert not any(a.startswith("--peering") for a in args)
    assert "--all-namespaces" in args
    assert "--module=dualpath_operator.handlers" in args


def test_pod_is_non_root_with_a_read_only_root_filesystem(render: Render) -> None:
    for values in (None, NON_DEFAULT_VALUES):
        docs = render(values)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        security = container(docs)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_liveness_probe_targets_kopfs_liveness_endpoint(render: Render) -> None:
    for values, port in ((None, 8080), (NON_DEFAULT_VALUES, 8181)):
        docs = render(values)
        c = container(docs)
        assert f"--liveness=http://0.0.0.0:{port}/healthz" in c["args"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["healthz"] == port
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_environment_is_a_valid_operator_config_matching_the_values(render: Render) -> None:
    docs = render(NON_DEFAULT_VALUES)
    env = {e["name"]: e["value"] for e in container(docs)["env"]}
    config = settings.OperatorConfig.from_env(env)
    assert config.field_manager == "dpo"
    assert config.metrics_host == "0.0.0.0"
    assert config.metrics_port == 9191
    assert config.resync_interval_seconds == 30
    assert config.posting_level == "ERROR"
    assert config.watch_server_timeout_seconds == 60
    assert config.watch_client_timeout_seconds == 90
    assert config.watch_inactivity_timeout_seconds == 65
    assert config.request_timeout_seconds == 15
    assert settings.OperatorConfig.from_env({e["name"]: e["value"] for e in container(render())["env"]}) == (
        settings.OperatorConfig(metrics_host="0.0.0.0")
    ), "chart defaults drifted from OperatorConfig defaults"


def test_metrics_service_selects_the_operator_pod(render: Render) -> None:
    docs = render(NON_DEFAULT_VALUES)
    service = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8443
    assert port["targetPort"] == "metrics"
    assert {"name": "metrics", "containerPort": 9191, "protocol": "TCP"} in container(docs)["ports"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kps"


def test_service_monitor_is_off_by_default_and_needs_the_service(
    render: Render, render_raw: RenderRaw
) -> None:
    assert not find(render(), "ServiceMonitor")
    result = render_raw({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled requires metrics.service.enabled" in result.stderr


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["all-namespaces", "namespaced"])
def test_rbac_has_no_wildcards(render: Render, values: dict[str, Any] | None) -> None:
    for _, _, rule in rules_of(render(values)):
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in item for item in rule.get(key, [])), rule


def test_rbac_grants_exactly_what_the_operator_needs(render: Render) -> None:
    docs = render()
    write = {"get", "list", "watch", "create", "patch", "delete"}
    expected = {
        ("dualpath.io", "dualpathclusters"): {"get", "list", "watch"},
        ("dualpath.io", "dualpathclusters/status"): {"get", "patch"},
        ("dualpath.io", "dualpathclusters/finalizers"): {"update"},
        ("", "pods"): write,
        ("", "services"): write,
        ("", "configmaps"): write,
        ("", "secrets"): {"get", "create", "patch"},
        ("", "events"): {"create", "patch"},
        ("apps", "deployments"): write,
        ("policy", "poddisruptionbudgets"): write,
        ("networking.k8s.io", "networkpolicies"): write,
        ("", "nodes"): {"get", "list", "watch"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    }
    granted = {
        (group, resource)
        for _, _, rule in rules_of(docs)
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == set(expected), "unexpected or missing resources in RBAC"
    for (group, resource), verbs in expected.items():
        assert grants(docs, group, resource) == verbs, (group, resource)


def test_the_operator_cannot_write_a_dualpathclusters_spec_or_metadata(render: Render) -> None:
    for values in (None, NON_DEFAULT_VALUES):
        docs = render(values)
        assert grants(docs, "dualpath.io", "dualpathclusters") == {"get", "list", "watch"}
        assert "update" not in grants(docs, "dualpath.io", "dualpathclusters/status")


def test_secrets_can_be_neither_listed_nor_watched(render: Render) -> None:
    for values in (None, NON_DEFAULT_VALUES):
        verbs = grants(render(values), "", "secrets")
        assert verbs == {"get", "create", "patch"}


def test_no_peering_or_lease_permissions(render: Render) -> None:
    docs = render()
    for _, _, rule in rules_of(docs):
        assert "kopf.dev" not in rule["apiGroups"]
        assert "coordination.k8s.io" not in rule["apiGroups"]


def test_all_namespaces_mode_binds_cluster_roles_to_the_service_account(render: Render) -> None:
    docs = render()
    account = one(docs, "ServiceAccount")["metadata"]
    assert not find(docs, "Role")
    roles = {r["metadata"]["name"] for r in find(docs, "ClusterRole")}
    bindings = find(docs, "ClusterRoleBinding")
    assert {b["roleRef"]["name"] for b in bindings} == roles
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}
        ]
    assert account["namespace"] == NAMESPACE
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]


def test_namespaced_mode_grants_namespaced_rights_only_in_the_listed_namespaces(render: Render) -> None:
    docs = render(NON_DEFAULT_VALUES)
    args = container(docs)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    assert {r["metadata"]["namespace"] for r in find(docs, "Role")} == {"team-a", "team-b"}
    for binding in find(docs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dpo-sa", "namespace": NAMESPACE}]
    cluster_rules = [rule for kind, _, rule in rules_of(docs) if kind == "ClusterRole"]
    cluster_resources = {r for rule in cluster_rules for r in rule["resources"]}
    assert cluster_resources == {"nodes", "customresourcedefinitions", "namespaces"}
    for _, _, rule in rules_of(docs):
        if "namespaces" in rule["resources"]:
            assert set(rule["verbs"]) == {"list", "watch"}
    assert grants(docs, "", "pods", namespace="team-a") >= {"create", "delete"}


def test_common_annotations_reach_every_object(render: Render) -> None:
    for doc in render(NON_DEFAULT_VALUES):
        assert doc["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1", doc["kind"]
        assert doc["metadata"]["labels"]["cost-center"] == "inference", doc["kind"]


def test_image_tag_defaults_to_the_app_version(render: Render) -> None:
    chart = (CHART / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion:\s*"?([^"\n]+)"?', chart, re.M)
    assert app_version is not None
    assert container(render())["image"] == f"ghcr.io/dualpath/dualpath-operator:{app_version.group(1)}"
    assert container(render(NON_DEFAULT_VALUES))["image"] == "registry.local/dpo:1.2.3"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"replicas": 2}, "replicas"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"operator": {"postingLevel": "LOUD"}}, "postingLevel"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"securityContext": {"runAsUser": 0}}, "runAsUser"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        ({"operator": {"timeouts": {"watchServerSeconds": 90.5}}}, "watchServerSeconds"),
    ],
)
def test_schema_rejects_a_bad_value_naming_it(
    render_raw: RenderRaw, values: dict[str, Any], named: str
) -> None:
    result = render_raw(values)
    assert result.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert named in result.stderr, result.stderr


def test_watch_client_timeout_must_exceed_the_server_timeout(render_raw: RenderRaw) -> None:
    values = {"operator": {"timeouts": {"watchServerSeconds": 200, "watchClientSeconds": 100}}}
    result = render_raw(values)
    assert result.returncode != 0
    assert "watchClientSeconds must be greater than" in result.stderr
