"""The group leader: pulls work from the central scheduler and posts task events (torch-free).

Built by ``engine.service``. On CPU (and in the paper's pull model) the leader of an engine group
long-polls ``POST /engine/v1/fetch`` (``scheduler.protocol``) with every engine's ``seq``/``tok``/free KV
memory, the node's storage read queue (tokens and bytes) and each engine's transport endpoint; it hands
assignments and cancels to the engines and acknowledges each reply in the next fetch. Events the
engines produce are queued and posted in batches to ``POST /engine/v1/results``; cancels in the ack are
applied too. A reply naming another role switches the group in place (``on_role``). A scheduler that
is down is retried with capped backoff; the engines keep running.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp
import pydantic

from dualpath_engine.scheduler import protocol

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the leader needs from a prefill or decode engine."""

    @property
    def engine_id(self) -> str:
        """The engine's name."""
        ...

    def load(self) -> tuple[int, int]:
        """``(seq, tok)``."""
        ...

    def assign(self, assignment: protocol.Assignment) -> None:
        """Take a task."""
        ...

    def cancel(self, task_id: str) -> None:
        """Drop a task."""
        ...


class GroupLeader:
    """Pull loop and result poster for one engine group."""

    def __init__(
        self,
        *,
        scheduler_url: str,
        group_id: str,
        role: protocol.Role,
        node: str,
        engines: Sequence[Engine],
        endpoints: Callable[[], Sequence[protocol.TransportEndpoint]],
        read_queue: Callable[[], tuple[int, int]],
        free_hbm: Callable[[Engine], int],
        wait_s: float = 1.0,
        on_role: Callable[[protocol.Role], Sequence[Engine]] | None = None,
    ) -> None:
        self._url = scheduler_url.rstrip("/")
        self._group_id = group_id
        self._role = role
        self._node = node
        self._engines = list(engines)
        self._endpoints = endpoints
        self._read_queue = read_queue
        self._free_hbm = free_hbm
        self._wait_s = wait_s
        self._on_role = on_role
        self.incarnation = uuid.uuid4().hex
        self._ack: int | None = None
        self._events: asyncio.Queue[protocol.TaskEvent] = asyncio.Queue()
        self.connected = asyncio.Event()
        """Set once a fetch has succeeded (the group is known to the scheduler)."""

    def post(self, event: protocol.TaskEvent) -> None:
        """Queue an event for the scheduler (never blocks)."""
        self._events.put_nowait(event)

    def _by_id(self, engine_id: str) -> Engine | None:
        return next((engine for engine in self._engines if engine.engine_id == engine_id), None)

    def fetch_request(self) -> protocol.FetchRequest:
        """The next fetch: loads, endpoints, read queue and the last ack."""
        reports = []
        for engine, endpoint in zip(self._engines, self._endpoints(), strict=True):
            seq, tok = engine.load()
            reports.append(
                protocol.EngineReport(
                    engine_id=engine.engine_id,
                    seq=seq,
                    tok=tok,
                    free_hbm_bytes=self._free_hbm(engine),
                    transport=endpoint,
                )
            )
        tokens, nbytes = self._read_queue()
        return protocol.FetchRequest(
            group_id=self._group_id,
            incarnation=self.incarnation,
            role=self._role,
            node=self._node,
            engines=tuple(reports),
            read_queue_tokens=tokens,
            read_queue_bytes=nbytes,
            ack_reply_id=self._ack,
            wait_s=self._wait_s,
        )

    @property
    def role(self) -> protocol.Role:
        """The role the group reports."""
        return self._role

    def apply(self, reply: protocol.FetchReply) -> None:
        """Switch role if told to (the scheduler drained the group first), then hand the reply's cancels
        and assignments to the engines."""
        if reply.role != self._role and self._on_role is not None:
            self._engines = list(self._on_role(reply.role))
            self._role = reply.role
        for cancel in reply.cancels:
            for engine in self._engines:
                engine.cancel(cancel.task_id)
        for assignment in reply.assignments:
            target = self._by_id(assignment.engine_id)
            if target is None:
                log.warning("assignment %s for unknown engine %s", assignment.task_id, assignment.engine_id)
                continue
            target.assign(assignment)
        self._ack = reply.reply_id

    async def run_fetch(self, session: aiohttp.ClientSession) -> None:
        """Long-poll forever."""
        backoff = 0.05
        while True:
            try:
                body = self.fetch_request().model_dump_json()
                timeout = aiohttp.ClientTimeout(total=self._wait_s + 10.0)
                async with session.post(
                    self._url + protocol.FETCH_PATH,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=timeout,
                ) as response:
                    text = await response.text()
                    if response.status != 200:
                        raise RuntimeError(f"fetch answered {response.status}: {text[:300]}")
                reply = protocol.FetchReply.model_validate_json(text)
            except (aiohttp.ClientError, TimeoutError, RuntimeError, pydantic.ValidationError) as exc:
                log.warning("fetch from %s failed: %s", self._url, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            self.connected.set()
            self.apply(reply)
            if reply.role != self._role:
                log.warning(
                    "scheduler asks for role %s; this group cannot switch from %s", reply.role, self._role
                )

    async def run_results(self, session: aiohttp.ClientSession) -> None:
        """Post queued events in batches forever; failed posts are retried in order."""
        pending: list[protocol.TaskEvent] = []
        backoff = 0.05
        while True:
            if not pending:
                pending.append(await self._events.get())
            while not self._events.empty():
                pending.append(self._events.get_nowait())
            batch = protocol.ResultBatch(group_id=self._group_id, events=tuple(pending))
            try:
                async with session.post(
                    self._url + protocol.RESULTS_PATH,
                    data=batch.model_dump_json(),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=10.0),
                ) as response:
                    text = await response.text()
                    if 400 <= response.status < 500:
                        # Retrying a refused batch would block every later event: drop it, loudly.
                        log.error(
                            "scheduler refused %d events (%s): %s", len(pending), response.status, text[:300]
                        )
                        pending = []
                        continue
                    if response.status != 200:
                        raise RuntimeError(f"results answered {response.status}: {text[:300]}")
                ack = protocol.ResultAck.model_validate_json(text)
            except (aiohttp.ClientError, TimeoutError, RuntimeError, pydantic.ValidationError) as exc:
                log.warning("posting results to %s failed: %s", self._url, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            pending = []
            for cancel in ack.cancels:
                for engine in self._engines:
                    engine.cancel(cancel.task_id)
