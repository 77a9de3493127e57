"""Intra-engine batching on prefill engines under a compute quota (DualPath paper section 6.2).

Pure functions used by the prefill engine loop (``dualpath_engine.engine``) to build each forward
batch, and by the simulator. No I/O, no clock.

Rule: walk the engine's FIFO queue adding whole requests while the predicted attention time stays
within the quota (300 ms in the paper); the first request that does not fit whole is chunked with a
binary search for the largest ``bsz`` whose predicted time still fits, and the batch ends there.
The binary search needs ``t_attn(cached, bsz)`` monotone non-decreasing in ``bsz``.

Progress guarantee [inference]: when even one token of the head request exceeds the quota on an
otherwise empty batch (a huge cached prefix), the batch still takes ``min_chunk`` tokens of it, so a
queue never stalls. The paper's pseudo-code would return an empty batch forever in that case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

AttentionTime = Callable[[int, int], float]
"""``t_attn(cached, bsz)``: predicted seconds to compute ``bsz`` new tokens over ``cached`` ones."""


@dataclass(frozen=True, slots=True)
class PrefillItem:
    """A queued prefill request: tokens with KV already (hit or earlier chunks) and tokens left."""

    request_id: str
    cached: int
    remaining: int


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One request's share of a forward batch: compute ``bsz`` tokens after ``cached`` ones."""

    request_id: str
    cached: int
    bsz: int
    chunked: bool
    """True when the request keeps tokens for a later batch (chunked prefill)."""
    predicted_seconds: float


@dataclass(frozen=True, slots=True)
class AttentionTimeModel:
    """A monotone fit of attention time: ``fixed + per_token*bsz + per_pair*bsz*(cached + bsz/2)``.

    ``per_pair`` prices the query-key pairs of causal attention (each new token attends to the
    cached tokens and, on average, half of the new ones); profile the three coefficients per device.
    """

    fixed_seconds: float = 0.0
    per_token_seconds: float = 0.0
    per_pair_seconds: float = 0.0

    def __call__(self, cached: int, bsz: int) -> float:
        """Predicted seconds for ``bsz`` new tokens over ``cached`` tokens (0 for an empty chunk)."""
        if bsz <= 0:
            return 0.0
        pairs = bsz * (cached + bsz / 2.0)
        return self.fixed_seconds + self.per_token_seconds * bsz + self.per_pair_seconds * pairs


def largest_chunk(t_attn: AttentionTime, cached: int, limit: int, used: float, quota: float) -> int:
    """Largest ``b`` in ``[0, limit]`` with ``used + t_attn(cached, b) <= quota`` (binary search)."""
    lo, hi = 0, max(limit, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if used + t_attn(cached, mid) <= quota:
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_prefill_batch(
    queue: Sequence[PrefillItem],
    t_attn: AttentionTime,
    quota_seconds: float = 0.300,
    min_chunk: int = 1,
) -> tuple[BatchEntry, ...]:
    """Build one forward batch from the head of ``queue`` under ``quota_seconds`` of attention."""
    batch: list[BatchEntry] = []
    used = 0.0
    for item in queue:
        if item.remaining <= 0:
            continue
        whole = t_attn(item.cached, item.remaining)
        if used + whole <= quota_seconds:
            batch.append(BatchEntry(item.request_id, item.cached, item.remaining, False, whole))
            used += whole
            continue
        bsz = largest_chunk(t_attn, item.cached, item.remaining, used, quota_seconds)
        if bsz == 0 and not batch:
            bsz = min(max(min_chunk, 1), item.remaining)
        if bsz > 0:
            predicted = t_attn(item.cached, bsz)
            batch.append(BatchEntry(item.request_id, item.cached, bsz, bsz < item.remaining, predicted))
        break
    return tuple(batch)
