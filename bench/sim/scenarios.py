"""The simulator's comparisons, each run side by side on one seeded workload, reported as ratios.

Called by ``python -m bench`` (``bench.__main__``) and by the tests at tiny sizes. Each function
returns rows (label -> value) plus named checks; nothing here prints.

* ``fig8``: the paper's Fig. 8 pairs of equal usable storage bandwidth (Basic 1P1D ~ Basic 1P2D;
  DualPath 1P1D ~ Basic 2P1D; DualPath 2P1D ~ DualPath 1P2D), with Oracle and the storage-bound
  ceiling per configuration.
* ``balance``: storage-NIC max/avg over short windows, the real policy against round-robin (paper
  Fig. 13: 1.18 vs 1.53).
* ``degraded``: one node's storage NIC at 50 %: the paper's read-side rule, weights-aware (with the
  real weights planner), split reads, and both.
* ``auto_ratio``: Auto ratio (the real ratio planner) against every static ratio of the same node
  count, on a workload whose prefill pressure changes halfway.
* ``scale``: one run at the largest size (144 nodes, 1,152 engines).
* ``online``: online capacity (the highest agent arrival rate within the paper's SLO) of Basic and
  DualPath, under load that has had time to build up (Poisson arrivals, judged after a warm-up).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from dataclasses import dataclass, field

from bench import capacity
from bench.sim import cluster, rebalance, workload
from bench.sim import config as config_mod
from dualpath_engine.workload import trace
from dualpath_operator.planning import bounds, ratio


@dataclass(frozen=True, slots=True)
class Check:
    """A relation the paper states and whether this run reproduces it."""

    name: str
    left: str
    right: str
    ratio: float
    tolerance: float
    valid: bool = True
    """Both runs finished every turn (a ratio of unfinished runs proves nothing)."""
    gating: bool = True
    """A paper relation the simulator must reproduce (``python -m bench`` fails without it); the
    others are comparisons reported as findings."""

    @property
    def ok(self) -> bool:
        """Both runs complete and the ratio within tolerance of 1.0 (``left`` ~ ``right``)."""
        return self.valid and abs(self.ratio - 1.0) <= self.tolerance


@dataclass(frozen=True, slots=True)
class Report:
    """One scenario: a table (header + rows) and the checks derived from it."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    checks: tuple[Check, ...] = ()
    notes: tuple[str, ...] = ()
    results: dict[str, cluster.RunResult] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Size:
    """How big the runs are: agents, turns replayed per agent, seed."""

    agents: int = 1024
    window_turns: int = 6
    seed: int = 1


def make_agents(
    size: Size, append_scale_first_half: float = 1.0, generate_scale_second_half: float = 1.0
) -> list[workload.Agent]:
    """The 64K Table-2 workload at full token scale, ``size.window_turns`` turns per agent."""
    shape = trace.TraceShape(
        preset="64K", trajectories=size.agents, token_scale=1.0, turn_scale=1.0, seed=size.seed
    )
    return workload.agents(
        shape,
        window_turns=size.window_turns,
        append_scale_first_half=append_scale_first_half,
        generate_scale_second_half=generate_scale_second_half,
    )


def run(
    mode: config_mod.Mode, prefill: int, decode: int, agents: list[workload.Agent], **kw: object
) -> cluster.RunResult:
    """One static run of ``mode`` at ``prefill``P``decode``D (extra ``SimConfig`` fields in ``kw``)."""
    health = kw.pop("snic_health", {})
    cfg = config_mod.SimConfig.model_validate(
        {
            "mode": mode,
            "cluster": {"prefill_nodes": prefill, "decode_nodes": decode, "snic_health": health},
            **kw,
        }
    )
    return cluster.simulate(cfg, agents)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def validity(cfg: config_mod.SimConfig, prefill: int, decode: int) -> str:
    """Whether ``prefill``P``decode``D lies in the paper's eq. 9 interval for the simulated node
    (``dualpath_operator.planning.bounds``): the compute network and DRAM are not simulated, so the
    runs rely on staying inside it."""
    hw = cfg.hardware
    bound = bounds.validity_bound(
        bounds.NodeShape(
            gpus=hw.gpus_per_node,
            cnic_bytes_per_s=hw.cnic_bytes_per_s,
            snic_bytes_per_s=hw.snic_bytes_per_s,
            memory_bytes_per_s=hw.dram_bytes_per_s,
        )
    )
    verdict = "inside" if bound.contains(prefill, decode) else "OUTSIDE"
    return f"{prefill}P{decode}D {verdict} {bound.describe()}"


