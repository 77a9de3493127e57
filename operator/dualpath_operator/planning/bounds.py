"""PURE: which prefill/decode group counts are allowed, from the spec's limits and the paper's bound.

Holds the DualPath validity bound (arXiv 2602.21548, section 4.2, eq. 9)::

    s/(g-s) <= P/D <= min{ (g-2s)/s, (g-s)/(2s), (M/(B*s) - 3)/2 }

with P, D counted in nodes (one engine group = one node here), g the GPUs of a node (each with one
compute NIC of bandwidth B), s*B the storage-NIC bandwidth of a node and M its memory bandwidth.
Inside that interval every storage NIC can run at line rate without a compute-NIC or DRAM
bottleneck. Also holds :class:`Limits` (role min/max, GPU budget, bound) and the feasible (P, D)
pairs within them. Called by :mod:`planning.ratio`, the preview CLI and the simulator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field

from dualpath_operator.api.v1alpha1 import cluster as api

#: Bytes per second in one Gbit/s.
GBPS = 1e9 / 8


class NodeShape(BaseModel):
    """The hardware of one engine node, as the validity bound sees it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: int = Field(ge=1, le=64, description="GPUs of the node (g); each has one compute NIC.")
    cnic_bytes_per_s: float = Field(
        gt=0, description="Bandwidth of one compute NIC (B), bytes/s; 400 Gbit/s is 50e9."
    )
    snic_bytes_per_s: float = Field(
        gt=0, description="Storage-NIC bandwidth of the whole node (s*B), bytes/s."
    )
    memory_bytes_per_s: float = Field(
        gt=0, description="Host memory bandwidth of the node (M), bytes/s; about 500e9 on the paper's nodes."
    )

    @property
    def s(self) -> float:
        """Storage bandwidth of a node in units of one compute NIC's bandwidth."""
        return self.snic_bytes_per_s / self.cnic_bytes_per_s


@dataclass(frozen=True)
class ValidityBound:
    """The interval ``lower <= P/D <= upper`` of eq. 9; ``terms`` names each upper term."""

    lower: float
    upper: float
    terms: tuple[tuple[str, float], ...]

    @property
    def empty(self) -> bool:
        """No ratio saturates the storage NICs without a compute-NIC or DRAM bottleneck."""
        return not self.lower <= self.upper

    def contains(self, prefill: int, decode: int) -> bool:
        """Whether ``prefill/decode`` lies in the interval (``decode == 0`` never does)."""
        if decode <= 0:
            return False
        ratio = prefill / decode
        return self.lower - 1e-12 <= ratio <= self.upper + 1e-12

    def describe(self) -> str:
        return f"{_num(self.lower)} <= P/D <= {_num(self.upper)}"


def validity_bound(shape: NodeShape) -> ValidityBound:
    """Eq. 9 for ``shape``: the lower term s/(g-s) and the least of the three upper terms.

    A term whose denominator is not positive means no ratio satisfies that inequality: the lower
    bound is then +inf (g <= s), an upper term -inf. The result may be :attr:`ValidityBound.empty`.
    """
    g, s = float(shape.gpus), shape.s
    lower = s / (g - s) if g > s else math.inf
    de_read = (g - 2 * s) / s
    de_write = (g - s) / (2 * s)
    dram = (shape.memory_bytes_per_s / shape.snic_bytes_per_s - 3) / 2
    terms = (
        ("DE compute-NIC read (g-2s)/s", de_read),
        ("DE compute-NIC write (g-s)/(2s)", de_write),
        ("DE memory (M/(Bs)-3)/2", dram),
    )
    return ValidityBound(lower=lower, upper=min(t for _, t in terms), terms=terms)


def shape_from_spec(
    spec: api.DualPathClusterSpec, *, cnic_gbps: float, memory_bytes_per_s: float
) -> NodeShape:
    """The node shape of a cluster: g = the smaller gpusPerPod of the two roles (the tighter bound),
    s*B = storageNic.gbps * storageNic.count; B and M are not in the spec and come from the caller."""
    gpus = min(spec.prefill.gpus_per_pod, spec.decode.gpus_per_pod)
    snic = spec.network.storage_nic.gbps * spec.network.storage_nic.count * GBPS
    return NodeShape(
        gpus=gpus,
        cnic_bytes_per_s=cnic_gbps * GBPS,
        snic_bytes_per_s=snic,
        memory_bytes_per_s=memory_bytes_per_s,
    )


