"""Engine-facing protocol over HTTP (sessions, engine loss, role switch) and the admin API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dualpath_engine import tokenizer
from dualpath_engine.scheduler import protocol
from tests.unit.server import fakes
from tests.unit.server.conftest import Factory

pytestmark = pytest.mark.timeout(30)

AUTH = {"Authorization": "Bearer s3cret-token"}


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, polling the event loop, or fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_second_turn_of_a_session_hits_blocks_the_first_turn_persisted(
    scheduler_factory: Factory,
) -> None:
    svc, client, base = await scheduler_factory(kv={"block_tokens": 8})
    pe = fakes.FakeLeader(base, "pe-0", "prefill", "node-p")
    de = fakes.FakeLeader(base, "de-0", "decode", "node-d", hasher=svc.state._hasher)
    turn1 = [{"role": "user", "content": "fix the failing test in repo/x.py please"}]
    async with fakes.running(pe, de):
        first = await (
            await client.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": turn1, "max_tokens": 9, "user": "s1"},
            )
        ).json()
        answer = first["choices"][0]["message"]["content"]
        turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "ok next"}]
        second = await (
            await client.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": turn2, "max_tokens": 3, "user": "s1"},
            )
        ).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    persisted = len(tokenizer.encode_chat([("user", turn1[0]["content"])])) + 9  # prompt + answer
    assert cached == 8 * (persisted // 8)
    task = de.received[1]
    assert task.chunk_plan.cached_tokens == cached == len(task.hit_blocks) * 8
    assert [b.index for b in task.hit_blocks] == list(range(len(task.hit_blocks)))
    assert task.chunk_plan.compute_tokens == len(task.prompt_token_ids) - cached


async def test_request_whose_decode_engine_dies_completes_on_another_with_identical_output(
    scheduler_factory: Factory,
) -> None:
    _svc, client, base = await scheduler_factory(engine_timeout_s=0.3)
    pe = fakes.FakeLeader(base, "pe-0", "prefill", "node-p")
    dying = fakes.FakeLeader(base, "de-0", "decode", "node-d0", stall_after_tokens=3)
    async with fakes.running(pe, dying):
        post = asyncio.create_task(
            client.post("/v1/completions", json={"model": "tiny", "prompt": "long task", "max_tokens": 8})
        )
        await wait_for(lambda: dying._stalled)
        survivor = fakes.FakeLeader(base, "de-1", "decode", "node-d1")
        async with fakes.running(survivor):
            resp = await post
            body = await resp.json()
    assert resp.status == 200, body
    assert body["choices"][0]["token_ids"] == fakes.expected_output(tokenizer.encode("long task"), 8)
    retried = survivor.received[0]
    assert retried.attempt == 1
    assert retried.prompt_token_ids[: len("long task")] == tuple(tokenizer.encode("long task"))
    assert retried.sampling.max_tokens == 5  # three tokens were already streamed to the client
    assert pe.cancelled == [f"{retried.request_id}.0"]  # the PE was told to drop the old attempt


async def test_role_switch_flips_a_group_in_place_and_it_then_serves_the_new_role(
    scheduler_factory: Factory, token_file: Path
) -> None:
    svc, client, base = await scheduler_factory(admin_token_file=str(token_file))
    pe = fakes.FakeLeader(base, "g-a", "prefill", "node-a")
    flexible = fakes.FakeLeader(base, "g-b", "prefill", "node-b")
    async with fakes.running(pe, flexible):
        await wait_for(lambda: "g-b" in svc.state.groups)
        resp = await client.post("/admin/v1/role", json={"group_id": "g-b", "role": "decode"}, headers=AUTH)
        assert resp.status == 202
        await wait_for(lambda: flexible.role == "decode")
        out = await (
            await client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2})
        ).json()
    assert out["choices"][0]["token_ids"] == fakes.expected_output(tokenizer.encode("abc"), 2)
    assert [a.role for a in flexible.received] == ["decode"]


async def test_drained_group_gets_no_new_work(scheduler_factory: Factory, token_file: Path) -> None:
    svc, client, base = await scheduler_factory(admin_token_file=str(token_file))
    pe_a = fakes.FakeLeader(base, "pe-a", "prefill", "node-a")
    pe_b = fakes.FakeLeader(base, "pe-b", "prefill", "node-b")
    de = fakes.FakeLeader(base, "de-0", "decode", "node-d")
    async with fakes.running(pe_a, pe_b, de):
        await wait_for(lambda: {"pe-a", "pe-b", "de-0"} <= set(svc.state.groups))
        resp = await client.post("/admin/v1/drain", json={"group_id": "pe-a"}, headers=AUTH)
        status = await resp.json()
        assert resp.status == 200
        assert next(g for g in status["groups"] if g["group_id"] == "pe-a")["drained"] is True
        for prompt in ("one", "two", "three"):
            resp = await client.post(
                "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}
            )
            assert resp.status == 200
    assert pe_a.received == [] and len(pe_b.received) == 3


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Basic abc"}, 401), ({"Authorization": "Bearer wrong"}, 403), (AUTH, 200)],
)
async def test_admin_api_needs_the_bearer_token_from_the_file(
    scheduler_factory: Factory, token_file: Path, headers: dict[str, str], status: int
) -> None:
    _, client, _ = await scheduler_factory(admin_token_file=str(token_file))
    resp = await client.get("/admin/v1/status", headers=headers)
    assert resp.status == status
    body = await resp.json()
    if status != 200:
        assert body["error"]["param"] == "Authorization"
        assert (resp.headers.get("WWW-Authenticate") == "Bearer") == (status == 401)


async def test_admin_token_rotation_in_the_file_takes_effect(
    scheduler_factory: Factory, token_file: Path
) -> None:
    _, client, _ = await scheduler_factory(admin_token_file=str(token_file))
    assert (await client.get("/admin/v1/status", headers=AUTH)).status == 200
    await asyncio.to_thread(token_file.write_text, "rotated-token-longer", encoding="utf-8")
    assert (await client.get("/admin/v1/status", headers=AUTH)).status == 403
    rotated = {"Authorization": "Bearer rotated-token-longer"}
    assert (await client.get("/admin/v1/status", headers=rotated)).status == 200


async def test_admin_api_is_refused_without_a_token_file(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory()
    resp = await client.get("/admin/v1/status", headers=AUTH)
    assert resp.status == 403
    assert "disabled" in (await resp.json())["error"]["message"]


async def test_admin_weights_are_validated_and_exported(scheduler_factory: Factory, token_file: Path) -> None:
    svc, client, _ = await scheduler_factory(admin_token_file=str(token_file))
    bad = await client.put("/admin/v1/weights", json={"weights": [{"node": "n1"}]}, headers=AUTH)
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "weights.0.capacity_bytes_per_second"
    good = await client.put(
        "/admin/v1/weights",
        json={"weights": [{"node": "n1", "capacity_bytes_per_second": 1.5e9}]},
        headers=AUTH,
    )
    assert good.status == 200
    assert svc.state.weights == {"n1": 1.5e9}
    metrics = await (await client.get("/metrics")).text()
    assert 'dualpath_scheduler_path_weight_bytes_per_second{node="n1"} 1.5e+09' in metrics


async def test_admin_unknown_group_is_404(scheduler_factory: Factory, token_file: Path) -> None:
    _, client, _ = await scheduler_factory(admin_token_file=str(token_file))
    resp = await client.post("/admin/v1/drain", json={"group_id": "nope"}, headers=AUTH)
    assert resp.status == 404 and (await resp.json())["error"]["param"] == "group_id"
    resp = await client.post("/admin/v1/role", json={"group_id": "nope", "role": "tester"}, headers=AUTH)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "role"


async def test_fetch_validation_and_version_errors(scheduler_factory: Factory) -> None:
    _, client, _ = await scheduler_factory()
    resp = await client.post(protocol.FETCH_PATH, json={"group_id": "g", "role": "prefill"})
    body = await resp.json()
    assert resp.status == 400 and "incarnation" in body["error"]["message"]
    message = {
        "protocol_version": 99,
        "group_id": "g",
        "incarnation": "i",
        "role": "prefill",
        "node": "n",
        "engines": [
            {
                "engine_id": "e",
                "seq": 0,
                "tok": 0,
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1},
            }
        ],
        "read_queue_tokens": 0,
    }
    resp = await client.post(protocol.FETCH_PATH, json=message)
    assert resp.status == 409 and (await resp.json())["error"]["param"] == "protocol_version"


async def test_metrics_and_health_report_requests_queues_and_reads(scheduler_factory: Factory) -> None:
    _svc, client, base = await scheduler_factory()
    async with fakes.running(
        fakes.FakeLeader(base, "pe-0", "prefill", "node-p"),
        fakes.FakeLeader(base, "de-0", "decode", "node-d"),
    ):
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 3})
        assert resp.status == 200
        health = await (await client.get("/healthz")).json()
        text = await (await client.get("/metrics")).text()
    assert health["status"] == "ok" and health["groups"] == 2
    assert 'dualpath_scheduler_requests_total{result="ok"} 1.0' in text
    assert "dualpath_scheduler_time_to_first_token_seconds_count 1.0" in text
    assert "dualpath_scheduler_time_per_output_token_seconds_count 1.0" in text
    assert 'dualpath_scheduler_queue_requests{queue="pe_global"} 0.0' in text
    assert 'dualpath_scheduler_pe_assignments_total{category="short"} 1.0' in text
    assert 'dualpath_scheduler_read_side_decisions_total{path="pe"} 1.0' in text
    assert (
        'dualpath_scheduler_engine_unfinished_requests{engine="de-0-e0",group="de-0",role="decode"}' in text
    )
    assert "dualpath_scheduler_generation_tokens_total 3.0" in text


async def test_client_disconnect_mid_stream_cancels_the_task_on_the_engine(
    scheduler_factory: Factory,
) -> None:
    svc, client, base = await scheduler_factory()
    pe = fakes.FakeLeader(base, "pe-0", "prefill", "node-p")
    de = fakes.FakeLeader(base, "de-0", "decode", "node-d", step_delay_s=0.05)
    async with fakes.running(pe, de):
        resp = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 200, "stream": True}
        )
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        resp.close()  # the client goes away
        await wait_for(lambda: not svc.state.requests)
        task_id = de.received[0].task_id
        await wait_for(lambda: task_id in de.cancelled)
    assert 'result="cancelled"' in await (await client.get("/metrics")).text()


async def test_a_leader_ignoring_a_role_change_is_told_once_not_answered_in_a_loop(
    scheduler_factory: Factory,
) -> None:
    svc, _, _ = await scheduler_factory()
    endpoint = protocol.TransportEndpoint(kind="tcp", host="127.0.0.1", port=1)
    message = protocol.FetchRequest(
        group_id="g",
        incarnation="i",
        role="prefill",
        node="n",
        engines=(protocol.EngineReport(engine_id="e", seq=0, tok=0, transport=endpoint),),
        read_queue_tokens=0,
        wait_s=0.3,
    )
    await svc.fetch(message.model_copy(update={"wait_s": 0.0}))
    svc.set_role("g", "decode")
    loop = asyncio.get_running_loop()
    started = loop.time()
    told = await svc.fetch(message)
    assert told.role == "decode" and loop.time() - started < 0.25  # news: answered at once
    started = loop.time()
    again = await svc.fetch(message)
    assert again.role == "decode" and loop.time() - started >= 0.25  # no news: a normal long poll
