"""PURE: one rebalance tick — path weights from the telemetry sample and, with ``ratio.mode: Auto``,
the P/D ratio decision — plus what the status and the scheduler should learn from it.

Called by :func:`planning.planner.plan` when the pass carries a telemetry sample (a rebalance tick,
every ``spec.rebalance.interval``); between ticks the previous weights and ratio stand.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import ratio, telemetry, weights


@dataclass(frozen=True)
class Tick:
    """What one tick decided."""

    sample: telemetry.TelemetrySample
    weights: weights.WeightsResult
    #: The ratio decision (Auto only).
    outcome: ratio.Outcome | None
    ratio_state: ratio.RatioState

    def capacities(self) -> dict[str, float]:
        """Per-node usable storage-NIC capacity (bytes/s) for the scheduler's weights-aware read side."""
        return {w.node: max(0.0, w.scheduler_capacity_bps) for w in self.weights.weights}


def step(
    spec: api.DualPathClusterSpec,
    previous: api_status.DualPathClusterStatus,
    current: tuple[int, int],
    sample: telemetry.TelemetrySample,
    state: ratio.RatioState,
    now: dt.datetime,
) -> Tick:
    """Weights always; the ratio only in Auto mode (``current`` = the desired counts so far)."""
    w = weights.compute(sample, weights.from_status(previous.path_weights or []))
    outcome: ratio.Outcome | None = None
    new_state = state
    if spec.ratio.mode is specs.RatioMode.AUTO:
        outcome, new_state = ratio.decide(
            spec,
            current,
            sample,
            state,
            now,
            last_change=ratio.last_change_from_status(previous.last_decision),
        )
    return Tick(sample=sample, weights=w, outcome=outcome, ratio_state=new_state)


def transport_problem(sample: telemetry.TelemetrySample) -> str | None:
    """Engines moving KV over TCP although the cluster requests RDMA NICs: the silent fallback."""
    tcp = [e for e in sample.engines if e.transport == "tcp"]
    if not tcp:
        return None
    rates = [e.transport_rate_bps for e in tcp if e.transport_rate_bps is not None]
    rate = f" at {sum(rates) / 1e9:.2f} GB/s" if rates else ""
    pods = ", ".join(sorted(e.pod for e in tcp))
    return f"KV moves over TCP{rate} on {pods}, although the pods request RDMA NICs (check the transport)"


def verified_transport(sample: telemetry.TelemetrySample) -> str | None:
    """A summary when every engine reports an RDMA-class transport (rdma or cuda)."""
    kinds = {e.transport for e in sample.engines}
    if sample.engines and kinds <= {"rdma", "cuda"}:
        return f"engines move KV over {', '.join(sorted(kinds))}"
    return None
