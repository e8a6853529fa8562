"""ztunnel-style log lines: exact text and JSON renderings, scopes, runtime level changes, early deny."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from telemetry_builders import FIXED_CREATED, collect, fixed_time

from ztunnel.telemetry.access_log import (
    OFF,
    SCOPES,
    Bare,
    JsonFormatter,
    LogControl,
    LogLevelError,
    TextFormatter,
    configure_logging,
    duration_text,
    log_early_deny,
    parse_level_spec,
    scope_of,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging and LogControl change global loggers; put them back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in SCOPES.values()}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def record(name: str, level: int, message: str, fields: dict[str, object] | None = None) -> logging.LogRecord:
    rec = logging.makeLogRecord(
        {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
    )
    if fields is not None:
        rec.fields = fields
    return fixed_time(rec)


ACCESS_FIELDS: dict[str, object] = {
    "src.addr": Bare("10.244.1.12:60059"),
    "src.workload": "curl-5b549b49b8-jd8rs",
    "src.namespace": "default",
    "src.identity": "spiffe://cluster.local/ns/default/sa/curl",
    "dst.addr": Bare("10.244.1.10:15008"),
    "dst.hbone_addr": "10.244.1.10:9080",
    "dst.service": "productpage.default.svc.cluster.local",
    "dst.workload": "productpage-v1-d5789fdfb-8x8kq",
    "dst.namespace": "default",
    "dst.identity": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    "direction": "outbound",
    "bytes_sent": 80,
    "bytes_recv": 175,
    "duration": "1ms",
}


def test_text_access_line_is_istio_shaped() -> None:
    line = TextFormatter().format(record("access", logging.INFO, "connection complete", ACCESS_FIELDS))
    assert line == (
        "2024-05-04T09:59:05.028709Z\tinfo\taccess\tconnection complete\t"
        'src.addr=10.244.1.12:60059 src.workload="curl-5b549b49b8-jd8rs" src.namespace="default" '
        'src.identity="spiffe://cluster.local/ns/default/sa/curl" dst.addr=10.244.1.10:15008 '
        'dst.hbone_addr="10.244.1.10:9080" dst.service="productpage.default.svc.cluster.local" '
        'dst.workload="productpage-v1-d5789fdfb-8x8kq" dst.namespace="default" '
        'dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage" direction="outbound" '
        'bytes_sent=80 bytes_recv=175 duration="1ms"'
    )


def test_json_access_line_has_the_same_field_names() -> None:
    line = JsonFormatter().format(record("access", logging.INFO, "connection complete", ACCESS_FIELDS))
    parsed = json.loads(line)
    assert list(parsed)[:4] == ["level", "time", "scope", "message"]
    assert parsed == {
        "level": "info",
        "time": "2024-05-04T09:59:05.028709Z",
        "scope": "access",
        "message": "connection complete",
        "src.addr": "10.244.1.12:60059",
        "src.workload": "curl-5b549b49b8-jd8rs",
        "src.namespace": "default",
        "src.identity": "spiffe://cluster.local/ns/default/sa/curl",
        "dst.addr": "10.244.1.10:15008",
        "dst.hbone_addr": "10.244.1.10:9080",
        "dst.service": "productpage.default.svc.cluster.local",
        "dst.workload": "productpage-v1-d5789fdfb-8x8kq",
        "dst.namespace": "default",
        "dst.identity": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "direction": "outbound",
        "bytes_sent": 80,
        "bytes_recv": 175,
        "duration": "1ms",
    }


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param('say "hi"\n', '"say \\"hi\\"\\n"', id="quotes and newlines escaped"),
        pytest.param(True, "true", id="booleans bare"),
        pytest.param(3, "3", id="integers bare"),
        pytest.param(Bare("[::1]:80"), "[::1]:80", id="addresses bare"),
        pytest.param("", '""', id="empty string quoted"),
    ],
)
def test_text_value_rendering(value: object, text: str) -> None:
    line = TextFormatter().format(record("ztunnel.xds", logging.WARNING, "m", {"k": value}))
    assert line == f"2024-05-04T09:59:05.028709Z\twarn\txds\tm\tk={text}"


def test_text_line_without_fields_and_with_an_exception() -> None:
    assert TextFormatter().format(record("ztunnel.state", logging.ERROR, "plain")) == (
        "2024-05-04T09:59:05.028709Z\terror\tstate\tplain"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("ztunnel.proxy", logging.ERROR, "failed")
        rec.exc_info = sys.exc_info()
    text = TextFormatter().format(rec).splitlines()
    assert text[0] == "2024-05-04T09:59:05.028709Z\terror\tproxy\tfailed"
    assert text[-1] == "ValueError: boom"
    assert "exception" in json.loads(JsonFormatter().format(rec))


@pytest.mark.parametrize(
    ("logger", "scope"),
    [
        ("access", "access"),
        ("ztunnel.xds", "xds"),
        ("ztunnel.inpod.client", "inpod"),
        ("ztunnel.identity", "ca"),
        ("ztunnel.proxy.connections", "proxy"),
        ("loom.hbone", "hbone"),
        ("ztunnel.app", "app"),
        ("asyncio", "asyncio"),
        ("", "root"),
    ],
)
def test_scope_of_logger(logger: str, scope: str) -> None:
    assert scope_of(logger) == scope


def test_duration_is_whole_milliseconds() -> None:
    assert [duration_text(s) for s in (0.0, 0.0009, 0.0131, 2.5)] == ["0ms", "0ms", "13ms", "2500ms"]


def test_level_spec_parsing() -> None:
    assert parse_level_spec("debug") == (logging.DEBUG, {})
    assert parse_level_spec("info,access:debug,xds=warn") == (
        logging.INFO,
        {"access": logging.DEBUG, "xds": logging.WARNING},
    )
    assert parse_level_spec("inpod:off") == (None, {"inpod": OFF})
    with pytest.raises(LogLevelError, match="unknown log scope 'nope' in 'nope:debug'; known scopes: access"):
        parse_level_spec("nope:debug")
    with pytest.raises(LogLevelError, match="unknown log level 'loud'"):
        parse_level_spec("access:loud")
    with pytest.raises(LogLevelError, match="empty level specification"):
        parse_level_spec(" , ")


def test_log_control_changes_and_resets_levels() -> None:
    control = LogControl(logging.INFO, {"xds": logging.WARNING})
    assert control.describe() == "current log level is info,xds:warn"
    assert logging.getLogger("ztunnel.xds").level == logging.WARNING
    assert not logging.getLogger("access").isEnabledFor(logging.DEBUG)

    control.set("access:debug,ca:off")
    assert control.describe() == "current log level is info,access:debug,xds:warn,ca:off"
    assert logging.getLogger("access").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("ztunnel.identity").isEnabledFor(logging.CRITICAL)
    assert control.levels()["access"] == "debug" and control.levels()["proxy"] == "info"

    with pytest.raises(LogLevelError):
        control.set("access:info,bogus:debug")
    assert control.describe() == "current log level is info,access:debug,xds:warn,ca:off", "nothing applied"

    control.set("error")
    assert not logging.getLogger("ztunnel.proxy").isEnabledFor(logging.WARNING)
    control.reset()
    assert control.describe() == "current log level is info,xds:warn"
    assert not logging.getLogger("access").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("ztunnel.proxy").isEnabledFor(logging.INFO)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_configure_logging_writes_ztunnel_lines(log_format: str) -> None:
    stream = io.StringIO()
    control = configure_logging(log_format, "info", {"access": "warn"}, stream=stream)  # type: ignore[arg-type]
    logging.getLogger("ztunnel.xds").info("connected", extra={"fields": {"address": Bare("127.0.0.1:15012")}})
    logging.getLogger("access").info("connection complete")  # below the access scope's level
    logging.getLogger("ztunnel.xds").debug("hidden")
    control.set("access:info")
    logging.getLogger("access").info("connection complete", extra={"fields": {"bytes_sent": 1}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if log_format == "text":
        assert lines[0].split("\t")[1:] == ["info", "xds", "connected", "address=127.0.0.1:15012"]
        assert lines[1].split("\t")[1:] == ["info", "access", "connection complete", "bytes_sent=1"]
    else:
        first, second = (json.loads(line) for line in lines)
        assert (first["scope"], first["message"], first["address"]) == ("xds", "connected", "127.0.0.1:15012")
        assert (second["scope"], second["bytes_sent"]) == ("access", 1)


def test_configure_logging_rejects_unknown_settings() -> None:
    with pytest.raises(LogLevelError, match="unknown log level 'verbose'"):
        configure_logging("text", "verbose")
    with pytest.raises(LogLevelError, match="unknown log scope 'dns'"):
        configure_logging("text", "info", {"dns": "debug"})
    with pytest.raises(ValueError, match="log format 'xml' is not one of: text, json"):
        configure_logging("xml", "info")  # type: ignore[arg-type]


def test_early_deny_carries_only_addresses_direction_and_error() -> None:
    with collect("access") as collected:
        log_early_deny("10.0.0.1:5000", "10.0.0.2:80", "inbound", ConnectionRefusedError("refused"))
    (rec,) = collected.records
    rec.created = FIXED_CREATED
    assert TextFormatter().format(rec) == (
        "2024-05-04T09:59:05.028709Z\twarn\taccess\tconnection failed\t"
        'src.addr=10.0.0.1:5000 dst.addr=10.0.0.2:80 direction="inbound" error="refused"'
    )


def test_early_deny_is_skipped_when_the_access_scope_is_off() -> None:
    with collect("access", OFF) as collected:
        log_early_deny("10.0.0.1:5000", "10.0.0.2:80", "outbound", "no route")
    assert collected.records == []
