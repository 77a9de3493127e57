"""The one Kubernetes client wrapper of the operator (lightkube, async).

Every write goes through server-side apply with ONE field manager (:data:`FIELD_MANAGER`), so
``managedFields`` show exactly what the operator owns and re-applying an unchanged object is a no-op on
the server (no resourceVersion bump, no event).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource

#: Default field manager; ``OperatorConfig.field_manager`` overrides it (``make_client``).
FIELD_MANAGER = "dualpath-operator"
GROUP = "dualpath.io"
VERSION = "v1alpha1"

__all__ = ["FIELD_MANAGER", "ApiError", "AsyncClient", "DualPathCluster", "RequestCounter", "make_client"]

#: The DualPathCluster resource (status subresource: ``DualPathCluster.Status``).
DualPathCluster = create_namespaced_resource(GROUP, VERSION, "DualPathCluster", "dualpathclusters")


_current_pass: contextvars.ContextVar[collections.Counter[str] | None] = contextvars.ContextVar(
    "dualpath_api_requests_of_pass", default=None
)


class RequestCounter:
    """Counts API requests by HTTP method, in total and per reconcile pass (``counting_pass``)."""

    def __init__(self) -> None:
        self.totals: collections.Counter[str] = collections.Counter()
        #: Called with the HTTP method of every request (e.g. to feed a Prometheus counter).
        self.listeners: list[Callable[[str], None]] = []

    async def hook(self, request: Any) -> None:
        method = str(request.method)
        self.totals[method] += 1
        per_pass = _current_pass.get()
        if per_pass is not None:
            per_pass[method] += 1
        for listener in self.listeners:
            listener(method)

    @contextlib.contextmanager
    def counting_pass(self) -> Iterator[collections.Counter[str]]:
        """Count the requests made by the current task (and tasks it starts) inside the block."""
        counter: collections.Counter[str] = collections.Counter()
        token = _current_pass.set(counter)
        try:
            yield counter
        finally:
            _current_pass.reset(token)


def make_client(
    kubeconfig: str | None = None, field_manager: str = FIELD_MANAGER, counter: RequestCounter | None = None
) -> AsyncClient:
    """An async client from ``kubeconfig`` (or $KUBECONFIG, or the in-cluster service account) whose
    every write carries ``field_manager``; with ``counter``, every request is counted."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    config = KubeConfig.from_file(path) if path else KubeConfig.from_service_account()
    client = AsyncClient(config, field_manager=field_manager)
    if counter is not None:
        # lightkube exposes no request hook; its httpx client (AsyncClient -> GenericAsyncClient ->
        # httpx.AsyncClient) takes event hooks. Checked against lightkube 1.0.
        http = client._client._client
        http.event_hooks["request"].append(counter.hook)
    return client
