"""Records of the running scheduler: requests, tasks (one per attempt), engine groups, client updates.

Plain mutable dataclasses owned by ``scheduler.state`` (which alone mutates them), plus the types
and errors ``scheduler.service`` and ``dualpath_engine.server`` see: ``RequestUpdate`` (news for a
client stream), ``AdmissionError`` (503), ``UnknownGroupError`` (404 on the admin API).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

from dualpath_engine.scheduler import policy, protocol

ErrorKind = Literal["timeout", "failed", "cancelled"]
BlockHasher = Callable[[Sequence[int]], list[str]]
"""Chained hashes (hex) of every Full Block of a token sequence."""


class AdmissionError(RuntimeError):
    """A request refused at submission (queue full); the API answers 503."""


class UnknownGroupError(KeyError):
    """An admin call named a group the scheduler does not know."""


@dataclasses.dataclass(frozen=True, slots=True)
class RequestUpdate:
    """News for a client request: new tokens, and on the last update its end."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    finish_reason: protocol.FinishReason | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    cached_tokens: int = 0

    @property
    def final(self) -> bool:
        """True when no further update follows."""
        return self.finish_reason is not None or self.error is not None


@dataclasses.dataclass
class GroupRecord:
    group_id: str
    role: protocol.Role
    reported_role: protocol.Role
    node: str
    incarnation: str
    engines: dict[str, protocol.EngineReport]
    read_queue_tokens: int
    last_seen: float
    drained: bool = False
    switch_to: protocol.Role | None = None
    switch_deadline: float = 0.0
    next_reply_id: int = 0
    unacked: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    outbox: list[str] = dataclasses.field(default_factory=list)
    cancels: list[protocol.Cancel] = dataclasses.field(default_factory=list)

    @property
    def accepting(self) -> bool:
        return not self.drained and self.switch_to is None and self.reported_role == self.role


@dataclasses.dataclass
class RequestRecord:
    request_id: str
    prompt: tuple[int, ...]
    sampling: protocol.SamplingParams
    deadline: float
    emitted: list[int] = dataclasses.field(default_factory=list)
    attempt: int = 0
    task_id: str = ""
    cached_tokens: int = 0


@dataclasses.dataclass
class TaskRecord:
    task_id: str
    request_id: str
    attempt: int
    prompt: tuple[int, ...]
    sampling: protocol.SamplingParams
    hashes: list[str]
    pe_tokens: int
    de_tokens: int
    hbm_bytes: int
    base: int
    """Tokens the request had emitted before this attempt (its output index offset)."""
    pe: tuple[str, str] | None = None
    de: tuple[str, str] | None = None
    plan: policy.ReadPlan | None = None
    hit_hashes: tuple[str, ...] = ()
    sent: set[str] = dataclasses.field(default_factory=set)
    acked: set[str] = dataclasses.field(default_factory=set)
    prefill_done: bool = False
