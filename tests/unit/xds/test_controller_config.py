"""loom-controller settings (controller/config.py) and log formatting (controller/main.py)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from controller.config import Config, ConfigError, HostPort, parse_duration, parse_host_port
from controller.main import IstioFormatter

DIR = ["--config-dir", "/etc/loom"]


def test_defaults() -> None:
    config = Config.from_args(DIR, {})
    assert config.config_dirs == (Path("/etc/loom"),)
    assert not config.kubernetes
    assert config.state_dir == Path("/var/lib/loom/controller")
    assert config.cacerts_dir is None
    assert config.grpc_addr == HostPort("0.0.0.0", 15012)
    assert config.http_addr == HostPort("0.0.0.0", 15014)
    assert (config.trust_domain, config.root_namespace, config.cluster_id) == (
        "cluster.local",
        "istio-system",
        "Kubernetes",
    )
    assert config.cert_ttl == dt.timedelta(hours=24)
    assert config.max_cert_ttl == dt.timedelta(days=90)
    assert config.tls_dns_names == ("loom-controller.istio-system.svc",)
    assert config.trusted_node_accounts == (("istio-system", "ztunnel"),)
    assert (config.debounce, config.max_push_delay) == (0.01, 0.1)
    assert (config.log_level, dict(config.log_scopes)) == ("info", {})
    assert config.serving_ips == ()


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {
        "LOOM_TRUST_DOMAIN": "example.org",
        "LOOM_GRPC_ADDR": "127.0.0.1:1000",
        "LOOM_TLS_DNS_NAME": "a.example, b.example",
        "LOOM_TRUSTED_NODE_ACCOUNT": "mesh/node-proxy,mesh/other",
        "LOOM_CONFIG_DIR": "/a:/b",
    }
    config = Config.from_args(["--grpc-addr", "[::1]:2000", "--log-level", "xds:debug,warn"], env)
    assert config.trust_domain == "example.org"
    assert config.grpc_addr == HostPort("::1", 2000)
    assert str(config.grpc_addr) == "[::1]:2000"
    assert config.tls_dns_names == ("a.example", "b.example")
    assert config.trusted_node_accounts == (("mesh", "node-proxy"), ("mesh", "other"))
    assert config.config_dirs == (Path("/a"), Path("/b"))
    assert (config.log_level, dict(config.log_scopes)) == ("warning", {"xds": "debug"})
    assert config.serving_ips == ("::1",)


def test_repeatable_flags_replace_the_default() -> None:
    config = Config.from_args(
        [*DIR, "--config-dir", "/more", "--tls-dns-name", "x.local", "--tls-ip", "10.0.0.1"], {}
    )
    assert config.config_dirs == (Path("/etc/loom"), Path("/more"))
    assert config.tls_dns_names == ("x.local",)
    assert config.tls_ips == ("10.0.0.1",)


def test_kubernetes_mode() -> None:
    assert Config.from_args(["--kubernetes"], {}).kubernetes
    assert Config.from_args([], {"LOOM_KUBERNETES": "true"}).kubernetes


def test_every_invalid_setting_is_reported_at_once() -> None:
    argv = [
        "--kubernetes",
        *DIR,
        "--grpc-addr",
        "nowhere",
        "--http-addr",
        "0.0.0.0:99999",
        "--trust-domain",
        "Bad Domain",
        "--root-namespace",
        "Istio_System",
        "--cert-ttl",
        "1 day",
        "--max-cert-ttl",
        "0s",
        "--tls-dns-name",
        "UPPER.case",
        "--tls-ip",
        "300.1.1.1",
        "--trusted-node-account",
        "ztunnel",
        "--debounce",
        "2s",
        "--log-level",
        "loud",
        "--bogus",
    ]
    with pytest.raises(ConfigError) as e:
        Config.from_args(argv, {})
    problems = "\n".join(e.value.problems)
    for expected in [
        "unknown argument '--bogus'",
        "exactly one configuration source",
        "--grpc-addr=nowhere is not valid: expected <host>:<port>",
        "--http-addr=0.0.0.0:99999 is not valid: port must be",
        "--trust-domain=Bad Domain is not valid",
        "--root-namespace=Istio_System is not valid",
        "--cert-ttl=1 day is not valid: expected a duration",
        "--max-cert-ttl=0s is not valid: must be longer than zero",
        "--tls-dns-name=UPPER.case is not valid",
        "--tls-ip=300.1.1.1 is not valid",
        "--trusted-node-account=ztunnel is not valid",
        "--debounce=2s is not valid: longer than --max-push-delay=100ms",
        "--log-level=loud is not valid",
    ]:
        assert expected in problems
    assert len(e.value.problems) == 13


def test_environment_problems_name_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        Config.from_args(DIR, {"LOOM_CERT_TTL": "forever", "LOOM_KUBERNETES": "maybe"})
    assert sorted(e.value.problems) == [
        "LOOM_CERT_TTL=forever is not valid: expected a duration such as 10ms, 30s, 24h or 1h30m",
        "LOOM_KUBERNETES=maybe is not valid: expected true or false",
    ]


def test_cert_ttl_must_not_exceed_maximum() -> None:
    with pytest.raises(ConfigError, match="longer than --max-cert-ttl"):
        Config.from_args([*DIR, "--cert-ttl", "48h", "--max-cert-ttl", "24h"], {})


def test_at_least_one_trusted_node_account_is_needed() -> None:
    with pytest.raises(ConfigError) as e:
        Config.from_args(DIR, {"LOOM_TRUSTED_NODE_ACCOUNT": " , "})
    assert e.value.problems == ("LOOM_TRUSTED_NODE_ACCOUNT is not valid: at least one value is needed",)


def test_missing_flag_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="expected one argument"):
        Config.from_args(["--state-dir"], {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10ms", 0.01), ("1.5s", 1.5), ("24h", 86400), ("1h30m", 5400), ("2160h", 7776000), ("0s", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "ms", "1d", "1h 30m", "-1s", "1s2"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["::1:80", "[10.0.0.1]:80", "host:", ":80", "bad_host:80"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_log_lines_are_istio_style() -> None:
    record = logging.LogRecord(
        "controller.xds", logging.WARNING, __file__, 1, "stream %s", ("refused",), None
    )
    record.created = 1763700130.5
    record.fields = {"node": "node-a", "detail": "two words", "empty": ""}
    line = IstioFormatter().format(record)
    assert (
        line
        == '2025-11-21T04:42:10.500000Z\twarn\txds\tstream refused\tnode=node-a detail="two words" empty=""'
    )
