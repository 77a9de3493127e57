"""A real telemetry stack on loopback for tests and demos: Debian ``prometheus-node-exporter`` processes
reading fake sysfs trees (written by ``dualpath_engine.transfer.sysfs.SysfsWriter``) and a Debian
``prometheus`` scraping them (and any engine ``/metrics``) every second.

- :func:`start_node_exporter` (``sysfs_root``, ``port``): one exporter with only the infiniband
  collector; returns a :class:`NodeExporter` once ``/metrics`` answers.
- :func:`start_prometheus` (``targets`` = ``[(url, labels)]``, ``run_dir``): one Prometheus with a 1 s
  scrape interval, one job per target (the URL's path becomes ``metrics_path``, ``labels`` become
  target labels, e.g. ``{"node": "gpu-node-0"}`` or ``{"pod": "pe-0", "node": ...}``); returns a
  :class:`Prometheus` once ``/-/ready`` answers.

Every process runs in its own session, binds 127.0.0.1 on a port picked at run time by the caller
(:func:`tests.cluster.processes.free_port`) and is stopped by PID (``.stop()``). Binaries come from
``.dev/bin`` (Debian packages extracted by the dev tool setup). Used by
``tests/integration/test_telemetry.py`` and the e2e tests and demo of issue 5.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster import processes

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".dev" / "bin"
PROMETHEUS = BIN / "prometheus"
NODE_EXPORTER = BIN / "prometheus-node-exporter"


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> None:
    """Poll ``predicate`` until it holds; raise ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g}s")
        time.sleep(interval_s)


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def _require(binary: Path) -> str:
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} missing: install the dev tools (Debian packages into .dev/bin)")
    return str(binary)


@dataclass
class NodeExporter:
    """A running node_exporter: its ``/metrics`` URL and process."""

    url: str
    sysfs_root: Path
    process: processes.Managed

    def stop(self) -> None:
        """Stop it by PID (its process group)."""
        self.process.stop(grace_s=5)

    def infiniband_ok(self) -> bool:
        """Whether the last scrape's infiniband collector succeeded (it fails silently on a bad tree)."""
        status, body = http_get(self.url)
        return status == 200 and 'node_scrape_collector_success{collector="infiniband"} 1' in body


def start_node_exporter(sysfs_root: Path, port: int, log_dir: Path | None = None) -> NodeExporter:
    """One exporter reading ``sysfs_root`` (the directory holding ``class/infiniband``)."""
    log_dir = log_dir or sysfs_root.parent
    procfs = log_dir / f"proc-{port}"
    procfs.mkdir(parents=True, exist_ok=True)
    process = processes.start(
        f"node-exporter-{port}",
        [
            _require(NODE_EXPORTER),
            f"--path.sysfs={sysfs_root}",
            f"--path.procfs={procfs}",
            "--collector.disable-defaults",
            "--collector.infiniband",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log_dir,
    )
    exporter = NodeExporter(url=f"http://127.0.0.1:{port}/metrics", sysfs_root=sysfs_root, process=process)
    try:
        wait_until(f"node_exporter on {port}", lambda: _answers(exporter.url, process), 30)
    except BaseException:
        exporter.stop()
        raise
    return exporter


@dataclass
class Prometheus:
    """A running Prometheus: base URL, config file and process."""

    url: str
    config: Path
    process: processes.Managed

    def stop(self) -> None:
        """Stop it by PID (its process group)."""
        self.process.stop(grace_s=10)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query result (``data.result``); raises ``RuntimeError`` on an error answer."""
        status, body = http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        answer = json.loads(body) if body else {}
        if status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: HTTP {status} {body[:300]}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def targets_up(self) -> bool:
        """Whether every configured target's last scrape succeeded."""
        status, body = http_get(f"{self.url}/api/v1/targets?state=active")
        if status != 200:
            return False
        active = json.loads(body)["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


def prometheus_config(
    targets: Sequence[tuple[str, Mapping[str, str]]], scrape_interval_s: float = 1.0
) -> str:
    """``prometheus.yml`` (JSON is YAML) with one job per target."""
    jobs = []
    for i, (url, labels) in enumerate(targets):
        parsed = urllib.parse.urlsplit(url)
        jobs.append(
            {
                "job_name": f"target-{i}",
                "scheme": parsed.scheme or "http",
                "metrics_path": parsed.path or "/metrics",
                "static_configs": [{"targets": [parsed.netloc], "labels": dict(labels)}],
            }
        )
    interval = f"{round(scrape_interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2)


def start_prometheus(
    targets: Sequence[tuple[str, Mapping[str, str]]],
    run_dir: Path,
    port: int | None = None,
    scrape_interval_s: float = 1.0,
) -> Prometheus:
    """Prometheus scraping ``targets`` every ``scrape_interval_s``; data and log under ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = port or processes.free_port()
    config = run_dir / "prometheus.yml"
    config.write_text(prometheus_config(targets, scrape_interval_s))
    process = processes.start(
        f"prometheus-{port}",
        [
            _require(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={run_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        run_dir,
    )
    prom = Prometheus(url=f"http://127.0.0.1:{port}", config=config, process=process)
    try:
        wait_until(f"prometheus on {port}", lambda: _answers(f"{prom.url}/-/ready", process), 60)
    except BaseException:
        prom.stop()
        raise
    return prom


def _answers(url: str, process: processes.Managed) -> bool:
    if not process.alive():
        raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
    return http_get(url)[0] == 200
