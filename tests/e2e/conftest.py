"""Fixtures of the e2e suite: one :class:`tests.e2e.stack.LocalStack` per module (control plane, chart,
operator with the chart's RBAC, real engine processes, node_exporters, Prometheus), clusters built from
``examples/dualpathcluster-demo.yaml``, and a client that sends real traffic through the scheduler's
OpenAI-compatible API and remembers every answer."""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import harness
from tests.e2e import stack as stack_mod

EXAMPLE = harness.REPO_ROOT / "examples" / "dualpathcluster-demo.yaml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_mod.LocalStack]:
    run_dir = tmp_path_factory.mktemp("e2e")
    with stack_mod.LocalStack(run_dir, nodes=4, namespace=f"e2e-{uuid.uuid4().hex[:6]}") as s:
        yield s
    leftover = s.leftover_pids()
    assert not leftover, f"processes left behind: {leftover}"


def cluster_body(name: str, mutate: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The demo example, renamed, with the given changes to its spec."""
    body: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["metadata"] = {"name": name}
    if mutate is not None:
        mutate(body["spec"])
    return body


def wait_ready(s: stack_mod.LocalStack, name: str, ratio: str, timeout_s: float = 240) -> dict[str, Any]:
    def ready(st: dict[str, Any]) -> bool:
        c = stack_mod.condition(st, "Ready")
        return c is not None and c["status"] == "True" and st.get("ratio") == ratio

    st = s.wait_status(name, ready, f"{name} Ready at {ratio}", timeout_s)
    s.wait_serving(name, timeout_s)  # kwok marks pods Ready before the runner's processes serve
    return st


def delete_and_wait(s: stack_mod.LocalStack, name: str) -> None:
    s.delete(name)
    harness.wait_for(f"{name}'s processes stopped", lambda: not s.pods(name), 120)


def post(url: str, body: dict[str, Any], timeout_s: float = 60) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), {"error": exc.read().decode(errors="replace")[:500]}
    except (urllib.error.URLError, OSError) as exc:
        return 0, {"error": repr(exc)}


class Traffic:
    """Multi-turn greedy sessions against the scheduler in a background thread.

    Each session keeps a growing context (so later turns hit KV persisted by earlier ones) and replays a
    fixed script, so the same turn must always produce the same text: ``answers`` keeps the first
    answer per (session, turn) and ``mismatches`` any later answer that differs.
    """

    def __init__(self, s: stack_mod.LocalStack, cluster: str, sessions: int = 3, turns: int = 4) -> None:
        self.s, self.cluster, self.sessions, self.turns = s, cluster, sessions, turns
        self.ok = 0
        self.failures: list[str] = []
        self.answers: dict[tuple[int, int], str] = {}
        self.mismatches: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            for session in range(self.sessions):
                context = f"session {session}: " + " ".join(f"fact-{session}-{i}" for i in range(120))
                for turn in range(self.turns):
                    if self._stop.is_set():
                        return
                    context += f"\nturn {turn}: please continue the analysis of step {turn}."
                    self._one(session, turn, context)
            rounds += 1

    def _one(self, session: int, turn: int, prompt: str) -> None:
        url = self.s.scheduler_url(self.cluster)
        if url is None:
            # Before the first answer the runner may not have seen the scheduler's probe pass yet; after
            # it, a scheduler that disappears is a failure the test must see.
            if self.ok:
                self.failures.append(f"no ready scheduler for ({session}, {turn})")
            time.sleep(0.5)
            return
        status, body = post(f"{url}/v1/completions", {"model": "dualpath-tiny", "prompt": prompt,
                                                      "max_tokens": 8, "temperature": 0})  # fmt: skip
        if status != 200:
            self.failures.append(f"({session}, {turn}): HTTP {status} {body.get('error', '')[:200]}")
            return
        self.ok += 1
        text = body["choices"][0]["text"]
        first = self.answers.setdefault((session, turn), text)
        if first != text:
            self.mismatches.append(f"({session}, {turn}): {first!r} then {text!r}")


def engine_kv_bytes(s: stack_mod.LocalStack, cluster: str) -> dict[str, float]:
    """KV bytes read from storage per path ({"pe": ..., "de": ...}), summed over the engines."""
    out = {"pe": 0.0, "de": 0.0}
    for url in s.engine_urls(cluster).values():
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError):
            continue
        for line in text.splitlines():
            if line.startswith("dualpath_engine_kv_read_bytes_total{"):
                for path, key in (('path="pe', "pe"), ('path="de', "de")):
                    if path in line:
                        out[key] += float(line.rsplit(" ", 1)[1])
    return out


def weights_of(st: dict[str, Any]) -> dict[str, float]:
    return {w["node"]: float(w["weight"]) for w in st.get("pathWeights") or []}


def pe_node(s: stack_mod.LocalStack, cluster: str) -> str:
    nodes = [p.node for p in s.pods(cluster) if p.component == "engine" and p.role == "prefill"]
    assert len(nodes) == 1, nodes
    return nodes[0]


def de_nodes(s: stack_mod.LocalStack, cluster: str) -> list[str]:
    return sorted(p.node for p in s.pods(cluster) if p.component == "engine" and p.role == "decode")


def write_log(path: Path, s: stack_mod.LocalStack, name: str) -> None:
    path.write_text(
        json.dumps({"status": s.get(name).get("status"), "events": s.events(name)}, indent=2, default=str)
    )
