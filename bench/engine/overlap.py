"""Layer-wise overlap efficiency and Full-Block H2D against the machine's ceiling.

One prefill of ``appended`` new tokens over ``hit_tokens`` of hit KV with the engine's own model
(``dualpath_engine.model.llama``) at the KV geometry of the settings. Three measurements per point:
``T_load`` (all layers' hit KV from the host arena to the device, nothing else), ``T_comp`` (the layers
with the KV already resident) and ``T_overlap`` (layer ``l`` computes as soon as layer ``l``'s KV is
there while later layers still load; all layers' copies are issued first, then the layers compute).
Efficiency = (T_load + T_comp - T_overlap) / min(T_load, T_comp).

On CUDA the copies are the engine's ``transfer.cuda.LayerCopier`` (one ``cudaMemcpy2DAsync`` per layer
from the pinned ``PinnedArena``, its own stream, the compute stream waits on per-layer events). On CPU
they are ``transfer.host.NumpyCopier`` in a loader thread that signals each layer (mechanics only: the
2-core CI machine measures contention, not overlap). Called by :mod:`bench.engine.__main__`.
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
from dualpath_engine.model import llama
from dualpath_engine.transfer import host


def _median(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_model(cfg: settings.OverlapSettings, device: torch.device) -> llama.Decoder:
    """A seeded random decoder with the settings' KV geometry and tiny compute (bf16)."""
    geo = cfg.geometry
    model = llama.Decoder(
        llama.Geometry(
            vocab_size=264,
            hidden_size=cfg.hidden_size,
            num_layers=geo.num_layers,
            num_heads=cfg.num_heads,
            num_kv_heads=geo.num_kv_heads,
            head_dim=geo.head_dim,
            intermediate_size=cfg.hidden_size * 2,
            dtype=torch.bfloat16,
        )
    )
    model.init_weights(0)
    if device.type == "cuda":
        llama.use_shape_agnostic_attention()  # as the engine's CUDA runner does
    return model.to(dtype=torch.bfloat16).to(device).eval()


