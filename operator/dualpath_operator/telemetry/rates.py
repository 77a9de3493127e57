"""Rate math of the direct-scrape collector: counter rates over a window with resets, histogram quantiles.

Pure functions over ``(time, value)`` points, with the semantics of Prometheus' ``rate()`` (a counter
that goes down was reset: the new value is the increase since the reset) and ``histogram_quantile()``
(linear interpolation inside the bucket that holds the rank). Called by
:mod:`dualpath_operator.telemetry.scrape`; the Prometheus collector lets Prometheus do this math.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence


def counter_increase(values: Sequence[float]) -> float:
    """Total increase of a counter over consecutive observations; a drop counts as a reset to zero."""
    total = 0.0
    for previous, current in itertools.pairwise(values):
        total += current - previous if current >= previous else current
    return total


def counter_rate(points: Sequence[tuple[float, float]]) -> float | None:
    """Per-second increase between the first and last ``(seconds, value)`` point; None under 2 points.

    Points must be in time order; None also when the points span no time.
    """
    if len(points) < 2:
        return None
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return None
    return counter_increase([v for _, v in points]) / span


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile from cumulative ``(le, count)`` buckets (one must be ``+Inf``).

    Returns None when there are no observations or no ``+Inf`` bucket (Prometheus returns NaN there).
    A rank in the ``+Inf`` bucket answers the highest finite bound, as Prometheus does.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            if count == previous_count:
                return le
            start = previous_le if previous_le < le else 0.0
            return start + (le - start) * (rank - previous_count) / (count - previous_count)
        previous_le, previous_count = le, count
    return previous_le


def histogram_increase(snapshots: Sequence[Mapping[float, float]]) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` buckets of the observations made over consecutive snapshots.

    Each snapshot maps a bucket's upper bound to its cumulative count; a bucket's increase gets the
    reset handling of :func:`counter_increase`. Bounds missing from a snapshot are skipped there.
    """
    bounds = sorted({le for snapshot in snapshots for le in snapshot})
    return [(le, counter_increase([s[le] for s in snapshots if le in s])) for le in bounds]
