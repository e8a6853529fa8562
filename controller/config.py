"""loom-controller settings: one frozen `Config`, built from command-line flags and environment variables.

Every setting has a flag and an environment variable (`LOOM_<NAME>`); a flag wins over the variable,
the variable over the default. Repeatable flags (`--config-dir`, `--tls-dns-name`, ...) replace the
default when given at least once; their variables take comma-separated lists (`LOOM_CONFIG_DIR` takes
`os.pathsep`-separated paths). `Config.from_args` reports every invalid setting at once, each as
`NAME=value is not valid: reason`, then raises `ConfigError`. Nothing reads `os.environ` but `main`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from controller.auth import parse_trusted_account
from loom.identity import DEFAULT_TRUST_DOMAIN

T = TypeVar("T")

# --- defaults, each with its reason --------------------------------------------------------------
# Where the CA root, the node credential key and the root-cert.pem for node proxies are kept; /var/lib
# is where a daemon's persistent state belongs (in Kubernetes, mount a volume or use --cacerts-dir).
DEFAULT_STATE_DIR = "/var/lib/loom/controller"
# Istio's port for xDS + CA over TLS: node proxies configured for istiod work unchanged.
DEFAULT_GRPC_ADDR = "0.0.0.0:15012"
# Istio's istiod monitoring port (/metrics); /ready is served there too.
DEFAULT_HTTP_ADDR = "0.0.0.0:15014"
# Istio's root namespace: mesh-wide policies live there, and the controller's own identity.
DEFAULT_ROOT_NAMESPACE = "istio-system"
# Istio's default CLUSTER_ID; it is part of every workload resource name.
DEFAULT_CLUSTER_ID = "Kubernetes"
# Istio's DEFAULT_WORKLOAD_CERT_TTL and MAX_WORKLOAD_CERT_TTL.
DEFAULT_CERT_TTL = "24h"
DEFAULT_MAX_CERT_TTL = "2160h"
# The name node proxies use for the controller's Service inside the cluster.
DEFAULT_TLS_DNS_NAMES = ("loom-controller.istio-system.svc",)
# The node proxies' service account in an Istio-style install (Istio's CA_TRUSTED_NODE_ACCOUNTS).
DEFAULT_TRUSTED_NODE_ACCOUNTS = ("istio-system/ztunnel",)
# A burst of config changes becomes one push once 10 ms pass without a new one...
DEFAULT_DEBOUNCE = "10ms"
# ...but a continuous stream of changes still reaches the proxies at least every 100 ms.
DEFAULT_MAX_PUSH_DELAY = "100ms"
DEFAULT_LOG_LEVEL = "info"
# The image of the waypoint Deployments the controller creates with --deploy-waypoints (Kubernetes).
DEFAULT_WAYPOINT_IMAGE = "loom:latest"

LOG_LEVELS = ("debug", "info", "warning", "error", "none")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAMESPACE = re.compile(rf"^{_DNS_LABEL}$")


class ConfigError(Exception):
    """Invalid settings; `problems` lists every one of them."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of loom-controller."""

    # Configuration source: YAML directories/files (the lab, local runs) or the Kubernetes API.
    config_dirs: tuple[Path, ...]
    kubernetes: bool
    # Persistent state: self-signed CA, node credential key, published root-cert.pem.
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    # Intermediate signing CA in Istio's cacerts layout; None = self-signed root in state_dir.
    cacerts_dir: Path | None = None
    grpc_addr: HostPort = HostPort("0.0.0.0", 15012)
    http_addr: HostPort = HostPort("0.0.0.0", 15014)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    cluster_id: str = DEFAULT_CLUSTER_ID
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_cert_ttl: dt.timedelta = dt.timedelta(days=90)
    # Names in the controller's serving certificate besides its SPIFFE ID.
    tls_dns_names: tuple[str, ...] = DEFAULT_TLS_DNS_NAMES
    tls_ips: tuple[str, ...] = ()
    trusted_node_accounts: tuple[tuple[str, str], ...] = (("istio-system", "ztunnel"),)
    debounce: float = 0.01  # seconds
    max_push_delay: float = 0.1  # seconds
    # Default level, then per-scope overrides ("xds" -> "debug").
    log_level: str = DEFAULT_LOG_LEVEL
    log_scopes: Mapping[str, str] = field(default_factory=dict)
    # Waypoints (controller/waypoints): run each waypoint Gateway as a ServiceAccount, Deployment and
    # Service, written to the Kubernetes API, or in directory mode into the lab store `lab_store`.
    deploy_waypoints: bool = False
    waypoint_image: str = DEFAULT_WAYPOINT_IMAGE
    waypoint_command: tuple[str, ...] = ()  # () = loom-waypoint (in the lab: next to this Python)
    waypoint_xds_address: HostPort | None = None  # None = derived from the gRPC listen address
    lab_store: Path | None = None

    @classmethod
    def from_args(cls, argv: Sequence[str], env: Mapping[str, str]) -> Config:
        return _Builder(argv, env).build()

    @property
    def serving_ips(self) -> tuple[str, ...]:
        """IP SANs of the serving certificate: the configured ones plus a specific listen address."""
        ips = list(self.tls_ips)
        host = self.grpc_addr.host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return tuple(ips)
        if not address.is_unspecified and host not in ips:
            ips.append(host)
        return tuple(ips)