@dataclass(frozen=True)
class Limits:
    """Everything that bounds (P, D): role min/max, GPUs per group, the GPU budget and eq. 9.

    ``bound`` is ``None`` when the validity bound is not enforced (not asked for, or empty for this
    hardware: see :func:`limits_from_spec`); ``notes`` says why, in words.
    """

    prefill_min: int
    prefill_max: int
    decode_min: int
    decode_max: int
    prefill_gpus: int
    decode_gpus: int
    gpu_budget: int | None = None
    bound: ValidityBound | None = None
    notes: tuple[str, ...] = ()

    def gpus(self, prefill: int, decode: int) -> int:
        return prefill * self.prefill_gpus + decode * self.decode_gpus

    def violations(self, prefill: int, decode: int) -> list[str]:
        """Every limit ``(prefill, decode)`` breaks, in words; empty when it is feasible."""
        out: list[str] = []
        if not self.prefill_min <= prefill <= self.prefill_max:
            out.append(f"prefill {prefill} outside [{self.prefill_min}, {self.prefill_max}]")
        if not self.decode_min <= decode <= self.decode_max:
            out.append(f"decode {decode} outside [{self.decode_min}, {self.decode_max}]")
        if self.gpu_budget is not None and self.gpus(prefill, decode) > self.gpu_budget:
            out.append(f"{self.gpus(prefill, decode)} GPUs over gpuBudget {self.gpu_budget}")
        if self.bound is not None and not self.bound.contains(prefill, decode):
            out.append(f"P/D = {prefill}/{decode} outside the validity bound {self.bound.describe()}")
        return out

    def feasible(self, prefill: int, decode: int) -> bool:
        return not self.violations(prefill, decode)


def decode_range(limits: Limits, prefill: int) -> tuple[int, int] | None:
    """The feasible decode counts for ``prefill`` groups, as ``(lowest, highest)``: for a fixed P
    every limit bounds D from one side, so they form one interval. ``None`` when there is none."""
    if not limits.prefill_min <= prefill <= limits.prefill_max:
        return None
    lo, hi = limits.decode_min, limits.decode_max
    if limits.gpu_budget is not None:
        hi = min(hi, (limits.gpu_budget - prefill * limits.prefill_gpus) // limits.decode_gpus)
    b = limits.bound
    if b is not None:
        # Start just outside the real-valued edges, then step to the exact ones with contains().
        lo = max(lo, math.ceil(prefill / b.upper) - 1 if b.upper > 0 else hi + 1)
        hi = min(hi, math.floor(prefill / b.lower) + 1 if b.lower > 0 else hi)
        while lo <= hi and not b.contains(prefill, lo):
            lo += 1
        while hi >= lo and not b.contains(prefill, hi):
            hi -= 1
    return (lo, hi) if lo <= hi else None


def feasible_ranges(limits: Limits) -> list[tuple[int, int, int]]:
    """``(P, lowest D, highest D)`` for every P that has a feasible D, ordered by P."""
    out = []
    for p in range(limits.prefill_min, limits.prefill_max + 1):
        r = decode_range(limits, p)
        if r is not None:
            out.append((p, r[0], r[1]))
    return out


def feasible_pairs(limits: Limits) -> list[tuple[int, int]]:
    """All feasible ``(P, D)``, ordered by P then D."""
    return [(p, d) for p, lo, hi in feasible_ranges(limits) for d in range(lo, hi + 1)]


def limits_from_spec(
    spec: api.DualPathClusterSpec, shape: NodeShape | None, *, enforce_bound: bool = True
) -> Limits:
    """The limits of a cluster. The validity bound is enforced when ``enforce_bound`` and ``shape`` is
    given, unless it is empty for this hardware or leaves no pair within min/max and budget: then it
    is dropped and ``notes`` says so (the other limits always admit a pair, the API guarantees it)."""
    base = Limits(
        prefill_min=spec.prefill.min,
        prefill_max=spec.prefill.max,
        decode_min=spec.decode.min,
        decode_max=spec.decode.max,
        prefill_gpus=spec.prefill.gpus_per_pod,
        decode_gpus=spec.decode.gpus_per_pod,
        gpu_budget=spec.ratio.gpu_budget,
    )
    if not enforce_bound or shape is None:
        return base
    bound = validity_bound(shape)
    if bound.empty:
        note = (
            f"validity bound not enforced: empty for g={shape.gpus}, s={_num(shape.s)} ({bound.describe()})"
        )
        return dataclasses.replace(base, notes=(note,))
    bounded = dataclasses.replace(base, bound=bound)
    if not feasible_ranges(bounded):
        note = (
            f"validity bound {bound.describe()} not enforced: no pair within min/max and gpuBudget meets it"
        )
        return dataclasses.replace(base, notes=(note,))
    return bounded


def nearest_feasible(limits: Limits, prefill: int, decode: int) -> tuple[int, int] | None:
    """The feasible pair closest to ``(prefill, decode)``: fewest groups moved, then keeping P+D,
    then fewer GPUs, then fewer prefill groups. ``None`` when nothing is feasible."""
    # For each P the closest D is the clamp of ``decode`` into its range; compare those.
    candidates = [(p, min(max(decode, lo), hi)) for p, lo, hi in feasible_ranges(limits)]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda pd: (
            abs(pd[0] - prefill) + abs(pd[1] - decode),
            abs((pd[0] + pd[1]) - (prefill + decode)),
            limits.gpus(*pd),
            pd[0],
        ),
    )


def _num(x: float) -> str:
    """A short exact-looking form: 1/7 for 0.142857..., 3.5 for 3.5, inf for inf."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    frac = Fraction(x).limit_denominator(64)
    if abs(float(frac) - x) < 1e-9 and frac.denominator != 1 and not float(frac).is_integer():
        as_dec = f"{x:.4g}"
        return f"{frac.numerator}/{frac.denominator}" if len(as_dec) > 4 else as_dec
    return f"{x:.4g}"
