"""Torch-free core of the traffic manager: NIC model, transport interface, staging/copy contracts.

- :class:`TokenBucket` and :class:`Nic`: every NIC keeps byte counters always and, when emulation is on,
  paces each direction through a token bucket whose budget (bytes/s) can change at run time.
  Counters are exported as ``dualpath_engine_nic_bytes_total{nic,direction,kind}``
  (:class:`NicMetrics`, registry injectable) and mirrored to a fake sysfs tree by
  :mod:`dualpath_engine.transfer.sysfs`.
- :class:`Transport`: moves Layer Blocks and Full Blocks between engines (PE<->DE) with per-transfer
  metadata (:class:`TransferMeta`), counted on the compute NICs of both ends; implementations are
  :mod:`~dualpath_engine.transfer.tcp` (asyncio) and device/RDMA backends. Received frames go to a
  :class:`TransferSink`; :class:`Inbox` is a ready-made sink that buffers by request and layer.
- :class:`Arena` / :class:`DeviceCopier`: the contracts the traffic manager uses for host staging and
  H2D/D2H. ``transfer.host`` implements them on CPU (``HostArena``, ``NumpyCopier``); ``transfer.cuda``
  provides ``PinnedArena`` and ``LayerCopier`` for GPUs.

Called by :mod:`dualpath_engine.transfer.manager` (one traffic manager per engine), the engine loops and
the simulator. Never imports torch.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import enum
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt
import prometheus_client

from dualpath_engine import config

ByteArray = npt.NDArray[np.uint8]
"""A numpy ``uint8`` array."""

PACKET_BYTES = 4096
"""MTU used to derive packet counters from byte counts."""

ALL_LAYERS = -1
"""``TransferMeta.layer`` of a Full Block (all layers)."""


# --------------------------------------------------------------------------------------------- NICs


class TokenBucket:
    """Paces bytes to ``rate`` bytes/s with a burst allowance; concurrent callers queue fairly.

    Each call takes its bytes at once (the level may go negative) and sleeps until the debt is repaid,
    so N concurrent callers each wait for everything taken before them: the long-run rate is exact and
    no lock is needed. A rate change applies to calls made after it.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        burst_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._rate = self._checked(rate_bytes_per_s)
        self._fixed_burst = burst_bytes is not None
        self._burst = burst_bytes if burst_bytes is not None else self.default_burst(self._rate)
        if self._burst <= 0:
            raise ValueError(f"burst must be positive, got {self._burst}")
        self._level = self._burst
        self._stamp = clock()

    @staticmethod
    def default_burst(rate_bytes_per_s: float) -> float:
        """5 ms of traffic, at least 64 KiB."""
        return max(rate_bytes_per_s * 0.005, 64 * 1024.0)

    @staticmethod
    def _checked(rate: float) -> float:
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate must be a positive number of bytes/s, got {rate}")
        return float(rate)

    @property
    def rate(self) -> float:
        """Current budget in bytes/s."""
        return self._rate

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change the budget (e.g. a degraded NIC); tokens earned so far are kept, up to the new burst.

        A default burst (5 ms of traffic) follows the rate; otherwise a NIC lowered from 25 GB/s would
        keep a 125 MB burst and small transfers would never feel the lower budget.
        """
        self._refill()
        self._rate = self._checked(rate_bytes_per_s)
        if not self._fixed_burst:
            self._burst = self.default_burst(self._rate)
            self._level = min(self._level, self._burst)

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self._burst, self._level + (now - self._stamp) * self._rate)
        self._stamp = now

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` now; returns how many seconds the caller must wait before they count as sent."""
        if nbytes < 0:
            raise ValueError(f"cannot take {nbytes} bytes")
        self._refill()
        self._level -= nbytes
        return max(0.0, -self._level / self._rate)

    async def consume(self, nbytes: int) -> float:
        """Take ``nbytes`` and wait until the budget allows them; returns the seconds waited."""
        wait = self.reserve(nbytes)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait


class NicKind(enum.StrEnum):
    """Which network a NIC serves."""

    STORAGE = "storage"
    COMPUTE = "compute"


