"""Decode-step time of the engine's CUDA runner by attention backend and by decode KV store.

A diagnostic (not part of the preset run): ``python -m bench.engine.attention_backends [--device N]`` on
the GPU machine prints milliseconds per decode step

1. for 16 sequences of ~3,000 tokens in per-sequence KV with cuDNN allowed, cuDNN off (what the engine
   runs since ``llama.use_shape_agnostic_attention``), and flash, memory-efficient and math alone: why
   the runner keeps SDPA off cuDNN (docs/benchmarks.md, "What was fixed", item 1);
2. for batches of 1 to 64 such sequences in per-sequence KV and in the paged pool (``model.kvcache``),
   with and without CUDA graphs: whether a step's time grows with the batch (it should not, paged)
   and how much of it is kernel-launch overhead (what the graphs remove).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.engine import cluster, settings
from dualpath_engine import config
from dualpath_engine.model import loader
from dualpath_engine.model import runner as torch_runner

MODEL = config.ModelConfig.model_validate(cluster.model_config(settings.ReplaySettings()))
"""The replay benchmark's model (bench/engine/settings.py ReplaySettings defaults)."""


@contextlib.contextmanager
def _cudnn(allowed: bool) -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()  # type: ignore[no-untyped-call]
    torch.backends.cuda.enable_cudnn_sdp(allowed)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


CHOICES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "cudnn allowed": lambda: _cudnn(True),
    "cudnn off (the engine)": lambda: _cudnn(False),
    "flash only": lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
    "memory-efficient only": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
    "math only": lambda: sdpa_kernel([SDPBackend.MATH]),
}


BATCHES = (1, 4, 16, 64)
"""Decode batch sizes of the store sweep."""


def step_ms(
    device: torch.device,
    choice: Callable[[], contextlib.AbstractContextManager[None]],
    steps: int = 20,
    *,
    attention: torch_runner.DecodeAttention = "per_sequence",
    sequences: int = 16,
    graphs: bool = True,
) -> float:
    """Mean decode-step time (ms) of ``sequences`` sequences whose lengths differ (as in serving)."""
    runner = torch_runner.TorchRunner(
        loader.build(MODEL), device, decode_attention=attention, cuda_graphs=graphs
    )
    width = runner.kv_bytes_per_token_layer
    batch = [(f"s{i}", 5) for i in range(sequences)]
    for i, (seq, _) in enumerate(batch):
        runner.load_sequence(seq, np.zeros((MODEL.num_layers, 3000 + 37 * i, width), np.uint8))
    with choice():
        runner.decode(batch)
        started = time.perf_counter()
        for _ in range(steps):
            runner.decode(batch)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / steps * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per backend choice, then the store sweep; 2 without CUDA."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine.attention_backends", description=__doc__)
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs CUDA (run it on the GPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cuda", args.device)
    for label, choice in CHOICES.items():
        print(f"{label}: {step_ms(device, choice):.2f} ms per decode step", flush=True)
    print("batch | per_sequence ms/step | paged, no graphs | paged + CUDA graphs (the engine)", flush=True)
    engine = CHOICES["cudnn off (the engine)"]
    for size in BATCHES:
        plain = step_ms(device, engine, sequences=size)
        eager = step_ms(device, engine, sequences=size, attention="paged", graphs=False)
        graphed = step_ms(device, engine, sequences=size, attention="paged")
        print(f"{size} | {plain:.2f} | {eager:.2f} | {graphed:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
