"""The simulator drives the operator's real planners, and the harness keeps others' doc sections."""

from __future__ import annotations

import pathlib

import pytest

from bench import decision_cost, report
from bench.sim import cluster, config, rebalance, scenarios, workload
from dualpath_engine.workload import trace

pytestmark = pytest.mark.timeout(120)


def population(count: int = 60) -> list[workload.Agent]:
    return [
        workload.Agent(f"a{i}", 30_000 + 64 * i, tuple(workload.Turn(400, 40) for _ in range(3)))
        for i in range(count)
    ]


def test_the_weights_planner_sees_a_half_rate_nic_and_the_policy_reads_less_there() -> None:
    cfg = config.SimConfig(
        weights_aware=True,
        cluster=config.Cluster(prefill_nodes=1, decode_nodes=2, snic_health={"node-1": 0.5}),
        rebalance_interval_s=1.0,
    )
    sim = cluster.Simulation(cfg, population())
    rebalancer = rebalance.Rebalancer(sim, use_weights=True)
    result = sim.run()
    assert result.completed
    assert rebalancer.weights, "the real weights planner produced weights"
    capacity = sim.capacity
    assert capacity["node-1"] < 0.75 * capacity["node-2"]
    # The degraded node reads clearly less than its healthy DE peer.
    assert result.snic_read_bytes["node-1"] < 0.8 * result.snic_read_bytes["node-2"]


def test_auto_ratio_consults_the_real_planner_and_stays_within_its_bounds() -> None:
    agents = population(80)
    result, rebalancer = scenarios.auto_run(agents, (2, 2), None)
    assert result.completed
    assert rebalancer.ratio_trace, "the planner ran every interval"
    assert all(p >= 1 and d >= 1 and p + d == 4 for _, p, d in rebalancer.ratio_trace)


def test_write_sections_replaces_ours_and_keeps_the_rest(tmp_path: pathlib.Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## GPU\n\nkept\n")
    report.write_sections(doc, {"simulator": "## Simulator\n\nfirst"})
    report.write_sections(
        doc, {"simulator": "## Simulator\n\nsecond", "decision-cost": "## Scheduler decision cost"}
    )
    text = doc.read_text()
    assert "## GPU\n\nkept" in text
    assert "second" in text and "first" not in text
    assert text.count("<!-- bench:simulator:begin -->") == 1
    assert "## Scheduler decision cost" in text


def test_fig8_report_has_every_run_and_the_three_relations() -> None:
    rep = scenarios.fig8(scenarios.Size(agents=48, window_turns=2))
    assert len(rep.rows) == 9
    assert [c.name for c in rep.checks] == [
        "Basic 1P1D ~ Basic 1P2D",
        "DualPath 1P1D ~ Basic 2P1D",
        "DualPath 2P1D ~ DualPath 1P2D",
    ]
    assert "| run |" in report.render(rep)


def test_decision_cost_reports_per_request_percentiles_at_1152_engines() -> None:
    cost = decision_cost.measure(engines=1152, samples=50)
    assert cost.engines == 1152 and cost.groups == 144
    assert 0 < cost.p50_s <= cost.p99_s <= cost.max_s


def test_windows_start_on_the_stored_context_of_the_turns_before_them() -> None:
    shape = trace.TraceShape(preset="64K", trajectories=20, token_scale=1.0, turn_scale=1.0, seed=3)
    whole = workload.agents(shape)
    windowed = workload.agents(shape, window_turns=4)
    assert workload.agents(shape, window_turns=4) == windowed
    for full, part in zip(whole, windowed, strict=True):
        assert full.stored_context == 0
        assert len(part.turns) == min(4, len(full.turns))
        turns = list(full.turns)
        start = next(i for i in range(len(turns)) if tuple(turns[i : i + len(part.turns)]) == part.turns)
        assert part.stored_context == sum(t.append + t.generate for t in turns[:start])


def test_fig8_configurations_are_checked_against_the_papers_validity_bound() -> None:
    cfg = config.SimConfig()
    assert scenarios.validity(cfg, 1, 2).startswith("1P2D inside")
    assert scenarios.validity(cfg, 1, 8).startswith("1P8D OUTSIDE")  # P/D = 1/8 < 1/7


def test_python_m_bench_quick_writes_both_sections_with_the_command(tmp_path: pathlib.Path) -> None:
    from bench import __main__ as cli

    doc = tmp_path / "benchmarks.md"
    rc = cli.main(["--quick", "--scale-agents", "0", "--write-docs", "--docs", str(doc)])
    text = doc.read_text()
    assert rc == 0
    assert "## Simulator" in text and "## Scheduler decision cost" in text
    assert "Command: `python -m bench --quick --scale-agents 0 --write-docs" in text
    assert "DualPath 2P1D ~ DualPath 1P2D" in text
