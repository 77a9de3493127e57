"""Chained block hashes: the address of every Full Block (prefix index keys and storage object names).

Block ``i`` of a token sequence is named ``H(name(i-1), tokens[i*T:(i+1)*T])`` with ``H`` = blake2b-128,
so a name identifies the whole prefix up to and including that block. The chain starts from a root
derived from the model and KV geometry, so blocks of different models never share a name. A trailing
partial block (fewer than ``T`` tokens) is never hashed, stored or indexed.

Called by the prefix index (:mod:`dualpath_engine.kv.index`), the scheduler (hit lengths) and the
engines (which blocks to read and persist).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dualpath_engine import config

DIGEST_BYTES = 16
"""Size of one block hash in bytes."""

BlockHash = bytes
"""A chained block hash (``DIGEST_BYTES`` bytes); ``.hex()`` is its storage object name."""

_MAX_TOKEN = 2**32 - 1


def root_hash(namespace: str) -> BlockHash:
    """The chain's root for a namespace (use :func:`namespace_for` to build it from configuration)."""
    return hashlib.blake2b(namespace.encode(), digest_size=DIGEST_BYTES, person=b"dualpath-root").digest()


def namespace_for(model: config.ModelConfig, kv: config.KVConfig) -> str:
    """A namespace that changes whenever the KV bytes of the same tokens could differ."""
    return (
        f"{model.name}/L{model.num_layers}/H{model.hidden_size}/Q{model.num_heads}/KV{model.num_kv_heads}"
        f"/D{model.head_dim}/I{model.intermediate_size}/V{model.vocab_size}/{model.dtype}/seed{model.seed}"
        f"/theta{model.rope_theta}/w={model.weights_path or '-'}/T{kv.block_tokens}"
    )


def block_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """Hash of one block given its parent's hash (or the root) and its tokens."""
    packed = _pack(tokens)
    digest = hashlib.blake2b(parent, digest_size=DIGEST_BYTES, person=b"dualpath-block")
    digest.update(len(tokens).to_bytes(4, "little"))
    digest.update(packed)
    return digest.digest()


def chain_hashes(tokens: Sequence[int], block_tokens: int, root: BlockHash) -> list[BlockHash]:
    """Hashes of every Full Block of ``tokens`` (the trailing partial block is left out)."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    hashes: list[BlockHash] = []
    parent = root
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = block_hash(parent, tokens[start : start + block_tokens])
        hashes.append(parent)
    return hashes


def full_blocks(num_tokens: int, block_tokens: int) -> int:
    """Number of Full Blocks in ``num_tokens`` tokens."""
    return num_tokens // block_tokens


def _pack(tokens: Sequence[int]) -> bytes:
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError("tokens must be a flat sequence of integers")
    if array.size and (int(array.min()) < 0 or int(array.max()) > _MAX_TOKEN):
        raise ValueError(f"token ids must lie in [0, {_MAX_TOKEN}]")
    return array.astype("<u4").tobytes()
