"""What both collectors share: their settings, the engine pods they expect, and the checked assembly of a
:class:`~dualpath_operator.planning.telemetry.TelemetrySample`.

:class:`SampleBuilder` takes raw per-node and per-engine values as a collector finds them and turns
everything suspicious into an entry of ``problems`` instead of a number: NaN or infinite values,
negative rates, rates above ``absurd_rate_factor`` x line rate, ratios outside 0..1, and nodes or
engine pods that should be there but reported nothing. A value judged garbage is dropped (None), so a
planner never reads it. Used by :mod:`~dualpath_operator.telemetry.prometheus` and
:mod:`~dualpath_operator.telemetry.scrape`; :func:`settings_for` derives settings from a cluster spec.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dualpath_operator.api.v1alpha1 import cluster
from dualpath_operator.planning import telemetry as types

NodeField = Literal[
    "snic_rx_bps", "snic_capacity_bps", "snic_kv_rx_bps", "cnic_tx_bps", "cnic_rx_bps", "cnic_capacity_bps"
]
EngineField = Literal[
    "queued_tokens",
    "read_queue_tokens",
    "inflight_requests",
    "hbm_used_ratio",
    "ttft_p90_s",
    "tpot_p90_s",
    "kv_read_pe_bps",
    "kv_read_de_bps",
    "transport_rate_bps",
]
_RATES_OF_SNIC: tuple[NodeField, ...] = ("snic_rx_bps", "snic_kv_rx_bps")
_RATES_OF_CNIC: tuple[NodeField, ...] = ("cnic_tx_bps", "cnic_rx_bps")
_LATENCIES: frozenset[str] = frozenset({"ttft_p90_s", "tpot_p90_s"})
_ENGINE_RATES: tuple[EngineField, ...] = ("kv_read_pe_bps", "kv_read_de_bps", "transport_rate_bps")
KV_READ_PATHS: dict[EngineField, tuple[str, ...]] = {
    "kv_read_pe_bps": ("pe", "pe_read"),
    "kv_read_de_bps": ("de", "de_read"),
}
"""``path`` label values of ``dualpath_engine_kv_read_bytes_total`` per read path: the engine service
exports ``pe``/``de``, the traffic manager's own series ``pe_read``/``de_read``."""
_TRANSPORTS: dict[str, types.TransportKind] = {"rdma": "rdma", "cuda": "cuda", "tcp": "tcp"}


