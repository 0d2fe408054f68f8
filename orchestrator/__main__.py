"""``python -m tightwad.orchestrator``: the orchestrator service and the cluster commands.

    python -m tightwad.orchestrator [-c CONFIG] serve [--host H] [--port 8095]
                                    [--front HOST:PORT] [--watch-interval S]
    python -m tightwad.orchestrator [-c CONFIG] status | start | stop | swap | plan | benchmark

``serve`` runs until SIGINT/SIGTERM: the HTTP API, /health and /metrics on
--port, and with --front a stable address in front of the coordinator that
clients (and the speculation proxy's target URL) use, so that swaps give them
503 + Retry-After instead of refused connections. The other commands are the
same as ``tightwad status`` and so on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tightwad.errors import TightwadError
from tightwad.orchestrator import cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tightwad.orchestrator",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="configuration file (default: $TIGHTWAD_CONFIG "
                        "or configs/cluster.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the orchestrator service")
    s.add_argument("--host", default=os.environ.get("TIGHTWAD_ORCHESTRATOR_HOST", "127.0.0.1"),
                   help="address of the API (default 127.0.0.1; $TIGHTWAD_ORCHESTRATOR_HOST)")
    s.add_argument("--port", type=int, default=int(os.environ.get("TIGHTWAD_ORCHESTRATOR_PORT", 8095)),
                   help="port of the API, /health and /metrics (default 8095)")
    s.add_argument("--front", default=os.environ.get("TIGHTWAD_FRONT") or None, metavar="HOST:PORT",
                   help="also serve the coordinator front here (default: off; $TIGHTWAD_FRONT)")
    s.add_argument("--watch-interval", type=float, default=10.0, metavar="S",
                   help="seconds between status checks (metrics, front routing); default 10")
    s.add_argument("--health-timeout", type=float, default=600.0, metavar="S",
                   help="how long a coordinator may take to answer /health (default 600)")
    cli.add_parsers(sub)
    b = sub.add_parser("benchmark", help="the coordinator's prompt and generation tok/s")
    b.add_argument("--max-tokens", type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            from tightwad.config import load_config
            from tightwad.orchestrator.service import serve

            config = load_config(args.config)
            config.require_cluster("the orchestrator service")
            return serve(config, host=args.host, port=args.port, front=args.front,
                         watch_interval_s=args.watch_interval,
                         health_timeout_s=args.health_timeout)
        if args.command == "benchmark":
            return cli.run_benchmark(args)
        return cli.run(args)
    except TightwadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
