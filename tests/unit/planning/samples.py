"""Builders of specs and telemetry samples shared by the planner tests in this package."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.planning import telemetry
from tests.unit.api import specs

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
GB = 1e9


def cluster_body(
    *,
    prefill: tuple[int, int] = (1, 8),
    decode: tuple[int, int] = (1, 8),
    gpus: int = 8,
    budget: int | None = None,
    slo: tuple[int, int] | None = (2000, 50),
    windows: int = 3,
    cooldown: str = "5m",
    interval: str = "30s",
    max_step: int = 1,
    start: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A valid Auto-mode DualPathCluster (8 GPUs a group, 400 Gbit/s storage NIC by default)."""
    body = copy.deepcopy(specs.valid_cluster())
    spec = body["spec"]
    ratio: dict[str, Any] = {"mode": "Auto"}
    if start is not None:
        ratio |= {"prefill": start[0], "decode": start[1]}
    if budget is not None:
        ratio["gpuBudget"] = budget
    spec["ratio"] = ratio
    spec["prefill"] = {"min": prefill[0], "max": prefill[1], "gpusPerPod": gpus}
    spec["decode"] = {"min": decode[0], "max": decode[1], "gpusPerPod": gpus}
    rebalance: dict[str, Any] = {
        "interval": interval,
        "cooldown": cooldown,
        "stabilizationWindows": windows,
        "maxStep": max_step,
    }
    if slo is not None:
        rebalance["slo"] = {"ttftMs": slo[0], "tpotMs": slo[1]}
    spec["rebalance"] = rebalance
    return body


def spec(**kwargs: Any) -> api.DualPathClusterSpec:
    return api.DualPathCluster.model_validate(cluster_body(**kwargs)).spec


def node(
    name: str,
    *,
    snic_gbps: float = 400,
    rx: float = 10 * GB,
    kv: float | None = None,
    cnic_gbps: float = 3200,
    cnic_tx: float = 50 * GB,
    cnic_rx: float = 50 * GB,
) -> telemetry.NodeSample:
    """A node sample in bytes/s; ``kv`` defaults to all of ``rx`` being KV reads."""
    return telemetry.NodeSample(
        node=name,
        snic_rx_bps=rx,
        snic_capacity_bps=snic_gbps * GB / 8,
        snic_kv_rx_bps=rx if kv is None else kv,
        cnic_tx_bps=cnic_tx,
        cnic_rx_bps=cnic_rx,
        cnic_capacity_bps=cnic_gbps * GB / 8,
    )


def load(
    current: tuple[int, int],
    *,
    ttft_s: float | None = 1.0,
    tpot_s: float | None = 0.025,
    pe_queue: float = 80000,
    de_queue: float = 400000,
    hbm: float | None = 0.5,
    at: dt.datetime = T0,
    problems: tuple[str, ...] = (),
) -> telemetry.TelemetrySample:
    """A sample with ``current`` engine groups, each node with one group; pressures: prefill queue
    80000/160000 = 0.5, TTFT 1 s / 2 s = 0.5; decode queue 400000/1.6e6 = 0.25, TPOT 25/50 = 0.5,
    HBM 0.5/0.9 = 0.56 by default."""
    p, d = current
    engines = [
        telemetry.EngineSample(
            pod=f"pe-{i}", node=f"n-p{i}", role="prefill", queued_tokens=pe_queue, ttft_p90_s=ttft_s
        )
        for i in range(p)
    ] + [
        telemetry.EngineSample(
            pod=f"de-{i}",
            node=f"n-d{i}",
            role="decode",
            queued_tokens=de_queue,
            hbm_used_ratio=hbm,
            tpot_p90_s=tpot_s,
        )
        for i in range(d)
    ]
    nodes = {e.node: node(e.node) for e in engines}
    return telemetry.TelemetrySample(
        taken_at=at, window_s=60, nodes=nodes, engines=tuple(engines), problems=problems
    )
