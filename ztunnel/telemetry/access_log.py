"""ztunnel-style log lines (text or JSON), per-scope levels changeable at runtime, and the access log.

Theory of operation
-------------------
Every component logs through stdlib `logging`, attaching key/value pairs as
`logger.info("message", extra={"fields": {...}})`. `configure_logging` installs one handler on the root
logger with a formatter that renders Istio ztunnel's line shapes:

* text: ``<RFC 3339 UTC, microseconds>\\t<level>\\t<scope>\\t<message>\\t<key=value ...>``, e.g.
  ``2024-05-04T09:59:05.028709Z	info	access	connection complete	src.addr=10.244.1.12:60059
  src.workload="curl-5b549b49b8-jd8rs" ... bytes_sent=80 bytes_recv=175 duration="1ms"`` (one line).
  Values are quoted like Rust's Debug output (JSON string escaping), except integers, booleans and
  values wrapped in `Bare` (socket addresses), which ztunnel prints with Display, unquoted.
* JSON (``LOG_FORMAT=json``): one object per line, ``{"level", "time", "scope", "message", <fields>}``,
  the fields under the same names as in the text form, integers as numbers.

Scopes are short names users type (``access``, ``xds``, ``inpod``, ``ca``, ``proxy``, ...); `SCOPES` maps
each to the logger it controls, and the formatter maps a record's logger back to its scope (longest
prefix wins, so ``ztunnel.inpod.client`` is ``inpod``). A `LogControl` holds the configured levels and
applies changes such as ``access:debug,xds:warn`` (the admin ``POST /logging?level=...``), and resets.

The access log is the logger named ``access``: one line per proxied connection, written by
`ztunnel.telemetry.metrics.ConnectionResult` ("connection complete" / "connection failed") and, for
connections refused before any result exists, by `log_early_deny` (source and destination addresses,
direction and the error only).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import Literal, TextIO

ACCESS_LOGGER = "access"
access_logger = logging.getLogger(ACCESS_LOGGER)

# Scope name -> the logger it controls. The names follow ztunnel's RUST_LOG targets where they exist
# (access, xds, inpod, ca are the ones the ztunnel docs and `istioctl ztunnel-config log` mention).
SCOPES: Mapping[str, str] = {
    "access": ACCESS_LOGGER,
    "xds": "ztunnel.xds",
    "inpod": "ztunnel.inpod",
    "ca": "ztunnel.identity",
    "proxy": "ztunnel.proxy",
    "state": "ztunnel.state",
    "admin": "ztunnel.admin",
    "hbone": "loom.hbone",
}
# Longest logger prefix first, so a child logger resolves to its most specific scope.
_SCOPE_BY_LOGGER = sorted(((name, scope) for scope, name in SCOPES.items()), key=lambda p: -len(p[0]))

# Level words accepted from users: ztunnel's (RUST_LOG) and istioctl's spellings. "off" silences a scope.
TRACE = 5
OFF = logging.CRITICAL + 10
LEVELS: Mapping[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}

LogFormat = Literal["text", "json"]


class Bare(str):
    """A field value printed without quotes in text lines (what ztunnel prints with Display)."""

    __slots__ = ()


class LogLevelError(ValueError):
    """A level specification that names an unknown scope or level; the message says which."""


def level_name(levelno: int) -> str:
    """The lower-case level word of a record, as ztunnel prints it."""
    if levelno <= TRACE:
        return "trace"
    if levelno <= logging.DEBUG:
        return "debug"
    if levelno <= logging.INFO:
        return "info"
    if levelno <= logging.WARNING:
        return "warn"
    return "error"


def _configured_level_name(levelno: int) -> str:
    if levelno >= OFF:
        return "off"
    if levelno > logging.ERROR:
        return "critical"
    return level_name(levelno)


def scope_of(logger_name: str) -> str:
    """The scope a logger belongs to: the `SCOPES` entry it is (under), else its first name part after
    the package (``ztunnel.foo.bar`` -> ``foo``; ``other.mod`` -> ``other``)."""
    for name, scope in _SCOPE_BY_LOGGER:
        if logger_name == name or logger_name.startswith(name + "."):
            return scope
    head, _, rest = logger_name.partition(".")
    if head in ("ztunnel", "loom") and rest:
        return rest.split(".", 1)[0]
    return head or "root"


def _timestamp(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _text_value(value: object) -> str:
    if isinstance(value, Bare):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def _json_value(value: object) -> object:
    if isinstance(value, bool | int | float) and not isinstance(value, Bare):
        return value
    return str(value)


def _fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class TextFormatter(logging.Formatter):
    """``time\\tlevel\\tscope\\tmessage\\tkey=value ...`` (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record.created), level_name(record.levelno), scope_of(record.name)]
        parts.append(record.getMessage())
        fields = _fields(record)
        if fields:
            parts.append(" ".join(f"{key}={_text_value(value)}" for key, value in fields.items()))
        line = "\t".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: level, time, scope, message, then the fields (see the docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "level": level_name(record.levelno),
            "time": _timestamp(record.created),
            "scope": scope_of(record.name),
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry[key] = _json_value(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format {log_format!r} is not one of: text, json")


def parse_level(word: str) -> int:
    level = LEVELS.get(word.strip().lower())
    if level is None:
        raise LogLevelError(f"unknown log level {word!r}; expected one of: {', '.join(LEVELS)}")
    return level


def parse_level_spec(spec: str) -> tuple[int | None, dict[str, int]]:
    """Parse ``[default,]scope:level,...`` (``=`` works as well as ``:``) into (default level or None,
    levels by scope). Raises LogLevelError naming the bad part; nothing is applied on error."""
    default: int | None = None
    scopes: dict[str, int] = {}
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise LogLevelError("empty level specification; expected e.g. 'info' or 'access:debug,xds:warn'")
    for item in items:
        sep = ":" if ":" in item else "=" if "=" in item else ""
        if not sep:
            default = parse_level(item)
            continue
        scope, _, word = item.partition(sep)
        scope = scope.strip()
        if scope not in SCOPES:
            raise LogLevelError(f"unknown log scope {scope!r} in {item!r}; known scopes: {', '.join(SCOPES)}")
        scopes[scope] = parse_level(word)
    return default, scopes


class LogControl:
    """The process's log levels: a default (the root logger) and per-scope overrides.

    `set` applies a specification at runtime, `reset` returns to the levels given at construction,
    `describe` renders the current levels for the admin endpoint."""

    def __init__(self, default: int = logging.INFO, scopes: Mapping[str, int] | None = None) -> None:
        self._initial_default = default
        self._initial_scopes = dict(scopes or {})
        self._default = default
        self._scopes: dict[str, int] = {}
        self.reset()

    @property
    def default(self) -> int:
        return self._default

    def levels(self) -> dict[str, str]:
        """Every scope with its effective level word (an override, or the default)."""
        return {scope: _configured_level_name(self._scopes.get(scope, self._default)) for scope in SCOPES}

    def describe(self) -> str:
        """``current log level is info,access:debug`` (overrides only, in `SCOPES` order)."""
        overrides = [
            f"{scope}:{_configured_level_name(level)}"
            for scope in SCOPES
            if (level := self._scopes.get(scope)) is not None
        ]
        return "current log level is " + ",".join([_configured_level_name(self._default), *overrides])

    def set(self, spec: str) -> None:
        """Apply ``[default,]scope:level,...``; raises LogLevelError and changes nothing if invalid."""
        default, scopes = parse_level_spec(spec)
        if default is not None:
            self._default = default
            logging.getLogger().setLevel(default)
        for scope, level in scopes.items():
            self._scopes[scope] = level
            logging.getLogger(SCOPES[scope]).setLevel(level)

    def reset(self) -> None:
        """Back to the levels given at construction (scopes without an override follow the default)."""
        self._default = self._initial_default
        logging.getLogger().setLevel(self._default)
        for scope, name in SCOPES.items():
            level = self._initial_scopes.get(scope)
            logging.getLogger(name).setLevel(level if level is not None else logging.NOTSET)
        self._scopes = dict(self._initial_scopes)


def configure_logging(
    log_format: LogFormat = "text",
    level: str = "info",
    scopes: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> LogControl:
    """Send every log record to `stream` (stderr) in `log_format`, at `level`, with per-scope levels
    (``{"access": "debug"}``). Returns the `LogControl` the admin endpoint changes at runtime.

    Raises LogLevelError / ValueError for an unknown level, scope or format."""
    default = parse_level(level)
    scope_levels: dict[str, int] = {}
    for scope, word in (scopes or {}).items():
        if scope not in SCOPES:
            raise LogLevelError(f"unknown log scope {scope!r}; known scopes: {', '.join(SCOPES)}")
        scope_levels[scope] = parse_level(word)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    return LogControl(default, scope_levels)


def duration_text(seconds: float) -> str:
    """ztunnel's access-log duration: whole milliseconds, ``"13ms"``."""
    return f"{max(0, int(seconds * 1000))}ms"


def log_early_deny(
    src_addr: str,
    dst_addr: str,
    direction: str,
    error: BaseException | str,
    logger: logging.Logger | None = None,
) -> None:
    """The access line for a connection refused before a ConnectionResult exists: addresses,
    direction and the error only (ztunnel's "connection failed" early-deny line, at warn level)."""
    target = logger or access_logger
    if not target.isEnabledFor(logging.WARNING):
        return
    fields: dict[str, object] = {
        "src.addr": Bare(src_addr),
        "dst.addr": Bare(dst_addr),
        "direction": direction,
        "error": str(error) or type(error).__name__,
    }
    target.warning("connection failed", extra={"fields": fields})


__all__ = [
    "ACCESS_LOGGER",
    "LEVELS",
    "SCOPES",
    "Bare",
    "JsonFormatter",
    "LogControl",
    "LogFormat",
    "LogLevelError",
    "TextFormatter",
    "access_logger",
    "configure_logging",
    "duration_text",
    "formatter_for",
    "level_name",
    "log_early_deny",
    "parse_level",
    "parse_level_spec",
    "scope_of",
]
