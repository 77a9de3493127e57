"""Kubernetes Events about a DualPathCluster, posted only on transitions (the planner decides which).

Reasons are UpperCamelCase members of :class:`dualpath_operator.api.conditions.EventReason`-like enums
chosen by the planner; this module only writes them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from lightkube import AsyncClient
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event

from dualpath_operator.k8s import client as k8s_client


async def post(
    client: AsyncClient, owner: dict[str, Any], event_type: str, reason: str, message: str
) -> None:
    """Post one Event about ``owner`` (a DualPathCluster body); failures are not fatal to reconcile."""
    meta = owner["metadata"]
    now = dt.datetime.now(dt.UTC)
    ev = Event(
        metadata=ObjectMeta(name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]),
        involvedObject=ObjectReference(
            apiVersion=f"{k8s_client.GROUP}/{k8s_client.VERSION}",
            kind="DualPathCluster",
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
            resourceVersion=meta.get("resourceVersion"),
        ),
        type=event_type,
        reason=reason,
        message=message[:1024],
        source=EventSource(component=k8s_client.FIELD_MANAGER),
        reportingComponent=k8s_client.FIELD_MANAGER,
        firstTimestamp=now,
        lastTimestamp=now,
        count=1,
    )
    await client.create(ev)
