"""Engine processes for the replays: one scheduler and PnD engines on loopback, one emulated node (own
storage NIC) per engine, free ports picked at run time (port 0, read back from each ready line), every
process stopped by PID. On GPUs each engine gets a device (``local_rank``): prefill engines on the first
share of the GPUs, decode engines on the rest.

Used by :mod:`bench.engine.replay`; the process handling is ``tests.cluster.processes.ReadyProcess``,
shared with ``tests/engine/harness.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from prometheus_client import parser

from bench.engine import settings
from dualpath_engine import tokenizer
from dualpath_engine.engine import prefill
from tests.cluster import processes as procs

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_NAME = "bench"
POLICY = {
    "basic": "pe-only",
    "dualpath": "dualpath",
    "dualpath-paper": "dualpath",
    "dualpath-split": "dualpath",
    "oracle": "dualpath",
}
"""Scheduler read-side policy of each benchmark mode."""
ENGINE_MODE = {
    "basic": "basic",
    "dualpath": "dualpath",
    "dualpath-paper": "dualpath",
    "dualpath-split": "dualpath",
    "oracle": "oracle",
}
"""The engines' ``mode`` of each benchmark mode."""
TIE_BREAK = {"dualpath": "least_read", "dualpath-paper": "prefill", "dualpath-split": "least_read"}
"""Read-side tie-break of the DualPath modes: ``dualpath`` is the product's setting (ties go to the
node that has read less), ``dualpath-paper`` the paper's rule as written (ties go to the prefill side)."""
SPLIT_READS = frozenset({"dualpath-split"})
"""Modes with the scheduler's ``split_reads`` extension: a request's hit blocks are divided between the
PE side and the DE side so both reads finish together (beyond the paper, which picks one side)."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """A running engine."""

    name: str
    role: str
    node: str
    device: str
    http: str
    process: procs.ReadyProcess


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Scheduler URL and engines of one run."""

    url: str
    engines: tuple[Engine, ...]
    workdir: pathlib.Path


