"""Engine and scheduler configuration (pydantic, frozen). The operator renders it; engines read it once.

Who uses it:

- the operator (``dualpath_operator.rendering``) builds :class:`EngineConfig` / :class:`SchedulerConfig`
  from a ``DualPathCluster`` and writes ``model_dump(mode="json")`` into a ConfigMap;
- each engine / scheduler process calls :func:`load_engine_config` / :func:`load_scheduler_config`
  once at start-up with the mounted file and ``os.environ``, then passes the frozen model down.

This module imports only pydantic, PyYAML and the standard library (the operator imports it).

Per-pod environment overrides (applied on top of the file; other variables are ignored):

==========================  =====================================  ===========
variable                    field                                  applies to
==========================  =====================================  ===========
``DUALPATH_ROLE``           ``role`` (``prefill`` / ``decode``)    engine
``DUALPATH_GROUP_ID``       ``group_id``                           engine
``DUALPATH_NODE_NAME``      ``node_name``                          engine
``DUALPATH_ENGINE_ID``      ``engine_id``                          engine
``DUALPATH_LOCAL_RANK``     ``local_rank``                         engine
``DUALPATH_HOST``           ``host``                               both
``DUALPATH_PORT``           ``port``                               both
``DUALPATH_TRANSPORT_PORT`` ``transport.port``                     engine
``DUALPATH_SCHEDULER_URL``  ``scheduler_url``                      engine
==========================  =====================================  ===========
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import pydantic
import yaml

DType = Literal["float32", "bfloat16", "float16"]
"""Element type of model weights and KV."""

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each :data:`DType`."""

BYTE_VOCAB = 256
"""The byte-level tokenizer's byte ids are ``0..255``; special tokens come after them."""

ENGINE_ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "DUALPATH_ROLE": ("role",),
    "DUALPATH_GROUP_ID": ("group_id",),
    "DUALPATH_NODE_NAME": ("node_name",),
    "DUALPATH_ENGINE_ID": ("engine_id",),
    "DUALPATH_LOCAL_RANK": ("local_rank",),
    "DUALPATH_HOST": ("host",),
    "DUALPATH_PORT": ("port",),
    "DUALPATH_TRANSPORT_PORT": ("transport", "port"),
    "DUALPATH_SCHEDULER_URL": ("scheduler_url",),
}
"""Environment variable -> field path applied by :func:`load_engine_config`."""

SCHEDULER_ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "DUALPATH_HOST": ("host",),
    "DUALPATH_PORT": ("port",),
}
"""Environment variable -> field path applied by :func:`load_scheduler_config`."""

_M = TypeVar("_M", bound=pydantic.BaseModel)

_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ConfigError(ValueError):
    """Configuration that cannot be loaded; the message names the file, the field and the cause."""


class _Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """Geometry of the project's Llama-style decoder (and therefore of its KV)."""

    name: str = pydantic.Field(default="tiny", min_length=1, description="Model name reported by the API.")
    num_layers: int = pydantic.Field(default=2, ge=1, le=512, description="Decoder layers.")
    hidden_size: int = pydantic.Field(default=64, ge=1, description="Residual stream width.")
    num_heads: int = pydantic.Field(default=4, ge=1, description="Query heads per layer.")
    num_kv_heads: int = pydantic.Field(
        default=2, ge=1, description="Key/value heads per layer (GQA); must divide num_heads."
    )
    head_dim: int = pydantic.Field(default=16, ge=2, description="Dimension of one head; even (RoPE).")
    intermediate_size: int = pydantic.Field(default=128, ge=1, description="SwiGLU hidden width.")
    vocab_size: int = pydantic.Field(
        default=264,
        gt=BYTE_VOCAB,
        description="Vocabulary: 256 byte ids plus special tokens (BOS, EOS, PAD, chat roles).",
    )
    dtype: DType = pydantic.Field(default="float32", description="Element type of weights and KV.")
    seed: int = pydantic.Field(default=0, ge=0, description="Seed of the random weight init.")
    rope_theta: float = pydantic.Field(default=10000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = pydantic.Field(default=1e-5, gt=0, description="RMSNorm epsilon.")
    max_context_tokens: int = pydantic.Field(
        default=4096, ge=1, description="Longest prompt + generation a request may have, in tokens."
    )
    weights_path: str | None = pydantic.Field(
        default=None, description="Safetensors file to load weights from; None = seeded random init."
    )

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> Self:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}) for GQA"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        return self

    @property
    def dtype_bytes(self) -> int:
        """Bytes per KV element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V bytes of one token in one layer: ``2 * kv_heads * head_dim * dtype size``."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers: ``2 * layers * kv_heads * head_dim * dtype size``."""
        return self.num_layers * self.kv_bytes_per_token_per_layer


