"""``python -m tests.e2e.demo [--duration SECONDS] [--nodes N]``: the whole system live on one machine
(``make demo``).

Starts a :class:`tests.e2e.stack.LocalStack` (control plane with fake 8-GPU RDMA nodes, Helm chart, the
operator as a local process with the chart's ServiceAccount, real engine processes, node_exporters and
Prometheus), applies ``examples/dualpathcluster-demo.yaml`` (Auto mode), sends an agentic workload
(trajectories shaped like the paper's Table 2, scaled down) through the scheduler's OpenAI API and
shows a live view every ~2 s: per-node storage/compute NIC throughput (Prometheus), the share of KV
read on each path, P:D, TTFT/TPOT, path weights and the operator's decisions with reasons. Midway it
degrades one node's storage NIC to 50 %, then turns the workload prefill-heavy, then decode-heavy. It
ends with a summary and stops everything it started (also on Ctrl-C or SIGTERM). Without a TTY it
prints a snapshot every ``--snapshot-every`` seconds instead of redrawing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from dualpath_engine.workload import replay, trace
from tests.e2e import stack

EXAMPLE = stack.REPO / "examples" / "dualpathcluster-demo.yaml"
MODEL = "dualpath-tiny"


@dataclass(frozen=True)
class Phase:
    """One stretch of the workload: its name, trace and how many trajectories run at once."""

    name: str
    start_frac: float
    trajectories: tuple[trace.Trajectory, ...]
    concurrency: int


def _reshape(trajs: list[trace.Trajectory], *, append: int | None, generate: int) -> list[trace.Trajectory]:
    """The same trajectories with each later turn's append cut to ``append`` tokens (None: as drawn)
    and every turn forced to ``generate`` tokens."""
    out = []
    for t in trajs:
        turns = tuple(
            trace.Turn(turn.append if append is None or i == 0 else turn.append[:append], generate)
            for i, turn in enumerate(t.turns)
        )
        out.append(trace.Trajectory(t.trajectory_id, turns))
    return out


def phases(seed: int = 0) -> list[Phase]:
    """Agentic (Table 2, 64K row, tokens / 16, turns / 8), prefill-heavy, decode-heavy."""
    agentic = trace.generate(
        trace.TraceShape(preset="64K", trajectories=48, token_scale=16, turn_scale=8, seed=seed, max_len=3500)
    )
    long_appends = trace.generate(
        trace.TraceShape(
            preset="64K", trajectories=48, token_scale=4, turn_scale=16, seed=seed + 1, max_len=3500
        )
    )
    short = trace.generate(
        trace.TraceShape(
            preset="64K", trajectories=48, token_scale=16, turn_scale=8, seed=seed + 2, max_len=3000
        )
    )
    return [
        Phase("agentic (Table 2 64K, scaled)", 0.0, tuple(agentic), 6),
        Phase(
            "prefill-heavy (long appends, 4 tokens out)",
            0.45,
            tuple(_reshape(long_appends, append=None, generate=4)),
            10,
        ),
        Phase(
            "decode-heavy (short appends, 64 tokens out)",
            0.7,
            tuple(_reshape(short, append=8, generate=64)),
            16,
        ),
    ]


@dataclass
class Workload:
    """Runs the phases back to back in a thread of its own (an asyncio loop); cancellable."""

    base_url: str
    phases: list[Phase]
    start: float
    duration_s: float
    reports: list[tuple[str, replay.Report]] = field(default_factory=list)
    current: str = "starting"
    error: str | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _task: asyncio.Task[None] | None = None
    _thread: threading.Thread | None = None

    def run_in_thread(self) -> None:
        self._thread = threading.Thread(target=self._main, name="workload", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._run())
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            self.current = "stopped"
        except Exception as exc:  # reported in the view and the summary, never a traceback
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            loop.close()

    async def _run(self) -> None:
        for i, phase in enumerate(self.phases):
            end_frac = self.phases[i + 1].start_frac if i + 1 < len(self.phases) else 1.0
            begin = self.start + phase.start_frac * self.duration_s
            end = self.start + end_frac * self.duration_s
            if time.monotonic() < begin:
                await asyncio.sleep(begin - time.monotonic())
            left = end - time.monotonic()
            if left <= 1:
                continue
            self.current = phase.name
            cfg = replay.ReplayConfig(
                base_url=self.base_url,
                model=MODEL,
                mode="offline",
                concurrency=phase.concurrency,
                max_requests=100_000,
                max_duration_s=left,
                request_timeout_s=90,
            )
            self.reports.append((phase.name, await replay.replay(phase.trajectories, cfg)))
        self.current = "done"

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel what runs (requests in flight are abandoned) and wait for the thread."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)


# ---- the live view ----------------------------------------------------------------------------------

SNIC = f'device="{stack.STORAGE_DEVICE}"'
CNIC = f'device="{stack.COMPUTE_DEVICE}"'
SCHED = "dualpath_scheduler_"
QUERIES = {
    "snic": f"sum by (node) (rate(node_infiniband_port_data_received_bytes_total{{{SNIC}}}[5s]))",
    "cnic": (
        f"sum by (node) (rate(node_infiniband_port_data_received_bytes_total{{{CNIC}}}[5s]))"
        f" + sum by (node) (rate(node_infiniband_port_data_transmitted_bytes_total{{{CNIC}}}[5s]))"
    ),
    "budget": f'max by (node) (dualpath_engine_nic_budget_bytes_per_second{{nic="{stack.STORAGE_DEVICE}"}})',
    "kv": "sum by (node, path) (rate(dualpath_engine_kv_read_bytes_total[10s]))",
    "kv_total": "dualpath_engine_kv_read_bytes_total",
    "ttft": f"histogram_quantile(0.9, sum by (le) (rate({SCHED}time_to_first_token_seconds_bucket[30s])))",
    "tpot": f"histogram_quantile(0.9, sum by (le) (rate({SCHED}time_per_output_token_seconds_bucket[30s])))",
    "requests": "sum by (result) (dualpath_scheduler_requests_total)",
}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:8.1f}"


def _short(text: str, width: int = 150) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def degrade(local: stack.LocalStack, name: str) -> str:
    """Halve the storage-NIC budget of the node that runs the (first) prefill engine; what was done."""
    spec = local.get(name)["spec"]
    budget = float(
        spec["network"]["emulation"].get("storageBudgetGbps") or spec["network"]["storageNic"]["gbps"]
    )
    engines = [p for p in local.pods(name) if p.component == "engine" and p.ready]
    prefill = [p for p in engines if p.role == "prefill"] or engines
    if not prefill:
        return "no ready engine to degrade a storage NIC under"
    node = prefill[0].node
    half = budget * 1e9 / 8 / 2
    try:
        pods = local.set_storage_budget(node, half)
    except stack.StackError as exc:
        return f"could not degrade {node}: {exc}"
    return (
        f"{node}: storage NIC degraded to 50% ({half / 1e6:.1f} MB/s) through the engines' NIC emulation API"
        f" ({', '.join(pods)})"
    )


class View:
    """Reads Prometheus and the DualPathCluster; renders frames and the summary; keeps the history."""

    def __init__(self, local: stack.LocalStack, name: str, *, tty: bool) -> None:
        self.local = local
        self.name = name
        self.tty = tty
        self.notes: list[str] = []
        self.ratios: list[tuple[float, str, str]] = []
        self.decisions: dict[str, tuple[str, str]] = {}
        self.kv_totals: dict[tuple[str, str], float] = {}
        self.weights: dict[str, list[float]] = {}
        self.elapsed = 0.0

    def note(self, text: str) -> None:
        self.notes.append(f"t={self.elapsed:5.0f}s  {text}")

    def _by(self, key: str, *labels: str) -> dict[tuple[str, ...], float]:
        out = {}
        for series in self.local.query(QUERIES[key]):
            value = float(series["value"][1])
            if value == value:  # not NaN (an empty histogram window)
                out[tuple(series["metric"].get(label, "") for label in labels)] = value
        return out

    def frame(self, elapsed: float, duration: float, phase: str) -> str:
        """One screen: header, per-node table, path shares, decision, events, notes."""
        self.elapsed = elapsed
        try:
            obj = self.local.get(self.name)
            events = self.local.events(self.name)
            roles = {p.node: p.role for p in self.local.pods(self.name) if p.component == "engine"}
        except Exception as exc:  # the API server may hiccup; show it and go on
            obj, events, roles = {}, [], {}
            self.note(f"status read failed: {exc}")
        status = obj.get("status") or {}
        slo = ((obj.get("spec") or {}).get("rebalance") or {}).get("slo") or {}
        ratio, desired = str(status.get("ratio", "-")), str(status.get("desiredRatio", "-"))
        if not self.ratios or self.ratios[-1][1:] != (ratio, desired):
            self.ratios.append((elapsed, ratio, desired))
        decision = status.get("lastDecision") or {}
        if decision.get("time"):
            self.decisions[str(decision["time"])] = (str(decision.get("action")), str(decision.get("reason")))
        for total in self.local.query(QUERIES["kv_total"]):
            key = (str(total["metric"].get("pod")), str(total["metric"].get("path")))
            self.kv_totals[key] = max(self.kv_totals.get(key, 0.0), float(total["value"][1]))
        snic, cnic, budget = self._by("snic", "node"), self._by("cnic", "node"), self._by("budget", "node")
        kv = self._by("kv", "node", "path")
        ttft, tpot = self._by("ttft"), self._by("tpot")
        requests = self._by("requests", "result")
        conds = {c["type"]: c for c in status.get("conditions") or []}
        weights = {w["node"]: w for w in status.get("pathWeights") or []}
        for node, w in weights.items():
            self.weights.setdefault(node, []).append(float(w["weight"]))
        other = sum(v for k, v in requests.items() if k != ("ok",))
        lines = [
            f"DualPath demo  t={elapsed:4.0f}s/{duration:.0f}s  phase: {phase}",
            f"P:D {ratio} (desired {desired})   "
            + "  ".join(
                f"{k}={conds[k]['status']}/{conds[k]['reason']}"
                for k in ("Ready", "Rebalancing", "TelemetryAvailable")
                if k in conds
            ),
            f"TTFT p90 {ttft.get((), 0.0):6.3f}s (SLO {slo.get('ttftMs', '-')} ms)   "
            f"TPOT p90 {tpot.get((), 0.0) * 1000:6.1f} ms (SLO {slo.get('tpotMs', '-')} ms)   "
            f"requests ok {requests.get(('ok',), 0):.0f}  other {other:.0f}",
            "",
            f"{'NODE':<12}{'ROLE':<9}{'SNIC rx':>9}{'budget':>9}{'CNIC':>9}{'KV PE':>9}{'KV DE':>9}"
            f"{'weight':>8}{'cap MB/s':>10}   (MB/s)",
        ]
        for node in self.local.node_names:
            w = weights.get(node)
            weight, cap = (f"{w['weight']:.3f}", _mb(w["snicCapacityBps"])) if w else ("-", "-")
            lines.append(
                f"{node:<12}{roles.get(node, '-'):<9}{_mb(snic.get((node,))):>9}{_mb(budget.get((node,))):>9}"
                f"{_mb(cnic.get((node,))):>9}{_mb(kv.get((node, 'pe'))):>9}{_mb(kv.get((node, 'de'))):>9}"
                f"{weight:>8}{cap:>10}"
            )
        pe = sum(v for (_, path), v in kv.items() if path == "pe")
        de = sum(v for (_, path), v in kv.items() if path == "de")
        share = (
            f"PE path {pe / (pe + de):4.0%} | DE path {de / (pe + de):4.0%}"
            if pe + de > 0
            else "no KV reads now"
        )
        lines += [
            "",
            f"KV read share (last 10s): {share}   total read: {self._kv_total() / 1e6:.0f} MB",
            f"last decision {decision.get('time', '-')[11:19]}: {decision.get('action', '-')}: "
            + _short(decision.get("reason", ""), 120),
            "events (newest last):",
            *[f"  {_short(str(e.get('reason')) + ': ' + str(e.get('message')), 140)}" for e in events[-5:]],
        ]
        if self.notes:
            lines += ["demo:", *[f"  {n}" for n in self.notes[-3:]]]
        return "\n".join(lines)

    def _kv_total(self, path: str | None = None) -> float:
        return sum(v for (_, p), v in self.kv_totals.items() if path is None or p == path)

    def summary(self, reports: list[tuple[str, replay.Report]], error: str | None, total_s: float) -> str:
        """Requests, errors, bytes per path, decisions, ratio and weight history."""
        lines = ["", "=" * 30 + " summary " + "=" * 30]
        for phase, r in reports:
            lines.append(
                f"{phase}: {r.requests} requests, {r.failed_requests} failed, {r.trajectories_completed}/"
                f"{r.trajectories_started} trajectories done, TTFT p90 {r.ttft_s.p90:.3f}s, "
                f"TPOT p90 {r.tpot_s.p90 * 1000:.1f} ms, cache hit {r.hit_ratio:.0%}"
            )
            lines += [f"  error: {_short(e)}" for e in r.errors[:3]]
        if error:
            lines.append(f"workload error: {error}")
        total = sum(r.requests for _, r in reports)
        failed = sum(r.failed_requests for _, r in reports)
        pe, de = self._kv_total("pe"), self._kv_total("de")
        lines += [
            f"requests: {total}, failed: {failed}",
            f"KV bytes read: PE path {pe / 1e6:.1f} MB, DE path {de / 1e6:.1f} MB",
            "ratio history (current/desired): "
            + " -> ".join(f"{r}/{d} (t={t:.0f}s)" for t, r, d in self.ratios),
            "path weights (first -> last): "
            + ", ".join(f"{n} {w[0]:.3f}->{w[-1]:.3f}" for n, w in sorted(self.weights.items())),
            f"operator decisions seen: {len(self.decisions)}; those that were not a plain Hold:",
        ]
        moves = [(t, a, r) for t, (a, r) in sorted(self.decisions.items()) if a != "Hold"]
        lines += [f"  {t[11:19]} {a}: {_short(r, 120)}" for t, a, r in moves[-12:]] or ["  (none)"]
        lines += [*(f"demo: {n}" for n in self.notes), f"wall time: {total_s:.0f}s"]
        return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(line: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {line}", flush=True)


def run(args: argparse.Namespace) -> int:
    """The demo; returns the exit status (0: every request succeeded)."""
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="dualpath-demo-"))
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    name = str(body["metadata"]["name"])
    body["spec"]["ratio"]["gpuBudget"] = 8 * args.nodes  # never plan more engine groups than there are nodes
    local = stack.LocalStack(run_dir, nodes=args.nodes, say=_say)
    workload: Workload | None = None
    view = View(local, name, tty=sys.stdout.isatty() and not args.plain)
    status = 1
    t0 = time.monotonic()
    try:
        _say(f"starting the local stack with {args.nodes} nodes (logs under {run_dir})")
        local.start()
        _say(f"applying {EXAMPLE.relative_to(stack.REPO)} (ratio.mode Auto, starting at 1P:2D)")
        local.apply(body)
        url = local.wait_serving(name, timeout_s=300)
        _say(f"DualPathCluster {name} Ready after {time.monotonic() - t0:.0f}s; scheduler at {url}")
        _say(f"in another terminal: KUBECONFIG={local.kubeconfig} kubectl get dpc -n {local.namespace} -w")
        start = time.monotonic()
        workload = Workload(url, phases(), start, args.duration)
        workload.current = workload.phases[0].name
        workload.run_in_thread()
        degraded_at = start + 0.25 * args.duration
        degraded = False
        last_snapshot = 0.0
        while time.monotonic() - start < args.duration:
            now = time.monotonic()
            if not degraded and now >= degraded_at:
                view.note(degrade(local, name))
                degraded = True
            frame = view.frame(now - start, args.duration, workload.current)
            if view.tty:
                print("\x1b[H\x1b[2J" + frame, flush=True)
            elif now - last_snapshot >= args.snapshot_every:
                print(frame + "\n", flush=True)
                last_snapshot = now
            time.sleep(args.refresh)
        _say("duration reached: letting requests in flight finish")
        deadline = time.monotonic() + 100
        while workload.current != "done" and workload.error is None and time.monotonic() < deadline:
            time.sleep(0.5)
        print(view.frame(time.monotonic() - start, args.duration, workload.current), flush=True)
        print(view.summary(workload.reports, workload.error, time.monotonic() - t0), flush=True)
        failed = sum(r.failed_requests for _, r in workload.reports)
        status = 0 if workload.error is None and failed == 0 and workload.reports else 1
        if args.hold:
            _say(
                f"holding the stack for your own DualPathClusters: KUBECONFIG={local.kubeconfig} "
                f"kubectl apply -n {local.namespace} -f <file>; Prometheus at {local.prometheus_url}; "
                "Ctrl-C stops everything"
            )
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", flush=True)
        status = 130
    except (stack.StackError, TimeoutError, RuntimeError) as exc:
        print(f"\ndemo failed: {exc}\nlogs under {run_dir}", flush=True)
        status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        if workload is not None:
            workload.stop()
        _say("stopping engines, operator, Prometheus, node_exporters and the control plane")
        try:
            local.stop()
            _say(f"all processes stopped ({time.monotonic() - t0:.0f}s in all)")
        except stack.StackError as exc:
            print(f"clean-up problem: {exc}", flush=True)
            status = status or 1
        if not args.run_dir and status == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of workload (default 240)")
    parser.add_argument("--nodes", type=int, default=4, help="fake 8-GPU nodes (default 4)")
    parser.add_argument("--refresh", type=float, default=2.0, help="seconds between view refreshes")
    parser.add_argument(
        "--snapshot-every", type=float, default=20.0, help="without a TTY: seconds per snapshot"
    )
    parser.add_argument("--plain", action="store_true", help="print snapshots even on a TTY")
    parser.add_argument(
        "--hold", action="store_true", help="after the summary, keep the stack up until Ctrl-C"
    )
    parser.add_argument("--run-dir", default="", help="keep state and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.duration < 30 or args.nodes < 3:
        parser.error("--duration must be at least 30 and --nodes at least 3")
    signal.signal(signal.SIGTERM, _interrupt)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
