"""Frozen configuration of one simulated run: hardware, cost model, cluster shape and mode.

Read by ``bench.sim.cluster`` (the event loop) and built by ``bench.sim.scenarios`` and the tests.
Defaults describe a DS 27B-like model (the paper's Fig. 8 model, dualpath-paper.md 8.1) on the
paper's reference node (8 Hopper GPUs, one 400 Gbps compute NIC per GPU, one 400 Gbps storage NIC
per node). The cost-model coefficients are our own estimates [inference], chosen so that the run
is storage-bound the way the paper describes (section 1.1); they are stated in docs/benchmarks.md.

Modes (dualpath-paper.md 8.1 and 12): ``basic`` reads every hit block on the PE node and does not
overlap KV loading with compute (no layer-wise prefill); ``dualpath`` uses the paper's read-side
rule and layer-wise prefill; ``oracle`` is ``dualpath`` with no storage reads, no H2D/D2H and no
PE->DE transfer. Extensions (``weights_aware``, ``split_reads``) refine the ``dualpath`` read side.
"""

from __future__ import annotations

from typing import Literal

import pydantic

Mode = Literal["basic", "dualpath", "oracle"]
SchedulerKind = Literal["paper", "round_robin"]

_FROZEN = pydantic.ConfigDict(frozen=True, extra="forbid")


class Hardware(pydantic.BaseModel):
    """Per-node links (the paper's notation: g GPUs, CNIC bandwidth B, SNIC s*B, DRAM M)."""

    model_config = _FROZEN

    gpus_per_node: int = pydantic.Field(default=8, ge=1, le=16, description="g: GPUs (engines) per node.")
    cnic_bytes_per_s: float = pydantic.Field(
        default=50e9, gt=0, description="B: one GPU's compute-NIC bandwidth (400 Gbps = 50 GB/s)."
    )
    snic_share: float = pydantic.Field(
        default=1.0, gt=0, description="s: storage-NIC bandwidth per node as a multiple of B."
    )
    dram_bytes_per_s: float = pydantic.Field(
        default=500e9, gt=0, description="M: host memory bandwidth per node (only for the validity bound)."
    )
    hbm_kv_bytes_per_gpu: int = pydantic.Field(
        default=60 * 10**9, gt=0, description="HBM left for KV on one decode GPU after weights."
    )

    @property
    def snic_bytes_per_s(self) -> float:
        """Storage-NIC line rate of one node, s*B."""
        return self.snic_share * self.cnic_bytes_per_s


class CostModel(pydantic.BaseModel):
    """KV geometry and compute-time fits of the simulated model (DS 27B-like; [inference])."""

    model_config = _FROZEN

    layers: int = pydantic.Field(default=30, ge=1, description="Transformer layers (DS 27B: 30).")
    kv_bytes_per_token: int = pydantic.Field(
        default=30 * (656 + 68),
        gt=0,
        description="KV bytes per token, all layers: MLA FP8 entry (656 B) + indexer key (68 B) per layer.",
    )
    block_tokens: int = pydantic.Field(default=64, ge=1, description="Tokens per Full Block (paper: 64).")
    attn_per_token_s: float = pydantic.Field(
        default=1e-6, ge=0, description="Attention seconds per new token (projection part of t_attn)."
    )
    attn_per_pair_s: float = pydantic.Field(
        default=3e-10, ge=0, description="Attention seconds per query-key pair (indexer over the context)."
    )
    linear_per_token_s: float = pydantic.Field(
        default=25e-6, ge=0, description="FFN/MoE and projection seconds per new prefill token."
    )
    batch_fixed_s: float = pydantic.Field(
        default=0.005, ge=0, description="Fixed cost of one prefill forward."
    )
    quota_s: float = pydantic.Field(
        default=0.300,
        gt=0,
        description="PE compute quota of predicted attention time per batch (paper: 300 ms).",
    )
    decode_step_fixed_s: float = pydantic.Field(
        default=0.008, ge=0, description="Fixed seconds of one decode step (weights, collectives)."
    )
    decode_per_seq_s: float = pydantic.Field(
        default=2e-5, ge=0, description="Decode-step seconds per running sequence."
    )
    decode_per_context_token_s: float = pydantic.Field(
        default=1e-9, ge=0, description="Decode-step seconds per context token of the running batch."
    )

    @property
    def block_bytes(self) -> int:
        """Bytes of one Full Block."""
        return self.block_tokens * self.kv_bytes_per_token


