"""A small Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) with a layer-wise forward over external KV.

Called by ``model.runner`` (the engines' torch runner) and by tests. The forward is split so that a
caller can supply each layer's cached KV only when that layer is about to run: ``embed`` ->
``layer_forward`` for l = 0..L-1 -> ``logits``. That is what lets KV loading overlap compute.

KV layout per layer and token: ``[2 (K, V), num_kv_heads, head_dim]`` in the model dtype, K after RoPE
(absolute positions). As bytes that is ``Geometry.kv_bytes_per_token_layer`` bytes per token, which is
the ``bytes`` axis of the Layer Block ``[1, tokens, bytes]`` and Full Block ``[layers, tokens, bytes]``
layouts of ``dualpath_engine.kv``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.nn.attention import bias as attention_bias

from dualpath_engine import tokenizer

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a configuration name such as ``bfloat16``; ValueError names the choices."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown model dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shape of the decoder; built from ``dualpath_engine.config.ModelConfig`` by ``model.loader``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    dtype: torch.dtype
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def kv_elements_per_token_layer(self) -> int:
        """K and V elements one token stores for one layer."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes one token's K and V take for one layer (the ``bytes`` axis of a Layer Block)."""
        return self.kv_elements_per_token_layer * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass(frozen=True)
class Segment:
    """One sequence's slice of a layer batch: ``length`` new tokens after ``cached`` tokens of KV."""

    cached: int
    length: int


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale, computed in float32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rotary:
    """RoPE angles of a batch of token positions: ``cos`` and ``sin`` [tokens, 1, head_dim / 2] (float32).

    Computed once per forward (:func:`rotary`) and applied to the queries and keys of every layer.
    """

    cos: torch.Tensor
    sin: torch.Tensor


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """The RoPE angles of absolute ``positions`` [tokens] for heads of ``head_dim``."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return Rotary(cos=angles.cos()[:, None, :], sin=angles.sin()[:, None, :])


def rope(x: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x`` [tokens, heads, head_dim] with ``rot``'s angles."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    return torch.cat((x1 * rot.cos - x2 * rot.sin, x2 * rot.cos + x1 * rot.sin), dim=-1).to(x.dtype)


def segment_positions(segments: Sequence[Segment], device: torch.device) -> torch.Tensor:
    """Absolute positions [tokens] of the new tokens of ``segments`` (one host-to-device copy)."""
    ranges = [np.arange(s.cached, s.cached + s.length) for s in segments]
    return torch.from_numpy(np.concatenate(ranges) if ranges else np.empty(0, np.int64)).to(device)


class DecoderLayer(nn.Module):
    """Pre-norm attention (GQA) + SwiGLU MLP."""

    def __init__(self, geo: Geometry) -> None:
        super().__init__()
        self.geo = geo
        self.attn_norm = RMSNorm(geo.hidden_size, geo.norm_eps)
        self.wq = nn.Linear(geo.hidden_size, geo.num_heads * geo.head_dim, bias=False)
        self.wk = nn.Linear(geo.hidden_size, geo.num_kv_heads * geo.head_dim, bias=False)
        self.wv = nn.Linear(geo.hidden_size, geo.num_kv_heads * geo.head_dim, bias=False)
        self.wo = nn.Linear(geo.num_heads * geo.head_dim, geo.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(geo.hidden_size, geo.norm_eps)
        self.w_gate = nn.Linear(geo.hidden_size, geo.intermediate_size, bias=False)
        self.w_up = nn.Linear(geo.hidden_size, geo.intermediate_size, bias=False)
        self.w_down = nn.Linear(geo.intermediate_size, geo.hidden_size, bias=False)

    def project(self, hidden: torch.Tensor, rot: Rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [tokens, heads, hd], keys and values [tokens, kv_heads, hd] (RoPE on queries and keys)."""
        geo = self.geo
        tokens = hidden.shape[0]
        x = self.attn_norm(hidden)
        q = self.wq(x).view(tokens, geo.num_heads, geo.head_dim)
        k = self.wk(x).view(tokens, geo.num_kv_heads, geo.head_dim)
        v = self.wv(x).view(tokens, geo.num_kv_heads, geo.head_dim)
        return rope(q, rot), rope(k, rot), v

    def complete(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: output projection, residual, SwiGLU MLP.

        ``attn`` is the attention output [tokens, heads * head_dim] of the tokens of ``hidden``.
        """
        hidden = hidden + self.wo(attn)
        y = self.mlp_norm(hidden)
        out: torch.Tensor = hidden + self.w_down(functional.silu(self.w_gate(y)) * self.w_up(y))
        return out

    def forward(
        self,
        hidden: torch.Tensor,
        segments: Sequence[Segment],
        cached_kv: Sequence[torch.Tensor],
        rot: Rotary | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layer over concatenated new tokens; return (hidden, new KV [tokens, 2, kv_heads, hd]).

        ``cached_kv[i]`` is segment i's KV [cached, 2, kv_heads, head_dim] for this layer; ``rot`` the
        angles of the segments' positions (computed here when not given). Used by prefill; a decode
        step over device-resident KV (``model.kvcache``) calls :meth:`project`, attends with the store's
        own kernel and then calls :meth:`complete`.
        """
        geo = self.geo
        if rot is None:
            rot = rotary(segment_positions(segments, hidden.device), geo.head_dim, geo.rope_theta)
        q, k, v = self.project(hidden, rot)
        new_kv = torch.stack((k, v), dim=1)
        outs = []
        start = 0
        for index, seg in enumerate(segments):
            end = start + seg.length
            if seg.cached:
                kv = torch.cat((cached_kv[index].to(new_kv.dtype), new_kv[start:end]), dim=0)
            else:
                kv = new_kv[start:end]
            attn = attend(q[start:end], kv, seg)
            outs.append(attn.reshape(seg.length, geo.num_heads * geo.head_dim))
            start = end
        return self.complete(hidden, torch.cat(outs, dim=0)), new_kv


def use_shape_agnostic_attention() -> None:
    """Keep ``scaled_dot_product_attention`` off the cuDNN backend (process-wide).

    cuDNN attention builds an execution plan per input shape; decoding changes the key length of every
    sequence at every step (and prefill chunks vary), so nearly every call would pay a plan build. The
    flash and memory-efficient kernels take any length without per-shape setup. Called by the CUDA
    runner and the GPU benchmarks.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def attend(query: torch.Tensor, kv: torch.Tensor, seg: Segment) -> torch.Tensor:
    """Causal GQA attention of one segment: ``query`` [length, heads, hd] over ``kv`` [cached + length,
    2, kv_heads, hd] (the new tokens last); returns [length, heads, hd].

    No mask is built: a single query token sees every key; a segment without cached tokens is plain
    causal; otherwise the mask is causal aligned to the bottom-right corner (query ``i`` sees keys up to
    ``cached + i``), which ``scaled_dot_product_attention`` runs in a fused kernel without materialising
    a [length, keys] mask. Key/value heads are shared by head groups (``enable_gqa``), not repeated.
    """
    # [1, heads, tokens, head_dim]: the fused kernels take 4-D inputs only (3-D falls back to the
    # unfused math kernel, which materialises every score).
    keys = kv[None, :, 0].transpose(1, 2)
    values = kv[None, :, 1].transpose(1, 2)
    q = query[None].transpose(1, 2)
    gqa = q.shape[1] != keys.shape[1]
    if seg.length == 1:
        out = functional.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
    elif seg.cached == 0:
        out = functional.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    else:
        mask = attention_bias.causal_lower_right(seg.length, seg.cached + seg.length)
        out = functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def attend_padded(query: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One decode token per sequence over a padded batch of KV, in one attention call.

    ``query`` [batch, heads, hd]; ``kv`` [batch, keys, 2, kv_heads, hd] where sequence ``b``'s first
    ``lengths[b]`` keys are real and the rest padding (finite values; masked out). Returns [batch,
    heads, hd]. A single query token sees all of its sequence's keys, so there is no causal mask, only
    the length mask; the query heads of one key/value head are laid out as that head's query rows
    ([batch, kv_heads, group, hd]), which is exactly GQA without repeating keys.
    """
    batch, heads, head_dim = query.shape
    kv_heads = kv.shape[3]
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    keys = kv[:, :, 0].transpose(1, 2)
    values = kv[:, :, 1].transpose(1, 2)
    valid = torch.arange(kv.shape[1], device=kv.device)[None, :] < lengths[:, None]
    out = functional.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None, :])
    return out.reshape(batch, heads, head_dim)


