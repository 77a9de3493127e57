"""The engine-facing pull protocol between group leaders and the central scheduler (HTTP/JSON).

Used by the scheduler's HTTP app (``dualpath_engine.server``) and by the engine loops
(``dualpath_engine.engine``): both sides validate every message with these pydantic models.

Endpoints on the scheduler (both JSON, ``POST``):

``/engine/v1/fetch`` (:class:`FetchRequest` -> :class:`FetchReply`)
    Long poll. The leader of a group (all engines of one node, one role) reports every engine's
    ``seq``/``tok``/free HBM, the node's storage read queue and its engines' KV transport endpoints,
    acknowledges the previous reply, and gets work. The scheduler answers as soon as it has something
    for the group (assignments, cancels, a drain or role change) or after ``wait_s`` seconds with an
    empty reply. A fetch also serves as the group's heartbeat: a group silent for longer than the
    scheduler's ``engine_timeout_s`` is declared lost and its unfinished requests are re-queued.

``/engine/v1/results`` (:class:`ResultBatch` -> :class:`ResultAck`)
    Any engine posts task events: generated token deltas (indexed, so a re-post or a PE that reports
    the first token is harmless), ``prefill_done`` from the PE, the finish reason, an error (the
    scheduler retries the request elsewhere), KV read bytes by path and the chained hashes of Full
    Blocks it persisted (they enter the scheduler's prefix index). The ack lists tasks to stop.

Delivery rules the engines rely on:

* One task (``task_id`` = ``<request_id>.<attempt>``) is delivered to both its prefill and its decode
  engine, in their groups' fetch replies, once both engines are chosen (the paper picks the read side
  "once both are known"). Either engine may hear of it first; the transport must tolerate a peer
  that contacts it about a task it has not fetched yet (wait for the fetch, or buffer).
* Replies carry ``reply_id``; the next fetch sends ``ack_reply_id``. Tasks of an unacknowledged reply
  are sent again, so engines must treat a repeated ``task_id`` as already known.
* ``incarnation`` is a random id chosen when the group's process starts; a new incarnation means the
  group restarted and lost its tasks, which the scheduler re-queues.
* Loads must include every task the group received in earlier replies; the scheduler adds the load
  of tasks assigned but not yet acknowledged on top of what is reported.
* A retried request (its decode engine died, or an engine reported an error) comes back as a new
  attempt whose prompt is the original prompt followed by the tokens already streamed to the client,
  with ``max_tokens`` reduced accordingly, so the client's stream continues seamlessly.
* ``role`` in the reply is the role the group must have; when it differs from the fetch's role
  (an in-place role switch) the scheduler has already drained the group, so the leader switches
  without a restart or model reload and reports the new role from its next fetch.
* ``hit_blocks`` are the scheduler's belief; a block that turns out missing or corrupt on read is a
  miss the engine recomputes (the output must not change).
"""

from __future__ import annotations

from typing import Literal

import pydantic

PROTOCOL_VERSION = 1
"""Bumped on incompatible changes; a fetch with another version is refused with 409."""

FETCH_PATH = "/engine/v1/fetch"
RESULTS_PATH = "/engine/v1/results"

Role = Literal["prefill", "decode"]
Side = Literal["pe", "de"]
TransportKind = Literal["tcp", "cuda", "rdma"]
FinishReason = Literal["stop", "length"]


class _Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class TransportEndpoint(_Message):
    """Where an engine's KV transport listens, and which transport actually carries KV."""

    kind: TransportKind = pydantic.Field(description="Transport carrying KV: tcp, cuda or rdma.")
    host: str = pydantic.Field(min_length=1, description="Address the transport listens on (pod IP).")
    port: int = pydantic.Field(ge=0, le=65535, description="Port the transport listens on.")


