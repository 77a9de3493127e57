"""The central scheduler's inter-engine policy (DualPath paper section 6.1), as pure functions.

Called by ``scheduler.state`` on every group-leader fetch, and by the simulator in ``bench/sim`` so
that the simulated cluster runs the very same decisions. Every function here is a function of a
point-in-time view passed in as arguments: no I/O, no clock, no randomness, no asyncio.

Algorithm notes (paper rules; our inferences marked [inference], as in dualpath-paper.md section 6):

PE selection, on a PE-group fetch (global FIFO). For the request at the head of the queue the
fetching group's engines are put in three categories::

    C_over  = { e : tok[e] >  beta }                         never assigned
    C_short = { e : tok[e] <= beta and rq[node(e)] <= alpha }
    C_long  = { e : tok[e] <= beta and rq[node(e)] >  alpha }

and the request goes to argmin tok in C_short, else argmin tok in C_long; when both are empty the
fetch stops (FIFO: no later request overtakes the head). ``tok`` of the chosen engine grows by the
request's tokens after each assignment and the categories are recomputed [inference].

DE selection, two levels. Phase 1 drains the global DE queue into per-group private queues, each
request to the group with the smallest token load; the load counts the engines' ``tok`` plus the
requests already queued privately for that group, so one drain spreads over groups [inference].
Phase 2, inside the fetching group: ``R`` = longest prefix of the private queue whose HBM need fits in
the group's free HBM; ``Z = z_factor * (sum len(R) + sum tok) / |E|``; for the head request,
``fit`` = engines with enough free HBM (empty: the fetch stops), ``low`` = engines in ``fit`` with
``tok + len(r) <= Z``; the request goes to argmin ``seq`` in ``low``, else argmin ``tok`` in ``fit``.

Read side: the side whose node has the shorter storage read queue (tokens). Ties go to the PE side:
the paper's pseudo-code compares with ``<=``, and the PE path needs no extra compute-network hop.
The chosen node's read queue grows by the request's hit tokens [inference].

Extensions (off by default, selected by the caller): weights-aware read side (expected wait = queued
bytes / usable storage-NIC capacity of each side's node), split reads (a request's hit blocks divided
between both sides so both queues finish together), drain (a drained group gets no new work; see
``distribute_to_decode_groups`` and ``scheduler.state``) and forced sides (``pe-only``/``de-only``).

Read-side tie-break (our extension, not the paper's; ``TieBreak``): ``prefill`` is the paper's rule
above. With ``least_read`` a tie (equal read queues, or equal expected finish times for the
weights-aware rule) goes to the side whose node has been assigned fewer read tokens so far (a
cumulative count per node kept by the caller); equal counts still go to the PE. Why: with sequential
agentic turns both queues are usually empty, and the PE node is a candidate for every request while
a DE node only for its own, so under ``prefill`` a 1P2D cluster's PE node reads about half of all
bytes instead of a third. Non-tied decisions and split reads are unaffected.

Ties between engines with equal keys are broken by their order in the input (the leader's rank
order), which keeps every decision deterministic.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Side = Literal["pe", "de"]
"""Which engine's node reads a hit block from storage: the prefill engine's or the decode engine's."""

ReadMode = Literal["shorter_queue", "weights_aware", "pe_only", "de_only"]
"""How the read side is chosen: the paper's rule, the weights-aware extension, or a forced side."""

TieBreak = Literal["prefill", "least_read"]
"""Who reads on a tie: the PE side (paper) or the node assigned fewer read tokens so far (extension)."""

PeCategory = Literal["short", "long"]
DeChoice = Literal["normal", "high_token"]
PeStop = Literal["empty", "all_overloaded", "limit"]
DeStop = Literal["empty", "no_hbm", "limit"]


@dataclass(frozen=True, slots=True)
class EngineView:
    """One engine's load as its group leader reported it (plus work assigned since, if any)."""

    engine_id: str
    node: str
    seq: int
    """Assigned requests not yet finished (``seq_e``)."""
    tok: int
    """Total tokens of those requests (``tok_e``)."""
    free_hbm_bytes: int = 0
    """Free HBM for KV (decode engines; unused for prefill engines)."""


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the policy needs to know about a waiting request."""

    request_id: str
    tokens: int
    """``len(r)``: the tokens the request adds to an engine's ``tok``."""
    hbm_bytes: int = 0
    """``need(r)``: HBM the request's KV needs on a decode engine."""


@dataclass(frozen=True, slots=True)
class PeAssignment:
    """A request bound to a prefill engine, with the category the engine was taken from."""

    request_id: str
    engine_id: str
    category: PeCategory


