"""Engine messages over a KV transport (``dualpath_engine.transfer.base.Transport``), torch-free.

Built by ``engine.service``: :class:`TransportLinks` is the ``messages.PeerLinks`` the prefill/decode loops
send through, and the ``TransferSink`` the transport delivers into. Each message travels as one
transport payload ``u32 header length | JSON header | KV bytes`` whose ``TransferMeta`` names the task
and the layer, so the transport counts every KV byte on the compute NICs of both ends.
"""

from __future__ import annotations

import struct

from dualpath_engine.engine import messages
from dualpath_engine.scheduler import protocol
from dualpath_engine.transfer import base

_LENGTH = struct.Struct("<I")


def pack(message: messages.Message) -> tuple[base.TransferMeta, bytes]:
    """One transport payload for ``message``."""
    header, payload = messages.encode(message)
    layer = getattr(message, "layer", base.ALL_LAYERS)
    data = getattr(message, "data", None)
    tokens = int(data.shape[0]) if data is not None else 0
    meta = base.TransferMeta(request_id=message.task_id, layer=layer, block_index=0, tokens=tokens)
    return meta, _LENGTH.pack(len(header)) + header + payload


def unpack(payload: bytes) -> messages.Message:
    """Inverse of :func:`pack` (the metadata is not needed)."""
    if len(payload) < _LENGTH.size:
        raise messages.MessageError("payload shorter than its header length")
    (length,) = _LENGTH.unpack_from(payload)
    end = _LENGTH.size + length
    if end > len(payload):
        raise messages.MessageError("header length beyond the payload")
    return messages.decode(payload[_LENGTH.size : end], payload[end:])


class TransportLinks:
    """Sends messages with a transport and hands received ones to ``handler`` (set before traffic)."""

    def __init__(self, transport: base.Transport) -> None:
        self._transport = transport
        self.handler: messages.Handler | None = None

    async def send(self, peer: protocol.TransportEndpoint, message: messages.Message) -> None:
        """Deliver one message; ``messages.LinkFailedError`` if the transport could not."""
        try:
            await self._transport.send(base.PeerAddress(peer.host, peer.port), [pack(message)])
        except base.TransportError as exc:
            raise messages.LinkFailedError(str(exc)) from exc

    async def deliver(self, meta: base.TransferMeta, payload: bytes) -> None:
        """``TransferSink``: decode and dispatch (raising rejects the frame back to the sender)."""
        if self.handler is None:
            raise RuntimeError("engine not ready")
        await self.handler(unpack(payload))