def _jct(result: cluster.RunResult) -> str:
    """JCT in seconds, or why there is none (a run that did not finish every turn)."""
    return f"{result.jct_s:.1f}" if result.completed else f"incomplete ({result.requests} turns)"


def fig8(size: Size) -> Report:
    """Fig. 8: JCT of Basic, DualPath and Oracle at 1P1D, 2P1D and 1P2D, side by side."""
    agents = make_agents(size)
    results: dict[str, cluster.RunResult] = {}
    for mode in ("basic", "dualpath", "oracle"):
        for p, d in ((1, 1), (2, 1), (1, 2)):
            result = run(mode, p, d, agents)
            results[result.label] = result
    rows = []
    for label, r in results.items():
        mode, shape = label.split()
        basic = results[f"basic {shape}"]
        oracle = results[f"oracle {shape}"]
        total = r.pe_path_bytes + r.de_path_bytes
        rows.append(
            (
                label,
                _jct(r),
                f"{_ratio(basic.jct_s, r.jct_s):.2f}",
                f"{_ratio(r.jct_s, oracle.jct_s):.2f}",
                f"{_ratio(r.storage_bound_jct_s, r.jct_s):.2f}" if r.storage_bound_jct_s else "-",
                f"{_ratio(r.de_path_bytes, total):.2f}" if total else "-",
                f"{r.ttft_p50_s:.2f}",
                f"{r.tpot_mean_s * 1000:.1f}",
            )
        )
    pairs: tuple[Check, ...] = (
        Check("Basic 1P1D ~ Basic 1P2D", "basic 1P1D", "basic 1P2D", 0.0, 0.10),
        Check("DualPath 1P1D ~ Basic 2P1D", "dualpath 1P1D", "basic 2P1D", 0.0, 0.10),
        Check("DualPath 2P1D ~ DualPath 1P2D", "dualpath 2P1D", "dualpath 1P2D", 0.0, 0.10),
    )
    checks = tuple(
        Check(
            c.name,
            c.left,
            c.right,
            _ratio(results[c.left].jct_s, results[c.right].jct_s),
            c.tolerance,
            results[c.left].completed and results[c.right].completed,
        )
        for c in pairs
    )
    return Report(
        title="Fig. 8 relations (offline JCT, 64K trace)",
        header=(
            "run",
            "JCT s",
            "Basic/this",
            "this/Oracle",
            "storage ceiling/this",
            "DE-path share",
            "TTFT p50 s",
            "TPOT ms",
        ),
        rows=tuple(rows),
        checks=checks,
        notes=(
            f"{size.agents} agents x {size.window_turns} turns (64K Table-2 shape, warm start), "
            f"seed {size.seed}.",
            "storage ceiling = hit bytes / summed usable storage-NIC rate of the nodes the mode reads on "
            "(Basic: PE nodes; DualPath: all); DE-path share at saturation tends to D/(P+D).",
            "DualPath / Basic JCT speedup per shape: "
            + ", ".join(
                f"{shape} {_ratio(results[f'basic {shape}'].jct_s, results[f'dualpath {shape}'].jct_s):.2f}"
                for shape in ("1P1D", "2P1D", "1P2D")
            )
            + " (paper, DS 27B: average 1.64, up to 2.46; at 1P1D up to 1.78, and DualPath 1.09-1.85x "
            "slower than Oracle).",
            "eq. 9: "
            + "; ".join(validity(config_mod.SimConfig(), p, d) for p, d in ((1, 1), (2, 1), (1, 2)))
            + ".",
        ),
        results=results,
    )


def balance(size: Size, prefill: int = 1, decode: int = 2) -> Report:
    """Storage-NIC max/avg over 1 s windows: the real policy vs round-robin (DualPath mode)."""
    agents = make_agents(size)
    paper = run("dualpath", prefill, decode, agents)
    rr = run("dualpath", prefill, decode, agents, scheduler="round_robin")
    rows = (
        ("DualPath policy", f"{paper.snic_max_over_avg:.3f}", f"{paper.jct_s:.1f}", "1.18"),
        ("round-robin", f"{rr.snic_max_over_avg:.3f}", f"{rr.jct_s:.1f}", "1.53"),
    )
    return Report(
        title=f"Storage-NIC balance at {prefill}P{decode}D (max/avg over 1 s windows with > 50 % load)",
        header=("scheduler", "SNIC max/avg", "JCT s", "paper"),
        rows=rows,
        checks=(),
        notes=(
            f"JCT round-robin / DualPath = {_ratio(rr.jct_s, paper.jct_s):.2f}.",
            "The simulator has no storage or network jitter and equal-rate NICs, so the policy's balance "
            "here is its ideal; the paper's 1.18 is measured on real hardware.",
        ),
        results={"paper": paper, "round_robin": rr},
    )


