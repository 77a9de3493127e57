"""Markdown summary of an engine-benchmark run: each section's ratios next to its goal.

Called by :mod:`bench.engine.__main__` after every section (so a run cut short still leaves a summary);
the tables are pasted into ``docs/benchmarks.md``. Torch-free.
"""

from __future__ import annotations

from typing import Any

GB = 1e9


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _ratio(value: float | None, goal: str = "") -> str:
    text = "-" if value is None else f"{value:.3f}"
    return f"{text} ({goal})" if goal else text


def calibration(data: dict[str, Any]) -> list[str]:
    """Ceilings (GB/s)."""
    lines = [
        "| Measurement | GB/s |",
        "|---|---|",
        f"| host memcpy, 1 thread | {_gb(data.get('host_memcpy_1_thread'))} |",
        f"| host memcpy, 4 threads | {_gb(data.get('host_memcpy_4_threads'))} |",
    ]
    for row in data.get("sizes", []):
        mib = int(row["mib"])
        lines.append(
            f"| {mib} MiB H2D pinned / D2H pinned / H2D pageable / D2H pageable | "
            f"{_gb(row['h2d_pinned'])} / {_gb(row['d2h_pinned'])} / {_gb(row['h2d_pageable'])} / "
            f"{_gb(row['d2h_pageable'])} |"
        )
    if "bidirectional_pinned_combined" in data:
        lines.append(
            f"| bidirectional pinned H2D + D2H (combined) | {_gb(data['bidirectional_pinned_combined'])} |"
        )
    for row in data.get("sweep", []):
        lines.append(
            f"| Layer Blocks of {int(row['block_tokens'])} tokens "
            f"({int(row['layer_block_bytes']) // 1024} KiB): "
            f"one by one / batched memcpy2d / contiguous | {_gb(row['one_by_one'])} / "
            f"{_gb(row['batched_memcpy2d'])} / {_gb(row['contiguous'])} |"
        )
    if "gpu0_to_gpu1" in data:
        lines.append(f"| GPU0 -> GPU1 (peer access {data['peer_access']}) | {_gb(data['gpu0_to_gpu1'])} |")
        lines.append(
            f"| concurrent H2D into two GPUs (combined) | {_gb(data['concurrent_h2d_two_gpus_combined'])} |"
        )
    return lines


def kvload(data: dict[str, Any]) -> list[str]:
    """Per-mode throughput and the two ratios."""
    ratios = data["ratios"]
    lines = ["| Mode | GB/s | / Basic | / sum of budgets | PE-path share |", "|---|---|---|---|---|"]
    for row in data["results"]:
        mode = row["mode"]
        lines.append(
            f"| {mode} | {_gb(row['bytes_per_s'])} | {_ratio(ratios.get(f'{mode}_over_basic'))} | "
            f"{_ratio(ratios.get(f'{mode}_over_sum_of_budgets'))} | {row['pe_path_share']:.2f} |"
        )
    ideal = ratios["ideal_dualpath_over_basic"]
    lines.append("")
    goal = f"ideal {ideal:.1f}, goal >= {0.95 * ideal:.2f}"
    lines.append(
        f"DualPath / Basic = {_ratio(ratios.get('dualpath_over_basic'), goal)}; "
        f"DualPath / sum of budgets = {_ratio(ratios.get('dualpath_over_sum_of_budgets'), 'goal >= 0.95')}; "
        "sum of budgets / harness ceiling = "
        f"{_ratio(data.get('sum_of_budgets_over_harness_ceiling'), 'valid <= 0.7')}."
    )
    return lines


