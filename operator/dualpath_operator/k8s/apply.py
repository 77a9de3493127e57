"""Apply a plan's writes: server-side apply under the client's one field manager, deletes of owned pods only,
create-once Secrets, status through the status subresource.

Every function here is idempotent: applying the same manifest twice leaves the object (and its
resourceVersion) untouched on the second call.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, cast

from lightkube import AsyncClient, codecs
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Pod, Secret
from lightkube.types import PatchType

from dualpath_operator.k8s import client as k8s_client


async def apply(client: AsyncClient, manifest: Mapping[str, Any]) -> None:
    """Server-side apply one manifest as the client's field manager, taking ownership (force)."""
    obj = codecs.from_dict(dict(manifest))
    await client.apply(obj, force=True)


async def apply_all(client: AsyncClient, manifests: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    for m in manifests:
        await apply(client, m)
        count += 1
    return count


async def patch_pod_metadata(
    client: AsyncClient,
    namespace: str,
    name: str,
    labels: Mapping[str, str | None],
    annotations: Mapping[str, str | None],
) -> None:
    """Merge-patch labels/annotations of an existing pod (``None`` removes a key).

    Pods are otherwise immutable; re-applying the whole pod to change a label would also re-assert the
    spec, so metadata changes (role switch, drain marks) go through a merge patch.
    """
    body = {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}}
    await client.patch(
        Pod,
        name,
        body,
        namespace=namespace,
        patch_type=PatchType.MERGE,
        field_manager=k8s_client.FIELD_MANAGER,
    )


async def delete_pod(client: AsyncClient, namespace: str, name: str) -> None:
    """Delete one pod; an already-gone pod is fine."""
    try:
        await client.delete(Pod, name=name, namespace=namespace)
    except ApiError as e:
        if e.status.code != 404:
            raise


async def ensure_admin_secret(client: AsyncClient, manifest: Mapping[str, Any], key: str) -> bool:
    """Create the scheduler admin-token Secret once with a fresh random token; never overwrite it.

    Returns True if it was created now. The token never passes through the planner or the status.
    """
    body = dict(manifest)
    body["stringData"] = {key: secrets.token_urlsafe(32)}
    try:
        await client.create(cast(Secret, Secret.from_dict(body)))
    except ApiError as e:
        if e.status.code == 409:
            return False
        raise
    return True


async def read_admin_token(client: AsyncClient, namespace: str, name: str, key: str) -> str | None:
    """The scheduler admin token, for the operator's own calls to the scheduler's admin API."""
    try:
        sec = await client.get(Secret, name=name, namespace=namespace)
    except ApiError as e:
        if e.status.code == 404:
            return None
        raise
    raw = (sec.data or {}).get(key)
    return base64.b64decode(raw).decode() if raw else None


async def apply_status(client: AsyncClient, namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """Server-side apply the whole status of a DualPathCluster through its status subresource."""
    body = {
        "apiVersion": f"{k8s_client.GROUP}/{k8s_client.VERSION}",
        "kind": "DualPathCluster",
        "metadata": {"name": name, "namespace": namespace},
        "status": dict(status),
    }
    obj = k8s_client.DualPathCluster.Status.from_dict(body)
    await client.apply(obj, force=True)
