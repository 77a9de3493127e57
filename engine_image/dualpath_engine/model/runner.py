"""The torch implementation of ``dualpath_engine.engine.runner.ModelRunner``.

Built by ``dualpath_engine.__main__`` and injected into the prefill/decode loops, which stay torch-free.
Prefill is layer-wise over external KV handed in as host ``uint8`` arrays; decode keeps each sequence's
KV on the device in a ``model.kvcache`` store (paged pool on CUDA: one attention call per layer for the
whole batch; per-sequence tensors on the CPU) and writes each new token's KV into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from dualpath_engine.engine import runner as runner_api
from dualpath_engine.model import kvcache, llama


def kv_to_host(kv: torch.Tensor) -> runner_api.KVArray:
    """A KV tensor [..., tokens, 2, kv_heads, head_dim] as host bytes [..., tokens, bytes]."""
    flat = kv.contiguous().reshape(*kv.shape[:-3], kv.shape[-3:].numel())
    return flat.view(torch.uint8).cpu().numpy()


def kv_from_host(data: runner_api.KVArray, geo: llama.Geometry, device: torch.device) -> torch.Tensor:
    """Host bytes [..., tokens, bytes] as a KV tensor [..., tokens, 2, kv_heads, head_dim] on ``device``."""
    if data.dtype != np.uint8 or data.shape[-1] != geo.kv_bytes_per_token_layer:
        raise runner_api.RunnerError(
            f"KV array has dtype {data.dtype} and {data.shape[-1] if data.ndim else 0} bytes per token; "
            f"expected uint8 with {geo.kv_bytes_per_token_layer}"
        )
    shape = (*data.shape[:-1], 2, geo.num_kv_heads, geo.head_dim)
    if data.size == 0:
        return torch.empty(shape, dtype=geo.dtype, device=device)
    array = data if data.flags.c_contiguous and data.flags.writeable else np.array(data, order="C")
    host = torch.from_numpy(array)
    typed = host.view(geo.dtype).reshape(shape)
    return typed.to(device, non_blocking=False)


def choose(logits: torch.Tensor, sampling: runner_api.Sampling | None, position: int) -> int:
    """The next token from float32 ``logits`` [vocab]: argmax, or a seeded nucleus draw on the CPU."""
    if sampling is None or sampling.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    ordered, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(ordered, dim=0) - ordered < sampling.top_p  # smallest set reaching top_p
    keep[0] = True
    kept = torch.where(keep, ordered, torch.zeros_like(ordered))
    generator = torch.Generator(device="cpu").manual_seed((sampling.seed * 1_000_003 + position) % (1 << 63))
    index = int(torch.multinomial(kept / kept.sum(), 1, generator=generator).item())
    return int(order[index].item())


class TorchPrefillPass:
    """A layer-wise forward over one batch (see ``runner_api.PrefillPass``)."""

    def __init__(self, model: llama.Decoder, device: torch.device, items: Sequence[runner_api.PrefillItem]):
        if not items or any(not item.new_token_ids for item in items):
            raise runner_api.RunnerError("a prefill batch needs at least one item, each with new tokens")
        self._model = model
        self._device = device
        self._items = list(items)
        self._segments = [llama.Segment(item.cached_tokens, len(item.new_token_ids)) for item in items]
        geo = model.geo
        positions = llama.segment_positions(self._segments, device)
        self._rot = llama.rotary(positions, geo.head_dim, geo.rope_theta)
        ids = [token for item in items for token in item.new_token_ids]
        with torch.no_grad():
            self._hidden = model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=device))
        self._next_layer = 0

    def run_layer(self, layer: int, cached_kv: Sequence[runner_api.KVArray]) -> list[runner_api.KVArray]:
        """Compute one layer; ``cached_kv[i]`` is item i's ``[cached_tokens, bytes]`` KV of the layer."""
        if layer != self._next_layer:
            raise runner_api.RunnerError(f"prefill layer {layer} out of order; expected {self._next_layer}")
        if len(cached_kv) != len(self._items):
            raise runner_api.RunnerError(f"{len(cached_kv)} cached KV arrays for {len(self._items)} items")
        geo = self._model.geo
        past = []
        for item, data in zip(self._items, cached_kv, strict=True):
            if data.shape[0] != item.cached_tokens:
                raise runner_api.RunnerError(
                    f"{item.seq_id}: layer {layer} KV has {data.shape[0]} tokens, "
                    f"expected {item.cached_tokens}"
                )
            past.append(kv_from_host(data, geo, self._device))
        with torch.no_grad():
            self._hidden, new_kv = self._model.layer_forward(
                layer, self._hidden, self._segments, past, self._rot
            )
        host = kv_to_host(new_kv)
        self._next_layer += 1
        out = []
        start = 0
        for seg in self._segments:
            out.append(host[start : start + seg.length])
            start += seg.length
        return out

    def finish(self) -> list[int]:
        """Greedy next token after each item's last new token (all layers must have run)."""
        if self._next_layer != self._model.geo.num_layers:
            raise runner_api.RunnerError(
                f"finish after {self._next_layer} of {self._model.geo.num_layers} layers"
            )
        ends = np.cumsum([seg.length for seg in self._segments]) - 1
        with torch.no_grad():
            logits = self._model.logits(self._hidden[torch.as_tensor(ends, device=self._device)])
        return [
            choose(logits[i], item.sampling, item.cached_tokens + len(item.new_token_ids))
            for i, item in enumerate(self._items)
        ]