class EngineReport(_Message):
    """One engine's load and transport, as its group leader reports it on each fetch."""

    engine_id: str = pydantic.Field(min_length=1, description="Engine name, unique in the cluster.")
    seq: int = pydantic.Field(ge=0, description="Assigned requests not yet finished (seq_e).")
    tok: int = pydantic.Field(ge=0, description="Total tokens of those requests (tok_e).")
    free_hbm_bytes: int = pydantic.Field(
        default=0, ge=0, description="Free KV memory of a decode engine in bytes (ignored for prefill)."
    )
    transport: TransportEndpoint = pydantic.Field(description="This engine's KV transport endpoint.")


class FetchRequest(_Message):
    """A group leader's fetch: the group's load, its heartbeat and the ack of the previous reply."""

    protocol_version: int = pydantic.Field(
        default=PROTOCOL_VERSION, description="Protocol version the engine speaks."
    )
    group_id: str = pydantic.Field(min_length=1, description="Engine group id, unique across roles.")
    incarnation: str = pydantic.Field(
        min_length=1, description="Random id chosen at process start; changes when the group restarts."
    )
    role: Role = pydantic.Field(description="The group's current role.")
    node: str = pydantic.Field(min_length=1, description="Kubernetes node of the group (its storage NIC).")
    engines: tuple[EngineReport, ...] = pydantic.Field(
        min_length=1, description="Every engine of the group, leader (rank 0) first."
    )
    read_queue_tokens: int = pydantic.Field(
        ge=0, description="The node's storage read queue in tokens (rq_n, compared with alpha)."
    )
    read_queue_bytes: int = pydantic.Field(default=0, ge=0, description="The same queue in bytes.")
    ack_reply_id: int | None = pydantic.Field(
        default=None, description="reply_id of the last reply the leader processed; None on the first fetch."
    )
    wait_s: float = pydantic.Field(
        default=1.0, ge=0, le=30, description="Longest time the scheduler may hold the fetch (long poll)."
    )
    max_assignments: int | None = pydantic.Field(
        default=None, ge=1, description="Most new assignments wanted in this reply; None = no limit."
    )

    @pydantic.model_validator(mode="after")
    def _unique_engines(self) -> FetchRequest:
        ids = [engine.engine_id for engine in self.engines]
        if len(set(ids)) != len(ids):
            raise ValueError("engines: engine_id values must be unique within a group")
        return self


class SamplingParams(_Message):
    """How the decode engine samples."""

    max_tokens: int = pydantic.Field(ge=1, description="Tokens to generate at most.")
    temperature: float = pydantic.Field(default=0.0, ge=0, le=2, description="0 = greedy (deterministic).")
    top_p: float = pydantic.Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = pydantic.Field(default=None, description="Seed for sampling; None = engine's own.")
    ignore_eos: bool = pydantic.Field(
        default=False, description="Generate exactly max_tokens (trace replay forces the length)."
    )
    stop_token_ids: tuple[int, ...] = pydantic.Field(
        default=(), description="Token ids that end generation besides EOS (not returned)."
    )


class HitBlock(_Message):
    """A Full Block of the prompt that storage holds, and which side reads it."""

    index: int = pydantic.Field(ge=0, description="Block index in the prompt (tokens index*B..(index+1)*B).")
    hash: str = pydantic.Field(min_length=1, description="Chained block hash (hex), the storage key.")
    side: Side = pydantic.Field(description="pe: the PE's node reads it; de: the DE's node reads it.")


class PeerInfo(_Message):
    """An engine taking part in a task, and how to reach its KV transport."""

    engine_id: str = pydantic.Field(description="Engine name.")
    group_id: str = pydantic.Field(description="Its group.")
    node: str = pydantic.Field(description="Its node.")
    transport: TransportEndpoint = pydantic.Field(description="Its KV transport endpoint.")


class ChunkPlan(_Message):
    """What the prefill engine computes: the hit prefix is loaded, the rest is computed in chunks."""

    cached_tokens: int = pydantic.Field(ge=0, description="Prompt tokens covered by hit blocks.")
    compute_tokens: int = pydantic.Field(ge=0, description="Prompt tokens the PE computes (the miss).")
    compute_quota_ms: float = pydantic.Field(
        gt=0, description="Attention time per forward batch; longer misses are chunked (binary search)."
    )


