"""Builds the KV transport an engine's configuration names (torch-free).

- ``tcp``: :class:`~dualpath_engine.transfer.tcp.TcpTransport` bound to the engine's host and
  ``transport.port``.
- ``rdma``: a pluggable backend (e.g. a Mooncake or NIXL wrapper) named by ``transport.rdma_backend``
  as ``package.module:Name``. ``Name`` is a :class:`~dualpath_engine.transfer.base.Transport` subclass or
  any callable; it is called as ``Name(engine_config, nic, metrics)`` and must return a ``Transport``.
- ``cuda``: device transports import torch, so this torch-free module does not build them; the
  engine's ``__main__`` passes ``transfer.cuda``'s constructor as ``cuda_factory``.

Called by the engine's ``__main__`` / service at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dualpath_engine import config
from dualpath_engine.transfer import base, tcp

TransportFactory = Callable[[config.EngineConfig, base.Nic, base.TransportMetrics], base.Transport]
"""What ``rdma_backend`` and ``cuda_factory`` must be: ``(engine config, NIC, metrics) -> Transport``."""


class TransportConfigError(ValueError):
    """The configured transport cannot be built; the message says what to fix."""


def load_backend(import_path: str) -> TransportFactory:
    """Resolve ``package.module:Name`` to a transport factory."""
    module_name, _, attribute = import_path.partition(":")
    if not module_name or not attribute:
        raise TransportConfigError(f"rdma_backend {import_path!r} is not of the form 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransportConfigError(
            f"rdma_backend {import_path!r}: cannot import {module_name}: {exc}"
        ) from exc
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise TransportConfigError(f"rdma_backend {import_path!r}: {module_name} has no callable {attribute}")
    built: TransportFactory = factory
    return built


def build_transport(
    engine: config.EngineConfig,
    nic: base.Nic,
    metrics: base.TransportMetrics,
    *,
    cuda_factory: TransportFactory | None = None,
) -> base.Transport:
    """The transport ``engine.transport.kind`` names, counting on ``nic`` and reporting to ``metrics``."""
    settings = engine.transport
    if settings.kind == "tcp":
        return tcp.TcpTransport(
            nic,
            host=engine.host,
            port=settings.port,
            checksum=settings.checksum,
            connect_timeout_s=settings.connect_timeout_s,
            metrics=metrics,
        )
    if settings.kind == "rdma":
        if settings.rdma_backend is None:
            raise TransportConfigError("transport kind 'rdma' needs transport.rdma_backend")
        factory = load_backend(settings.rdma_backend)
    elif cuda_factory is not None:
        factory = cuda_factory
    else:
        raise TransportConfigError("transport kind 'cuda' needs a CUDA transport factory from transfer.cuda")
    transport = factory(engine, nic, metrics)
    if not isinstance(transport, base.Transport):
        raise TransportConfigError(
            f"{settings.kind} backend returned {type(transport).__name__}, not a dualpath Transport"
        )
    return transport
