"""The sections of a DualPathCluster's desired state: model, engine, scheduler, roles, ratio, network and
storage (``rebalancing.py`` holds telemetry and rebalance; ``cluster.py`` assembles the spec).

With those two modules, this is the only source of the CRD's ``spec`` schema
(``dualpath_operator.crdgen`` turns it into OpenAPI). Single-field limits are pydantic constraints (they
become minimum/maximum/pattern/enum); cross-field checks are CEL rules attached with
``json_schema_extra`` so the API server enforces them on ``kubectl apply``; the same rules are mirrored
as pydantic validators where the operator relies on them. Every CEL message names the offending field(s)
by its path under ``spec``.

Defaults rule (also in docs/api.md): a scalar has a schema default when one value is right for almost
every cluster (``kvBlockTokens: 64``, ``computeQuotaMs: 300``, intervals); a section whose fields all
have defaults gets them as its default (``crdgen`` writes the object out in full); anything that names a
user's thing (model, image, volume, NIC resource names) or whose absence means "not set" has none.

Read by the planner and renderer through ``dualpath_operator.api.v1alpha1.cluster.DualPathCluster``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from dualpath_operator.api.v1alpha1 import common, corev1

# --------------------------------------------------------------------------------------------- model


class ModelDtype(StrEnum):
    """Element type of the model weights and of the KV cache."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class ModelGeometry(common.ApiModel):
    """Shape of the project's Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU).

    The defaults describe a small model that runs on CPU; set realistic numbers of layers and KV heads
    to make the KV bytes per token (and so the storage traffic) realistic while compute stays small.
    """

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self.numHeads % self.numKvHeads == 0",
                    "spec.model.geometry.numHeads must be a multiple of spec.model.geometry.numKvHeads",
                    field_path=".numKvHeads",
                )
            ]
        )
    )

    num_layers: int = Field(4, ge=1, le=256, description="Number of decoder layers.")
    hidden_size: int = Field(256, ge=8, le=65536, description="Width of the residual stream.")
    num_heads: int = Field(4, ge=1, le=256, description="Number of query attention heads.")
    num_kv_heads: int = Field(
        2, ge=1, le=256, description="Number of key/value heads (grouped-query attention); divides numHeads."
    )
    head_dim: int = Field(64, ge=8, le=1024, description="Width of one attention head.")
    intermediate_size: int = Field(
        1024, ge=8, le=262144, description="Width of the SwiGLU feed-forward hidden layer."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of the random weights when spec.model.source is 'random'."
    )

    @model_validator(mode="after")
    def _gqa(self) -> ModelGeometry:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError("numHeads must be a multiple of numKvHeads")
        return self


class ModelSpec(common.ApiModel):
    """The model every engine of the cluster serves and the geometry of its KV cache."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self.maxContextTokens % self.kvBlockTokens == 0",
                    "spec.model.maxContextTokens must be a multiple of spec.model.kvBlockTokens",
                    field_path=".maxContextTokens",
                )
            ]
        )
    )

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.:/]*$",
        description="Model name reported by the OpenAI-compatible API (the 'model' field of requests).",
    )
    source: str = Field(
        min_length=1,
        max_length=512,
        pattern=r"^(random|[-A-Za-z0-9_./]+\.safetensors)$",
        description=(
            "Where the weights come from: 'random' (random weights from geometry.seed, no download) or "
            "the path of a .safetensors file relative to spec.storage.mountPath."
        ),
    )
    dtype: ModelDtype = Field(
        ModelDtype.BFLOAT16,
        description=(
            "Element type of weights and KV cache; float32 on CPU. Immutable: stored KV blocks are "
            "written in this type."
        ),
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self == oldSelf",
                    "spec.model.dtype is immutable: stored KV blocks use it; create a new DualPathCluster",
                )
            ]
        ),
    )
    tensor_parallel: int = Field(
        1, ge=1, le=16, description="GPUs one engine spans; divides prefill.gpusPerPod and decode.gpusPerPod."
    )
    kv_block_tokens: int = Field(
        64,
        ge=16,
        le=1024,
        multiple_of=16,
        description=(
            "Tokens per KV block (the unit of storage, hashing and transfer; the paper uses 64). "
            "Immutable: a change invalidates every stored block and the prefix index."
        ),
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self == oldSelf",
                    "spec.model.kvBlockTokens is immutable: a change invalidates every stored KV block; "
                    "create a new DualPathCluster",
                )
            ]
        ),
    )
    max_context_tokens: int = Field(
        32768, ge=64, le=4194304, description="Longest context (prompt plus output) a request may reach."
    )
    geometry: ModelGeometry = Field(
        default_factory=ModelGeometry,
        description="Shape of the decoder; defaults describe a small CPU-friendly model.",
        json_schema_extra=common.schema_extra(default={}),
    )

    @model_validator(mode="after")
    def _context(self) -> ModelSpec:
        if self.max_context_tokens % self.kv_block_tokens != 0:
            raise ValueError("maxContextTokens must be a multiple of kvBlockTokens")
        return self


# -------------------------------------------------------------------------------------------- engine


class PullPolicy(StrEnum):
    """When the kubelet pulls the engine image."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class EngineSpec(common.ApiModel):
    """The engine image and process settings shared by prefill engines, decode engines and scheduler."""

    image: str = Field(
        min_length=1,
        max_length=512,
        pattern=r"^\S+$",
        description="Engine image (runs the engines and the scheduler), e.g. registry/dualpath-engine:0.1.0.",
    )
    pull_policy: PullPolicy = Field(PullPolicy.IF_NOT_PRESENT, description="Image pull policy.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None,
        max_length=64,
        description="Extra command-line arguments appended to every engine process.",
    )
    env: list[corev1.EnvVar] | None = Field(
        None,
        max_length=64,
        description="Extra environment variables of the engine containers; DUALPATH_* names are reserved.",
        json_schema_extra=common.schema_extra(list_type="map", list_map_keys=["name"]),
    )
    port: int = Field(8000, ge=1024, le=65535, description="TCP port of each engine's HTTP API and metrics.")

    @model_validator(mode="after")
    def _unique_env(self) -> EngineSpec:
        names = [e.name for e in self.env or ()]
        if len(names) != len(set(names)):
            raise ValueError("env names must be unique")
        return self


