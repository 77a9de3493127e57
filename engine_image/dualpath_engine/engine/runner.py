"""The model-runner contract the engine loops call (torch-free).

The prefill and decode loops in this package never import torch: ``__main__`` builds the torch runner
(``dualpath_engine.model.runner.TorchRunner``) and injects it; the loops only see this Protocol.

KV crosses the contract as numpy ``uint8`` arrays in the layouts of ``dualpath_engine.kv``:
- one layer of one sequence: ``[tokens, kv_bytes_per_token_layer]`` (a run of Layer Blocks, squeezed);
- all layers of one sequence: ``[num_layers, tokens, kv_bytes_per_token_layer]`` (Full Blocks side by side
  along ``tokens``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

KVArray = npt.NDArray[np.uint8]
"""KV bytes: ``[tokens, bytes]`` for one layer or ``[layers, tokens, bytes]`` for all layers."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0, else nucleus sampling.

    The random draw for the token at sequence position ``p`` is seeded from ``(seed, p)``, so the PE
    (first token) and the DE (the rest) draw the same way and a retried request repeats its output.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PrefillItem:
    """One sequence's share of a prefill batch.

    ``cached_tokens`` tokens already have KV (a storage hit or an earlier chunk); the caller supplies it
    layer by layer. ``new_token_ids`` are the tokens this batch computes, at positions
    ``cached_tokens .. cached_tokens + len(new_token_ids) - 1``.
    """

    seq_id: str
    cached_tokens: int
    new_token_ids: tuple[int, ...]
    sampling: Sampling | None = None
    """None = greedy."""


class PrefillPass(Protocol):
    """One layer-wise forward over a batch; layers must be run in order 0..L-1, then ``finish``."""

    def run_layer(self, layer: int, cached_kv: Sequence[KVArray]) -> list[KVArray]:
        """Compute ``layer`` given each item's cached KV ``[cached_tokens, bytes]`` of that layer.

        Returns each item's new KV ``[len(new_token_ids), bytes]`` for the layer (host memory).
        """
        ...

    def finish(self) -> list[int]:
        """Next token after each item's last new token (greedy or per the item's ``sampling``)."""
        ...


class ModelRunner(Protocol):
    """What the engine loops need from a model on some device."""

    @property
    def num_layers(self) -> int:
        """Decoder layers (the ``layers`` axis of a Full Block)."""
        ...

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of K and V per token per layer (the ``bytes`` axis of a Layer Block)."""
        ...

    def begin_prefill(self, items: Sequence[PrefillItem]) -> PrefillPass:
        """Start a layer-wise prefill pass over ``items``."""
        ...

    def load_sequence(self, seq_id: str, kv: KVArray, sampling: Sampling | None = None) -> None:
        """Place a sequence's whole KV ``[layers, tokens, bytes]`` on the device for decoding.

        ``sampling`` applies to every token decoded for the sequence; None = greedy.
        """
        ...

    def decode(self, steps: Sequence[tuple[str, int]]) -> list[int]:
        """Append each ``(seq_id, token)`` to its sequence's KV and return each next token."""
        ...

    def read_kv(self, seq_id: str, start: int, end: int) -> KVArray:
        """Device-to-host copy of tokens ``start..end-1`` of a sequence: ``[layers, end-start, bytes]``."""
        ...

    def release(self, seq_id: str) -> None:
        """Free a sequence's device KV; unknown ids are ignored."""
        ...


class RunnerError(RuntimeError):
    """A runner call with arguments that do not fit its state (unknown sequence, wrong KV shape)."""
