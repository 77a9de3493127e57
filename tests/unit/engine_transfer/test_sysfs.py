"""Fake sysfs counters: the tree node_exporter needs, 4-byte words, atomic files, several writers.

The last test runs Debian's real prometheus-node-exporter on our tree and checks it reports exactly
the bytes we moved.
"""

from __future__ import annotations

import asyncio
import glob
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dualpath_engine.transfer import base, sysfs

pytestmark = pytest.mark.timeout(30)

EXPORTER_CANDIDATES = (
    "/work/main/.dev/bin/prometheus-node-exporter",
    *sorted(
        glob.glob("/root/.cache/dualpath/debian/prometheus-node-exporter/*/usr/bin/prometheus-node-exporter")
    ),
)


def nic(device: str, kind: base.NicKind = base.NicKind.STORAGE, rate: float = 25e9) -> base.Nic:
    return base.Nic(device, kind, rate)


def read(path: Path) -> str:
    return path.read_text().strip()


async def test_tree_has_every_required_file_and_data_counters_in_words(tmp_path: Path) -> None:
    storage_nic, compute_nic = nic("mlx5_s0"), nic("mlx5_0", base.NicKind.COMPUTE, 50e9)
    await storage_nic.receive(4_000_004)
    await storage_nic.transmit(12)
    writer = sysfs.SysfsWriter(tmp_path, [storage_nic, compute_nic], sysfs.writer_id("pe-0"))
    writer.flush()
    device = tmp_path / "class" / "infiniband" / "mlx5_s0"
    port = device / "ports" / "1"
    assert read(device / "board_id") == sysfs.BOARD_ID
    assert read(device / "fw_ver") == sysfs.FW_VER
    assert read(port / "state") == "4: ACTIVE"
    assert read(port / "phys_state") == "5: LinkUp"
    assert read(port / "rate") == "200 Gb/sec (4X)"
    assert read(tmp_path / "class/infiniband/mlx5_0/ports/1/rate") == "400 Gb/sec (4X)"
    assert read(port / "counters" / "port_rcv_data") == str(4_000_004 // 4)
    assert read(port / "counters" / "port_xmit_data") == "3"
    assert read(port / "counters" / "port_rcv_packets") == str(storage_nic.counters.rx_packets)
    for name in sysfs.ZERO_COUNTERS:
        assert read(port / "counters" / name) == "0"
    # Only finished files in the tree: temp files live outside class/infiniband.
    leftovers = [p for p in (tmp_path / "class").rglob("*") if p.is_file() and not p.read_text().strip()]
    assert leftovers == []
    assert not list((tmp_path / ".dualpath" / "tmp").iterdir())


async def test_processes_sharing_a_storage_nic_add_up_and_never_go_backwards(tmp_path: Path) -> None:
    pe_nic, de_nic = nic("mlx5_s0"), nic("mlx5_s0")
    pe = sysfs.SysfsWriter(tmp_path, [pe_nic], "pe-1-1")
    de = sysfs.SysfsWriter(tmp_path, [de_nic], "de-1-1")
    counter = tmp_path / "class/infiniband/mlx5_s0/ports/1/counters/port_rcv_data"
    seen = []
    for step in range(5):
        await pe_nic.receive(400)
        pe.flush()
        seen.append(int(read(counter)))
        await de_nic.receive(4000 * (step + 1))
        de.flush()
        seen.append(int(read(counter)))
    assert seen == sorted(seen)
    assert seen[-1] == (pe_nic.counters.rx_bytes + de_nic.counters.rx_bytes) // 4
    # A restarted engine gets a new shard: the old one's bytes stay counted.
    restarted = sysfs.SysfsWriter(tmp_path, [nic("mlx5_s0")], sysfs.writer_id("pe"))
    restarted.flush()
    assert int(read(counter)) == seen[-1]


async def test_periodic_task_flushes_and_flushes_again_when_stopped(tmp_path: Path) -> None:
    link = nic("mlx5_s0")
    writer = sysfs.SysfsWriter(tmp_path, [link], "w")
    counter = tmp_path / "class/infiniband/mlx5_s0/ports/1/counters/port_xmit_data"
    task = asyncio.create_task(writer.run(0.01))

    async def wait_for_value(expected: str) -> None:
        while not (counter.exists() and read(counter) == expected):  # noqa: ASYNC110 - file written by a task
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait_for_value("0"), 5)
    await link.transmit(4000)
    await asyncio.wait_for(wait_for_value("1000"), 5)
    await link.transmit(400)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert read(counter) == "1100"


