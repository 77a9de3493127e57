"""The decoder and its torch runner on CPU: deterministic init, safetensors round trip, layer-wise
prefill over external KV, and cached multi-turn generation equal to full recomputation."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.model import llama, loader
from dualpath_engine.model import runner as torch_runner

pytestmark = pytest.mark.timeout(60)

SMALL = config.ModelConfig(num_layers=3, hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=12, seed=7)


def _runner(
    model_config: config.ModelConfig = SMALL, attention: torch_runner.DecodeAttention = "per_sequence"
) -> torch_runner.TorchRunner:
    return torch_runner.TorchRunner(
        loader.build(model_config), torch.device("cpu"), decode_attention=attention, pool_tokens=32
    )


ATTENTION = pytest.mark.parametrize("attention", ["per_sequence", "paged"])
"""Decode tests run over both device KV stores (``model.kvcache``)."""


def _prefill(
    runner: torch_runner.TorchRunner, seq_id: str, cached: np.ndarray, new_ids: list[int]
) -> tuple[np.ndarray, int]:
    """Layer-wise prefill of ``new_ids`` after ``cached`` [layers, tokens, bytes] -> (new KV, next token)."""
    prefill = runner.begin_prefill([runner_api.PrefillItem(seq_id, cached.shape[1], tuple(new_ids))])
    layers = [prefill.run_layer(layer, [cached[layer]])[0] for layer in range(runner.num_layers)]
    (token,) = prefill.finish()
    return np.stack(layers), token


def _decode(
    runner: torch_runner.TorchRunner, seq_id: str, kv: np.ndarray, first: int, count: int
) -> list[int]:
    runner.load_sequence(seq_id, kv)
    out = [first]
    while len(out) < count:
        (token,) = runner.decode([(seq_id, out[-1])])
        out.append(token)
    return out


def test_tokenizer_round_trips_text_and_frames_chat_as_prefixes() -> None:
    text = "héllo, wörld ✓"
    assert tok.decode(tok.encode(text, bos=True)) == text
    turn1 = tok.encode_chat([("user", "hi")])
    turn2 = tok.encode_chat([("user", "hi"), ("assistant", "yo"), ("user", "more")])
    assert turn2[: len(turn1)] == turn1
    assert tok.decode([tok.EOS, 104, 105], skip_special=False) == "<|eos|>hi"
    with pytest.raises(tok.TokenizerError, match="outside the vocabulary"):
        tok.validate_ids([1, tok.VOCAB_SIZE])
    with pytest.raises(tok.TokenizerError, match="unknown chat role"):
        tok.encode_chat([("robot", "x")])


def test_seeded_init_is_deterministic_and_seed_dependent() -> None:
    a = loader.build(SMALL).state_dict()
    b = loader.build(SMALL).state_dict()
    c = loader.build(SMALL.model_copy(update={"seed": 8})).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_kv_bytes_per_token_match_the_configuration() -> None:
    for dtype in ("float32", "bfloat16"):
        model_config = SMALL.model_copy(update={"dtype": dtype})
        assert (
            loader.geometry(model_config).kv_bytes_per_token_layer
            == model_config.kv_bytes_per_token_per_layer
        )


def test_safetensors_round_trip_gives_identical_outputs(tmp_path: pathlib.Path) -> None:
    model = loader.build(SMALL)
    path = tmp_path / "weights.safetensors"
    loader.save_weights(model, path)
    loaded = loader.build(SMALL.model_copy(update={"seed": 99, "weights_path": str(path)}))
    ids = torch.tensor(tok.encode("round trip", bos=True))
    assert torch.equal(model(ids), loaded(ids))
    with pytest.raises(ValueError, match="geometry"):
        loader.build(SMALL.model_copy(update={"hidden_size": 64, "weights_path": str(path)}))


def test_layerwise_prefill_over_external_kv_matches_full_forward() -> None:
    runner = _runner()
    ids = tok.encode("the quick brown fox jumps over the lazy dog", bos=True)
    reference = runner.model(torch.tensor(ids))
    empty = np.zeros((runner.num_layers, 0, runner.kv_bytes_per_token_layer), np.uint8)
    kv_all, token_all = _prefill(runner, "a", empty, ids)
    # Second half computed over the first half's KV handed in layer by layer.
    split = 17
    kv_head, _ = _prefill(runner, "b", empty, ids[:split])
    kv_tail, token_tail = _prefill(runner, "b", kv_head, ids[split:])
    assert token_all == token_tail == int(reference[-1].argmax())
    assert kv_head.shape == (runner.num_layers, split, runner.kv_bytes_per_token_layer)
    merged = np.concatenate([kv_head, kv_tail], axis=1).view(np.float32)
    np.testing.assert_allclose(merged, kv_all.view(np.float32), rtol=1e-5, atol=1e-5)


@ATTENTION
def test_prefill_with_loaded_kv_then_decode_equals_full_recompute_multi_turn(
    attention: torch_runner.DecodeAttention,
) -> None:
    runner = _runner(attention=attention)
    empty = np.zeros((runner.num_layers, 0, runner.kv_bytes_per_token_layer), np.uint8)
    history: list[int] = tok.encode_chat([("user", "tell me a story")])
    cached = empty
    for turn, (append, gen) in enumerate([("", 12), ("and then?", 9), ("the end", 7)]):
        if append:
            history = [*history, tok.END_OF_TURN, tok.USER, *tok.encode(append), tok.END_OF_TURN]
            history.append(tok.ASSISTANT)
        expected = llama.greedy_reference(runner.model, history, gen)
        hit = cached.shape[1]
        new_kv, first = _prefill(runner, f"t{turn}", cached, history[hit:])
        prompt_kv = np.concatenate([cached, new_kv], axis=1)
        generated = _decode(runner, f"t{turn}", prompt_kv, first, gen)
        assert generated == expected, f"turn {turn}"
        # The decode engine's KV (prompt + all generated but the last) is the next turn's hit.
        length = runner.sequence_length(f"t{turn}")
        assert length == len(history) + gen - 1
        cached = runner.read_kv(f"t{turn}", 0, length)
        history = history + generated[:-1]
        runner.release(f"t{turn}")
        # The last generated token has no KV yet; the next prompt starts with it.
        history.append(generated[-1])


@ATTENTION
def test_batched_prefill_and_decode_equal_one_at_a_time(attention: torch_runner.DecodeAttention) -> None:
    runner = _runner(attention=attention)
    prompts = [tok.encode(text, bos=True) for text in ("alpha", "a longer second prompt", "3")]
    empty = np.zeros((0, runner.kv_bytes_per_token_layer), np.uint8)
    items = [runner_api.PrefillItem(f"s{i}", 0, tuple(p)) for i, p in enumerate(prompts)]
    prefill = runner.begin_prefill(items)
    per_layer = [prefill.run_layer(layer, [empty] * 3) for layer in range(runner.num_layers)]
    firsts = prefill.finish()
    outs = [[first] for first in firsts]
    for i in range(3):
        runner.load_sequence(f"s{i}", np.stack([per_layer[layer][i] for layer in range(runner.num_layers)]))
    for _ in range(5):
        tokens = runner.decode([(f"s{i}", outs[i][-1]) for i in range(3)])
        for i, token in enumerate(tokens):
            outs[i].append(token)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == llama.greedy_reference(runner.model, prompt, 6)


@ATTENTION
def test_runner_rejects_misuse_with_clear_errors(attention: torch_runner.DecodeAttention) -> None:
    runner = _runner(attention=attention)
    prefill = runner.begin_prefill([runner_api.PrefillItem("x", 2, (1, 2))])
    empty = np.zeros((0, runner.kv_bytes_per_token_layer), np.uint8)
    with pytest.raises(runner_api.RunnerError, match="out of order"):
        prefill.run_layer(1, [empty])
    with pytest.raises(runner_api.RunnerError, match="expected 2"):
        prefill.run_layer(0, [empty])
    with pytest.raises(runner_api.RunnerError, match="bytes per token"):
        prefill.run_layer(0, [np.zeros((2, 3), np.uint8)])
    with pytest.raises(runner_api.RunnerError, match="unknown sequences"):
        runner.decode([("nope", 1)])
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        loader.geometry(SMALL.model_copy(update={"vocab_size": 260}))


def _sampled_reference(
    model: llama.Decoder, prompt: list[int], count: int, sampling: runner_api.Sampling
) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(count):
        token = torch_runner.choose(model(torch.tensor(ids))[-1], sampling, len(ids))
        out.append(token)
        ids.append(token)
    return out


@ATTENTION
def test_seeded_sampling_is_reproducible_and_matches_recompute_through_the_runner(
    attention: torch_runner.DecodeAttention,
) -> None:
    runner = _runner(attention=attention)
    prompt = tok.encode("sample from me", bos=True)
    sampling = runner_api.Sampling(temperature=1.0, top_p=0.9, seed=11)
    empty = np.zeros((runner.num_layers, 0, runner.kv_bytes_per_token_layer), np.uint8)
    prefill = runner.begin_prefill([runner_api.PrefillItem("s", 0, tuple(prompt), sampling)])
    layers = [prefill.run_layer(layer, [empty[layer]])[0] for layer in range(runner.num_layers)]
    out = prefill.finish()
    runner.load_sequence("s", np.stack(layers), sampling)
    while len(out) < 12:
        out += runner.decode([("s", out[-1])])
    assert out == _sampled_reference(runner.model, prompt, 12, sampling)
    assert out != llama.greedy_reference(runner.model, prompt, 12)  # temperature 1 really samples
    other = _sampled_reference(runner.model, prompt, 12, runner_api.Sampling(1.0, 0.9, seed=12))
    assert other != out
    # A vanishing nucleus keeps only the top token: greedy.
    narrow = runner_api.Sampling(temperature=1.0, top_p=1e-9, seed=3)
    assert _sampled_reference(runner.model, prompt, 6, narrow) == llama.greedy_reference(
        runner.model, prompt, 6
    )


def test_ids_the_tokenizer_cannot_decode_are_never_emitted() -> None:
    model = loader.build(config.ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2,
                                            head_dim=16, vocab_size=tok.VOCAB_SIZE + 5, seed=3))  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight[tok.VOCAB_SIZE :] = 50.0  # make the padded ids the most likely by far
    logits = model.logits(torch.randn(4, 32))
    assert int(torch.argmax(logits, dim=-1).max()) < tok.VOCAB_SIZE
    sampled = torch_runner.choose(logits[0], runner_api.Sampling(temperature=1.0, top_p=1.0, seed=1), 0)
    assert sampled < tok.VOCAB_SIZE


@pytest.mark.parametrize(("cached", "length"), [(0, 1), (0, 7), (9, 1), (9, 5), (3, 12)])
def test_attention_equals_the_explicit_causal_mask_reference(cached: int, length: int) -> None:
    """The fused paths (no mask, top-left causal, bottom-right causal bias, shared GQA heads) compute
    what a materialised causal mask over repeated heads computes."""
    gen = torch.Generator().manual_seed(cached * 100 + length)
    heads, kv_heads, head_dim = 6, 2, 8
    query = torch.randn(length, heads, head_dim, generator=gen)
    kv = torch.randn(cached + length, 2, kv_heads, head_dim, generator=gen)
    out = llama.attend(query, kv, llama.Segment(cached=cached, length=length))

    keys = kv[:, 0].repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    values = kv[:, 1].repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    mask = torch.arange(cached + length)[None, :] <= torch.arange(cached, cached + length)[:, None]
    reference = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), keys, values, attn_mask=mask
    ).transpose(0, 1)
    assert out.shape == (length, heads, head_dim)
    torch.testing.assert_close(out, reference)
