"""Kopf registrations only. Every handler just enqueues a cluster; :mod:`reconcile` does the work.

No ``@kopf.timer``/``@kopf.daemon`` and no ``@kopf.on.delete`` on DualPathCluster: Kopf would put a
finalizer on every object (docs/design/0001-timers-vs-finalizers.md). Children are garbage-collected
through ownerReferences; periodic work runs in the controller's single resync task. Watch events are
level triggers: they carry no decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from dualpath_operator import controller as controller_mod
from dualpath_operator import reconcile
from dualpath_operator import settings as settings_mod
from dualpath_operator.rendering import labels

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "dualpath.io", "v1alpha1", "dualpathclusters"
_CHILD_LABELS: Mapping[str, Any] = {
    labels.CLUSTER: kopf.PRESENT,
    labels.MANAGED_BY: labels.OPERATOR_NAME,
}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = settings_mod.OperatorConfig.from_env()
    settings_mod.configure(settings, config)
    reconciler = reconcile.Reconciler.from_config(config)
    ctl = controller_mod.Controller(
        reconcile_one=reconciler.run, resync_interval_s=config.resync_interval_seconds
    )
    ctl.start()
    memo["reconciler"] = reconciler
    memo["controller"] = ctl
    reconciler.start_metrics_server()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctl: controller_mod.Controller | None = memo.get("controller")
    if ctl is not None:
        await ctl.stop()
    rec: reconcile.Reconciler | None = memo.get("reconciler")
    if rec is not None:
        await rec.close()


def _controller(memo: kopf.Memo) -> controller_mod.Controller | None:
    ctl: controller_mod.Controller | None = memo.get("controller")
    return ctl


@kopf.on.event(GROUP, VERSION, PLURAL)
def cluster_event(**kwargs: Any) -> None:
    ctl = _controller(kwargs["memo"])
    if ctl is None:
        return
    key = (kwargs["namespace"], kwargs["name"])
    if kwargs.get("type") == "DELETED":
        ctl.cluster_gone(key)
    else:
        ctl.cluster_seen(key)


@kopf.on.event("", "v1", "pods", labels=_CHILD_LABELS)
def child_pod_event(**kwargs: Any) -> None:
    _child(kwargs["namespace"], kwargs["labels"], kwargs["memo"])


@kopf.on.event("apps", "v1", "deployments", labels=_CHILD_LABELS)
def child_deployment_event(**kwargs: Any) -> None:
    _child(kwargs["namespace"], kwargs["labels"], kwargs["memo"])


# A hand-deleted or hand-edited Service/ConfigMap/PDB/NetworkPolicy is restored within one pass.
@kopf.on.event("", "v1", "services", labels=_CHILD_LABELS)
def child_service_event(**kwargs: Any) -> None:
    _child(kwargs["namespace"], kwargs["labels"], kwargs["memo"])


@kopf.on.event("", "v1", "configmaps", labels=_CHILD_LABELS)
def child_configmap_event(**kwargs: Any) -> None:
    _child(kwargs["namespace"], kwargs["labels"], kwargs["memo"])


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=_CHILD_LABELS)
def child_pdb_event(**kwargs: Any) -> None:
    _child(kwargs["namespace"], kwargs["labels"], kwargs["memo"])


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=_CHILD_LABELS)
def child_netpol_event(**kwargs: Any) -> None:
    _child(kwargs["namespace"], kwargs["labels"], kwargs["memo"])


def _child(namespace: str, child_labels: Mapping[str, str], memo: kopf.Memo) -> None:
    ctl = _controller(memo)
    cluster = child_labels.get(labels.CLUSTER)
    if ctl is not None and cluster:
        ctl.child_changed((namespace, cluster))
