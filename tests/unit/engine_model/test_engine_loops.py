"""The prefill and decode loops in one process (tiny torch model on CPU, in-memory links, filesystem
store): chunked prefill under the compute quota, both read paths, a corrupt DE-side block, and the
PE<->DE message encoding."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import torch

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.engine import decode, messages, prefill, tasks
from dualpath_engine.kv import filestore, hashing, layout, readqueue
from dualpath_engine.model import llama, loader
from dualpath_engine.model import runner as torch_runner
from dualpath_engine.scheduler import batching, protocol

pytestmark = pytest.mark.timeout(60)

BLOCK = 16
MODEL = config.ModelConfig()


class Links:
    """In-memory ``PeerLinks``: endpoint port -> handler; delivery in order."""

    def __init__(self) -> None:
        self.handlers: dict[int, messages.Handler] = {}
        self.sent: list[messages.Message] = []

    async def send(self, peer: protocol.TransportEndpoint, message: messages.Message) -> None:
        header, payload = messages.encode(message)  # through the wire format
        self.sent.append(message)
        await self.handlers[peer.port](messages.decode(header, payload))


class Pair:
    def __init__(self, tmp: pathlib.Path, mode: str, per_token_seconds: float) -> None:
        kv = config.KVConfig(block_tokens=BLOCK, storage_path=str(tmp), fsync=False)
        self.cfgs = {
            role: config.EngineConfig(role=role, engine_id=role, mode=mode, model=MODEL, kv=kv)  # type: ignore[arg-type]
            for role in ("prefill", "decode")
        }
        geometry = layout.BlockGeometry.from_config(MODEL, kv)
        self.store = filestore.FilesystemStore(tmp, geometry, fsync=False)
        self.root = hashing.root_hash(hashing.namespace_for(MODEL, kv))
        self.model = loader.build(MODEL)
        self.links = Links()
        self.events: list[protocol.TaskEvent] = []
        self.changed = asyncio.Event()
        self.pe = prefill.PrefillEngine(
            engine_config=self.cfgs["prefill"],
            runner=torch_runner.TorchRunner(self.model, torch.device("cpu")),
            reads=readqueue.ReadQueue(self.store, workers=2),
            links=self.links,
            events=self._record,
            time_model=batching.AttentionTimeModel(per_token_seconds=per_token_seconds),
        )
        self.de = decode.DecodeEngine(
            engine_config=self.cfgs["decode"],
            runner=torch_runner.TorchRunner(loader.build(MODEL), torch.device("cpu")),
            reads=readqueue.ReadQueue(self.store, workers=2),
            links=self.links,
            events=self._record,
        )
        self.links.handlers = {1: self.pe.handle, 2: self.de.handle}

    def _record(self, event: protocol.TaskEvent) -> None:
        self.events.append(event)
        self.changed.set()

    def assignment(
        self, task_id: str, prompt: list[int], gen: int, side: protocol.Side
    ) -> protocol.Assignment:
        chain = hashing.chain_hashes(prompt, BLOCK, self.root)
        hits = [protocol.HitBlock(index=i, hash=h.hex(), side=side) for i, h in enumerate(chain)]
        stored = [h for h in hits if self.store.path_of(bytes.fromhex(h.hash)).exists()]
        peer = {"group_id": "g", "node": "n"}
        return protocol.Assignment(
            task_id=task_id,
            request_id=task_id,
            attempt=0,
            role="prefill",
            engine_id="x",
            prompt_token_ids=tuple(prompt),
            sampling=protocol.SamplingParams(max_tokens=gen, ignore_eos=True),
            block_tokens=BLOCK,
            hit_blocks=tuple(stored),
            read_side=side,
            prefill=protocol.PeerInfo(engine_id="prefill", transport=_endpoint(1), **peer),
            decode=protocol.PeerInfo(engine_id="decode", transport=_endpoint(2), **peer),
            chunk_plan=protocol.ChunkPlan(cached_tokens=0, compute_tokens=len(prompt), compute_quota_ms=300),
        )

    async def generate(
        self,
        task_id: str,
        prompt: list[int],
        gen: int,
        side: protocol.Side,
        sampling: protocol.SamplingParams | None = None,
    ) -> list[int]:
        assignment = self.assignment(task_id, prompt, gen, side)
        if sampling is not None:
            assignment = assignment.model_copy(update={"sampling": sampling})
        self.de.assign(assignment)
        self.pe.assign(assignment)
        async with asyncio.timeout(30):
            while not any(e.task_id == task_id and (e.finish_reason or e.error) for e in self.events):
                self.changed.clear()
                await self.changed.wait()
        mine = [e for e in self.events if e.task_id == task_id]
        errors = [e.error for e in mine if e.error]
        assert not errors, errors
        return [t for e in mine if e.engine_id == "decode" for t in e.token_ids]


def _endpoint(port: int) -> protocol.TransportEndpoint:
    return protocol.TransportEndpoint(kind="tcp", host="127.0.0.1", port=port)


@pytest.fixture
async def pair_factory(tmp_path: pathlib.Path) -> AsyncIterator[object]:
    running: list[asyncio.Task[None]] = []

    def make(mode: str = "dualpath", per_token_seconds: float = 0.0) -> Pair:
        pair = Pair(tmp_path, mode, per_token_seconds)
        running.extend([asyncio.create_task(pair.pe.run()), asyncio.create_task(pair.de.run())])
        return pair

    yield make
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


async def test_long_prompt_is_chunked_under_the_quota_and_output_is_unchanged(pair_factory: object) -> None:
    assert callable(pair_factory)
    pair: Pair = pair_factory(per_token_seconds=0.3 / 40)  # at most 40 tokens per 300 ms batch
    prompt = tok.encode("a prompt long enough to need several prefill chunks " * 3, bos=True)
    started = time.monotonic()
    generated = await pair.generate("t0", prompt, 8, "pe")
    elapsed = time.monotonic() - started
    assert generated == llama.greedy_reference(pair.model, prompt, 8)
    assert pair.pe.batches_run >= len(prompt) // 40
    # The task's time is accounted once, by part, and within what the request took.
    assert pair.pe.tasks_done == 1
    parts = pair.pe.task_seconds
    assert set(parts) == set(prefill.TASK_PARTS) and min(parts.values()) >= 0
    assert parts["compute"] > 0 and sum(parts.values()) <= elapsed
    # Every decode step is counted in exactly one batch bucket (one sequence: bucket "1").
    assert pair.de.batch_steps == {"1": pair.de.steps_run} == pair.de.batch_tokens
    assert pair.de.batch_seconds["1"] == pytest.approx(sum(pair.de.step_seconds.values()))
    done = [e for e in pair.events if e.prefill_done]
    assert len(done) == 1 and done[0].cached_tokens == 0
    assert pair.store.path_of(hashing.chain_hashes(prompt, BLOCK, pair.root)[0]).exists()


@pytest.mark.parametrize("side", ["pe", "de"])
async def test_second_turn_hits_on_either_read_path_and_matches_recompute(
    pair_factory: object, side: str
) -> None:
    assert callable(pair_factory)
    pair: Pair = pair_factory()
    prompt = tok.encode("first turn of a session that will be continued", bos=True)
    first = await pair.generate("t1", prompt, 10, "pe")
    checked: list[list[hashing.BlockHash]] = []
    stored = pair.store.stored

    async def recording(blocks: Sequence[hashing.BlockHash]) -> list[bool]:
        checked.append(list(blocks))
        return await stored(blocks)

    pair.store.stored = recording  # type: ignore[method-assign]
    prompt2 = [*prompt, *first, *tok.encode(" second turn")]
    second = await pair.generate("t2", prompt2, 10, side)  # type: ignore[arg-type]
    assert second == llama.greedy_reference(pair.model, prompt2, 10)
    cached = next(e.cached_tokens for e in pair.events if e.task_id == "t2" and e.prefill_done)
    assert cached == (len(prompt) + len(first) - 1) // BLOCK * BLOCK
    # Persistence asks storage only about the blocks after the hit prefix just read from it.
    hit_blocks = set(hashing.chain_hashes(prompt2, BLOCK, pair.root)[: cached // BLOCK])
    assert checked and not hit_blocks & {block for call in checked for block in call}
    de_layers = [m for m in pair.links.sent if isinstance(m, messages.DeLayer) and m.task_id == "t2"]
    pe_layers = [m for m in pair.links.sent if isinstance(m, messages.PeLayer) and m.task_id == "t2"]
    if side == "de":
        assert len(de_layers) == MODEL.num_layers and all(m.blocks for m in de_layers)
        assert min(m.start for m in pe_layers) == cached  # only miss KV goes back to the DE
    else:
        assert not de_layers and min(m.start for m in pe_layers) == 0  # PE path ships hit + miss KV


async def test_corrupt_de_side_block_is_a_miss_and_is_recomputed(pair_factory: object) -> None:
    assert callable(pair_factory)
    pair: Pair = pair_factory()
    prompt = tok.encode("a session whose stored KV gets damaged on disk!", bos=True)
    first = await pair.generate("c1", prompt, 10, "pe")
    chain = hashing.chain_hashes(prompt, BLOCK, pair.root)
    path = pair.store.path_of(chain[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))
    prompt2 = [*prompt, *first, *tok.encode(" again")]
    second = await pair.generate("c2", prompt2, 10, "de")
    assert second == llama.greedy_reference(pair.model, prompt2, 10)
    report = next(m for m in pair.links.sent if isinstance(m, messages.HitReport) and m.task_id == "c2")
    assert 1 not in report.valid_blocks and 0 in report.valid_blocks
    cached = next(e.cached_tokens for e in pair.events if e.task_id == "c2" and e.prefill_done)
    assert cached == BLOCK  # only block 0 precedes the corrupt block
    assert path.exists()  # re-persisted by the decode engine after recompute


def test_messages_round_trip_and_prefix_rules() -> None:
    data = np.arange(48, dtype=np.uint8).reshape(3, 16)
    for message in (
        messages.HitReport("t", (0, 2)),
        messages.DeLayer("t", 1, (0, 2), data),
        messages.PeLayer("t", 0, 32, data),
        messages.PrefillDone("t", 32, 7),
        messages.TaskAbort("t", "gone"),
    ):
        back = messages.decode(*messages.encode(message))
        assert type(back) is type(message) and back.task_id == "t"
        if isinstance(message, messages.PeLayer | messages.DeLayer):
            assert isinstance(back, messages.PeLayer | messages.DeLayer)
            assert np.array_equal(back.data, data)
    with pytest.raises(messages.MessageError):
        messages.decode(b'{"kind": "nope"}', b"")
    sides: dict[int, protocol.Side] = {0: "pe", 1: "de", 2: "pe"}
    assert tasks.usable_prefix_tokens(sides, {0, 1, 2}, 16, 100) == 48
    assert tasks.usable_prefix_tokens(sides, {0, 2}, 16, 100) == 16
    assert tasks.usable_prefix_tokens(sides, {0, 1, 2}, 16, 48) == 47  # last prompt token is computed


async def test_sampled_generation_across_pe_and_de_is_seeded_and_reproducible(pair_factory: object) -> None:
    assert callable(pair_factory)
    pair: Pair = pair_factory()
    prompt = tok.encode("sampling across engines", bos=True)
    params = protocol.SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=21, ignore_eos=True)
    first = await pair.generate("s1", prompt, 10, "pe", params)
    again = await pair.generate("s2", prompt, 10, "pe", params)
    assert first == again
    sampling = tasks.sampling_of(params, "s1")
    assert sampling is not None
    ids, expected = list(prompt), []
    for _ in range(10):
        token = torch_runner.choose(pair.model(torch.tensor(ids))[-1], sampling, len(ids))
        expected.append(token)
        ids.append(token)
    assert first == expected


async def test_fresh_prompt_blocks_persist_with_one_device_read_back(pair_factory: object) -> None:
    """The decode engine writes a prompt's fresh Full Blocks right after prefill, reading them back from
    the device in one runner call (one call per block queued each behind a decode step, so a next turn
    arriving soon missed its prefix), and accounts its decode-step time."""
    assert callable(pair_factory)
    pair: Pair = pair_factory()
    runner = pair.de._runner
    calls: list[tuple[int, int]] = []
    read_kv = runner.read_kv

    def recording(seq_id: str, start: int, end: int) -> np.ndarray:
        calls.append((start, end))
        return read_kv(seq_id, start, end)

    runner.read_kv = recording  # type: ignore[method-assign]
    prompt = tok.encode("five full blocks of prompt, every one of them new to the store. " * 2, bos=True)
    prompt = prompt[: 5 * BLOCK]
    assert len(prompt) == 5 * BLOCK
    await pair.generate("p1", prompt, 3, "pe")
    chain = hashing.chain_hashes(prompt, BLOCK, pair.root)
    # Persistence runs beside decoding and may finish after the last token: wait for its report.
    async with asyncio.timeout(10):
        while len([h for e in pair.events if e.task_id == "p1" for h in e.persisted_block_hashes]) < 5:
            pair.changed.clear()
            await pair.changed.wait()
    assert all(pair.store.path_of(block).exists() for block in chain)
    assert calls == [(0, 5 * BLOCK)]
    persisted = [h for e in pair.events if e.task_id == "p1" for h in e.persisted_block_hashes]
    assert sorted(persisted) == sorted(block.hex() for block in chain)
    assert pair.de.steps_run >= 2
    assert pair.de.step_seconds["compute"] > 0


async def test_a_block_another_engine_is_writing_is_neither_written_again_nor_reported(
    pair_factory: object, tmp_path: pathlib.Path
) -> None:
    assert callable(pair_factory)
    pair: Pair = pair_factory()
    prompt = tok.encode("five full blocks of prompt, every one of them new to the store. " * 2, bos=True)
    prompt = prompt[: 5 * BLOCK]
    chain = hashing.chain_hashes(prompt, BLOCK, pair.root)
    other = filestore.FilesystemStore(tmp_path, pair.store.geometry, fsync=False)  # another DE's view
    try:
        assert await other.claim(chain[2])  # e.g. the previous turn's DE, its write still queued
        await pair.generate("p2", prompt, 3, "pe")
        async with asyncio.timeout(10):
            while len([h for e in pair.events if e.task_id == "p2" for h in e.persisted_block_hashes]) < 4:
                pair.changed.clear()
                await pair.changed.wait()
        assert [pair.store.path_of(block).exists() for block in chain] == [True, True, False, True, True]
        persisted = {h for e in pair.events if e.task_id == "p2" for h in e.persisted_block_hashes}
        assert persisted == {block.hex() for i, block in enumerate(chain) if i != 2}  # its writer reports it
        assert pair.store.metrics.value("dualpath_engine_kv_block_writes", result="claimed") == 1
    finally:
        await other.close()


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        (1, "1"),
        (2, "2"),
        (3, "3-4"),
        (4, "3-4"),
        (5, "5-8"),
        (8, "5-8"),
        (9, "9-16"),
        (64, "33-64"),
        (65, "65-128"),
    ],
)
def test_decode_batch_buckets_are_the_graph_buckets(size: int, bucket: str) -> None:
    assert decode.batch_bucket(size) == bucket


def test_decode_batch_bucket_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="at least one sequence, got 0"):
        decode.batch_bucket(0)