class Decoder(nn.Module):
    """The whole model; ``init_weights(seed)`` gives the same weights on every machine."""

    def __init__(self, geo: Geometry) -> None:
        super().__init__()
        self.geo = geo
        self.embed = nn.Embedding(geo.vocab_size, geo.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(geo) for _ in range(geo.num_layers))
        self.norm = RMSNorm(geo.hidden_size, geo.norm_eps)
        self.lm_head = nn.Linear(geo.hidden_size, geo.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded random init on the CPU in float32 (device independent), then cast in place.

        Linear weights are N(0, 1/fan_in) so activations and logits stay O(1) at any width: greedy
        choices then have clear margins and do not flip on rounding noise between batch shapes.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in sorted(self.named_parameters()):
            if name.endswith("norm.weight"):
                values = torch.ones(param.shape)
            elif name == "embed.weight":
                values = torch.randn(param.shape, generator=gen)
            else:
                values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1])
            param.copy_(values.to(param.dtype))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [tokens, hidden] for token ids [tokens]."""
        return typing.cast(torch.Tensor, self.embed(ids))

    def layer_forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        segments: Sequence[Segment],
        cached_kv: Sequence[torch.Tensor],
        rot: Rotary | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer over external KV; see :meth:`DecoderLayer.forward`."""
        return self.block(layer).forward(hidden, segments, cached_kv, rot)

    def block(self, layer: int) -> DecoderLayer:
        """Decoder layer ``layer``."""
        return typing.cast(DecoderLayer, self.layers[layer])

    def decode_step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attend: typing.Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One decode token per sequence through every layer: float32 logits [batch, vocab].

        ``ids`` and ``positions`` are [batch] on the model's device; ``attend(layer, query, key, value)``
        stores the layer's new K/V wherever the caller keeps KV and returns the attention output
        [batch, heads * head_dim] (the ``model.kvcache`` stores each pass their own).
        """
        with torch.no_grad():
            hidden = self.embed_tokens(ids)
            rot = rotary(positions, self.geo.head_dim, self.geo.rope_theta)
            for layer in range(self.geo.num_layers):
                block = self.block(layer)
                query, key, value = block.project(hidden, rot)
                hidden = block.complete(hidden, attend(layer, query, key, value))
            return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab] for final hidden rows.

        Ids the tokenizer cannot decode (a vocabulary padded beyond ``tokenizer.VOCAB_SIZE``) get -inf,
        so neither greedy nor sampled decoding can ever emit them.
        """
        out = typing.cast(torch.Tensor, self.lm_head(self.norm(hidden))).float()
        if out.shape[-1] > tokenizer.VOCAB_SIZE:
            out[..., tokenizer.VOCAB_SIZE :] = float("-inf")
        return out

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain full forward of one sequence from scratch: logits [tokens, vocab] (the reference)."""
        hidden = self.embed_tokens(ids)
        seg = [Segment(cached=0, length=ids.shape[0])]
        empty = self.empty_kv(0, ids.device)
        rot = rotary(torch.arange(ids.shape[0], device=ids.device), self.geo.head_dim, self.geo.rope_theta)
        for layer in range(self.geo.num_layers):
            hidden, _ = self.layer_forward(layer, hidden, seg, [empty], rot)
        return self.logits(hidden)

    def empty_kv(self, tokens: int, device: torch.device) -> torch.Tensor:
        """A KV tensor [tokens, 2, kv_heads, head_dim] of this model's dtype (uninitialised)."""
        geo = self.geo
        return torch.empty((tokens, 2, geo.num_kv_heads, geo.head_dim), dtype=geo.dtype, device=device)


@torch.no_grad()
def greedy_reference(model: Decoder, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy generation with NO cache at all: every step recomputes the whole sequence.

    The slowest and simplest possible generator; every cached path must reproduce its tokens.
    """
    device = next(model.parameters()).device
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor(ids, dtype=torch.long, device=device))
        token = int(torch.argmax(logits[-1]).item())
        out.append(token)
        ids.append(token)
    return out
