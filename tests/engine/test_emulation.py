"""NIC emulation control and the KV memory gauge on real engine processes (1 scheduler, 1 PE, 2 DE on
loopback; the DEs emulate their NICs, the PE does not; every hit is read on the DE side).

- ``PUT /emulation/v1/nics/{device}`` changes a storage NIC's budget at run time: a KV read of known
  size then takes at least ``(bytes - burst) / budget`` and not much more, halving the budget about
  doubles the extra time, and ``dualpath_engine_nic_budget_bytes_per_second{nic}`` shows the new value.
- ``GET /emulation/v1/nics`` lists devices, kind, line rate, budget and byte counters; bad bodies are
  400 naming the field; an engine without emulation answers 404 saying emulation is off.
- ``dualpath_engine_kv_cache_used_ratio{role="decode"}`` is above 0 while a decode engine holds a
  request and back to 0 once it finished.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from dualpath_engine import config
from tests.engine import harness

pytestmark = pytest.mark.timeout(240)

STORAGE = "mlx5_s0"
START_BUDGET = 4 * 1024 * 1024.0
"""Configured storage-NIC budget of the DEs (its token bucket's burst is the 64 KiB minimum)."""
BURST = 64 * 1024
PROMPT_TOKENS = 1000
MAX_TOKENS = 4
MODEL = config.ModelConfig()
BYTES_PER_TOKEN = MODEL.kv_bytes_per_token
CAPACITY = config.KVConfig().host_buffer_bytes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Cluster]:
    network = {"emulate": True, "storage_nic": {"device": STORAGE, "budget_bytes_per_s": START_BUDGET}}
    with harness.cluster(
        tmp_path_factory.mktemp("emulation"), policy="de-only", decode_network=network
    ) as running:
        yield running


