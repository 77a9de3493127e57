"""Loopback aiohttp servers for the telemetry unit tests: a fake Prometheus HTTP API that answers each
of the collector's queries from a table, and fake engine ``/metrics`` endpoints serving the text of
real engine metric registries (the engine's own metric classes, so a renamed series fails here).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import prometheus_client
from aiohttp import web

from dualpath_engine.kv import readqueue
from dualpath_engine.scheduler import metrics as scheduler_metrics
from dualpath_engine.transfer import base, manager

Handler = Callable[[web.Request], Any]


@contextlib.asynccontextmanager
async def serve(handler: Handler, path: str = "/{tail:.*}") -> AsyncIterator[str]:
    """Serve ``handler`` on 127.0.0.1 at a free port; yields the base URL; stops the server after."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


Row = tuple[Mapping[str, str], float]


class FakePrometheus:
    """Answers ``/api/v1/query`` by looking the query text up in ``answers`` (query text -> rows)."""

    def __init__(self, eval_time: float = 1_000_000.0) -> None:
        self.answers: dict[str, list[Row]] = {}
        self.errors: dict[str, tuple[int, str]] = {}
        self.eval_time = eval_time
        self.queries: list[str] = []
        self.hang = asyncio.Event()
        self.release = asyncio.Event()
        self.raw: tuple[int, bytes] | None = None
        """When set, every query gets this status and body (charset utf-8)."""

    async def handle(self, request: web.Request) -> web.Response:
        query = request.query.get("query", "")
        self.queries.append(query)
        if self.hang.is_set():
            await self.release.wait()
        if self.raw is not None:
            status, body = self.raw
            return web.Response(status=status, body=body, content_type="text/html", charset="utf-8")
        if query in self.errors:
            status, message = self.errors[query]
            return web.json_response(
                {"status": "error", "errorType": "bad_data", "error": message}, status=status
            )
        rows = self.answers.get(query, [])
        result = [{"metric": dict(labels), "value": [self.eval_time, _fmt(value)]} for labels, value in rows]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})


def _fmt(value: float) -> str:
    if value != value:
        return "NaN"
    if value == float("inf"):
        return "+Inf"
    return repr(value)


class FakeEngine:
    """One engine pod's ``/metrics`` built from the engine's real metric classes."""

    def __init__(self, *, role: str = "prefill", emulate: bool = True, snic_budget: float = 25e9) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        nic_metrics = base.NicMetrics(self.registry)
        self.storage = base.Nic(
            "mlx5_storage0",
            base.NicKind.STORAGE,
            25e9,
            emulate=emulate,
            budget_bytes_per_s=snic_budget,
            metrics=nic_metrics,
        )
        self.compute = base.Nic("mlx5_0", base.NicKind.COMPUTE, 50e9, emulate=emulate, metrics=nic_metrics)
        self.traffic = manager.TrafficMetrics(self.registry)
        self.transport = base.TransportMetrics("tcp", self.registry)
        self.reads = readqueue.ReadQueue(cast(Any, None), workers=1, registry=self.registry)
        # As dualpath_engine.engine.service._EngineCollector exports them.
        self.running_tokens = prometheus_client.Gauge(
            "dualpath_engine_running_tokens", "tok_e", ["role"], registry=self.registry
        )
        self.running_requests = prometheus_client.Gauge(
            "dualpath_engine_running_requests", "seq_e", ["role"], registry=self.registry
        )
        self.running_tokens.labels(role).set(0)
        self.running_requests.labels(role).set(0)
        self.broken = False
        self.raw: tuple[int, bytes] | None = None
        """When set, answer this status and body (charset utf-8) instead."""

    async def handle(self, request: web.Request) -> web.Response:
        if self.broken:
            return web.Response(text="this is { not prometheus text\n")
        if self.raw is not None:
            status, body = self.raw
            return web.Response(status=status, body=body, content_type="text/plain", charset="utf-8")
        return web.Response(body=prometheus_client.generate_latest(self.registry), content_type="text/plain")


class FakeScheduler:
    """The scheduler's ``/metrics`` (real ``SchedulerMetrics``: TTFT/TPOT histograms)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.metrics = scheduler_metrics.SchedulerMetrics(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(self.registry), content_type="text/plain")
