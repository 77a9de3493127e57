"""The operator's rebalancer inside the simulation: telemetry from the simulated cluster, real planners.

Called by ``bench.sim.scenarios`` (weights-aware reads on a degraded node; Auto ratio). Every
``rebalance_interval_s`` of simulated time, ``Rebalancer.tick`` builds the same
``dualpath_operator.planning.telemetry.TelemetrySample`` the operator's collectors build (storage-
and compute-NIC rates per node over the interval, and per engine group: queued tokens, read queue,
HBM use, TTFT/TPOT p90), then

* weights: ``dualpath_operator.planning.weights.compute`` gives each node's usable storage capacity,
  pushed to the simulated scheduler (``Simulation.capacity``) as the operator pushes it to
  ``PUT /admin/v1/weights``;
* ratio (Auto): ``dualpath_operator.planning.ratio.decide`` on a DualPathCluster spec of this shape;
  a change is applied drain-first with ``Simulation.request_switch`` (role switch in place).

A degraded storage NIC is modelled the way telemetry sees it: the line rate stays, and other
(non-KV) traffic takes the missing share of the receive rate.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bench.sim import cluster
from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.planning import ratio, telemetry, weights

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def cluster_spec(
    prefill: int,
    decode: int,
    *,
    gpus: int,
    snic_gbps: float,
    interval_s: float,
    cooldown_s: float,
    windows: int,
    slo: tuple[int, int] | None,
) -> api.DualPathClusterSpec:
    """An Auto-mode spec for a cluster of ``prefill + decode`` nodes that cannot grow (fixed GPUs)."""
    total = prefill + decode
    body: dict[str, Any] = {
        "apiVersion": "dualpath.io/v1alpha1",
        "kind": "DualPathCluster",
        "metadata": {"name": "sim"},
        "spec": {
            "model": {"name": "sim", "source": "random"},
            "engine": {"image": "dualpath-engine:sim"},
            "prefill": {"min": 1, "max": total - 1, "gpusPerPod": gpus},
            "decode": {"min": 1, "max": total - 1, "gpusPerPod": gpus},
            "ratio": {"mode": "Auto", "prefill": prefill, "decode": decode, "gpuBudget": total * gpus},
            "network": {
                "computeNic": {"resourceName": "nvidia.com/sriov_rdma"},
                "storageNic": {"resourceName": "rdma/hca_shared_devices_a", "gbps": int(snic_gbps)},
            },
            "storage": {"volume": {"hostPath": {"path": "/var/lib/dualpath"}}},
            "rebalance": {
                "enabled": True,
                "interval": f"{int(interval_s)}s",
                "cooldown": f"{int(cooldown_s)}s",
                "stabilizationWindows": windows,
                "maxStep": 1,
            },
        },
    }
    if slo is not None:
        body["spec"]["rebalance"]["slo"] = {"ttftMs": slo[0], "tpotMs": slo[1]}
    return api.DualPathCluster.model_validate(body).spec


def _p90(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


class Rebalancer:
    """Runs the real weights planner (and, with a spec, the ratio planner) every interval."""

    def __init__(
        self,
        sim: cluster.Simulation,
        *,
        use_weights: bool,
        spec: api.DualPathClusterSpec | None = None,
        params: ratio.RatioParams | None = None,
    ) -> None:
        self.sim = sim
        self.use_weights = use_weights
        self.spec = spec
        self.params = params
        self.state = ratio.RatioState()
        self.weights: tuple[weights.NodeWeight, ...] = ()
        self.decisions: list[tuple[float, str, str]] = []
        """(time, action, ratio after) of every ratio decision that changed the ratio."""
        self.ratio_trace: list[tuple[float, int, int]] = []
        self._last = 0.0
        self._cursor = {"prefill": 0, "decode": 0}
        sim.interval_hooks.append(self.tick)

    def sample(self) -> telemetry.TelemetrySample:
        """The telemetry of the interval that just ended."""
        sim = self.sim
        start, now = self._last, sim.now
        window = max(now - start, 1e-9)
        hw = sim.cfg.hardware
        nodes: dict[str, telemetry.NodeSample] = {}
        engines: list[telemetry.EngineSample] = []
        ttft = self._recent(sim.prefill_log, "prefill", start)
        tpot = self._recent(sim.decode_log, "decode", start)
        for node in sim.nodes:
            kv = node.snic.bytes_between(start, now) / window
            health = node.snic.rate / hw.snic_bytes_per_s
            other = (1.0 - health) * hw.snic_bytes_per_s
            cnic = sim.counters["cnic:" + node.name] / window
            sim.counters["cnic:" + node.name] = 0
            nodes[node.name] = telemetry.NodeSample(
                node=node.name,
                snic_rx_bps=kv + other,
                snic_capacity_bps=hw.snic_bytes_per_s,
                snic_kv_rx_bps=kv,
                cnic_tx_bps=cnic,
                cnic_rx_bps=cnic,
                cnic_capacity_bps=hw.cnic_bytes_per_s * hw.gpus_per_node,
            )
            # A draining node still reports its old role until it switches (as its pods do).
            if node.role == "prefill":
                engines.append(
                    telemetry.EngineSample(
                        pod=node.name,
                        node=node.name,
                        role="prefill",
                        queued_tokens=float(sum(e.tok for e in node.prefill)),
                        read_queue_tokens=float(node.snic.queued_tokens),
                        ttft_p90_s=_p90(ttft.get(node.name, [])),
                    )
                )
            else:
                # HBM in use: reserved for the requests bound to the group (what stops new binds).
                total = hw.hbm_kv_bytes_per_gpu * len(node.decode)
                used = total - sum(e.free_hbm for e in node.decode)
                engines.append(
                    telemetry.EngineSample(
                        pod=node.name,
                        node=node.name,
                        role="decode",
                        queued_tokens=float(sum(e.tok for e in node.decode)),
                        read_queue_tokens=float(node.snic.queued_tokens),
                        hbm_used_ratio=min(1.0, used / total) if total else 0.0,
                        tpot_p90_s=_p90(tpot.get(node.name, [])),
                    )
                )
        taken = EPOCH + dt.timedelta(seconds=now)
        return telemetry.TelemetrySample(taken_at=taken, window_s=window, nodes=nodes, engines=tuple(engines))

    def _recent(self, log: list[tuple[float, str, float]], key: str, start: float) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        index = self._cursor[key]
        while index < len(log):
            when, node, value = log[index]
            if when > start:
                out.setdefault(node, []).append(value)
            index += 1
        self._cursor[key] = index
        return out

    def tick(self, sim: cluster.Simulation) -> None:
        """One rebalance interval: weights, then (Auto) the ratio decision and its role switches."""
        sample = self.sample()
        self._last = sim.now
        if self.use_weights:
            result = weights.compute(sample, self.weights)
            if not result.held:
                self.weights = result.weights
                sim.capacity = {w.node: w.scheduler_capacity_bps for w in result.weights}
        if self.spec is None:
            return
        # The ratio the cluster is moving to (as the operator's status.ratio after a change); while a
        # drain is in progress the sample still shows the old roles and the planner waits (converging).
        roles = [n.switch_to or n.role for n in sim.nodes]
        current = (roles.count("prefill"), roles.count("decode"))
        self.ratio_trace.append((sim.now, *current))
        outcome, self.state = ratio.decide(
            self.spec, current, sample, self.state, sample.taken_at, params=self.params
        )
        if not outcome.changed:
            return
        self.decisions.append((sim.now, outcome.decision.action, f"{outcome.prefill}P{outcome.decode}D"))
        self._apply(current, (outcome.prefill, outcome.decode))

    def _apply(self, current: tuple[int, int], target: tuple[int, int]) -> None:
        sim = self.sim
        more_prefill = target[0] - current[0]
        if more_prefill > 0:
            donors = [n for n in sim.nodes if n.role == "decode" and n.switch_to is None]
            donors.sort(key=lambda n: sum(e.tok for e in n.decode))
            for node in donors[:more_prefill]:
                sim.request_switch(node.name, "prefill")
        elif more_prefill < 0:
            donors = [n for n in sim.nodes if n.role == "prefill" and n.switch_to is None]
            donors.sort(key=lambda n: sum(e.tok for e in n.prefill))
            for node in donors[:-more_prefill]:
                sim.request_switch(node.name, "decode")
