"""``python -m bench`` (``make bench``): the CPU benchmarks: the cluster simulator and the decision cost.

Runs the simulator scenarios of ``bench.sim.scenarios`` (Fig. 8 relations, storage-NIC balance, one
degraded storage NIC, Auto ratio vs static ratios, online capacity, full scale) and the scheduler
decision cost of ``bench.decision_cost``, prints every table, and with ``--write-docs`` rewrites the
"Simulator" and "Scheduler decision cost" sections of docs/benchmarks.md (other sections are kept).
Exits 1 when a paper relation (Fig. 8) does not hold, so CI notices; other comparisons are reported
as findings.
``--quick`` runs everything at a small size (seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import shlex
import sys
import time

from bench import decision_cost, report
from bench.sim import config as config_mod
from bench.sim import scenarios

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (a smoke run, not the reported one)"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite our sections of docs/benchmarks.md"
    )
    parser.add_argument("--docs", type=pathlib.Path, default=DOCS, help="the benchmarks document to update")
    parser.add_argument("--agents", type=int, default=1024, help="agents in the small-cluster scenarios")
    parser.add_argument("--turns", type=int, default=6, help="turns replayed per agent (Fig. 8, balance)")
    parser.add_argument(
        "--scale-agents", type=int, default=49152, help="agents of the 144-node run (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed")
    return parser


def _assumptions() -> str:
    cfg = config_mod.SimConfig()
    hw, cost = cfg.hardware, cfg.cost
    rows = [
        ("GPUs per node g", f"{hw.gpus_per_node}"),
        ("compute NIC B per GPU", f"{hw.cnic_bytes_per_s / 1e9:.0f} GB/s"),
        ("storage NIC per node s*B", f"{hw.snic_bytes_per_s / 1e9:.0f} GB/s"),
        ("KV bytes per token", f"{cost.kv_bytes_per_token} (30 layers x (656 B MLA FP8 + 68 B indexer))"),
        ("block", f"{cost.block_tokens} tokens"),
        (
            "prefill",
            f"{cost.linear_per_token_s * 1e6:.0f} us/token linear + {cost.attn_per_pair_s:g} s/pair "
            f"attention; quota {cost.quota_s * 1000:.0f} ms",
        ),
        (
            "decode step",
            f"{cost.decode_step_fixed_s * 1000:.0f} ms + {cost.decode_per_seq_s * 1e6:.0f} us/seq "
            f"+ {cost.decode_per_context_token_s:g} s/context token",
        ),
        ("decode KV HBM per GPU", f"{hw.hbm_kv_bytes_per_gpu / 1e9:.0f} GB"),
        ("alpha / beta", f"{cfg.alpha_seconds:g} s of node reads / {cfg.beta_seconds:g} s of GPU prefill"),
    ]
    return report.table(("assumption (DS 27B-like, [inference])", "value"), rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.quick:
        size = scenarios.Size(agents=96, window_turns=3, seed=args.seed)
        auto_size = size
        online = scenarios.Online(
            rates=(8.0, 32.0, 128.0), duration_s=40.0, warmup_s=15.0, window_turns=4, refine=1, seed=args.seed
        )
        scale_agents = min(args.scale_agents, 512)
    else:
        size = scenarios.Size(agents=args.agents, window_turns=args.turns, seed=args.seed)
        auto_size = scenarios.Size(agents=args.agents, window_turns=2 * args.turns, seed=args.seed)
        online = scenarios.Online(seed=args.seed)
        scale_agents = args.scale_agents
    started = time.perf_counter()
    reports = [
        scenarios.fig8(size),
        scenarios.balance(size),
        scenarios.degraded(size),
        scenarios.auto_ratio(auto_size),
        scenarios.online(online),
    ]
    if scale_agents:
        reports.append(scenarios.scale(scale_agents))
    sim_seconds = time.perf_counter() - started
    cost = decision_cost.measure(samples=300 if args.quick else 3000)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Run {stamp} on {report.environment()}.\n\nCommand: `{command.strip()}` "
        f"(simulated scenarios took {sim_seconds:.0f} s of wall time)."
    )
    simulator = "\n\n".join(
        [
            "## Simulator",
            header,
            "A discrete-event model of the cluster (`bench/sim/`) that makes every decision with the real "
            "code: `dualpath_engine.scheduler.policy` (PE/DE selection, read side, weights-aware and split "
            "reads), `dualpath_engine.scheduler.batching` (300 ms quota batches) and, for rebalancing, "
            "`dualpath_operator.planning.weights` and `.ratio` on simulated telemetry. Storage NICs are FIFO "
            "servers at their usable rate; PE batches overlap KV streaming with compute when layer-wise "
            "(DualPath, Oracle) and serialise it when not (Basic); DEs decode in continuous batches; the "
            "compute network and DRAM are checked analytically (the paper's eq. 9), not simulated.",
            _assumptions(),
            *(report.render(r) for r in reports),
        ]
    )
    fetch = cost.fetch
    decision = "\n\n".join(
        [
            "## Scheduler decision cost",
            header,
            report.table(
                ("figure", "value", "goal"),
                [
                    ("engines / groups", f"{cost.engines} / {cost.groups}", "1,152 engines"),
                    ("per request p50 (CPU time)", f"{cost.p50_s * 1e6:.1f} us", ""),
                    ("per request p99 (CPU time)", f"{cost.p99_s * 1e6:.1f} us", "< 1 ms"),
                    ("per request max (CPU time)", f"{cost.max_s * 1e6:.1f} us", ""),
                    (
                        "per request p50 / p99 (wall)",
                        f"{cost.wall_p50_s * 1e6:.1f} / {cost.wall_p99_s * 1e6:.1f} us",
                        "",
                    ),
                    ("PE-group fetch of 64 (median)", f"{fetch.pe_fetch_seconds_median * 1e6:.0f} us", ""),
                    (
                        "DE fetch of 64, both phases (median)",
                        f"{fetch.de_fetch_seconds_median * 1e6:.0f} us",
                        "",
                    ),
                    ("read plan (median)", f"{fetch.read_side_seconds_median * 1e6:.1f} us", ""),
                    (
                        "mean per request inside 64-request fetches",
                        f"{fetch.seconds_per_request * 1e6:.1f} us",
                        "",
                    ),
                ],
            ),
            f"- One core (pinned to CPU {cost.cpu}), {cost.samples} single-request decisions: PE selection "
            "in its group, DE phase 1 over all decode groups and phase 2 in the chosen one, then the read "
            "plan; pure policy functions (`bench/decision_cost.py`, reusing "
            "`dualpath_engine.scheduler.benchmark.measure_decision_cost` for the fetch figures). The "
            "scheduler process's HTTP and state bookkeeping are not included.",
            f"- p99 goal {'met' if cost.p99_s < 1e-3 else 'MISSED'}.",
        ]
    )
    print(simulator)
    print()
    print(decision)
    if args.write_docs:
        report.write_sections(args.docs, {"simulator": simulator, "decision-cost": decision})
        print(f"\nwrote {args.docs}")
    failed = [c.name for r in reports for c in r.checks if c.gating and not c.ok]
    if failed:
        print("\nrelations that do not hold: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
