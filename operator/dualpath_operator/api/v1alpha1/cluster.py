"""The DualPathCluster resource: ``DualPathClusterSpec`` (with its cross-section CEL rules) and the
top-level ``DualPathCluster`` object.

Reconcile code validates a watched body with ``DualPathCluster.model_validate(body)`` and reads typed
fields from it; ``dualpath_operator.crdgen`` builds the CRD from these models. Rules that relate
fields of different sections live on the spec (CEL, enforced by the API server) and are mirrored by
a pydantic validator, so a body that passed the API server also parses here.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from dualpath_operator.api.v1alpha1 import common, rebalancing
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.api.v1alpha1 import status as statuses

_FIXED_NEEDS_COUNTS = (
    "self.ratio.mode != 'Fixed' || (has(self.ratio.prefill) && has(self.ratio.decode))",
    "spec.ratio.prefill and spec.ratio.decode are required when spec.ratio.mode is Fixed",
    ".ratio",
)
_PREFILL_WITHIN = (
    "!has(self.ratio.prefill) || "
    "(self.ratio.prefill >= self.prefill.min && self.ratio.prefill <= self.prefill.max)",
    "spec.ratio.prefill must lie within [spec.prefill.min, spec.prefill.max]",
    ".ratio.prefill",
)
_DECODE_WITHIN = (
    "!has(self.ratio.decode) || "
    "(self.ratio.decode >= self.decode.min && self.ratio.decode <= self.decode.max)",
    "spec.ratio.decode must lie within [spec.decode.min, spec.decode.max]",
    ".ratio.decode",
)
_BUDGET_COVERS_MIN = (
    "!has(self.ratio.gpuBudget) || self.ratio.gpuBudget >= "
    "self.prefill.min * self.prefill.gpusPerPod + self.decode.min * self.decode.gpusPerPod",
    "spec.ratio.gpuBudget must be at least spec.prefill.min * spec.prefill.gpusPerPod"
    " + spec.decode.min * spec.decode.gpusPerPod",
    ".ratio.gpuBudget",
)
_BUDGET_COVERS_FIXED = (
    "!has(self.ratio.gpuBudget) || !has(self.ratio.prefill) || !has(self.ratio.decode) || "
    "self.ratio.gpuBudget >= "
    "self.ratio.prefill * self.prefill.gpusPerPod + self.ratio.decode * self.decode.gpusPerPod",
    "spec.ratio.gpuBudget must cover spec.ratio.prefill * spec.prefill.gpusPerPod"
    " + spec.ratio.decode * spec.decode.gpusPerPod",
    ".ratio.gpuBudget",
)
_AUTO_NEEDS_REBALANCE = (
    "self.ratio.mode != 'Auto' || self.rebalance.enabled",
    "spec.rebalance.enabled must be true when spec.ratio.mode is Auto",
    ".rebalance.enabled",
)
_TP_DIVIDES_PREFILL = (
    "self.prefill.gpusPerPod % self.model.tensorParallel == 0",
    "spec.prefill.gpusPerPod must be a multiple of spec.model.tensorParallel",
    ".prefill.gpusPerPod",
)
_TP_DIVIDES_DECODE = (
    "self.decode.gpusPerPod % self.model.tensorParallel == 0",
    "spec.decode.gpusPerPod must be a multiple of spec.model.tensorParallel",
    ".decode.gpusPerPod",
)
SPEC_RULES: tuple[tuple[str, str, str], ...] = (
    _FIXED_NEEDS_COUNTS,
    _PREFILL_WITHIN,
    _DECODE_WITHIN,
    _BUDGET_COVERS_MIN,
    _BUDGET_COVERS_FIXED,
    _AUTO_NEEDS_REBALANCE,
    _TP_DIVIDES_PREFILL,
    _TP_DIVIDES_DECODE,
)
"""The spec-level CEL rules as (expression, message, fieldPath under spec)."""


class DualPathClusterSpec(common.ApiModel):
    """Desired state of a DualPath prefill/decode inference cluster."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[common.rule(expr, msg, field_path=path) for expr, msg, path in SPEC_RULES]
        )
    )

    model: specs.ModelSpec = Field(description="The model served and its KV-cache geometry.")
    engine: specs.EngineSpec = Field(description="Engine image and process settings.")
    scheduler: specs.SchedulerSpec = Field(
        default_factory=specs.SchedulerSpec,
        description="The central scheduler.",
        json_schema_extra=common.schema_extra(default={}),
    )
    prefill: specs.PrefillSpec = Field(
        default_factory=specs.PrefillSpec,
        description="Bounds and placement of prefill engine groups.",
        json_schema_extra=common.schema_extra(default={}),
    )
    decode: specs.DecodeSpec = Field(
        default_factory=specs.DecodeSpec,
        description="Bounds and placement of decode engine groups.",
        json_schema_extra=common.schema_extra(default={}),
    )
    ratio: specs.RatioSpec = Field(
        default_factory=specs.RatioSpec,
        description="Prefill:decode ratio, fixed or automatic.",
        json_schema_extra=common.schema_extra(default={}),
    )
    network: specs.NetworkSpec = Field(description="RDMA compute and storage NICs of engine pods.")
    storage: specs.StorageSpec = Field(description="The KV-cache store and host staging buffers.")
    telemetry: rebalancing.TelemetrySpec = Field(
        default_factory=rebalancing.TelemetrySpec,
        description="Where NIC and engine telemetry comes from.",
        json_schema_extra=common.schema_extra(default={}),
    )
    rebalance: rebalancing.RebalanceSpec = Field(
        default_factory=rebalancing.RebalanceSpec,
        description="Continuous rebalancing of path weights and (Auto) the ratio.",
        json_schema_extra=common.schema_extra(default={}),
    )

    @model_validator(mode="after")
    def _cross_section(self) -> DualPathClusterSpec:
        for problem in spec_problems(self):
            raise ValueError(problem)
        return self