def overlap(data: dict[str, Any]) -> list[str]:
    """Overlap points and copy rates."""
    lines = [
        "| Hit tokens | Appended | T_load ms | T_comp ms | T_overlap ms | Efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for p in data["points"]:
        lines.append(
            f"| {p['hit_tokens']} | {p['appended_tokens']} | {p['t_load_s'] * 1e3:.2f} | "
            f"{p['t_comp_s'] * 1e3:.2f} | {p['t_overlap_s'] * 1e3:.2f} | {p['overlap_efficiency']:.3f} |"
        )
    copies = data["copies"]
    lines.append("")
    lines.append(
        f"Full-Block H2D {_gb(copies['full_block_bytes_per_s'])} GB/s; "
        f"ceiling {_gb(data.get('h2d_ceiling_bytes_per_s'))} GB/s; "
        f"ratio {_ratio(data.get('full_block_over_ceiling'), 'goal >= 0.90')}. Layer Blocks "
        f"({copies['layer_block_bytes'] // 1024} KiB): batched ({copies['layer_copy_method']}) "
        f"{_gb(copies['layer_batched_bytes_per_s'])} GB/s vs one by one "
        f"{_gb(copies['layer_one_by_one_bytes_per_s'])} GB/s."
    )
    return lines


def offline(data: dict[str, Any]) -> list[str]:
    """One topology's modes and ratios."""
    budget = data.get("storage_budget_bytes_per_s")
    per_node = f", storage NIC {budget / 1e6:g} MB/s per node" if budget else ""
    lines = [
        f"**{data['name']}** (ideal (P+D)/P = {data['ideal_ratio']:.2f}, "
        f"{data['requests']} requests{per_node})",
        "",
        "| Mode | JCT (makespan) s | mean TTFT s | mean TPOT ms | hit ratio | failed | storage max/avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, run in data["modes"].items():
        lines.append(
            f"| {mode} | {run['makespan_s']:.2f} | {run['ttft_s']['mean']:.3f} | "
            f"{run['tpot_s']['mean'] * 1e3:.1f} | {run['hit_ratio']:.3f} | {run['failed_requests']} | "
            f"{run['storage_max_over_avg']:.2f} |"
        )
    lines.append("")
    for mode, run in data["modes"].items():
        split = run.get("decode_step_ms")
        if split:
            parts = ", ".join(f"{key.removesuffix('_ms')} {value:.2f}" for key, value in split.items())
            lines.append(
                f"- {mode}: decode step ms = {parts}; mean batch {run.get('decode_batch_mean', 0):.1f}"
            )
        batches = run.get("decode_by_batch")
        if batches:
            cells = ", ".join(
                f"{bucket}: {row['step_ms']:.2f} ({row['steps']:.0f})" for bucket, row in batches.items()
            )
            lines.append(f"- {mode}: decode step ms by batch (steps) = {cells}")
        if run.get("prefill_task_ms"):
            lines.append(f"- {mode}: prefill task ms = {_task_parts(run['prefill_task_ms'], ', ')}")
    lines.extend(f"- {key} = {value:.3f}" for key, value in data["ratios"].items())
    spread = data["ratios"].get("hit_ratio_spread", 0.0)
    if spread > 0.05:
        lines.append(
            f"- **not comparable**: the modes' hit ratios differ by {spread:.2f}, so the JCT ratio mixes "
            "read speed with recomputation (one way: next turns that arrive before the previous turn's KV is "
            "persisted recompute it)"
        )
    return lines


def _task_parts(split: dict[str, float], sep: str) -> str:
    """A prefill task's mean time by part, e.g. ``read 12.0, queue 3.1, ...`` or ``12.0/3.1/...``."""
    values = [(part, split.get(f"{part}_ms", 0.0)) for part in ("read", "queue", "compute", "send")]
    if sep == "/":
        return "/".join(f"{value:.0f}" for _, value in values)
    return sep.join(f"{part} {value:.1f}" for part, value in values)


def online(data: dict[str, Any]) -> list[str]:
    """Capacity per mode."""
    slo = data["slo"]
    lines = [
        f"SLO (scaled to the model): mean TTFT <= {slo['ttft_mean_s']:.3g} s, mean TPOT <= "
        f"{slo['tpot_mean_s'] * 1e3:.0f} ms ({data['topology']}).",
        "",
        "| Mode | rate /s | within SLO | mean TTFT s | mean TPOT ms | decode step compute/queue/host ms "
        "| mean batch | prefill read/queue/compute/send ms | requests | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, result in data["modes"].items():
        for step in result["steps"]:
            split = step.get("decode_step_ms", {})
            parts = "/".join(f"{split.get(f'{part}_ms', 0.0):.1f}" for part in ("compute", "queue", "host"))
            lines.append(
                f"| {mode} | {step['rate']} | {step['within_slo']} | {step['ttft_s']['mean']:.3f} | "
                f"{step['tpot_s']['mean'] * 1e3:.1f} | {parts} | {step.get('decode_batch_mean', 0):.1f} | "
                f"{_task_parts(step.get('prefill_task_ms', {}), '/')} | {step['requests']} | "
                f"{step['failed_requests']} |"
            )
    lines.append("")
    lines.append(
        f"Capacity DualPath / Basic = {_ratio(data.get('capacity_dualpath_over_basic'), 'goal >= 2.5')}."
    )
    if data.get("capacity_dualpath_split_over_basic") is not None:
        lines.append(
            f"Capacity DualPath with split reads / Basic = {data['capacity_dualpath_split_over_basic']:.3f}."
        )
    equal = data.get("decode_step_equal_batch_by_rate") or {}
    if equal:
        cells = ", ".join(f"{rate}/s {value:.3f}" for rate, value in equal.items())
        lines.append(f"Decode step at equal batch, DualPath / Basic, at the rates both ran: {cells}.")
    bounds = data.get("capacity_ratio_bounds")
    if bounds:
        within = {mode: result["capacity_rate"] for mode, result in data["modes"].items()}
        beyond = {mode: result.get("beyond_rate") for mode, result in data["modes"].items()}
        brackets = ", ".join(f"{mode} [{within[mode]}, {beyond[mode]})" for mode in within)
        lines.append(f"Capacities lie in {brackets}: the ratio lies in [{bounds[0]:.2f}, {bounds[1]:.2f}).")
    return lines


RENDERERS = {"calibration": calibration, "kvload": kvload, "overlap": overlap, "online": online}


def markdown(results: dict[str, Any]) -> str:
    """The whole summary."""
    lines = [f"# Engine benchmark ({results['meta']['preset']}, {results['meta']['date']})", ""]
    lines.append("```\n" + "\n".join(f"{k}: {v}" for k, v in results["meta"].items()) + "\n```")
    for section, data in results["sections"].items():
        lines += ["", f"## {section}", ""]
        if "error" in data:
            lines.append("ERROR:\n```\n" + data["error"][-3000:] + "\n```")
        elif section in ("offline", "topologies"):
            for topology in data["topologies"]:
                if "error" in topology:
                    lines += [f"**{topology['name']}** ERROR:", "```", topology["error"][-3000:], "```", ""]
                else:
                    lines += [*offline(topology), ""]
        else:
            lines += RENDERERS[section](data)
    return "\n".join(lines) + "\n"
