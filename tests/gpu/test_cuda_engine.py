"""GPU tests (marker ``gpu``; run by hand on the H200 box with ``make test-gpu`` or
``python -m pytest -m gpu tests/gpu -s``): model correctness on CUDA against the CPU reference, Full-Block
H2D through the pinned arena against the machine's ceiling, and batched layer-block copies against
256 KiB copies issued one by one, and the CUDA IPC transport between two processes (same GPU, and
GPU0 -> GPU1 when two GPUs are present). Each test prints its figures (``-s`` shows them).

Ceilings come from engine-dataplane.md section 7 and can be overridden for another machine:
``DUALPATH_H2D_CEILING_GBPS`` (default 54.9, pinned H2D of 1 GiB).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.model import kvcache, llama, loader
from dualpath_engine.model import runner as torch_runner
from dualpath_engine.transfer import base, cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"
    ),
]

H2D_CEILING_GBPS = float(os.environ.get("DUALPATH_H2D_CEILING_GBPS", "54.9"))
# kv-realistic geometry: 32 layers x 8 KV heads x head_dim 128 x bf16 x (K, V) = 4 KiB per layer-token.
LAYERS = 32
BLOCK_TOKENS = 64
LAYER_BLOCK = BLOCK_TOKENS * 4096  # 256 KiB
FULL_BLOCK = LAYERS * LAYER_BLOCK  # 8 MiB
BLOCKS = 128  # 1 GiB of Full Blocks


def _median_seconds(fn: Callable[[], torch.cuda.Event], repeats: int = 5) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        event = fn()
        torch.cuda.current_stream().wait_event(event)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return float(statistics.median(times))


@pytest.fixture(scope="module")
def copier() -> cuda.LayerCopier:
    arena = cuda.PinnedArena(BLOCKS * FULL_BLOCK, FULL_BLOCK)
    gen = torch.Generator().manual_seed(1)
    arena.buffer.copy_(torch.randint(0, 256, (arena.buffer.numel(),), dtype=torch.uint8, generator=gen))
    return cuda.LayerCopier(arena, num_layers=LAYERS, layer_block_bytes=LAYER_BLOCK)


def _generate(runner: torch_runner.TorchRunner, turns: list[str], gen: int) -> list[list[int]]:
    """Multi-turn generation through the runner, each turn reusing the last turn's KV as a hit."""
    empty = np.zeros((runner.num_layers, 0, runner.kv_bytes_per_token_layer), np.uint8)
    cached, history, outputs = empty, [tok.BOS], []
    for turn, text in enumerate(turns):
        history += [tok.USER, *tok.encode(text), tok.END_OF_TURN, tok.ASSISTANT]
        hit = cached.shape[1]
        item = runner_api.PrefillItem(f"t{turn}", hit, tuple(history[hit:]))
        prefill = runner.begin_prefill([item])
        layers = [prefill.run_layer(layer, [cached[layer]])[0] for layer in range(runner.num_layers)]
        out = prefill.finish()
        runner.load_sequence(f"t{turn}", np.concatenate([cached, np.stack(layers)], axis=1))
        while len(out) < gen:
            out += runner.decode([(f"t{turn}", out[-1])])
        cached = runner.read_kv(f"t{turn}", 0, runner.sequence_length(f"t{turn}"))
        runner.release(f"t{turn}")
        history += out
        history.pop()  # the last token has no KV yet; it is re-fed as the next prompt's first token
        history.append(out[-1])
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("attention", ["paged", "per_sequence"])
def test_model_on_cuda_generates_the_cpu_reference_tokens(attention: torch_runner.DecodeAttention) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    geometry = config.ModelConfig(num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=2, head_dim=16)
    turns = ["hello there", "tell me more", "and finally"]
    cpu = _generate(torch_runner.TorchRunner(loader.build(geometry), torch.device("cpu")), turns, 16)
    cuda_runner = torch_runner.TorchRunner(
        loader.build(geometry), torch.device("cuda"), decode_attention=attention
    )
    gpu = _generate(cuda_runner, turns, 16)
    first_prompt = [tok.BOS, tok.USER, *tok.encode(turns[0]), tok.END_OF_TURN, tok.ASSISTANT]
    reference = llama.greedy_reference(loader.build(geometry, "cuda"), first_prompt, 16)
    print(f"\n[gpu] fp32 multi-turn tokens CPU == CUDA ({attention}): {cpu == gpu}")
    assert gpu == cpu
    assert gpu[0] == reference
    # bf16: kernels differ between CPU and CUDA, so compare logits within bf16 resolution.
    bf16 = geometry.model_copy(update={"dtype": "bfloat16"})
    ids = torch.tensor(tok.encode("the same prompt on both devices", bos=True))
    # Ids beyond the tokenizer's vocabulary are -inf on both devices (never emitted): compare the rest.
    logits_cpu = loader.build(bf16)(ids)[:, : tok.VOCAB_SIZE]
    logits_gpu = loader.build(bf16, "cuda")(ids.cuda()).cpu()[:, : tok.VOCAB_SIZE]
    agree = float((logits_cpu.argmax(-1) == logits_gpu.argmax(-1)).float().mean())
    err = float((logits_cpu - logits_gpu).abs().max())
    print(f"[gpu] bf16 logits max |CPU-CUDA| = {err:.4f}, argmax agreement {agree:.1%}")
    assert err < 0.25 * float(logits_cpu.abs().max())
    assert agree >= 0.9


