"""Frozen settings of one engine-benchmark run and the presets ``cpu-quick``, ``cpu`` and ``gpu``.

Read by every section module (:mod:`bench.engine.kvload`, :mod:`.overlap`, :mod:`.replay`,
:mod:`.calibration`) and built by :mod:`bench.engine.__main__` from the command line. Torch-free.
"""

from __future__ import annotations

from typing import Literal, Self

import pydantic

Device = Literal["cpu", "cuda"]
"""Where the benchmark runs."""


class _Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class KvGeometry(_Frozen):
    """KV geometry of the emulated model (bytes per token and layer = 2 * kv_heads * head_dim * 2)."""

    num_layers: int = pydantic.Field(default=32, ge=1, description="Decoder layers.")
    num_kv_heads: int = pydantic.Field(default=8, ge=1, description="KV heads per layer.")
    head_dim: int = pydantic.Field(default=128, ge=2, description="Head dimension (bf16 elements).")
    block_tokens: int = pydantic.Field(default=64, ge=1, description="Tokens per Full Block.")

    @property
    def bytes_per_token_layer(self) -> int:
        """K and V bytes of one token in one layer (bf16)."""
        return 2 * self.num_kv_heads * self.head_dim * 2

    @property
    def full_block_bytes(self) -> int:
        """Bytes of one Full Block."""
        return self.num_layers * self.block_tokens * self.bytes_per_token_layer


class CalibrationSettings(_Frozen):
    """Copy ceilings to measure."""

    sizes_mib: tuple[int, ...] = pydantic.Field(
        default=(1, 16, 256, 1024), description="Host<->device transfer sizes (MiB)."
    )
    block_tokens_sweep: tuple[int, ...] = pydantic.Field(
        default=(16, 32, 64, 128), description="Block sizes (tokens) of the layer-block copy sweep."
    )
    sweep_bytes_mib: int = pydantic.Field(default=1024, ge=1, description="Bytes moved per sweep point.")
    repeats: int = pydantic.Field(default=5, ge=1, description="Timed repeats per point (median kept).")


class KvLoadSettings(_Frozen):
    """The KV-load microbenchmark (storage -> PE memory over both read paths)."""

    geometry: KvGeometry = pydantic.Field(default_factory=KvGeometry, description="KV geometry.")
    decode_engines: int = pydantic.Field(default=2, ge=1, description="Decode engines (one node each).")
    requests: int = pydantic.Field(default=48, ge=1, description="Requests loaded at once.")
    blocks_per_request: int = pydantic.Field(default=16, ge=1, description="Hit Full Blocks per request.")
    distinct_blocks: int = pydantic.Field(default=64, ge=1, description="Distinct stored Full Blocks.")
    storage_budget_bytes_per_s: float = pydantic.Field(
        default=2e9,
        gt=0,
        description="Emulated storage-NIC budget of every node (bytes/s); the sum stays near half the "
        "harness's own unlimited rate (11.4 GB/s measured on the H200 box).",
    )
    compute_budget_bytes_per_s: float = pydantic.Field(
        default=8e9, gt=0, description="Emulated compute-NIC budget of every engine (bytes/s)."
    )
    read_workers: int = pydantic.Field(default=4, ge=1, description="Storage read workers per node.")
    staging_slots: int = pydantic.Field(default=8, ge=1, description="Host staging slots per node.")
    repeats: int = pydantic.Field(default=3, ge=1, description="Rounds of every mode (median reported).")


class OverlapSettings(_Frozen):
    """Layer-wise overlap: one prefill with ``hit_tokens`` loaded and ``appended`` computed."""

    geometry: KvGeometry = pydantic.Field(default_factory=KvGeometry, description="KV geometry.")
    hidden_size: int = pydantic.Field(default=256, ge=8, description="Model width (tiny compute).")
    num_heads: int = pydantic.Field(default=8, ge=1, description="Query heads.")
    hit_tokens: int = pydantic.Field(default=16384, ge=1, description="Hit tokens whose KV is loaded.")
    appended: tuple[int, ...] = pydantic.Field(
        default=(512, 2048, 8192), description="Appended (computed) token counts to measure."
    )
    full_block_h2d_blocks: int = pydantic.Field(
        default=128, ge=1, description="Full Blocks moved by the Full-Block H2D measurement."
    )
    repeats: int = pydantic.Field(default=15, ge=1, description="Timed repeats (median kept).")