# ----------------------------------------------------------------------------------------- scheduler


class SchedulingPolicy(StrEnum):
    """Which side reads KV from storage."""

    DUALPATH = "dualpath"
    PE_ONLY = "pe-only"
    DE_ONLY = "de-only"


class ReadSideTieBreak(StrEnum):
    """Which side reads a request's KV when both nodes' read queues are equal."""

    PREFILL = "Prefill"
    LEAST_READ = "LeastRead"


class SchedulerSpec(common.ApiModel):
    """The central scheduler: request routing, read-side choice, OpenAI-compatible front door."""

    replicas: int = Field(
        1,
        ge=1,
        description=(
            "Scheduler replicas. Must be 1 in v1alpha1: the scheduler keeps per-request and per-engine "
            "state in memory; a highly available scheduler is planned for a later version."
        ),
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self == 1",
                    "spec.scheduler.replicas must be 1 in v1alpha1 (scheduler HA comes in a later version)",
                )
            ]
        ),
    )
    policy: SchedulingPolicy = Field(
        SchedulingPolicy.DUALPATH,
        description=(
            "dualpath: per request, the side with the shorter read queue reads (paper section 6); "
            "pe-only: prefill engines always read (the baseline); de-only: decode engines always read."
        ),
    )
    alpha_tokens: int = Field(
        65536,
        ge=1,
        description="Alpha (paper 6.2): read-queue tokens above which a node counts as read-busy.",
    )
    beta_tokens: int = Field(
        131072,
        ge=1,
        description="Beta (paper 6.2): queued tokens above which a prefill engine gets no new work.",
    )
    compute_quota_ms: int = Field(
        300, ge=10, le=10000, description="Predicted attention time per prefill batch in ms (paper: 300)."
    )
    weights_aware_read_side: bool = Field(
        False, description="Choose the read side with the operator's per-node path weights, not queues alone."
    )
    split_reads: bool = Field(
        False, description="Allow one request's KV read to be split between the prefill and decode sides."
    )
    read_side_tie_break: ReadSideTieBreak = Field(
        ReadSideTieBreak.PREFILL,
        description=(
            "Prefill: the paper's rule, ties go to the prefill side. LeastRead: ties go to the node that has "
            "read less so far, which evens storage-NIC bytes across nodes."
        ),
    )
    port: int = Field(8000, ge=1024, le=65535, description="TCP port of the scheduler's HTTP API.")
    resources: corev1.ResourceRequirements | None = Field(
        None, description="CPU and memory of the scheduler container."
    )
    api_key_secret_ref: corev1.SecretKeySelector | None = Field(
        None, description="Secret key holding the API key clients must send; the API is open when unset."
    )

    @model_validator(mode="after")
    def _single_replica(self) -> SchedulerSpec:
        if self.replicas != 1:
            raise ValueError("replicas must be 1 in v1alpha1 (scheduler HA comes in a later version)")
        return self


# ---------------------------------------------------------------------------------------------- roles

GPU_RESOURCE = "nvidia.com/gpu"
"""The GPU resource engine pods request (gpusPerPod of it); users may not set it in role resources."""

_RESERVED_RESOURCES_RULE = (
    "!has(self.resources) || ((!has(self.resources.limits) || !('nvidia.com/gpu' in self.resources.limits))"
    " && (!has(self.resources.requests) || !('nvidia.com/gpu' in self.resources.requests)))"
)


