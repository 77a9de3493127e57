"""Fixtures: a scheduler app on 127.0.0.1 (free port) with a private metrics registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from aiohttp import test_utils

from dualpath_engine import config
from dualpath_engine.scheduler import service
from dualpath_engine.server import app

Started = tuple[service.SchedulerService, test_utils.TestClient[Any, Any], str]
Factory = Callable[..., Awaitable[Started]]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text("s3cret-token\n", encoding="utf-8")
    return path


@pytest.fixture
async def scheduler_factory() -> AsyncIterator[Factory]:
    clients: list[test_utils.TestClient[Any, Any]] = []

    async def start(**overrides: Any) -> Started:
        cfg = config.SchedulerConfig.model_validate(
            {"request_timeout_s": 10.0, "engine_timeout_s": 1.0, **overrides}
        )
        svc = service.SchedulerService(
            cfg, registry=prometheus_client.CollectorRegistry(), expiry_interval_s=0.05
        )
        server = test_utils.TestServer(app.create_app(svc), host="127.0.0.1")
        client = test_utils.TestClient(server)
        await client.start_server()
        clients.append(client)
        return svc, client, str(server.make_url("")).rstrip("/")

    yield start
    for client in clients:
        await client.close()
