"""The decode engine's device KV stores (``model.kvcache``): the paged pool computes what per-sequence
tensors compute, through joins, leaves, page reuse and pool growth; padded batch attention equals
per-sequence attention; misuse is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine import config
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.model import kvcache, llama, loader
from dualpath_engine.model import runner as torch_runner

pytestmark = pytest.mark.timeout(120)

MODEL = config.ModelConfig(num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8, seed=5)
GEO = loader.geometry(MODEL)
CPU = torch.device("cpu")


def _pair(page_tokens: int, pool_tokens: int) -> tuple[torch_runner.TorchRunner, torch_runner.TorchRunner]:
    """The same model behind a per-sequence runner and a paged runner."""
    model = loader.build(MODEL)
    plain = torch_runner.TorchRunner(model, CPU, decode_attention="per_sequence")
    paged = torch_runner.TorchRunner(
        loader.build(MODEL), CPU, decode_attention="paged", page_tokens=page_tokens, pool_tokens=pool_tokens
    )
    return plain, paged


def _kv(tokens: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(MODEL.num_layers, tokens, 2, MODEL.num_kv_heads, MODEL.head_dim, generator=gen)
    return values.reshape(MODEL.num_layers, tokens, GEO.kv_elements_per_token_layer).numpy().view(np.uint8)


def _floats(kv: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kv).view(np.float32).copy())


def test_auto_picks_per_sequence_on_the_cpu_and_the_names_are_honoured() -> None:
    model = loader.build(MODEL)
    assert isinstance(torch_runner.TorchRunner(model, CPU).kv_store, kvcache.SequenceKV)
    assert isinstance(
        torch_runner.TorchRunner(model, CPU, decode_attention="paged").kv_store, kvcache.PagedKV
    )


@pytest.mark.parametrize("lengths", [[1, 1], [5, 17, 3], [40, 2, 9, 33]])
def test_padded_batch_attention_equals_per_sequence_attention(lengths: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(lengths))
    keys = max(lengths) + 7
    query = torch.randn(len(lengths), 6, 8, generator=gen)
    kv = torch.randn(len(lengths), keys, 2, 2, 8, generator=gen)
    for row, n in enumerate(lengths):
        kv[row, n:] = 1e4  # padding: huge but finite, must not leak into the result
    out = llama.attend_padded(query, kv, torch.tensor(lengths))
    for row, n in enumerate(lengths):
        expected = llama.attend(query[row : row + 1], kv[row, :n], llama.Segment(cached=n - 1, length=1))
        torch.testing.assert_close(out[row : row + 1], expected)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("load"), st.integers(0, 4), st.integers(0, 21)),
        st.tuples(st.just("decode"), st.sets(st.integers(0, 4), min_size=1), st.integers(0, 255)),
        st.tuples(st.just("release"), st.integers(0, 4), st.just(0)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None)
@given(ops=_OPS, page_tokens=st.integers(1, 6), pool_tokens=st.integers(1, 12))
def test_paged_runner_matches_the_per_sequence_runner(
    ops: list[tuple[str, object, int]], page_tokens: int, pool_tokens: int
) -> None:
    """Any interleaving of sequences loading, decoding together and leaving gives the same tokens and the
    same KV from both stores, while the pool reuses freed pages and grows when it runs out."""
    plain, paged = _pair(page_tokens, pool_tokens)
    live: set[str] = set()
    for step, (op, arg, value) in enumerate(ops):
        if op == "load":
            seq = f"s{arg}"
            kv = _kv(value, seed=step)
            plain.load_sequence(seq, kv)
            paged.load_sequence(seq, kv)
            live.add(seq)
        elif op == "release":
            plain.release(f"s{arg}")
            paged.release(f"s{arg}")
            live.discard(f"s{arg}")
        else:
            assert isinstance(arg, (set, frozenset))
            batch = [(f"s{index}", (value + index) % 256) for index in sorted(arg) if f"s{index}" in live]
            assert paged.decode(batch) == plain.decode(batch)
        for seq in live:
            length = plain.sequence_length(seq)
            assert paged.sequence_length(seq) == length
            torch.testing.assert_close(
                _floats(paged.read_kv(seq, 0, length)),
                _floats(plain.read_kv(seq, 0, length)),
                rtol=1e-5,
                atol=1e-5,
            )
    store = paged.kv_store
    assert isinstance(store, kvcache.PagedKV)
    held = sum(-(-plain.sequence_length(seq) // page_tokens) for seq in live)
    if store.capacity_pages:
        assert store.capacity_pages - store.free_pages >= held  # every live sequence keeps its pages


def test_released_pages_are_reused_before_the_pool_grows_and_growth_keeps_kv() -> None:
    store = kvcache.PagedKV(loader.build(MODEL), CPU, page_tokens=4, initial_tokens=16)
    first = torch.randn(MODEL.num_layers, 10, 2, MODEL.num_kv_heads, MODEL.head_dim)
    store.load("a", first)  # 11 tokens reserved -> 3 of 4 pages (+ the trash page)
    assert (store.capacity_pages, store.free_pages) == (5, 1)
    store.release("a")
    store.load("b", first[:, :7])  # 2 pages, from the freed ones
    assert (store.capacity_pages, store.free_pages) == (5, 2)
    store.load("c", first)  # needs 3 pages, 2 free: the pool doubles
    assert store.capacity_pages == 10
    torch.testing.assert_close(store.read("b", 0, 7), first[:, :7])
    torch.testing.assert_close(store.read("c", 3, 10), first[:, 3:10])


def test_stores_refuse_misuse_with_clear_errors() -> None:
    model = loader.build(MODEL)
    stores: list[kvcache.DeviceKV] = [
        kvcache.SequenceKV(model, CPU),
        kvcache.PagedKV(model, CPU, page_tokens=4, initial_tokens=8),
    ]
    for store in stores:
        store.load("a", torch.zeros(MODEL.num_layers, 3, 2, MODEL.num_kv_heads, MODEL.head_dim))
        with pytest.raises(kvcache.KVCacheError, match="twice"):
            store.decode(["a", "a"], [1, 1])
        with pytest.raises(kvcache.KVCacheError, match="unknown sequences"):
            store.decode(["a", "zz"], [1, 1])
        with pytest.raises(kvcache.KVCacheError, match=r"range 2\.\.5 outside 0\.\.3"):
            store.read("a", 2, 5)
        with pytest.raises(kvcache.KVCacheError, match="unknown sequence zz"):
            store.length("zz")
    with pytest.raises(kvcache.KVCacheError, match="page_tokens"):
        kvcache.PagedKV(model, CPU, page_tokens=0, initial_tokens=8)
    runner = torch_runner.TorchRunner(loader.build(MODEL), CPU, decode_attention="paged")
    with pytest.raises(runner_api.RunnerError, match="unknown sequences"):
        runner.decode([("nope", 1)])


def test_engine_config_selects_the_store() -> None:
    cfg = config.EngineConfig.model_validate({"role": "decode", "runner": {"decode_attention": "paged"}})
    assert cfg.runner.decode_attention == "paged" and cfg.runner.page_tokens == 16
    with pytest.raises(ValueError, match="decode_attention"):
        config.EngineConfig.model_validate({"role": "decode", "runner": {"decode_attention": "flat"}})
    with pytest.raises(ValueError, match="page_tokens"):
        config.EngineConfig.model_validate({"role": "decode", "runner": {"page_tokens": 0}})


def test_steps_run_in_power_of_two_buckets_prepared_once_and_again_after_the_pool_grows() -> None:
    store = kvcache.PagedKV(loader.build(MODEL), CPU, page_tokens=4, initial_tokens=64)  # 16 pages + trash
    kv = torch.zeros(MODEL.num_layers, 2, 2, MODEL.num_kv_heads, MODEL.head_dim)
    for seq in ("a", "b", "c"):
        store.load(seq, kv)  # 3 tokens reserved: one page each
    assert store.decode(["a", "b", "c"], [1, 2, 3]).shape == (3, MODEL.vocab_size)
    store.decode(["a", "b"], [4, 5])
    assert store.buckets == [(2, 1), (4, 1)]
    store.decode(["c"], [6])  # c: 4 tokens, still one page
    assert store.buckets == [(1, 1), (2, 1), (4, 1)]
    store.decode(["a", "b", "c"], [6, 7, 8])  # a and b take a second page: a wider bucket
    assert store.buckets == [(1, 1), (2, 1), (4, 1), (4, 2)]
    assert store.capacity_pages == 17
    store.load("d", torch.zeros(MODEL.num_layers, 60, 2, MODEL.num_kv_heads, MODEL.head_dim))
    assert store.buckets == []  # the pool grew: prepared steps (graphs on CUDA) pointed at the old one
    store.decode(["a", "d"], [1, 2])
    assert store.buckets == [(2, 16)]


def test_warm_up_prepares_every_bucket_up_to_the_limits_and_serving_adds_none() -> None:
    runner = torch_runner.TorchRunner(loader.build(MODEL), CPU, decode_attention="paged", page_tokens=4)
    assert runner.warm_up(max_batch=5, max_tokens=30) == 4 * 4  # batches 1..8, widths 1..8 pages
    store = runner.kv_store
    assert isinstance(store, kvcache.PagedKV)
    prepared = store.buckets
    assert prepared == [(b, w) for b in (1, 2, 4, 8) for w in (1, 2, 4, 8)]
    for index, tokens in enumerate((3, 12, 29)):
        runner.load_sequence(f"s{index}", _kv(tokens, seed=index))
    runner.decode([("s0", 1), ("s1", 2), ("s2", 3)])
    assert store.buckets == prepared
    per_sequence = torch_runner.TorchRunner(loader.build(MODEL), CPU, decode_attention="per_sequence")
    assert per_sequence.warm_up(max_batch=5, max_tokens=30) == 0
