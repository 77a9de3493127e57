"""PURE: per-node read-path weights from one telemetry sample and the previous weights.

For every node the rebalancer asks how many KV bytes per second its storage NIC (SNIC) can read
for our engines right now::

    usable   = snic_capacity - (snic_rx - snic_kv_rx)        line rate minus non-KV traffic
    cnic_free = cnic_capacity - max(cnic_tx, cnic_rx)         compute-NIC bandwidth still unused
    effective = min(usable, cnic_free + snic_kv_rx)           KV read bytes also cross the CNIC

``effective`` is smoothed with an exponential moving average against the previous weights
(``alpha`` is the weight of the new sample) and turned into shares: a node's weight is its share
of the cluster's KV reads such that every SNIC finishes its share at the same time (time =
bytes / capacity, so the share is proportional to capacity). Shares are bounded to
``[floor, ceiling]`` times an equal share (never 0 for a healthy node, i.e. one with capacity
left); a node measured without usable capacity gets 0 at once (no smoothing toward a dead link).
An incomplete sample changes nothing: the previous weights are returned with the reason.

Called by :mod:`planning.planner` every rebalance interval (results go to ``status.pathWeights``
and, through :func:`admin_body`, to the scheduler's ``PUT /admin/v1/weights``), the preview CLI
and the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import telemetry


class WeightParams(BaseModel):
    """Knobs of the path-weight computation (operator settings; the defaults suit most clusters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(
        0.5,
        gt=0,
        le=1,
        description="EMA weight of the new sample, 0 to 1 (1 = no smoothing).",
    )
    floor: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Least weight of a healthy node, as a fraction of an equal share (1/n).",
    )
    ceiling: float = Field(
        4.0,
        ge=1,
        description="Most weight of a node, as a multiple of an equal share (1/n), and never above 1.",
    )

    @model_validator(mode="after")
    def _order(self) -> WeightParams:
        if self.floor > self.ceiling:
            raise ValueError("floor must not exceed ceiling")
        return self


@dataclass(frozen=True)
class NodeWeight:
    """The path weight of one node."""

    node: str
    #: Smoothed usable capacity for KV reads, bytes/s (``effective`` above, after the EMA).
    snic_capacity_bps: float
    #: Measured SNIC utilization (rx / line rate), 0..1.
    snic_utilization: float
    #: Unused compute-NIC capacity, 0..1.
    cnic_headroom: float
    #: Share of the cluster's KV reads for this node's SNIC, 0..1; shares sum to 1 over healthy nodes.
    weight: float
    #: What the scheduler is told: ``weight`` times the summed smoothed capacity (bytes/s). Equals
    #: ``snic_capacity_bps`` unless the floor or ceiling moved the weight.
    scheduler_capacity_bps: float

    def to_path_weight(self) -> api_status.PathWeight:
        """The ``status.pathWeights`` entry, rounded (3 significant digits for the capacity, 3 decimals
        for fractions) so that measurement noise does not rewrite the status every interval."""
        return api_status.PathWeight(
            node=self.node,
            snic_capacity_bps=_significant(self.snic_capacity_bps, 3),
            snic_utilization=round(_unit(self.snic_utilization), 3),
            cnic_headroom=round(_unit(self.cnic_headroom), 3),
            weight=round(_unit(self.weight), 3),
        )


@dataclass(frozen=True)
class WeightsResult:
    """New weights (or the previous ones when ``held``) and why."""

    weights: tuple[NodeWeight, ...]
    held: bool
    reason: str

    def path_weights(self) -> list[api_status.PathWeight]:
        return [w.to_path_weight() for w in self.weights]


def admin_body(weights: Sequence[NodeWeight]) -> dict[str, Any]:
    """The scheduler admin API body: ``{"weights": [{"node", "capacity_bytes_per_second"}]}``."""
    return {
        "weights": [
            {"node": w.node, "capacity_bytes_per_second": max(0.0, w.scheduler_capacity_bps)} for w in weights
        ]
    }


def from_status(previous: Sequence[api_status.PathWeight]) -> tuple[NodeWeight, ...]:
    """Weights as ``status.pathWeights`` recorded them (the scheduler capacity is recomputed as
    weight times the summed capacity)."""
    total = sum(p.snic_capacity_bps for p in previous)
    return tuple(
        NodeWeight(
            node=p.node,
            snic_capacity_bps=float(p.snic_capacity_bps),
            snic_utilization=p.snic_utilization,
            cnic_headroom=p.cnic_headroom,
            weight=p.weight,
            scheduler_capacity_bps=p.weight * total,
        )
        for p in sorted(previous, key=lambda p: p.node)
    )


