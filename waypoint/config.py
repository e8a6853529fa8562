"""The waypoint process's configuration: environment variables (Istio's and ztunnel's names where they
have them).

Theory of operation
-------------------
`Config.from_env(env)` reads every variable, validates each one, and reports *all* invalid ones at once
in a `ConfigError` (`NAME=value is not valid: reason`, one per line), so an operator fixing a
Deployment does not discover problems one restart at a time. The result is one frozen `Config`;
nothing else in the process reads the environment. Durations and addresses use ztunnel's syntax
("500ms", "5s", "1h30m" or seconds; ip:port, [v6]:port).

Identity: the waypoint runs as `spiffe://<TRUST_DOMAIN>/ns/<WAYPOINT_NAMESPACE>/sa/<SERVICE_ACCOUNT>`
(the service account defaults to the waypoint's name, as istiod creates it). Its certificate comes
from the CA with the credential in `WORKLOAD_TOKEN_FILE` (its own service-account token) or, for
a lab waypoint that borrows the node's credential, `NODE_TOKEN_FILE`; the token is a path, re-read on
every use, never a value.

Listening: `LISTEN_ADDR` is where HBONE arrives; its default 0.0.0.0:15008 means every address of both
families (an IPv6-only socket on [::]:15008 beside the IPv4 one, where the kernel has IPv6), so a
dual-stack cluster's ztunnels reach the waypoint over either. Any other address is listened on as given.

Limits: the most useful `ProxyLimits` fields are variables (`WAYPOINT_*`); the rest keep their
documented defaults.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeVar

from waypoint.proxy.limits import ProxyLimits
from ztunnel.config import (
    parse_address,
    parse_duration,
    parse_grpc_target,
    parse_log_format,
    parse_log_level,
    parse_path,
    parse_text,
    positive_int_parser,
)

T = TypeVar("T")

DEFAULT_XDS_ADDRESS: Final = "127.0.0.1:15012"
DEFAULT_ROOT_CERT: Final = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN_FILE: Final = "/var/run/secrets/tokens/istio-token"
# HBONE from ztunnels arrives on every interface; metrics and readiness probes come from outside too.
DEFAULT_LISTEN_ADDR: Final = "0.0.0.0:15008"
DEFAULT_METRICS_ADDR: Final = "0.0.0.0:15020"
DEFAULT_READINESS_ADDR: Final = "0.0.0.0:15021"
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
DEFAULT_CLUSTER_ID: Final = "Kubernetes"
# Istio's default drain: open requests get this long after SIGTERM.
DEFAULT_TERMINATION_DEADLINE: Final = dt.timedelta(seconds=5)
DEFAULT_SECRET_TTL: Final = dt.timedelta(hours=24)
# A bound above which a limit is a typo rather than a choice.
_MAX_COUNT: Final = 1_000_000

LogFormat = Literal["text", "json"]

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


class ConfigError(ValueError):
    """One or more invalid variables; `problems` has one `NAME=value is not valid: reason` per entry."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid waypoint configuration:\n  " + "\n  ".join(problems))


