"""The scheduler process's aiohttp application and its runner.

Built by ``create_app(service)`` (tests use aiohttp's test client on it) and run by ``serve(cfg)``,
which ``python -m dualpath_engine.scheduler --config F`` calls. Routes:

* OpenAI-compatible: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE streams),
  ``GET /v1/models``;
* engine group leaders: ``POST /engine/v1/fetch`` (long poll), ``POST /engine/v1/results``
  (``scheduler.protocol``);
* operations: ``GET /metrics`` (Prometheus text), ``GET /healthz``;
* admin, with ``Authorization: Bearer <token>`` where the token is the content of
  ``admin_token_file`` (re-read when the file changes, so a rotated Secret takes effect; 401 without
  a bearer token, 403 with a wrong one or when no token file is configured):
  ``GET /admin/v1/status``,
  ``PUT /admin/v1/weights`` ``{"weights": [{"node", "capacity_bytes_per_second"}]}``,
  ``POST /admin/v1/drain`` ``{"group_id", "drained"}``,
  ``POST /admin/v1/role`` ``{"group_id", "role"}``.

Every error is JSON in OpenAI's shape, naming the field where one is at fault; a request the engines
do not finish in time gets 504, one refused for load or failed after retries gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import prometheus_client
import pydantic
from aiohttp import web

from dualpath_engine import config as config_mod
from dualpath_engine import tokenizer
from dualpath_engine.scheduler import protocol, records, service
from dualpath_engine.server import openai_api

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", service.SchedulerService)
TOKEN_CACHE = web.AppKey("token_cache", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(svc: service.SchedulerService) -> web.Application:
    """The aiohttp application around a scheduler service (started and stopped with the app)."""
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[SERVICE] = svc
    app[TOKEN_CACHE] = {}
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_post(protocol.FETCH_PATH, _fetch)
    app.router.add_post(protocol.RESULTS_PATH, _results)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/admin/v1/status", _admin_status)
    app.router.add_put("/admin/v1/weights", _admin_weights)
    app.router.add_post("/admin/v1/weights", _admin_weights)
    app.router.add_post("/admin/v1/drain", _admin_drain)
    app.router.add_post("/admin/v1/role", _admin_role)

    async def start(app: web.Application) -> None:
        await app[SERVICE].start()

    async def stop(app: web.Application) -> None:
        await app[SERVICE].stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def serve(
    cfg: config_mod.SchedulerConfig,
    ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve on ``cfg.host:cfg.port`` until ``stop`` is set (or SIGTERM/SIGINT when not given).

    ``ready`` receives the base URL once listening (port 0 resolves to the picked port).
    """
    svc = service.SchedulerService(cfg, registry=prometheus_client.CollectorRegistry())
    runner = web.AppRunner(create_app(svc), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    stop_event = stop if stop is not None else asyncio.Event()
    if stop is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)
    try:
        addresses = runner.addresses
        port = addresses[0][1] if addresses else cfg.port
        url = f"http://{cfg.host}:{port}"
        log.info("scheduler listening on %s", url)
        if ready is not None:
            ready(url)
        await stop_event.wait()
    finally:
        await runner.cleanup()


