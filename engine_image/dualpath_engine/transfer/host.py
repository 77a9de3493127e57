"""CPU implementations of the traffic manager's staging contracts (torch-free).

:class:`HostArena` (plain numpy memory allocated and touched once, carved into Full-Block slots) and
:class:`NumpyCopier` (layer copies between slots and numpy KV buffers) implement
:class:`~dualpath_engine.transfer.base.Arena` and :class:`~dualpath_engine.transfer.base.DeviceCopier` for
CPU engines and tests; ``transfer.cuda`` holds the pinned/CUDA versions. Built by the engine's
``__main__`` and used through :class:`~dualpath_engine.transfer.manager.TrafficManager`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dualpath_engine.transfer import base


class HostArena:
    """A plain numpy arena allocated (and touched) once; the CPU counterpart of ``cuda.PinnedArena``."""

    def __init__(self, total_bytes: int, slot_bytes: int) -> None:
        if slot_bytes <= 0 or total_bytes < slot_bytes:
            raise ValueError(f"arena of {total_bytes} bytes cannot hold a slot of {slot_bytes} bytes")
        self._slot_bytes = slot_bytes
        self._num_slots = total_bytes // slot_bytes
        self.buffer: base.ByteArray = np.empty(self._num_slots * slot_bytes, dtype=np.uint8)
        self.buffer.fill(0)  # populate the pages now, not on the first request
        self._free = [True] * self._num_slots

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def free_slots(self) -> int:
        return sum(self._free)

    def allocate(self, count: int) -> list[int]:
        if count < 1:
            raise ValueError(f"cannot allocate {count} slots")
        run = 0
        for index, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == count:
                start = index - count + 1
                for slot in range(start, index + 1):
                    self._free[slot] = False
                return list(range(start, index + 1))
        raise base.ArenaFullError(
            f"no {count} consecutive free slots of {self._slot_bytes} bytes ({self.free_slots} free)"
        )

    def release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            if self._free[slot]:
                raise RuntimeError(f"slot {slot} released twice")
        for slot in slots:
            self._free[slot] = True

    def slot_array(self, slot: int) -> base.ByteArray:
        if not 0 <= slot < self._num_slots:
            raise IndexError(f"slot {slot} outside 0..{self._num_slots - 1}")
        return self.buffer[slot * self._slot_bytes : (slot + 1) * self._slot_bytes]


class NumpyCopier:
    """DeviceCopier for CPU engines: ``dst``/``src`` are numpy ``uint8`` buffers (or views of torch CPU
    tensors); each contiguous run of slots is copied with one strided numpy assignment."""

    def __init__(self, arena: base.Arena, *, num_layers: int, layer_block_bytes: int) -> None:
        if num_layers * layer_block_bytes != arena.slot_bytes:
            raise ValueError(
                f"{num_layers} layers x {layer_block_bytes} bytes != arena slot of {arena.slot_bytes}"
            )
        self.arena = arena
        self.num_layers = num_layers
        self.layer_block_bytes = layer_block_bytes
        self.copies_issued = 0
        """Copy operations so far (one per contiguous run of slots)."""

    def _layer_view(self, first: int, length: int, layer: int) -> base.ByteArray:
        """Layer ``layer`` of slots ``first .. first+length-1`` as ``[length, width]`` (a strided view)."""
        start = self.arena.slot_array(first)
        last = self.arena.slot_array(first + length - 1)
        if _address(last) != _address(start) + (length - 1) * self.arena.slot_bytes:
            raise ValueError("arena slots of one run are not adjacent in memory")
        runs = np.lib.stride_tricks.as_strided(
            start,
            shape=(length, self.num_layers, self.layer_block_bytes),
            strides=(self.arena.slot_bytes, self.layer_block_bytes, 1),
            writeable=True,
        )
        return runs[:, layer]

    def _flat(self, buffer: Any, nbytes: int) -> base.ByteArray:
        flat = np.asarray(buffer).reshape(-1)
        if flat.dtype != np.uint8 or flat.size < nbytes:
            raise ValueError(f"buffer must be uint8 holding at least {nbytes} bytes")
        return flat

    def h2d_layer(self, slots: Sequence[int], layer: int, dst: Any) -> None:
        width = self.layer_block_bytes
        flat = self._flat(dst, len(slots) * width)
        for position, first, length in _runs(slots):
            flat[position * width : (position + length) * width].reshape(length, width)[:] = self._layer_view(
                first, length, layer
            )
            self.copies_issued += 1

    def d2h_layer(self, src: Any, slots: Sequence[int], layer: int) -> None:
        width = self.layer_block_bytes
        flat = self._flat(src, len(slots) * width)
        for position, first, length in _runs(slots):
            self._layer_view(first, length, layer)[:] = flat[
                position * width : (position + length) * width
            ].reshape(length, width)
            self.copies_issued += 1


def _address(array: base.ByteArray) -> int:
    return int(array.__array_interface__["data"][0])


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive slot ids: (position in ``slots``, first slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for position, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first_pos, first, length = runs[-1]
            runs[-1] = (first_pos, first, length + 1)
        else:
            runs.append((position, slot, 1))
    return runs