class Topology(_Frozen):
    """Engines of one replay cluster (one node and, on GPUs, one device each where possible)."""

    prefill: int = pydantic.Field(default=1, ge=1, description="Prefill engines.")
    decode: int = pydantic.Field(default=2, ge=1, description="Decode engines.")
    gpus: int = pydantic.Field(default=0, ge=0, description="GPUs to spread engines over (0 = CPU).")
    transport: Literal["tcp", "cuda"] = pydantic.Field(default="tcp", description="PE<->DE KV transport.")

    @property
    def name(self) -> str:
        """``1P2D``-style label."""
        return f"{self.prefill}P{self.decode}D"


Mode = Literal["basic", "dualpath", "dualpath-paper", "dualpath-split", "oracle"]
"""A replay mode (``bench.engine.cluster``: the scheduler policy and engine mode each one runs)."""


class ReplaySettings(_Frozen):
    """End-to-end agentic replay against engine processes."""

    num_layers: int = pydantic.Field(default=8, ge=1, description="Model layers.")
    hidden_size: int = pydantic.Field(default=64, ge=8, description="Model width.")
    num_heads: int = pydantic.Field(default=4, ge=1, description="Query heads.")
    num_kv_heads: int = pydantic.Field(default=4, ge=1, description="KV heads.")
    head_dim: int = pydantic.Field(default=64, ge=2, description="Head dimension.")
    dtype: Literal["float32", "bfloat16"] = pydantic.Field(default="bfloat16", description="Element type.")
    block_tokens: int = pydantic.Field(default=64, ge=1, description="Tokens per Full Block.")
    max_context_tokens: int = pydantic.Field(default=4096, ge=64, description="Model context.")
    storage_budget_bytes_per_s: float = pydantic.Field(
        default=60e6, gt=0, description="Emulated storage-NIC budget of every node (bytes/s)."
    )
    compute_budget_bytes_per_s: float = pydantic.Field(
        default=1e9, gt=0, description="Emulated compute-NIC budget of every engine (bytes/s)."
    )
    preset: Literal["32K", "48K", "64K"] = pydantic.Field(default="64K", description="Table 2 row.")
    trajectories: int = pydantic.Field(default=12, ge=1, description="Offline: trajectories at once.")
    token_scale: float = pydantic.Field(default=16.0, ge=1.0, description="Trace token scale.")
    turn_scale: float = pydantic.Field(default=8.0, ge=1.0, description="Trace turn scale.")
    topologies: tuple[Topology, ...] = pydantic.Field(
        default=(Topology(),), description="Clusters to run the offline replay on."
    )
    modes: tuple[Mode, ...] = pydantic.Field(
        default=("basic", "dualpath", "oracle"),
        description="Offline modes, side by side (``dualpath-paper``: DualPath with the paper's read-side "
        "tie rule instead of the least-read tie-break; ``dualpath-split``: DualPath with split reads).",
    )
    online_modes: tuple[Mode, ...] = pydantic.Field(
        default=("basic", "dualpath"),
        description="Online: modes whose capacity is searched, one after another.",
    )
    online_rates: tuple[float, ...] = pydantic.Field(
        default=(), description="Online: trajectory arrival rates (per second) to try, ascending."
    )
    online_duration_s: float = pydantic.Field(default=20.0, gt=0, description="Online: seconds per rate.")
    online_refine: int = pydantic.Field(
        default=0,
        ge=0,
        le=8,
        description="Online: bisection steps between the highest passing and the first failing rate of "
        "the ladder, per mode (each one more step of online_duration_s).",
    )
    online_warmup_s: float = pydantic.Field(
        default=0.0,
        ge=0,
        description="Online: first seconds of each rate whose requests load the cluster but are left out "
        "of the SLO statistics, so the judged window is nearer steady state (0 = every request counts).",
    )
    ttft_slo_s: float = pydantic.Field(
        default=4.0,
        gt=0,
        description="Online SLO: the paper's mean TTFT (s); judged scaled to the trace, i.e. divided by "
        "``token_scale`` (contexts are that many times shorter than the paper's).",
    )
    tpot_slo_s: float = pydantic.Field(
        default=0.05, gt=0, description="Online SLO: mean TPOT (s), judged as is (one decode step)."
    )
    time_limit_s: float = pydantic.Field(default=120.0, gt=0, description="Timeout of one replay (s).")

    @pydantic.model_validator(mode="after")
    def _check_warmup(self) -> Self:
        if self.online_warmup_s >= self.online_duration_s:
            raise ValueError(
                f"online_warmup_s ({self.online_warmup_s}) must be shorter than online_duration_s "
                f"({self.online_duration_s}): no request would be judged"
            )
        return self


