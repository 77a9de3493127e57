"""Reuse the scheduler fixture of the server tests (a real scheduler app on 127.0.0.1)."""

from tests.unit.server.conftest import scheduler_factory

__all__ = ["scheduler_factory"]