def _role_rules(role: str) -> dict[str, Any]:
    return common.schema_extra(
        validations=[
            common.rule(
                "self.min <= self.max",
                f"spec.{role}.min must be less than or equal to spec.{role}.max",
                field_path=".min",
            ),
            common.rule(
                "self.gpusPerPod <= 8 || self.gpusPerPod == 16",
                f"spec.{role}.gpusPerPod must be 1 to 8, or 16",
                field_path=".gpusPerPod",
            ),
            common.rule(
                _RESERVED_RESOURCES_RULE,
                f"spec.{role}.resources must not set nvidia.com/gpu: the operator requests gpusPerPod GPUs",
                field_path=".resources",
            ),
        ]
    )


class RoleSpec(common.ApiModel):
    """Bounds and placement of one role's engine groups (one engine pod per node, gpusPerPod GPUs)."""

    min: int = Field(1, ge=1, le=1024, description="Fewest engine groups (pods) of this role.")
    max: int = Field(8, ge=1, le=1024, description="Most engine groups (pods) of this role.")
    gpus_per_pod: int = Field(
        8, ge=1, le=16, description="GPUs of one engine group (pod): 1 to 8, or 16; one engine per GPU."
    )
    resources: corev1.ResourceRequirements | None = Field(
        None,
        description="CPU and memory of each engine pod; GPUs and NICs are added from gpusPerPod and network.",
    )
    node_selector: dict[str, str] | None = Field(
        None, max_length=32, description="Node labels the engine pods of this role require."
    )
    tolerations: list[corev1.Toleration] | None = Field(
        None, max_length=32, description="Taints the engine pods of this role tolerate."
    )
    affinity: corev1.Affinity | None = Field(
        None, description="Extra scheduling constraints, merged with the operator's one-pod-per-node rule."
    )

    @model_validator(mode="after")
    def _bounds(self) -> RoleSpec:
        if self.min > self.max:
            raise ValueError("min must be less than or equal to max")
        if self.gpus_per_pod > 8 and self.gpus_per_pod != 16:
            raise ValueError("gpusPerPod must be 1 to 8, or 16")
        if self.resources is not None and any(
            GPU_RESOURCE in (amounts or {}) for amounts in (self.resources.limits, self.resources.requests)
        ):
            raise ValueError(f"resources must not set {GPU_RESOURCE}: the operator requests gpusPerPod GPUs")
        return self


class PrefillSpec(RoleSpec):
    """Bounds and placement of the prefill engine groups."""

    model_config = ConfigDict(json_schema_extra=_role_rules("prefill"))


class DecodeSpec(RoleSpec):
    """Bounds and placement of the decode engine groups."""

    model_config = ConfigDict(json_schema_extra=_role_rules("decode"))


class RatioMode(StrEnum):
    """Who decides the number of prefill and decode groups."""

    FIXED = "Fixed"
    AUTO = "Auto"


class RatioSpec(common.ApiModel):
    """The prefill:decode ratio: exact counts (Fixed) or chosen by the planner within bounds (Auto)."""

    mode: RatioMode = Field(
        RatioMode.FIXED,
        description=(
            "Fixed: run exactly ratio.prefill and ratio.decode groups. Auto: the planner picks counts "
            "within [min, max] of each role and gpuBudget, starting from ratio.prefill/decode when set."
        ),
    )
    prefill: int | None = Field(
        None, ge=0, le=1024, description="Prefill engine groups; required with mode Fixed, a start with Auto."
    )
    decode: int | None = Field(
        None, ge=0, le=1024, description="Decode engine groups; required with mode Fixed, a start with Auto."
    )
    gpu_budget: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="Most GPUs all engine groups together may use; unbounded (but for max) when unset.",
    )


# -------------------------------------------------------------------------------------------- network


class NetworkMode(StrEnum):
    """How GPUs and NICs are allocated to engine pods."""

    DEVICE_PLUGIN = "DevicePlugin"


class ComputeNicSpec(common.ApiModel):
    """The compute (RDMA) NICs carrying engine-to-engine KV transfers: one VF per GPU."""

    resource_name: common.ExtendedResourceName = Field(
        description="Device-plugin resource of one compute-NIC VF, e.g. nvidia.com/sriov_rdma."
    )
    per_gpu: int = Field(1, ge=1, le=8, description="Compute-NIC resources requested per GPU.")
    networks: common.NetworkRefs | None = Field(
        None,
        max_length=16,
        description="Multus NetworkAttachmentDefinitions (name or namespace/name) attached to engine pods.",
        json_schema_extra=common.schema_extra(list_type="set"),
    )


