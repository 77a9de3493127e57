"""Real-process harness for engine tests: one scheduler, one prefill engine and two decode engines on
loopback, free ports picked at run time (port 0, read back from each process's ready line), every
process stopped by PID. Used by ``tests/engine/test_*.py``; no Kubernetes involved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import yaml
from prometheus_client import parser

from tests.cluster import processes as procs

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BLOCK_TOKENS = 16


@dataclasses.dataclass
class Engine:
    """A running engine process and where it serves."""

    process: procs.ReadyProcess
    engine_id: str
    http: str
    ready: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The engine's ``ready {json}`` line."""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """All samples of the engine's /metrics, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(self.http + "/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in parser.text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample (0 when absent)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def nic_bytes(self, kind: str, direction: str) -> float:
        """Bytes counted on this engine's storage or compute NIC."""
        device = "mlx5_s0" if kind == "storage" else "mlx5_0"
        return self.metric("dualpath_engine_nic_bytes_total", direction=direction, kind=kind, nic=device)


@dataclasses.dataclass
class Cluster:
    """Scheduler + engines of one test."""

    workdir: pathlib.Path
    url: str
    scheduler: procs.ReadyProcess
    prefill: Engine
    decodes: list[Engine]

    @property
    def engines(self) -> list[Engine]:
        """All engines, PE first."""
        return [self.prefill, *self.decodes]

    def complete(self, prompt: list[int], max_tokens: int, timeout: float = 60.0) -> dict[str, Any]:
        """POST /v1/completions with token ids, greedy and exactly ``max_tokens`` tokens."""
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        request = urllib.request.Request(
            self.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{exc.code}: {exc.read().decode()[:500]}") from exc
        return result

    def store_files(self) -> list[pathlib.Path]:
        """Every stored Full Block object."""
        return sorted((self.workdir / "kv").rglob("*.kvb"))


def _kv(workdir: pathlib.Path) -> dict[str, Any]:
    return {
        "block_tokens": BLOCK_TOKENS,
        "storage_backend": "filesystem",
        "storage_path": str(workdir / "kv"),
        "fsync": False,
        "read_workers": 2,
    }


def _write(path: pathlib.Path, data: dict[str, Any]) -> pathlib.Path:
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def cluster(
    workdir: pathlib.Path,
    *,
    mode: str = "dualpath",
    policy: str = "dualpath",
    decode_network: dict[str, Any] | None = None,
    scheduler_extra: dict[str, Any] | None = None,
    engine_extra: dict[str, Any] | None = None,
) -> Iterator[Cluster]:
    """Start 1 scheduler, 1 PE (node-a) and 2 DEs (node-b, node-c); stop all by PID on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    processes: list[procs.ReadyProcess] = []
    try:
        sched_cfg = {
            "port": 0,
            "policy": policy,
            "engine_timeout_s": 2.0,
            "max_attempts": 5,
            "request_timeout_s": 90.0,
            "kv": _kv(workdir),
            **(scheduler_extra or {}),
        }
        scheduler = procs.ReadyProcess(
            "scheduler",
            [
                PYTHON,
                "-m",
                "dualpath_engine",
                "scheduler",
                "--config",
                str(_write(workdir / "sched.yaml", sched_cfg)),
            ],
            workdir / "scheduler.log",
            cwd=ROOT,
        )
        processes.append(scheduler)
        url = scheduler.wait_ready(60).split()[-1]
        specs = [
            ("prefill", "pe0", "node-a", 0),
            ("decode", "de0", "node-b", 0),
            ("decode", "de1", "node-c", 1),
        ]
        pending = []
        for role, name, node, group in specs:
            engine_cfg: dict[str, Any] = {
                "role": role,
                "engine_id": name,
                "group_id": group,
                "node_name": node,
                "port": 0,
                "scheduler_url": url,
                "mode": mode,
                "kv": _kv(workdir),
                "transport": {"port": 0, "connect_timeout_s": 2.0},
            }
            extra = dict(engine_extra or {})
            engine_cfg["transport"] = {**engine_cfg["transport"], **extra.pop("transport", {})}
            engine_cfg.update(extra)
            if role == "decode" and decode_network:
                engine_cfg["network"] = decode_network
            path = _write(workdir / f"{name}.yaml", engine_cfg)
            process = procs.ReadyProcess(
                name,
                [PYTHON, "-m", "dualpath_engine", "engine", "--config", str(path)],
                workdir / f"{name}.log",
                cwd=ROOT,
            )
            processes.append(process)
            pending.append((process, name))
        engines = []
        for process, name in pending:
            info = json.loads(process.wait_ready(90).removeprefix("ready "))
            engines.append(Engine(process, name, str(info["http"]), info))
        for engine in engines:
            wait_for(f"{engine.engine_id} healthy", lambda e=engine: _healthy(e), 30)
        yield Cluster(workdir, url, scheduler, engines[0], engines[1:])
    finally:
        for process in reversed(processes):
            process.stop()


def _healthy(engine: Engine) -> bool:
    try:
        with urllib.request.urlopen(engine.http + "/healthz", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_for(what: str, condition: Any, timeout: float, interval: float = 0.05) -> None:
    """Poll ``condition()`` until true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
