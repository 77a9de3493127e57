"""Calibration: the copy ceilings every later ratio refers to (engine-dataplane.md s7 and s8 step 0).

Measured with CUDA events / synchronised wall time, median of ``repeats`` after a warm-up, on random
(non-zero) data: host memcpy (1 and 4 threads); per size H2D/D2H pinned and pageable; bidirectional
pinned H2D + D2H; the Layer-Block copy sweep over block sizes (one copy per block vs one batched
``cudaMemcpy2DAsync`` of ``transfer.cuda.LayerCopier`` vs contiguous); and with two or more GPUs the
GPU0 -> GPU1 copy and concurrent H2D into both GPUs. Without CUDA only the host figures are measured
(the device entries are absent, and the report says so). Called by :mod:`bench.engine.__main__`.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.engine import settings

MIB = 1 << 20


def _median_s(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


_BASE = torch.from_numpy(np.random.default_rng(5).integers(1, 255, 16 * MIB, dtype=np.uint8))


def _random(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """Non-zero random bytes (a 16 MiB random pattern repeated), optionally page-locked."""
    out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    for start in range(0, nbytes, _BASE.numel()):
        end = min(nbytes, start + _BASE.numel())
        out[start:end].copy_(_BASE[: end - start])
    return out


def host_memcpy(nbytes: int, threads: int, repeats: int) -> float:
    """Host memcpy rate (bytes/s) with ``threads`` threads each copying an equal share."""
    src = np.random.default_rng(1).integers(1, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    share = nbytes // threads

    def copy() -> None:
        workers = [
            threading.Thread(
                target=np.copyto, args=(dst[i * share : (i + 1) * share], src[i * share : (i + 1) * share])
            )
            for i in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    return nbytes / _median_s(copy, repeats, lambda: None)


def _size_row(nbytes: int, dev: torch.device, reps: int, sync: Callable[[], None]) -> dict[str, float]:
    pinned = _random(nbytes, pin=True)
    pageable = _random(nbytes)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    return {
        "mib": float(nbytes // MIB),
        "h2d_pinned": nbytes / _median_s(lambda: gpu.copy_(pinned, non_blocking=True), reps, sync),
        "d2h_pinned": nbytes / _median_s(lambda: pinned.copy_(gpu, non_blocking=True), reps, sync),
        "h2d_pageable": nbytes / _median_s(lambda: gpu.copy_(pageable), reps, sync),
        "d2h_pageable": nbytes / _median_s(lambda: pageable.copy_(gpu), reps, sync),
    }


def _bidirectional(nbytes: int, dev: torch.device, reps: int, sync: Callable[[], None]) -> float:
    src, back = _random(nbytes, pin=True), _random(nbytes, pin=True)
    up, down = torch.empty(nbytes, dtype=torch.uint8, device=dev), _random(nbytes).to(dev)
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]

    def both() -> None:
        with torch.cuda.stream(s1):
            up.copy_(src, non_blocking=True)
        with torch.cuda.stream(s2):
            back.copy_(down, non_blocking=True)

    return 2 * nbytes / _median_s(both, reps, sync)


def _device_figures(cfg: settings.CalibrationSettings, dev: torch.device) -> dict[str, Any]:
    def sync() -> None:
        torch.cuda.synchronize(dev)

    sizes = [_size_row(mib * MIB, dev, cfg.repeats, sync) for mib in cfg.sizes_mib]
    bidir = _bidirectional(max(cfg.sizes_mib) * MIB, dev, cfg.repeats, sync)
    sweep = [_sweep_point(cfg, block_tokens, dev, sync) for block_tokens in cfg.block_tokens_sweep]
    return {"sizes": sizes, "bidirectional_pinned_combined": bidir, "sweep": sweep}


def _sweep_point(
    cfg: settings.CalibrationSettings, block_tokens: int, dev: torch.device, sync: Callable[[], None]
) -> dict[str, float]:
    """One block size: kv-realistic Layer Blocks (32 layers, 4 KiB per token and layer)."""
    from dualpath_engine.transfer import cuda

    layers = 32
    layer_block = block_tokens * 4096
    blocks = max(1, cfg.sweep_bytes_mib * MIB // (layers * layer_block))
    arena = cuda.PinnedArena(blocks * layers * layer_block, layers * layer_block)
    arena.buffer.copy_(_random(arena.buffer.numel()))
    copier = cuda.LayerCopier(arena, num_layers=layers, layer_block_bytes=layer_block, device=dev)
    dst = torch.empty(blocks * layer_block, dtype=torch.uint8, device=dev)
    slots = list(range(blocks))
    nbytes = blocks * layer_block
    contiguous_src = arena.buffer[:nbytes]
    one = _median_s(lambda: copier.h2d_layer_one_by_one(slots, 0, dst).synchronize(), cfg.repeats, sync)
    batched = _median_s(lambda: copier.h2d_layer(slots, 0, dst).synchronize(), cfg.repeats, sync)
    flat = _median_s(lambda: dst.copy_(contiguous_src, non_blocking=True), cfg.repeats, sync)
    return {
        "block_tokens": float(block_tokens),
        "layer_block_bytes": float(layer_block),
        "blocks": float(blocks),
        "one_by_one": nbytes / one,
        "batched_memcpy2d": nbytes / batched,
        "contiguous": nbytes / flat,
        "layer_copy_method_is_memcpy2d": float(copier.method == "memcpy2d"),
    }


def _multi_gpu(cfg: settings.CalibrationSettings, count: int) -> dict[str, Any]:
    nbytes = max(cfg.sizes_mib) * MIB
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)

    def sync() -> None:
        for index in range(count):
            torch.cuda.synchronize(index)

    a = _random(nbytes).to(d0)
    b = torch.empty(nbytes, dtype=torch.uint8, device=d1)
    p2p = nbytes / _median_s(lambda: b.copy_(a, non_blocking=True), cfg.repeats, sync)
    peer = bool(torch.cuda.can_device_access_peer(0, 1))
    h0, h1 = _random(nbytes, pin=True), _random(nbytes, pin=True)
    g0 = torch.empty(nbytes, dtype=torch.uint8, device=d0)
    s0, s1 = torch.cuda.Stream(d0), torch.cuda.Stream(d1)  # type: ignore[no-untyped-call]

    def both() -> None:
        with torch.cuda.stream(s0):
            g0.copy_(h0, non_blocking=True)
        with torch.cuda.stream(s1):
            b.copy_(h1, non_blocking=True)

    concurrent = 2 * nbytes / _median_s(both, cfg.repeats, sync)
    return {"gpu0_to_gpu1": p2p, "peer_access": peer, "concurrent_h2d_two_gpus_combined": concurrent}


def run(cfg: settings.CalibrationSettings, device: settings.Device) -> dict[str, Any]:
    """All ceilings this machine allows (bytes/s)."""
    out: dict[str, Any] = {
        "settings": cfg.model_dump(mode="json"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_memcpy_1_thread": host_memcpy(max(cfg.sizes_mib) * MIB // 4, 1, cfg.repeats),
        "host_memcpy_4_threads": host_memcpy(max(cfg.sizes_mib) * MIB // 4, 4, cfg.repeats),
    }
    if device == "cuda":
        count = torch.cuda.device_count()
        out["gpus"] = count
        out["gpu_name"] = torch.cuda.get_device_name(0)
        out.update(_device_figures(cfg, torch.device("cuda", 0)))
        if count >= 2:
            out.update(_multi_gpu(cfg, count))
    return out


def h2d_ceiling(calibration: dict[str, Any]) -> float | None:
    """The pinned H2D rate at the largest size (the ceiling Full-Block H2D is compared with)."""
    sizes = calibration.get("sizes")
    if not sizes:
        return None
    return float(max(sizes, key=lambda row: row["mib"])["h2d_pinned"])