# --- value parsers: each raises ValueError with the reason ---------------------------------------


def parse_duration(text: str) -> dt.timedelta:
    """Go-style durations: 10ms, 1.5s, 24h, 1h30m."""
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError("expected a duration such as 10ms, 30s, 24h or 1h30m")
    return dt.timedelta(seconds=seconds)


def parse_host_port(text: str) -> HostPort:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected <host>:<port>, e.g. 0.0.0.0:15012 or [::]:15012")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError("only IPv6 addresses go in brackets")
    elif ":" in host:
        raise ValueError("an IPv6 address must be in brackets, e.g. [::1]:15012")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be a number from 0 to 65535 (0 picks a free port)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _DNS_NAME.match(host.lower()):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return HostPort(host, int(port_text))


def parse_dns_name(text: str) -> str:
    if len(text) > 253 or not _DNS_NAME.match(text):
        raise ValueError("expected a lowercase DNS name")
    return text


def parse_ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def parse_trust_domain(text: str) -> str:
    if not text or len(text) > 255 or not re.fullmatch(r"[a-z0-9._-]+", text):
        raise ValueError("expected lowercase letters, digits, '.', '-' and '_' (a SPIFFE trust domain)")
    return text


def parse_namespace(text: str) -> str:
    if not _NAMESPACE.match(text):
        raise ValueError("expected a Kubernetes namespace name (a lowercase DNS label)")
    return text


def parse_cluster_id(text: str) -> str:
    if not text or "/" in text or any(c.isspace() for c in text):
        raise ValueError("expected a non-empty name without '/' or spaces")
    return text


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def parse_log_level(text: str) -> tuple[str, dict[str, str]]:
    """'info' or 'xds:debug,ca:warning,info' -> (default level, {scope: level})."""
    default, scopes = DEFAULT_LOG_LEVEL, {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        scope, _, level = item.rpartition(":")
        level = "warning" if level == "warn" else level
        if level not in LOG_LEVELS:
            raise ValueError(f"level {level!r} is not one of {', '.join(LOG_LEVELS)}")
        if scope:
            scopes[scope] = level
        else:
            default = level
    return default, scopes


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message)


