"""The node proxy's configuration: environment variables (Istio ztunnel's names where it has them).

Theory of operation
-------------------
`Config.from_env(env)` reads every variable, validates each one, and reports *all* invalid ones at once
in a `ConfigError` (`NAME=value is not valid: reason`, one per line), so an operator fixing a DaemonSet
does not discover the problems one restart at a time. The result is one frozen `Config`; nothing else in
the process reads the environment.

Durations accept Go/Istio style text ("500ms", "5s", "5m", "24h", "1h30m") or a bare number of seconds.
Addresses are host:port with a literal IP (IPv6 in brackets); port 0 is allowed (tests bind ephemeral
ports). Credentials are paths, not values: the node token file is re-read on every connect (the kubelet
rotates projected tokens), the root certificate on every new channel.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar

from ztunnel.telemetry.access_log import parse_level

T = TypeVar("T")

# Where the controller serves xDS and the CA: the lab runs it on the node's loopback (Istio's istiod
# listens on 15012 for both).
DEFAULT_XDS_ADDRESS: Final = "127.0.0.1:15012"
DEFAULT_CA_ADDRESS: Final = DEFAULT_XDS_ADDRESS
# The mesh root the controller publishes (Istio mounts it from the istio-ca-root-cert ConfigMap).
DEFAULT_ROOT_CERT: Final = "/var/run/secrets/istio/root-cert.pem"
# The node credential: a projected service-account token in Kubernetes, a lab token file otherwise.
DEFAULT_NODE_TOKEN_FILE: Final = "/var/run/secrets/tokens/istio-token"
# The ZDS socket both DaemonSets share through a hostPath (Istio's INPOD_UDS).
DEFAULT_INPOD_UDS: Final = "/var/run/ztunnel/ztunnel.sock"
# Admin (config dump, log levels) is for the node's operator only: loopback.
DEFAULT_ADMIN_ADDR: Final = "127.0.0.1:15000"
# Prometheus scrapes and kubelet readiness probes come from outside the pod: all interfaces.
DEFAULT_METRICS_ADDR: Final = "0.0.0.0:15020"
DEFAULT_READINESS_ADDR: Final = "0.0.0.0:15021"
# How long open connections may finish after SIGTERM before they are closed (Istio: 5 s by default,
# kept below the pod's terminationGracePeriodSeconds).
DEFAULT_CONNECTION_TERMINATION_DEADLINE: Final = dt.timedelta(seconds=5)
# Requested workload certificate lifetime (Istio's SECRET_TTL, 24 h).
DEFAULT_SECRET_TTL: Final = dt.timedelta(hours=24)
# HTTP/2 streams per pooled HBONE connection (Istio's POOL_MAX_STREAMS_PER_CONNECTION).
DEFAULT_POOL_MAX_STREAMS_PER_CONNECTION: Final = 100
# A pooled HBONE connection without streams for this long is closed (Istio's POOL_UNUSED_RELEASE_TIMEOUT).
DEFAULT_POOL_UNUSED_RELEASE_TIMEOUT: Final = dt.timedelta(minutes=5)
DEFAULT_LOG_FORMAT: Final = "text"
DEFAULT_LOG_LEVEL: Final = "info"
# Istio's default CLUSTER_ID; also the first segment of workload uids.
DEFAULT_CLUSTER_ID: Final = "Kubernetes"
# A streams limit beyond this is a typo: HTTP/2 servers rarely allow more than a few hundred.
MAX_STREAMS_LIMIT: Final = 10_000

LogFormat = Literal["text", "json"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """One or more invalid variables; `problems` has one `NAME=value is not valid: reason` per entry."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid ztunnel configuration:\n  " + "\n  ".join(problems))


def parse_duration(text: str) -> dt.timedelta:
    """ "5s", "500ms", "1h30m", or a bare number of seconds; must be positive."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    try:
        seconds = float(value)
    except ValueError:
        position = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            position = match.end()
        if position != len(value) or position == 0:
            raise ValueError("expected a duration such as 500ms, 5s, 5m, 24h or 1h30m") from None
    if not seconds > 0:
        raise ValueError("must be positive")
    return dt.timedelta(seconds=seconds)


def parse_address(text: str) -> tuple[str, int]:
    """ "ip:port" or "[v6]:port" with a literal IP and a port in 0..65535."""
    value = text.strip()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError("expected ip:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a literal IP address") from None
    if value.startswith("[") != (ip.version == 6):
        raise ValueError("IPv6 addresses need brackets, IPv4 addresses must not have them")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 0..65535")
    return str(ip), int(port_text)


def parse_grpc_target(text: str) -> str:
    """host:port of the controller: a literal IP or a DNS name, and a port in 1..65535."""
    value = text.strip()
    host, colon, port_text = value.rpartition(":")
    if not colon or not host:
        raise ValueError("expected host:port")
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 1..65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", bare):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return value


def parse_log_format(text: str) -> LogFormat:
    value = text.strip().lower()
    if value == "text":
        return "text"
    if value == "json":
        return "json"
    raise ValueError("expected text or json")


def positive_int_parser(maximum: int) -> Callable[[str], int]:
    """A parser of whole numbers in 1..maximum (a bound above which a value is a typo)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not 0 < value <= maximum:
            raise ValueError(f"must be in 1..{maximum}")
        return value

    return parse


