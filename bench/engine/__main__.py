"""``python -m bench.engine``: run the engine benchmarks and write ``results.json`` and ``summary.md``.

``--cpu --quick`` is the CI-sized CPU variant (mechanics, a few minutes on 2 cores); ``--cpu`` a larger
CPU run; without ``--cpu`` the ``gpu`` preset runs when torch sees CUDA (``bench/gpu_run.sh`` on the
device machine). ``--only`` picks sections (calibration, kvload, overlap, offline, online). Results are
rewritten after every section, so a run cut short still leaves what it measured; a section that fails
records its traceback and the exit status becomes 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pydantic
import torch

from bench.engine import calibration, kvload, overlap, replay, report, settings

SECTIONS = ("calibration", "kvload", "overlap", "offline", "online", "topologies")
"""In run order: the 1P2D offline replay and the online run come before the other topologies."""


def _meta(cfg: settings.BenchSettings, argv: Sequence[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "preset": cfg.preset,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.engine " + " ".join(argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpus": __import__("os").cpu_count(),
    }
    if cfg.device == "cuda":
        meta["gpus"] = torch.cuda.device_count()
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


def _topologies(
    workdir: pathlib.Path, cfg: settings.ReplaySettings, topologies: Sequence[settings.Topology]
) -> dict[str, Any]:
    """Offline replay on each topology; a topology that fails records its traceback."""
    out = []
    for topology in topologies:
        try:
            out.append(asyncio.run(replay.offline(workdir, cfg, topology)))
        except Exception:  # the other topologies still run
            out.append({"name": topology.name, "error": traceback.format_exc()})
    return {"topologies": out}


def run(
    cfg: settings.BenchSettings, only: Sequence[str], out: pathlib.Path, argv: Sequence[str]
) -> dict[str, Any]:
    """Run the chosen sections in order, rewriting the results after each; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    workdir = pathlib.Path(
        tempfile.mkdtemp(prefix="bench-engine-", dir="/dev/shm" if cfg.device == "cuda" else None)
    )
    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    results: dict[str, Any] = {
        "meta": _meta(cfg, argv),
        "settings": cfg.model_dump(mode="json"),
        "sections": {},
    }

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "summary.md").write_text(report.markdown(results))

    steps: dict[str, Callable[[], Any]] = {
        "calibration": lambda: calibration.run(cfg.calibration, cfg.device),
        "kvload": lambda: asyncio.run(kvload.run(cfg.kvload, cfg.device, gpus)),
        "overlap": lambda: overlap.run(
            cfg.overlap, cfg.device, calibration.h2d_ceiling(results["sections"].get("calibration", {}))
        ),
        "offline": lambda: _topologies(workdir, cfg.replay, cfg.replay.topologies[:1]),
        "online": lambda: asyncio.run(
            replay.online(workdir, cfg.replay, cfg.replay.topologies[0], cfg.replay.online_modes)
        ),
        "topologies": lambda: _topologies(workdir, cfg.replay, cfg.replay.topologies[1:]),
    }
    for section in SECTIONS:
        if section not in only:
            continue
        started = time.perf_counter()
        print(f"[bench.engine] {section} ...", flush=True)
        try:
            data = steps[section]()
        except Exception:  # a failed section is recorded and the others still run
            data = {"error": traceback.format_exc()}
        data["wall_s"] = time.perf_counter() - started
        results["sections"][section] = data
        save()
        print(f"[bench.engine] {section} done in {data['wall_s']:.1f}s", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the summary; 1 if any section failed."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--quick", action="store_true", help="CI-sized CPU variant (with --cpu)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--out", default="bench/out/engine", help="directory for results.json, summary.md")
    parser.add_argument(
        "--storage-budget",
        type=float,
        metavar="MB_PER_S",
        help="replays: every node's emulated storage-NIC budget in MB/s (default: the preset's)",
    )
    parser.add_argument("--trajectories", type=int, help="offline replays: trajectories started at once")
    parser.add_argument("--modes", help="offline replays: comma-separated modes (basic,dualpath,...)")
    parser.add_argument("--online-modes", help="online: comma-separated modes (default basic,dualpath)")
    parser.add_argument("--online-rates", help="online: comma-separated trajectory arrival rates per second")
    parser.add_argument("--online-duration", type=float, metavar="S", help="online: seconds per arrival rate")
    parser.add_argument(
        "--online-refine", type=int, metavar="N", help="online: bisection steps after the ladder, per mode"
    )
    parser.add_argument(
        "--online-warmup",
        type=float,
        metavar="S",
        help="online: first seconds of each rate left out of the SLO",
    )
    args = parser.parse_args(args_list)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"error: unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    name = "gpu"
    if args.cpu or not torch.cuda.is_available():
        name = "cpu-quick" if args.quick else "cpu"
    cfg = settings.preset(name, gpus=torch.cuda.device_count() if name == "gpu" else 0)
    overrides: dict[str, Any] = {}
    if args.storage_budget is not None:
        overrides["storage_budget_bytes_per_s"] = args.storage_budget * 1e6
    if args.trajectories is not None:
        overrides["trajectories"] = args.trajectories
    if args.modes:
        overrides["modes"] = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    if args.online_modes:
        overrides["online_modes"] = tuple(
            mode.strip() for mode in args.online_modes.split(",") if mode.strip()
        )
    if args.online_rates:
        overrides["online_rates"] = tuple(float(rate) for rate in args.online_rates.split(","))
    if args.online_duration is not None:
        overrides["online_duration_s"] = args.online_duration
    if args.online_refine is not None:
        overrides["online_refine"] = args.online_refine
    if args.online_warmup is not None:
        overrides["online_warmup_s"] = args.online_warmup
    if overrides:
        try:  # validated like the presets (pydantic), so a bad value names its field
            replay_cfg = settings.ReplaySettings.model_validate({**cfg.replay.model_dump(), **overrides})
        except (pydantic.ValidationError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        cfg = cfg.model_copy(update={"replay": replay_cfg})
    results = run(cfg, only, pathlib.Path(args.out), args_list)
    print(report.markdown(results))
    return 1 if any("error" in data for data in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
