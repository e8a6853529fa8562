"""`loom-cni`: the executable a container runtime runs (installed into the CNI bin directory).

Reads the network configuration from stdin and the CNI_* variables from the environment, runs
`cni.plugin.run` against the node agent's socket, writes the result or error JSON to stdout and exits 0 on
success, 1 on error. stdout carries nothing but that JSON: logs go to the configured ``logFile`` or, when
there is none, to stderr (which the spec leaves free for unstructured output). A bug in the plugin still
produces a well-formed CNI error, never a traceback on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import BinaryIO

from cni import plugin

# A network configuration is a few KiB; a GC call with every attachment of a node stays far below this.
MAX_STDIN_BYTES = 4 << 20

_LOG_FORMAT = "%(asctime)s %(levelname)s loom-cni[%(process)d] %(name)s: %(message)s"


def _configure_logging(stdin: bytes) -> None:
    """Send logs where the configuration asks; unusable settings fall back to stderr (never stdout)."""
    log_file: str | None = None
    level = "info"
    try:
        raw = json.loads(stdin.decode("utf-8"))
        if isinstance(raw, dict):
            candidate = raw.get("logFile")
            log_file = candidate if isinstance(candidate, str) and candidate.startswith("/") else None
            candidate_level = raw.get("logLevel")
            if isinstance(candidate_level, str) and candidate_level.lower() in plugin.LOG_LEVELS:
                level = candidate_level.lower()
    except ValueError:
        pass  # undecodable stdin is reported as CNI error 6 by plugin.run; log to stderr meanwhile
    handler: logging.Handler | None = None
    problem: str | None = None
    if log_file is not None:
        try:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            problem = f"cannot open logFile {log_file} ({exc}); logging to stderr"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if log_file is None and level in ("debug", "info"):
            # Without a log file, stderr reaches the kubelet's logs only on failure: keep it to warnings.
            level = "warning"
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    if problem is not None:
        logging.getLogger(__name__).warning("%s", problem)


def _read_stdin(stream: BinaryIO) -> bytes:
    data = stream.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise plugin.CniError(
            plugin.ErrorCode.IO_FAILURE,
            f"network configuration on stdin is larger than {MAX_STDIN_BYTES} bytes",
        )
    return data


def execute(env: Mapping[str, str], stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Run one plugin call with explicit streams; returns the exit status."""
    try:
        data = _read_stdin(stdin)
    except plugin.CniError as exc:
        output = plugin.error_output(exc, plugin.LATEST_VERSION)
    except OSError as exc:
        output = plugin.error_output(
            plugin.CniError(
                plugin.ErrorCode.IO_FAILURE, "cannot read the network configuration from stdin", str(exc)
            ),
            plugin.LATEST_VERSION,
        )
    else:
        _configure_logging(data)
        try:
            output = plugin.run(env, data)
        except Exception as exc:
            # plugin.run is total by design; this is the last line that keeps stdout well-formed.
            logging.getLogger(__name__).exception("loom-cni failed unexpectedly")
            output = plugin.error_output(
                plugin.CniError(
                    plugin.ErrorCode.INTERNAL, "loom-cni internal error", f"{type(exc).__name__}: {exc}"
                ),
                plugin.sniff_version(data),
            )
    stdout.write(output.stdout)
    stdout.flush()
    return output.exit_code


def main() -> int:
    return execute(os.environ, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