class KVConfig(_Frozen):
    """KV block geometry and where Full Blocks are stored."""

    block_tokens: int = pydantic.Field(
        default=64, ge=1, le=4096, description="Tokens per Full Block (the paper persists 64-token blocks)."
    )
    storage_backend: Literal["filesystem", "memory"] = pydantic.Field(
        default="filesystem",
        description="Where Full Blocks live: shared filesystem (one file per block) or process memory.",
    )
    storage_path: str = pydantic.Field(
        default="/var/lib/dualpath/kv",
        min_length=1,
        description="Directory holding Full Block objects (filesystem backend); shared by all engines.",
    )
    host_buffer_bytes: int = pydantic.Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Host staging arena per engine, allocated once at start (bytes).",
    )
    read_workers: int = pydantic.Field(
        default=4, ge=1, le=256, description="Concurrent storage reads (worker threads) per engine."
    )
    fsync: bool = pydantic.Field(
        default=True, description="fsync each block file and its directory before it becomes visible."
    )


class NicConfig(_Frozen):
    """One NIC (real or emulated)."""

    device: str = pydantic.Field(description="Device name as in /sys/class/infiniband, e.g. mlx5_s0.")
    line_rate_bytes_per_s: float = pydantic.Field(
        default=25e9, gt=0, description="Link line rate in bytes/s (25e9 = 200 Gb/s)."
    )
    budget_bytes_per_s: float | None = pydantic.Field(
        default=None,
        gt=0,
        description="Emulated bandwidth budget in bytes/s when emulation is on; None = line rate.",
    )

    @pydantic.field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid device name (letters, digits, '_', '.', '-')")
        return value

    @property
    def effective_budget_bytes_per_s(self) -> float:
        """Budget used by the emulated token bucket: the explicit budget or the line rate."""
        return self.budget_bytes_per_s if self.budget_bytes_per_s is not None else self.line_rate_bytes_per_s


def _default_storage_nic() -> NicConfig:
    return NicConfig(device="mlx5_s0", line_rate_bytes_per_s=25e9)


def _default_compute_nics() -> tuple[NicConfig, ...]:
    return (NicConfig(device="mlx5_0", line_rate_bytes_per_s=50e9),)


class NetworkConfig(_Frozen):
    """The node's NICs: one storage NIC per node, one compute NIC per GPU."""

    storage_nic: NicConfig = pydantic.Field(
        default_factory=_default_storage_nic, description="Storage NIC (SNIC) of this node."
    )
    compute_nics: tuple[NicConfig, ...] = pydantic.Field(
        default_factory=_default_compute_nics,
        min_length=1,
        description="Compute NICs (CNICs), one per GPU, indexed by local rank.",
    )
    emulate: bool = pydantic.Field(
        default=False, description="Enforce NIC budgets with token buckets (emulated RDMA network)."
    )
    sysfs_root: str | None = pydantic.Field(
        default=None,
        description="If set, NIC counters are written as a fake sysfs tree under <root>/class/infiniband.",
    )
    sysfs_flush_interval_s: float = pydantic.Field(
        default=1.0, gt=0, le=3600, description="Seconds between fake sysfs counter rewrites."
    )

    @pydantic.model_validator(mode="after")
    def _unique_devices(self) -> Self:
        names = [self.storage_nic.device, *(nic.device for nic in self.compute_nics)]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"NIC device names must be unique; repeated: {', '.join(duplicates)}")
        return self