def argument_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loom-controller", allow_abbrev=False, description="loom control plane: xDS and CA")
    p.add_argument("--config-dir", action="append", help="YAML directory or file to serve (repeatable)")
    p.add_argument("--kubernetes", action="store_true", default=None, help="read the Kubernetes API")
    p.add_argument("--state-dir", help=f"persistent state (default {DEFAULT_STATE_DIR})")
    p.add_argument("--cacerts-dir", help="intermediate CA in Istio's cacerts layout (default: self-signed)")
    p.add_argument("--grpc-addr", help=f"xDS + CA TLS listen address (default {DEFAULT_GRPC_ADDR})")
    p.add_argument("--http-addr", help=f"/ready and /metrics listen address (default {DEFAULT_HTTP_ADDR})")
    p.add_argument("--trust-domain", help=f"SPIFFE trust domain (default {DEFAULT_TRUST_DOMAIN})")
    p.add_argument("--root-namespace", help=f"mesh root namespace (default {DEFAULT_ROOT_NAMESPACE})")
    p.add_argument("--cluster-id", help=f"cluster name in resource names (default {DEFAULT_CLUSTER_ID})")
    p.add_argument("--cert-ttl", help=f"default workload certificate lifetime (default {DEFAULT_CERT_TTL})")
    p.add_argument("--max-cert-ttl", help=f"longest certificate lifetime (default {DEFAULT_MAX_CERT_TTL})")
    p.add_argument("--tls-dns-name", action="append", help="DNS SAN of the serving certificate (repeatable)")
    p.add_argument("--tls-ip", action="append", help="IP SAN of the serving certificate (repeatable)")
    p.add_argument("--trusted-node-account", action="append", help="<ns>/<sa> of node proxies (repeatable)")
    p.add_argument("--debounce", help=f"quiet time before a push (default {DEFAULT_DEBOUNCE})")
    p.add_argument("--max-push-delay", help=f"longest push delay (default {DEFAULT_MAX_PUSH_DELAY})")
    p.add_argument("--log-level", help="level, or scope:level list, e.g. info,xds:debug (default info)")
    p.add_argument("--deploy-waypoints", action="store_true", default=None, help="run waypoint Gateways")
    p.add_argument("--waypoint-image", help=f"waypoint container image (default {DEFAULT_WAYPOINT_IMAGE})")
    p.add_argument("--waypoint-command", help="waypoint command line (default loom-waypoint)")
    p.add_argument("--waypoint-xds-address", help="controller address waypoints dial (default: derived)")
    p.add_argument("--lab-store", help="lab object store to deploy waypoints into (directory mode)")
    return p