class NicMetrics:
    """Prometheus series of all NICs of one process (a private registry when ``registry`` is None)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.bytes = prometheus_client.Counter(
            "dualpath_engine_nic_bytes",
            "Bytes through each (emulated) NIC; mirrored to fake sysfs counters for node_exporter.",
            ["nic", "direction", "kind"],
            registry=self.registry,
        )
        self.budget = prometheus_client.Gauge(
            "dualpath_engine_nic_budget_bytes_per_second",
            "Emulated bandwidth budget of a NIC's token buckets (0 = not emulated, unlimited).",
            ["nic"],
            registry=self.registry,
        )
        self.throttled = prometheus_client.Counter(
            "dualpath_engine_nic_throttled_seconds",
            "Time transfers waited on a NIC's token bucket.",
            ["nic", "direction"],
            registry=self.registry,
        )


@dataclasses.dataclass
class NicCounters:
    """Byte and packet counters of one NIC since the process started."""

    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0


class Nic:
    """One NIC: counters always; per-direction token buckets when emulation is on."""

    def __init__(
        self,
        device: str,
        kind: NicKind,
        line_rate_bytes_per_s: float,
        *,
        emulate: bool = False,
        budget_bytes_per_s: float | None = None,
        metrics: NicMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.kind = kind
        self.line_rate_bytes_per_s = float(line_rate_bytes_per_s)
        self.counters = NicCounters()
        self._metrics = metrics if metrics is not None else NicMetrics()
        self._tx_series = self._metrics.bytes.labels(device, "tx", kind.value)
        self._rx_series = self._metrics.bytes.labels(device, "rx", kind.value)
        self._tx_wait = self._metrics.throttled.labels(device, "tx")
        self._rx_wait = self._metrics.throttled.labels(device, "rx")
        self._tx_bucket: TokenBucket | None = None
        self._rx_bucket: TokenBucket | None = None
        if emulate:
            rate = budget_bytes_per_s if budget_bytes_per_s is not None else self.line_rate_bytes_per_s
            self._tx_bucket = TokenBucket(rate, clock=clock)
            self._rx_bucket = TokenBucket(rate, clock=clock)
        self._metrics.budget.labels(device).set(self.budget_bytes_per_s or 0.0)

    @classmethod
    def from_config(cls, nic: config.NicConfig, kind: NicKind, *, emulate: bool, metrics: NicMetrics) -> Nic:
        """A NIC as configured."""
        return cls(
            nic.device,
            kind,
            nic.line_rate_bytes_per_s,
            emulate=emulate,
            budget_bytes_per_s=nic.budget_bytes_per_s,
            metrics=metrics,
        )

    @property
    def emulated(self) -> bool:
        """Whether token buckets pace this NIC."""
        return self._tx_bucket is not None

    @property
    def budget_bytes_per_s(self) -> float | None:
        """Current per-direction budget, or None when not emulated."""
        return self._tx_bucket.rate if self._tx_bucket is not None else None

    def set_budget(self, bytes_per_s: float | None) -> None:
        """Change the budget at run time (None = line rate); only meaningful when emulated."""
        if self._tx_bucket is None or self._rx_bucket is None:
            raise RuntimeError(f"NIC {self.device} is not emulated; it has no budget to change")
        rate = bytes_per_s if bytes_per_s is not None else self.line_rate_bytes_per_s
        self._tx_bucket.set_rate(rate)
        self._rx_bucket.set_rate(rate)
        self._metrics.budget.labels(self.device).set(rate)

    async def transmit(self, nbytes: int) -> None:
        """Count ``nbytes`` sent and, when emulated, wait for the budget."""
        self.counters.tx_bytes += nbytes
        self.counters.tx_packets += _packets(nbytes)
        self._tx_series.inc(nbytes)
        if self._tx_bucket is not None:
            self._tx_wait.inc(await self._tx_bucket.consume(nbytes))

    async def receive(self, nbytes: int) -> None:
        """Count ``nbytes`` received and, when emulated, wait for the budget."""
        self.counters.rx_bytes += nbytes
        self.counters.rx_packets += _packets(nbytes)
        self._rx_series.inc(nbytes)
        if self._rx_bucket is not None:
            self._rx_wait.inc(await self._rx_bucket.consume(nbytes))


def _packets(nbytes: int) -> int:
    return -(-nbytes // PACKET_BYTES)


@dataclasses.dataclass(frozen=True)
class EngineNics:
    """The NICs one engine uses: its node's storage NIC and its own compute NIC."""

    storage: Nic
    compute: Nic

    def all(self) -> tuple[Nic, ...]:
        """Both NICs."""
        return (self.storage, self.compute)


