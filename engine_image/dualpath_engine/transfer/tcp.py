"""TCP transport (asyncio streams): the default PE<->DE KV transport on CPU and across hosts.

Wire format (little-endian). Each payload travels as one frame::

    magic b"DPXF" | version u8 | flags u8 | request-id length u16 | layer i32 | block index i32
    | tokens u32 | payload length u64 | crc32 u32      (32 bytes)
    then the request id (UTF-8) and the payload.

``flags`` bit 0: the crc32 field is set and must be verified; bit 1: acknowledge after this frame
(the last frame of a ``send`` batch). The receiver answers an acknowledgement request with::

    magic b"DPAK" | status u8 (0 ok, 1 rejected) | 3 pad bytes | message length u32, then the message.

A frame the sink rejects (or with a bad checksum) does not break the stream: the receiver keeps reading
the batch and reports the first problem in the acknowledgement, so ``send`` raises
:class:`~dualpath_engine.transfer.base.TransportError` naming it. A malformed frame closes the connection.
Bytes are counted on the sender's compute NIC before they are written (paced when emulated) and on the
receiver's compute NIC as they are read. Built by the engine's ``__main__``; used through the traffic
manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import zlib
from collections.abc import Sequence

import numpy as np

from dualpath_engine.transfer import base

_FRAME = struct.Struct("<4sBBHiiIQI")
_ACK = struct.Struct("<4sB3xI")
_FRAME_MAGIC = b"DPXF"
_ACK_MAGIC = b"DPAK"
_VERSION = 1
_FLAG_CRC = 1
_FLAG_ACK = 2
_STREAM_LIMIT = 8 << 20  # read buffer: a large limit avoids pausing the socket while a block arrives
MAX_PAYLOAD_BYTES = 1 << 34
"""Largest accepted payload (16 GiB): anything larger is a malformed frame."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class TcpTransport(base.Transport):
    """Length-prefixed frames over one TCP connection per peer, acknowledged per batch."""

    kind = "tcp"

    def __init__(
        self,
        nic: base.Nic,
        *,
        host: str,
        port: int = 0,
        checksum: bool = False,
        connect_timeout_s: float = 10.0,
        ack_timeout_s: float = 120.0,
        metrics: base.TransportMetrics | None = None,
    ) -> None:
        super().__init__(nic, metrics)
        self._host = host
        self._port = port
        self._checksum = checksum
        self._connect_timeout = connect_timeout_s
        self._ack_timeout = ack_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: dict[base.PeerAddress, _Connection] = {}
        self._connecting = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()
        self._peers: set[asyncio.StreamWriter] = set()
        self._closing = False
        self._address: base.PeerAddress | None = None

    @property
    def address(self) -> base.PeerAddress:
        """Where this transport listens (after :meth:`start`)."""
        if self._address is None:
            raise RuntimeError("transport not started")
        return self._address

    async def start(self, sink: base.TransferSink) -> base.PeerAddress:
        if self._server is not None:
            raise RuntimeError("transport already started")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._handlers.add(task)
            self._peers.add(writer)
            try:
                await self._serve(sink, reader, writer)
            except asyncio.CancelledError:
                if not self._closing:
                    raise
                # Closing: asyncio's stream callback would log a cancelled handler as an error.
            finally:
                self._peers.discard(writer)
                if task is not None:
                    self._handlers.discard(task)

        self._server = await asyncio.start_server(handle, self._host, self._port, limit=_STREAM_LIMIT)
        port = self._server.sockets[0].getsockname()[1]
        self._address = base.PeerAddress(self._host, int(port))
        return self._address

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections.values()):
            await connection.close()
        self._connections.clear()
        for writer in list(self._peers):
            writer.close()  # the handler's next read ends
        handlers = list(self._handlers)
        if handlers:
            _, still = await asyncio.wait(handlers, timeout=5.0)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def send(
        self, peer: base.PeerAddress, items: Sequence[tuple[base.TransferMeta, base.ByteArray | bytes]]
    ) -> None:
        if not items:
            return
        frames = [(meta, _as_bytes(payload)) for meta, payload in items]
        connection = await self._connection(peer)
        started = time.perf_counter()
        total = 0
        try:
            async with connection.lock:
                for position, (meta, payload) in enumerate(frames):
                    last = position == len(frames) - 1
                    await self.nic.transmit(len(payload))
                    crc = await checksum(payload) if self._checksum else 0
                    self._write_frame(connection.writer, meta, payload, crc, ack=last)
                    await connection.writer.drain()
                    total += len(payload)
                status, message = await asyncio.wait_for(self._read_ack(connection.reader), self._ack_timeout)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            await self._drop(peer, connection)
            raise base.TransportError(f"sending to {peer} failed: {type(exc).__name__}: {exc}") from exc
        except asyncio.CancelledError:
            # The stream is mid-batch; it cannot be reused.
            await self._drop(peer, connection)
            raise
        if status != 0:
            raise base.TransportError(f"{peer} rejected the transfer: {message}")
        self.metrics.sent(total, time.perf_counter() - started)

    async def _connection(self, peer: base.PeerAddress) -> _Connection:
        async with self._connecting:
            connection = self._connections.get(peer)
            if connection is not None and not connection.writer.is_closing():
                return connection
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(peer.host, peer.port), self._connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                raise base.TransportError(f"cannot connect to {peer}: {type(exc).__name__}: {exc}") from exc
            connection = _Connection(reader, writer)
            self._connections[peer] = connection
            return connection

    async def _drop(self, peer: base.PeerAddress, connection: _Connection) -> None:
        if self._connections.get(peer) is connection:
            del self._connections[peer]
        await connection.close()

    def _write_frame(
        self,
        writer: asyncio.StreamWriter,
        meta: base.TransferMeta,
        payload: memoryview,
        crc: int,
        *,
        ack: bool,
    ) -> None:
        request = meta.request_id.encode()
        flags = (_FLAG_CRC if self._checksum else 0) | (_FLAG_ACK if ack else 0)
        header = _FRAME.pack(
            _FRAME_MAGIC,
            _VERSION,
            flags,
            len(request),
            meta.layer,
            meta.block_index,
            meta.tokens,
            len(payload),
            crc,
        )
        writer.write(header + request)
        writer.write(payload)

    @staticmethod
    async def _read_ack(reader: asyncio.StreamReader) -> tuple[int, str]:
        magic, status, length = _ACK.unpack(await reader.readexactly(_ACK.size))
        if magic != _ACK_MAGIC:
            raise ValueError("malformed acknowledgement")
        message = (await reader.readexactly(length)).decode(errors="replace") if length else ""
        return status, message

    async def _serve(
        self, sink: base.TransferSink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        problem: str | None = None
        try:
            while True:
                try:
                    header = await reader.readexactly(_FRAME.size)
                except asyncio.IncompleteReadError:
                    return  # peer closed between frames
                magic, version, flags, id_len, layer, block, tokens, size, crc = _FRAME.unpack(header)
                if magic != _FRAME_MAGIC or version != _VERSION or size > MAX_PAYLOAD_BYTES:
                    return  # not our protocol: drop the connection
                request_id = (await reader.readexactly(id_len)).decode()
                started = time.perf_counter()
                payload = await _read_payload(reader, size)
                await self.nic.receive(size)
                self.metrics.received(size, time.perf_counter() - started)
                if problem is None:
                    problem = await self._deliver(sink, request_id, layer, block, tokens, payload, flags, crc)
                if flags & _FLAG_ACK:
                    message = (problem or "").encode()
                    writer.write(_ACK.pack(_ACK_MAGIC, 0 if problem is None else 1, len(message)) + message)
                    await writer.drain()
                    problem = None
        except (ConnectionError, OSError, asyncio.IncompleteReadError, UnicodeDecodeError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @staticmethod
    async def _deliver(
        sink: base.TransferSink,
        request_id: str,
        layer: int,
        block: int,
        tokens: int,
        payload: bytes,
        flags: int,
        crc: int,
    ) -> str | None:
        where = f"request {request_id} layer {layer} block {block}"
        if flags & _FLAG_CRC and await checksum(payload) != crc:
            return f"checksum mismatch for {where}"
        try:
            meta = base.TransferMeta(request_id=request_id, layer=layer, block_index=block, tokens=tokens)
            await sink.deliver(meta, payload)
        except Exception as exc:
            return f"{where}: {type(exc).__name__}: {exc}"
        return None


OFFLOAD_CHECKSUM_BYTES = 256 * 1024
"""Payloads at least this large are checksummed in a worker thread (zlib releases the GIL), so a
multi-megabyte KV layer never stalls the engine's event loop (and its decode steps)."""


async def checksum(payload: bytes | memoryview) -> int:
    """CRC-32 of a payload, off the event loop when it is large."""
    if len(payload) >= OFFLOAD_CHECKSUM_BYTES:
        return await asyncio.to_thread(zlib.crc32, payload)
    return zlib.crc32(payload)


async def _read_payload(reader: asyncio.StreamReader, size: int) -> bytes:
    """Read one payload: ``readexactly`` up to the stream limit, chunks into one buffer beyond it."""
    if size <= _STREAM_LIMIT:
        return await reader.readexactly(size)
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        chunk = await reader.read(min(size - filled, _STREAM_LIMIT))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(view[:filled]), size)
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return bytes(buffer)


def _as_bytes(payload: base.ByteArray | bytes) -> memoryview:
    if isinstance(payload, bytes):
        return memoryview(payload)
    return np.ascontiguousarray(payload).reshape(-1).view(np.uint8).data
