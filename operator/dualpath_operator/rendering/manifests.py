"""Pure builders of every child object of a DualPathCluster, as plain dicts ready for server-side apply.

Children (all carry an ownerReference to the cluster, so deleting it garbage-collects them):

- ConfigMap ``<c>-engine-config``: ``engine.yaml`` + ``scheduler.yaml`` (:mod:`rendering.engine_config`);
- Secret ``<c>-scheduler-admin``: the admin API bearer token (created once, never in a plan's data);
- Deployment + Service ``<c>-scheduler``: the central scheduler (one replica in v1alpha1);
- Pods ``<c>-engine-<ordinal>``: one engine group (all GPUs of one node) each, role in a label;
- PodDisruptionBudget ``<c>-engines``: voluntary evictions take at most one engine group at a time;
- NetworkPolicy ``<c>-engines``: engine ports reachable only from the cluster's own pods and the operator.

Engine pods request ``gpusPerPod`` GPUs, ``gpusPerPod * perGpu`` compute-NIC VFs and the storage-NIC
resource; every request equals its limit (Guaranteed QoS, which the kubelet's Topology Manager needs
to align GPUs and VFs on one NUMA node / PCIe root: docs/operations.md). Only IPC_LOCK is added
(RDMA pins memory); the pod runs as non-root without a service-account token.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.rendering import engine_config, labels, names

Role = Literal["prefill", "decode"]
ENGINE_UID = 10001
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class ClusterRef:
    """Identity of the owning DualPathCluster."""

    name: str
    namespace: str
    uid: str


def owner_reference(ref: ClusterRef) -> dict[str, Any]:
    return {
        "apiVersion": "dualpath.io/v1alpha1",
        "kind": "DualPathCluster",
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(
    ref: ClusterRef, name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": {**labels.common(ref.name, component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(ref)],
    }


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---- configuration ----------------------------------------------------------------------------------


def engine_configmap(ref: ClusterRef, spec: api.DualPathClusterSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ref, names.engine_config(ref.name), labels.ENGINE),
        "data": engine_config.render(ref.name, ref.namespace, spec),
    }


def admin_secret(ref: ClusterRef) -> dict[str, Any]:
    """The admin-token Secret without data (the applier adds a random token on first creation)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(ref, names.admin_secret(ref.name), labels.SCHEDULER),
        "type": "Opaque",
    }


# ---- shared pod pieces --------------------------------------------------------------------------------


