"""The scheduler entry point runs as a real process on 127.0.0.1 and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def test_scheduler_process_serves_health_and_models_then_exits_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "scheduler.yaml"
    cfg.write_text("host: 127.0.0.1\nport: 0\nmodel:\n  name: tiny-proc\n", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualpath_engine.scheduler", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the scheduler prints its URL (or exits)
        assert line.startswith("listening on http://127.0.0.1:"), line + (
            proc.stderr.read() if proc.stderr else ""
        )
        url = line.split()[-1]
        with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
            assert json.load(resp)["status"] == "ok"
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"] == "tiny-proc"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_bad_config_exits_with_a_message_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "scheduler.yaml"
    cfg.write_text("z_factor: 0.5\n", encoding="utf-8")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dualpath_engine.scheduler", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "z_factor" in result.stderr
    assert time.monotonic() - started < 30