def sample_problems(sample: telemetry.TelemetrySample) -> list[str]:
    """Why ``sample`` cannot give weights: its own problems, engine nodes without a node sample, and
    node samples missing a rate the formula needs. Empty when usable."""
    problems = list(sample.problems)
    if not sample.nodes:
        problems.append("no node samples")
    for node in sorted({e.node for e in sample.engines} - set(sample.nodes)):
        problems.append(f"node {node}: no NIC sample")
    for name in sorted(sample.nodes):
        n = sample.nodes[name]
        missing = [
            f
            for f in (
                "snic_rx_bps",
                "snic_capacity_bps",
                "snic_kv_rx_bps",
                "cnic_tx_bps",
                "cnic_rx_bps",
                "cnic_capacity_bps",
            )
            if not _finite_nonneg(getattr(n, f))
        ]
        if missing:
            problems.append(f"node {name}: missing or invalid {', '.join(missing)}")
    return problems


def compute(
    sample: telemetry.TelemetrySample,
    previous: Sequence[NodeWeight],
    params: WeightParams | None = None,
) -> WeightsResult:
    """New weights for every node of ``sample``, smoothed against ``previous``.

    Holds (returns ``previous`` unchanged, ``held=True``) when the sample is incomplete or no node
    has usable capacity.
    """
    params = params or WeightParams()
    problems = sample_problems(sample)
    if problems:
        return WeightsResult(tuple(previous), True, "telemetry incomplete: " + "; ".join(problems))
    prev = {w.node: w for w in previous}
    raw: list[tuple[str, float, float, float]] = []
    for name in sorted(sample.nodes):
        effective, util, headroom = _effective(sample.nodes[name])
        if name in prev and effective > 0:
            effective = params.alpha * effective + (1 - params.alpha) * prev[name].snic_capacity_bps
        raw.append((name, effective, util, headroom))
    healthy = [r for r in raw if r[1] > 0]
    if not healthy:
        return WeightsResult(tuple(previous), True, "no node has usable storage-NIC capacity")
    total = sum(r[1] for r in healthy)
    n = len(healthy)
    shares = _bounded_shares([r[1] / total for r in healthy], params.floor / n, min(1.0, params.ceiling / n))
    share_of = {r[0]: s for r, s in zip(healthy, shares, strict=True)}
    out = tuple(
        NodeWeight(
            node=name,
            snic_capacity_bps=eff,
            snic_utilization=util,
            cnic_headroom=headroom,
            weight=share_of.get(name, 0.0),
            scheduler_capacity_bps=share_of.get(name, 0.0) * total,
        )
        for name, eff, util, headroom in raw
    )
    down = [r[0] for r in raw if r[1] <= 0]
    reason = f"{n} node(s) weighted by usable storage-NIC capacity"
    if down:
        reason += f"; no usable capacity on {', '.join(down)} (weight 0)"
    return WeightsResult(out, False, reason)


def _effective(n: telemetry.NodeSample) -> tuple[float, float, float]:
    """(effective KV read capacity bytes/s, SNIC utilization, CNIC headroom) of a complete node sample."""
    snic_cap = _req(n.snic_capacity_bps)
    snic_rx = _req(n.snic_rx_bps)
    kv_rx = min(_req(n.snic_kv_rx_bps), snic_rx)
    usable = max(0.0, snic_cap - (snic_rx - kv_rx))
    cnic_cap = _req(n.cnic_capacity_bps)
    cnic_used = max(_req(n.cnic_tx_bps), _req(n.cnic_rx_bps))
    cnic_free = max(0.0, cnic_cap - cnic_used)
    effective = min(usable, cnic_free + kv_rx)
    util = _unit(snic_rx / snic_cap) if snic_cap > 0 else 1.0
    headroom = _unit(cnic_free / cnic_cap) if cnic_cap > 0 else 0.0
    return effective, util, headroom


def _bounded_shares(x: list[float], lo: float, hi: float) -> list[float]:
    """``clamp(lam * x_i, lo, hi)`` with ``lam`` chosen so the result sums to 1 (needs
    ``len(x) * lo <= 1 <= len(x) * hi`` and every ``x_i > 0``). Exact on the piecewise-linear sum."""
    breaks = sorted({b for xi in x for b in (lo / xi, hi / xi)})

    def total(lam: float) -> float:
        return sum(min(hi, max(lo, lam * xi)) for xi in x)

    lam = breaks[-1]
    prev_b = 0.0
    for b in breaks:
        if total(b) >= 1.0:
            # Linear on [prev_b, b]: the clamped terms are constant, the free ones grow with lam.
            mid = (prev_b + b) / 2
            fixed = sum(min(hi, max(lo, mid * xi)) for xi in x if not lo < mid * xi < hi)
            slope = sum(xi for xi in x if lo < mid * xi < hi)
            lam = (1.0 - fixed) / slope if slope > 0 else b
            break
        prev_b = b
    return [min(hi, max(lo, lam * xi)) for xi in x]


def _req(v: float | None) -> float:
    if v is None:
        raise ValueError("sample_problems() admits no missing rate")
    return v


def _finite_nonneg(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v >= 0


def _significant(v: float, digits: int) -> int:
    if v <= 0 or not math.isfinite(v):
        return 0
    scale = 10.0 ** (math.floor(math.log10(v)) - digits + 1)
    return int(round(v / scale) * scale)


def _unit(v: float) -> float:
    return min(1.0, max(0.0, v))
