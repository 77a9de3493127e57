"""PURE telemetry types: one point-in-time sample of NIC and engine signals, as the planners read it.

Filled by :mod:`dualpath_operator.telemetry` (Prometheus HTTP API or direct scrape of engine
``/metrics``); built by hand in tests and by the simulator. Rates are already computed over the
sample's window (bytes/s); ``None`` means "not measured" (a planner must hold, not guess).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["prefill", "decode"]
TransportKind = Literal["rdma", "cuda", "tcp", "unknown"]


@dataclass(frozen=True)
class NodeSample:
    """Per-node NIC rates over the window (bytes/s)."""

    node: str
    #: Storage-NIC receive rate (KV reads from storage and anything else the NIC carries).
    snic_rx_bps: float | None = None
    #: Storage-NIC line rate (node_infiniband_rate_bytes_per_second, else spec.network.storageNic.gbps).
    snic_capacity_bps: float | None = None
    #: Of ``snic_rx_bps``, the part that is KV reads of our engines (engine counters).
    snic_kv_rx_bps: float | None = None
    #: Compute-NIC rates summed over the node's compute NICs, and their summed line rate.
    cnic_tx_bps: float | None = None
    cnic_rx_bps: float | None = None
    cnic_capacity_bps: float | None = None


@dataclass(frozen=True)
class EngineSample:
    """Per-engine-group signals (one pod)."""

    pod: str
    node: str
    role: Role
    #: Tokens assigned and not finished (the paper's tok_e), summed over the group's engines.
    queued_tokens: float | None = None
    #: Tokens waiting in the node's storage read queue (the paper's rq).
    read_queue_tokens: float | None = None
    inflight_requests: float | None = None
    #: Fraction of KV memory (HBM) in use, 0..1.
    hbm_used_ratio: float | None = None
    #: Latency quantiles over the window, seconds.
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    #: KV bytes/s read from storage by this group, per path ("pe" = PE read, "de" = DE read).
    kv_read_pe_bps: float | None = None
    kv_read_de_bps: float | None = None
    #: Which transport actually carries PE<->DE KV, and its measured rate (bytes/s).
    transport: TransportKind = "unknown"
    transport_rate_bps: float | None = None


@dataclass(frozen=True)
class TelemetrySample:
    """Everything one rebalance tick knows. ``problems`` explains why it is incomplete, if it is."""

    taken_at: dt.datetime
    window_s: float
    nodes: dict[str, NodeSample] = field(default_factory=dict)
    engines: tuple[EngineSample, ...] = ()
    #: Why the sample cannot be trusted: unreachable source, stale series, garbage values, missing
    #: nodes. Empty means complete and fresh.
    problems: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.problems

    def engines_of(self, role: Role) -> tuple[EngineSample, ...]:
        return tuple(e for e in self.engines if e.role == role)
