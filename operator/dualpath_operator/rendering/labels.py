"""Label and annotation keys on every child object, and the selectors built from them.

Children never carry ``app.kubernetes.io/instance`` (Argo CD's default tracking label): Argo CD would
otherwise list them as extra resources of the Application and prune them.
"""

from __future__ import annotations

CLUSTER = "dualpath.io/cluster"
COMPONENT = "dualpath.io/component"
ROLE = "dualpath.io/role"
ORDINAL = "dualpath.io/ordinal"
GROUP_ID = "dualpath.io/group"

TEMPLATE_HASH = "dualpath.io/template-hash"
CONFIG_HASH = "dualpath.io/config-hash"
DRAINING = "dualpath.io/draining"
MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "dualpath-operator"

ENGINE = "engine"
SCHEDULER = "scheduler"


def common(cluster: str, component: str) -> dict[str, str]:
    """Labels every child of ``cluster`` carries."""
    return {
        CLUSTER: cluster,
        COMPONENT: component,
        MANAGED_BY: OPERATOR_NAME,
        "app.kubernetes.io/part-of": "dualpath",
        "app.kubernetes.io/name": f"dualpath-{component}",
    }


def engine_selector(cluster: str) -> dict[str, str]:
    return {CLUSTER: cluster, COMPONENT: ENGINE}


def scheduler_selector(cluster: str) -> dict[str, str]:
    return {CLUSTER: cluster, COMPONENT: SCHEDULER}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
