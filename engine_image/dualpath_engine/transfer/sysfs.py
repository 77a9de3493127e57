"""Fake ``/sys/class/infiniband`` tree for emulated NICs, read by node_exporter's infiniband collector.

For each NIC, ``<root>/class/infiniband/<device>/`` gets every file the collector requires (``board_id``,
``fw_ver``, ``hca_type``, ``ports/1/{state,phys_state,rate,link_layer}`` and ``ports/1/counters/*``).
``port_xmit_data`` / ``port_rcv_data`` are in 4-byte WORDS (the exporter multiplies by 4); every other
counter is a plain count. An empty or unparsable file makes the whole collector fail, so every file is
written to a temp file under ``<root>/.dualpath/tmp`` (same filesystem) and moved into place with
``os.replace``.

Several engine processes on one node share its storage NIC, so each process writes its own counters as
a shard (``<root>/.dualpath/nic-shards/<device>/<writer>.json``) and, under an ``flock`` on that
directory, rewrites the device's counter files with the sum of all shards. Shards only grow and
aggregations are serialised, so the exported counters never go backwards; a writer id must be unique
per process lifetime (:func:`writer_id` adds the pid and start time).

Used by the engine's ``__main__`` when ``network.sysfs_root`` is set (:meth:`SysfsWriter.run` as a
background task) and by the e2e telemetry fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from dualpath_engine.transfer import base

BOARD_ID = "MT_0000000223"
FW_VER = "28.39.1002"
HCA_TYPE = "MT4123"
PORT = 1

ZERO_COUNTERS = (
    "port_rcv_errors",
    "port_xmit_discards",
    "port_rcv_discards",
    "port_xmit_wait",
    "symbol_error",
    "link_downed",
    "link_error_recovery",
    "local_link_integrity_errors",
    "excessive_buffer_overrun_errors",
    "port_rcv_remote_physical_errors",
    "port_rcv_switch_relay_errors",
    "port_rcv_constraint_errors",
    "port_xmit_constraint_errors",
    "multicast_xmit_packets",
    "multicast_rcv_packets",
    "VL15_dropped",
)
"""Counters we never increment but write (as 0) so dashboards see the series."""


def writer_id(name: str) -> str:
    """A shard name unique to this process lifetime: ``<name>-<pid>-<start ns>``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "engine"
    return f"{safe}-{os.getpid()}-{time.time_ns()}"


def link_rate(nic: base.Nic) -> float:
    """The rate the port file reports: the emulated budget when it is below the line rate (a degraded
    link, e.g. renegotiated at a lower speed), else the line rate."""
    budget = nic.budget_bytes_per_s
    if budget is not None and budget < nic.line_rate_bytes_per_s:
        return budget
    return nic.line_rate_bytes_per_s


def rate_text(line_rate_bytes_per_s: float) -> str:
    """The ``ports/1/rate`` text for a line rate, e.g. ``200 Gb/sec (4X HDR)`` for 25e9 bytes/s."""
    gbps = line_rate_bytes_per_s * 8 / 1e9
    number = f"{gbps:.0f}" if abs(gbps - round(gbps)) < 1e-9 else f"{gbps:.1f}"
    return f"{number} Gb/sec (4X)"


@dataclasses.dataclass(frozen=True)
class _Shard:
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


class SysfsWriter:
    """Writes NIC counters of this process into a fake sysfs tree (aggregated with other processes)."""

    def __init__(self, root: str | os.PathLike[str], nics: Sequence[base.Nic], writer: str) -> None:
        if not nics:
            raise ValueError("no NICs to write")
        self.root = Path(root)
        self._nics = tuple(nics)
        self._writer = writer
        self._state = self.root / ".dualpath"
        self._tmp = self._state / "tmp"
        self._initialised: set[str] = set()
        self._rates: dict[str, float] = {}

    def device_dir(self, device: str) -> Path:
        """``<root>/class/infiniband/<device>``."""
        return self.root / "class" / "infiniband" / device

    def flush(self) -> None:
        """Write this process's shards and re-aggregate every device's counters (blocking file I/O)."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        for nic in self._nics:
            if nic.device not in self._initialised:
                self._write_static(nic)
                self._initialised.add(nic.device)
            rate = link_rate(nic)
            if self._rates.get(nic.device) != rate:
                # An emulated NIC whose budget was lowered looks like a link running at a lower speed.
                port = self.device_dir(nic.device) / "ports" / str(PORT)
                self._replace(port / "rate", rate_text(rate))
                self._rates[nic.device] = rate
            shards = self._state / "nic-shards" / nic.device
            shards.mkdir(parents=True, exist_ok=True)
            counters = nic.counters
            shard = _Shard(counters.tx_bytes, counters.rx_bytes, counters.tx_packets, counters.rx_packets)
            self._replace(shards / f"{self._writer}.json", json.dumps(dataclasses.asdict(shard)))
            with _locked(shards):
                total = self._sum(shards)
                if total is not None:
                    self._write_counters(nic.device, total)

    async def run(self, interval_s: float) -> None:
        """Flush every ``interval_s`` until cancelled, then flush once more."""
        try:
            while True:
                await asyncio.to_thread(self.flush)
                await asyncio.sleep(interval_s)
        finally:
            with contextlib.suppress(OSError):
                self.flush()

    def _write_static(self, nic: base.Nic) -> None:
        device = self.device_dir(nic.device)
        port = device / "ports" / str(PORT)
        (port / "counters").mkdir(parents=True, exist_ok=True)
        self._replace(device / "board_id", BOARD_ID)
        self._replace(device / "fw_ver", FW_VER)
        self._replace(device / "hca_type", HCA_TYPE)
        self._replace(port / "state", "4: ACTIVE")
        self._replace(port / "phys_state", "5: LinkUp")
        self._replace(port / "rate", rate_text(link_rate(nic)))
        self._replace(port / "link_layer", "InfiniBand")
        for name in ZERO_COUNTERS:
            self._replace(port / "counters" / name, "0")

    def _write_counters(self, device: str, total: _Shard) -> None:
        counters = self.device_dir(device) / "ports" / str(PORT) / "counters"
        values = {
            "port_xmit_data": total.tx_bytes // 4,
            "port_rcv_data": total.rx_bytes // 4,
            "port_xmit_packets": total.tx_packets,
            "port_rcv_packets": total.rx_packets,
            "unicast_xmit_packets": total.tx_packets,
            "unicast_rcv_packets": total.rx_packets,
        }
        for name, value in values.items():
            self._replace(counters / name, str(value))

    @staticmethod
    def _sum(shards: Path) -> _Shard | None:
        tx_bytes = rx_bytes = tx_packets = rx_packets = 0
        for path in shards.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                tx_bytes += int(data["tx_bytes"])
                rx_bytes += int(data["rx_bytes"])
                tx_packets += int(data["tx_packets"])
                rx_packets += int(data["rx_packets"])
            except (OSError, ValueError, KeyError, TypeError):
                return None  # never publish a partial sum: counters must not go backwards
        return _Shard(tx_bytes, rx_bytes, tx_packets, rx_packets)

    def _replace(self, path: Path, text: str) -> None:
        temp = self._tmp / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}"
        temp.write_text(text + "\n")
        os.replace(temp, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
