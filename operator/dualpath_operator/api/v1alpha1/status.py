"""The observed state of a DualPathCluster: ``DualPathClusterStatus``, written only by the operator.

Everything the operator decides at run time (current and desired ratio, path weights, the last
planner decision) lives here and in owned children, never in ``spec`` (the GitOps rule). All fields are
optional and have no schema defaults: an absent field means "not observed yet". Built by the status
computation in ``dualpath_operator.planning`` and written through the status subresource.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import Field

from dualpath_operator.api import conditions as _conditions
from dualpath_operator.api.v1alpha1 import common

RATIO_PATTERN = r"^[0-9]{1,4}P:[0-9]{1,4}D$"
"""How a ratio is shown: ``2P:4D`` (prefill groups, decode groups)."""


def format_ratio(prefill: int, decode: int) -> str:
    """Return the ``2P:4D`` form of a ratio (used by status and the Ratio printer column)."""
    if prefill < 0 or decode < 0:
        raise ValueError(f"group counts must be >= 0, got {prefill}P:{decode}D")
    return f"{prefill}P:{decode}D"


def parse_ratio(text: str) -> tuple[int, int]:
    """Return ``(prefill, decode)`` of a ``2P:4D`` string; ``ValueError`` if it is malformed."""
    match = re.fullmatch(r"([0-9]{1,4})P:([0-9]{1,4})D", text)
    if match is None:
        raise ValueError(f"invalid ratio {text!r}: expected e.g. '2P:4D'")
    return int(match.group(1)), int(match.group(2))


class RoleStatus(common.ApiModel):
    """Engine groups of one role."""

    replicas: int = Field(ge=0, description="Engine groups (pods) of this role that exist.")
    ready: int = Field(ge=0, description="Engine groups of this role whose pods are ready.")


class SchedulerStatus(common.ApiModel):
    """The central scheduler as the operator sees it."""

    endpoint: str | None = Field(
        None, max_length=512, description="URL clients send OpenAI-compatible requests to."
    )
    ready: bool = Field(description="Whether the scheduler is ready to serve.")


class PathWeight(common.ApiModel):
    """The read-path weight of one node, pushed to the scheduler every rebalance interval."""

    node: str = Field(min_length=1, max_length=253, description="Node name.")
    snic_capacity_bps: int = Field(
        ge=0,
        description="Usable storage-NIC capacity for KV reads in bytes/s (line rate minus non-KV traffic).",
    )
    snic_utilization: float = Field(ge=0, le=1, description="Measured storage-NIC utilization, 0 to 1.")
    cnic_headroom: float = Field(ge=0, le=1, description="Unused compute-NIC capacity, 0 to 1.")
    weight: float = Field(
        ge=0, le=1, description="Share of KV reads this node's storage NIC should take, 0 to 1."
    )


class Decision(common.ApiModel):
    """Why the planner did (or did not do) what it did."""

    time: datetime = Field(description="When the decision was taken (RFC 3339).")
    action: str = Field(
        min_length=1,
        max_length=64,
        pattern=common.REASON_PATTERN,
        description="What was decided, UpperCamelCase, e.g. Hold, ScalePrefillUp, SwitchToDecode.",
    )
    reason: str = Field(max_length=1024, description="Why, in words.")
    inputs: dict[str, str] | None = Field(
        None, max_length=64, description="The planner inputs the decision rests on, formatted as strings."
    )


class DualPathClusterStatus(common.ApiModel):
    """Observed state, written by the operator through the status subresource."""

    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation of the spec the operator last reconciled."
    )
    conditions: list[_conditions.Condition] | None = Field(
        None,
        max_length=16,
        description="Ready, Progressing, Degraded, Rebalancing, TelemetryAvailable, RDMAReady.",
        json_schema_extra=common.schema_extra(list_type="map", list_map_keys=["type"]),
    )
    prefill: RoleStatus | None = Field(None, description="Prefill engine groups.")
    decode: RoleStatus | None = Field(None, description="Decode engine groups.")
    ratio: str | None = Field(
        None, pattern=RATIO_PATTERN, description="Current ratio of ready groups, e.g. 2P:4D."
    )
    desired_ratio: str | None = Field(
        None, pattern=RATIO_PATTERN, description="Ratio the operator is converging to, e.g. 3P:3D."
    )
    scheduler: SchedulerStatus | None = Field(None, description="The central scheduler.")
    path_weights: list[PathWeight] | None = Field(
        None,
        max_length=1024,
        description="Per-node read-path weights currently in use by the scheduler.",
        json_schema_extra=common.schema_extra(list_type="map", list_map_keys=["node"]),
    )
    last_decision: Decision | None = Field(None, description="The rebalancer's most recent decision.")
