"""Full Block / Layer Block layouts: a Full Block is byte-identical to its Layer Blocks concatenated."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine import config
from dualpath_engine.kv import layout

pytestmark = pytest.mark.timeout(30)

GEOMETRIES = st.builds(
    layout.BlockGeometry,
    num_layers=st.integers(1, 6),
    block_tokens=st.integers(1, 16),
    bytes_per_token_layer=st.integers(1, 48),
)


@settings(deadline=None, max_examples=80)
@given(GEOMETRIES, st.integers(0, 2**32 - 1))
def test_split_then_assemble_is_the_identity_and_matches_concatenation(
    geo: layout.BlockGeometry, seed: int
) -> None:
    data = np.random.default_rng(seed).integers(0, 256, geo.full_block_bytes, dtype=np.uint8)
    full = layout.as_full_block(data.tobytes(), geo)
    layers = layout.split(full)
    assert [lb.shape for lb in layers] == [geo.layer_shape] * geo.num_layers
    assert b"".join(lb.tobytes() for lb in layers) == data.tobytes()
    assert layout.assemble(layers).tobytes() == data.tobytes()
    # Layer l occupies bytes [l * LB, (l + 1) * LB) of the Full Block.
    for index, lb in enumerate(layers):
        start = index * geo.layer_block_bytes
        assert lb.tobytes() == data[start : start + geo.layer_block_bytes].tobytes()


def test_split_is_zero_copy() -> None:
    geo = layout.BlockGeometry(2, 4, 8)
    full = layout.empty_full_block(geo)
    layout.split(full)[1][0, 0, 0] = 7
    assert full[1, 0, 0] == 7


@settings(deadline=None, max_examples=80)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 8), st.integers(1, 40), st.integers(0, 1000))
def test_sequence_cut_into_blocks_and_layer_runs_round_trip(
    layers: int, block: int, width: int, tokens: int, seed: int
) -> None:
    kv = np.random.default_rng(seed).integers(0, 256, (layers, tokens, width), dtype=np.uint8)
    blocks = layout.blocks_from_sequence(kv, block)
    assert sum(b.shape[1] for b in blocks) == tokens
    for layer in range(layers):
        assert np.array_equal(layout.layer_run(blocks, layer), kv[layer])
    contiguous = [layout.as_contiguous(b) for b in blocks]
    assert all(b.flags.c_contiguous for b in contiguous)
    assert np.array_equal(np.concatenate(contiguous, axis=1), kv)


def test_geometry_from_config_and_errors() -> None:
    model = config.ModelConfig(num_layers=32, num_heads=8, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    geo = layout.BlockGeometry.from_config(model, config.KVConfig())
    assert (geo.layer_block_bytes, geo.full_block_bytes) == (256 * 1024, 8 * 1024 * 1024)
    with pytest.raises(ValueError, match="num_layers"):
        layout.BlockGeometry(0, 1, 1)
    with pytest.raises(ValueError, match="Full Block needs"):
        layout.as_full_block(b"abc", geo)
    with pytest.raises(ValueError, match="expected"):
        layout.assemble([np.zeros((1, 2, 3), np.uint8), np.zeros((1, 2, 4), np.uint8)])
    with pytest.raises(IndexError):
        layout.layer_block(np.zeros((2, 2, 2), np.uint8), 2)
