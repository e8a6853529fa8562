"""`loom-ztunnel`: the node proxy's entry point.

Reads the configuration from the environment (`ztunnel.config`; every invalid variable is reported at
once and the process exits 2), configures logging, and runs `ZtunnelApp` on uvloop until SIGTERM or
SIGINT. The first signal starts the graceful shutdown: listeners close at once, open connections drain
until the connection termination deadline, then the process exits 0. A second signal closes every
connection immediately (the shutdown then completes at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvloop

from loom.runtime import settle_heap, tune_allocator
from ztunnel.app import ZtunnelApp
from ztunnel.config import Config, ConfigError
from ztunnel.telemetry import LogControl, LogLevelError, configure_logging

logger = logging.getLogger("ztunnel")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STARTUP = 1


async def run(config: Config, log_control: LogControl | None = None) -> int:
    """Run one node proxy until a termination signal; the process exit code."""
    app = ZtunnelApp(config, log_control=log_control)
    try:
        await app.start()
    except OSError as e:
        logger.error("ztunnel could not start", extra={"fields": {"error": str(e)}})
        await app.stop()
        return EXIT_STARTUP
    settle_heap()
    loop = asyncio.get_running_loop()
    terminate = asyncio.Event()
    signals_seen = 0
    abort_task: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info(
                "termination requested; draining connections",
                extra={
                    "fields": {
                        "signal": signal.Signals(signum).name,
                        "deadline_s": config.connection_termination_deadline.total_seconds(),
                    }
                },
            )
            terminate.set()
        elif not abort_task:
            logger.info("second termination signal; closing every connection now")
            abort_task.append(loop.create_task(app.abort(), name="abort"))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await terminate.wait()
        await app.shutdown()
        if abort_task:
            await abort_task[0]
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("ztunnel stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`loom-ztunnel`); takes no arguments, only environment variables."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(
            "loom-ztunnel takes no arguments; configure it with environment variables "
            "(NODE_NAME, XDS_ADDRESS, CA_ADDRESS, ROOT_CERT, NODE_TOKEN_FILE, INPOD_UDS, ...)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        config = Config.from_env(os.environ)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    try:
        log_control = configure_logging(config.log_format, config.log_level)
    except (LogLevelError, ValueError) as e:
        print(f"LOG_LEVEL={config.log_level} is not valid: {e}", file=sys.stderr)
        return EXIT_CONFIG
    tune_allocator()
    return uvloop.run(run(config, log_control))


if __name__ == "__main__":
    sys.exit(main())