def degraded(size: Size, prefill: int = 1, decode: int = 2, node: str = "node-1") -> Report:
    """One storage NIC at 50 %: paper rule vs weights-aware (real weights planner) vs split reads."""
    agents = make_agents(size)
    health = {node: 0.5}
    results: dict[str, cluster.RunResult] = {}
    for name, weights_aware, split in (
        ("paper rule", False, False),
        ("weights-aware", True, False),
        ("split reads", False, True),
        ("weights-aware + split", True, True),
    ):
        cfg = config_mod.SimConfig.model_validate(
            {
                "mode": "dualpath",
                "weights_aware": weights_aware,
                "split_reads": split,
                "cluster": {"prefill_nodes": prefill, "decode_nodes": decode, "snic_health": health},
                "rebalance_interval_s": 2.0,
            }
        )
        sim = cluster.Simulation(cfg, agents)
        rebalance.Rebalancer(sim, use_weights=weights_aware)
        results[name] = sim.run()
    base = results["paper rule"]
    rows = []
    for name, r in results.items():
        waits = list(r.read_wait_s.values())
        rows.append(
            (
                name,
                _jct(r),
                f"{_ratio(base.jct_s, r.jct_s):.2f}",
                f"{_ratio(r.storage_bound_jct_s, r.jct_s):.2f}",
                f"{_ratio(max(waits), min(waits)):.2f}" if waits and min(waits) > 0 else "-",
                f"{r.read_wait_s.get(node, 0.0):.2f}",
            )
        )
    return Report(
        title=f"One storage NIC at 50 % ({node} of {prefill}P{decode}D, DualPath)",
        header=(
            "read side",
            "JCT s",
            "paper rule/this",
            "storage ceiling/this",
            "read wait max/min",
            f"wait {node} s",
        ),
        rows=tuple(rows),
        notes=(
            "weights-aware: the real dualpath_operator.planning.weights.compute every 2 s on simulated "
            "telemetry (the degraded NIC shows 50 % non-KV receive traffic); capacities pushed to the "
            "policy.",
        ),
        results=results,
    )