def spec_problems(s: DualPathClusterSpec) -> list[str]:
    """Return the messages of every spec-level rule ``s`` breaks (the pydantic twin of SPEC_RULES)."""
    r, p, d = s.ratio, s.prefill, s.decode
    checks = [
        (
            r.mode is not specs.RatioMode.FIXED or (r.prefill is not None and r.decode is not None),
            _FIXED_NEEDS_COUNTS,
        ),
        (r.prefill is None or p.min <= r.prefill <= p.max, _PREFILL_WITHIN),
        (r.decode is None or d.min <= r.decode <= d.max, _DECODE_WITHIN),
        (
            r.gpu_budget is None or r.gpu_budget >= p.min * p.gpus_per_pod + d.min * d.gpus_per_pod,
            _BUDGET_COVERS_MIN,
        ),
        (
            r.gpu_budget is None
            or r.prefill is None
            or r.decode is None
            or r.gpu_budget >= r.prefill * p.gpus_per_pod + r.decode * d.gpus_per_pod,
            _BUDGET_COVERS_FIXED,
        ),
        (r.mode is not specs.RatioMode.AUTO or s.rebalance.enabled, _AUTO_NEEDS_REBALANCE),
        (p.gpus_per_pod % s.model.tensor_parallel == 0, _TP_DIVIDES_PREFILL),
        (d.gpus_per_pod % s.model.tensor_parallel == 0, _TP_DIVIDES_DECODE),
    ]
    return [rule[1] for ok, rule in checks if not ok]


NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DualPathCluster's name is a DNS-1035 label: its scheduler Service is named after it."""
MAX_NAME_LENGTH = 40
"""Longest DualPathCluster name, leaving room for the suffixes of child objects (e.g. -prefill-12)."""


class DualPathCluster(common.ApiModel):
    """A DualPath prefill/decode inference cluster: scheduler, prefill and decode engines, rebalancer."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    f"self.metadata.name.matches('{NAME_PATTERN}')"
                    f" && size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                    f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
                    "(child Services and pods append suffixes to it)",
                )
            ]
        )
    )

    api_version: Literal["dualpath.io/v1alpha1"] = Field(
        "dualpath.io/v1alpha1", description="APIVersion of this object: dualpath.io/v1alpha1."
    )
    kind: Literal["DualPathCluster"] = Field(
        "DualPathCluster", description="Kind of this object: DualPathCluster."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Standard object metadata (name, namespace, labels, ...)."
    )
    spec: DualPathClusterSpec = Field(description="Desired state of the cluster.")
    status: statuses.DualPathClusterStatus | None = Field(
        None, description="Observed state of the cluster, written by the operator."
    )

    @model_validator(mode="after")
    def _name(self) -> DualPathCluster:
        name = self.metadata.get("name")
        if name is not None and (
            not isinstance(name, str)
            or len(name) > MAX_NAME_LENGTH
            or re.fullmatch(NAME_PATTERN, name) is None
        ):
            raise ValueError(
                f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters"
            )
        return self
