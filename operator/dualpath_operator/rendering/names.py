"""Names of the child objects of a DualPathCluster (all derived from the cluster's name)."""

from __future__ import annotations


def scheduler(cluster: str) -> str:
    return f"{cluster}-scheduler"


def engine_config(cluster: str) -> str:
    return f"{cluster}-engine-config"


def admin_secret(cluster: str) -> str:
    return f"{cluster}-scheduler-admin"


def engine_pod(cluster: str, ordinal: int) -> str:
    return f"{cluster}-engine-{ordinal}"


def engine_pdb(cluster: str) -> str:
    return f"{cluster}-engines"


def network_policy(cluster: str) -> str:
    return f"{cluster}-engines"
