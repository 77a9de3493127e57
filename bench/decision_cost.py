"""Scheduler decision cost per request at the paper's scale (1,152 engines), on one core.

Called by ``python -m bench``. Reuses ``dualpath_engine.scheduler.benchmark.measure_decision_cost``
(medians per group fetch and the mean per assigned request in 64-request fetches) and adds the
distribution the issue asks for: the cost of deciding ONE request (PE selection in its group, DE
phase 1 over every decode group and phase 2 in the chosen one, then the read plan), timed request by
request, p50 and p99 of the thread's CPU time (one core's work; the wall-clock figures are reported
too, and on a shared machine they include preemption by other processes). Both use the real pure
policy functions of ``dualpath_engine.scheduler.policy`` on a seeded synthetic cluster; the
scheduler process's own bookkeeping (HTTP, state) is not included.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dualpath_engine.scheduler import benchmark, policy


@dataclass(frozen=True, slots=True)
class PerRequestCost:
    """Seconds to decide one request, over ``samples`` requests, and the fetch-level figures."""

    engines: int
    groups: int
    samples: int
    p50_s: float
    p99_s: float
    max_s: float
    """CPU time of this thread per decision (what one core spends; immune to preemption)."""
    wall_p50_s: float
    wall_p99_s: float
    """Wall time per decision (includes preemption by other processes on a shared machine)."""
    fetch: benchmark.DecisionCost
    cpu: int | None
    """The CPU the measurement was pinned to (None where pinning is not available)."""


@contextmanager
def one_core() -> Iterator[int | None]:
    """Pin this process to one CPU for the block (restored afterwards)."""
    if not hasattr(os, "sched_getaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def measure(
    engines: int = 1152, engines_per_group: int = 8, samples: int = 2000, seed: int = 0
) -> PerRequestCost:
    """Time ``samples`` single-request decisions on ``engines`` engines (half prefill, half decode)."""
    with one_core() as cpu:
        fetch = benchmark.measure_decision_cost(
            engines=engines, engines_per_group=engines_per_group, seed=seed
        )
        rng = random.Random(seed)
        groups = max(2, engines // engines_per_group)
        pe_groups = groups // 2
        alpha = beta = 200_000
        nodes = [f"node-{g}" for g in range(groups)]
        rq = {node: rng.randrange(0, 2 * alpha) for node in nodes}
        views = [
            [
                policy.EngineView(
                    engine_id=f"g{g}-e{e}",
                    node=nodes[g],
                    seq=rng.randrange(0, 64),
                    tok=rng.randrange(0, beta),
                    free_hbm_bytes=rng.randrange(1 << 30, 1 << 34),
                )
                for e in range(engines_per_group)
            ]
            for g in range(groups)
        ]
        loads = {str(g): sum(e.tok for e in views[g]) for g in range(pe_groups, groups)}
        times: list[float] = []
        walls: list[float] = []
        gc.disable()
        for index in range(samples):
            request = policy.RequestView(
                f"r{index}", rng.randrange(20_000, 60_000), rng.randrange(1 << 20, 1 << 26)
            )
            pe_group = rng.randrange(pe_groups)
            cpu_start = time.thread_time()
            start = time.perf_counter()
            pe = policy.select_prefill_engines([request], views[pe_group], rq, alpha, beta)
            spread = policy.distribute_to_decode_groups([request], loads)
            de_group = int(next(iter(spread)))
            de = policy.select_decode_engines([request], views[de_group])
            if pe.assignments and de.assignments:
                policy.plan_read(
                    "shorter_queue",
                    False,
                    request.tokens // 64,
                    64,
                    nodes[pe_group],
                    nodes[de_group],
                    rq,
                    21720.0,
                    {},
                    50e9,
                )
            walls.append(time.perf_counter() - start)
            times.append(time.thread_time() - cpu_start)
        gc.enable()
    ordered = sorted(times)
    wall = sorted(walls)
    return PerRequestCost(
        engines=groups * engines_per_group,
        groups=groups,
        samples=samples,
        p50_s=statistics.median(ordered),
        p99_s=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        max_s=ordered[-1],
        wall_p50_s=statistics.median(wall),
        wall_p99_s=wall[min(len(wall) - 1, int(0.99 * len(wall)))],
        fetch=fetch,
        cpu=cpu,
    )
