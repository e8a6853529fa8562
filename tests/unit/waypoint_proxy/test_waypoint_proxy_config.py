"""The waypoint's configuration from the environment: defaults, every variable, and every error at once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from waypoint.config import Config, ConfigError
from waypoint.proxy import ProxyLimits

MINIMAL = {"WAYPOINT_NAME": "waypoint", "WAYPOINT_NAMESPACE": "bookinfo"}


def test_defaults() -> None:
    config = Config.from_env(MINIMAL)
    assert (config.waypoint_name, config.waypoint_namespace, config.service_account) == (
        "waypoint",
        "bookinfo",
        "waypoint",  # istiod names the waypoint's service account after the Gateway
    )
    assert config.spiffe_id == "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
    assert config.listen_addr == ("0.0.0.0", 15008)
    assert config.metrics_addr == ("0.0.0.0", 15020) and config.readiness_addr == ("0.0.0.0", 15021)
    assert config.xds_address == config.ca_address == "127.0.0.1:15012"
    assert config.token_file == Path("/var/run/secrets/tokens/istio-token")
    assert config.termination_deadline == dt.timedelta(seconds=5)
    assert config.limits == ProxyLimits()


def test_every_variable() -> None:
    config = Config.from_env(
        {
            "WAYPOINT_NAME": "reviews-wp",
            "POD_NAMESPACE": "shop",
            "SERVICE_ACCOUNT": "reviews-sa",
            "TRUST_DOMAIN": "Example.ORG",
            "CLUSTER_ID": "east",
            "XDS_ADDRESS": "istiod.istio-system.svc:15012",
            "ROOT_CERT": "/etc/root.pem",
            "WORKLOAD_TOKEN_FILE": "/var/run/token",
            "NODE_TOKEN_FILE": "/ignored",
            "LISTEN_ADDR": "[::]:15008",
            "METRICS_ADDR": "127.0.0.1:0",
            "READINESS_ADDR": "0.0.0.0:15021",
            "CONNECTION_TERMINATION_DEADLINE": "1m30s",
            "SECRET_TTL": "2h",
            "LOG_FORMAT": "JSON",
            "LOG_LEVEL": "debug",
            "WAYPOINT_MAX_REQUEST_HEADERS_BYTES": "96Ki",
            "WAYPOINT_MAX_REQUEST_HEADERS": "200",
            "WAYPOINT_UPSTREAM_IDLE_TIMEOUT": "500ms",
            "WAYPOINT_RAPID_RESET_LIMIT": "50",
        }
    )
    assert config.waypoint_namespace == "shop"  # from POD_NAMESPACE (the downward API) when not set
    assert config.service_account == "reviews-sa"
    assert config.spiffe_id == "spiffe://example.org/ns/shop/sa/reviews-sa"
    assert config.ca_address == "istiod.istio-system.svc:15012"  # follows XDS_ADDRESS
    assert config.token_file == Path("/var/run/token")  # the workload's own token wins
    assert config.listen_addr == ("::", 15008)
    assert config.termination_deadline == dt.timedelta(seconds=90)
    assert (config.log_format, config.log_level) == ("json", "debug")
    assert config.limits.max_request_head_bytes == 96 * 1024
    assert config.limits.max_request_headers == 200
    assert config.limits.upstream_idle_timeout == 0.5 and config.limits.rapid_reset_limit == 50


def test_node_token_file_is_used_without_a_workload_token() -> None:
    assert Config.from_env({**MINIMAL, "NODE_TOKEN_FILE": "/node/token"}).token_file == Path("/node/token")


def test_every_invalid_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(
            {
                "WAYPOINT_NAME": "Not_A_Label",
                "SERVICE_ACCOUNT": "bad sa",
                "TRUST_DOMAIN": "",
                "XDS_ADDRESS": "no-port",
                "ROOT_CERT": "",
                "LISTEN_ADDR": "localhost:15008",
                "METRICS_ADDR": "1.2.3.4:99999",
                "CONNECTION_TERMINATION_DEADLINE": "soon",
                "LOG_FORMAT": "xml",
                "LOG_LEVEL": "loud",
                "WAYPOINT_MAX_REQUEST_HEADERS": "0",
                "WAYPOINT_RETRY_BUFFER_BYTES": "12Gi",
            }
        )
    problems = raised.value.problems
    names = [p.split("=", 1)[0] for p in problems]
    assert names == [
        "WAYPOINT_NAME",
        "WAYPOINT_NAMESPACE",
        "SERVICE_ACCOUNT",
        "TRUST_DOMAIN",
        "XDS_ADDRESS",
        "CA_ADDRESS",
        "ROOT_CERT",
        "LISTEN_ADDR",
        "METRICS_ADDR",
        "CONNECTION_TERMINATION_DEADLINE",
        "LOG_FORMAT",
        "LOG_LEVEL",
        "WAYPOINT_MAX_REQUEST_HEADERS",
        "WAYPOINT_RETRY_BUFFER_BYTES",
    ]
    assert "WAYPOINT_NAMESPACE= is not valid: is required" in problems[1]
    assert all(" is not valid: " in p for p in problems)
    assert str(raised.value).startswith("invalid waypoint configuration:")


def test_inconsistent_limits_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="retry_buffer"):
        Config.from_env({**MINIMAL, "WAYPOINT_RETRY_BUFFER_BYTES": "32Mi"})


def test_proxy_limits_validate() -> None:
    with pytest.raises(ValueError, match="h2_max_frame_size") as raised:
        ProxyLimits(h2_max_frame_size=100, body_buffer=0)
    assert "body_buffer=0 must be positive" in str(raised.value)
    assert ProxyLimits().h2_header_list_hard_cap == 120 * 1024
