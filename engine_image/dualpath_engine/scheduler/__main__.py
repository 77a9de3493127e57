"""Entry point of the central scheduler process: ``python -m dualpath_engine.scheduler --config F``.

Reads the scheduler configuration once (file plus ``DUALPATH_HOST``/``DUALPATH_PORT`` from the
environment) and serves the HTTP API of ``dualpath_engine.server.app`` until SIGTERM/SIGINT. Prints
``listening on <url>`` on stdout once bound (port 0 picks a free port). The engine image's
``python -m dualpath_engine scheduler ...`` may dispatch here through ``main(argv)``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from dualpath_engine import config
from dualpath_engine.server import app


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the configuration and serve; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m dualpath_engine.scheduler", description=__doc__)
    parser.add_argument("--config", help="scheduler config file (YAML or JSON); defaults if omitted")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config.load_scheduler_config(args.config, os.environ)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(f"listening on {url}", flush=True)

    asyncio.run(app.serve(cfg, ready=ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
