"""The simulator's mechanics: bytes are conserved, modes order as they must, a saturated storage NIC
gives the analytic throughput, paths go where the mode says, drain-first role switches finish."""

from __future__ import annotations

import pytest

from bench.sim import cluster, config, workload

pytestmark = pytest.mark.timeout(60)

KVB = config.CostModel().kv_bytes_per_token


def agents(
    count: int, context: int = 16_000, turns: int = 2, append: int = 400, generate: int = 40
) -> list[workload.Agent]:
    """``count`` agents with ``context`` tokens already stored and ``turns`` equal turns each."""
    return [
        workload.Agent(
            f"a{i}", context + 64 * i, tuple(workload.Turn(append, generate) for _ in range(turns))
        )
        for i in range(count)
    ]


def simulate(
    mode: config.Mode, p: int, d: int, population: list[workload.Agent], **kw: object
) -> cluster.RunResult:
    cfg = config.SimConfig.model_validate(
        {"mode": mode, "cluster": {"prefill_nodes": p, "decode_nodes": d}, **kw}
    )
    return cluster.simulate(cfg, population)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mode", ["basic", "dualpath"])
def test_every_hit_byte_is_read_once_and_every_new_byte_is_persisted(mode: config.Mode, split: bool) -> None:
    population = agents(24)
    sim = cluster.Simulation(
        config.SimConfig(
            mode=mode, split_reads=split, cluster=config.Cluster(prefill_nodes=1, decode_nodes=2)
        ),
        population,
    )
    result = sim.run()
    assert result.completed
    assert result.requests == 48
    hit = sum(r.hit_tokens for r in sim.finished)
    assert hit > 0
    assert sum(result.snic_read_bytes.values()) == pytest.approx(hit * KVB)
    assert result.pe_path_bytes + result.de_path_bytes == pytest.approx(hit * KVB)
    new = sum(r.prompt + r.generate - r.hit_tokens for r in sim.finished)
    assert result.snic_written_bytes == pytest.approx(new * KVB)
    assert result.computed_tokens == sum(r.prompt - r.hit_tokens for r in sim.finished)
    assert all(node.snic.queued_tokens == 0 for node in sim.nodes)
    # Every hit block is read on exactly one side.
    assert all(r.pe_hit_tokens + r.de_hit_tokens == r.hit_tokens for r in sim.finished)