@dataclass(frozen=True, slots=True)
class PeFetch:
    """Result of one PE-group fetch: assignments in FIFO order, why it stopped, updated ``tok``."""

    assignments: tuple[PeAssignment, ...]
    stop: PeStop
    tok: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class DeAssignment:
    """A request bound to a decode engine; ``high_token`` when no engine was under ``Z``."""

    request_id: str
    engine_id: str
    choice: DeChoice


@dataclass(frozen=True, slots=True)
class DeFetch:
    """Result of phase 2 of one DE-group fetch, with the engines' updated bookkeeping."""

    assignments: tuple[DeAssignment, ...]
    stop: DeStop
    z_tokens: float
    tok: Mapping[str, int]
    seq: Mapping[str, int]
    free_hbm_bytes: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Which side reads each hit block, in block order, and the tokens each side reads."""

    primary: Side
    """The side that reads the whole request (paper rule), or the larger share for split reads."""
    sides: tuple[Side, ...]
    pe_tokens: int
    de_tokens: int


def select_prefill_engines(
    queue: Sequence[RequestView],
    engines: Sequence[EngineView],
    read_queue_tokens: Mapping[str, int],
    alpha_tokens: int,
    beta_tokens: int,
    max_assignments: int | None = None,
) -> PeFetch:
    """Assign requests from the head of the global PE FIFO to the fetching group's engines.

    ``read_queue_tokens`` maps a node to its storage read queue in tokens (``rq``); a node missing
    from it counts as an empty queue. ``max_assignments`` bounds one fetch (``None``: no bound).
    """
    tok = {e.engine_id: e.tok for e in engines}
    assignments: list[PeAssignment] = []
    stop: PeStop = "empty"
    for request in queue:
        if max_assignments is not None and len(assignments) >= max_assignments:
            stop = "limit"
            break
        best_short: EngineView | None = None
        best_long: EngineView | None = None
        for engine in engines:
            load = tok[engine.engine_id]
            if load > beta_tokens:
                continue  # C_over: never assigned
            if read_queue_tokens.get(engine.node, 0) <= alpha_tokens:
                if best_short is None or load < tok[best_short.engine_id]:
                    best_short = engine
            elif best_long is None or load < tok[best_long.engine_id]:
                best_long = engine
        category: PeCategory
        if best_short is not None:
            chosen, category = best_short, "short"
        elif best_long is not None:
            chosen, category = best_long, "long"
        else:
            stop = "all_overloaded"
            break
        tok[chosen.engine_id] += request.tokens
        assignments.append(PeAssignment(request.request_id, chosen.engine_id, category))
    return PeFetch(tuple(assignments), stop, tok)


def distribute_to_decode_groups(
    queue: Sequence[RequestView],
    group_tokens: Mapping[str, int],
) -> dict[str, list[str]]:
    """Phase 1 of DE selection: spread the global DE queue over the groups' private queues.

    ``group_tokens`` maps every group that may take new work (drained groups left out by the
    caller) to its current load: the sum of its engines' ``tok`` plus the tokens of requests already
    in its private queue. Returns, per group, the request ids appended to its private queue, in
    queue order. With no group available nothing is distributed.
    """
    result: dict[str, list[str]] = {}
    if not group_tokens:
        return result
    order = {group: index for index, group in enumerate(group_tokens)}
    heap = [(load, order[group], group) for group, load in group_tokens.items()]
    heapq.heapify(heap)
    for request in queue:
        load, rank, group = heapq.heappop(heap)
        result.setdefault(group, []).append(request.request_id)
        heapq.heappush(heap, (load + request.tokens, rank, group))
    return result


def select_decode_engines(
    private_queue: Sequence[RequestView],
    engines: Sequence[EngineView],
    z_factor: float = 1.05,
    max_assignments: int | None = None,
) -> DeFetch:
    """Phase 2 of DE selection inside the fetching group (its private queue, in order)."""
    tok = {e.engine_id: e.tok for e in engines}
    seq = {e.engine_id: e.seq for e in engines}
    free = {e.engine_id: e.free_hbm_bytes for e in engines}
    if not engines:
        return DeFetch((), "empty" if not private_queue else "no_hbm", 0.0, tok, seq, free)
    budget = sum(free.values())
    prefix_tokens = 0
    for request in private_queue:
        if request.hbm_bytes > budget:
            break
        budget -= request.hbm_bytes
        prefix_tokens += request.tokens
    z_tokens = z_factor * (prefix_tokens + sum(tok.values())) / len(engines)
    assignments: list[DeAssignment] = []
    stop: DeStop = "empty"
    for request in private_queue:
        if max_assignments is not None and len(assignments) >= max_assignments:
            stop = "limit"
            break
        best_low: EngineView | None = None
        best_fit: EngineView | None = None
        for engine in engines:
            eid = engine.engine_id
            if free[eid] < request.hbm_bytes:
                continue
            if best_fit is None or tok[eid] < tok[best_fit.engine_id]:
                best_fit = engine
            if tok[eid] + request.tokens <= z_tokens and (
                best_low is None or seq[eid] < seq[best_low.engine_id]
            ):
                best_low = engine
        if best_fit is None:
            stop = "no_hbm"
            break
        choice: DeChoice = "normal" if best_low is not None else "high_token"
        chosen = best_low if best_low is not None else best_fit
        eid = chosen.engine_id
        tok[eid] += request.tokens
        seq[eid] += 1
        free[eid] -= request.hbm_bytes
        assignments.append(DeAssignment(request.request_id, eid, choice))
    return DeFetch(tuple(assignments), stop, z_tokens, tok, seq, free)


def choose_read_side(
    pe_node: str,
    de_node: str,
    read_queue_tokens: Mapping[str, int],
    *,
    tie_break: TieBreak = "prefill",
    read_tokens: Mapping[str, float] | None = None,
) -> Side:
    """The paper's rule: the side whose node has the shorter read queue; ties go to the PE.

    With ``tie_break="least_read"`` a tie goes to the side whose node has the fewer cumulative read
    tokens in ``read_tokens`` (a node missing from it counts 0); equal counts go to the PE.
    """
    pe_queue = read_queue_tokens.get(pe_node, 0)
    de_queue = read_queue_tokens.get(de_node, 0)
    if pe_queue != de_queue:
        return "pe" if pe_queue < de_queue else "de"
    return _tie(tie_break, read_tokens, pe_node, de_node)


def _tie(tie_break: TieBreak, read_tokens: Mapping[str, float] | None, pe_node: str, de_node: str) -> Side:
    if tie_break == "least_read" and read_tokens is not None:
        return "de" if read_tokens.get(de_node, 0.0) < read_tokens.get(pe_node, 0.0) else "pe"
    return "pe"


def expected_wait_seconds(queued_bytes: float, capacity_bytes_per_second: float) -> float:
    """Expected time until a node's storage read queue drains: queued bytes / usable capacity.

    A node without usable capacity (0 or less) waits forever unless its queue is empty.
    """
    if capacity_bytes_per_second <= 0:
        return 0.0 if queued_bytes <= 0 else math.inf
    return max(queued_bytes, 0.0) / capacity_bytes_per_second


def choose_read_side_weighted(
    pe_queued_bytes: float,
    de_queued_bytes: float,
    pe_capacity_bytes_per_second: float,
    de_capacity_bytes_per_second: float,
    request_bytes: float,
    *,
    tie_break: TieBreak = "prefill",
    pe_read_tokens: float = 0.0,
    de_read_tokens: float = 0.0,
) -> Side:
    """Weights-aware extension: the side that would finish this request's read first.

    Compares (queued + request) / capacity of both nodes; ties go to the PE, as in the paper's rule.
    With equal capacities this is the paper's shorter-queue rule expressed in bytes. With
    ``tie_break="least_read"`` a tie goes to the side whose node has the fewer cumulative read
    tokens (``pe_read_tokens``/``de_read_tokens``); equal counts go to the PE.
    """
    pe_finish = expected_wait_seconds(pe_queued_bytes + request_bytes, pe_capacity_bytes_per_second)
    de_finish = expected_wait_seconds(de_queued_bytes + request_bytes, de_capacity_bytes_per_second)
    if pe_finish != de_finish:
        return "pe" if pe_finish < de_finish else "de"
    if tie_break == "least_read" and de_read_tokens < pe_read_tokens:
        return "de"
    return "pe"


def split_blocks(
    num_blocks: int,
    block_bytes: float,
    pe_queued_bytes: float,
    de_queued_bytes: float,
    pe_capacity_bytes_per_second: float,
    de_capacity_bytes_per_second: float,
) -> int:
    """Split-reads extension: how many of a request's hit blocks the PE side reads.

    Chooses ``k`` in ``[0, num_blocks]`` minimising the later of the two finish times
    ``(q_pe + k*b)/c_pe`` and ``(q_de + (n-k)*b)/c_de`` (both sides finish together when possible);
    among equal finish times the larger PE share wins. The caller gives the first ``k`` blocks to the
    PE side and the rest to the DE side.
    """
    if num_blocks <= 0:
        return 0
    pe_cap, de_cap = pe_capacity_bytes_per_second, de_capacity_bytes_per_second
    if pe_cap <= 0 and de_cap <= 0:
        return num_blocks
    if de_cap <= 0:
        return num_blocks
    if pe_cap <= 0:
        return 0
    # Continuous solution of (q_pe + k b) / c_pe == (q_de + (n - k) b) / c_de.
    ideal = (pe_cap * (de_queued_bytes + num_blocks * block_bytes) - de_cap * pe_queued_bytes) / (
        block_bytes * (pe_cap + de_cap)
    )
    candidates = {0, num_blocks, min(num_blocks, max(0, math.floor(ideal)))}
    candidates.add(min(num_blocks, max(0, math.ceil(ideal))))

    def finish(k: int) -> float:
        pe_done = (pe_queued_bytes + k * block_bytes) / pe_cap if k else 0.0
        de_done = (de_queued_bytes + (num_blocks - k) * block_bytes) / de_cap if k < num_blocks else 0.0
        return max(pe_done, de_done)

    return min(candidates, key=lambda k: (finish(k), -k))


def plan_read(
    mode: ReadMode,
    split: bool,
    num_blocks: int,
    block_tokens: int,
    pe_node: str,
    de_node: str,
    read_queue_tokens: Mapping[str, int],
    bytes_per_token: float,
    capacity_bytes_per_second: Mapping[str, float],
    default_capacity_bytes_per_second: float,
    *,
    tie_break: TieBreak = "prefill",
    read_tokens: Mapping[str, float] | None = None,
) -> ReadPlan:
    """Decide the read side(s) of one request whose PE and DE are both known.

    ``mode`` picks the rule (``shorter_queue`` is the paper's); ``split`` divides the hit blocks
    between both sides (ignored for forced modes). Queues are in tokens (as engines report them);
    the weights-aware rule converts them to bytes with ``bytes_per_token`` and divides by each
    node's usable storage-NIC capacity (``default_capacity_bytes_per_second`` for nodes without a
    pushed weight). Split reads without ``weights_aware`` treat both capacities as equal.
    ``tie_break`` and ``read_tokens`` (cumulative read tokens per node) decide whole-request ties;
    see the module notes.
    """
    total_tokens = num_blocks * block_tokens
    if mode in ("pe_only", "de_only"):
        side: Side = "pe" if mode == "pe_only" else "de"
        return _whole(side, num_blocks, total_tokens)
    if mode == "weights_aware":
        pe_cap = capacity_bytes_per_second.get(pe_node, default_capacity_bytes_per_second)
        de_cap = capacity_bytes_per_second.get(de_node, default_capacity_bytes_per_second)
    else:
        pe_cap = de_cap = 1.0
    pe_bytes = read_queue_tokens.get(pe_node, 0) * bytes_per_token
    de_bytes = read_queue_tokens.get(de_node, 0) * bytes_per_token
    if split and num_blocks > 0:
        block_bytes = block_tokens * bytes_per_token
        k = split_blocks(num_blocks, block_bytes, pe_bytes, de_bytes, pe_cap, de_cap)
        pe_side: Side = "pe"
        de_side: Side = "de"
        sides = (pe_side,) * k + (de_side,) * (num_blocks - k)
        primary: Side = "pe" if 2 * k >= num_blocks else "de"
        return ReadPlan(primary, sides, k * block_tokens, (num_blocks - k) * block_tokens)
    if mode == "weights_aware":
        request_bytes = total_tokens * bytes_per_token
        so_far = read_tokens if read_tokens is not None else {}
        side = choose_read_side_weighted(
            pe_bytes,
            de_bytes,
            pe_cap,
            de_cap,
            request_bytes,
            tie_break=tie_break,
            pe_read_tokens=so_far.get(pe_node, 0.0),
            de_read_tokens=so_far.get(de_node, 0.0),
        )
    else:
        side = choose_read_side(
            pe_node, de_node, read_queue_tokens, tie_break=tie_break, read_tokens=read_tokens
        )
    return _whole(side, num_blocks, total_tokens)


def _whole(side: Side, num_blocks: int, total_tokens: int) -> ReadPlan:
    pe_tokens = total_tokens if side == "pe" else 0
    return ReadPlan(side, (side,) * num_blocks, pe_tokens, total_tokens - pe_tokens)