def _call(method: str, url: str, body: object = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def _set_budget(cluster: harness.Cluster, budget: float | None) -> None:
    for de in cluster.decodes:
        status, body = _call("PUT", f"{de.http}/emulation/v1/nics/{STORAGE}", {"budget_bytes_per_s": budget})
        assert status == 200, body


def _prompt(seed: int) -> list[int]:
    return [(seed * 31 + i * 7) % 256 for i in range(PROMPT_TOKENS)]


def _de_read_bytes(cluster: harness.Cluster) -> float:
    return sum(de.metric("dualpath_engine_kv_read_bytes_total", path="de") for de in cluster.decodes)


def _persisted(cluster: harness.Cluster) -> float:
    return sum(de.metric("dualpath_engine_kv_persisted_blocks_total") for de in cluster.decodes)


def _cached_run(cluster: harness.Cluster, prompt: list[int]) -> tuple[float, float]:
    """One request whose prompt is stored: ``(elapsed seconds, DE-read KV bytes)``."""
    before = _de_read_bytes(cluster)
    started = time.monotonic()
    result = cluster.complete(prompt, MAX_TOKENS, timeout=120)
    elapsed = time.monotonic() - started
    cached = result["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= PROMPT_TOKENS - 2 * harness.BLOCK_TOKENS, result["usage"]
    return elapsed, _de_read_bytes(cluster) - before


def _store(cluster: harness.Cluster, prompt: list[int]) -> None:
    """Run the prompt once and wait until its Full Blocks are persisted and a rerun hits them."""
    before = _persisted(cluster)
    cluster.complete(prompt, MAX_TOKENS, timeout=120)
    blocks = PROMPT_TOKENS // harness.BLOCK_TOKENS
    harness.wait_for("prompt blocks persisted", lambda: _persisted(cluster) - before >= blocks, 30)


def test_lower_storage_budget_slows_a_kv_read_in_proportion_and_shows_in_the_gauge(
    cluster: harness.Cluster,
) -> None:
    prompt = _prompt(1)
    _store(cluster, prompt)
    fast, nbytes = _cached_run(cluster, prompt)
    assert nbytes >= (PROMPT_TOKENS - 2 * harness.BLOCK_TOKENS) * BYTES_PER_TOKEN
    extra: dict[float, float] = {}
    try:
        for budget in (256 * 1024.0, 128 * 1024.0):
            _set_budget(cluster, budget)
            for de in cluster.decodes:
                assert de.metric("dualpath_engine_nic_budget_bytes_per_second", nic=STORAGE) == budget
            elapsed, read = _cached_run(cluster, prompt)
            assert read == nbytes  # the same KV read, only the budget changed
            # The token bucket cannot let more than its burst through early...
            assert elapsed >= (read - BURST) / budget
            # ...and the slowdown is the budget's, not something else's.
            assert elapsed <= fast + read / budget + 1.5
            extra[budget] = elapsed - fast
    finally:
        _set_budget(cluster, START_BUDGET)
    ratio = extra[128 * 1024.0] / extra[256 * 1024.0]
    assert 1.5 <= ratio <= 2.6, extra


def test_kv_cache_used_ratio_is_positive_while_a_request_runs_and_zero_after(
    cluster: harness.Cluster,
) -> None:
    prompt = _prompt(2)
    _store(cluster, prompt)
    for de in cluster.decodes:
        assert de.metric("dualpath_engine_kv_cache_used_ratio", role="decode") == 0.0
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = cluster.complete(prompt, MAX_TOKENS, timeout=120)
        except Exception as exc:  # reported by the main thread
            outcome["error"] = exc

    _set_budget(cluster, 256 * 1024.0)  # the DE-side read holds the request for about 1.7 s
    seen: list[float] = []

    def held() -> bool:
        seen[:] = [de.metric("dualpath_engine_kv_cache_used_ratio", role="decode") for de in cluster.decodes]
        return max(seen) > 0

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        harness.wait_for("a decode engine reporting KV in use", held, 30, interval=0.02)
        thread.join(120)
    finally:
        _set_budget(cluster, START_BUDGET)
    assert not thread.is_alive() and "error" not in outcome, outcome
    # The request's prompt (plus at most the tokens generated so far) over the KV capacity.
    low = PROMPT_TOKENS * BYTES_PER_TOKEN / CAPACITY
    high = (PROMPT_TOKENS + MAX_TOKENS) * BYTES_PER_TOKEN / CAPACITY
    assert low - 1e-12 <= max(seen) <= high + 1e-12, seen
    harness.wait_for(
        "KV in use back to 0",
        lambda: all(
            de.metric("dualpath_engine_kv_cache_used_ratio", role="decode") == 0.0 for de in cluster.decodes
        ),
        10,
    )


def test_emulation_api_lists_nics_validates_bodies_and_restores_line_rate(
    cluster: harness.Cluster,
) -> None:
    de = cluster.decodes[0]
    status, listing = _call("GET", f"{de.http}/emulation/v1/nics")
    assert status == 200
    by_device = {nic["device"]: nic for nic in listing["nics"]}
    assert set(by_device) == {STORAGE, "mlx5_0"}
    storage = by_device[STORAGE]
    assert (storage["kind"], storage["line_rate_bytes_per_s"]) == ("storage", 25e9)
    assert storage["budget_bytes_per_s"] == START_BUDGET
    assert storage["rx_bytes"] == de.nic_bytes("storage", "rx")
    assert by_device["mlx5_0"]["kind"] == "compute"

    url = f"{de.http}/emulation/v1/nics/{STORAGE}"
    for body, field in (
        ({"budget_bytes_per_s": -5}, "budget_bytes_per_s"),
        ({"budget_bytes_per_s": "fast"}, "budget_bytes_per_s"),
        ({"budget_bytes_per_s": True}, "budget_bytes_per_s"),
        ({}, "budget_bytes_per_s"),
        ({"budget_bytes_per_s": 1e6, "burst": 5}, "burst"),
    ):
        status, answer = _call("PUT", url, body)
        assert status == 400, (body, answer)
        assert answer["fields"] == [field] and field in answer["error"]
    status, answer = _call("PUT", url, raw=b"not json")
    assert status == 400 and "body" in answer["error"]
    status, answer = _call("PUT", f"{de.http}/emulation/v1/nics/mlx5_9", {"budget_bytes_per_s": 1e6})
    assert status == 404 and STORAGE in answer["error"]
    assert de.metric("dualpath_engine_nic_budget_bytes_per_second", nic=STORAGE) == START_BUDGET

    try:
        status, answer = _call("PUT", url, {"budget_bytes_per_s": None})
        assert status == 200 and answer["budget_bytes_per_s"] == 25e9  # null = line rate
        assert de.metric("dualpath_engine_nic_budget_bytes_per_second", nic=STORAGE) == 25e9
    finally:
        _set_budget(cluster, START_BUDGET)


def test_engine_without_emulation_answers_404_saying_so(cluster: harness.Cluster) -> None:
    pe = cluster.prefill
    for method, path, body in (
        ("GET", "/emulation/v1/nics", None),
        ("PUT", f"/emulation/v1/nics/{STORAGE}", {"budget_bytes_per_s": 1e6}),
    ):
        status, answer = _call(method, pe.http + path, body)
        assert status == 404
        assert "emulation is off" in answer["error"]
    assert pe.metric("dualpath_engine_nic_budget_bytes_per_second", nic=STORAGE) == 0.0
