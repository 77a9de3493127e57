"""KV-load microbenchmark: hit Full Blocks from storage into the prefill engine's memory at 1PnD over
the engine's own data-plane parts, every node's storage NIC held to the same emulated budget.

Parts used as the engines use them: ``transfer.base.Nic`` (token buckets: storage NIC rx per node,
compute NIC tx on the DE and rx on the PE), ``kv.readqueue.ReadQueue`` over a RAM-backed
``kv.storage.MemoryStore`` whose copies run in worker threads (design (a) of engine-dataplane.md s7.3),
and the scheduler's read-side rule ``scheduler.policy.plan_read``. Landing: PE path = storage -> PE
staging (pinned on CUDA) -> PE device; DE path = storage -> DE staging -> DE device -> PE device (GPU to
GPU copy, NVLink P2P when the devices differ) behind both compute NICs' buckets. On CPU the "devices"
are host tensors, so the same code runs in CI.

Modes, side by side in one run: ``pe_only`` (Basic), ``de_only``, ``dualpath`` (shorter read queue),
``split`` (split reads extension), ``unlimited`` (no budgets: the physical ceiling of this harness).
Every landed block is checked against its stored bytes at the end (last occupant of each PE slot).

Called by :mod:`bench.engine.__main__`; results are plain dicts (JSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench.engine import cluster, settings
from dualpath_engine.kv import hashing, layout, readqueue, storage
from dualpath_engine.scheduler import policy
from dualpath_engine.transfer import base

MODES = ("pe_only", "de_only", "dualpath", "split", "unlimited")
"""Modes measured, in report order; ``pe_only`` is the Basic baseline."""


class ThreadedMemoryStore(storage.MemoryStore):
    """``MemoryStore`` whose read copies run in a worker thread (numpy releases the GIL), so several
    nodes' reads proceed in parallel instead of serialising on the event loop."""

    async def _read_into(
        self, block: hashing.BlockHash, out: layout.ByteArray
    ) -> tuple[storage.ReadResult, storage.InvalidReason | None]:
        data = self._blocks.get(block)
        if data is None:
            return storage.ReadResult.ABSENT, None
        await asyncio.to_thread(np.copyto, out, np.frombuffer(data, dtype=np.uint8))
        return storage.ReadResult.HIT, None


@dataclasses.dataclass
class _Node:
    name: str
    nics: base.EngineNics
    reads: readqueue.ReadQueue
    device: torch.device
    staging: torch.Tensor
    device_buffer: torch.Tensor
    free: asyncio.Queue[int]
    stored_bytes: int = 0


