"""Gather: read a DualPathCluster's children from the API into a pure :class:`planning.observed.Observed`.

Only objects whose ownerReferences name the cluster's UID count as its children: a pod that merely
carries our labels is never adopted, changed or deleted.
"""

from __future__ import annotations

from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, Secret

from dualpath_operator.planning import observed
from dualpath_operator.rendering import labels, names


def _selector(match: dict[str, str]) -> dict[str, Any]:
    return dict(match)


def _owned_by(meta: Any, uid: str) -> bool:
    refs = (meta.ownerReferences if meta is not None else None) or []
    return any(r.uid == uid for r in refs)


def observe_pod(pod: Pod) -> observed.ObservedPod | None:
    """Convert one pod; ``None`` for a pod that lacks our role/ordinal labels."""
    meta = pod.metadata
    if meta is None or meta.name is None:
        return None
    lbl = meta.labels or {}
    ann = meta.annotations or {}
    role = lbl.get(labels.ROLE)
    ordinal = lbl.get(labels.ORDINAL, "")
    if role not in ("prefill", "decode") or not ordinal.isdigit():
        return None
    status = pod.status
    conditions = (status.conditions if status else None) or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    unsched = next(
        (c.message or c.reason or "Unschedulable" for c in conditions
         if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"),
        None,
    )  # fmt: skip
    return observed.ObservedPod(
        name=meta.name,
        role=role,
        ordinal=int(ordinal),
        template_hash=ann.get(labels.TEMPLATE_HASH, ""),
        phase=(status.phase if status and status.phase else "Pending"),
        ready=ready,
        node=pod.spec.nodeName if pod.spec else None,
        pod_ip=status.podIP if status else None,
        terminating=meta.deletionTimestamp is not None,
        unschedulable=unsched,
        draining_since=ann.get(labels.DRAINING),
        created=meta.creationTimestamp.isoformat() if meta.creationTimestamp else None,
    )


async def gather(client: AsyncClient, namespace: str, name: str, uid: str) -> observed.Observed:
    """Read pods, the scheduler Deployment and the admin Secret of one cluster."""
    pods: list[observed.ObservedPod] = []
    async for pod in client.list(Pod, namespace=namespace, labels=_selector(labels.engine_selector(name))):
        if _owned_by(pod.metadata, uid):
            obs = observe_pod(pod)
            if obs is not None:
                pods.append(obs)
    scheduler = observed.ObservedScheduler()
    try:
        dep = await client.get(Deployment, name=names.scheduler(name), namespace=namespace)
    except ApiError as e:
        if e.status.code != 404:
            raise
    else:
        if _owned_by(dep.metadata, uid):
            st = dep.status
            ann = (
                dep.spec.template.metadata.annotations if dep.spec and dep.spec.template.metadata else None
            ) or {}
            sched_ips: list[str] = []
            async for pod in client.list(
                Pod, namespace=namespace, labels=_selector(labels.scheduler_selector(name))
            ):
                if (
                    pod.status
                    and pod.status.podIP
                    and pod.metadata
                    and pod.metadata.deletionTimestamp is None
                ):
                    sched_ips.append(pod.status.podIP)
            scheduler = observed.ObservedScheduler(
                exists=True,
                replicas=(st.replicas or 0) if st else 0,
                ready_replicas=(st.readyReplicas or 0) if st else 0,
                updated_replicas=(st.updatedReplicas or 0) if st else 0,
                template_hash=ann.get(labels.TEMPLATE_HASH),
                pod_ips=tuple(sorted(sched_ips)),
            )
    secret_exists = True
    try:
        await client.get(Secret, name=names.admin_secret(name), namespace=namespace)
    except ApiError as e:
        if e.status.code != 404:
            raise
        secret_exists = False
    return observed.Observed(
        pods=tuple(sorted(pods, key=lambda p: (p.role, p.ordinal))),
        scheduler=scheduler,
        admin_secret_exists=secret_exists,
    )