def test_paged_decode_on_cuda_matches_per_sequence_for_a_changing_batch() -> None:
    """Sequences of different lengths join, decode together and leave; the paged pool (small pages, a
    pool that must grow) gives the tokens and KV of per-sequence tensors on the GPU, in fp32 and bf16."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in ("float32", "bfloat16"):
        geometry = config.ModelConfig(
            num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=2, head_dim=16, dtype=dtype
        )
        device = torch.device("cuda")
        plain = torch_runner.TorchRunner(loader.build(geometry), device, decode_attention="per_sequence")
        paged = torch_runner.TorchRunner(
            loader.build(geometry), device, decode_attention="paged", page_tokens=8, pool_tokens=64
        )
        element = loader.geometry(geometry).dtype
        elements = loader.geometry(geometry).kv_elements_per_token_layer
        gen = torch.Generator().manual_seed(7)
        agree = total = 0
        live: list[str] = []
        for step in range(40):
            if step % 5 == 0:  # a new sequence joins with its prompt KV
                seq = f"s{step}"
                tokens = int(torch.randint(1, 300, (1,), generator=gen))
                kv = torch.randn(geometry.num_layers, tokens, elements, generator=gen).to(element)
                host = kv.view(torch.uint8).numpy()
                plain.load_sequence(seq, host)
                paged.load_sequence(seq, host)
                live.append(seq)
            if step % 7 == 6 and len(live) > 1:  # the oldest leaves
                plain.release(live[0])
                paged.release(live[0])
                live.pop(0)
            batch = [(seq, (step * 31 + i) % 250) for i, seq in enumerate(live)]
            a, b = plain.decode(batch), paged.decode(batch)
            agree += sum(x == y for x, y in zip(a, b, strict=True))
            total += len(a)
            if dtype == "float32":
                assert a == b, f"step {step}"
        drift = []
        for seq in live:
            n = plain.sequence_length(seq)
            ref = torch.from_numpy(plain.read_kv(seq, 0, n)).view(element).float()
            got = torch.from_numpy(paged.read_kv(seq, 0, n)).view(element).float()
            if dtype == "float32":
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            # bf16: the two attention kernels round differently and the difference carries into the
            # KV of later layers and tokens; bound it relative to the values' size.
            drift.append(float((got - ref).abs().mean() / ref.abs().mean()))
        print(
            f"[gpu] paged vs per-sequence ({dtype}): {agree}/{total} tokens agree, KV drift {max(drift):.4f}"
        )
        assert max(drift) < 0.05
        assert agree >= 0.95 * total


def test_decode_graphs_are_captured_on_the_engines_device_thread() -> None:
    """The decode engine runs its runner on a worker thread (``engine/decode.py``); graphs must be
    captured there too, and replaying them must give the eager tokens."""
    geometry = config.ModelConfig(num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=2, head_dim=16)
    device = torch.device("cuda")
    graphed = torch_runner.TorchRunner(loader.build(geometry), device)
    eager = torch_runner.TorchRunner(loader.build(geometry), device, cuda_graphs=False)
    width = graphed.kv_bytes_per_token_layer
    gen = torch.Generator().manual_seed(3)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as thread:
        for index, tokens in enumerate((5, 40, 133)):
            kv = torch.randn(geometry.num_layers, tokens, width // 4, generator=gen).view(torch.uint8).numpy()
            for runner in (graphed, eager):
                thread.submit(runner.load_sequence, f"s{index}", kv).result()
        batch = [(f"s{i}", 7 + i) for i in range(3)]
        for _ in range(12):
            got = thread.submit(graphed.decode, batch).result()
            assert got == thread.submit(eager.decode, batch).result()
            batch = [(seq, token) for (seq, _), token in zip(batch, got, strict=True)]
    store = graphed.kv_store
    assert isinstance(store, kvcache.PagedKV)
    assert store.graphs and store.buckets  # captured, not fallen back to eager


def test_warm_up_captures_the_decode_graphs_before_serving() -> None:
    """What a decode engine on CUDA does at start (``runner.warmup_batch``): every bucket is captured
    then, serving adds none, and the replayed graphs give the eager tokens."""
    geometry = config.ModelConfig(num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=2, head_dim=16)
    device = torch.device("cuda")
    graphed = torch_runner.TorchRunner(loader.build(geometry), device)
    eager = torch_runner.TorchRunner(loader.build(geometry), device, cuda_graphs=False)
    assert graphed.warm_up(max_batch=8, max_tokens=256) == 4 * 5  # batches 1..8, widths 1..16 pages
    store = graphed.kv_store
    assert isinstance(store, kvcache.PagedKV) and store.graphs
    prepared = store.buckets
    width = graphed.kv_bytes_per_token_layer
    gen = torch.Generator().manual_seed(5)
    for index, tokens in enumerate((1, 90, 200)):
        kv = torch.randn(geometry.num_layers, tokens, width // 4, generator=gen).view(torch.uint8).numpy()
        graphed.load_sequence(f"s{index}", kv)
        eager.load_sequence(f"s{index}", kv)
    batch = [(f"s{i}", 3 + i) for i in range(3)]
    for _ in range(10):
        got = graphed.decode(batch)
        assert got == eager.decode(batch)
        batch = [(seq, token) for (seq, _), token in zip(batch, got, strict=True)]
    assert store.buckets == prepared


def test_full_block_h2d_through_the_pinned_arena_reaches_the_ceiling(copier: cuda.LayerCopier) -> None:
    slots = list(range(BLOCKS))
    dst = torch.empty(BLOCKS * FULL_BLOCK, dtype=torch.uint8, device="cuda")
    seconds = _median_seconds(lambda: copier.h2d_full_blocks(slots, dst))
    gbps = BLOCKS * FULL_BLOCK / seconds / 1e9
    print(
        f"\n[gpu] Full-Block H2D, {BLOCKS} x 8 MiB = 1 GiB, one copy: {gbps:.1f} GB/s "
        f"({gbps / H2D_CEILING_GBPS:.0%} of the {H2D_CEILING_GBPS} GB/s ceiling)"
    )
    assert torch.equal(dst.cpu(), copier.arena.buffer)
    assert gbps >= 0.9 * H2D_CEILING_GBPS


def test_batched_layer_block_copies_beat_one_by_one(copier: cuda.LayerCopier) -> None:
    slots = list(range(BLOCKS))
    dst = torch.empty(BLOCKS * LAYER_BLOCK, dtype=torch.uint8, device="cuda")

    def all_layers(copy: Callable[[list[int], int, torch.Tensor], torch.cuda.Event]) -> torch.cuda.Event:
        events = [copy(slots, layer, dst) for layer in range(LAYERS)]
        return events[-1]

    total = BLOCKS * FULL_BLOCK
    batched = total / _median_seconds(lambda: all_layers(copier.h2d_layer)) / 1e9
    one_by_one = total / _median_seconds(lambda: all_layers(copier.h2d_layer_one_by_one)) / 1e9
    print(
        f"\n[gpu] layer-wise H2D of 1 GiB ({LAYERS} layers x {BLOCKS} Layer Blocks of 256 KiB): "
        f"batched ({copier.method}) {batched:.1f} GB/s, one by one {one_by_one:.1f} GB/s "
        f"(x{batched / one_by_one:.2f})"
    )
    # Layer 5's bytes on the device equal the arena's Layer Blocks of layer 5.
    copier.h2d_layer(slots, 5, dst)
    copier.stream.synchronize()
    expected = copier.arena.buffer.view(BLOCKS, LAYERS, LAYER_BLOCK)[:, 5].reshape(-1)
    assert torch.equal(dst.cpu(), expected)
    assert batched > one_by_one


def test_layer_d2h_round_trip_and_non_contiguous_slots(copier: cuda.LayerCopier) -> None:
    slots = [3, 4, 5, 9, 10, 40]  # three runs
    src = torch.randint(0, 256, (len(slots) * LAYER_BLOCK,), dtype=torch.uint8, device="cuda")
    before = copier.copies_issued
    copier.d2h_layer(src, slots, 7).synchronize()
    assert copier.copies_issued - before == (3 if copier.method == "memcpy2d" else len(slots))
    back = torch.empty_like(src)
    copier.h2d_layer(slots, 7, back).synchronize()
    assert torch.equal(back, src)
    view = copier.arena.buffer.view(BLOCKS, LAYERS, LAYER_BLOCK)
    assert torch.equal(view[slots, 7].reshape(-1), src.cpu())


def test_arena_allocates_consecutive_runs_and_reports_full() -> None:
    arena = cuda.PinnedArena(8 * 4096, 4096)
    first = arena.allocate(3)
    second = arena.allocate(5)
    assert first == [0, 1, 2] and second == [3, 4, 5, 6, 7]
    with pytest.raises(cuda.ArenaFullError):
        arena.allocate(1)
    arena.release(first)
    assert arena.allocate(2) == [0, 1]
    arena.slot_array(2)[:] = 7
    assert int(arena.buffer[2 * 4096 : 3 * 4096].sum()) == 7 * 4096


class _Peer:
    """``tests.gpu.ipc_peer`` as a child process (stopped by PID)."""

    def __init__(self, device: int, count: int, host_sink: bool = False) -> None:
        args = [sys.executable, "-m", "tests.gpu.ipc_peer", "--device", str(device), "--count", str(count)]
        self.popen = subprocess.Popen(
            [*args, *(["--host-sink"] if host_sink else [])], stdout=subprocess.PIPE, text=True
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        assert line.startswith("ready "), line
        self.address = base.PeerAddress("127.0.0.1", int(line.split()[1]))

    def result(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        assert line.startswith("done "), line
        return dict(json.loads(line.removeprefix("done ")))

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
        self.popen.wait(30)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("peer_device", [0, 1], ids=["same-gpu", "gpu0-to-gpu1"])
def test_gpu_to_gpu_transport_between_two_processes(peer_device: int) -> None:
    if peer_device >= torch.cuda.device_count():
        pytest.skip(f"needs {peer_device + 1} GPUs, found {torch.cuda.device_count()}")
    blocks, size = 64, 8 << 20  # 512 MiB of Full Blocks, sent twice (warm-up, timed)
    gen = torch.Generator(device="cuda").manual_seed(3)
    data = [
        torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda", generator=gen) for _ in range(blocks)
    ]
    nic = base.Nic("mlx5_0", base.NicKind.COMPUTE, 50e9)
    peer = _Peer(peer_device, 2 * blocks)
    try:

        async def send() -> float:
            transport = cuda.CudaIpcTransport(nic, host="127.0.0.1")
            await transport.start(base.Inbox())
            try:
                warm = [(base.TransferMeta("warm", 0, i, 64), t) for i, t in enumerate(data)]
                await transport.send_device(peer.address, warm)  # opens and caches the IPC handles
                timed = [(base.TransferMeta("timed", 0, blocks + i, 64), t) for i, t in enumerate(data)]
                started = time.perf_counter()
                await transport.send_device(peer.address, timed)
                return time.perf_counter() - started
            finally:
                await transport.close()

        seconds = asyncio.run(send())
        result = peer.result()
    finally:
        peer.stop()
    gbps = blocks * size / seconds / 1e9
    print(f"\n[gpu] CUDA IPC transport cuda:0 -> cuda:{peer_device}, {blocks} x 8 MiB: {gbps:.1f} GB/s")
    expected = [_digest(t.cpu().numpy().tobytes()) for t in data]
    assert [result["digests"][str(blocks + i)] for i in range(blocks)] == expected
    assert result["rx_bytes"] == 2 * blocks * size == nic.counters.tx_bytes
    assert gbps > 1.0


def test_gpu_transport_carries_host_payloads_byte_exact() -> None:
    payloads = [np.arange(i * 1000, (i + 1) * 1000, dtype=np.uint16).view(np.uint8) for i in range(3)]
    peer = _Peer(0, len(payloads), host_sink=True)
    try:

        async def send() -> None:
            transport = cuda.CudaIpcTransport(base.Nic("a", base.NicKind.COMPUTE, 50e9), host="127.0.0.1")
            await transport.start(base.Inbox())
            try:
                items = [(base.TransferMeta("r", 2, i, 16), p) for i, p in enumerate(payloads)]
                await transport.send(peer.address, items)
            finally:
                await transport.close()

        asyncio.run(send())
        result = peer.result()
    finally:
        peer.stop()
    assert result["digests"] == {str(i): _digest(p.tobytes()) for i, p in enumerate(payloads)}


@pytest.mark.parametrize("transport", ["tcp", "cuda"])
def test_engine_processes_on_cuda_generate_the_recompute_tokens(
    tmp_path: pathlib.Path, transport: str
) -> None:
    """1 scheduler + 1 PE + 2 DE as processes with the model on the GPU (fp32), KV over TCP or CUDA IPC."""
    from tests.engine import harness

    model = loader.build(config.ModelConfig())
    extra = {"device": "cuda", "transport": {"kind": transport}}
    with harness.cluster(tmp_path, policy="de-only", engine_extra=extra) as cluster:
        history = tok.encode("a multi-turn session running on the GPU engines", bos=True)
        for turn in range(3):
            result = cluster.complete(history, 12)
            generated = result["choices"][0]["token_ids"]
            assert generated == llama.greedy_reference(model, history, 12), f"turn {turn}"
            history = [*history, *generated, *tok.encode(f" turn {turn}")]
        assert result["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert cluster.prefill.metric("dualpath_engine_transport_info", kind=transport) == 1
        assert cluster.prefill.nic_bytes("compute", "rx") > 0  # DE-path KV arrived over the transport
