"""Micro-benchmark of the policy's decision cost at the paper's scale (1,152 engines).

Called by the bench engineer (``bench/``) and by a unit test at a small size. It times the pure
policy functions of ``scheduler.policy`` on a synthetic, seeded cluster: one PE-group fetch
(section 6.1 PE selection + read side), one DE-group fetch (phase 1 over all DE groups + phase 2),
repeated, and reports the cost per decision. The paper states its scheduler needs fewer than 10 CPU
cores at about 1,000 GPUs; this measures what one core does.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from dualpath_engine.scheduler import policy


@dataclass(frozen=True, slots=True)
class DecisionCost:
    """Seconds per call of each policy step, over ``rounds`` calls, and per assigned request."""

    engines: int
    groups: int
    requests_per_fetch: int
    pe_fetch_seconds_median: float
    de_fetch_seconds_median: float
    read_side_seconds_median: float
    seconds_per_request: float


def measure_decision_cost(
    engines: int = 1152,
    engines_per_group: int = 8,
    requests_per_fetch: int = 64,
    rounds: int = 20,
    seed: int = 0,
    prefill_fraction: float = 0.5,
) -> DecisionCost:
    """Time the policy on ``engines`` engines in groups of ``engines_per_group`` (seeded)."""
    rng = random.Random(seed)
    groups = max(2, engines // engines_per_group)
    pe_groups = max(1, int(groups * prefill_fraction))
    alpha, beta = 200_000, 200_000
    nodes = [f"node-{g}" for g in range(groups)]
    rq = {node: rng.randrange(0, 2 * alpha) for node in nodes}
    views = {
        g: [
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
    }
    pe_times: list[float] = []
    de_times: list[float] = []
    side_times: list[float] = []
    assigned = 0
    spent = 0.0
    for round_index in range(rounds):
        queue = [
            policy.RequestView(
                request_id=f"r{round_index}-{i}",
                tokens=rng.randrange(20_000, 60_000),
                hbm_bytes=rng.randrange(1 << 20, 1 << 26),
            )
            for i in range(requests_per_fetch)
        ]
        group = rng.randrange(pe_groups)
        start = time.perf_counter()
        pe_result = policy.select_prefill_engines(queue, views[group], rq, alpha, beta)
        pe_times.append(time.perf_counter() - start)

        de_group = rng.randrange(pe_groups, groups)
        loads = {str(g): sum(e.tok for e in views[g]) for g in range(pe_groups, groups)}
        start = time.perf_counter()
        private = policy.distribute_to_decode_groups(queue, loads)
        mine = set(private.get(str(de_group), []))
        de_result = policy.select_decode_engines([r for r in queue if r.request_id in mine], views[de_group])
        de_times.append(time.perf_counter() - start)

        start = time.perf_counter()
        for _ in pe_result.assignments:
            policy.plan_read("shorter_queue", False, 400, 64, nodes[group], nodes[de_group], rq, 1e5, {}, 1e9)
        side_times.append((time.perf_counter() - start) / max(1, len(pe_result.assignments)))
        assigned += len(pe_result.assignments) + len(de_result.assignments)
        spent += pe_times[-1] + de_times[-1]
    return DecisionCost(
        engines=groups * engines_per_group,
        groups=groups,
        requests_per_fetch=requests_per_fetch,
        pe_fetch_seconds_median=statistics.median(pe_times),
        de_fetch_seconds_median=statistics.median(de_times),
        read_side_seconds_median=statistics.median(side_times),
        seconds_per_request=spent / max(1, assigned),
    )