class TransportConfig(_Frozen):
    """How KV moves between prefill and decode engines."""

    kind: Literal["tcp", "cuda", "rdma"] = pydantic.Field(
        default="tcp",
        description="tcp (asyncio, CPU), cuda (same-host IPC/NCCL) or rdma (pluggable backend).",
    )
    rdma_backend: str | None = pydantic.Field(
        default=None,
        description="Import path 'package.module:Class' of the RDMA transport; required when kind=rdma.",
    )
    port: int = pydantic.Field(
        default=8201, ge=0, le=65535, description="Port the KV transport listens on; 0 = pick a free port."
    )
    checksum: bool = pydantic.Field(default=False, description="Add and verify a checksum on every frame.")
    connect_timeout_s: float = pydantic.Field(
        default=10.0, gt=0, description="Timeout for connecting to a peer engine's transport."
    )

    @pydantic.model_validator(mode="after")
    def _check_backend(self) -> Self:
        if self.kind == "rdma" and not self.rdma_backend:
            raise ValueError("kind 'rdma' needs rdma_backend ('package.module:Class')")
        if self.rdma_backend is not None and not _IMPORT_PATH.match(self.rdma_backend):
            raise ValueError(f"rdma_backend {self.rdma_backend!r} is not of the form 'package.module:Class'")
        return self


class RunnerConfig(_Frozen):
    """How the model runs on the engine's device."""

    decode_attention: Literal["auto", "paged", "per_sequence"] = pydantic.Field(
        default="auto",
        description="Decode KV store: paged (one pool, one attention call per layer for the whole batch), "
        "per_sequence (a tensor per sequence, one attention call per sequence and layer); auto = paged on "
        "cuda, per_sequence on cpu.",
    )
    page_tokens: int = pydantic.Field(
        default=16, ge=1, le=4096, description="Tokens per page of the paged decode KV pool."
    )
    cuda_graphs: bool = pydantic.Field(
        default=True,
        description="Replay paged decode steps as CUDA graphs, one per (batch, page-table width) bucket "
        "(cuda only; off = the same padded step launched kernel by kernel).",
    )
    warmup_batch: int = pydantic.Field(
        default=64,
        ge=0,
        le=256,
        description="A decode engine on cuda with the paged store captures the CUDA graphs of decode steps "
        "of up to this many sequences of up to model.max_context_tokens at start, so serving never pauses "
        "for a capture; 0 = capture each when first needed.",
    )


