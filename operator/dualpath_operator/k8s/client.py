"""The one Kubernetes client wrapper of the operator (lightkube, async).

Every write goes through server-side apply with ONE field manager (:data:`FIELD_MANAGER`), so
``managedFields`` show exactly what the operator owns and re-applying an unchanged object is a no-op on
the server (no resourceVersion bump, no event).
"""

from __future__ import annotations

import os

from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource

#: Default field manager; ``OperatorConfig.field_manager`` overrides it (``make_client``).
FIELD_MANAGER = "dualpath-operator"
GROUP = "dualpath.io"
VERSION = "v1alpha1"

__all__ = ["FIELD_MANAGER", "ApiError", "AsyncClient", "DualPathCluster", "make_client"]

#: The DualPathCluster resource (status subresource: ``DualPathCluster.Status``).
DualPathCluster = create_namespaced_resource(GROUP, VERSION, "DualPathCluster", "dualpathclusters")


def make_client(kubeconfig: str | None = None, field_manager: str = FIELD_MANAGER) -> AsyncClient:
    """An async client from ``kubeconfig`` (or $KUBECONFIG, or the in-cluster service account) whose
    every write carries ``field_manager``."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    config = KubeConfig.from_file(path) if path else KubeConfig.from_service_account()
    return AsyncClient(config, field_manager=field_manager)