class BenchSettings(_Frozen):
    """One run of ``python -m bench.engine``."""

    preset: str = pydantic.Field(description="Preset name the run started from.")
    device: Device = pydantic.Field(default="cpu", description="cpu, or cuda on the GPU box.")
    calibration: CalibrationSettings = pydantic.Field(
        default_factory=CalibrationSettings, description="Calibration."
    )
    kvload: KvLoadSettings = pydantic.Field(default_factory=KvLoadSettings, description="KV-load bench.")
    overlap: OverlapSettings = pydantic.Field(default_factory=OverlapSettings, description="Overlap.")
    replay: ReplaySettings = pydantic.Field(default_factory=ReplaySettings, description="Replays.")


_SMALL = KvGeometry(num_layers=4, num_kv_heads=2, head_dim=32, block_tokens=16)


def preset(name: str, *, gpus: int = 0) -> BenchSettings:
    """``cpu-quick`` (minutes on 2 cores, mechanics only), ``cpu`` or ``gpu`` (``gpus`` devices)."""
    if name == "cpu-quick":
        return BenchSettings(
            preset=name,
            device="cpu",
            calibration=CalibrationSettings(sizes_mib=(1, 16), block_tokens_sweep=(16,), sweep_bytes_mib=16),
            kvload=KvLoadSettings(
                geometry=_SMALL,
                requests=12,
                blocks_per_request=12,
                distinct_blocks=8,
                storage_budget_bytes_per_s=4e6,
                compute_budget_bytes_per_s=32e6,
                repeats=1,
            ),
            overlap=OverlapSettings(
                geometry=_SMALL,
                hidden_size=32,
                num_heads=2,
                hit_tokens=256,
                appended=(32,),
                full_block_h2d_blocks=8,
                repeats=2,
            ),
            replay=ReplaySettings(
                num_layers=2,
                hidden_size=32,
                num_heads=2,
                num_kv_heads=2,
                head_dim=16,
                dtype="float32",
                block_tokens=16,
                max_context_tokens=1024,
                storage_budget_bytes_per_s=2e6,
                compute_budget_bytes_per_s=16e6,
                trajectories=2,
                token_scale=64.0,
                turn_scale=40.0,
                modes=("basic", "dualpath", "dualpath-paper"),
                time_limit_s=90.0,
                online_rates=(0.5,),
                online_duration_s=4.0,
            ),
        )
    if name == "cpu":
        return BenchSettings(
            preset=name,
            device="cpu",
            kvload=KvLoadSettings(
                geometry=_SMALL,
                requests=24,
                blocks_per_request=8,
                distinct_blocks=16,
                storage_budget_bytes_per_s=20e6,
                compute_budget_bytes_per_s=160e6,
            ),
            overlap=OverlapSettings(
                geometry=_SMALL,
                hidden_size=64,
                num_heads=4,
                hit_tokens=2048,
                appended=(64, 256),
                full_block_h2d_blocks=32,
            ),
            replay=ReplaySettings(
                num_layers=2,
                hidden_size=32,
                num_heads=2,
                num_kv_heads=2,
                head_dim=32,
                dtype="float32",
                block_tokens=16,
                storage_budget_bytes_per_s=4e6,
                compute_budget_bytes_per_s=32e6,
                trajectories=4,
                token_scale=32.0,
                turn_scale=16.0,
            ),
        )
    if name == "gpu":
        topologies = [Topology(prefill=1, decode=2, gpus=min(gpus, 2), transport="tcp")]
        if gpus >= 4:
            topologies += [
                Topology(prefill=1, decode=3, gpus=4, transport="cuda"),
                Topology(prefill=2, decode=2, gpus=4, transport="cuda"),
            ]
        elif gpus >= 2:
            topologies.append(Topology(prefill=1, decode=1, gpus=2, transport="cuda"))
        return BenchSettings(
            preset=name,
            device="cuda",
            replay=ReplaySettings(
                topologies=tuple(topologies),
                modes=("basic", "dualpath", "dualpath-paper", "oracle"),
                trajectories=24,
                storage_budget_bytes_per_s=30e6,
                online_rates=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5),
                online_duration_s=15.0,
            ),
        )
    raise ValueError(f"unknown preset {name!r}; use cpu-quick, cpu or gpu")
