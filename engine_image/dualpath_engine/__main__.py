"""Engine image entry point: ``python -m dualpath_engine engine --config F`` or ``... scheduler ...``.

``engine`` reads the engine configuration once (file plus ``DUALPATH_*`` overrides from the environment,
see ``dualpath_engine.config``), builds the torch model runner on the configured device (the one place
torch meets the engine loops, which receive it by injection), and serves one engine group process
(``dualpath_engine.engine.service``) until SIGTERM/SIGINT. Once bound it prints one line
``ready {"engine": ..., "http": ..., "transport": {...}}`` on stdout (port 0 picks free ports).
``scheduler`` hands the remaining arguments to ``dualpath_engine.scheduler.__main__``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("dualpath_engine")


def _engine(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualpath_engine engine", description=__doc__)
    parser.add_argument("--config", help="engine config file (YAML or JSON); defaults if omitted")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from dualpath_engine import config

    try:
        engine_config = config.load_engine_config(args.config, os.environ)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from dualpath_engine.engine import service
    from dualpath_engine.model import loader
    from dualpath_engine.model import runner as torch_runner

    if engine_config.device == "cuda" and not torch.cuda.is_available():
        print("error: device 'cuda' configured but torch sees no GPU; set device: cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    device = (
        torch.device("cuda", engine_config.local_rank)
        if engine_config.device == "cuda"
        else torch.device("cpu")
    )
    runner = torch_runner.TorchRunner(
        loader.build(engine_config.model, device),
        device,
        decode_attention=engine_config.runner.decode_attention,
        page_tokens=engine_config.runner.page_tokens,
        cuda_graphs=engine_config.runner.cuda_graphs,
        pool_tokens=max(1, engine_config.kv.host_buffer_bytes // engine_config.model.kv_bytes_per_token),
    )

    if engine_config.role == "decode" and device.type == "cuda" and engine_config.runner.warmup_batch:
        started = time.perf_counter()
        buckets = runner.warm_up(engine_config.runner.warmup_batch, engine_config.model.max_context_tokens)
        if buckets:
            log.info(
                "decode warm-up: %d step buckets ready in %.1f s", buckets, time.perf_counter() - started
            )

    def ready(info: dict[str, object]) -> None:
        print(service.ready_line({**info, "decode_kv": runner.decode_store}), flush=True)

    factory: service.TransportFactory | None = None
    if engine_config.transport.kind == "cuda":
        from dualpath_engine.transfer import base, cuda

        def factory(nic: base.Nic, metrics: base.TransportMetrics) -> base.Transport:
            return cuda.CudaIpcTransport(
                nic,
                host=engine_config.host,
                port=engine_config.transport.port,
                device=device,
                connect_timeout_s=engine_config.transport.connect_timeout_s,
                metrics=metrics,
            )

    try:
        asyncio.run(service.serve(engine_config, runner, ready=ready, make_transport=factory))
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch on the first argument (``engine`` or ``scheduler``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("engine", "scheduler"):
        print("usage: python -m dualpath_engine {engine,scheduler} [--config F] [...]", file=sys.stderr)
        return 2
    if args[0] == "scheduler":
        from dualpath_engine.scheduler import __main__ as scheduler_main

        status = scheduler_main.main(args[1:])
        return int(status or 0)
    return _engine(args[1:])


if __name__ == "__main__":
    sys.exit(main())