class CollectorSettings(BaseModel):
    """How a collector finds, names and judges telemetry (per cluster)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    storage_device_regex: str = Field(
        r"mlx5_storage\d+|mlx5_s\d+",
        description="Full-match regex of storage-NIC device names (sysfs infiniband device / nic label).",
    )
    compute_device_regex: str = Field(
        r"mlx5_\d+", description="Full-match regex of compute-NIC device names."
    )
    node_label: str = Field("node", description="Label that names the node on node_exporter series.")
    pod_label: str = Field("pod", description="Label that names the engine pod on engine series.")
    engine_selector: str = Field(
        "",
        description='Extra PromQL label matchers for engine series, e.g. namespace="prod" (no braces).',
    )
    scheduler_selector: str = Field(
        "", description="Extra PromQL label matchers for the scheduler's series (no braces)."
    )
    request_timeout_s: float = Field(5.0, gt=0, le=300, description="Timeout of every HTTP request.")
    absurd_rate_factor: float = Field(
        2.0, gt=1, description="A NIC rate above this multiple of the NIC's line rate is garbage."
    )
    max_rate_bps: float = Field(
        1e12, gt=0, description="Ceiling for rates whose line rate is unknown (bytes/s); above is garbage."
    )
    snic_capacity_fallback_bps: float | None = Field(
        None, gt=0, description="Storage-NIC line rate to use when none is measured (spec gbps)."
    )
    cnic_capacity_fallback_bps: float | None = Field(
        None, gt=0, description="Summed compute-NIC line rate per node to use when none is measured."
    )
    require_compute_nic: bool = Field(
        False, description="Treat a node without compute-NIC rates as incomplete telemetry."
    )
    required_engine_signals: tuple[EngineField, ...] = Field(
        ("queued_tokens", "read_queue_tokens", "kv_read_pe_bps", "kv_read_de_bps"),
        description="Engine signals whose absence makes the sample incomplete.",
    )
    ttft_quantile: float = Field(0.9, gt=0, lt=1, description="Quantile reported as ttft_p90_s/tpot_p90_s.")


def settings_for(spec: cluster.DualPathClusterSpec, **overrides: object) -> CollectorSettings:
    """Settings for a cluster: storage-NIC fallback capacity from ``spec.network.storageNic.gbps``."""
    values: dict[str, object] = {"snic_capacity_fallback_bps": spec.network.storage_nic.gbps * 1e9 / 8}
    values.update(overrides)
    return CollectorSettings.model_validate(values)


@dataclasses.dataclass(frozen=True)
class EngineTarget:
    """One engine pod the operator expects telemetry from."""

    pod: str
    node: str
    role: types.Role
    #: ``http://<pod ip>:<port>/metrics`` for the direct-scrape collector; unused by Prometheus.
    metrics_url: str | None = None


class SampleBuilder:
    """Collects checked values for one sample; :meth:`build` adds the missing-data problems."""

    def __init__(
        self,
        settings: CollectorSettings,
        window_s: float,
        targets: Iterable[EngineTarget],
        nodes: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.window_s = window_s
        self.targets = {t.pod: t for t in targets}
        self.nodes: dict[str, dict[str, float | None]] = {}
        self.expected = {*nodes, *(t.node for t in self.targets.values())}
        for node in self.expected:
            self.nodes.setdefault(node, {})
        self.engines: dict[str, dict[str, float | None]] = {pod: {} for pod in self.targets}
        """Per pod and signal; an absent key means not reported."""
        self.transport: dict[str, types.TransportKind] = {}
        self.reported: set[str] = set()
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        """Record why the sample is incomplete (once per text)."""
        if text not in self.problems:
            self.problems.append(text)

    def _checked(self, value: float, what: str, *, nan_is_missing: bool = False) -> float | None:
        if math.isnan(value):
            if not nan_is_missing:
                self.problem(f"garbage: {what} is NaN")
            return None
        if math.isinf(value):
            self.problem(f"garbage: {what} is infinite")
            return None
        if value < 0:
            self.problem(f"garbage: {what} is negative ({value:g})")
            return None
        return value

    def set_node(self, node: str, name: NodeField, value: float) -> None:
        """A node's value; values of other nodes are ignored when any node is expected."""
        if self.expected and node not in self.expected:
            return
        self.nodes.setdefault(node, {})[name] = self._checked(value, f"node {node} {name}")

    def set_engine(self, pod: str, name: EngineField, value: float) -> None:
        """An engine's value; pods that are not targets are ignored."""
        if pod not in self.engines:
            return
        self.reported.add(pod)
        checked = self._checked(value, f"engine {pod} {name}", nan_is_missing=name in _LATENCIES)
        if name == "hbm_used_ratio" and checked is not None and checked > 1:
            self.problem(f"garbage: engine {pod} hbm_used_ratio is {checked:g} (above 1)")
            checked = None
        self.engines[pod][name] = checked

    def set_transport(self, pod: str, kind: str) -> None:
        """Which transport carries the engine's KV (rdma, cuda, tcp; anything else is unknown)."""
        if pod not in self.engines:
            return
        self.reported.add(pod)
        self.transport[pod] = _TRANSPORTS.get(kind, "unknown")

    def set_all_engines(self, name: EngineField, value: float) -> None:
        """A cluster-wide value (e.g. the scheduler's TTFT quantile) recorded on every engine."""
        for pod in self.engines:
            checked = self._checked(value, f"cluster {name}", nan_is_missing=name in _LATENCIES)
            self.engines[pod][name] = checked

    # ------------------------------------------------------------------------------------- build

    def _ceiling(self, capacity: float | None) -> tuple[float, str]:
        if capacity is None:
            return self.settings.max_rate_bps, "the sanity ceiling"
        return self.settings.absurd_rate_factor * capacity, f"{self.settings.absurd_rate_factor:g}x line rate"

    def _bounded(
        self, values: dict[str, float | None], node: str, names: tuple[NodeField, ...], cap: str
    ) -> None:
        ceiling, why = self._ceiling(values.get(cap))
        for name in names:
            value = values.get(name)
            if value is not None and value > ceiling:
                self.problem(f"garbage: node {node} {name} is {value:.4g} B/s, above {why} ({ceiling:.4g})")
                values[name] = None

    def _node(self, node: str, values: dict[str, float | None]) -> types.NodeSample:
        s = self.settings
        if values.get("snic_capacity_bps") in (None, 0.0) and s.snic_capacity_fallback_bps is not None:
            values["snic_capacity_bps"] = s.snic_capacity_fallback_bps
        if values.get("cnic_capacity_bps") in (None, 0.0) and s.cnic_capacity_fallback_bps is not None:
            values["cnic_capacity_bps"] = s.cnic_capacity_fallback_bps
        if values.get("snic_capacity_bps") == 0.0:
            values["snic_capacity_bps"] = None
        if values.get("cnic_capacity_bps") == 0.0:
            values["cnic_capacity_bps"] = None
        if "snic_kv_rx_bps" not in values:
            values["snic_kv_rx_bps"] = self._kv_rx(node)
        self._bounded(values, node, _RATES_OF_SNIC, "snic_capacity_bps")
        self._bounded(values, node, _RATES_OF_CNIC, "cnic_capacity_bps")
        if values.get("snic_rx_bps") is None:
            self.problem(f"node {node}: no storage-NIC receive rate")
        if values.get("snic_capacity_bps") is None:
            self.problem(f"node {node}: no storage-NIC line rate")
        if s.require_compute_nic and (values.get("cnic_tx_bps") is None or values.get("cnic_rx_bps") is None):
            self.problem(f"node {node}: no compute-NIC rates")
        return types.NodeSample(node=node, **values)

    def _kv_rx(self, node: str) -> float | None:
        total = 0.0
        pods = [pod for pod, t in self.targets.items() if t.node == node]
        if not pods:
            return None
        for pod in pods:
            pe, de = self.engines[pod].get("kv_read_pe_bps"), self.engines[pod].get("kv_read_de_bps")
            if pe is None or de is None:
                return None
            total += pe + de
        return total

    def _engine(self, target: EngineTarget) -> types.EngineSample:
        values = self.engines[target.pod]
        for name in _ENGINE_RATES:
            rate = values.get(name)
            if rate is not None and rate > self.settings.max_rate_bps:
                self.problem(
                    f"garbage: engine {target.pod} {name} is {rate:.4g} B/s, above the sanity ceiling"
                )
                values[name] = None
        if target.pod not in self.reported:
            self.problem(f"engine {target.pod} (node {target.node}): no metrics")
        else:
            for name in self.settings.required_engine_signals:
                if values.get(name) is None:
                    self.problem(f"engine {target.pod}: no {name}")
        return types.EngineSample(
            pod=target.pod,
            node=target.node,
            role=target.role,
            transport=self.transport.get(target.pod, "unknown"),
            **values,
        )

    def build(self, taken_at: dt.datetime) -> types.TelemetrySample:
        """The sample, with a problem for every expected node or engine that lacks what planners need."""
        engines = tuple(self._engine(t) for t in self.targets.values())
        nodes = {node: self._node(node, dict(values)) for node, values in sorted(self.nodes.items())}
        return types.TelemetrySample(
            taken_at=taken_at,
            window_s=self.window_s,
            nodes=nodes,
            engines=engines,
            problems=tuple(self.problems),
        )