def build_engine_nics(engine: config.EngineConfig, metrics: NicMetrics) -> EngineNics:
    """The storage NIC and ``compute_nics[local_rank]`` of an engine, emulated if configured."""
    network = engine.network
    return EngineNics(
        storage=Nic.from_config(
            network.storage_nic, NicKind.STORAGE, emulate=network.emulate, metrics=metrics
        ),
        compute=Nic.from_config(
            engine.compute_nic, NicKind.COMPUTE, emulate=network.emulate, metrics=metrics
        ),
    )


# ---------------------------------------------------------------------------------------- transport


@dataclasses.dataclass(frozen=True)
class TransferMeta:
    """What one transferred payload is."""

    request_id: str
    """The request whose KV this is."""
    layer: int
    """Layer of a Layer Block, or :data:`ALL_LAYERS` for a Full Block."""
    block_index: int
    """Block position in the request's KV (first token = ``block_index * block_tokens``)."""
    tokens: int
    """Tokens in the payload (``block_tokens``, fewer for a trailing partial block)."""

    def __post_init__(self) -> None:
        if not self.request_id or len(self.request_id.encode()) > 1024:
            raise ValueError("request_id must be 1..1024 bytes of UTF-8")
        if self.layer < ALL_LAYERS or self.block_index < 0 or self.tokens < 0:
            raise ValueError(f"invalid transfer metadata: {self}")

    @property
    def is_full_block(self) -> bool:
        """Whether the payload holds all layers."""
        return self.layer == ALL_LAYERS


