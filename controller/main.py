"""The loom-controller command.

    loom-controller --config-dir DIR [...]          run the controller (see controller/config.py)
    loom-controller --kubernetes [...]
    loom-controller node-token --node N [--state-dir D]   print a node proxy credential (lab mode)

Runs on uvloop. SIGTERM and SIGINT stop it gracefully: listeners close, xDS streams end cleanly, the
process exits 0 within about two seconds. Start-up problems (invalid settings, unusable CA material, a
port in use) are reported in one clear message and exit 1; invalid settings exit 2, like usage errors.

Logs are Istio-style lines on stderr: `<RFC 3339 UTC time>\t<level>\t<scope>\t<message>\tkey=value ...`,
where scope is the component (xds, ca, auth, app, ...). Components attach key/value pairs with
`logger.info("message", extra={"fields": {...}})`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import uvloop

from controller.auth import LabNodeAuthenticator
from controller.config import DEFAULT_STATE_DIR, Config, ConfigError
from loom.runtime import tune_allocator

logger = logging.getLogger("controller.main")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_ISTIO_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}


def _format_value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class IstioFormatter(logging.Formatter):
    """`2026-11-21T04:42:10.938675Z  info  xds  message  key=value` (tab-separated)."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        name = record.name
        scope = name.split(".", 1)[1] if name.startswith("controller.") else name.split(".", 1)[0]
        parts = [when, _ISTIO_LEVEL_NAMES.get(record.levelno, "info"), scope, record.getMessage()]
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and fields:
            parts.append(" ".join(f"{k}={_format_value(v)}" for k, v in fields.items()))
        line = "\t".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str, scopes: Mapping[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(IstioFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.CRITICAL + 1))
    for scope, scope_level in scopes.items():
        name = scope if "." in scope else f"controller.{scope}"
        logging.getLogger(name).setLevel(_LEVELS.get(scope_level, logging.CRITICAL + 1))


async def run(config: Config) -> int:
    """Run the controller until SIGTERM/SIGINT; the exit status."""
    from controller.app import ControllerApp, StartupError

    # Handlers first: a SIGTERM that arrives while starting still ends in a clean stop and exit 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = ControllerApp(config)
    try:
        await app.start()
    except StartupError as e:
        logger.error(f"cannot start: {e}")
        await app.stop()
        return 1
    await stop.wait()
    logger.info("shutting down")
    await app.stop()
    logger.info("stopped")
    return 0


def node_token(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loom-controller node-token", description="print a node proxy credential (lab mode)"
    )
    parser.add_argument("--node", required=True, help="node name the credential is for")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"(default {DEFAULT_STATE_DIR})")
    args = parser.parse_args(list(argv))
    try:
        token = LabNodeAuthenticator.load_or_create(Path(args.state_dir)).issue_node_token(args.node)
    except (OSError, ValueError) as e:
        print(f"loom-controller node-token: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["node-token"]:
        return node_token(args[1:])
    if args[:1] in (["-h"], ["--help"]):
        from controller.config import argument_parser

        argument_parser().print_help()
        return 0
    try:
        config = Config.from_args(args, os.environ if env is None else env)
    except ConfigError as e:
        print(f"loom-controller: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_scopes)
    tune_allocator()
    return uvloop.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
