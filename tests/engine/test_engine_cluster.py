"""Correctness of the engines as real processes on loopback (1 scheduler, 1 PE, 2 DE), no Kubernetes.

Multi-turn sessions must generate exactly the tokens of a no-cache full recompute in every mode
(``basic``, ``dualpath`` with the PE read path forced, with the DE read path forced, ``oracle``), and the
KV bytes must travel on the NICs of the chosen path; a corrupted stored block is detected and
recomputed with identical output; a decode engine killed mid-transfer does not lose the request.
"""

from __future__ import annotations

import json
import pathlib
import threading
import urllib.request
from typing import Any

import pytest

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.model import llama, loader
from tests.engine import harness

pytestmark = pytest.mark.timeout(180)

TURN_TOKENS = 12
SESSIONS = (
    "You are a helpful agent. Read the repository and fix the failing test, please.",
    "Summarise the following log output and list every error that you can find in it.",
)


@pytest.fixture(scope="module")
def reference_model() -> llama.Decoder:
    return loader.build(config.ModelConfig())


def _run_sessions(cluster: harness.Cluster, model: llama.Decoder) -> list[int]:
    """Three turns of each session; every answer must equal full recompute. Returns cached tokens per turn."""
    cached = []
    histories = [tok.encode(text, bos=True) for text in SESSIONS]
    for turn in range(3):
        for index, history in enumerate(histories):
            result = cluster.complete(history, TURN_TOKENS)
            generated = result["choices"][0]["token_ids"]
            expected = llama.greedy_reference(model, history, TURN_TOKENS)
            assert generated == expected, f"session {index} turn {turn}"
            cached.append(result["usage"]["prompt_tokens_details"]["cached_tokens"])
            histories[index] = [*history, *generated, *tok.encode(f" Next step {turn}: go on.")]
    return cached


def _storage_rx(engines: list[harness.Engine]) -> float:
    return sum(engine.nic_bytes("storage", "rx") for engine in engines)


@pytest.mark.parametrize(
    ("mode", "policy"),
    [("basic", "pe-only"), ("dualpath", "pe-only"), ("dualpath", "de-only"), ("oracle", "dualpath")],
    ids=["basic", "dualpath-pe-path", "dualpath-de-path", "oracle"],
)
def test_multi_turn_tokens_identical_to_recompute_and_bytes_on_the_right_nics(
    tmp_path: pathlib.Path, reference_model: llama.Decoder, mode: str, policy: str
) -> None:
    with harness.cluster(tmp_path, mode=mode, policy=policy) as cluster:
        cached = _run_sessions(cluster, reference_model)
        assert all(c == 0 for c in cached[:2]) and all(c > 0 for c in cached[2:]), cached
        pe, des = cluster.prefill, cluster.decodes
        assert cluster.store_files(), "decode engines persisted no Full Blocks"
        if mode == "oracle":
            assert _storage_rx(cluster.engines) == 0  # all I/O bypassed: no NIC sees a read
        elif policy == "de-only":
            assert _storage_rx(des) > 0 and pe.nic_bytes("storage", "rx") == 0
            assert sum(de.nic_bytes("compute", "tx") for de in des) > 0  # DE buffer -> PE over the CNIC
            assert pe.nic_bytes("compute", "rx") > 0
            assert sum(de.metric("dualpath_engine_kv_read_bytes_total", path="de") for de in des) > 0
            assert pe.metric("dualpath_engine_kv_read_bytes_total", path="pe") == 0
        else:
            assert pe.nic_bytes("storage", "rx") > 0 and _storage_rx(des) == 0
            assert pe.nic_bytes("compute", "tx") > 0
            assert sum(de.nic_bytes("compute", "rx") for de in des) > 0


def test_corrupted_block_is_detected_and_recomputed_with_identical_output(
    tmp_path: pathlib.Path, reference_model: llama.Decoder
) -> None:
    with harness.cluster(tmp_path, policy="pe-only") as cluster:
        history = tok.encode(SESSIONS[0], bos=True)
        first = cluster.complete(history, TURN_TOKENS)["choices"][0]["token_ids"]
        files = cluster.store_files()
        assert files
        for path in files:  # flip one payload byte of every stored block
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
        history = [*history, *first, *tok.encode(" and again")]
        result = cluster.complete(history, TURN_TOKENS)
        assert result["choices"][0]["token_ids"] == llama.greedy_reference(
            reference_model, history, TURN_TOKENS
        )
        corrupt = cluster.prefill.metric("dualpath_engine_kv_invalid_blocks_total", reason="corrupt")
        assert corrupt >= 1
        assert cluster.prefill.metric("dualpath_engine_kv_block_reads_total", result="hit") == 0