def _required_label(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if not value:
            raise ValueError(f"is required: {what}")
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError("must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)")
        return value

    return parse


def _optional_label(text: str) -> str:
    value = text.strip()
    if value and not _DNS_LABEL.fullmatch(value):
        raise ValueError("must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)")
    return value


def _trust_domain(text: str) -> str:
    value = text.strip().lower()
    if not value or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError("must be a DNS name such as cluster.local")
    return value


_count = positive_int_parser(_MAX_COUNT)


def _bytes(text: str) -> int:
    """A size: bytes, or with a Ki / Mi suffix (64Ki, 1Mi)."""
    value = text.strip()
    factor = 1
    for suffix, multiplier in (("Ki", 1024), ("Mi", 1024 * 1024)):
        if value.endswith(suffix):
            value, factor = value[: -len(suffix)], multiplier
            break
    if not value.isdigit():
        raise ValueError("expected a size in bytes, optionally with Ki or Mi (64Ki)")
    size = int(value) * factor
    if not 0 < size <= 1024 * 1024 * 1024:
        raise ValueError("must be between 1 byte and 1Gi")
    return size


def _seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the waypoint process is configured with (see the module docstring)."""

    waypoint_name: str
    waypoint_namespace: str
    service_account: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = DEFAULT_CLUSTER_ID
    xds_address: str = DEFAULT_XDS_ADDRESS
    ca_address: str = DEFAULT_XDS_ADDRESS
    root_cert: Path = Path(DEFAULT_ROOT_CERT)
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    listen_addr: tuple[str, int] = ("0.0.0.0", 15008)
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    termination_deadline: dt.timedelta = DEFAULT_TERMINATION_DEADLINE
    secret_ttl: dt.timedelta = DEFAULT_SECRET_TTL
    log_format: LogFormat = "text"
    log_level: str = "info"
    limits: ProxyLimits = field(default_factory=ProxyLimits)

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.waypoint_namespace}/sa/{self.service_account}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Read and validate every variable; raise ConfigError listing every invalid one."""
        problems: list[str] = []

        def read(name: str, default: str, parse: Callable[[str], T]) -> T | None:
            raw = env.get(name)
            text = default if raw is None else raw
            try:
                return parse(text)
            except ValueError as e:
                problems.append(f"{name}={text} is not valid: {e}")
                return None

        name = read("WAYPOINT_NAME", "", _required_label("the name of the waypoint Gateway"))
        namespace = read(
            "WAYPOINT_NAMESPACE",
            env.get("POD_NAMESPACE", ""),
            _required_label("the namespace of the waypoint Gateway"),
        )
        account = read("SERVICE_ACCOUNT", "", _optional_label)
        trust_domain = read("TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN, _trust_domain)
        cluster_id = read("CLUSTER_ID", DEFAULT_CLUSTER_ID, parse_text)
        xds_address = read("XDS_ADDRESS", DEFAULT_XDS_ADDRESS, parse_grpc_target)
        ca_address = read("CA_ADDRESS", env.get("XDS_ADDRESS", DEFAULT_XDS_ADDRESS), parse_grpc_target)
        root_cert = read("ROOT_CERT", DEFAULT_ROOT_CERT, parse_path)
        token_variable = "WORKLOAD_TOKEN_FILE" if "WORKLOAD_TOKEN_FILE" in env else "NODE_TOKEN_FILE"
        token_file = read(token_variable, DEFAULT_TOKEN_FILE, parse_path)
        listen_addr = read("LISTEN_ADDR", DEFAULT_LISTEN_ADDR, parse_address)
        metrics_addr = read("METRICS_ADDR", DEFAULT_METRICS_ADDR, parse_address)
        readiness_addr = read("READINESS_ADDR", DEFAULT_READINESS_ADDR, parse_address)
        deadline = read(
            "CONNECTION_TERMINATION_DEADLINE",
            f"{DEFAULT_TERMINATION_DEADLINE.total_seconds():g}s",
            parse_duration,
        )
        secret_ttl = read("SECRET_TTL", f"{DEFAULT_SECRET_TTL.total_seconds():g}s", parse_duration)
        log_format = read("LOG_FORMAT", "text", parse_log_format)
        log_level = read("LOG_LEVEL", "info", parse_log_level)
        limits = _read_limits(env, problems)
        if problems:
            raise ConfigError(problems)
        assert name is not None and namespace is not None and account is not None
        assert trust_domain is not None and cluster_id is not None
        assert xds_address is not None and ca_address is not None
        assert root_cert is not None and token_file is not None
        assert listen_addr is not None and metrics_addr is not None and readiness_addr is not None
        assert deadline is not None and secret_ttl is not None
        assert log_format is not None and log_level is not None and limits is not None
        return cls(
            waypoint_name=name,
            waypoint_namespace=namespace,
            service_account=account or name,
            trust_domain=trust_domain,
            cluster_id=cluster_id,
            xds_address=xds_address,
            ca_address=ca_address,
            root_cert=root_cert,
            token_file=token_file,
            listen_addr=listen_addr,
            metrics_addr=metrics_addr,
            readiness_addr=readiness_addr,
            termination_deadline=deadline,
            secret_ttl=secret_ttl,
            log_format=log_format,
            log_level=log_level,
            limits=limits,
        )


# Variable -> (ProxyLimits field, parser). Defaults are the ProxyLimits defaults.
_LIMIT_VARIABLES: Final[dict[str, tuple[str, Callable[[str], int | float]]]] = {
    "WAYPOINT_MAX_REQUEST_HEADERS_BYTES": ("max_request_head_bytes", _bytes),
    "WAYPOINT_MAX_REQUEST_HEADERS": ("max_request_headers", _count),
    "WAYPOINT_MAX_CONCURRENT_STREAMS": ("h2_max_concurrent_streams", _count),
    "WAYPOINT_IDLE_TIMEOUT": ("idle_timeout", _seconds),
    "WAYPOINT_UPSTREAM_IDLE_TIMEOUT": ("upstream_idle_timeout", _seconds),
    "WAYPOINT_MAX_CONNECTIONS_PER_ENDPOINT": ("max_connections_per_endpoint", _count),
    "WAYPOINT_RETRY_BUFFER_BYTES": ("retry_buffer", _bytes),
    "WAYPOINT_DEFAULT_RESPONSE_TIMEOUT": ("default_response_timeout", _seconds),
    "WAYPOINT_RAPID_RESET_LIMIT": ("rapid_reset_limit", _count),
}


def _read_limits(env: Mapping[str, str], problems: list[str]) -> ProxyLimits | None:
    values: dict[str, int | float] = {}
    for variable, (field_name, parse) in _LIMIT_VARIABLES.items():
        raw = env.get(variable)
        if raw is None:
            continue
        try:
            values[field_name] = parse(raw)
        except ValueError as e:
            problems.append(f"{variable}={raw} is not valid: {e}")
    try:
        return ProxyLimits(**values)  # type: ignore[arg-type]
    except ValueError as e:
        problems.append(f"WAYPOINT_* limits are not consistent: {e}")
        return None