def placement(topology: settings.Topology) -> list[tuple[str, str, int | None]]:
    """``(role, name, gpu or None)`` of each engine, prefill first."""
    engines = topology.prefill + topology.decode
    out: list[tuple[str, str, int | None]] = []
    gpus = topology.gpus
    pe_gpus = max(1, gpus * topology.prefill // engines) if gpus else 0
    de_gpus = gpus - pe_gpus
    for index in range(topology.prefill):
        out.append(("prefill", f"pe{index}", index % pe_gpus if gpus else None))
    for index in range(topology.decode):
        gpu = (pe_gpus + index % de_gpus if de_gpus else index % gpus) if gpus else None
        out.append(("decode", f"de{index}", gpu))
    return out


def model_config(cfg: settings.ReplaySettings) -> dict[str, Any]:
    """The engines' and scheduler's ``model`` section."""
    return {
        "name": MODEL_NAME,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_size * 2,
        "dtype": cfg.dtype,
        # The tokenizer's vocabulary (263 ids); the engine default 264 lets a random model emit id 263,
        # which the scheduler then rejects in the next turn's prompt (reported as an engine bug).
        "vocab_size": tokenizer.VOCAB_SIZE,
        "max_context_tokens": cfg.max_context_tokens,
    }


def _write(path: pathlib.Path, data: Mapping[str, Any]) -> str:
    path.write_text(yaml.safe_dump(dict(data)))
    return str(path)


def _engine_config(
    cfg: settings.ReplaySettings,
    topology: settings.Topology,
    mode: str,
    role: str,
    name: str,
    gpu: int | None,
    url: str,
    kv: Mapping[str, Any],
) -> dict[str, Any]:
    ranks = max(1, topology.gpus)
    budget = cfg.compute_budget_bytes_per_s
    return {
        "role": role,
        "engine_id": name,
        "group_id": int(name[2:]),
        "node_name": f"node-{name}",
        "port": 0,
        "scheduler_url": url,
        "mode": ENGINE_MODE[mode],
        "device": "cuda" if gpu is not None else "cpu",
        "local_rank": gpu or 0,
        "model": model_config(cfg),
        "kv": dict(kv),
        "network": {
            "storage_nic": {"device": "mlx5_s0", "budget_bytes_per_s": cfg.storage_budget_bytes_per_s},
            "compute_nics": [{"device": f"mlx5_{i}", "budget_bytes_per_s": budget} for i in range(ranks)],
            "emulate": True,
        },
        "transport": {"kind": topology.transport, "port": 0, "connect_timeout_s": 5.0},
    }


@contextlib.contextmanager
def cluster(
    workdir: pathlib.Path, cfg: settings.ReplaySettings, topology: settings.Topology, mode: str
) -> Iterator[Cluster]:
    """Start the scheduler and engines of ``topology`` in ``mode``; stop all by PID on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    kv = {
        "block_tokens": cfg.block_tokens,
        "storage_backend": "filesystem",
        "storage_path": str(workdir / "kv"),
        "fsync": False,
        "read_workers": 4,
    }
    processes: list[procs.ReadyProcess] = []
    try:
        sched = {
            "port": 0,
            "policy": POLICY[mode],
            "engine_timeout_s": 10.0,
            "request_timeout_s": cfg.time_limit_s,
            "model": model_config(cfg),
            "kv": kv,
        }
        if mode in TIE_BREAK:
            sched["read_side_tie_break"] = TIE_BREAK[mode]
        if mode in SPLIT_READS:
            sched["split_reads"] = True
        command = [sys.executable, "-m", "dualpath_engine"]
        scheduler = procs.ReadyProcess(
            "scheduler",
            [
                *command,
                "scheduler",
                "--config",
                _write(workdir / "sched.yaml", sched),
                "--log-level",
                "WARNING",
            ],
            workdir / "scheduler.log",
            cwd=ROOT,
        )
        processes.append(scheduler)
        url = scheduler.wait_ready(60).split()[-1]
        pending = []
        for role, name, gpu in placement(topology):
            data = _engine_config(cfg, topology, mode, role, name, gpu, url, kv)
            path = _write(workdir / f"{name}.yaml", data)
            process = procs.ReadyProcess(
                name,
                [*command, "engine", "--config", path, "--log-level", "WARNING"],
                workdir / f"{name}.log",
                cwd=ROOT,
            )
            processes.append(process)
            pending.append((process, role, name, data))
        engines = []
        for process, role, name, data in pending:
            info = json.loads(process.wait_ready(180).removeprefix("ready "))
            device = f"cuda:{data['local_rank']}" if data["device"] == "cuda" else "cpu"
            engines.append(Engine(name, role, data["node_name"], device, str(info["http"]), process))
        for engine in engines:
            _wait(f"{engine.name} healthy", lambda e=engine: _healthy(e.http), 60)
        yield Cluster(url, tuple(engines), workdir)
    finally:
        for process in reversed(processes):
            process.stop()


def _healthy(http: str) -> bool:
    try:
        with urllib.request.urlopen(http + "/healthz", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(what: str, condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


NIC_KEYS = ("storage_rx", "storage_tx", "compute_rx", "compute_tx")
"""Bytes counted by an engine's NICs, by NIC kind and direction."""
DECODE_KEYS = ("steps", "compute", "queue", "host")
"""Decode steps run and their seconds by part (``dualpath_engine_decode_step_seconds_total``)."""
PREFILL_KEYS = ("tasks", *(f"task_{part}" for part in prefill.TASK_PARTS))
"""Prefill tasks completed and their seconds by part (``dualpath_engine_prefill_task_seconds_total``)."""
BATCH_SERIES = {
    "dualpath_engine_decode_batch_steps_total": "steps",
    "dualpath_engine_decode_batch_tokens_total": "tokens",
    "dualpath_engine_decode_batch_step_seconds_total": "seconds",
}
"""Decode-by-batch-size counters, keyed ``batch:<bucket>:<what>`` in :func:`counters`."""


async def counters(engine: Engine) -> dict[str, float]:
    """One scrape of the engine's ``/metrics``: the :data:`NIC_KEYS` bytes, :data:`DECODE_KEYS`,
    :data:`PREFILL_KEYS` and, per decode batch-size bucket seen, ``batch:<bucket>:steps|tokens|seconds``."""
    text = await asyncio.to_thread(_fetch, engine.http + "/metrics")
    out = dict.fromkeys((*NIC_KEYS, *DECODE_KEYS, *PREFILL_KEYS), 0.0)
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "dualpath_engine_nic_bytes_total":
                out[f"{labels['kind']}_{labels['direction']}"] += sample.value
            elif name == "dualpath_engine_decode_step_seconds_total":
                out[labels["part"]] += sample.value
            elif name == "dualpath_engine_steps_total" and labels.get("role") == "decode":
                out["steps"] += sample.value
            elif name == "dualpath_engine_prefill_tasks_total":
                out["tasks"] += sample.value
            elif name == "dualpath_engine_prefill_task_seconds_total":
                out[f"task_{labels['part']}"] += sample.value
            elif name in BATCH_SERIES:
                key = f"batch:{labels['batch']}:{BATCH_SERIES[name]}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
