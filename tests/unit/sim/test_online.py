"""Online capacity: the shared ladder search, Poisson arrivals in the simulator, and the scenario's
judgment (turns arriving after the warm-up, the paper's SLO, a drain bound)."""

from __future__ import annotations

import pytest

from bench import capacity
from bench.sim import cluster, config, scenarios, workload

pytestmark = pytest.mark.timeout(60)


def _search(rates: list[float], refine: int, limit: float) -> capacity.Ladder:
    search = capacity.Ladder(rates, refine)
    while (rate := search.next_rate()) is not None:
        search.record(rate, within_slo=rate <= limit)
    return search


@pytest.mark.parametrize(
    ("rates", "refine", "limit", "measured", "bracket"),
    [
        ([1, 2, 4, 8], 2, 5.0, [1, 2, 4, 8, 6, 5], (5, 6)),  # climb, fail at 8, bisect 6 then 5
        ([1, 2, 4], 3, 99.0, [1, 2, 4], (4, None)),  # never fails: a lower bound only, nothing to bisect
        ([2, 4], 1, 0.5, [2, 1], (0, 1)),  # the first rate fails: bisected from [0, 2)
        ([1, 2, 4], 0, 3.0, [1, 2, 4], (2, 4)),  # no refinement: the ladder's own bracket
    ],
)
def test_ladder_climbs_until_the_slo_breaks_then_bisects(
    rates: list[float], refine: int, limit: float, measured: list[float], bracket: tuple[float, float | None]
) -> None:
    search = _search(rates, refine, limit)
    assert [rate for rate, _ in search.measured] == measured
    assert (search.within, search.beyond) == bracket


def test_ladder_rejects_bad_rates_and_out_of_turn_results() -> None:
    with pytest.raises(ValueError, match="ascending"):
        capacity.Ladder([2, 1], 1)
    with pytest.raises(ValueError, match="at least one rate"):
        capacity.Ladder([], 1)
    search = capacity.Ladder([1, 2], 0)
    with pytest.raises(ValueError, match="asked for 1"):
        search.record(2, within_slo=True)


def test_agents_arrive_by_a_seeded_poisson_process_over_the_same_trajectories() -> None:
    spec = scenarios.Online(duration_s=200.0, window_turns=3)
    low, high = scenarios.online_agents(1.0, spec), scenarios.online_agents(4.0, spec)
    assert scenarios.online_agents(1.0, spec) == low  # a rate always draws the same sample
    assert 150 < len(low) < 250 and 700 < len(high) < 900  # about rate x duration
    starts = [agent.start_s for agent in high]
    assert starts == sorted(starts) and starts[0] > 0 and starts[-1] < spec.duration_s
    assert [a.turns for a in low] == [a.turns for a in high[: len(low)]]  # common random numbers


def test_a_late_agent_starts_its_first_turn_when_it_arrives() -> None:
    turns = (workload.Turn(100, 4),)
    population = [workload.Agent("early", 6_400, turns), workload.Agent("late", 6_400, turns, start_s=5.0)]
    sim = cluster.Simulation(config.SimConfig(), population)
    assert sim.run().completed
    arrived = {r.agent: r.arrived for r in sim.finished}
    assert arrived == {0: 0.0, 1: 5.0}


def test_dualpath_serves_more_agents_per_second_within_the_slo_than_basic() -> None:
    spec = scenarios.Online(
        rates=(8.0, 32.0, 128.0), duration_s=40.0, warmup_s=15.0, window_turns=4, refine=1
    )
    basic = scenarios.online_step("basic", 1, 2, 32.0, spec)
    dual = scenarios.online_step("dualpath", 1, 2, 32.0, spec)
    # Same arrivals; Basic's one storage NIC queues (TTFT over the paper's 4 s), DualPath's three do not.
    assert basic["turns"] > 0 and not basic["within"] and basic["ttft_s"] > spec.ttft_slo_s
    assert dual["within"] and dual["ttft_s"] < 1.0
    report = scenarios.online(spec)
    assert report.rows[0][:2] == ("basic", "8")
    assert any("Capacity DualPath / Basic" in note for note in report.notes)