@dataclasses.dataclass(frozen=True)
class PeerAddress:
    """Where a peer engine's transport listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class TransportError(RuntimeError):
    """A transfer failed (peer unreachable or gone, timeout, rejected by the receiver)."""


class TransferSink(Protocol):
    """Where a transport delivers received payloads."""

    async def deliver(self, meta: TransferMeta, payload: bytes) -> None:
        """Accept one payload; raising rejects it (the sender's ``send`` then fails with the message)."""
        ...


class TransportMetrics:
    """Which transport carries KV and how fast (the operator's RDMAReady condition reads these)."""

    def __init__(self, kind: str, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.info = prometheus_client.Gauge(
            "dualpath_engine_transport_info",
            "1 for the transport that actually carries KV between engines.",
            ["kind"],
            registry=self.registry,
        )
        self.info.labels(kind).set(1)
        self.bytes = prometheus_client.Counter(
            "dualpath_engine_transport_bytes",
            "KV payload bytes moved by the transport.",
            ["direction"],
            registry=self.registry,
        )
        self.busy = prometheus_client.Counter(
            "dualpath_engine_transport_busy_seconds",
            "Time spent sending (tx: until acknowledged) or receiving; bytes / busy = achieved rate.",
            ["direction"],
            registry=self.registry,
        )
        self.rate = prometheus_client.Gauge(
            "dualpath_engine_transport_rate_bytes_per_second",
            "Achieved rate of the last acknowledged send batch of at least 64 KiB.",
            registry=self.registry,
        )
        for direction in ("tx", "rx"):
            self.bytes.labels(direction)
            self.busy.labels(direction)

    def sent(self, nbytes: int, seconds: float) -> None:
        """Record an acknowledged batch."""
        self.bytes.labels("tx").inc(nbytes)
        self.busy.labels("tx").inc(seconds)
        if nbytes >= 64 * 1024 and seconds > 0:
            self.rate.set(nbytes / seconds)

    def received(self, nbytes: int, seconds: float) -> None:
        """Record a received payload."""
        self.bytes.labels("rx").inc(nbytes)
        self.busy.labels("rx").inc(seconds)


class Transport(abc.ABC):
    """Moves KV payloads between engines; bytes are counted on the compute NIC of each end."""

    kind: ClassVar[str]
    """Name reported in ``dualpath_engine_transport_info{kind}``."""

    def __init__(self, nic: Nic, metrics: TransportMetrics | None = None) -> None:
        self.nic = nic
        self.metrics = metrics if metrics is not None else TransportMetrics(self.kind)

    @abc.abstractmethod
    async def start(self, sink: TransferSink) -> PeerAddress:
        """Start accepting payloads for ``sink``; returns the address peers send to."""

    @abc.abstractmethod
    async def send(self, peer: PeerAddress, items: Sequence[tuple[TransferMeta, ByteArray | bytes]]) -> None:
        """Send payloads in order; returns once the peer's sink accepted all of them.

        Raises :class:`TransportError` if the peer is unreachable, dies, times out or rejects one.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening and drop connections. Idempotent."""


class Inbox:
    """A :class:`TransferSink` that buffers payloads per ``(request, layer)`` until the engine takes them."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, int], list[tuple[TransferMeta, bytes]]] = collections.defaultdict(list)
        self._changed = asyncio.Condition()
        self._closed_requests: set[str] = set()

    async def deliver(self, meta: TransferMeta, payload: bytes) -> None:
        if meta.request_id in self._closed_requests:
            raise KeyError(f"request {meta.request_id} is no longer expecting KV")
        async with self._changed:
            self._items[(meta.request_id, meta.layer)].append((meta, payload))
            self._changed.notify_all()

    def pending(self, request_id: str, layer: int) -> int:
        """Payloads buffered for ``(request_id, layer)``."""
        return len(self._items.get((request_id, layer), ()))

    async def take(self, request_id: str, layer: int, count: int) -> list[tuple[TransferMeta, bytes]]:
        """Wait until ``count`` payloads of ``(request_id, layer)`` arrived; returns them by block index.

        Wrap in ``asyncio.timeout`` to bound the wait.
        """
        key = (request_id, layer)
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items.get(key, ())) >= count)
            items = self._items[key]
            taken, rest = items[:count], items[count:]
            if rest:
                self._items[key] = rest
            else:
                del self._items[key]
        return sorted(taken, key=lambda item: item[0].block_index)

    def close_request(self, request_id: str) -> None:
        """Drop what was buffered for a request and reject anything that still arrives for it."""
        self._closed_requests.add(request_id)
        for key in [key for key in self._items if key[0] == request_id]:
            del self._items[key]

    def open_request(self, request_id: str) -> None:
        """Accept payloads for a request id again (after :meth:`close_request`)."""
        self._closed_requests.discard(request_id)


# ------------------------------------------------------------------------------ staging and copies


class ArenaFullError(RuntimeError):
    """No run of free slots is long enough for an allocation."""


class Arena(Protocol):
    """Host staging memory carved into Full-Block slots (``HostArena`` here, ``cuda.PinnedArena`` on GPUs).

    ``allocate`` raises a ``RuntimeError`` subclass when no run of free slots is long enough.
    """

    @property
    def slot_bytes(self) -> int:
        """Bytes per slot (one Full Block)."""
        ...

    @property
    def num_slots(self) -> int:
        """Slots in the arena."""
        ...

    @property
    def free_slots(self) -> int:
        """Slots not allocated."""
        ...

    def allocate(self, count: int) -> list[int]:
        """A run of ``count`` consecutive free slots."""
        ...

    def release(self, slots: Sequence[int]) -> None:
        """Return slots."""
        ...

    def slot_array(self, slot: int) -> ByteArray:
        """The slot's bytes as a writable flat numpy view."""
        ...


class DeviceCopier(Protocol):
    """Batched Layer Block copies between arena slots and device KV (``cuda.LayerCopier`` on GPUs).

    ``dst``/``src`` hold ``[blocks, block_tokens, bytes]`` of one layer, contiguous. The return value is a
    completion handle (a CUDA event on GPUs; None on CPU, where copies finish before returning).
    """

    def h2d_layer(self, slots: Sequence[int], layer: int, dst: Any) -> object:
        """Layer ``layer`` of the Full Blocks in ``slots`` into ``dst``."""
        ...

    def d2h_layer(self, src: Any, slots: Sequence[int], layer: int) -> object:
        """``src`` into layer ``layer`` of the Full Blocks in ``slots``."""
        ...