def test_the_next_turn_hits_the_context_the_previous_turn_left() -> None:
    population = [workload.Agent("a", 1000, (workload.Turn(100, 20), workload.Turn(50, 10)))]
    sim = cluster.Simulation(config.SimConfig(), population)
    sim.run()
    first, second = sim.finished
    assert first.prompt == 1100 and first.hit_tokens == (1000 // 64) * 64
    assert second.prompt == 1100 + 20 + 50
    assert second.hit_tokens == (1120 // 64) * 64
    assert second.arrived == pytest.approx(first.done)


def test_basic_reads_only_on_prefill_nodes_and_dualpath_uses_both_sides() -> None:
    population = agents(64)
    basic = simulate("basic", 1, 1, population)
    dual = simulate("dualpath", 1, 1, population)
    assert basic.de_path_bytes == 0
    assert basic.snic_read_bytes["node-1"] == 0
    assert dual.de_path_bytes > 0 and dual.pe_path_bytes > 0
    share = dual.de_path_bytes / (dual.pe_path_bytes + dual.de_path_bytes)
    assert 0.35 < share < 0.65  # D/(P+D) = 1/2 under saturation


def test_oracle_is_no_slower_than_dualpath_which_is_no_slower_than_basic() -> None:
    population = agents(96, context=30_000)
    oracle = simulate("oracle", 1, 1, population)
    dual = simulate("dualpath", 1, 1, population)
    basic = simulate("basic", 1, 1, population)
    assert oracle.completed and dual.completed and basic.completed
    assert oracle.jct_s <= dual.jct_s <= basic.jct_s
    assert oracle.snic_read_bytes == {"node-0": 0.0, "node-1": 0.0}


def test_a_saturated_storage_nic_gives_the_analytic_throughput() -> None:
    # Compute and decode almost free: Basic 1P1D is bound by one storage NIC at s*B.
    cheap = config.CostModel(
        linear_per_token_s=1e-9,
        attn_per_pair_s=0.0,
        attn_per_token_s=0.0,
        batch_fixed_s=0.0,
        decode_step_fixed_s=1e-6,
        decode_per_seq_s=0.0,
        decode_per_context_token_s=0.0,
    )
    population = agents(200, context=20_000, turns=1, append=64, generate=2)
    cfg = config.SimConfig(mode="basic", cost=cheap, cluster=config.Cluster(prefill_nodes=1, decode_nodes=1))
    result = cluster.simulate(cfg, population)
    analytic = result.hit_tokens * KVB / cfg.hardware.snic_bytes_per_s
    assert result.storage_bound_jct_s == pytest.approx(analytic)
    assert analytic <= result.jct_s <= 1.03 * analytic


def test_a_half_rate_storage_nic_reads_at_half_rate() -> None:
    cheap = config.CostModel(linear_per_token_s=1e-9, attn_per_pair_s=0.0, decode_step_fixed_s=1e-6)
    population = agents(100, context=20_000, turns=1, append=64, generate=2)
    full = cluster.simulate(config.SimConfig(mode="basic", cost=cheap), population)
    half = cluster.simulate(
        config.SimConfig(mode="basic", cost=cheap, cluster=config.Cluster(snic_health={"node-0": 0.5})),
        population,
    )
    assert half.jct_s == pytest.approx(2 * full.jct_s, rel=0.05)


def test_round_robin_alternates_read_sides_and_the_policy_balances_them() -> None:
    population = agents(120, context=30_000)
    rr = simulate("dualpath", 1, 2, population, scheduler="round_robin")
    paper = simulate("dualpath", 1, 2, population)
    assert rr.pe_path_bytes / (rr.pe_path_bytes + rr.de_path_bytes) == pytest.approx(0.5, abs=0.05)
    reads = sorted(paper.snic_read_bytes.values())
    assert reads[-1] / reads[0] < 1.25


def test_a_role_switch_drains_first_and_every_turn_still_finishes() -> None:
    population = agents(40, turns=3)
    cfg = config.SimConfig(cluster=config.Cluster(prefill_nodes=1, decode_nodes=2), rebalance_interval_s=0.5)
    sim = cluster.Simulation(cfg, population)
    switched_at: list[float] = []

    def switch_once(s: cluster.Simulation) -> None:
        if not switched_at:
            switched_at.append(s.now)
            s.request_switch("node-2", "prefill")

    sim.interval_hooks.append(switch_once)
    result = sim.run()
    assert result.completed and result.role_switches == 1
    node = sim.by_name["node-2"]
    assert node.role == "prefill" and node.accepting
    # After the switch request no new decode work went to node-2's old engines: every request that
    # arrived after the switch decoded elsewhere.
    late = [r for r in sim.finished if r.arrived > switched_at[0]]
    assert late and all(r.de is not None and r.de.node.name != "node-2" for r in late)


def test_prefill_groups_share_the_work_whichever_fetches_first() -> None:
    # Basic 2P1D: both PE nodes read their own hits; the fetch order rotates, so neither hogs the FIFO.
    result = simulate("basic", 2, 1, agents(128, context=30_000, turns=3))
    node0, node1 = result.snic_read_bytes["node-0"], result.snic_read_bytes["node-1"]
    assert min(node0, node1) / max(node0, node1) > 0.8


def test_split_reads_divide_requests_between_both_sides() -> None:
    population = agents(48, context=30_000)
    cfg = config.SimConfig(split_reads=True, cluster=config.Cluster(prefill_nodes=1, decode_nodes=1))
    sim = cluster.Simulation(cfg, population)
    assert sim.run().completed
    split = [r for r in sim.finished if r.pe_hit_tokens and r.de_hit_tokens]
    assert len(split) > len(sim.finished) // 2
    # Without the extension every request is read on one side only (the paper's rule).
    whole = cluster.Simulation(config.SimConfig(cluster=cfg.cluster), population)
    whole.run()
    assert all(not (r.pe_hit_tokens and r.de_hit_tokens) for r in whole.finished)


def test_least_read_tie_break_evens_storage_bytes_under_light_load() -> None:
    """With few agents the read queues are often both empty: the paper's rule gives every such tie to
    the prefill node, the least-read tie-break to the node that has read less (same JCT)."""
    population = agents(8, context=30_000, turns=4)
    paper = simulate("dualpath", 1, 2, population)
    least = simulate("dualpath", 1, 2, population, read_side_tie_break="least_read")

    def max_over_avg(reads: dict[str, float]) -> float:
        return max(reads.values()) * len(reads) / sum(reads.values())

    assert sum(least.snic_read_bytes.values()) == pytest.approx(sum(paper.snic_read_bytes.values()))
    assert least.snic_read_bytes["node-0"] < paper.snic_read_bytes["node-0"]  # node-0: the PE node
    assert max_over_avg(least.snic_read_bytes) < max_over_avg(paper.snic_read_bytes) - 0.1
    assert least.completed and paper.completed
