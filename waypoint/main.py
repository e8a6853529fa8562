"""`loom-waypoint`: the waypoint process. Configuration from environment variables only (see
waypoint/config.py and waypoint/xds.py for every name); exits 2 listing every invalid variable, 1 when
it cannot start; SIGTERM drains connections for CONNECTION_TERMINATION_DEADLINE, a second one closes
them at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvloop

from loom.runtime import settle_heap, tune_allocator
from waypoint.app import WaypointApp
from waypoint.config import Config, ConfigError
from waypoint.xds import SettingsError
from ztunnel.telemetry import LogLevelError, configure_logging

logger = logging.getLogger("loom.waypoint")

EXIT_OK = 0
EXIT_STARTUP = 1
EXIT_CONFIG = 2


async def run(app: WaypointApp) -> int:
    try:
        await app.start()
    except OSError as exc:
        logger.error("the waypoint could not start: %s", exc)
        await app.stop()
        return EXIT_STARTUP
    settle_heap()
    terminate = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminate.set)
    await terminate.wait()
    logger.info("termination requested; draining connections")
    await app.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv):
        print("loom-waypoint takes no arguments; configure it with environment variables", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = Config.from_env(os.environ)
        configure_logging(config.log_format, config.log_level)
        app = WaypointApp(config, os.environ)
    except (ConfigError, SettingsError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except (LogLevelError, ValueError) as exc:
        print(f"LOG_LEVEL={os.environ.get('LOG_LEVEL', '')} is not valid: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    tune_allocator()
    return uvloop.run(run(app))


if __name__ == "__main__":
    sys.exit(main())
