"""The OpenAI-compatible API: completions and chat, JSON and SSE, served by fake engine leaders."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dualpath_engine import tokenizer
from dualpath_engine.scheduler import protocol
from tests.unit.server import fakes
from tests.unit.server.conftest import Factory

pytestmark = pytest.mark.timeout(30)


def leaders(base: str, hasher: Any = None, **decode: Any) -> tuple[fakes.FakeLeader, fakes.FakeLeader]:
    return (
        fakes.FakeLeader(base, "pe-0", "prefill", "node-p"),
        fakes.FakeLeader(base, "de-0", "decode", "node-d", hasher=hasher, **decode),
    )


async def test_completion_with_text_prompt_returns_the_decode_engines_tokens(
    scheduler_factory: Factory,
) -> None:
    _svc, client, base = await scheduler_factory()
    async with fakes.running(*leaders(base)) as (pe, de):
        resp = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
        )
        body = await resp.json()
    assert resp.status == 200, body
    expected = fakes.expected_output(tokenizer.encode("hello"), 5)
    choice = body["choices"][0]
    assert choice["token_ids"] == expected
    assert choice["text"] == tokenizer.decode(expected)
    assert choice["finish_reason"] == "length"
    assert body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 5
    # The same task reached both engines, each in its own role, with the other as peer.
    assert [a.role for a in pe.received] == ["prefill"] and [a.role for a in de.received] == ["decode"]
    assert pe.received[0].task_id == de.received[0].task_id
    assert de.received[0].prefill.engine_id == pe.engine_id
    assert pe.received[0].decode.engine_id == de.engine_id


async def test_completion_with_token_ids_and_greedy_sampling_params_reach_the_engine(
    scheduler_factory: Factory,
) -> None:
    _svc, client, base = await scheduler_factory()
    async with fakes.running(*leaders(base)) as (_, de):
        resp = await client.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": [1, 2, 3],
                "max_tokens": 3,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        body = await resp.json()
    assert resp.status == 200, body
    assert body["choices"][0]["token_ids"] == fakes.expected_output([1, 2, 3], 3)
    sampling = de.received[0].sampling
    assert (sampling.temperature, sampling.max_tokens, sampling.ignore_eos) == (0.0, 3, True)


async def test_chat_streaming_sends_role_then_deltas_then_finish_and_done(scheduler_factory: Factory) -> None:
    _svc, client, base = await scheduler_factory()
    async with fakes.running(*leaders(base)):
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        raw = (await resp.read()).decode()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    ids = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]]
    assert ids == fakes.expected_output(tokenizer.encode_chat([("user", "hi")]), 4)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_models_lists_the_served_model(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory(model={"name": "tiny-agent"})
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["tiny-agent"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "param", "fragment"),
    [
        ("/v1/completions", {"model": "tiny"}, 400, "prompt", "Field required"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature", "less"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "bogus": 1}, 400, "bogus", "unknown field"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 999]}, 400, "prompt", "999"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", "batches"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "less"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["\n"]}, 400, "stop", "stop strings"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "max_tokens": 5000},
            400,
            "max_tokens",
            "context",
        ),
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model", "does not exist"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "at least 1"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
            "Input should be",
        ),
    ],
)
async def test_bad_requests_get_4xx_naming_the_field(
    scheduler_factory: Factory, path: str, payload: dict[str, Any], status: int, param: str, fragment: str
) -> None:
    _, client, _ = await scheduler_factory()
    resp = await client.post(path, json=payload)
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"]["param"] == param
    assert fragment in body["error"]["message"]
    assert body["error"]["message"].startswith(param)


async def test_invalid_json_body_is_a_400(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory()
    resp = await client.post(
        "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "body"


async def test_unknown_route_is_a_json_404(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory()
    resp = await client.get("/v2/nothing")
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_without_engines_a_request_fails_with_504_and_says_why(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory(request_timeout_s=0.3)
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    body = await resp.json()
    assert resp.status == 504
    assert "no prefill or decode engine group is registered" in body["error"]["message"]


async def test_streaming_timeout_ends_with_an_error_event(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory(request_timeout_s=0.3)
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True})
    raw = (await resp.read()).decode()
    assert resp.status == 200
    assert '"timeout_error"' in raw and raw.rstrip().endswith("data: [DONE]")


async def test_a_full_queue_refuses_with_503(scheduler_factory: Factory) -> None:
    svc, client, _ = await scheduler_factory(max_waiting_requests=1)
    waiting = svc.submit([1, 2], protocol.SamplingParams(max_tokens=1))
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "y"})
    body = await resp.json()
    assert resp.status == 503 and body["error"]["type"] == "server_overloaded"
    svc.release(waiting)
    assert svc.state.requests == {}