class EngineConfig(_Frozen):
    """Everything one prefill or decode engine process needs."""

    role: Literal["prefill", "decode"] = pydantic.Field(description="Prefill engine (PE) or decode (DE).")
    group_id: int = pydantic.Field(default=0, ge=0, description="Engine group this engine belongs to.")
    node_name: str = pydantic.Field(
        default="local", min_length=1, description="Kubernetes node name (which storage NIC is shared)."
    )
    engine_id: str | None = pydantic.Field(
        default=None, description="Unique engine name (pod name); None = derived from role, host, port."
    )
    engines_per_group: int = pydantic.Field(default=1, ge=1, description="Engines in this engine's group.")
    local_rank: int = pydantic.Field(
        default=0, ge=0, description="GPU index on the node; selects network.compute_nics[local_rank]."
    )
    device: Literal["cpu", "cuda"] = pydantic.Field(default="cpu", description="Where the model runs.")
    host: str = pydantic.Field(default="127.0.0.1", min_length=1, description="Address to bind (pod IP).")
    port: int = pydantic.Field(default=8100, ge=0, le=65535, description="HTTP port; 0 = pick a free port.")
    scheduler_url: str = pydantic.Field(
        default="http://127.0.0.1:8000", description="Base URL of the central scheduler."
    )
    mode: Literal["basic", "dualpath", "oracle"] = pydantic.Field(
        default="dualpath",
        description="basic: PE read path only, no layer-wise; dualpath: both paths; oracle: no KV I/O.",
    )
    layerwise: bool | None = pydantic.Field(
        default=None,
        description="Layer-wise prefill; None = on for dualpath/oracle, off for basic (which forbids it).",
    )
    model: ModelConfig = pydantic.Field(default_factory=ModelConfig, description="Model geometry.")
    kv: KVConfig = pydantic.Field(default_factory=KVConfig, description="KV blocks and storage.")
    network: NetworkConfig = pydantic.Field(default_factory=NetworkConfig, description="NICs of the node.")
    transport: TransportConfig = pydantic.Field(
        default_factory=TransportConfig, description="PE<->DE KV transport."
    )
    runner: RunnerConfig = pydantic.Field(
        default_factory=RunnerConfig,
        description="Model execution (decode KV store); the paged pool starts with kv.host_buffer_bytes "
        "of KV and doubles when full.",
    )

    @pydantic.field_validator("scheduler_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @pydantic.model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.mode == "basic" and self.layerwise:
            raise ValueError(
                "mode 'basic' has no layer-wise prefill; set layerwise to false or leave it unset"
            )
        if self.local_rank >= len(self.network.compute_nics):
            raise ValueError(
                f"local_rank {self.local_rank} has no compute NIC "
                f"(network.compute_nics has {len(self.network.compute_nics)})"
            )
        if self.transport.kind == "cuda" and self.device != "cuda":
            raise ValueError("transport kind 'cuda' needs device 'cuda'")
        return self

    @property
    def use_layerwise(self) -> bool:
        """Whether prefill runs layer by layer (resolved from ``layerwise`` and ``mode``)."""
        if self.layerwise is not None:
            return self.layerwise
        return self.mode != "basic"

    @property
    def compute_nic(self) -> NicConfig:
        """This engine's compute NIC."""
        return self.network.compute_nics[self.local_rank]

    @property
    def name(self) -> str:
        """Engine name used in metric labels and logs."""
        if self.engine_id:
            return self.engine_id
        short = "pe" if self.role == "prefill" else "de"
        return f"{short}-{self.host}-{self.port}"

    @property
    def full_block_bytes(self) -> int:
        """Bytes of one Full Block: layers x block tokens x per-layer token bytes."""
        return self.kv.block_tokens * self.model.kv_bytes_per_token


class SchedulerConfig(_Frozen):
    """The central scheduler service (paper section 6)."""

    policy: Literal["dualpath", "pe-only", "de-only"] = pydantic.Field(
        default="dualpath", description="Read-side policy: both paths, PE read path only, DE read path only."
    )
    alpha_tokens: int = pydantic.Field(
        default=65536, ge=1, description="Alpha: tokens a node reads from storage in 3 s (short read queue)."
    )
    beta_tokens: int = pydantic.Field(
        default=65536, ge=1, description="Beta: tokens one GPU prefills in 5 s (unfinished-token limit)."
    )
    z_factor: float = pydantic.Field(
        default=1.05, ge=1.0, description="Z: DE high-token threshold as a multiple of the group average."
    )
    compute_quota_ms: float = pydantic.Field(
        default=300.0, gt=0, description="Predicted attention time allowed per prefill batch (ms)."
    )
    weights_aware_read_side: bool = pydantic.Field(
        default=False, description="Extension: weigh read queues by path bandwidth when choosing a side."
    )
    split_reads: bool = pydantic.Field(
        default=False, description="Extension: split one request's hit blocks across both read paths."
    )
    read_side_tie_break: Literal["prefill", "least_read"] = pydantic.Field(
        default="prefill",
        description=(
            "Who reads when both sides tie: prefill = the PE side (paper); least_read = extension, the node "
            "assigned fewer read tokens so far (evens storage-NIC bytes across nodes)."
        ),
    )
    host: str = pydantic.Field(default="127.0.0.1", min_length=1, description="Address to bind.")
    port: int = pydantic.Field(default=8000, ge=0, le=65535, description="HTTP port; 0 = pick a free port.")
    admin_token_file: str | None = pydantic.Field(
        default=None, description="File holding the bearer token of the admin API; None = admin API off."
    )
    request_timeout_s: float = pydantic.Field(
        default=120.0, gt=0, description="A request not finished after this many seconds fails with 504."
    )
    model: ModelConfig = pydantic.Field(default_factory=ModelConfig, description="Model (for tokenizing).")
    kv: KVConfig = pydantic.Field(default_factory=KVConfig, description="KV block size and storage.")
    engine_timeout_s: float = pydantic.Field(
        default=10.0,
        gt=0,
        description="A group whose leader has not fetched for this long is lost; its requests are re-queued.",
    )
    max_attempts: int = pydantic.Field(
        default=3, ge=1, le=100, description="Attempts per request (engine loss or error) before it fails."
    )
    drain_timeout_s: float = pydantic.Field(
        default=60.0,
        gt=0,
        description="A role switch waits this long for in-flight work, then re-queues what is left.",
    )
    max_waiting_requests: int = pydantic.Field(
        default=10000, ge=1, description="Requests waiting for engines beyond this are refused with 503."
    )
    default_storage_capacity_bytes_per_s: float = pydantic.Field(
        default=25e9,
        gt=0,
        description="Usable storage-NIC capacity assumed for nodes without a pushed weight (weights-aware).",
    )
    prefix_index_max_blocks: int = pydantic.Field(
        default=1_000_000, ge=1, description="Most block hashes the scheduler's prefix index remembers (LRU)."
    )


def _read_document(path: str | os.PathLike[str] | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} config {file}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{what} config {file}: not valid {file.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} config {file}: top level must be a mapping, got {type(data).__name__}")
    return data


def _apply_overrides(
    data: dict[str, Any],
    overrides: Mapping[str, str],
    table: Mapping[str, tuple[str, ...]],
    what: str,
) -> dict[tuple[str, ...], str]:
    applied: dict[tuple[str, ...], str] = {}
    for var, field_path in table.items():
        if var not in overrides:
            continue
        node = data
        for key in field_path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{what} config: {var} sets {'.'.join(field_path)} but {key} is not a mapping"
                )
            node = child
        node[field_path[-1]] = overrides[var]
        applied[field_path] = var
    return applied


