"""Helpers shared by the prefill and decode loops: which side reads each hit block, the hit prefix that
is actually usable, and ordered per-peer outboxes (torch-free).

Called by ``engine.prefill`` and ``engine.decode``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable

from dualpath_engine import config
from dualpath_engine.engine import messages
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.scheduler import protocol

log = logging.getLogger(__name__)


def read_sides(assignment: protocol.Assignment, mode: str) -> dict[int, protocol.Side]:
    """Block index -> side that reads it. ``basic`` and ``oracle`` read everything on the PE side.

    Both engines of a task run this with the same configuration, so they agree without talking.
    """
    forced: protocol.Side | None = "pe" if mode in ("basic", "oracle") else None
    return {block.index: forced or block.side for block in assignment.hit_blocks}


def sampling_of(params: protocol.SamplingParams, task_id: str) -> runner_api.Sampling | None:
    """The runner's sampling for a request: None (greedy) at temperature 0.

    Without a client seed the draw is seeded from the request id, so the PE and the DE (and a retry
    of the same attempt) agree.
    """
    if params.temperature <= 0.0:
        return None
    request_id = task_id.rsplit(".", 1)[0]
    derived = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=7).digest(), "little")
    seed = params.seed if params.seed is not None else derived
    return runner_api.Sampling(temperature=params.temperature, top_p=params.top_p, seed=seed)


def usable_prefix_tokens(
    sides: dict[int, protocol.Side], valid: set[int], block_tokens: int, prompt_tokens: int
) -> int:
    """Tokens covered by leading hit blocks that were all read validly, capped at ``prompt - 1``.

    A block that is absent or corrupt ends the prefix: it and everything after it is recomputed. The
    last prompt token is always computed because its logits give the first output token.
    """
    count = 0
    while count in sides and count in valid:
        count += 1
    return min(count * block_tokens, prompt_tokens - 1)


class Outbox:
    """Messages to one peer about one task, sent in order by a background task; compute never waits.

    The first failed send calls ``on_failure`` once and drops everything queued after it.
    """

    def __init__(
        self,
        links: messages.PeerLinks,
        peer: protocol.TransportEndpoint,
        on_failure: Callable[[str], Awaitable[None]],
    ) -> None:
        self._links = links
        self._peer = peer
        self._on_failure = on_failure
        self._queue: asyncio.Queue[messages.Message | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._drain())
        self.failed = False

    def put(self, message: messages.Message) -> None:
        """Queue a message (ignored after a failure)."""
        if not self.failed:
            self._queue.put_nowait(message)

    async def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def abort(self) -> None:
        """Stop at once, dropping queued messages."""
        self._task.cancel()

    async def _drain(self) -> None:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            if self.failed:
                continue
            try:
                await self._links.send(self._peer, message)
            except (ConnectionError, OSError, TimeoutError) as exc:
                self.failed = True
                log.warning("send to %s:%s failed: %s", self._peer.host, self._peer.port, exc)
                await self._on_failure(f"peer {self._peer.host}:{self._peer.port} unreachable: {exc}")


def peer_timeout_s(engine_config: config.EngineConfig) -> float:
    """How long a PE waits for one layer of DE-read KV before giving the task up (scheduler retries it)."""
    return max(30.0, 4 * engine_config.transport.connect_timeout_s)


ORPHAN_TIMEOUT_S = 300.0
"""A DE gives up a task whose prefill has not completed after this long (a leak guard: normally the
scheduler cancels tasks of a lost PE long before)."""


class RecentIds:
    """The last ``capacity`` finished task ids (repeats of them are ignored), bounded in memory."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._capacity = capacity

    def add(self, task_id: str) -> None:
        """Remember ``task_id``, forgetting the oldest beyond capacity."""
        self._ids[task_id] = None
        self._ids.move_to_end(task_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids
