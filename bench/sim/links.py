"""A storage NIC as a FIFO server with a fixed rate, and byte accounting in time windows.

Used by ``bench.sim.cluster``: every node's storage read queue is one ``FifoLink``. A read job of
``n`` bytes starts when the link is free and takes ``n / rate`` seconds (the link serves one job at a
time at its full usable rate, which has the throughput of any work-conserving discipline). The
link's queue length in tokens is the paper's ``rq`` (queued and in-service read tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class FifoLink:
    """One node's storage NIC (read direction); ``rate`` is the usable bytes per second."""

    name: str
    rate: float
    busy_until: float = 0.0
    queued_tokens: int = 0
    read_bytes: float = 0.0
    written_bytes: float = 0.0
    wait_seconds: float = 0.0
    """Sum over read jobs of the time from enqueue to the start of service."""
    jobs: int = 0
    segments: list[tuple[float, float, float]] = field(default_factory=list)
    """(start, end, bytes) of every read job, for windowed throughput."""

    def enqueue(self, now: float, nbytes: float, tokens: int) -> float:
        """Queue a read job; returns when it completes. The caller calls ``complete`` then."""
        start = max(now, self.busy_until)
        end = start + nbytes / self.rate
        self.wait_seconds += start - now
        self.jobs += 1
        self.busy_until = end
        self.queued_tokens += tokens
        self.read_bytes += nbytes
        self.segments.append((start, end, nbytes))
        return end

    def complete(self, tokens: int) -> None:
        """A read job of ``tokens`` tokens finished."""
        self.queued_tokens -= tokens

    def bytes_between(self, start_s: float, end_s: float) -> float:
        """Bytes read between two times (jobs are FIFO, so their ends are in order)."""
        total = 0.0
        for start, end, nbytes in reversed(self.segments):
            if end <= start_s:
                break
            lo, hi = max(start, start_s), min(end, end_s)
            if hi > lo and end > start:
                total += nbytes * (hi - lo) / (end - start)
        return total

    def window_bytes(self, window_s: float, windows: int) -> list[float]:
        """Bytes read in each of ``windows`` consecutive windows of ``window_s`` from time 0."""
        out = [0.0] * windows
        for start, end, nbytes in self.segments:
            if end <= start:
                continue
            rate = nbytes / (end - start)
            first = int(start // window_s)
            last = min(windows - 1, math.ceil(end / window_s) - 1)
            for index in range(first, last + 1):
                lo = max(start, index * window_s)
                hi = min(end, (index + 1) * window_s)
                if hi > lo and index < windows:
                    out[index] += rate * (hi - lo)
        return out


def max_over_avg(per_link: list[list[float]], busy_fraction: float, capacity_per_window: float) -> float:
    """Mean over busy windows of max/avg bytes across links (the paper's Fig. 13 metric).

    A window counts when the links together moved at least ``busy_fraction`` of their summed
    capacity (the run's ramp-up and tail are left out). Returns 1.0 when no window qualifies.
    """
    if not per_link:
        return 1.0
    ratios = []
    for column in zip(*per_link, strict=True):
        total = sum(column)
        if total < busy_fraction * capacity_per_window * len(column) or total <= 0:
            continue
        ratios.append(max(column) / (total / len(column)))
    return sum(ratios) / len(ratios) if ratios else 1.0
