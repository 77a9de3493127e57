"""The simulation's moving parts: requests, prefill and decode engines, nodes, and a run's result.

Mutable records owned and changed only by ``bench.sim.cluster`` (the event loop); ``RunResult`` is
what a run returns to ``bench.sim.scenarios``, ``bench.__main__`` and the tests.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal

from bench.sim import links

Role = Literal["prefill", "decode"]


@dataclass(slots=True, eq=False)
class Request:
    """One agent turn as it moves through the cluster."""

    request_id: str
    agent: int
    prompt: int
    hit_tokens: int
    generate: int
    arrived: float
    pe: PrefillEngine | None = None
    de: DecodeEngine | None = None
    pe_hit_tokens: int = 0
    de_hit_tokens: int = 0
    reads_left: int = 0
    cached: int = 0
    remaining: int = 0
    first_token: float = -1.0
    done: float = -1.0
    to_generate: int = 0
    context: int = 0

    @property
    def de_tokens(self) -> int:
        """``len(r)`` on the decode side: prompt plus generation (as ``scheduler.state`` counts it)."""
        return self.prompt + self.generate


@dataclass(slots=True, eq=False)
class PrefillEngine:
    """One prefill GPU: load bookkeeping and the FIFO of requests whose reads are done."""

    engine_id: str
    node: Node
    tok: int = 0
    seq: int = 0
    ready: collections.deque[Request] = field(default_factory=collections.deque)
    busy: bool = False
    busy_seconds: float = 0.0


@dataclass(slots=True, eq=False)
class DecodeEngine:
    """One decode GPU: load bookkeeping, free KV HBM and the running continuous batch."""

    engine_id: str
    node: Node
    free_hbm: int
    tok: int = 0
    seq: int = 0
    running: list[Request] = field(default_factory=list)
    joining: list[Request] = field(default_factory=list)
    busy: bool = False


@dataclass(slots=True, eq=False)
class Node:
    """One node (one engine group): its role, its storage NIC and its engines."""

    name: str
    role: Role
    snic: links.FifoLink
    prefill: list[PrefillEngine] = field(default_factory=list)
    decode: list[DecodeEngine] = field(default_factory=list)
    accepting: bool = True
    switch_to: Role | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run measured; byte counters are totals over the run."""

    label: str
    completed: bool
    jct_s: float
    requests: int
    prompt_tokens: int
    hit_tokens: int
    computed_tokens: int
    generated_tokens: int
    pe_path_bytes: float
    de_path_bytes: float
    snic_read_bytes: dict[str, float]
    snic_written_bytes: float
    pe_cnic_in_bytes: float
    snic_max_over_avg: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    storage_bound_jct_s: float
    """Lower bound on JCT from the storage NICs this mode may use (Basic: PE nodes; else all)."""
    role_switches: int
    read_wait_s: dict[str, float]
    """Mean wait of a read job in each node's storage read queue (nodes that read anything)."""