def test_rate_text() -> None:
    assert sysfs.rate_text(25e9) == "200 Gb/sec (4X)"
    assert sysfs.rate_text(12.5e9) == "100 Gb/sec (4X)"
    assert sysfs.rate_text(1.25e9 / 4) == "2.5 Gb/sec (4X)"


# ------------------------------------------------------------------------------------ node_exporter


def exporter_binary() -> str:
    for candidate in EXPORTER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "prometheus-node-exporter not found (looked in: "
        + ", ".join(EXPORTER_CANDIDATES or ("/root/.cache/dualpath/debian/prometheus-node-exporter/*",))
        + "); run the project's tool setup (Debian package extracted into ~/.cache/dualpath/debian)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    binary = exporter_binary()
    root = tmp_path / "sys"
    root.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--path.sysfs={root}",
            f"--path.procfs={tmp_path / 'proc'}",
            "--collector.disable-defaults",
            "--collector.infiniband",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield root, f"http://127.0.0.1:{port}/metrics"
    finally:
        process.terminate()  # by PID: this Popen's own process
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def scrape(url: str, deadline_s: float = 10.0) -> dict[str, float]:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)  # the exporter is still binding its port
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_real_node_exporter_reports_the_bytes_we_moved(exporter: tuple[Path, str]) -> None:
    root, url = exporter
    storage_nic = nic("mlx5_s0")
    compute_nic = nic("mlx5_0", base.NicKind.COMPUTE, 50e9)
    slow_nic = nic("mlx5_1", base.NicKind.COMPUTE, 1.25e9 / 4)  # "2.5 Gb/sec"
    writer = sysfs.SysfsWriter(root, [storage_nic, compute_nic, slow_nic], sysfs.writer_id("de-0"))
    received, sent = 3 * 8 * 1024 * 1024, 256 * 1024 * 5
    await storage_nic.receive(received)
    await compute_nic.transmit(sent)
    await asyncio.to_thread(writer.flush)
    samples = await asyncio.to_thread(scrape, url)
    assert samples['node_scrape_collector_success{collector="infiniband"}'] == 1
    rx = 'node_infiniband_port_data_received_bytes_total{device="mlx5_s0",port="1"}'
    tx = 'node_infiniband_port_data_transmitted_bytes_total{device="mlx5_0",port="1"}'
    assert samples[rx] == received
    assert samples[tx] == sent
    assert samples['node_infiniband_rate_bytes_per_second{device="mlx5_s0",port="1"}'] == 25e9
    assert samples['node_infiniband_rate_bytes_per_second{device="mlx5_1",port="1"}'] == 1.25e9 / 4
    # More traffic shows up on the next scrape (the exporter re-reads the files).
    await storage_nic.receive(4096)
    await asyncio.to_thread(writer.flush)
    samples = await asyncio.to_thread(scrape, url)
    assert samples[rx] == received + 4096
    assert samples['node_scrape_collector_success{collector="infiniband"}'] == 1


def test_a_lowered_emulated_budget_shows_as_a_slower_link(tmp_path: Path) -> None:
    nic = base.Nic("mlx5_storage0", base.NicKind.STORAGE, 50e9, emulate=True, metrics=base.NicMetrics())
    writer = sysfs.SysfsWriter(tmp_path, [nic], writer="t")
    rate_file = tmp_path / "class" / "infiniband" / "mlx5_storage0" / "ports" / "1" / "rate"
    writer.flush()
    assert rate_file.read_text().startswith("400 Gb/sec")
    nic.set_budget(25e9)  # degraded to 50 %
    writer.flush()
    assert rate_file.read_text().startswith("200 Gb/sec")
    nic.set_budget(None)
    writer.flush()
    assert rate_file.read_text().startswith("400 Gb/sec")
