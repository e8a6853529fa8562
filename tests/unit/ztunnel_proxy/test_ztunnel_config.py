"""ztunnel.config: defaults, every variable parsed, and every invalid variable reported at once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ztunnel.config import Config, ConfigError, parse_address, parse_duration


def test_defaults_need_only_the_node_name() -> None:
    config = Config.from_env({"NODE_NAME": "node-1"})
    assert config.node_name == "node-1"
    assert config.xds_address == config.ca_address == "127.0.0.1:15012"
    assert config.inpod_uds == "/var/run/ztunnel/ztunnel.sock"
    assert config.admin_addr == ("127.0.0.1", 15000)
    assert config.metrics_addr == ("0.0.0.0", 15020)
    assert config.readiness_addr == ("0.0.0.0", 15021)
    assert config.connection_termination_deadline == dt.timedelta(seconds=5)
    assert config.secret_ttl == dt.timedelta(hours=24)
    assert config.pool_max_streams_per_connection == 100
    assert config.pool_unused_release_timeout == dt.timedelta(minutes=5)
    assert config.log_format == "text"


def test_every_variable_is_read() -> None:
    config = Config.from_env(
        {
            "NODE_NAME": "worker-2",
            "XDS_ADDRESS": "controller.loom-system:15012",
            "CA_ADDRESS": "10.0.0.5:15013",
            "ROOT_CERT": "/etc/loom/root.pem",
            "NODE_TOKEN_FILE": "/etc/loom/token",
            "INPOD_UDS": "/run/zt.sock",
            "ADMIN_ADDR": "[::1]:16000",
            "METRICS_ADDR": "0.0.0.0:0",
            "READINESS_ADDR": "127.0.0.1:16021",
            "CONNECTION_TERMINATION_DEADLINE": "1500ms",
            "LOG_FORMAT": "JSON",
            "LOG_LEVEL": "debug",
            "SECRET_TTL": "1h30m",
            "POOL_MAX_STREAMS_PER_CONNECTION": "50",
            "POOL_UNUSED_RELEASE_TIMEOUT": "30",
        }
    )
    assert config.xds_address == "controller.loom-system:15012"
    assert config.ca_address == "10.0.0.5:15013"
    assert config.root_cert == Path("/etc/loom/root.pem")
    assert config.node_token_file == Path("/etc/loom/token")
    assert config.inpod_uds == "/run/zt.sock"
    assert config.admin_addr == ("::1", 16000)
    assert config.metrics_addr == ("0.0.0.0", 0)
    assert config.connection_termination_deadline == dt.timedelta(milliseconds=1500)
    assert config.log_format == "json"
    assert config.log_level == "debug"
    assert config.secret_ttl == dt.timedelta(minutes=90)
    assert config.pool_max_streams_per_connection == 50
    assert config.pool_unused_release_timeout == dt.timedelta(seconds=30)


def test_ca_address_follows_xds_address_unless_set() -> None:
    config = Config.from_env({"NODE_NAME": "n", "XDS_ADDRESS": "10.1.2.3:15012"})
    assert config.ca_address == "10.1.2.3:15012"


def test_all_invalid_variables_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(
            {
                "XDS_ADDRESS": "no-port",
                "ADMIN_ADDR": "localhost:15000",
                "CONNECTION_TERMINATION_DEADLINE": "soon",
                "LOG_FORMAT": "xml",
                "POOL_MAX_STREAMS_PER_CONNECTION": "0",
                "SECRET_TTL": "-5s",
            }
        )
    problems = caught.value.problems
    assert [p.split("=", 1)[0] for p in problems] == [
        "NODE_NAME",
        "XDS_ADDRESS",
        "CA_ADDRESS",
        "ADMIN_ADDR",
        "CONNECTION_TERMINATION_DEADLINE",
        "LOG_FORMAT",
        "SECRET_TTL",
        "POOL_MAX_STREAMS_PER_CONNECTION",
    ]
    assert "NODE_NAME= is not valid: is required" in problems[0]
    assert "LOG_FORMAT=xml is not valid: expected text or json" in problems
    assert "ADMIN_ADDR=localhost:15000 is not valid: 'localhost' is not a literal IP address" in problems
    assert all(" is not valid: " in p for p in problems)
    assert str(caught.value).count("\n") == len(problems)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5), ("500ms", 0.5), ("5m", 300), ("24h", 86400), ("1h30m", 5400), ("2.5", 2.5), ("1m30s", 90)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0", "0s", "5 s", "s", "5d", "1h 30m", "ms5", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:15000", ("127.0.0.1", 15000)), ("[::]:15020", ("::", 15020)), ("0.0.0.0:0", ("0.0.0.0", 0))],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["::1:15000", "[127.0.0.1]:1", "1.2.3.4:65536", "1.2.3.4:", "1.2.3.4", "host:80"]
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
