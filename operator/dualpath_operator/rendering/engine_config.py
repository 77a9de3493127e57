"""Render the engine's and the scheduler's configuration (``dualpath_engine.config``) from the spec.

The result is the content of the cluster's engine ConfigMap: ``engine.yaml`` (shared by every engine
pod; per-pod values come from the environment, see :mod:`rendering.manifests`) and
``scheduler.yaml``. Validating through the engine's own pydantic models here means a spec the engine
would reject never reaches a pod.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from dualpath_engine import config as engine_config
from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.rendering import names

CONFIG_DIR = "/etc/dualpath"
ENGINE_FILE = "engine.yaml"
SCHEDULER_FILE = "scheduler.yaml"
ADMIN_TOKEN_DIR = "/etc/dualpath/admin"
ADMIN_TOKEN_KEY = "token"
#: Port of the engine's KV transport listener (the HTTP port is spec.engine.port).
KV_TRANSPORT_PORT_OFFSET = 1
GIB = 1 << 30


def _model(spec: api.DualPathClusterSpec) -> dict[str, Any]:
    m, g = spec.model, spec.model.geometry
    data: dict[str, Any] = {
        "name": m.name,
        "num_layers": g.num_layers,
        "hidden_size": g.hidden_size,
        "num_heads": g.num_heads,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "intermediate_size": g.intermediate_size,
        "dtype": str(m.dtype),
        "seed": g.seed,
        "rope_theta": g.rope_theta,
        "max_context_tokens": m.max_context_tokens,
    }
    if m.source != "random":
        data["weights_path"] = f"{spec.storage.mount_path.rstrip('/')}/{m.source}"
    return data


def _kv(spec: api.DualPathClusterSpec) -> dict[str, Any]:
    return {
        "block_tokens": spec.model.kv_block_tokens,
        "storage_backend": "filesystem",
        "storage_path": f"{spec.storage.mount_path.rstrip('/')}/blocks",
        "host_buffer_bytes": spec.storage.buffer_gib * GIB,
    }


def scheduler_url(cluster: str, namespace: str, spec: api.DualPathClusterSpec) -> str:
    """The scheduler's in-cluster URL (Service DNS name; local runs map it to the pod IP)."""
    return f"http://{names.scheduler(cluster)}.{namespace}.svc:{spec.scheduler.port}"


#: ``spec.scheduler.readSideTieBreak`` -> the scheduler config's ``read_side_tie_break``.
_TIE_BREAKS: dict[specs.ReadSideTieBreak, str] = {
    specs.ReadSideTieBreak.PREFILL: "prefill",
    specs.ReadSideTieBreak.LEAST_READ: "least_read",
}

#: Where engine pods mount ``spec.network.emulation.sysfsHostPath`` (the fake sysfs tree's root).
EMULATED_SYSFS_DIR = "/var/lib/dualpath/sys"


def _network(spec: api.DualPathClusterSpec, line_rate: float) -> dict[str, Any]:
    snic: dict[str, Any] = {"device": "mlx5_storage0", "line_rate_bytes_per_s": line_rate}
    emu = spec.network.emulation
    net: dict[str, Any] = {"storage_nic": snic}
    if emu.enabled:
        budget = (
            emu.storage_budget_gbps if emu.storage_budget_gbps is not None else spec.network.storage_nic.gbps
        )
        snic["budget_bytes_per_s"] = budget * 1e9 / 8
        net["emulate"] = True
        net["sysfs_root"] = EMULATED_SYSFS_DIR
    return net


def engine_document(cluster: str, namespace: str, spec: api.DualPathClusterSpec, gpus: int) -> dict[str, Any]:
    """``engine.yaml``: everything but role, group, node, host and port (set per pod via env)."""
    snic = spec.network.storage_nic
    line_rate = snic.gbps * 1e9 / 8
    doc: dict[str, Any] = {
        "engines_per_group": max(1, gpus // spec.model.tensor_parallel),
        "port": spec.engine.port,
        "scheduler_url": scheduler_url(cluster, namespace, spec),
        "mode": "dualpath",
        "model": _model(spec),
        "kv": _kv(spec),
        "network": _network(spec, line_rate),
        "transport": {"kind": "tcp", "port": spec.engine.port + KV_TRANSPORT_PORT_OFFSET},
    }
    return doc


def scheduler_document(spec: api.DualPathClusterSpec) -> dict[str, Any]:
    s = spec.scheduler
    doc: dict[str, Any] = {
        "policy": str(s.policy),
        "compute_quota_ms": s.compute_quota_ms,
        "weights_aware_read_side": s.weights_aware_read_side,
        "split_reads": s.split_reads,
        "read_side_tie_break": _TIE_BREAKS[s.read_side_tie_break],
        "alpha_tokens": s.alpha_tokens,
        "beta_tokens": s.beta_tokens,
        "port": s.port,
        "admin_token_file": f"{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}",
        "model": _model(spec),
        "kv": _kv(spec),
    }
    return doc


def validate(engine_doc: dict[str, Any], scheduler_doc: dict[str, Any]) -> None:
    """Raise ``dualpath_engine.config.ConfigError`` if the engine would reject either document."""
    engine_config.EngineConfig.model_validate({**engine_doc, "role": "prefill"})
    engine_config.SchedulerConfig.model_validate(scheduler_doc)


def render(cluster: str, namespace: str, spec: api.DualPathClusterSpec) -> dict[str, str]:
    """The ConfigMap ``data``: YAML documents with sorted keys (deterministic, hashable)."""
    gpus = max(spec.prefill.gpus_per_pod, spec.decode.gpus_per_pod)
    eng = engine_document(cluster, namespace, spec, gpus)
    sch = scheduler_document(spec)
    validate(eng, sch)
    return {
        ENGINE_FILE: yaml.safe_dump(eng, sort_keys=True),
        SCHEDULER_FILE: yaml.safe_dump(sch, sort_keys=True),
    }


def digest(data: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode())
        h.update(b"\0")
        h.update(data[k].encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
