"""Offline and online agentic replay against real engine processes, Basic / DualPath / Oracle side by
side (paper section 7, I/O-bound configuration: tiny compute, emulated storage-NIC budgets).

Offline: every trajectory starts at once (``dualpath_engine.workload.replay``, paper replay rule);
JCT = time until the last trajectory finishes. Per mode: JCT, TTFT/TPOT, hit ratio and every node's
storage-NIC bytes (max/avg across nodes). Online: Poisson arrivals at ascending rates until the SLO
(mean TTFT, mean TPOT) breaks; the capacity is the highest rate within it. Each mode runs on a fresh
cluster (:mod:`bench.engine.cluster`) with an empty store. Called by :mod:`bench.engine.__main__`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bench import capacity
from bench.engine import cluster, settings
from dualpath_engine.engine import prefill
from dualpath_engine.workload import replay as workload
from dualpath_engine.workload import trace


def trajectories(cfg: settings.ReplaySettings, count: int, seed: int) -> list[trace.Trajectory]:
    """The Table-2-shaped trace of the settings (capped at the model's context)."""
    shape = trace.TraceShape(
        preset=cfg.preset,
        trajectories=count,
        token_scale=cfg.token_scale,
        turn_scale=cfg.turn_scale,
        seed=seed,
        max_len=min(cfg.max_context_tokens, int(trace.TABLE2[cfg.preset][0] / cfg.token_scale)),
    )
    return trace.generate(shape)


def _replay_config(
    run: cluster.Cluster, cfg: settings.ReplaySettings, mode: str, **extra: Any
) -> workload.ReplayConfig:
    return workload.ReplayConfig(
        base_url=run.url,
        model=cluster.MODEL_NAME,
        mode="offline" if mode == "offline" else "online",
        request_timeout_s=cfg.time_limit_s,
        max_duration_s=cfg.time_limit_s,
        max_requests=100_000,
        **extra,
    )


async def _counters(run: cluster.Cluster) -> dict[str, dict[str, float]]:
    """Every engine's counters (one ``/metrics`` scrape each)."""
    return {engine.name: await cluster.counters(engine) for engine in run.engines}


def _nic_bytes(counters: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {key: values[key] for key in cluster.NIC_KEYS} for name, values in counters.items()}


def _totals(counters: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every counter summed over the engines (a role's counters stay zero on the other role's engines)."""
    out: dict[str, float] = {}
    for values in counters.values():
        for key, value in values.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _per_step(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean decode-step time by part between two counter readings (ms per step): where TPOT goes."""
    steps = max(after["steps"] - before["steps"], 1.0)
    return {f"{part}_ms": (after[part] - before[part]) * 1e3 / steps for part in ("compute", "queue", "host")}


def _by_batch(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per decode batch-size bucket between two readings: steps, tokens and the mean step time (ms)."""
    out: dict[str, dict[str, float]] = {}
    for key in after:
        if not (key.startswith("batch:") and key.endswith(":steps")):
            continue
        bucket = key.split(":")[1]
        delta = {
            what: after[f"batch:{bucket}:{what}"] - before.get(f"batch:{bucket}:{what}", 0.0)
            for what in ("steps", "tokens", "seconds")
        }
        if delta["steps"] > 0:
            out[bucket] = {
                "steps": delta["steps"],
                "tokens": delta["tokens"],
                "step_ms": delta["seconds"] * 1e3 / delta["steps"],
            }
    return dict(sorted(out.items(), key=lambda item: int(item[0].split("-")[0])))


def _per_task(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Prefill tasks completed between two readings and their mean time by part (ms per task): the
    prefill engine's share of TTFT, by cause."""
    tasks = after["tasks"] - before["tasks"]
    parts = {
        f"{part}_ms": (after[f"task_{part}"] - before[f"task_{part}"]) * 1e3 / max(tasks, 1.0)
        for part in prefill.TASK_PARTS
    }
    return {"tasks": tasks, **parts}


def _decode_split(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the decode and prefill counters say between two readings (see the three helpers above)."""
    batches = _by_batch(before, after)
    steps = sum(row["steps"] for row in batches.values())
    return {
        "decode_step_ms": _per_step(before, after),
        "decode_by_batch": batches,
        "decode_batch_mean": sum(row["tokens"] for row in batches.values()) / steps if steps else 0.0,
        "prefill_task_ms": _per_task(before, after),
    }


def equal_batch_step_ratio(
    dual: dict[str, dict[str, float]], basic: dict[str, dict[str, float]], min_steps: int = 20
) -> float | None:
    """DualPath's decode-step time over Basic's at equal batch size: over the buckets where both ran at
    least ``min_steps`` steps, weighted by the tokens DualPath decoded in each (None if none is shared).
    TPOT compares the modes at their own batch sizes; this compares what a step costs at the same one."""
    common = [
        bucket
        for bucket in dual
        if bucket in basic and min(dual[bucket]["steps"], basic[bucket]["steps"]) >= min_steps
    ]
    if not common:
        return None
    num = sum(dual[bucket]["tokens"] * dual[bucket]["step_ms"] for bucket in common)
    return num / sum(dual[bucket]["tokens"] * basic[bucket]["step_ms"] for bucket in common)


def balance(nics: dict[str, dict[str, float]]) -> float:
    """Max / average storage-NIC read bytes across nodes (1.0 = perfectly even; 0 if nothing read)."""
    reads = [counters["storage_rx"] for counters in nics.values()]
    mean = statistics.fmean(reads) if reads else 0.0
    return max(reads) / mean if mean else 0.0


def _summary(report: workload.Report) -> dict[str, Any]:
    data = report.to_dict()
    return {
        "makespan_s": report.duration_s,
        "requests": report.requests,
        "failed_requests": report.failed_requests,
        "errors": list(report.errors)[:5],
        "trajectories_completed": report.trajectories_completed,
        "hit_ratio": report.hit_ratio,
        "prompt_tokens": report.prompt_tokens,
        "generated_tokens": report.generated_tokens,
        "jct_s": data["jct_s"],
        "ttft_s": data["ttft_s"],
        "tpot_s": data["tpot_s"],
    }


async def offline(
    workdir: pathlib.Path, cfg: settings.ReplaySettings, topology: settings.Topology
) -> dict[str, Any]:
    """Every mode of ``cfg.modes`` on ``topology``; ratios against Basic and Oracle."""
    trace_ = trajectories(cfg, cfg.trajectories, seed=1)
    runs: dict[str, Any] = {}
    for mode in cfg.modes:
        with cluster.cluster(workdir / f"{topology.name}-{mode}", cfg, topology, mode) as run:
            report = await workload.replay(trace_, _replay_config(run, cfg, "offline"))
            counters = await _counters(run)
            nics = _nic_bytes(counters)
            zero = dict.fromkeys((*cluster.DECODE_KEYS, *cluster.PREFILL_KEYS), 0.0)
            split = _decode_split(zero, _totals(counters))
        runs[mode] = {
            **_summary(report),
            **split,
            "nic_bytes": nics,
            "storage_max_over_avg": balance(nics),
            "devices": {engine.name: engine.device for engine in run.engines},
        }
    out: dict[str, Any] = {
        "topology": topology.model_dump(mode="json"),
        "name": topology.name,
        "ideal_ratio": (topology.prefill + topology.decode) / topology.prefill,
        "storage_budget_bytes_per_s": cfg.storage_budget_bytes_per_s,
        "requests": sum(len(t.turns) for t in trace_),
        "modes": runs,
    }
    out["ratios"] = offline_ratios(runs)
    return out


def offline_ratios(runs: dict[str, Any]) -> dict[str, float]:
    """JCT Basic/DualPath and Oracle/DualPath, TPOT DualPath/Basic, KV-read throughput ratios, the same
    against Basic for the DualPath variants, and the spread of the hit ratios of the modes with KV I/O."""
    ratios: dict[str, float] = {}
    hits = [run["hit_ratio"] for mode, run in runs.items() if mode != "oracle"]
    if len(hits) > 1:
        # A JCT ratio compares read schemes only if the modes reused the same share of the context: a mode
        # whose next turns arrive before the previous turn's KV is persisted recomputes instead of reading.
        ratios["hit_ratio_spread"] = max(hits) - min(hits)
    basic, dual = runs.get("basic"), runs.get("dualpath")
    if dual is not None and basic is not None:
        ratios["jct_basic_over_dualpath"] = basic["makespan_s"] / dual["makespan_s"]
        if basic["tpot_s"]["mean"] > 0:
            ratios["tpot_dualpath_over_basic"] = dual["tpot_s"]["mean"] / basic["tpot_s"]["mean"]
        equal = equal_batch_step_ratio(dual.get("decode_by_batch", {}), basic.get("decode_by_batch", {}))
        if equal is not None:
            ratios["decode_step_equal_batch_dualpath_over_basic"] = equal
        ratios["kv_read_rate_dualpath_over_basic"] = _read_rate(dual) / max(_read_rate(basic), 1e-9)
    if dual is not None and "oracle" in runs:
        ratios["jct_oracle_over_dualpath"] = runs["oracle"]["makespan_s"] / dual["makespan_s"]
    if basic is not None and "oracle" in runs:
        ratios["jct_basic_over_oracle"] = basic["makespan_s"] / runs["oracle"]["makespan_s"]
    for mode in ("dualpath", "dualpath-paper", "dualpath-split"):
        variant, suffix = runs.get(mode), mode.replace("-", "_")
        if variant is None:
            continue
        if basic is not None and mode != "dualpath":
            ratios[f"jct_basic_over_{suffix}"] = basic["makespan_s"] / variant["makespan_s"]
        ratios[f"storage_max_over_avg_{suffix}"] = variant["storage_max_over_avg"]
    return ratios


def _read_rate(run: dict[str, Any]) -> float:
    total = sum(counters["storage_rx"] for counters in run["nic_bytes"].values())
    return float(total / run["makespan_s"])


def after_warmup(report: workload.Report, warmup_s: float) -> dict[str, Any]:
    """Requests, failures, TTFT and TPOT of the requests started ``warmup_s`` or later into a step."""
    window = [r for r in report.results if r.started_s >= warmup_s]
    ok = [r for r in window if r.error is None]
    return {
        "requests": len(window),
        "failed_requests": len(window) - len(ok),
        "ttft_s": dataclasses.asdict(workload.Summary.of([r.ttft_s for r in ok if r.ttft_s is not None])),
        "tpot_s": dataclasses.asdict(workload.Summary.of([r.tpot_s for r in ok if r.tpot_s is not None])),
    }


def within_slo(report: dict[str, Any], ttft_s: float, tpot_s: float) -> bool:
    """No failed request, mean TTFT and mean TPOT within the SLO."""
    return bool(
        report["failed_requests"] == 0
        and report["requests"] > 0
        and report["ttft_s"]["mean"] <= ttft_s
        and report["tpot_s"]["mean"] <= tpot_s
    )


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What a capacity search found: every step measured (in order), the highest rate within the SLO
    (0 when the first fails) and the lowest rate seen beyond it (None when every step passed)."""

    steps: list[dict[str, Any]]
    within: float
    beyond: float | None


async def search_capacity(
    rates: Sequence[float], refine: int, measure: Callable[[float], Awaitable[dict[str, Any]]]
) -> Capacity:
    """Climb the ascending ``rates`` until a step breaks the SLO (``measure(rate)["within_slo"]``), then
    bisect ``refine`` times between the highest passing and the first failing rate
    (:class:`bench.capacity.Ladder`)."""
    steps: list[dict[str, Any]] = []
    search = capacity.Ladder(rates, refine)
    while (rate := search.next_rate()) is not None:
        step = await measure(rate)
        steps.append(step)
        search.record(rate, within_slo=bool(step["within_slo"]))
    return Capacity(steps, search.within, search.beyond)


def slo(cfg: settings.ReplaySettings) -> tuple[float, float]:
    """The online SLO the ladder is judged by: (mean TTFT, mean TPOT) scaled to the model - the paper's
    TTFT divided by the trace's token scale (prompts are that much shorter), TPOT as is."""
    return cfg.ttft_slo_s / cfg.token_scale, cfg.tpot_slo_s


async def online(
    workdir: pathlib.Path,
    cfg: settings.ReplaySettings,
    topology: settings.Topology,
    modes: Sequence[str] = ("basic", "dualpath"),
) -> dict[str, Any]:
    """Capacity (highest rate within the scaled SLO) of each mode: rates climb until the SLO breaks, then
    ``cfg.online_refine`` bisection steps narrow the bracket."""
    ttft_slo, tpot_slo = slo(cfg)
    results: dict[str, Any] = {}
    for mode in modes:
        with cluster.cluster(workdir / f"online-{topology.name}-{mode}", cfg, topology, mode) as run:

            async def measure(rate: float, run: cluster.Cluster = run) -> dict[str, Any]:
                count = max(2, int(rate * cfg.online_duration_s * 1.5) + 2)
                # Seeded by the rate, not the ladder position: a rate gets the same trajectories and
                # arrival times in every ladder, so ladders with different rate lists compare.
                seed = round(rate * 1000)
                trace_ = trajectories(cfg, count, seed=100 + seed)
                rc = _replay_config(run, cfg, "online", rate=rate, seed=seed)
                rc = rc.model_copy(update={"max_duration_s": cfg.online_duration_s})
                before = _totals(await _counters(run))
                replayed = await workload.replay(trace_, rc)
                after = _totals(await _counters(run))
                report = _summary(replayed)
                step: dict[str, Any] = {"rate": rate, "warmup_s": cfg.online_warmup_s}
                if cfg.online_warmup_s:  # judge (and tabulate) the window after the warm-up
                    step["all_requests"] = {key: report[key] for key in ("requests", "ttft_s", "tpot_s")}
                    report = {**report, **after_warmup(replayed, cfg.online_warmup_s)}
                ok = within_slo(report, ttft_slo, tpot_slo)
                return {**step, "within_slo": ok, **report, **_decode_split(before, after)}

            found = await search_capacity(cfg.online_rates, cfg.online_refine, measure)
        results[mode] = {"capacity_rate": found.within, "beyond_rate": found.beyond, "steps": found.steps}
    out: dict[str, Any] = {
        "topology": topology.name,
        "slo": {"ttft_mean_s": ttft_slo, "tpot_mean_s": tpot_slo, "paper_ttft_mean_s": cfg.ttft_slo_s},
        "modes": results,
    }
    return {**out, **online_ratios(results)}


def online_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """From each mode's capacity search: capacity DualPath / Basic (None unless both ran), the same for
    DualPath with split reads, the decode step at equal batch at every rate both ran, and the bounds of
    the capacity ratio when both searches found a failing rate."""
    out: dict[str, Any] = {}
    basic = results.get("basic", {})
    dual = results.get("dualpath", {})
    basic_within, dual_within = basic.get("capacity_rate", 0.0), dual.get("capacity_rate", 0.0)
    # A ratio only where both modes ran in this process (one mode per process is a valid run too).
    both = bool(basic) and bool(dual) and basic_within > 0
    out["capacity_dualpath_over_basic"] = dual_within / basic_within if both else None
    split_within = results.get("dualpath-split", {}).get("capacity_rate")
    if split_within is not None and basic and basic_within:
        out["capacity_dualpath_split_over_basic"] = split_within / basic_within
    shared = {
        step["rate"]: (step, other)
        for step in dual.get("steps", [])
        for other in basic.get("steps", [])
        if other["rate"] == step["rate"]
    }
    equal = {
        str(rate): equal_batch_step_ratio(step["decode_by_batch"], other["decode_by_batch"])
        for rate, (step, other) in sorted(shared.items())
    }
    out["decode_step_equal_batch_by_rate"] = {
        rate: value for rate, value in equal.items() if value is not None
    }
    # Where each true capacity lies, [within, beyond): the ratio lies between these two bounds.
    if basic.get("beyond_rate") and dual.get("beyond_rate") and basic_within:
        out["capacity_ratio_bounds"] = [
            dual_within / basic["beyond_rate"],
            dual["beyond_rate"] / basic_within,
        ]
    return out
