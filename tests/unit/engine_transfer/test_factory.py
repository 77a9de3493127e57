"""Transport selection from configuration: tcp by default, a pluggable RDMA backend by import path."""

from __future__ import annotations

import asyncio

import numpy as np
import prometheus_client
import pytest

from dualpath_engine import config
from dualpath_engine.transfer import base, factory, tcp

pytestmark = pytest.mark.timeout(20)


def engine(transport: config.TransportConfig) -> config.EngineConfig:
    return config.EngineConfig(role="prefill", host="127.0.0.1", transport=transport)


def make(transport: config.TransportConfig) -> tuple[base.Transport, prometheus_client.CollectorRegistry]:
    registry = prometheus_client.CollectorRegistry()
    nic = base.Nic("mlx5_0", base.NicKind.COMPUTE, 50e9, metrics=base.NicMetrics(registry))
    metrics = base.TransportMetrics(transport.kind, registry)
    return factory.build_transport(engine(transport), nic, metrics), registry


async def test_default_is_tcp_on_the_configured_port() -> None:
    transport, registry = make(config.TransportConfig(port=0, checksum=True))
    assert isinstance(transport, tcp.TcpTransport)
    address = await transport.start(base.Inbox())
    try:
        assert address.host == "127.0.0.1" and address.port > 0
        assert registry.get_sample_value("dualpath_engine_transport_info", {"kind": "tcp"}) == 1
    finally:
        await transport.close()


async def test_rdma_plugin_is_loaded_by_import_path_and_carries_kv() -> None:
    settings = config.TransportConfig(
        kind="rdma", port=0, rdma_backend="tests.unit.engine_transfer.fake_rdma:LoopbackRdmaTransport"
    )
    sender, registry = make(settings)
    receiver, _ = make(settings)
    assert sender.kind == "rdma"
    assert registry.get_sample_value("dualpath_engine_transport_info", {"kind": "rdma"}) == 1
    inbox = base.Inbox()
    await sender.start(base.Inbox())
    address = await receiver.start(inbox)
    try:
        await sender.send(address, [(base.TransferMeta("r", 0, 0, 1), np.arange(64, dtype=np.uint8))])
        ((_, payload),) = await asyncio.wait_for(inbox.take("r", 0, 1), 5)
        assert payload == bytes(range(64))
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("tests.unit.engine_transfer.no_such_module:X", "cannot import"),
        ("tests.unit.engine_transfer.fake_rdma:Missing", "has no callable Missing"),
        ("tests.unit.engine_transfer.fake_rdma:not_a_transport", "not a dualpath Transport"),
    ],
)
def test_broken_rdma_backends_fail_with_a_clear_message(backend: str, message: str) -> None:
    with pytest.raises(factory.TransportConfigError, match=message):
        make(config.TransportConfig(kind="rdma", rdma_backend=backend))


def test_cuda_needs_a_device_factory() -> None:
    cfg = config.EngineConfig(role="prefill", device="cuda", transport=config.TransportConfig(kind="cuda"))
    nic = base.Nic("mlx5_0", base.NicKind.COMPUTE, 50e9)
    with pytest.raises(factory.TransportConfigError, match="CUDA transport factory"):
        factory.build_transport(cfg, nic, base.TransportMetrics("cuda"))