def test_decode_engine_killed_mid_transfer_does_not_lose_the_request(
    tmp_path: pathlib.Path, reference_model: llama.Decoder
) -> None:
    # Decode engines receive at 100 kB/s, so a 1,000-token prompt's KV (512 KB) takes about 5 s to arrive.
    slow = {
        "emulate": True,
        "storage_nic": {"device": "mlx5_s0"},
        "compute_nics": [{"device": "mlx5_0", "budget_bytes_per_s": 100_000}],
    }
    with harness.cluster(tmp_path, decode_network=slow) as cluster:
        prompt = tok.encode(("the quick brown fox jumps over the lazy dog " * 23)[:999], bos=True)
        outcome: dict[str, Any] = {}

        def request() -> None:
            try:
                outcome["result"] = cluster.complete(prompt, TURN_TOKENS, timeout=120)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=request)
        thread.start()

        def receiving() -> harness.Engine | None:
            for de in cluster.decodes:
                if de.nic_bytes("compute", "rx") > 0 and de.metric(
                    "dualpath_engine_running_requests", role="decode"
                ):
                    return de
            return None

        harness.wait_for("a decode engine receiving prompt KV", lambda: receiving() is not None, 30)
        victim = receiving()
        assert victim is not None
        victim.process.kill()
        thread.join(150)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        generated = outcome["result"]["choices"][0]["token_ids"]
        assert generated == llama.greedy_reference(reference_model, prompt, TURN_TOKENS)
        survivor = next(de for de in cluster.decodes if de is not victim)
        assert survivor.metric("dualpath_engine_steps_total", role="decode") > 0


def test_engine_health_and_metrics_endpoints(tmp_path: pathlib.Path) -> None:
    with harness.cluster(tmp_path) as cluster:
        for engine in cluster.engines:
            with urllib.request.urlopen(engine.http + "/healthz", timeout=5) as response:
                body = json.load(response)
            assert body["engine"] == engine.engine_id and body["scheduler"] is True
            samples = engine.metrics()
            names = {name for name, _ in samples}
            assert "dualpath_engine_nic_bytes_total" in names
            assert "dualpath_engine_storage_read_queue_tokens" in names
            assert "dualpath_engine_transport_info" in names
            assert "dualpath_engine_kv_read_bytes_total" in names


def test_role_switch_in_place_keeps_serving_identical_tokens(
    tmp_path: pathlib.Path, reference_model: llama.Decoder
) -> None:
    token = tmp_path / "admin-token"
    token.write_text("s3cret\n")
    with harness.cluster(tmp_path, scheduler_extra={"admin_token_file": str(token)}) as cluster:
        pe, _, de1 = cluster.engines
        for group, role in (("decode-1", "prefill"), ("prefill-0", "decode")):
            request = urllib.request.Request(
                cluster.url + "/admin/v1/role",
                json.dumps({"group_id": group, "role": role}).encode(),
                {"Content-Type": "application/json", "Authorization": "Bearer s3cret"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status in (200, 202)

        def role_of(engine: harness.Engine) -> str:
            with urllib.request.urlopen(engine.http + "/healthz", timeout=5) as response:
                return str(json.load(response)["role"])

        harness.wait_for(
            "both groups switched", lambda: (role_of(de1), role_of(pe)) == ("prefill", "decode"), 30
        )
        history = tok.encode(SESSIONS[1], bos=True)
        for turn in range(2):
            generated = cluster.complete(history, TURN_TOKENS)["choices"][0]["token_ids"]
            assert generated == llama.greedy_reference(reference_model, history, TURN_TOKENS), f"turn {turn}"
            history = [*history, *generated, *tok.encode(" more")]
        assert de1.metric("dualpath_engine_steps_total", role="prefill") >= 2  # the old DE now prefills
        assert pe.metric("dualpath_engine_steps_total", role="prefill") == 0


@pytest.mark.parametrize("decode_attention", ["per_sequence", "paged"])
def test_concurrent_sessions_batch_together_and_each_matches_recompute(
    tmp_path: pathlib.Path, reference_model: llama.Decoder, decode_attention: str
) -> None:
    """Concurrent sessions share decode steps and each gets the recompute tokens, with either decode KV
    store (``runner.decode_attention``; paged on the CPU runs the padded bucket steps without graphs)."""
    texts = [f"Session {i}: " + "please keep working on the task at hand. " * (1 + i % 3) for i in range(6)]
    extra = {"runner": {"decode_attention": decode_attention}}
    with harness.cluster(tmp_path, engine_extra=extra) as cluster:
        assert {de.ready["decode_kv"] for de in cluster.decodes} == {decode_attention}
        histories = [tok.encode(text, bos=True) for text in texts]
        for turn in range(2):
            results: dict[int, list[int]] = {}
            errors: list[BaseException] = []

            def run(
                index: int, prompt: list[int], results: dict[int, list[int]], errors: list[BaseException]
            ) -> None:
                try:
                    results[index] = cluster.complete(prompt, TURN_TOKENS)["choices"][0]["token_ids"]
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=run, args=(i, h, results, errors)) for i, h in enumerate(histories)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not errors, errors
            for index, history in enumerate(histories):
                expected = llama.greedy_reference(reference_model, history, TURN_TOKENS)
                assert results[index] == expected, f"session {index} turn {turn}"
                histories[index] = [*history, *results[index], *tok.encode(" ok")]
        decode_steps = sum(de.metric("dualpath_engine_steps_total", role="decode") for de in cluster.decodes)
        assert decode_steps < 12 * TURN_TOKENS  # sequences shared decode steps (all-requests batches)
