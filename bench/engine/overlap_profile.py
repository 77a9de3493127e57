"""Where the time of the layer-wise overlap measurement goes, from a CUDA profile.

A diagnostic (not part of the preset run): ``python -m bench.engine.overlap_profile --out DIR`` on the GPU
machine measures the overlap points of the gpu preset (``bench.engine.overlap``), then profiles
``T_comp`` and ``T_overlap`` of the smallest appended size with ``torch.profiler`` and writes
``overlap-<appended>.json`` (a Chrome trace) plus a table of the kernels by GPU time. The trace answers
what the efficiency figure cannot: whether compute waits on copies, on the CPU issuing kernels, or on
neither.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from collections.abc import Callable, Sequence

import torch
from torch import profiler

from bench.engine import overlap, settings


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, profile, write the trace; 2 without CUDA."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine.overlap_profile", description=__doc__)
    parser.add_argument("--out", required=True, help="directory for the traces")
    parser.add_argument("--appended", type=int, nargs="*", help="appended sizes (default: the preset's)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs CUDA (run it on the GPU machine)", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings.preset("gpu", gpus=torch.cuda.device_count()).overlap
    sizes = tuple(args.appended) if args.appended else cfg.appended
    device = torch.device("cuda", 0)
    point = overlap.Point(cfg, device, overlap.build_model(cfg, device))
    for appended in sizes:
        row = point.measure(appended)
        times = ", ".join(f"{name} {row[f't_{name}_s'] * 1e3:.2f} ms" for name in ("load", "comp", "overlap"))
        print(f"appended {appended}: {times}, efficiency {row['overlap_efficiency']:.3f}", flush=True)
    for appended in sizes:
        activities = [profiler.ProfilerActivity.CPU, profiler.ProfilerActivity.CUDA]
        with profiler.profile(activities=activities) as prof:
            runs: dict[str, Callable[[], None]] = {
                "compute": functools.partial(point.compute, appended),
                "overlapped": functools.partial(point.overlapped, appended),
                "load": point.load_all,
            }
            for label, run in runs.items():
                with profiler.record_function(label):
                    run()
                point.sync()
        prof.export_chrome_trace(str(out / f"overlap-{appended}.json"))
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        # Where the CPU's time goes: a CUDA runtime call that blocks (a launch queue that is full, a
        # synchronising copy or allocation) shows up as a large self CPU time.
        cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        (out / f"overlap-{appended}.txt").write_text(f"{table}\n{cpu}")
        print(f"appended {appended}: trace written; top kernels:\n{table}\ntop CPU:\n{cpu}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
