"""The rebalancer's sections of a DualPathCluster spec: ``telemetry`` (where samples come from) and
``rebalance`` (how often and how far the operator may move path weights and the P/D ratio).

Split from ``spec.py`` to keep modules small; same conventions (pydantic limits become schema bounds,
cross-field checks are CEL rules mirrored by validators). Used by ``cluster.DualPathClusterSpec`` and
read by the rebalance planner.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field, model_validator

from dualpath_operator.api.v1alpha1 import common

# ------------------------------------------------------------------------------------------ telemetry


class TelemetrySource(StrEnum):
    """Where the operator reads NIC and engine telemetry."""

    PROMETHEUS = "Prometheus"
    SCRAPE = "Scrape"


class TelemetryQueries(common.ApiModel):
    """PromQL overrides for source Prometheus; unset entries use the operator's built-in queries."""

    snic_read_bytes: str | None = Field(
        None,
        max_length=2048,
        description="Per-node storage-NIC receive rate in bytes/s, labelled by node.",
    )
    cnic_bytes: str | None = Field(
        None, max_length=2048, description="Per-node compute-NIC transmit+receive rate in bytes/s, by node."
    )
    ttft_seconds: str | None = Field(
        None, max_length=2048, description="Time to first token (p90), in seconds."
    )
    tpot_seconds: str | None = Field(
        None, max_length=2048, description="Time per output token (p90), in seconds."
    )


class TelemetrySpec(common.ApiModel):
    """How the operator samples the telemetry the rebalancer needs."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "self.source != 'Prometheus' || has(self.prometheusUrl)",
                    "spec.telemetry.prometheusUrl is required when spec.telemetry.source is Prometheus",
                    field_path=".prometheusUrl",
                ),
                common.rule(
                    "duration(self.window) >= duration(self.interval)",
                    "spec.telemetry.window must be at least spec.telemetry.interval",
                    field_path=".window",
                ),
            ]
        )
    )

    source: TelemetrySource = Field(
        TelemetrySource.SCRAPE,
        description="Scrape: read engine /metrics directly. Prometheus: query prometheusUrl with PromQL.",
    )
    prometheus_url: str | None = Field(
        None,
        max_length=512,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="Base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090.",
    )
    queries: TelemetryQueries | None = Field(None, description="PromQL overrides for source Prometheus.")
    interval: common.Duration = Field(
        "15s",
        description="Sampling period, e.g. 15s.",
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule("duration(self) >= duration('1s')", "spec.telemetry.interval must be at least 1s")
            ]
        ),
    )
    window: common.Duration = Field(
        "1m", description="Rate window; samples older than this count as stale. At least interval."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TelemetrySpec:
        if self.source is TelemetrySource.PROMETHEUS and self.prometheus_url is None:
            raise ValueError("prometheusUrl is required when source is Prometheus")
        if common.parse_duration(self.window) < common.parse_duration(self.interval):
            raise ValueError("window must be at least interval")
        if common.parse_duration(self.interval) < 1:
            raise ValueError("interval must be at least 1s")
        return self


# ------------------------------------------------------------------------------------------ rebalance


class RebalanceMode(StrEnum):
    """How a ratio change moves an engine group from one role to the other."""

    ROLE_SWITCH = "RoleSwitch"
    RECREATE = "Recreate"


class SloSpec(common.ApiModel):
    """Latency objectives the ratio planner holds the cluster to."""

    ttft_ms: int = Field(ge=1, le=600000, description="Target time to first token (p90), in ms.")
    tpot_ms: int = Field(ge=1, le=60000, description="Target time per output token (p90), in ms.")


class RebalanceSpec(common.ApiModel):
    """The continuous rebalancer: per-node path weights and (with ratio.mode Auto) the P/D ratio."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "duration(self.cooldown) >= duration(self.interval)",
                    "spec.rebalance.cooldown must be at least spec.rebalance.interval",
                    field_path=".cooldown",
                )
            ]
        )
    )

    enabled: bool = Field(True, description="Update path weights and (Auto) the ratio from live telemetry.")
    interval: common.Duration = Field(
        "30s",
        description="Period of a rebalance decision, e.g. 30s (at least 5s).",
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule("duration(self) >= duration('5s')", "spec.rebalance.interval must be at least 5s")
            ]
        ),
    )
    cooldown: common.Duration = Field(
        "5m", description="Least time between two ratio changes; at least interval."
    )
    stabilization_windows: int = Field(
        3,
        ge=1,
        le=100,
        description="Consecutive intervals a ratio signal must hold before it acts (hysteresis).",
    )
    max_step: int = Field(1, ge=1, le=64, description="Most engine groups moved by one ratio change.")
    mode: RebalanceMode = Field(
        RebalanceMode.ROLE_SWITCH,
        description="RoleSwitch: a drained engine flips role in place, no model reload. Recreate: new pod.",
    )
    slo: SloSpec | None = Field(
        None, description="Latency objectives; without them the planner balances load."
    )
    drain_timeout: common.Duration = Field(
        "60s",
        description=(
            "Longest wait for a draining engine group (scale-down, replacement, role switch) to finish its "
            "in-flight requests before its pod is deleted or its role flipped; it goes earlier once idle."
        ),
    )

    @model_validator(mode="after")
    def _cooldown(self) -> RebalanceSpec:
        if common.parse_duration(self.cooldown) < common.parse_duration(self.interval):
            raise ValueError("cooldown must be at least interval")
        if common.parse_duration(self.interval) < 5:
            raise ValueError("interval must be at least 5s")
        return self