class _Builder:
    """Resolves each setting from flag, then variable, then default, collecting every problem."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        try:
            self.args, unknown = argument_parser().parse_known_args(list(argv))
        except _ArgumentError as e:
            raise ConfigError([str(e)]) from e
        self.problems += [f"unknown argument {u!r}" for u in unknown]
        self.given: dict[str, str] = {}  # flag -> "NAME=raw value" as the user wrote it

    def _raw(self, flag: str) -> tuple[str, Any] | None:
        """(name for messages, raw value) from the flag or else the variable; None if neither is set."""
        value = getattr(self.args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            return flag, value
        variable = "LOOM_" + flag.lstrip("-").replace("-", "_").upper()
        if variable in self.env:
            return variable, self.env[variable]
        return None

    def one(self, flag: str, default: str, parse: Callable[[str], T]) -> T | None:
        name, raw = self._raw(flag) or (flag, default)
        self.given[flag] = f"{name}={raw}"
        try:
            return parse(raw)
        except ValueError as e:
            self.problems.append(f"{name}={raw} is not valid: {e}")
            return None

    def many(
        self,
        flag: str,
        default: Sequence[str],
        parse: Callable[[str], T],
        sep: str = ",",
        required: bool = False,
    ) -> tuple[T, ...]:
        found = self._raw(flag)
        if found is None:
            name, items = flag, list(default)
        elif isinstance(found[1], list):
            name, items = found[0], found[1]
        else:
            name, items = found[0], [i.strip() for i in str(found[1]).split(sep) if i.strip()]
        if required and not items:
            self.problems.append(f"{name} is not valid: at least one value is needed")
        values = []
        for raw in items:
            try:
                values.append(parse(raw))
            except ValueError as e:
                self.problems.append(f"{name}={raw} is not valid: {e}")
        return tuple(values)

    def build(self) -> Config:
        config_dirs = self.many("--config-dir", (), Path, sep=os.pathsep)
        kubernetes = self.one("--kubernetes", "false", parse_bool) if self.args.kubernetes is None else True
        if bool(config_dirs) == bool(kubernetes):
            self.problems.append(
                "exactly one configuration source is needed: --config-dir <path> (repeatable) or --kubernetes"
            )
        cacerts = self.one("--cacerts-dir", "", lambda s: Path(s) if s else None)
        cert_ttl = self.one("--cert-ttl", DEFAULT_CERT_TTL, _positive(parse_duration))
        max_cert_ttl = self.one("--max-cert-ttl", DEFAULT_MAX_CERT_TTL, _positive(parse_duration))
        if cert_ttl and max_cert_ttl and cert_ttl > max_cert_ttl:
            self.problems.append(
                f"{self.given['--cert-ttl']} is not valid: longer than {self.given['--max-cert-ttl']}"
            )
        debounce = self.one("--debounce", DEFAULT_DEBOUNCE, parse_duration)
        max_delay = self.one("--max-push-delay", DEFAULT_MAX_PUSH_DELAY, _positive(parse_duration))
        if debounce is not None and max_delay is not None and debounce > max_delay:
            self.problems.append(
                f"{self.given['--debounce']} is not valid: longer than {self.given['--max-push-delay']}"
            )
        log = self.one("--log-level", DEFAULT_LOG_LEVEL, parse_log_level)
        trusted = self.many(
            "--trusted-node-account", DEFAULT_TRUSTED_NODE_ACCOUNTS, parse_trusted_account, required=True
        )
        deploy_waypoints = (
            self.one("--deploy-waypoints", "false", parse_bool)
            if self.args.deploy_waypoints is None
            else True
        )
        lab_store = self.one("--lab-store", "", lambda s: Path(s) if s else None)
        if kubernetes and lab_store is not None:
            self.problems.append(
                f"{self.given['--lab-store']} is not valid: the lab store is for directory mode"
            )
        if lab_store is not None and config_dirs and not any(_same_path(lab_store, d) for d in config_dirs):
            self.problems.append(
                f"{self.given['--lab-store']} is not valid: it must be one of the --config-dir paths (the "
                "controller reads back what it writes there)"
            )
        if deploy_waypoints and not kubernetes and config_dirs and lab_store is None:
            self.problems.append(
                "--deploy-waypoints (LOOM_DEPLOY_WAYPOINTS) needs --lab-store in directory mode (the lab's "
                "LAB_DIR/config, where the waypoint's Deployment is written for the lab to run)"
            )
        fields: dict[str, Any] = {
            "config_dirs": config_dirs,
            "kubernetes": bool(kubernetes),
            "state_dir": self.one("--state-dir", DEFAULT_STATE_DIR, _path),
            "cacerts_dir": cacerts,
            "grpc_addr": self.one("--grpc-addr", DEFAULT_GRPC_ADDR, parse_host_port),
            "http_addr": self.one("--http-addr", DEFAULT_HTTP_ADDR, parse_host_port),
            "trust_domain": self.one("--trust-domain", DEFAULT_TRUST_DOMAIN, parse_trust_domain),
            "root_namespace": self.one("--root-namespace", DEFAULT_ROOT_NAMESPACE, parse_namespace),
            "cluster_id": self.one("--cluster-id", DEFAULT_CLUSTER_ID, parse_cluster_id),
            "cert_ttl": cert_ttl,
            "max_cert_ttl": max_cert_ttl,
            "tls_dns_names": self.many("--tls-dns-name", DEFAULT_TLS_DNS_NAMES, parse_dns_name),
            "tls_ips": self.many("--tls-ip", (), parse_ip),
            "trusted_node_accounts": trusted,
            "debounce": debounce.total_seconds() if debounce is not None else None,
            "max_push_delay": max_delay.total_seconds() if max_delay is not None else None,
            "log_level": log[0] if log else None,
            "log_scopes": log[1] if log else None,
            "deploy_waypoints": bool(deploy_waypoints),
            "waypoint_image": self.one("--waypoint-image", DEFAULT_WAYPOINT_IMAGE, _nonempty),
            "waypoint_command": self.one("--waypoint-command", "", parse_command),
            "waypoint_xds_address": self.one(
                "--waypoint-xds-address", "", lambda s: parse_host_port(s) if s else None
            ),
            "lab_store": lab_store,
        }
        if self.problems:
            raise ConfigError(self.problems)
        return Config(**fields)


def parse_command(text: str) -> tuple[str, ...]:
    """A command line in shell syntax (quotes allowed, nothing expanded); "" = the default."""
    try:
        return tuple(shlex.split(text))
    except ValueError as e:
        raise ValueError(f"not a command line: {e}") from None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _path(text: str) -> Path:
    if not text:
        raise ValueError("empty path")
    return Path(text)


def _positive(parse: Callable[[str], dt.timedelta]) -> Callable[[str], dt.timedelta]:
    def checked(text: str) -> dt.timedelta:
        value = parse(text)
        if value <= dt.timedelta(0):
            raise ValueError("must be longer than zero")
        return value

    return checked