DecodeAttention = Literal["auto", "paged", "per_sequence"]
"""Which device KV store decode steps use (``model.kvcache``); ``auto`` = paged on CUDA, per-sequence
on the CPU."""


class TorchRunner:
    """``runner_api.ModelRunner`` on a torch device (CPU or CUDA).

    ``decode_attention`` picks the decode KV store (:class:`kvcache.PagedKV` or
    :class:`kvcache.SequenceKV`); ``page_tokens`` and ``pool_tokens`` size the paged pool (its first
    allocation; it doubles when full); ``cuda_graphs`` lets the paged store replay its decode steps as
    CUDA graphs (on CUDA only).
    """

    def __init__(
        self,
        model: llama.Decoder,
        device: torch.device,
        *,
        decode_attention: DecodeAttention = "auto",
        page_tokens: int = 16,
        pool_tokens: int = 65536,
        cuda_graphs: bool = True,
    ) -> None:
        self._model = model.to(device).eval()
        self._device = device
        if device.type == "cuda":
            llama.use_shape_agnostic_attention()
        paged = decode_attention == "paged" or (decode_attention == "auto" and device.type == "cuda")
        self._kv: kvcache.DeviceKV = (
            kvcache.PagedKV(
                self._model,
                device,
                page_tokens=page_tokens,
                initial_tokens=pool_tokens,
                cuda_graphs=cuda_graphs,
            )
            if paged
            else kvcache.SequenceKV(self._model, device)
        )
        self._sampling: dict[str, runner_api.Sampling | None] = {}

    @property
    def model(self) -> llama.Decoder:
        """The decoder this runner drives."""
        return self._model

    @property
    def kv_store(self) -> kvcache.DeviceKV:
        """The device KV store decode steps use."""
        return self._kv

    @property
    def decode_store(self) -> str:
        """What decodes: ``paged+graphs``, ``paged`` or ``per_sequence`` (printed in the ready line)."""
        if isinstance(self._kv, kvcache.PagedKV):
            return "paged+graphs" if self._kv.graphs else "paged"
        return "per_sequence"

    def warm_up(self, max_batch: int, max_tokens: int) -> int:
        """Prepare the paged store's decode buckets (CUDA graphs) up to ``max_batch`` sequences of
        ``max_tokens`` tokens ahead of serving; 0 with the per-sequence store (nothing to prepare)."""
        if isinstance(self._kv, kvcache.PagedKV):
            return self._kv.warm_up(max_batch, max_tokens)
        return 0

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return self._model.geo.num_layers

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV bytes per token per layer."""
        return self._model.geo.kv_bytes_per_token_layer

    def begin_prefill(self, items: Sequence[runner_api.PrefillItem]) -> TorchPrefillPass:
        """Start a layer-wise prefill pass."""
        return TorchPrefillPass(self._model, self._device, items)

    def load_sequence(
        self, seq_id: str, kv: runner_api.KVArray, sampling: runner_api.Sampling | None = None
    ) -> None:
        """Put a sequence's KV ``[layers, tokens, bytes]`` on the device, replacing any earlier KV."""
        if kv.ndim != 3 or kv.shape[0] != self.num_layers:
            raise runner_api.RunnerError(
                f"{seq_id}: KV shape {kv.shape} is not [{self.num_layers}, tokens, bytes]"
            )
        self._kv.load(seq_id, kv_from_host(kv, self._model.geo, self._device))
        self._sampling[seq_id] = sampling

    def decode(self, steps: Sequence[tuple[str, int]]) -> list[int]:
        """One decode step for each ``(seq_id, token)``; each sequence at most once per call."""
        if not steps:
            return []
        seq_ids = [seq for seq, _ in steps]
        try:
            logits = self._kv.decode(seq_ids, [token for _, token in steps])
        except kvcache.KVCacheError as exc:
            raise runner_api.RunnerError(str(exc)) from exc
        if all(self._sampling.get(seq) is None for seq in seq_ids):
            return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
        return [
            choose(logits[i], self._sampling.get(seq), self._kv.length(seq)) for i, seq in enumerate(seq_ids)
        ]

    def sequence_length(self, seq_id: str) -> int:
        """Tokens of KV held for ``seq_id``."""
        try:
            return self._kv.length(seq_id)
        except kvcache.KVCacheError as exc:
            raise runner_api.RunnerError(str(exc)) from exc

    def read_kv(self, seq_id: str, start: int, end: int) -> runner_api.KVArray:
        """Host copy of tokens ``start..end-1``: ``[layers, end-start, bytes]``."""
        try:
            return kv_to_host(self._kv.read(seq_id, start, end))
        except kvcache.KVCacheError as exc:
            raise runner_api.RunnerError(str(exc)) from exc

    def release(self, seq_id: str) -> None:
        """Free a sequence's device KV."""
        self._kv.release(seq_id)
        self._sampling.pop(seq_id, None)
