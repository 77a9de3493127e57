"""The HTTP session both telemetry collectors own (``prometheus.PrometheusCollector``,
``scrape.ScrapeCollector``): opened on first use, closed by ``close`` or on leaving ``async with``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import aiohttp


class SessionOwner:
    """Base of a collector that talks HTTP through one lazily opened ``aiohttp`` session."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session, opened on first use (inside the running event loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (a later request opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