class Point:
    """One (hit, appended) measurement on one device."""

    def __init__(self, cfg: settings.OverlapSettings, device: torch.device, model: llama.Decoder) -> None:
        geo = cfg.geometry
        self.cfg = cfg
        self.device = device
        self.model = model
        self.layers = geo.num_layers
        self.blocks = -(-cfg.hit_tokens // geo.block_tokens)
        self.hit = self.blocks * geo.block_tokens
        self.layer_block = geo.block_tokens * geo.bytes_per_token_layer
        self.layer_bytes = self.blocks * self.layer_block
        full = geo.num_layers * self.layer_block
        self.slots = list(range(self.blocks))
        rng = np.random.default_rng(3)
        if device.type == "cuda":
            from dualpath_engine.transfer import cuda

            self.arena: Any = cuda.PinnedArena(self.blocks * full, full)
            self.copier: Any = cuda.LayerCopier(
                self.arena, num_layers=geo.num_layers, layer_block_bytes=self.layer_block, device=device
            )
            self.arena.buffer.copy_(torch.from_numpy(_pattern(rng, self.blocks * full)))
        else:
            self.arena = host.HostArena(self.blocks * full, full)
            self.copier = host.NumpyCopier(
                self.arena, num_layers=geo.num_layers, layer_block_bytes=self.layer_block
            )
            self.arena.buffer[:] = _pattern(rng, self.blocks * full)
        self.dst = torch.empty((self.layers, self.layer_bytes), dtype=torch.uint8, device=device)
        self.load_all()
        self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load_layer(self, layer: int) -> Any:
        if self.device.type == "cuda":
            return self.copier.h2d_layer(self.slots, layer, self.dst[layer])
        self.copier.h2d_layer(self.slots, layer, self.dst[layer].numpy())
        return None

    def load_all(self) -> None:
        for layer in range(self.layers):
            self._load_layer(layer)
        if self.device.type == "cuda":
            self.copier.stream.synchronize()

    def _past(self, layer: int) -> torch.Tensor:
        geo = self.cfg.geometry
        return self.dst[layer].view(torch.bfloat16).reshape(self.hit, 2, geo.num_kv_heads, geo.head_dim)

    def compute(self, appended: int, wait: Callable[[int], None] | None = None) -> None:
        ids = torch.arange(appended, device=self.device) % 256
        segments = [llama.Segment(self.hit, appended)]
        geo = self.model.geo
        with torch.no_grad():
            hidden = self.model.embed_tokens(ids)
            # Once per pass, as the engine's prefill pass does: a host-to-device copy per layer would
            # make the CPU wait for the GPU at every layer (and, overlapped, for that layer's copy).
            rot = llama.rotary(llama.segment_positions(segments, self.device), geo.head_dim, geo.rope_theta)
            for layer in range(self.layers):
                if wait is not None:
                    wait(layer)
                hidden, _ = self.model.layer_forward(layer, hidden, segments, [self._past(layer)], rot)

    def overlapped(self, appended: int) -> None:
        if self.device.type == "cuda":
            # Every copy is issued before the first layer computes: at these sizes the compute is
            # bound by the CPU issuing kernels, and copies issued a few layers ahead of it starved the
            # copy stream (profiled: idle 22 of 61 ms), while issuing all 32 costs well under 1 ms.
            events = [self._load_layer(layer) for layer in range(self.layers)]
            stream = torch.cuda.current_stream(self.device)
            self.compute(appended, lambda layer: stream.wait_event(events[layer]))
            return
        ready = [threading.Event() for _ in range(self.layers)]

        def loader() -> None:
            for layer in range(self.layers):
                self._load_layer(layer)
                ready[layer].set()

        thread = threading.Thread(target=loader)
        thread.start()
        self.compute(appended, lambda layer: _wait(ready[layer]))
        thread.join()

    def measure(self, appended: int) -> dict[str, float]:
        repeats = self.cfg.repeats
        t_load = _median(self.load_all, repeats, self.device)
        t_comp = _median(lambda: self.compute(appended), repeats, self.device)
        t_over = _median(lambda: self.overlapped(appended), repeats, self.device)
        efficiency = (t_load + t_comp - t_over) / min(t_load, t_comp)
        return {
            "hit_tokens": self.hit,
            "appended_tokens": appended,
            "t_load_s": t_load,
            "t_comp_s": t_comp,
            "t_overlap_s": t_over,
            "overlap_efficiency": efficiency,
            "t_overlap_over_max": t_over / max(t_load, t_comp),
            "load_bytes_per_s": self.layers * self.layer_bytes / t_load,
        }

    def copy_rates(self, blocks: int) -> dict[str, float]:
        """Full-Block H2D rate and batched vs one-by-one Layer-Block rates (bytes/s)."""
        blocks = min(blocks, self.blocks)
        slots = self.slots[:blocks]
        full = self.layers * self.layer_block
        flat = self.dst.reshape(-1)
        repeats = self.cfg.repeats
        if self.device.type == "cuda":
            stream = self.copier.stream
            t_full = _median(
                lambda: (self.copier.h2d_full_blocks(slots, flat), stream.synchronize())[0],
                repeats,
                self.device,
            )
            layer_dst = self.dst[0]
            t_batched = _median(
                lambda: (self.copier.h2d_layer(slots, 0, layer_dst), stream.synchronize())[0],
                repeats,
                self.device,
            )
            t_single = _median(
                lambda: (self.copier.h2d_layer_one_by_one(slots, 0, layer_dst), stream.synchronize())[0],
                repeats,
                self.device,
            )
            method = self.copier.method
        else:
            src = self.arena.buffer[: blocks * full]
            out = flat.numpy()[: blocks * full]
            t_full = _median(lambda: np.copyto(out, src), repeats, self.device)
            t_batched = _median(
                lambda: self.copier.h2d_layer(slots, 0, self.dst[0].numpy()), repeats, self.device
            )
            t_single = t_batched
            method = "numpy"
        return {
            "full_block_bytes_per_s": blocks * full / t_full,
            "full_block_copy_bytes": blocks * full,
            "layer_batched_bytes_per_s": blocks * self.layer_block / t_batched,
            "layer_one_by_one_bytes_per_s": blocks * self.layer_block / t_single,
            "layer_block_bytes": self.layer_block,
            "layer_copy_method": method,
        }


def _pattern(rng: np.random.Generator, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Random bytes < 64 (finite, non-zero-ish bf16 values) repeated from a 16 MiB draw."""
    return np.resize(rng.integers(0, 64, min(nbytes, 16 << 20), dtype=np.uint8), nbytes)


def _wait(event: threading.Event) -> None:
    if not event.wait(60):
        raise TimeoutError("layer KV did not load within 60 s")


def run(
    cfg: settings.OverlapSettings, device: settings.Device, h2d_ceiling_bytes_per_s: float | None
) -> dict[str, Any]:
    """Every appended size, the copy rates, and Full-Block H2D / ceiling when a ceiling is known."""
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    model = build_model(cfg, dev)
    point = Point(cfg, dev, model)
    points = [point.measure(appended) for appended in cfg.appended]
    rates = point.copy_rates(cfg.full_block_h2d_blocks)
    out: dict[str, Any] = {
        "settings": cfg.model_dump(mode="json"),
        "device": str(dev),
        "points": points,
        "copies": rates,
        "min_overlap_efficiency": min(p["overlap_efficiency"] for p in points),
        "batched_over_one_by_one": rates["layer_batched_bytes_per_s"] / rates["layer_one_by_one_bytes_per_s"],
    }
    if h2d_ceiling_bytes_per_s:
        out["h2d_ceiling_bytes_per_s"] = h2d_ceiling_bytes_per_s
        out["full_block_over_ceiling"] = rates["full_block_bytes_per_s"] / h2d_ceiling_bytes_per_s
    return out
