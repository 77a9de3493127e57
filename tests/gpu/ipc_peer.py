"""Receiving peer for the GPU-to-GPU transport tests: ``python -m tests.gpu.ipc_peer --device N --count K``.

Starts ``transfer.cuda.CudaIpcTransport`` on loopback (free port), prints ``ready <port>``, receives
``K`` payloads (copied onto cuda:N), then prints ``done {json}`` with the bytes received and a digest
of each payload, and exits. ``--host-sink`` receives through a plain ``TransferSink`` (bytes, after a
D2H copy) instead of a device sink. Started and stopped (by PID) by ``test_cuda_engine.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json

import torch

from dualpath_engine.transfer import base, cuda


class _HostSink:
    def __init__(self, count: int) -> None:
        self.count = count
        self.digests: dict[int, str] = {}
        self.done = asyncio.Event()

    async def deliver(self, meta: base.TransferMeta, payload: bytes) -> None:
        self.digests[meta.block_index] = hashlib.sha256(payload).hexdigest()
        if len(self.digests) >= self.count:
            self.done.set()


class _DeviceSink(_HostSink):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.tensors: dict[int, torch.Tensor] = {}

    async def deliver_device(self, meta: base.TransferMeta, tensor: torch.Tensor) -> None:
        self.tensors[meta.block_index] = tensor  # digested after the last ack, outside the timed path
        if len(self.tensors) >= self.count:
            self.done.set()

    def digest(self) -> None:
        self.digests = {
            i: hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest() for i, t in self.tensors.items()
        }


async def _main(device: int, count: int, host_sink: bool) -> None:
    nic = base.Nic("mlx5_0", base.NicKind.COMPUTE, 50e9)
    transport = cuda.CudaIpcTransport(nic, host="127.0.0.1", device=torch.device("cuda", device))
    sink = _HostSink(count) if host_sink else _DeviceSink(count)
    address = await transport.start(sink)
    print(f"ready {address.port}", flush=True)
    await asyncio.wait_for(sink.done.wait(), 120)
    if isinstance(sink, _DeviceSink):
        sink.digest()
    print("done " + json.dumps({"rx_bytes": nic.counters.rx_bytes, "digests": sink.digests}), flush=True)
    await transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--host-sink", action="store_true")
    args = parser.parse_args()
    asyncio.run(_main(args.device, args.count, args.host_sink))
