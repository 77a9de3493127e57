"""KV byte layouts: Full Block ``[layers, tokens, bytes]`` and Layer Block ``[1, tokens, bytes]``.

``bytes`` is the K and V bytes of one token in one layer. A Full Block is byte-identical to its Layer
Blocks concatenated in layer order, so splitting is a set of zero-copy views and assembling is one
copy per layer. All arrays are numpy ``uint8``; nothing here allocates except :func:`assemble` and
:func:`empty_full_block`.

Used by storage (Full Blocks), the traffic manager (Layer Blocks to and from the host arena) and the
engine loops (runs of Layer Blocks become the runner's ``[tokens, bytes]`` layer arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from dualpath_engine import config

ByteArray = npt.NDArray[np.uint8]
"""A numpy ``uint8`` array."""


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """Shape of a Full Block."""

    num_layers: int
    """Decoder layers (first axis)."""
    block_tokens: int
    """Tokens per Full Block (second axis)."""
    bytes_per_token_layer: int
    """K and V bytes of one token in one layer (third axis)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_tokens", "bytes_per_token_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, model: config.ModelConfig, kv: config.KVConfig) -> BlockGeometry:
        """The geometry implied by a model and a KV configuration."""
        return cls(model.num_layers, kv.block_tokens, model.kv_bytes_per_token_per_layer)

    @property
    def full_block_bytes(self) -> int:
        """Bytes of a Full Block."""
        return self.num_layers * self.block_tokens * self.bytes_per_token_layer

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of a Layer Block."""
        return self.block_tokens * self.bytes_per_token_layer

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all layers."""
        return self.num_layers * self.bytes_per_token_layer

    @property
    def full_shape(self) -> tuple[int, int, int]:
        """``(layers, tokens, bytes)``."""
        return (self.num_layers, self.block_tokens, self.bytes_per_token_layer)

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        """``(1, tokens, bytes)``."""
        return (1, self.block_tokens, self.bytes_per_token_layer)


def empty_full_block(geometry: BlockGeometry) -> ByteArray:
    """A zeroed Full Block."""
    return np.zeros(geometry.full_shape, dtype=np.uint8)


def as_full_block(buffer: ByteArray | memoryview | bytes | bytearray, geometry: BlockGeometry) -> ByteArray:
    """View flat bytes (exactly one Full Block long) as ``[layers, tokens, bytes]`` without copying."""
    flat = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) else buffer
    if flat.dtype != np.uint8 or flat.size != geometry.full_block_bytes:
        raise ValueError(
            f"a Full Block needs {geometry.full_block_bytes} uint8 bytes, got {flat.size} {flat.dtype}"
        )
    return flat.reshape(geometry.full_shape)


def layer_block(full: ByteArray, layer: int) -> ByteArray:
    """Zero-copy view of one layer of a Full Block as a Layer Block ``[1, tokens, bytes]``."""
    if full.ndim != 3:
        raise ValueError(f"a Full Block is [layers, tokens, bytes], got shape {full.shape}")
    if not 0 <= layer < full.shape[0]:
        raise IndexError(f"layer {layer} outside 0..{full.shape[0] - 1}")
    return full[layer : layer + 1]


def split(full: ByteArray) -> list[ByteArray]:
    """All Layer Blocks of a Full Block, in layer order (views)."""
    return [layer_block(full, layer) for layer in range(full.shape[0])]


def assemble(layer_blocks: Sequence[ByteArray], out: ByteArray | None = None) -> ByteArray:
    """Concatenate Layer Blocks ``[1, tokens, bytes]`` (in layer order) into a Full Block."""
    if not layer_blocks:
        raise ValueError("cannot assemble a Full Block from no Layer Blocks")
    shape = layer_blocks[0].shape
    for index, block in enumerate(layer_blocks):
        if block.ndim != 3 or block.shape[0] != 1 or block.shape != shape or block.dtype != np.uint8:
            raise ValueError(
                f"Layer Block {index} has shape {block.shape} {block.dtype}, expected {shape} uint8"
            )
    full_shape = (len(layer_blocks), shape[1], shape[2])
    if out is None:
        out = np.empty(full_shape, dtype=np.uint8)
    elif out.shape != full_shape or out.dtype != np.uint8:
        raise ValueError(f"output has shape {out.shape} {out.dtype}, expected {full_shape} uint8")
    for layer, block in enumerate(layer_blocks):
        out[layer] = block[0]
    return out


def layer_run(blocks: Sequence[ByteArray], layer: int, out: ByteArray | None = None) -> ByteArray:
    """One layer of consecutive blocks as ``[tokens, bytes]`` (what the model runner takes), copied once.

    ``blocks`` are Full Blocks ``[layers, t_i, bytes]`` in token order; the last may be partial.
    """
    if not blocks:
        raise ValueError("no blocks")
    width = blocks[0].shape[2]
    tokens = sum(block.shape[1] for block in blocks)
    if out is None:
        out = np.empty((tokens, width), dtype=np.uint8)
    elif out.shape != (tokens, width):
        raise ValueError(f"output has shape {out.shape}, expected {(tokens, width)}")
    start = 0
    for block in blocks:
        out[start : start + block.shape[1]] = block[layer]
        start += block.shape[1]
    return out


def blocks_from_sequence(kv: ByteArray, block_tokens: int) -> list[ByteArray]:
    """Cut a sequence's KV ``[layers, tokens, bytes]`` into Full Blocks (views; the tail may be partial).

    The views are not contiguous; use ``np.ascontiguousarray`` (or :func:`as_contiguous`) before
    writing one to storage.
    """
    if kv.ndim != 3:
        raise ValueError(f"sequence KV is [layers, tokens, bytes], got shape {kv.shape}")
    return [kv[:, start : start + block_tokens] for start in range(0, kv.shape[1], block_tokens)]


def as_contiguous(block: ByteArray) -> ByteArray:
    """A C-contiguous copy (or the block itself if contiguous): storage and sockets want flat bytes."""
    return np.ascontiguousarray(block)
