"""Child processes of the harness: started in their own session, logged to a file, stopped by PID.

Never stops anything by name: only PIDs this module started (and recorded) are signalled. Each child
leads its own process group (``start_new_session=True``), so stopping it also stops anything it forked,
without touching processes the harness did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Managed:
    """One started child process: its name, PID and log file."""

    name: str
    pid: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group this child leads, wait up to ``grace_s``, then SIGKILL it."""
        if not self.alive():
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self._reap()
            if not self.alive():
                break
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.alive() and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=0)


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Managed:
    """Start ``argv`` in a new session with stdout/stderr appended to ``log_dir/<name>.log``."""
    log = log_dir / f"{name}.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    return Managed(name=name, pid=popen.pid, log=log, popen=popen)


class ReadyProcess:
    """A child process whose combined output goes to a log file and whose first ``ready ...`` or
    ``listening on ...`` line (what the engine and scheduler print once bound) is kept.

    Used by the engine test harness (``tests/engine/harness.py``) and the engine benchmarks
    (``bench/engine/cluster.py``); stopped by PID only.
    """

    def __init__(
        self, name: str, args: Sequence[str], log: Path, *, cwd: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        self.ready_line: str | None = None
        self._ready = threading.Event()
        self.popen = subprocess.Popen(
            list(args),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        stream = self.popen.stdout
        if stream is None:
            raise RuntimeError(f"{self.name}: no stdout pipe")
        with self.log.open("w") as out:
            for line in stream:
                out.write(line)
                out.flush()
                if self.ready_line is None and line.startswith(("ready ", "listening on ")):
                    self.ready_line = line.strip()
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> str:
        """The ready line; RuntimeError with the log tail if the process exits or times out first."""
        if not self._ready.wait(timeout) or self.ready_line is None:
            raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.tail()}")
        return self.ready_line

    def tail(self, lines: int = 40) -> str:
        """Last lines of the log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """SIGKILL now (a crash)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; by PID only."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
