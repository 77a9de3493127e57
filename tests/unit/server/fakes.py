"""Small fake engine group leaders that speak the scheduler's pull protocol over HTTP.

They exercise the HTTP/protocol layer only: a fake prefill leader acknowledges its tasks and posts
``prefill_done``; a fake decode leader "decodes" with a deterministic autoregressive rule (the next
token is a function of the whole context, like greedy decoding), streams tokens one per event, and
reports the chained hashes of every Full Block of prompt + output as persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp

from dualpath_engine.scheduler import protocol, records


def next_token(context: Sequence[int]) -> int:
    """The fake model: a deterministic function of the whole context (printable ASCII, so text
    round-trips through the tokenizer exactly)."""
    return 32 + (sum(context) * 31 + len(context) * 7) % 95


def expected_output(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """What a fake decode engine generates for ``prompt``."""
    context = list(prompt)
    out = []
    for _ in range(max_tokens):
        token = next_token(context)
        out.append(token)
        context.append(token)
    return out


@dataclass
class FakeLeader:
    """One fake group (one engine) polling ``base_url``; start with ``run()`` as a task."""

    base_url: str
    group_id: str
    role: protocol.Role
    node: str
    hasher: records.BlockHasher | None = None
    free_hbm_bytes: int = 1 << 40
    step_delay_s: float = 0.0
    stall_after_tokens: int | None = None
    """Stop fetching and posting after this many tokens of a task (simulates a dead engine)."""
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    received: list[protocol.Assignment] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    roles_seen: list[protocol.Role] = field(default_factory=list)
    _ack: int | None = None
    _known: set[str] = field(default_factory=set)
    _running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _stalled: bool = False

    @property
    def engine_id(self) -> str:
        return f"{self.group_id}-e0"

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            try:
                while not self._stalled:
                    await self._fetch_once(session)
            finally:
                for task in self._running.values():
                    task.cancel()
                for task in self._running.values():
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _fetch_once(self, session: aiohttp.ClientSession) -> None:
        message = protocol.FetchRequest(
            group_id=self.group_id,
            incarnation=self.incarnation,
            role=self.role,
            node=self.node,
            engines=(
                protocol.EngineReport(
                    engine_id=self.engine_id,
                    seq=len(self._running),
                    tok=0,
                    free_hbm_bytes=self.free_hbm_bytes,
                    transport=protocol.TransportEndpoint(kind="tcp", host="127.0.0.1", port=1),
                ),
            ),
            read_queue_tokens=0,
            ack_reply_id=self._ack,
            wait_s=0.2,
        )
        async with session.post(self.base_url + protocol.FETCH_PATH, data=message.model_dump_json()) as resp:
            resp.raise_for_status()
            reply = protocol.FetchReply.model_validate_json(await resp.read())
        self._ack = reply.reply_id
        self.roles_seen.append(reply.role)
        if reply.role != self.role:
            self.role = reply.role  # in-place switch
        for cancel in reply.cancels:
            self.cancelled.append(cancel.task_id)
            task = self._running.pop(cancel.task_id, None)
            if task is not None:
                task.cancel()
        for assignment in reply.assignments:
            if assignment.task_id in self._known:
                continue
            self._known.add(assignment.task_id)
            self.received.append(assignment)
            if assignment.role == "prefill":
                await self._post(
                    session,
                    [
                        protocol.TaskEvent(
                            task_id=assignment.task_id, engine_id=self.engine_id, prefill_done=True
                        )
                    ],
                )
            else:
                self._running[assignment.task_id] = asyncio.create_task(self._decode(session, assignment))

    async def _decode(self, session: aiohttp.ClientSession, assignment: protocol.Assignment) -> None:
        context = list(assignment.prompt_token_ids)
        read = len(assignment.hit_blocks) * assignment.block_tokens
        for index in range(assignment.sampling.max_tokens):
            if self.stall_after_tokens is not None and index >= self.stall_after_tokens:
                self._stalled = True
                return
            if self.step_delay_s:
                await asyncio.sleep(self.step_delay_s)
            token = next_token(context)
            context.append(token)
            last = index + 1 == assignment.sampling.max_tokens
            event = protocol.TaskEvent(
                task_id=assignment.task_id,
                engine_id=self.engine_id,
                first_index=index,
                token_ids=(token,),
                cached_tokens=read if index == 0 else None,
                kv_read_bytes_de=read * 10 if index == 0 else 0,
                finish_reason="length" if last else None,
                persisted_block_hashes=tuple(self.hasher(context)) if last and self.hasher else (),
            )
            await self._post(session, [event])
        self._running.pop(assignment.task_id, None)

    async def _post(self, session: aiohttp.ClientSession, events: list[protocol.TaskEvent]) -> None:
        batch = protocol.ResultBatch(group_id=self.group_id, events=tuple(events))
        async with session.post(self.base_url + protocol.RESULTS_PATH, data=batch.model_dump_json()) as resp:
            resp.raise_for_status()
            ack = protocol.ResultAck.model_validate_json(await resp.read())
        self.cancelled.extend(c.task_id for c in ack.cancels)


@contextlib.asynccontextmanager
async def running(*leaders: FakeLeader) -> AsyncIterator[tuple[FakeLeader, ...]]:
    """Run fake leaders as tasks for the duration of the block, then stop them."""
    tasks = [asyncio.create_task(leader.run()) for leader in leaders]
    try:
        yield leaders
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
