"""CLI: generate a Table-2-shaped agentic trace and replay it against an OpenAI-compatible server.

``python -m dualpath_engine.workload --url http://127.0.0.1:8000 --preset 64K --trajectories 8
--mode online --rate 0.5 --max-requests 200 --duration 60`` prints the report as JSON (TTFT, TPOT,
JCT summaries, hit ratio). ``--dry-run`` prints the trace's shape without sending anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import pydantic

from dualpath_engine.workload import replay, trace


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, generate, replay (or describe) and print JSON; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dualpath_engine.workload", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    parser.add_argument("--model", default="tiny", help="model name")
    parser.add_argument("--preset", default="64K", choices=sorted(trace.TABLE2), help="Table 2 row")
    parser.add_argument("--trajectories", type=int, default=8, help="trajectories to generate")
    parser.add_argument(
        "--token-scale", type=float, default=16.0, help="divides appends, generations, MaxLen"
    )
    parser.add_argument("--turn-scale", type=float, default=4.0, help="divides the number of turns")
    parser.add_argument("--max-len", type=int, default=None, help="override the scaled MaxLen")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace and the arrivals")
    parser.add_argument("--mode", default="offline", choices=["offline", "online"], help="arrival pattern")
    parser.add_argument("--rate", type=float, default=1.0, help="online: trajectories per second")
    parser.add_argument("--concurrency", type=int, default=None, help="offline: most trajectories at once")
    parser.add_argument("--max-requests", type=int, default=1000, help="request budget")
    parser.add_argument("--duration", type=float, default=300.0, help="no request starts after this (s)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="timeout per request (s)")
    parser.add_argument("--dry-run", action="store_true", help="describe the trace, send nothing")
    parser.add_argument("--results", action="store_true", help="include per-request results")
    args = parser.parse_args(argv)
    try:
        shape = trace.TraceShape(
            preset=args.preset,
            trajectories=args.trajectories,
            token_scale=args.token_scale,
            turn_scale=args.turn_scale,
            max_len=args.max_len,
            seed=args.seed,
        )
        cfg = replay.ReplayConfig(
            base_url=args.url,
            model=args.model,
            mode=args.mode,
            rate=args.rate,
            concurrency=args.concurrency,
            max_requests=args.max_requests,
            max_duration_s=args.duration,
            request_timeout_s=args.request_timeout,
            seed=args.seed,
        )
    except pydantic.ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trajectories = trace.generate(shape)
    if args.dry_run:
        turns = [len(t.turns) for t in trajectories]
        described = {
            "trajectories": len(trajectories),
            "requests": sum(turns),
            "mean_turns": sum(turns) / len(turns),
            "max_total_tokens": max(t.total_tokens for t in trajectories),
            "expected_hit_ratio_block64": trace.expected_hit_ratio(trajectories, 64),
        }
        print(json.dumps(described, indent=2))
        return 0
    report = asyncio.run(replay.replay(trajectories, cfg))
    print(json.dumps(report.to_dict(with_results=args.results), indent=2))
    return 0 if report.failed_requests == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
