"""CUDA device copies for the traffic manager: a pinned host arena allocated once, batched layer-block
H2D/D2H on a dedicated stream with events, and the one-copy-per-block baseline for comparison.

Used by the engine on a GPU (``dualpath_engine.__main__`` builds it when ``device: cuda``), by
``tests/gpu`` and by the benchmarks. Torch lives here (a device backend); nothing torch-free imports it.

Layouts (``dualpath_engine.kv``): a Full Block is ``[layers, block_tokens, bytes]`` and occupies one arena
slot; its layer ``l`` is the contiguous Layer Block at offset ``l * layer_block_bytes``. Layer ``l`` of a
run of consecutive slots is therefore a uniform-stride set (width = Layer Block, pitch = Full Block,
height = blocks), moved with ONE ``cudaMemcpy2DAsync`` per run instead of one copy per Layer Block
(the 256 KiB one-by-one rate is a third of the contiguous rate on the H200: engine-dataplane.md s7).
If the CUDA runtime library cannot be opened through ctypes, the copier gathers the Layer Blocks into a
pinned staging buffer (host memcpy) and issues one copy; ``method`` says which one is in use.

``PinnedArena`` implements ``transfer.base.Arena`` and ``LayerCopier`` implements
``transfer.base.DeviceCopier``. ``CudaIpcTransport`` is the same-host GPU-to-GPU
``transfer.base.Transport`` (CUDA IPC handles over a TCP control channel; NVLink P2P between two GPUs).
Without CUDA every constructor raises :class:`CudaUnavailableError` with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import glob
import json
import os
import sys
import time
import typing
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from dualpath_engine.transfer import base

_H2D = 1  # cudaMemcpyHostToDevice
_D2H = 2  # cudaMemcpyDeviceToHost


class CudaUnavailableError(RuntimeError):
    """CUDA is required for this object but torch cannot use a GPU here; the message says why."""


ArenaFullError = base.ArenaFullError
"""No run of free slots is long enough for an allocation (the traffic manager's common error)."""


def require_cuda(device: torch.device | str | int | None = None) -> torch.device:
    """The CUDA device to use, or :class:`CudaUnavailableError` explaining why there is none."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU-only build)"
        raise CudaUnavailableError(
            f"CUDA is not available: torch {torch.__version__} (CUDA {built}) sees no usable GPU; "
            "use device 'cpu' and transport 'tcp' on this machine"
        )
    resolved = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if resolved.type != "cuda":
        raise CudaUnavailableError(f"device {resolved} is not a CUDA device")
    return resolved


class PinnedArena:
    """One page-locked host buffer allocated (and touched) once, carved into fixed-size slots.

    Storage reads land straight in slots (``slot_array`` is a numpy view), so no pageable copy is ever
    made. Allocation takes a run of consecutive slots so that a request's blocks stay 2D-copyable.
    """

    def __init__(self, total_bytes: int, slot_bytes: int) -> None:
        require_cuda()
        if slot_bytes <= 0 or total_bytes < slot_bytes:
            raise ValueError(f"arena of {total_bytes} bytes cannot hold a slot of {slot_bytes} bytes")
        self.slot_bytes = slot_bytes
        self.num_slots = total_bytes // slot_bytes
        self.buffer = torch.empty(self.num_slots * slot_bytes, dtype=torch.uint8, pin_memory=True)
        self.buffer.fill_(0)  # populate the pages before anything is timed
        self._free = [True] * self.num_slots

    @property
    def free_slots(self) -> int:
        """Slots not allocated."""
        return sum(self._free)

    def allocate(self, count: int) -> list[int]:
        """A run of ``count`` consecutive free slots (first fit); :class:`ArenaFullError` if none."""
        run = 0
        for index, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == count:
                start = index - count + 1
                for slot in range(start, index + 1):
                    self._free[slot] = False
                return list(range(start, index + 1))
        raise ArenaFullError(
            f"no {count} consecutive free slots of {self.slot_bytes} bytes ({self.free_slots} free)"
        )

    def release(self, slots: Sequence[int]) -> None:
        """Return slots to the arena."""
        for slot in slots:
            self._free[slot] = True

    def slot_tensor(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a pinned uint8 tensor (a view)."""
        return self.buffer[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def slot_array(self, slot: int) -> npt.NDArray[np.uint8]:
        """The slot's bytes as a writable numpy view (storage reads land here)."""
        return self.slot_tensor(slot).numpy()

    def address(self, slot: int, offset: int = 0) -> int:
        """Host address of byte ``offset`` of ``slot``."""
        return int(self.buffer.data_ptr()) + slot * self.slot_bytes + offset


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split slots into runs of consecutive ids: (position in ``slots``, first slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for position, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first_pos, first, length = runs[-1]
            runs[-1] = (first_pos, first, length + 1)
        else:
            runs.append((position, slot, 1))
    return runs


class _CudaRuntime:
    """``cudaMemcpy2DAsync`` from the CUDA runtime torch already loaded, via ctypes."""

    def __init__(self) -> None:
        self._lib = self._open()
        fn = self._lib.cudaMemcpy2DAsync
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        fn.argtypes += [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self._memcpy2d = fn

    @staticmethod
    def _open() -> ctypes.CDLL:
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        for root in sys.path:
            names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*")))
            names += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
        errors = []
        for name in names:
            try:
                return ctypes.CDLL(name)
            except OSError as exc:
                errors.append(str(exc))
        raise OSError("cannot open the CUDA runtime: " + "; ".join(errors[:3]))

    def memcpy2d(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int, stream: int
    ) -> None:
        code = self._memcpy2d(dst, dpitch, src, spitch, width, height, kind, stream)
        if code != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {code}")


class LayerCopier:
    """Batched layer-block copies between a :class:`PinnedArena` and device memory on its own stream.

    Every call enqueues work on ``stream`` and returns a CUDA event recorded after it; the compute
    stream waits on that event (``torch.cuda.current_stream().wait_event``), so no host sync is needed.
    """

    def __init__(
        self,
        arena: PinnedArena,
        *,
        num_layers: int,
        layer_block_bytes: int,
        device: torch.device | str | None = None,
        use_memcpy2d: bool = True,
    ) -> None:
        self.device = require_cuda(device)
        if num_layers * layer_block_bytes != arena.slot_bytes:
            raise ValueError(
                f"{num_layers} layers x {layer_block_bytes} bytes != arena slot of {arena.slot_bytes} bytes"
            )
        self.arena = arena
        self.num_layers = num_layers
        self.layer_block_bytes = layer_block_bytes
        self.stream: torch.cuda.Stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self._runtime: _CudaRuntime | None = None
        if use_memcpy2d:
            try:
                self._runtime = _CudaRuntime()
            except (OSError, AttributeError):
                self._runtime = None
        self._staging: torch.Tensor | None = None
        self.copies_issued = 0
        """Copy operations submitted so far (a batched layer counts one per contiguous run)."""

    @property
    def method(self) -> str:
        """``memcpy2d`` (one strided copy per run) or ``staging`` (gather, then one copy)."""
        return "memcpy2d" if self._runtime is not None else "staging"

    def _event(self) -> torch.cuda.Event:
        event: torch.cuda.Event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.stream)
        return event

    def _check_dst(self, dst: torch.Tensor, nbytes: int) -> None:
        if dst.device.type != "cuda" or dst.dtype != torch.uint8 or not dst.is_contiguous():
            raise ValueError("destination must be a contiguous uint8 CUDA tensor")
        if dst.numel() < nbytes:
            raise ValueError(f"destination holds {dst.numel()} bytes, {nbytes} needed")

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            self.stream.synchronize()  # the old staging buffer may still be read by a copy
            self._staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self._staging

    def h2d_layer(self, slots: Sequence[int], layer: int, dst: torch.Tensor) -> torch.cuda.Event:
        """Layer ``layer`` of the Full Blocks in ``slots`` into ``dst`` ``[blocks, block_tokens, bytes]``."""
        width = self.layer_block_bytes
        self._check_dst(dst, len(slots) * width)
        with torch.cuda.stream(self.stream):
            if self._runtime is not None:
                for position, first, length in _runs(slots):
                    self._runtime.memcpy2d(
                        int(dst.data_ptr()) + position * width,
                        width,
                        self.arena.address(first, layer * width),
                        self.arena.slot_bytes,
                        width,
                        length,
                        _H2D,
                        self.stream.cuda_stream,
                    )
                    self.copies_issued += 1
            else:
                staging = self._staging_buffer(len(slots) * width)
                for position, slot in enumerate(slots):
                    block = self.arena.slot_tensor(slot)[layer * width : (layer + 1) * width]
                    staging[position * width : (position + 1) * width].copy_(block)
                dst[: len(slots) * width].copy_(staging[: len(slots) * width], non_blocking=True)
                self.copies_issued += 1
        return self._event()

    def d2h_layer(self, src: torch.Tensor, slots: Sequence[int], layer: int) -> torch.cuda.Event:
        """The reverse of :meth:`h2d_layer`: ``src`` ``[blocks, tokens, bytes]`` into ``layer`` of slots."""
        width = self.layer_block_bytes
        self._check_dst(src, len(slots) * width)
        with torch.cuda.stream(self.stream):
            if self._runtime is not None:
                for position, first, length in _runs(slots):
                    self._runtime.memcpy2d(
                        self.arena.address(first, layer * width),
                        self.arena.slot_bytes,
                        int(src.data_ptr()) + position * width,
                        width,
                        width,
                        length,
                        _D2H,
                        self.stream.cuda_stream,
                    )
                    self.copies_issued += 1
            else:
                for position, slot in enumerate(slots):
                    block = self.arena.slot_tensor(slot)[layer * width : (layer + 1) * width]
                    block.copy_(src[position * width : (position + 1) * width], non_blocking=True)
                    self.copies_issued += 1
        return self._event()

    def h2d_layer_one_by_one(self, slots: Sequence[int], layer: int, dst: torch.Tensor) -> torch.cuda.Event:
        """Baseline: one copy per Layer Block (what the batched copy must beat)."""
        width = self.layer_block_bytes
        self._check_dst(dst, len(slots) * width)
        with torch.cuda.stream(self.stream):
            for position, slot in enumerate(slots):
                block = self.arena.slot_tensor(slot)[layer * width : (layer + 1) * width]
                dst[position * width : (position + 1) * width].copy_(block, non_blocking=True)
                self.copies_issued += 1
        return self._event()

    def h2d_full_blocks(self, slots: Sequence[int], dst: torch.Tensor) -> torch.cuda.Event:
        """Whole Full Blocks into ``dst`` ``[blocks, layers, tokens, bytes]``: one copy per run of slots."""
        size = self.arena.slot_bytes
        self._check_dst(dst, len(slots) * size)
        with torch.cuda.stream(self.stream):
            for position, first, length in _runs(slots):
                src = self.arena.buffer[first * size : (first + length) * size]
                dst[position * size : (position + length) * size].copy_(src, non_blocking=True)
                self.copies_issued += 1
        return self._event()

    def d2h_full_blocks(self, src: torch.Tensor, slots: Sequence[int]) -> torch.cuda.Event:
        """Whole Full Blocks from ``src`` into ``slots``: one copy per run of slots."""
        size = self.arena.slot_bytes
        self._check_dst(src, len(slots) * size)
        with torch.cuda.stream(self.stream):
            for position, first, length in _runs(slots):
                dst = self.arena.buffer[first * size : (first + length) * size]
                dst.copy_(src[position * size : (position + length) * size], non_blocking=True)
                self.copies_issued += 1
        return self._event()


# ------------------------------------------------------------------ same-host GPU-to-GPU transport


class _CountingOnly(base.Nic):
    """The control channel's NIC: a private, never-exported counter (payload bytes are counted on the
    real compute NIC by :class:`CudaIpcTransport` itself, not the few bytes of an IPC handle)."""

    def __init__(self) -> None:
        super().__init__("ipc-control", base.NicKind.COMPUTE, 1e12, metrics=base.NicMetrics())


def export_handle(tensor: torch.Tensor) -> bytes:
    """A JSON description of a CUDA tensor's IPC handle that another process can open."""
    if tensor.device.type != "cuda":
        raise ValueError("only CUDA tensors can be exported")
    storage = tensor._typed_storage()  # type: ignore[no-untyped-call]
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle, event_sync) = (
        storage._share_cuda_()
    )
    fields = {
        "size": list(tensor.size()),
        "stride": list(tensor.stride()),
        "offset": tensor.storage_offset(),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "device": int(device),
        "handle": base64.b64encode(handle).decode(),
        "size_bytes": int(size_bytes),
        "offset_bytes": int(offset_bytes),
        "ref_handle": base64.b64encode(ref_handle).decode(),
        "ref_offset": int(ref_offset),
        "event_handle": base64.b64encode(event_handle or b"").decode(),
        "event_sync": bool(event_sync),
    }
    return json.dumps(fields).encode()


def open_handle(description: bytes) -> torch.Tensor:
    """The exporter's tensor, mapped into this process (valid while the exporter keeps it alive)."""
    from torch.multiprocessing import reductions

    fields = json.loads(description)
    tensor = reductions.rebuild_cuda_tensor(  # type: ignore[no-untyped-call]
        torch.Tensor,
        torch.Size(fields["size"]),
        tuple(fields["stride"]),
        fields["offset"],
        torch.storage.TypedStorage,
        getattr(torch, fields["dtype"]),
        fields["device"],
        base64.b64decode(fields["handle"]),
        fields["size_bytes"],
        fields["offset_bytes"],
        False,
        base64.b64decode(fields["ref_handle"]),
        fields["ref_offset"],
        base64.b64decode(fields["event_handle"]) or None,
        fields["event_sync"],
    )
    return typing.cast(torch.Tensor, tensor)


class DeviceSink(typing.Protocol):
    """A sink that takes KV on the device (no copy back to the host)."""

    async def deliver_device(self, meta: base.TransferMeta, tensor: torch.Tensor) -> None:
        """Accept a uint8 CUDA tensor (owned by the receiver) for ``meta``."""
        ...


class CudaIpcTransport(base.Transport):
    """Same-host GPU-to-GPU transport: CUDA IPC handles over a TCP control channel.

    The sender stages each payload on its GPU (host payloads are copied H2D; :meth:`send_device` takes
    device tensors as they are), exports a CUDA IPC handle and sends the handle as a frame of
    ``transfer.tcp``; the receiver opens the handle and copies from the peer GPU: to its own GPU (NVLink
    P2P when the GPUs differ) for a :class:`DeviceSink`, or straight into pinned host memory for a plain
    ``TransferSink`` (one copy, no device round trip). The TCP acknowledgement comes after that copy, so
    the sender frees its staging only once the receiver is done. Copies run on the transport's own CUDA
    stream and are waited for in a worker thread: the event loop (and the engine's decode steps on it)
    never blocks on a device synchronise. Payload bytes are counted (and paced when emulated) on the
    compute NICs of both ends.
    """

    kind = "cuda"

    def __init__(
        self,
        nic: base.Nic,
        *,
        host: str,
        port: int = 0,
        device: torch.device | str | int | None = None,
        connect_timeout_s: float = 10.0,
        metrics: base.TransportMetrics | None = None,
    ) -> None:
        super().__init__(nic, metrics)
        self.device = require_cuda(device)
        from dualpath_engine.transfer import tcp

        self._control = tcp.TcpTransport(
            _CountingOnly(), host=host, port=port, connect_timeout_s=connect_timeout_s
        )
        self._sink: base.TransferSink | DeviceSink | None = None
        self._stream: torch.cuda.Stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    async def start(self, sink: base.TransferSink) -> base.PeerAddress:
        self._sink = sink
        return await self._control.start(_Receiver(self))

    async def close(self) -> None:
        await self._control.close()

    async def send(
        self, peer: base.PeerAddress, items: Sequence[tuple[base.TransferMeta, base.ByteArray | bytes]]
    ) -> None:
        def stage() -> list[tuple[base.TransferMeta, torch.Tensor]]:
            staged = []
            with torch.cuda.stream(self._stream):
                for meta, payload in items:
                    if isinstance(payload, bytes):
                        host = np.frombuffer(payload, np.uint8)
                    else:
                        host = payload.reshape(-1)
                    flat = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
                    source = torch.empty(flat.size, dtype=torch.uint8, pin_memory=True)
                    source.numpy()[:] = flat  # one host copy into pinned memory (bytes are read-only)
                    staged.append((meta, source.to(self.device, non_blocking=True)))
            self._stream.synchronize()
            return staged

        await self.send_device(peer, await asyncio.to_thread(stage))

    async def send_device(
        self, peer: base.PeerAddress, items: Sequence[tuple[base.TransferMeta, torch.Tensor]]
    ) -> None:
        """Send CUDA tensors (flat uint8) in order; returns once the peer copied all of them."""
        started = time.perf_counter()
        frames = []
        total = 0
        for meta, tensor in items:
            flat = tensor.reshape(-1)
            await self.nic.transmit(flat.numel())
            frames.append((meta, export_handle(flat)))
            total += flat.numel()
        stream = torch.cuda.current_stream(self.device)
        await asyncio.to_thread(stream.synchronize)  # staged data complete before the peer reads
        await self._control.send(peer, frames)
        self.metrics.sent(total, time.perf_counter() - started)
        torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]  # free staging the peer has released

    async def _receive(self, meta: base.TransferMeta, description: bytes) -> None:
        started = time.perf_counter()
        sink = self._sink
        if sink is None:
            raise RuntimeError("transport not started")
        on_device = hasattr(sink, "deliver_device")

        def copy() -> torch.Tensor | bytes:
            source = open_handle(description)
            with torch.cuda.stream(self._stream):
                if on_device:
                    local = torch.empty(source.shape, dtype=source.dtype, device=self.device)
                else:
                    local = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                local.copy_(source, non_blocking=True)
            self._stream.synchronize()
            return local if on_device else local.numpy().tobytes()

        received = await asyncio.to_thread(copy)
        nbytes = len(received) if isinstance(received, bytes) else received.numel()
        await self.nic.receive(nbytes)
        self.metrics.received(nbytes, time.perf_counter() - started)
        if isinstance(received, bytes):
            await typing.cast(base.TransferSink, sink).deliver(meta, received)
        else:
            await typing.cast(DeviceSink, sink).deliver_device(meta, received)


class _Receiver:
    def __init__(self, transport: CudaIpcTransport) -> None:
        self._transport = transport

    async def deliver(self, meta: base.TransferMeta, payload: bytes) -> None:
        await self._transport._receive(meta, payload)
