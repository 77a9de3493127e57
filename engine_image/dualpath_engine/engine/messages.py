"""Messages between a prefill engine (PE) and a decode engine (DE) about one task, and the link Protocol
that carries them (torch-free).

Called by ``engine.prefill`` and ``engine.decode`` (which send and handle them) and by ``engine.links``
(which frames them onto a KV transport). A message is a small JSON header plus an optional KV payload
(``uint8`` bytes); payload layouts are those of ``dualpath_engine.kv.layout``.

Per task, in order on one link:

- DE -> PE ``HitReport``: which of the DE-side hit blocks the DE read validly from storage (a corrupt
  or absent block is a miss the PE recomputes). Sent once, before any ``DeLayer``.
- DE -> PE ``DeLayer`` (one per layer): layer ``l`` of those valid blocks, ``[blocks * T, bytes]`` in
  block order (the DE read path: storage -> DE buffer -> PE, layer by layer).
- PE -> DE ``PeLayer``: layer ``l`` of a token range the DE buffer must hold: PE-side hits (PE path)
  and every computed (miss) token; DE-side hits are never sent back.
- PE -> DE ``PrefillDone``: all prompt KV has been sent; carries the first generated token.
- either way ``TaskAbort``: the sender gave up on the task (the scheduler is told separately).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from dualpath_engine.engine import runner as runner_api
from dualpath_engine.scheduler import protocol


@dataclasses.dataclass(frozen=True)
class HitReport:
    """DE -> PE: DE-side hit blocks read validly (block indices, prompt order)."""

    task_id: str
    valid_blocks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DeLayer:
    """DE -> PE: one layer of the valid DE-side hit blocks, ``[len(blocks) * T, bytes]``."""

    task_id: str
    layer: int
    blocks: tuple[int, ...]
    data: runner_api.KVArray


@dataclasses.dataclass(frozen=True)
class PeLayer:
    """PE -> DE: one layer of tokens ``start .. start + len(data) - 1``, ``[tokens, bytes]``."""

    task_id: str
    layer: int
    start: int
    data: runner_api.KVArray


@dataclasses.dataclass(frozen=True)
class PrefillDone:
    """PE -> DE: the whole prompt KV has been sent; decoding may start."""

    task_id: str
    cached_tokens: int
    first_token: int


@dataclasses.dataclass(frozen=True)
class TaskAbort:
    """Either way: the sender abandoned the task."""

    task_id: str
    reason: str


Message = HitReport | DeLayer | PeLayer | PrefillDone | TaskAbort

_KINDS: dict[str, type[Message]] = {
    "hit_report": HitReport,
    "de_layer": DeLayer,
    "pe_layer": PeLayer,
    "prefill_done": PrefillDone,
    "task_abort": TaskAbort,
}
_NAMES = {cls: name for name, cls in _KINDS.items()}


class MessageError(ValueError):
    """A frame that is not a valid engine message."""


def encode(message: Message) -> tuple[bytes, bytes]:
    """``(header, payload)``: header is JSON naming the kind; payload is the KV bytes (may be empty)."""
    fields: dict[str, Any] = {"kind": _NAMES[type(message)]}
    payload = b""
    shape: tuple[int, ...] = ()
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if field.name == "data":
            payload = value.tobytes()
            shape = tuple(value.shape)
        else:
            fields[field.name] = list(value) if isinstance(value, tuple) else value
    if shape:
        fields["shape"] = list(shape)
    return json.dumps(fields, separators=(",", ":")).encode(), payload


def decode(header: bytes, payload: bytes) -> Message:
    """Inverse of :func:`encode`; :class:`MessageError` names what is wrong."""
    try:
        fields = json.loads(header)
        cls = _KINDS[fields.pop("kind")]
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageError(f"not an engine message header: {header[:80]!r}") from exc
    shape = tuple(fields.pop("shape", ()))
    if any(field.name == "data" for field in dataclasses.fields(cls)):
        data = np.frombuffer(payload, dtype=np.uint8)
        if not shape or int(np.prod(shape)) != data.size:
            raise MessageError(f"{cls.__name__} payload of {data.size} bytes does not fit shape {shape}")
        fields["data"] = data.reshape(shape)
    for name in ("valid_blocks", "blocks"):
        if name in fields:
            fields[name] = tuple(fields[name])
    try:
        return cls(**fields)
    except TypeError as exc:
        raise MessageError(f"bad {cls.__name__} fields: {exc}") from exc


Handler = Callable[[Message], Awaitable[None]]
"""Called for every message that arrives, in arrival order per peer."""


class PeerLinks(Protocol):
    """Sends engine messages to peers; what the prefill/decode loops see of the KV transport."""

    async def send(self, peer: protocol.TransportEndpoint, message: Message) -> None:
        """Deliver ``message`` to ``peer`` (in order per peer); raises ``ConnectionError`` if it cannot."""
        ...


class LinkFailedError(ConnectionError):
    """A message could not be delivered to a peer engine."""