# --- middleware --------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except openai_api.ApiError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return web.json_response(exc.body(), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = openai_api.ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}", None)
        return web.json_response(error.body(), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        error = openai_api.ApiError(
            500, "internal error in the scheduler (see its log)", None, "server_error"
        )
        return web.json_response(error.body(), status=500)


# --- OpenAI API --------------------------------------------------------------------------------


async def _completions(request: web.Request) -> web.StreamResponse:
    body = openai_api.parse(openai_api.CompletionRequest, await request.read())
    return await _generate(request, body, chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    body = openai_api.parse(openai_api.ChatRequest, await request.read())
    return await _generate(request, body, chat=True)


async def _generate(
    request: web.Request, body: openai_api.CompletionRequest | openai_api.ChatRequest, chat: bool
) -> web.StreamResponse:
    svc = request.app[SERVICE]
    openai_api.check_model(body, svc.cfg)
    ids = openai_api.prompt_ids(body)
    sampling = openai_api.sampling_params(body, len(ids), svc.cfg)
    try:
        request_id = svc.submit(ids, sampling)
    except records.AdmissionError as exc:
        raise openai_api.ApiError(503, str(exc), None, "server_overloaded") from exc
    object_id = openai_api.new_id("chatcmpl" if chat else "cmpl")
    try:
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await _stream(request, svc, request_id, object_id, chat, len(ids), include_usage)
        out: list[int] = []
        finish: str = "stop"
        cached = 0
        async with contextlib.aclosing(svc.updates(request_id)) as updates:
            async for update in updates:
                if update.error is not None:
                    raise _update_error(update)
                out.extend(update.token_ids)
                cached = update.cached_tokens
                finish = update.finish_reason or finish
        text = tokenizer.decode(out)
        use = openai_api.usage(len(ids), len(out), cached)
        return web.json_response(
            openai_api.completion_body(chat, object_id, svc.cfg.model.name, text, out, finish, use)
        )
    finally:
        svc.release(request_id)


async def _stream(
    request: web.Request,
    svc: service.SchedulerService,
    request_id: str,
    object_id: str,
    chat: bool,
    prompt_tokens: int,
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    model = svc.cfg.model.name
    text = openai_api.TextStream()
    produced = 0
    first = True

    async def send(obj: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    async with contextlib.aclosing(svc.updates(request_id)) as updates:
        async for update in updates:
            if update.error is not None:
                await send(_update_error(update).body())
                break
            produced += len(update.token_ids)
            if update.token_ids or first:
                piece = text.push(update.token_ids, final=update.finish_reason is not None)
                chunk = openai_api.chunk_body(chat, object_id, model, piece, update.token_ids, None, first)
                await send(chunk)
                first = False
            if update.finish_reason is not None:
                await send(openai_api.chunk_body(chat, object_id, model, None, (), update.finish_reason))
                if include_usage:
                    use = openai_api.usage(prompt_tokens, produced, update.cached_tokens)
                    await send(openai_api.usage_chunk(chat, object_id, model, use))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _update_error(update: records.RequestUpdate) -> openai_api.ApiError:
    if update.error_kind == "timeout":
        return openai_api.ApiError(504, update.error or "timed out", None, "timeout_error")
    return openai_api.ApiError(503, update.error or "failed", None, "engine_unavailable")


async def _models(request: web.Request) -> web.StreamResponse:
    name = request.app[SERVICE].cfg.model.name
    model = {"id": name, "object": "model", "created": 0, "owned_by": "dualpath"}
    return web.json_response({"object": "list", "data": [model]})


# --- engines -----------------------------------------------------------------------------------


async def _fetch(request: web.Request) -> web.StreamResponse:
    message = _parse_message(protocol.FetchRequest, await request.read())
    if message.protocol_version != protocol.PROTOCOL_VERSION:
        raise openai_api.ApiError(
            409,
            f"protocol_version: engine speaks {message.protocol_version}, "
            f"scheduler speaks {protocol.PROTOCOL_VERSION}",
            "protocol_version",
        )
    reply = await request.app[SERVICE].fetch(message)
    return web.json_response(text=reply.model_dump_json())


async def _results(request: web.Request) -> web.StreamResponse:
    batch = _parse_message(protocol.ResultBatch, await request.read())
    ack = request.app[SERVICE].results(batch)
    return web.json_response(text=ack.model_dump_json())


_M = TypeVar("_M", bound=pydantic.BaseModel)


def _parse_message(model: type[_M], raw: bytes) -> _M:
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise openai_api.validation_error(exc) from exc


# --- operations --------------------------------------------------------------------------------


async def _metrics(request: web.Request) -> web.StreamResponse:
    body = prometheus_client.generate_latest(request.app[SERVICE].registry)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.StreamResponse:
    sample = request.app[SERVICE].state.sample()
    return web.json_response(
        {"status": "ok", "groups": len(request.app[SERVICE].state.groups), "queues": sample.queues}
    )


# --- admin -------------------------------------------------------------------------------------


class _WeightEntry(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    node: str = pydantic.Field(min_length=1, description="Kubernetes node name.")
    capacity_bytes_per_second: float = pydantic.Field(
        ge=0, description="Usable storage-NIC capacity of the node for KV reads, bytes/s."
    )


class _WeightsBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    weights: list[_WeightEntry] = pydantic.Field(
        description="Per-node capacities; replaces the previous set."
    )


class _DrainBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    group_id: str = pydantic.Field(min_length=1, description="Engine group.")
    drained: bool = pydantic.Field(default=True, description="True: no new work; false: undrain.")


class _RoleBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    group_id: str = pydantic.Field(min_length=1, description="Engine group.")
    role: protocol.Role = pydantic.Field(description="The group's new role (switched in place, drain-first).")


def _authorize(request: web.Request) -> None:
    path = request.app[SERVICE].cfg.admin_token_file
    if path is None:
        raise openai_api.ApiError(
            403, "admin API disabled: the scheduler has no admin_token_file", None, "forbidden"
        )
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise openai_api.ApiError(
            401, "Authorization: a bearer token is required", "Authorization", "unauthorized"
        )
    expected = _read_token(request.app[TOKEN_CACHE], Path(path))
    if not expected or not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise openai_api.ApiError(
            403, "Authorization: the bearer token is not valid", "Authorization", "forbidden"
        )


def _read_token(cache: dict[str, Any], path: Path) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    if cache.get("key") != key:
        cache["key"] = key
        cache["token"] = path.read_text(encoding="utf-8").strip()
    return str(cache["token"])


async def _admin_status(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    return web.json_response(request.app[SERVICE].status())


async def _admin_weights(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    body = _parse_message(_WeightsBody, await request.read())
    request.app[SERVICE].set_weights({w.node: w.capacity_bytes_per_second for w in body.weights})
    return web.json_response(request.app[SERVICE].status())


async def _admin_drain(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    body = _parse_message(_DrainBody, await request.read())
    try:
        request.app[SERVICE].set_drained(body.group_id, body.drained)
    except records.UnknownGroupError as exc:
        raise openai_api.ApiError(404, f"group_id: no engine group {body.group_id!r}", "group_id") from exc
    return web.json_response(request.app[SERVICE].status())


async def _admin_role(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    body = _parse_message(_RoleBody, await request.read())
    try:
        request.app[SERVICE].set_role(body.group_id, body.role)
    except records.UnknownGroupError as exc:
        raise openai_api.ApiError(404, f"group_id: no engine group {body.group_id!r}", "group_id") from exc
    return web.json_response(request.app[SERVICE].status(), status=202)
