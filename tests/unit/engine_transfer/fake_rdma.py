"""A stand-in RDMA plugin for the transport factory tests: TCP underneath, reported as kind "rdma"."""

from __future__ import annotations

from dualpath_engine import config
from dualpath_engine.transfer import base, tcp


class LoopbackRdmaTransport(tcp.TcpTransport):
    """Moves bytes over loopback TCP while declaring itself the RDMA backend."""

    kind = "rdma"

    def __init__(self, engine: config.EngineConfig, nic: base.Nic, metrics: base.TransportMetrics) -> None:
        super().__init__(nic, host=engine.host, port=engine.transport.port, metrics=metrics)


def not_a_transport(engine: config.EngineConfig, nic: base.Nic, metrics: base.TransportMetrics) -> object:
    """A broken plugin: returns something that is not a Transport."""
    return object()