def _validate(
    model: type[_M],
    data: dict[str, Any],
    applied: dict[tuple[str, ...], str],
    source: str,
) -> _M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(str(part) for part in error["loc"])
            field = ".".join(loc) or "(top level)"
            origin = applied.get(loc)
            suffix = f" (from {origin}={_data_at(data, loc)!r})" if origin else ""
            problems.append(f"{field}{suffix}: {error['msg']}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from exc


def _data_at(data: Mapping[str, Any], loc: tuple[str, ...]) -> Any:
    node: Any = data
    for key in loc:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def load_engine_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, str] | None = None
) -> EngineConfig:
    """Read an engine config from a YAML/JSON file (None = defaults) and apply ``DUALPATH_*`` overrides.

    Raises :class:`ConfigError` naming the file, the field (and the env var if it came from one).
    """
    data = _read_document(path, "engine")
    applied = _apply_overrides(data, overrides or {}, ENGINE_ENV_OVERRIDES, "engine")
    return _validate(
        EngineConfig, data, applied, f"engine config {path if path is not None else '(defaults)'}"
    )


def load_scheduler_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, str] | None = None
) -> SchedulerConfig:
    """Read a scheduler config from a YAML/JSON file (None = defaults) and apply ``DUALPATH_HOST/PORT``.

    Raises :class:`ConfigError` naming the file, the field (and the env var if it came from one).
    """
    data = _read_document(path, "scheduler")
    applied = _apply_overrides(data, overrides or {}, SCHEDULER_ENV_OVERRIDES, "scheduler")
    source = f"scheduler config {path if path is not None else '(defaults)'}"
    return _validate(SchedulerConfig, data, applied, source)
