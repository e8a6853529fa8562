"""What the waypoint's pure parts exchange: one HTTP request as seen by routing, authorization and
telemetry, and their answers. No I/O here; the proxy (waypoint/proxy) builds a `RequestView` per request
from the HBONE tunnel it arrived on and the HTTP messages it parsed.

The waypoint sits between a client's ztunnel and the destination's ztunnel: it terminates HBONE on
15008 (the CONNECT names the address the client dialled: a Service VIP:port or a workload IP:port),
knows the client's SPIFFE identity from mTLS, picks the protocol from the Service port, and for each
HTTP request decides: authorize (DENY -> ALLOW, AUDIT logged) -> route (HTTPRoute, else the addressed
Service) -> pick an endpoint -> forward over HBONE with its own identity.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from loom.identity import Identity


class AppProtocol(enum.StrEnum):
    """How the waypoint treats a Service port (from its name prefix or appProtocol)."""

    HTTP = "http"  # HTTP/1.1 (and h2c upgrade is not supported: treated as HTTP/1.1)
    HTTP2 = "http2"  # HTTP/2 prior knowledge
    GRPC = "grpc"  # HTTP/2 with gRPC framing (status from grpc-status trailers)
    TCP = "tcp"  # anything else: L4 only (policy on the L4 attributes), bytes spliced


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A Service as the waypoint knows it (from the controller's Address resources)."""

    namespace: str
    name: str
    hostname: str  # <name>.<namespace>.svc.cluster.local
    port: int  # the Service port the client addressed
    target_port: int  # the port on the endpoints
    protocol: AppProtocol


@dataclass(frozen=True, slots=True)
class Peer:
    """The client of this request: the identity from its mTLS certificate, and its address."""

    identity: Identity | None  # None only for tests of plaintext paths; the waypoint requires mTLS
    address: str  # ip:port as the HBONE connection saw it (the client's ztunnel / pod)

    @property
    def principal(self) -> str:
        """Istio's principal form: <trust domain>/ns/<namespace>/sa/<service account>, "" if none."""
        return self.identity.principal if self.identity else ""

    @property
    def namespace(self) -> str:
        return self.identity.namespace if self.identity else ""


@dataclass(frozen=True, slots=True)
class RequestView:
    """One HTTP request. Header names are lower-case; values as received (joined for duplicates is the
    consumer's choice). `path` is already normalized (waypoint.authz.normalize_path) and is what the
    backend will receive; `raw_path` is what the client sent."""

    method: str
    authority: str  # Host (HTTP/1.1) or :authority (HTTP/2)
    path: str  # normalized, without the query
    query: str  # without the "?"; "" when absent
    raw_path: str
    headers: tuple[tuple[str, str], ...]
    protocol: str  # "HTTP/1.1" | "HTTP/2"
    grpc: bool
    source: Peer
    service: ServiceRef  # the Service the client addressed
    destination_ip: str = ""  # the VIP or workload IP from the CONNECT


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str = ""  # "<namespace>/<name>" of the deciding policy, "" when no policy decided
    reason: str = ""  # e.g. "denied by DENY policy default/x", "no ALLOW policy matched"
    audited: tuple[str, ...] = ()  # AUDIT policies that matched (logged, never block)


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """RequestHeaderModifier / ResponseHeaderModifier: set replaces, add appends, remove deletes."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 0  # extra attempts after the first; 0 = no retries
    per_try_timeout: float | None = None  # seconds
    on_status: frozenset[int] = frozenset()  # e.g. 500-599 expanded, from retry.codes
    on_reset: bool = True
    on_connect_failure: bool = True
    backoff: float = 0.025  # seconds before the first retry (doubles, jittered by the proxy)


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    service: ServiceRef
    weight: int


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to one of `backends` (weighted), after the edits."""

    backends: tuple[WeightedBackend, ...]
    route: str = ""  # "<namespace>/<name>" of the HTTPRoute, "" for the default route to the Service
    request_headers: HeaderEdits = field(default_factory=HeaderEdits)
    response_headers: HeaderEdits = field(default_factory=HeaderEdits)
    rewrite_path: str | None = None  # full replacement path (ReplaceFullPath / ReplacePrefixMatch applied)
    rewrite_authority: str | None = None
    timeout: float | None = None  # whole request, seconds (timeouts.request)
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int  # 301 or 302 (RequestRedirect statusCode)
    location: str
    route: str = ""


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int  # e.g. 404 when routes exist for the host but none matched; 500 for invalid backends
    body: bytes = b""
    route: str = ""


RouteAction = Forward | Redirect | DirectResponse


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A backend pod of a Service, reached over HBONE at ip:15008 with CONNECT ip:target_port."""

    ip: str
    port: int  # target port
    identity: Identity  # the pod's SPIFFE identity, verified on the HBONE connection
    workload: str = ""  # workload name for telemetry
    namespace: str = ""
    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


class Router(Protocol):
    """waypoint.routing: HTTPRoutes (and the default route to the addressed Service) -> an action."""

    def route(self, request: RequestView) -> RouteAction: ...


class Authorizer(Protocol):
    """waypoint.authz: the L7 AuthorizationPolicies that apply to this waypoint / Service."""

    def check(self, request: RequestView) -> AuthzDecision: ...


class EndpointPicker(Protocol):
    """waypoint.balancer: an endpoint of a Service (load balancing with outlier ejection)."""

    def pick(self, service: ServiceRef, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        """An endpoint not in `exclude` (ips already tried by this request), None when none is left."""
        ...

    def report(self, endpoint: Endpoint, success: bool) -> None:
        """The outcome of one attempt (5xx, reset or connect failure = failure), for outlier ejection."""
        ...
