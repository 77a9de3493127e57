"""Status conditions of a DualPathCluster: types, reasons, the Condition model and ``set_condition``.

Condition types and reasons are closed enums so that events, alerts and the Argo CD health script can
rely on them; add a reason here before using it. :func:`set_condition` is pure (the clock is passed
in): it returns a new list and moves ``lastTransitionTime`` only when a condition's status flips, as
``metav1.Condition`` requires. Called by the status computation in ``dualpath_operator.planning``
and by the reconcile loop; the v1alpha1 status model embeds :class:`Condition`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import Field

from dualpath_operator.api.v1alpha1 import common


class ConditionType(StrEnum):
    """The conditions a DualPathCluster reports."""

    READY = "Ready"
    """All desired engine groups and the scheduler are ready and serving."""
    PROGRESSING = "Progressing"
    """Children are being created, replaced or scaled towards the desired state."""
    DEGRADED = "Degraded"
    """Something needs attention (unschedulable pods, crashing engines, failed applies)."""
    REBALANCING = "Rebalancing"
    """A ratio change (drain, role switch or recreate) is in flight."""
    TELEMETRY_AVAILABLE = "TelemetryAvailable"
    """The last telemetry sample is complete and fresh; False holds the rebalancer."""
    RDMA_READY = "RDMAReady"
    """Every engine pod got its compute and storage NIC resources."""


class ConditionStatus(StrEnum):
    """The status of a condition, as in ``metav1.Condition``."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Reason(StrEnum):
    """Every reason a condition (and the event emitted when it flips) may carry."""

    # Ready
    ALL_READY = "AllReady"
    ENGINES_NOT_READY = "EnginesNotReady"
    SCHEDULER_NOT_READY = "SchedulerNotReady"
    # Progressing
    CREATING = "Creating"
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    ROLLING_OUT = "RollingOut"
    UP_TO_DATE = "UpToDate"
    # Degraded
    AS_EXPECTED = "AsExpected"
    UNSCHEDULABLE = "Unschedulable"
    ENGINE_FAILED = "EngineFailed"
    APPLY_FAILED = "ApplyFailed"
    INSUFFICIENT_GPUS = "InsufficientGPUs"
    # Rebalancing
    STABLE = "Stable"
    DISABLED = "Disabled"
    DRAINING = "Draining"
    SWITCHING_ROLE = "SwitchingRole"
    RECREATING = "Recreating"
    COOLING_DOWN = "CoolingDown"
    # TelemetryAvailable
    TELEMETRY_FRESH = "TelemetryFresh"
    TELEMETRY_STALE = "TelemetryStale"
    TELEMETRY_UNREACHABLE = "TelemetryUnreachable"
    TELEMETRY_INCOMPLETE = "TelemetryIncomplete"
    # RDMAReady
    NICS_ALLOCATED = "NICsAllocated"
    NIC_RESOURCES_MISSING = "NICResourcesMissing"
    TRANSPORT_VERIFIED = "TransportVerified"
    KV_OVER_TCP = "KVOverTCP"
    # any type, before the first observation
    PENDING = "Pending"


class Condition(common.ApiModel):
    """One aspect of the cluster's state, in the shape of ``metav1.Condition``."""

    type: str = Field(
        min_length=1,
        max_length=316,
        pattern=r"^[A-Za-z][A-Za-z0-9]*$",
        description=(
            "Condition type: Ready, Progressing, Degraded, Rebalancing, TelemetryAvailable or RDMAReady."
        ),
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=common.REASON_PATTERN,
        description="Machine-readable UpperCamelCase reason for the condition's last change.",
    )
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation of the spec this condition was computed from."
    )


def find_condition(conditions: Sequence[Condition], type_: ConditionType) -> Condition | None:
    """Return the condition of ``type_`` in ``conditions``, or ``None``."""
    return next((c for c in conditions if c.type == type_.value), None)


def is_true(conditions: Sequence[Condition], type_: ConditionType) -> bool:
    """Whether the condition of ``type_`` exists and has status True."""
    found = find_condition(conditions, type_)
    return found is not None and found.status is ConditionStatus.TRUE


def set_condition(
    conditions: Sequence[Condition],
    type_: ConditionType,
    status: ConditionStatus,
    reason: Reason,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """Return ``conditions`` with the condition of ``type_`` set; the input is not changed.

    ``lastTransitionTime`` becomes ``now`` (UTC, whole seconds, as the API stores it) when the
    condition is new or its status differs; otherwise it keeps its old value while reason, message
    and observedGeneration are updated. Other conditions and the order are kept; a new condition is
    appended. Raises ``ValueError`` for a naive ``now``.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    stamp = now.astimezone(UTC).replace(microsecond=0)
    result: list[Condition] = []
    found = False
    for existing in conditions:
        if existing.type != type_.value:
            result.append(existing)
            continue
        found = True
        transition = stamp if existing.status is not status else existing.last_transition_time
        result.append(
            Condition(
                type=type_.value,
                status=status,
                reason=reason.value,
                message=message,
                last_transition_time=transition,
                observed_generation=observed_generation,
            )
        )
    if not found:
        result.append(
            Condition(
                type=type_.value,
                status=status,
                reason=reason.value,
                message=message,
                last_transition_time=stamp,
                observed_generation=observed_generation,
            )
        )
    return result
