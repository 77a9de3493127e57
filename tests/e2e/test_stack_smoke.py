"""Smoke test of :class:`tests.e2e.stack.LocalStack` (marker ``e2e``): the whole stack comes up with a
small DualPathCluster, real multi-turn completions through the scheduler's OpenAI API all succeed, the
KV cache is read over both paths (PE and DE reads, seen on the engines and through Prometheus, whose
file-based discovery found the engine pods), and stopping the stack leaves no process behind."""

from __future__ import annotations

import asyncio
import copy
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from dualpath_engine.workload import replay, trace
from tests.cluster import harness, processes
from tests.e2e import stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def small_cluster() -> dict[str, Any]:
    """The demo example at 1P:1D with split reads (every cache hit is read over both paths)."""
    body: dict[str, Any] = yaml.safe_load((stack.REPO / "examples" / "dualpathcluster-demo.yaml").read_text())
    body = copy.deepcopy(body)
    body["metadata"] = {"name": "smoke"}
    spec = body["spec"]
    spec["ratio"].update({"mode": "Fixed", "prefill": 1, "decode": 1})
    spec["scheduler"]["splitReads"] = True
    spec["storage"]["volume"]["hostPath"]["path"] = "/var/lib/dualpath/smoke"
    return body


def engine_kv_read_bytes(urls: list[str]) -> dict[str, float]:
    """``dualpath_engine_kv_read_bytes_total`` summed over engines, by path, from their /metrics."""
    out: dict[str, float] = {}
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("dualpath_engine_kv_read_bytes_total{"):
                path = line.split('path="', 1)[1].split('"', 1)[0]
                out[path] = out.get(path, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_stack_serves_completions_over_both_read_paths_and_stops_clean(tmp_path: Path) -> None:
    local = stack.LocalStack(tmp_path / "stack", nodes=3, namespace="smoke")
    started: list[int] = []
    try:
        local.start()
        assert local.kubeconfig.is_file()
        local.apply(small_cluster())
        url = local.wait_serving("smoke", timeout_s=240)
        engines = local.engine_urls("smoke")
        assert len(engines) == 2

        shape = trace.TraceShape(preset="64K", trajectories=3, token_scale=16, turn_scale=40, seed=3)
        trajectories = [t for t in trace.generate(shape) if len(t.turns) >= 2]
        assert trajectories, "the trace must have multi-turn trajectories (cache hits from turn 2 on)"
        cfg = replay.ReplayConfig(base_url=url, model="dualpath-tiny", max_requests=40, max_duration_s=90)
        report = asyncio.run(replay.replay(trajectories, cfg))
        assert report.requests >= 2 * len(trajectories)
        assert report.failed_requests == 0, report.errors
        assert report.cached_tokens > 0

        by_path = engine_kv_read_bytes(list(engines.values()))
        assert by_path.get("pe", 0) > 0 and by_path.get("de", 0) > 0, by_path

        def prometheus_sees_both_paths() -> bool:
            seen = {
                s["metric"]["path"]: float(s["value"][1])
                for s in local.query("sum by (path) (dualpath_engine_kv_read_bytes_total)")
            }
            return seen.get("pe", 0) > 0 and seen.get("de", 0) > 0

        harness.wait_for("Prometheus scraped KV reads on both paths", prometheus_sees_both_paths, 30)
        nodes_seen = {s["metric"]["node"] for s in local.query('up{job="node-exporter"} == 1')}
        assert nodes_seen == set(local.node_names)
        started = local.leftover_pids()
        assert len(started) >= 3 + 1 + 3 + 1  # engines+scheduler, operator, node_exporters, Prometheus
    finally:
        local.stop()
    assert local.leftover_pids() == []
    assert not [pid for pid in started if processes.pid_alive(pid)]