_parse_positive_int = positive_int_parser(MAX_STREAMS_LIMIT)


def _parse_node_name(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("is required: the Kubernetes node this proxy serves")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", value):
        raise ValueError("must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')")
    return value


def parse_path(text: str) -> Path:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    return Path(value)


def _parse_uds(text: str) -> str:
    value = parse_path(text)
    # sockaddr_un holds 108 bytes including the terminating NUL.
    if len(str(value).encode()) > 107:
        raise ValueError("is longer than the 107 bytes a unix socket path may have")
    return str(value)


def parse_log_level(text: str) -> str:
    value = text.strip().lower()
    parse_level(value)  # the same words the admin endpoint accepts; raises LogLevelError (a ValueError)
    return value


def parse_text(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the node proxy is configured with (see the module docstring for the sources)."""

    node_name: str
    xds_address: str = DEFAULT_XDS_ADDRESS
    ca_address: str = DEFAULT_CA_ADDRESS
    root_cert: Path = Path(DEFAULT_ROOT_CERT)
    node_token_file: Path = Path(DEFAULT_NODE_TOKEN_FILE)
    inpod_uds: str = DEFAULT_INPOD_UDS
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    connection_termination_deadline: dt.timedelta = DEFAULT_CONNECTION_TERMINATION_DEADLINE
    log_format: LogFormat = "text"
    log_level: str = DEFAULT_LOG_LEVEL
    secret_ttl: dt.timedelta = DEFAULT_SECRET_TTL
    pool_max_streams_per_connection: int = DEFAULT_POOL_MAX_STREAMS_PER_CONNECTION
    pool_unused_release_timeout: dt.timedelta = DEFAULT_POOL_UNUSED_RELEASE_TIMEOUT
    cluster_id: str = DEFAULT_CLUSTER_ID

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

        node_name = read("NODE_NAME", "", _parse_node_name)
        xds_address = read("XDS_ADDRESS", DEFAULT_XDS_ADDRESS, parse_grpc_target)
        ca_address = read("CA_ADDRESS", env.get("XDS_ADDRESS", DEFAULT_CA_ADDRESS), parse_grpc_target)
        root_cert = read("ROOT_CERT", DEFAULT_ROOT_CERT, parse_path)
        token_file = read("NODE_TOKEN_FILE", DEFAULT_NODE_TOKEN_FILE, parse_path)
        inpod_uds = read("INPOD_UDS", DEFAULT_INPOD_UDS, _parse_uds)
        admin_addr = read("ADMIN_ADDR", DEFAULT_ADMIN_ADDR, parse_address)
        metrics_addr = read("METRICS_ADDR", DEFAULT_METRICS_ADDR, parse_address)
        readiness_addr = read("READINESS_ADDR", DEFAULT_READINESS_ADDR, parse_address)
        deadline = read(
            "CONNECTION_TERMINATION_DEADLINE",
            f"{DEFAULT_CONNECTION_TERMINATION_DEADLINE.total_seconds():g}s",
            parse_duration,
        )
        log_format = read("LOG_FORMAT", DEFAULT_LOG_FORMAT, parse_log_format)
        log_level = read("LOG_LEVEL", DEFAULT_LOG_LEVEL, parse_log_level)
        secret_ttl = read("SECRET_TTL", f"{DEFAULT_SECRET_TTL.total_seconds():g}s", parse_duration)
        max_streams = read(
            "POOL_MAX_STREAMS_PER_CONNECTION",
            str(DEFAULT_POOL_MAX_STREAMS_PER_CONNECTION),
            _parse_positive_int,
        )
        release = read(
            "POOL_UNUSED_RELEASE_TIMEOUT",
            f"{DEFAULT_POOL_UNUSED_RELEASE_TIMEOUT.total_seconds():g}s",
            parse_duration,
        )
        cluster_id = read("CLUSTER_ID", DEFAULT_CLUSTER_ID, parse_text)
        if problems:
            raise ConfigError(problems)
        assert node_name is not None and xds_address is not None and ca_address is not None
        assert root_cert is not None and token_file is not None and inpod_uds is not None
        assert admin_addr is not None and metrics_addr is not None and readiness_addr is not None
        assert deadline is not None and log_format is not None and log_level is not None
        assert secret_ttl is not None and max_streams is not None and release is not None
        assert cluster_id is not None
        return cls(
            node_name=node_name,
            xds_address=xds_address,
            ca_address=ca_address,
            root_cert=root_cert,
            node_token_file=token_file,
            inpod_uds=inpod_uds,
            admin_addr=admin_addr,
            metrics_addr=metrics_addr,
            readiness_addr=readiness_addr,
            connection_termination_deadline=deadline,
            log_format=log_format,
            log_level=log_level,
            secret_ttl=secret_ttl,
            pool_max_streams_per_connection=max_streams,
            pool_unused_release_timeout=release,
            cluster_id=cluster_id,
        )