def devices_for(count: int, device: settings.Device, decode_engines: int) -> list[torch.device]:
    """Device of each engine (PE first), placed as the replay clusters place engines
    (``cluster.placement``: the PE on GPU0, decode engines on the other GPUs), or the CPU."""
    topology = settings.Topology(prefill=1, decode=decode_engines, gpus=count if device == "cuda" else 0)
    return [
        torch.device("cpu") if gpu is None else torch.device("cuda", gpu)
        for _, _, gpu in cluster.placement(topology)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Bench:
    def __init__(self, cfg: settings.KvLoadSettings, device: settings.Device, gpus: int) -> None:
        self.cfg = cfg
        geo = cfg.geometry
        self.geometry = layout.BlockGeometry(geo.num_layers, geo.block_tokens, geo.bytes_per_token_layer)
        self.block_bytes = self.geometry.full_block_bytes
        self.pinned = device == "cuda"
        engines = 1 + cfg.decode_engines
        self.devices = devices_for(gpus, device, cfg.decode_engines)
        rng = np.random.default_rng(7)
        self.store = ThreadedMemoryStore(self.geometry)
        self.hashes: list[bytes] = []
        self.digests: dict[bytes, bytes] = {}
        for index in range(cfg.distinct_blocks):
            data = rng.integers(1, 255, self.block_bytes, dtype=np.uint8)
            block = hashlib.sha256(f"kvload-{index}".encode()).digest()
            self.store._blocks[block] = data.tobytes()
            self.hashes.append(block)
            self.digests[block] = hashlib.sha256(data.tobytes()).digest()
        self.ring = 2 * cfg.staging_slots * engines  # more than can be in flight at once
        self.pe_target = torch.empty((self.ring, self.block_bytes), dtype=torch.uint8, device=self.devices[0])

    def _node(self, name: str, index: int, emulate: bool) -> _Node:
        cfg = self.cfg
        metrics = base.NicMetrics()
        nics = base.EngineNics(
            storage=base.Nic(
                f"{name}-snic",
                base.NicKind.STORAGE,
                cfg.storage_budget_bytes_per_s,
                emulate=emulate,
                metrics=metrics,
            ),
            compute=base.Nic(
                f"{name}-cnic",
                base.NicKind.COMPUTE,
                cfg.compute_budget_bytes_per_s,
                emulate=emulate,
                metrics=metrics,
            ),
        )
        device = self.devices[index]
        staging = torch.empty(
            (cfg.staging_slots, self.block_bytes), dtype=torch.uint8, pin_memory=self.pinned
        )
        staging.fill_(0)
        free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(cfg.staging_slots):
            free.put_nowait(slot)
        return _Node(
            name=name,
            nics=nics,
            reads=readqueue.ReadQueue(self.store, workers=cfg.read_workers, nic=nics.storage),
            device=device,
            staging=staging,
            device_buffer=torch.empty(
                (cfg.staging_slots, self.block_bytes), dtype=torch.uint8, device=device
            ),
            free=free,
        )

    async def run(self, mode: str) -> dict[str, Any]:
        cfg = self.cfg
        emulate = mode != "unlimited"
        pe = self._node("pe0", 0, emulate)
        des = [self._node(f"de{i}", 1 + i, emulate) for i in range(cfg.decode_engines)]
        queued: dict[str, int] = {node.name: 0 for node in [pe, *des]}
        landed: dict[int, bytes] = {}
        next_slot = iter(range(10**9))
        rng = np.random.default_rng(11)
        plans: list[tuple[_Node, list[bytes], tuple[str, ...]]] = []
        rule: policy.ReadMode = "shorter_queue"
        if mode in ("pe_only", "de_only"):
            rule = "pe_only" if mode == "pe_only" else "de_only"
        bytes_per_token = self.geometry.bytes_per_token
        for request in range(cfg.requests):
            de = des[request % len(des)]
            picks = rng.integers(0, len(self.hashes), cfg.blocks_per_request)
            blocks = [self.hashes[int(i)] for i in picks]
            plan = policy.plan_read(
                rule,
                mode == "split",
                len(blocks),
                self.geometry.block_tokens,
                pe.name,
                de.name,
                queued,
                bytes_per_token,
                {},
                1.0,
            )
            for side in plan.sides:
                queued[pe.name if side == "pe" else de.name] += self.geometry.block_tokens
            plans.append((de, blocks, plan.sides))

        async def one(de: _Node, block: bytes, side: str) -> None:
            reader = pe if side == "pe" else de
            slot = await reader.free.get()
            try:
                out = reader.staging[slot].numpy()
                result = await reader.reads.read([block], [out])
                if result[0] is not storage.ReadResult.HIT:
                    raise RuntimeError(f"block {block.hex()[:12]} not read: {result[0]}")
                target = next(next_slot) % self.ring
                if side == "pe":
                    await asyncio.to_thread(self._copy, self.pe_target[target], reader.staging[slot])
                else:
                    await asyncio.to_thread(self._copy, de.device_buffer[slot], de.staging[slot])
                    await asyncio.gather(
                        de.nics.compute.transmit(self.block_bytes), pe.nics.compute.receive(self.block_bytes)
                    )
                    await asyncio.to_thread(self._copy, self.pe_target[target], de.device_buffer[slot])
                landed[target] = block
                reader.stored_bytes += self.block_bytes
                queued[reader.name] -= self.geometry.block_tokens
            finally:
                reader.free.put_nowait(slot)

        for device in set(self.devices):
            _sync(device)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                one(de, block, side)
                for de, blocks, sides in plans
                for block, side in zip(blocks, sides, strict=True)
            )
        )
        for device in set(self.devices):
            _sync(device)
        elapsed = time.perf_counter() - started
        checked = self._verify(landed)
        nodes = [pe, *des]
        per_node = {node.name: node.stored_bytes for node in nodes}
        total = sum(per_node.values())
        return {
            "mode": mode,
            "seconds": elapsed,
            "bytes": total,
            "bytes_per_s": total / elapsed,
            "read_bytes_per_node": per_node,
            "pe_path_share": pe.stored_bytes / total if total else 0.0,
            "cnic_rx_bytes_pe": pe.nics.compute.counters.rx_bytes,
            "blocks_verified": checked,
        }

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)
        if dst.device.type == "cuda":
            torch.cuda.current_stream(dst.device).synchronize()
        if src.device.type == "cuda" and src.device != dst.device:
            torch.cuda.current_stream(src.device).synchronize()

    def _verify(self, landed: dict[int, bytes]) -> int:
        for target, block in landed.items():
            data = self.pe_target[target].cpu().numpy().tobytes()
            if hashlib.sha256(data).digest() != self.digests[block]:
                raise RuntimeError(f"PE slot {target} holds corrupt KV of block {block.hex()[:12]}")
        return len(landed)