class Assignment(_Message):
    """One task delivered to an engine; its prefill and decode engines get the same task."""

    task_id: str = pydantic.Field(description="<request_id>.<attempt>; unique, stable across re-sends.")
    request_id: str = pydantic.Field(description="The client request.")
    attempt: int = pydantic.Field(ge=0, description="0 first time; higher after a retry.")
    role: Role = pydantic.Field(description="The part the receiving engine plays in this task.")
    engine_id: str = pydantic.Field(description="The engine of the fetching group that runs it.")
    prompt_token_ids: tuple[int, ...] = pydantic.Field(min_length=1, description="The full prompt.")
    sampling: SamplingParams = pydantic.Field(description="Decoding parameters.")
    block_tokens: int = pydantic.Field(ge=1, description="Tokens per Full Block.")
    hit_blocks: tuple[HitBlock, ...] = pydantic.Field(
        description="Leading Full Blocks held by storage, in prompt order, with their read side."
    )
    read_side: Side = pydantic.Field(description="Side reading most (all, unless split) hit blocks.")
    prefill: PeerInfo = pydantic.Field(description="The prefill engine.")
    decode: PeerInfo = pydantic.Field(description="The decode engine.")
    chunk_plan: ChunkPlan = pydantic.Field(description="Cached vs computed tokens and the compute quota.")


class Cancel(_Message):
    """Stop a task (client gone, timeout, or the request was retried elsewhere)."""

    task_id: str = pydantic.Field(description="Task to stop; unknown ids are ignored.")
    reason: str = pydantic.Field(description="Why, for logs.")


class FetchReply(_Message):
    """The scheduler's answer to a fetch."""

    reply_id: int = pydantic.Field(ge=0, description="Acknowledge it in the next fetch's ack_reply_id.")
    assignments: tuple[Assignment, ...] = pydantic.Field(default=(), description="New (or re-sent) tasks.")
    cancels: tuple[Cancel, ...] = pydantic.Field(default=(), description="Tasks to stop.")
    role: Role = pydantic.Field(description="The role the group must have (differs: switch in place).")
    drained: bool = pydantic.Field(
        default=False, description="The group gets no new work; it finishes what it has."
    )


class TaskEvent(_Message):
    """Progress of one task, posted by the engine running it."""

    task_id: str = pydantic.Field(description="The task.")
    engine_id: str = pydantic.Field(description="The engine posting.")
    first_index: int = pydantic.Field(
        default=0, ge=0, description="Output position of token_ids[0] within this attempt."
    )
    token_ids: tuple[int, ...] = pydantic.Field(default=(), description="Generated tokens from first_index.")
    prefill_done: bool = pydantic.Field(
        default=False, description="The PE finished prefill and handed all KV to the DE."
    )
    cached_tokens: int | None = pydantic.Field(
        default=None, ge=0, description="Prompt tokens actually loaded from storage (hits that were read)."
    )
    finish_reason: FinishReason | None = pydantic.Field(
        default=None, description="Set on the last event: stop (EOS/stop id) or length (max_tokens)."
    )
    error: str | None = pydantic.Field(
        default=None, description="The task failed on this engine; the scheduler retries it elsewhere."
    )
    kv_read_bytes_pe: int = pydantic.Field(default=0, ge=0, description="KV bytes read on the PE path.")
    kv_read_bytes_de: int = pydantic.Field(default=0, ge=0, description="KV bytes read on the DE path.")
    persisted_block_hashes: tuple[str, ...] = pydantic.Field(
        default=(), description="Chained hashes of Full Blocks written to storage since the last event."
    )


class ResultBatch(_Message):
    """Events of one group, posted together (e.g. once per decode step)."""

    group_id: str = pydantic.Field(min_length=1, description="The posting group.")
    events: tuple[TaskEvent, ...] = pydantic.Field(description="Task events in order.")


class ResultAck(_Message):
    """Answer to a result post: tasks the scheduler no longer wants."""

    cancels: tuple[Cancel, ...] = pydantic.Field(default=(), description="Tasks to stop now.")