class StorageNicSpec(common.ApiModel):
    """The storage NIC (SNIC) of each node, through which engines read KV from storage."""

    resource_name: common.ExtendedResourceName = Field(
        description="Device-plugin resource of the storage NIC, e.g. rdma/hca_shared_devices_a."
    )
    count: int = Field(1, ge=1, le=8, description="Storage-NIC resources requested per engine pod.")
    gbps: int = Field(
        400, ge=1, le=3200, description="Line rate of one storage NIC in Gbit/s (the path-weight capacity)."
    )
    networks: common.NetworkRefs | None = Field(
        None,
        max_length=16,
        description="Multus NetworkAttachmentDefinitions of the storage network attached to each engine pod.",
        json_schema_extra=common.schema_extra(list_type="set"),
    )


class TrafficClassSpec(common.ApiModel):
    """RoCE traffic class / InfiniBand service level used to isolate KV traffic (docs/operations.md)."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self.kvTrafficClass != self.modelTrafficClass",
                    "spec.network.trafficClass.kvTrafficClass must differ from "
                    "spec.network.trafficClass.modelTrafficClass",
                    field_path=".kvTrafficClass",
                )
            ]
        )
    )

    kv_traffic_class: int = Field(
        104,
        ge=0,
        le=255,
        description="Traffic class of KV-cache transfers (lower priority than model traffic).",
    )
    model_traffic_class: int = Field(
        106, ge=0, le=255, description="Traffic class of the model's own collectives (latency-critical)."
    )

    @model_validator(mode="after")
    def _distinct(self) -> TrafficClassSpec:
        if self.kv_traffic_class == self.model_traffic_class:
            raise ValueError("kvTrafficClass must differ from modelTrafficClass")
        return self


class EmulationSpec(common.ApiModel):
    """NIC emulation for clusters without RDMA hardware (kind, CI, demos): engines model each NIC as a
    token bucket with byte counters and write them as a fake /sys/class/infiniband tree that a
    node_exporter (infiniband collector) on the node reads. Never enable it on real RDMA nodes."""

    enabled: bool = Field(False, description="Emulate the NICs in the engines and write fake sysfs counters.")
    sysfs_host_path: str = Field(
        "/var/lib/dualpath/sys",
        min_length=2,
        max_length=256,
        pattern=r"^/[-A-Za-z0-9_./]*[-A-Za-z0-9_.]$",
        description=(
            "Node directory (hostPath) the engines write the fake sysfs tree into; point the node_exporter "
            "of that node at it with --path.sysfs."
        ),
    )
    storage_budget_gbps: int | None = Field(
        None,
        ge=1,
        le=3200,
        description="Emulated storage-NIC budget in Gbit/s (default: spec.network.storageNic.gbps).",
    )


class NetworkSpec(common.ApiModel):
    """The RDMA NICs engine pods request; open to a later DRA mode (GPU and NIC claims on one PCIe root)."""

    mode: NetworkMode = Field(
        NetworkMode.DEVICE_PLUGIN,
        description=(
            "DevicePlugin: GPUs and NICs as extended resources, aligned by the kubelet's Topology Manager. "
            "A DynamicResourceAllocation mode is planned."
        ),
    )
    compute_nic: ComputeNicSpec = Field(description="Compute NICs, one VF per GPU.")
    storage_nic: StorageNicSpec = Field(description="Storage NIC of each node.")
    traffic_class: TrafficClassSpec = Field(
        default_factory=TrafficClassSpec,
        description="Traffic classes separating KV traffic from model traffic.",
        json_schema_extra=common.schema_extra(default={}),
    )
    emulation: EmulationSpec = Field(
        default_factory=EmulationSpec,
        description="NIC emulation for clusters without RDMA hardware (off by default).",
        json_schema_extra=common.schema_extra(default={}),
    )


# -------------------------------------------------------------------------------------------- storage


class StorageSpec(common.ApiModel):
    """The KV-cache store every engine mounts, and the host buffers engines stage KV in."""

    volume: dict[str, Any] = Field(
        min_length=1,
        max_length=1,
        description=(
            "A Kubernetes volume source with exactly one key, e.g. {persistentVolumeClaim: {claimName: kv}}, "
            "{nfs: {...}}, {hostPath: {path: /mnt/3fs}} or a CSI volume (3FS). Passed to the pod unchanged."
        ),
    )
    mount_path: str = Field(
        "/var/lib/dualpath/kv",
        min_length=2,
        max_length=256,
        pattern=r"^/[-A-Za-z0-9_./]*[-A-Za-z0-9_.]$",
        description="Where the volume is mounted in engine pods.",
    )
    buffer_gib: int = Field(
        4,
        alias="bufferGiB",
        ge=1,
        le=4096,
        description="Pinned host memory per engine group for staging KV, in GiB (added to the pod's memory).",
    )