def ratios(results: Sequence[dict[str, Any]], cfg: settings.KvLoadSettings) -> dict[str, float]:
    """DualPath / Basic against the ideal (P + D) / P and achieved / sum of the emulated budgets."""
    by_mode = {result["mode"]: result for result in results}
    nodes = 1 + cfg.decode_engines
    budgets = nodes * cfg.storage_budget_bytes_per_s
    out = {
        "ideal_dualpath_over_basic": float(nodes),
        "sum_of_budgets_bytes_per_s": budgets,
    }
    basic = by_mode["pe_only"]["bytes_per_s"] if "pe_only" in by_mode else None
    for mode in MODES:
        if mode in by_mode:
            rate = by_mode[mode]["bytes_per_s"]
            out[f"{mode}_over_sum_of_budgets"] = rate / budgets
            if basic is not None:
                out[f"{mode}_over_basic"] = rate / basic
    if basic is not None:
        out["basic_over_one_budget"] = basic / cfg.storage_budget_bytes_per_s
    return out


async def run(
    cfg: settings.KvLoadSettings, device: settings.Device, gpus: int, modes: Sequence[str] = MODES
) -> dict[str, Any]:
    """Every mode side by side, ``cfg.repeats`` rounds (modes interleaved; the median round of each mode
    is reported), after a discarded warm-up pass."""
    bench = _Bench(cfg, device, gpus)
    await bench.run("unlimited")
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(cfg.repeats):
        for mode in modes:
            rounds[mode].append(await bench.run(mode))
    await bench.store.close()
    results = []
    for mode in modes:
        ordered = sorted(rounds[mode], key=lambda row: row["bytes_per_s"])
        median = dict(ordered[len(ordered) // 2])
        median["rounds_bytes_per_s"] = [row["bytes_per_s"] for row in rounds[mode]]
        results.append(median)
    out = {
        "settings": cfg.model_dump(mode="json"),
        "devices": [str(d) for d in bench.devices],
        "block_bytes": bench.block_bytes,
        "results": results,
        "ratios": ratios(results, cfg),
    }
    unlimited = [row for row in results if row["mode"] == "unlimited"]
    if unlimited:
        # engine-dataplane.md s8: a result is valid if the budgets stay well under the harness ceiling.
        out["sum_of_budgets_over_harness_ceiling"] = (
            (1 + cfg.decode_engines) * cfg.storage_budget_bytes_per_s / unlimited[0]["bytes_per_s"]
        )
    return out