class Cluster(pydantic.BaseModel):
    """Node counts and per-node storage-NIC health."""

    model_config = _FROZEN

    prefill_nodes: int = pydantic.Field(default=1, ge=1, le=144, description="P: prefill nodes.")
    decode_nodes: int = pydantic.Field(default=1, ge=1, le=144, description="D: decode nodes.")
    snic_health: dict[str, float] = pydantic.Field(
        default_factory=dict,
        description="Node name -> fraction of its storage-NIC line rate that is usable (e.g. 0.5).",
    )

    @pydantic.model_validator(mode="after")
    def _size(self) -> Cluster:
        if self.prefill_nodes + self.decode_nodes > 144:
            raise ValueError("at most 144 nodes (1,152 GPUs)")
        for node, health in self.snic_health.items():
            if not 0 < health <= 1:
                raise ValueError(f"snic_health[{node}] must be in (0, 1]")
        return self

    @property
    def label(self) -> str:
        """The paper's shorthand, e.g. ``1P2D``."""
        return f"{self.prefill_nodes}P{self.decode_nodes}D"


class SimConfig(pydantic.BaseModel):
    """Everything one run needs besides the workload."""

    model_config = _FROZEN

    mode: Mode = pydantic.Field(default="dualpath", description="basic, dualpath or oracle.")
    scheduler: SchedulerKind = pydantic.Field(
        default="paper", description="paper: the real policy; round_robin: the paper's balance baseline."
    )
    weights_aware: bool = pydantic.Field(
        default=False, description="Extension: read side by expected wait (queued bytes / usable capacity)."
    )
    split_reads: bool = pydantic.Field(
        default=False, description="Extension: divide a request's hit blocks between both sides."
    )
    read_side_tie_break: Literal["prefill", "least_read"] = pydantic.Field(
        default="prefill",
        description="Equal read queues: prefill = the PE side (paper); least_read = the node assigned "
        "fewer read tokens so far (the scheduler's extension).",
    )
    cluster: Cluster = pydantic.Field(default_factory=Cluster, description="Node counts and NIC health.")
    hardware: Hardware = pydantic.Field(default_factory=Hardware, description="Links and memory.")
    cost: CostModel = pydantic.Field(default_factory=CostModel, description="Geometry and compute fits.")
    alpha_seconds: float = pydantic.Field(
        default=3.0, gt=0, description="alpha: tokens a node reads from storage in this many seconds."
    )
    beta_seconds: float = pydantic.Field(
        default=5.0, gt=0, description="beta: tokens one GPU prefills in this many seconds."
    )
    z_factor: float = pydantic.Field(default=1.05, gt=0, description="DE high-token factor Z (paper: 1.05).")
    fetch_interval_s: float = pydantic.Field(
        default=0.02, gt=0, description="Gap between scheduler fetch rounds while work is being assigned."
    )
    fetch_limit: int = pydantic.Field(
        default=64, ge=1, description="Most requests one group takes in one fetch (head of the FIFO)."
    )
    decode_steps_per_event: int = pydantic.Field(
        default=8, ge=1, description="Decode steps simulated per event (new requests join between them)."
    )
    window_s: float = pydantic.Field(
        default=1.0, gt=0, description="Window of the storage-NIC balance metric."
    )
    rebalance_interval_s: float | None = pydantic.Field(
        default=None,
        gt=0,
        description="Seconds between rebalance ticks (weights and/or ratio planners); None: no ticks.",
    )
    max_sim_seconds: float = pydantic.Field(
        default=1e6, gt=0, description="Safety bound on simulated time; a run that reaches it is reported."
    )