def _security_context(add_ipc_lock: bool) -> dict[str, Any]:
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if add_ipc_lock:
        caps["add"] = ["IPC_LOCK"]
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": ENGINE_UID,
        "capabilities": caps,
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": ENGINE_UID,
        "runAsGroup": ENGINE_UID,
        "fsGroup": ENGINE_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _health_probes() -> dict[str, Any]:
    """Readiness (every 2 s) and liveness (every 10 s, 6 misses) on the process's ``/healthz``."""
    return {
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _user_env(spec: api.DualPathClusterSpec) -> list[dict[str, Any]]:
    return [_dump(e) for e in (spec.engine.env or [])]


def _guaranteed(resources: dict[str, Any] | None, extra_limits: dict[str, str]) -> dict[str, Any]:
    """Merge user cpu/memory with the device resources; requests == limits (Guaranteed QoS)."""
    res = copy.deepcopy(resources or {})
    limits = {**res.get("limits", {}), **extra_limits}
    requests = {**res.get("requests", {})}
    for k, v in limits.items():
        requests.setdefault(k, v)
    for k, v in requests.items():
        limits.setdefault(k, v)
    return {"limits": limits, "requests": requests}


# ---- scheduler -------------------------------------------------------------------------------------


def scheduler_pod_template(
    ref: ClusterRef, spec: api.DualPathClusterSpec, config_hash: str
) -> dict[str, Any]:
    s = spec.scheduler
    env: list[dict[str, Any]] = [_field_env("DUALPATH_HOST", "status.podIP")]
    if s.api_key_secret_ref is not None:
        env.append({"name": "DUALPATH_API_KEY", "valueFrom": {"secretKeyRef": _dump(s.api_key_secret_ref)}})
    env += _user_env(spec)
    container: dict[str, Any] = {
        "name": "scheduler",
        "image": spec.engine.image,
        "imagePullPolicy": str(spec.engine.pull_policy),
        "command": ["python", "-m", "dualpath_engine", "scheduler"],
        "args": ["--config", f"{engine_config.CONFIG_DIR}/{engine_config.SCHEDULER_FILE}"],
        "env": env,
        "ports": [{"name": "http", "containerPort": s.port, "protocol": "TCP"}],
        **_health_probes(),
        "securityContext": _security_context(add_ipc_lock=False),
        "volumeMounts": [
            {"name": "config", "mountPath": engine_config.CONFIG_DIR, "readOnly": True},
            {"name": "admin-token", "mountPath": engine_config.ADMIN_TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if s.resources is not None:
        container["resources"] = _dump(s.resources)
    return {
        "metadata": {
            "labels": labels.common(ref.name, labels.SCHEDULER),
            "annotations": {labels.CONFIG_HASH: config_hash},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security_context(),
            "containers": [container],
            "volumes": [
                {"name": "config", "configMap": {"name": names.engine_config(ref.name)}},
                {
                    "name": "admin-token",
                    "secret": {
                        "secretName": names.admin_secret(ref.name),
                        "items": [
                            {"key": engine_config.ADMIN_TOKEN_KEY, "path": engine_config.ADMIN_TOKEN_KEY}
                        ],
                    },
                },
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }


def scheduler_deployment(ref: ClusterRef, spec: api.DualPathClusterSpec, config_hash: str) -> dict[str, Any]:
    template = scheduler_pod_template(ref, spec, config_hash)
    template["metadata"]["annotations"][labels.TEMPLATE_HASH] = digest(template)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ref, names.scheduler(ref.name), labels.SCHEDULER),
        "spec": {
            "replicas": spec.scheduler.replicas,
            # The scheduler holds request state in memory: never run two at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels.scheduler_selector(ref.name)},
            "template": template,
        },
    }


def scheduler_service(ref: ClusterRef, spec: api.DualPathClusterSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, names.scheduler(ref.name), labels.SCHEDULER),
        "spec": {
            "type": "ClusterIP",
            "selector": labels.scheduler_selector(ref.name),
            "ports": [{"name": "http", "port": spec.scheduler.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


# ---- engines ----------------------------------------------------------------------------------------


def role_spec(spec: api.DualPathClusterSpec, role: Role) -> specs.RoleSpec:
    return spec.prefill if role == "prefill" else spec.decode


def multus_networks(spec: api.DualPathClusterSpec, gpus: int) -> str | None:
    """The pod's Multus networks annotation: one compute attachment per VF, then the storage networks.

    With a single compute NetworkAttachmentDefinition it is attached once per VF (gpus x perGpu);
    with several (one per rail) each is attached once, in order.
    """
    nic = spec.network.compute_nic
    compute = list(nic.networks or [])
    if len(compute) == 1:
        compute = compute * (gpus * nic.per_gpu)
    storage = list(spec.network.storage_nic.networks or [])
    nets = compute + storage
    return ",".join(nets) if nets else None


def _anti_affinity(ref: ClusterRef) -> dict[str, Any]:
    return {
        "labelSelector": {"matchLabels": labels.engine_selector(ref.name)},
        "topologyKey": "kubernetes.io/hostname",
    }


def _affinity(ref: ClusterRef, rs: specs.RoleSpec) -> dict[str, Any]:
    aff: dict[str, Any] = _dump(rs.affinity) if rs.affinity is not None else {}
    anti = aff.setdefault("podAntiAffinity", {})
    terms = anti.setdefault("requiredDuringSchedulingIgnoredDuringExecution", [])
    terms.append(_anti_affinity(ref))
    return aff


def engine_pod_spec(
    ref: ClusterRef, spec: api.DualPathClusterSpec, role: Role, config_hash: str
) -> dict[str, Any]:
    """The pod spec of an engine group of ``role``; identical for every ordinal (per-pod values come
    from the downward API), so its hash detects a needed replacement."""
    rs = role_spec(spec, role)
    gpus = rs.gpus_per_pod
    net = spec.network
    device_limits = {
        GPU_RESOURCE: str(gpus),
        net.compute_nic.resource_name: str(gpus * net.compute_nic.per_gpu),
    }
    if net.storage_nic.resource_name in device_limits:
        device_limits[net.storage_nic.resource_name] = str(
            int(device_limits[net.storage_nic.resource_name]) + net.storage_nic.count
        )
    else:
        device_limits[net.storage_nic.resource_name] = str(net.storage_nic.count)
    user_res = _dump(rs.resources) if rs.resources is not None else None
    port = spec.engine.port
    env = [
        _field_env("DUALPATH_ROLE", f"metadata.labels['{labels.ROLE}']"),
        _field_env("DUALPATH_GROUP_ID", f"metadata.labels['{labels.ORDINAL}']"),
        _field_env("DUALPATH_NODE_NAME", "spec.nodeName"),
        _field_env("DUALPATH_HOST", "status.podIP"),
        *_user_env(spec),
    ]
    container: dict[str, Any] = {
        "name": "engine",
        "image": spec.engine.image,
        "imagePullPolicy": str(spec.engine.pull_policy),
        "command": ["python", "-m", "dualpath_engine", "engine"],
        "args": [
            "--config",
            f"{engine_config.CONFIG_DIR}/{engine_config.ENGINE_FILE}",
            *(spec.engine.extra_args or []),
        ],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": port, "protocol": "TCP"},
            {"name": "kv", "containerPort": port + engine_config.KV_TRANSPORT_PORT_OFFSET, "protocol": "TCP"},
        ],
        "resources": _guaranteed(user_res, device_limits),
        **_health_probes(),
        "securityContext": _security_context(add_ipc_lock=True),
        "volumeMounts": [
            {"name": "config", "mountPath": engine_config.CONFIG_DIR, "readOnly": True},
            {"name": "kv-store", "mountPath": spec.storage.mount_path},
            {"name": "host-buffer", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.network.emulation.enabled:
        container["volumeMounts"].append(
            {"name": "emulated-sysfs", "mountPath": engine_config.EMULATED_SYSFS_DIR}
        )
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(),
        # Time for a drain that the operator did not get to run (e.g. a node drain) to finish in-flight work.
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.engine_config(ref.name)}},
            {"name": "kv-store", **copy.deepcopy(spec.storage.volume)},
            {
                "name": "host-buffer",
                "emptyDir": {"medium": "Memory", "sizeLimit": f"{spec.storage.buffer_gib}Gi"},
            },
            {"name": "tmp", "emptyDir": {}},
        ],
        "affinity": _affinity(ref, rs),
    }
    if spec.network.emulation.enabled:
        pod_spec["volumes"].append(
            {
                "name": "emulated-sysfs",
                "hostPath": {"path": spec.network.emulation.sysfs_host_path, "type": "DirectoryOrCreate"},
            }
        )
    if rs.node_selector:
        pod_spec["nodeSelector"] = dict(rs.node_selector)
    if rs.tolerations:
        pod_spec["tolerations"] = [_dump(t) for t in rs.tolerations]
    return pod_spec


def engine_template_hash(ref: ClusterRef, spec: api.DualPathClusterSpec, role: Role, config_hash: str) -> str:
    return digest({"spec": engine_pod_spec(ref, spec, role, config_hash), "config": config_hash,
                   "networks": multus_networks(spec, role_spec(spec, role).gpus_per_pod)})  # fmt: skip


def engine_pod(
    ref: ClusterRef, spec: api.DualPathClusterSpec, role: Role, ordinal: int, config_hash: str
) -> dict[str, Any]:
    rs = role_spec(spec, role)
    annotations = {
        labels.TEMPLATE_HASH: engine_template_hash(ref, spec, role, config_hash),
        labels.CONFIG_HASH: config_hash,
    }
    nets = multus_networks(spec, rs.gpus_per_pod)
    if nets:
        annotations[labels.MULTUS_NETWORKS] = nets
    meta = _meta(
        ref,
        names.engine_pod(ref.name, ordinal),
        labels.ENGINE,
        {labels.ROLE: role, labels.ORDINAL: str(ordinal)},
    )
    meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": engine_pod_spec(ref, spec, role, config_hash),
    }


def engine_pdb(ref: ClusterRef) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(ref, names.engine_pdb(ref.name), labels.ENGINE),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels.engine_selector(ref.name)}},
    }


def network_policy(ref: ClusterRef, spec: api.DualPathClusterSpec) -> dict[str, Any]:
    port = spec.engine.port
    cluster_pods = {"podSelector": {"matchLabels": {labels.CLUSTER: ref.name}}}
    operator_pods = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": labels.OPERATOR_NAME}},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(ref, names.network_policy(ref.name), labels.ENGINE),
        "spec": {
            "podSelector": {"matchLabels": labels.engine_selector(ref.name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [cluster_pods],
                    "ports": [
                        {"protocol": "TCP", "port": port},
                        {"protocol": "TCP", "port": port + engine_config.KV_TRANSPORT_PORT_OFFSET},
                    ],
                },
                {"from": [operator_pods], "ports": [{"protocol": "TCP", "port": port}]},
            ],
        },
    }


def static_children(ref: ClusterRef, spec: api.DualPathClusterSpec) -> tuple[str, list[dict[str, Any]]]:
    """(config hash, manifests of every child except engine pods and the Secret), in apply order."""
    cm = engine_configmap(ref, spec)
    config_hash = engine_config.digest(cm["data"])
    return config_hash, [
        cm,
        scheduler_service(ref, spec),
        scheduler_deployment(ref, spec, config_hash),
        engine_pdb(ref),
        network_policy(ref, spec),
    ]