def auto_run(
    agents: list[workload.Agent], start: tuple[int, int], slo: tuple[int, int] | None
) -> tuple[cluster.RunResult, rebalance.Rebalancer]:
    """One Auto-ratio run from ``start``: the real ratio planner every 5 s, drain-first switches."""
    cfg = config_mod.SimConfig(
        mode="dualpath",
        cluster=config_mod.Cluster(prefill_nodes=start[0], decode_nodes=start[1]),
        rebalance_interval_s=5.0,
    )
    sim = cluster.Simulation(cfg, agents)
    spec = rebalance.cluster_spec(
        start[0],
        start[1],
        gpus=cfg.hardware.gpus_per_node,
        snic_gbps=cfg.hardware.snic_bytes_per_s * 8 / 1e9,
        interval_s=5.0,
        cooldown_s=10.0,
        windows=2,
        slo=slo,
    )
    params = ratio.RatioParams(
        beta_tokens_per_gpu=float(sim.beta),
        decode_queue_tokens_per_gpu=float(cfg.hardware.hbm_kv_bytes_per_gpu // cfg.cost.kv_bytes_per_token),
        cnic_gbps=cfg.hardware.cnic_bytes_per_s * 8 / 1e9,
        memory_bytes_per_s=cfg.hardware.dram_bytes_per_s,
    )
    rebalancer = rebalance.Rebalancer(sim, use_weights=False, spec=spec, params=params)
    return sim.run(), rebalancer


def auto_ratio(size: Size, nodes: int = 4, append_scale: float = 8.0, generate_scale: float = 4.0) -> Report:
    """Auto ratio (real ratio planner) vs every static ratio of ``nodes`` nodes, pressure changing halfway.

    Two Auto runs: load signals only (queues and HBM), and with the SLO (TTFT 4 s, TPOT 50 ms).
    """
    agents = make_agents(
        size, append_scale_first_half=append_scale, generate_scale_second_half=generate_scale
    )
    results: dict[str, cluster.RunResult] = {}
    for p in range(1, nodes):
        results[f"static {p}P{nodes - p}D"] = run("dualpath", p, nodes - p, agents)
    best_name = min(results, key=lambda k: results[k].jct_s)
    best = results[best_name]
    start = (nodes // 2, nodes - nodes // 2)
    notes = [
        f"Auto starts at {start[0]}P{start[1]}D; planner: dualpath_operator.planning.ratio.decide every 5 s "
        "(2 stabilization windows, cooldown 10 s, maxStep 1, beta and the decode queue limit from the "
        "simulated hardware); switches are drain-first in place.",
    ]
    checks = []
    for name, slo in (("Auto (load signals)", None), ("Auto (with SLO)", (4000, 50))):
        result, rebalancer = auto_run(agents, start, slo)
        results[name] = result
        moves = ", ".join(f"{t:.0f}s {a} -> {r}" for t, a, r in rebalancer.decisions) or "none"
        notes.append(f"{name} decisions: {moves}")
        checks.append(
            Check(
                f"{name} within 10 % of the best static ({best_name}) or better",
                name,
                best_name,
                max(1.0, _ratio(result.jct_s, best.jct_s)),
                0.10,
                result.completed and best.completed,
                gating=False,
            )
        )
    if results["Auto (with SLO)"].jct_s > 1.1 * results["Auto (load signals)"].jct_s:
        notes.append(
            "With the SLO, TTFT (measured from arrival, as the scheduler measures it) also counts the time a "
            "request waits for decode HBM: the scheduler binds a request only once its DE is known. The "
            "first version of the planner read that as prefill pressure and kept asking for prefill groups "
            "(1.29x the best static JCT, moving to 3P1D and never back); it now discounts TTFT while decode "
            "memory is full (planning/ratio.py), so it returns to 2P2D when the phase changes. Its early "
            "move to 3P1D during the prefill-heavy first half still costs JCT against the best static "
            "ratio: the SLO-driven variant remains a finding, the load-signal variant meets the goal."
        )
    rows = tuple(
        (name, _jct(r), f"{_ratio(best.jct_s, r.jct_s):.2f}", str(r.role_switches))
        for name, r in results.items()
    )
    return Report(
        title=(
            f"Auto ratio vs static ratios ({nodes} nodes; first half appends x{append_scale:g}, "
            f"second half generations x{generate_scale:g})"
        ),
        header=("ratio", "JCT s", "best static/this", "role switches"),
        rows=rows,
        checks=tuple(checks),
        notes=tuple(notes),
        results=results,
    )


def scale(agents: int, prefill: int = 48, decode: int = 96, window_turns: int = 2) -> Report:
    """One DualPath and one Basic run at the largest size; wall time shows the simulator's cost."""
    size = Size(agents=agents, window_turns=window_turns)
    population = make_agents(size)
    rows = []
    results = {}
    for mode in ("basic", "dualpath"):
        started = time.perf_counter()
        r = run(mode, prefill, decode, population)
        wall = time.perf_counter() - started
        results[mode] = r
        rows.append(
            (
                r.label,
                str((prefill + decode) * 8),
                _jct(r),
                f"{_ratio(r.storage_bound_jct_s, r.jct_s):.2f}",
                f"{r.snic_max_over_avg:.3f}",
                f"{wall:.1f}",
            )
        )
    return Report(
        title=(
            f"Full scale: {prefill}P{decode}D ({(prefill + decode) * 8} engines), {agents} agents x "
            f"{window_turns} turns"
        ),
        header=("run", "engines", "JCT s", "storage ceiling/this", "SNIC max/avg", "wall s"),
        rows=tuple(rows),
        notes=(
            "Two turns per agent: ramp-up and tail are a large part of the run, so the storage NICs are "
            "saturated only mid-run; this run shows the simulator and the real policy at 1,152 engines.",
            f"DualPath / Basic JCT speedup {_ratio(results['basic'].jct_s, results['dualpath'].jct_s):.2f} "
            f"(storage ceiling (P+D)/P = {(prefill + decode) / prefill:.2f}).",
        ),
        results=results,
    )


@dataclass(frozen=True, slots=True)
class Online:
    """An online capacity search: agents arrive by a Poisson process for ``duration_s`` seconds, each
    replays ``window_turns`` turns of a 64K trajectory (warm start), and a rate is within the SLO when
    the turns that arrive between ``warmup_s`` and ``duration_s`` have mean TTFT and mean TPOT within
    the paper's SLO and every turn finishes within ``drain_factor`` times the duration."""

    rates: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
    duration_s: float = 300.0
    warmup_s: float = 120.0
    window_turns: int = 20
    refine: int = 3
    ttft_slo_s: float = 4.0
    tpot_slo_s: float = 0.05
    drain_factor: float = 4.0
    seed: int = 1


def online_agents(rate: float, spec: Online) -> list[workload.Agent]:
    """The agents of one rate: Poisson arrival times (seeded by the rate, so a rate always draws the same
    sample) over the same population of trajectories for every rate (common random numbers)."""
    rng = random.Random(spec.seed * 1_000_003 + round(rate * 1000))
    times: list[float] = []
    when = rng.expovariate(rate)
    while when < spec.duration_s:
        times.append(when)
        when += rng.expovariate(rate)
    population = make_agents(Size(agents=len(times), window_turns=spec.window_turns, seed=spec.seed))
    return [dataclasses.replace(agent, start_s=at) for agent, at in zip(population, times, strict=True)]


def online_step(
    mode: config_mod.Mode, prefill: int, decode: int, rate: float, spec: Online
) -> dict[str, float]:
    """Simulate one arrival rate; the judged window's turns, mean TTFT and TPOT, and the verdict."""
    cfg = config_mod.SimConfig.model_validate(
        {
            "mode": mode,
            "cluster": {"prefill_nodes": prefill, "decode_nodes": decode},
            "read_side_tie_break": "least_read",
            "max_sim_seconds": spec.duration_s * spec.drain_factor,
        }
    )
    sim = cluster.Simulation(cfg, online_agents(rate, spec))
    result = sim.run()
    window = [r for r in sim.finished if spec.warmup_s <= r.arrived < spec.duration_s]
    ttft = statistics.fmean(r.first_token - r.arrived for r in window) if window else float("inf")
    decoded = [(r.done - r.first_token) / (r.generate - 1) for r in window if r.generate > 1]
    tpot = statistics.fmean(decoded) if decoded else 0.0
    within = result.completed and bool(window) and ttft <= spec.ttft_slo_s and tpot <= spec.tpot_slo_s
    return {"rate": rate, "turns": len(window), "ttft_s": ttft, "tpot_s": tpot, "within": float(within)}


def online(spec: Online, prefill: int = 1, decode: int = 2) -> Report:
    """Capacity of Basic and DualPath (least-read tie-break, as the engine benchmark's ``dualpath``) under
    the paper's SLO, and the bracket of their ratio."""
    rows: list[tuple[str, ...]] = []
    found: dict[str, capacity.Ladder] = {}
    for mode in ("basic", "dualpath"):
        search = capacity.Ladder(spec.rates, spec.refine)
        while (rate := search.next_rate()) is not None:
            step = online_step(mode, prefill, decode, rate, spec)
            search.record(rate, within_slo=bool(step["within"]))
            rows.append(
                (
                    mode,
                    f"{rate:g}",
                    f"{step['turns']:.0f}",
                    f"{step['ttft_s']:.2f}",
                    f"{step['tpot_s'] * 1e3:.1f}",
                    "yes" if step["within"] else "no",
                )
            )
        found[mode] = search
    basic, dual = found["basic"], found["dualpath"]
    brackets = ", ".join(f"{mode} [{s.within:g}, {s.beyond if s.beyond is not None else 'not reached'})"
                         for mode, s in found.items())  # fmt: skip
    notes = [
        f"Agents arrive for {spec.duration_s:g} s (Poisson, seeded by the rate), each replays "
        f"{spec.window_turns} turns of a 64K trajectory with its earlier context already stored; judged "
        f"on the turns that arrive after {spec.warmup_s:g} s; SLO mean TTFT <= {spec.ttft_slo_s:g} s, mean "
        f"TPOT <= {spec.tpot_slo_s * 1e3:g} ms (the paper's), and every turn done within "
        f"{spec.drain_factor:g}x the duration.",
        f"Capacities (agents/s): {brackets}.",
    ]
    if basic.within > 0:
        ratio_text = f"Capacity DualPath / Basic = {dual.within / basic.within:.2f}"
        if basic.beyond is not None and dual.beyond is not None:
            ratio_text += f", within ({dual.within / basic.beyond:.2f}, {dual.beyond / basic.within:.2f}]"
        notes.append(ratio_text + f" (storage NICs (P+D)/P = {(prefill + decode) / prefill:.2f}).")
    return Report(
        title=f"Online capacity at {prefill}P{decode}D under the paper's SLO (load built up before judging)",
        header=("mode", "agents/s", "turns judged", "mean TTFT s", "mean TPOT ms", "within SLO"),
        rows=tuple(rows),
        notes=tuple(notes),
    )
