"""The metadata headers of an HBONE CONNECT: `forwarded`, `baggage` and `traceparent`.

ztunnel's shapes (see the project's reference notes, HBONE request shape):

    forwarded   = for="<client ip:port>"[;host=<service FQDN>]
    baggage     = k8s.cluster.name=..,k8s.namespace.name=..,k8s.<type>.name=..,service.name=..,
                  service.version=..[,cloud.region=..][,cloud.availability_zone=..]
    traceparent = 00-<32 hex trace id>-<16 hex parent id>-00   (random per connection)

The builders produce exactly those; the parsers accept what a peer may send and are bounded (they
run on untrusted input): they never raise on malformed text, they return what they could read.
Identity never comes from these headers; only mTLS says who the peer is.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

FORWARDED = "forwarded"
BAGGAGE = "baggage"
TRACEPARENT = "traceparent"

# W3C baggage limits: 8192 bytes and 180 list members in total.
MAX_BAGGAGE_BYTES = 8192
MAX_BAGGAGE_MEMBERS = 180
MAX_FORWARDED_BYTES = 1024

# Bytes allowed unescaped in a baggage value: W3C baggage-octet minus "%" (so values round-trip).
_BAGGAGE_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"

WORKLOAD_TYPES = frozenset({"deployment", "cronjob", "pod", "job", "daemonset", "statefulset", "replicaset"})


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def format_address(ip: str | IPAddress, port: int) -> str:
    """ip:port, with IPv6 addresses in brackets ([::1]:80), as an HTTP authority and Envoy's logs write
    them. A str is an IP literal as sockets and the parsed configuration give it (not re-parsed)."""
    if isinstance(ip, str):
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def build_forwarded(client_ip: str, client_port: int, host: str | None = None) -> str:
    """`for="ip:port"` (RFC 7239: quoted, since it carries a port), plus `;host=` when a service is known."""
    if not 0 <= client_port <= 65535:
        raise ValueError(f"client port {client_port} is out of range 0..65535")
    value = f'for="{format_address(ipaddress.ip_address(client_ip), client_port)}"'
    if host:
        if not _is_token(host):
            raise ValueError(f"forwarded host {host!r} must be a DNS name (RFC 7230 token characters)")
        value += f";host={host}"
    return value


def _is_token(text: str) -> bool:
    return bool(text) and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in text)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What we understand of a peer's `forwarded` header (first element only)."""

    for_: str | None = None  # the node value, unquoted ("10.0.0.1:3456", "[::1]:80")
    host: str | None = None


def parse_forwarded(value: str) -> Forwarded:
    """The `for` and `host` parameters of the first forwarded-element; unknown parameters are ignored."""
    if len(value) > MAX_FORWARDED_BYTES:
        value = value[:MAX_FORWARDED_BYTES]
    first = value.split(",", 1)[0]
    found: dict[str, str] = {}
    for pair in first.split(";"):
        name, sep, raw = pair.strip().partition("=")
        if not sep:
            continue
        name = name.strip().lower()
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
            raw = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if name in ("for", "host") and name not in found:
            found[name] = raw
    return Forwarded(for_=found.get("for"), host=found.get("host"))


@dataclass(frozen=True, slots=True)
class BaggageFields:
    """The workload description ztunnel puts into `baggage` (source on requests, destination on 200s)."""

    cluster: str
    namespace: str
    workload_type: str  # deployment|cronjob|pod|job (lower-cased WorkloadType)
    workload_name: str
    service_name: str
    service_version: str
    region: str | None = None
    zone: str | None = None


def build_baggage(fields: BaggageFields) -> str:
    workload_type = fields.workload_type.lower()
    if workload_type not in WORKLOAD_TYPES:
        raise ValueError(f"workload type {fields.workload_type!r} is not one of {sorted(WORKLOAD_TYPES)}")
    members = [
        ("k8s.cluster.name", fields.cluster),
        ("k8s.namespace.name", fields.namespace),
        (f"k8s.{workload_type}.name", fields.workload_name),
        ("service.name", fields.service_name),
        ("service.version", fields.service_version),
    ]
    if fields.region:
        members.append(("cloud.region", fields.region))
    if fields.zone:
        members.append(("cloud.availability_zone", fields.zone))
    return ",".join(f"{k}={quote(v, safe=_BAGGAGE_SAFE)}" for k, v in members)


def parse_baggage(value: str) -> dict[str, str]:
    """Baggage members as a dict (first occurrence wins; properties after ';' dropped; values
    percent-decoded). Oversized input is cut at the W3C limits instead of failing."""
    if len(value) > MAX_BAGGAGE_BYTES:
        value = value[:MAX_BAGGAGE_BYTES]
    result: dict[str, str] = {}
    for count, member in enumerate(value.split(",")):
        if count >= MAX_BAGGAGE_MEMBERS:
            break
        key, sep, rest = member.partition("=")
        key = key.strip()
        if not sep or not _is_token(key):
            continue
        raw = rest.split(";", 1)[0].strip()
        if key not in result:
            result[key] = unquote(raw, errors="replace")
    return result


def baggage_fields(members: Mapping[str, str]) -> BaggageFields | None:
    """The workload description from parsed baggage, or None when the required members are missing."""
    workload_type = next(
        (t for t in sorted(WORKLOAD_TYPES) if f"k8s.{t}.name" in members),
        None,
    )
    required = ("k8s.cluster.name", "k8s.namespace.name", "service.name", "service.version")
    if workload_type is None or any(k not in members for k in required):
        return None
    return BaggageFields(
        cluster=members["k8s.cluster.name"],
        namespace=members["k8s.namespace.name"],
        workload_type=workload_type,
        workload_name=members[f"k8s.{workload_type}.name"],
        service_name=members["service.name"],
        service_version=members["service.version"],
        region=members.get("cloud.region"),
        zone=members.get("cloud.availability_zone"),
    )


def build_traceparent(trace_id: int | None = None, parent_id: int | None = None) -> str:
    """A W3C traceparent, version 00, not sampled; random non-zero ids unless given."""
    trace = trace_id if trace_id is not None else _random_nonzero(128)
    parent = parent_id if parent_id is not None else _random_nonzero(64)
    if not 0 < trace < 2**128 or not 0 < parent < 2**64:
        raise ValueError("traceparent ids must be non-zero and fit 128 (trace) / 64 (parent) bits")
    return f"00-{trace:032x}-{parent:016x}-00"


def _random_nonzero(bits: int) -> int:
    while True:
        value = secrets.randbits(bits)
        if value:
            return value


@dataclass(frozen=True, slots=True)
class TraceParent:
    version: int
    trace_id: int
    parent_id: int
    flags: int


def parse_traceparent(value: str) -> TraceParent | None:
    """A well-formed W3C traceparent, or None (invalid ones are ignored, as the spec asks)."""
    parts = value.strip().split("-")
    if len(parts) < 4 or [len(p) for p in parts[:4]] != [2, 32, 16, 2]:
        return None
    if not all(all(c in "0123456789abcdef" for c in p) for p in parts[:4]):
        return None
    version, trace, parent, flags = (int(p, 16) for p in parts[:4])
    if version == 0xFF or trace == 0 or parent == 0 or (version == 0 and len(parts) != 4):
        return None
    return TraceParent(version, trace, parent, flags)
