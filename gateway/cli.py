"""The ``batchwire`` command: ``serve``, ``gateway`` and ``worker``.

The worker subcommand is imported only when asked for, so neither ``serve`` nor
``gateway`` ever loads torch into the gateway process.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        from worker.cli import main as worker_main

        return worker_main(argv[1:])

    from gateway.config import parse
    from protocol.logs import setup_logging

    command, config = parse(argv)
    if command == "keygen":
        from protocol import curve

        public, secret = curve.generate(config.directory, config.name)
        print(f"public key: {public}\nsecret key: {secret} (keep it private)")
        return 0
    gateway_config = config.gateway if command == "serve" else config
    setup_logging(gateway_config.log_level, "gateway", gateway_config.log_format)
    from gateway.server import run_gateway
    from protocol import eventloop

    try:
        eventloop.uvloop_module(gateway_config.event_loop)
    except eventloop.EventLoopUnavailable as exc:
        print(f"batchwire: {exc}", file=sys.stderr)
        return 2
    return eventloop.run(run_gateway(gateway_config, config if command == "serve" else None),
                         gateway_config.event_loop)


if __name__ == "__main__":
    sys.exit(main())
