"""What the data path needs from the rest of the waypoint, beyond the Router / Authorizer /
EndpointPicker of waypoint.model: where a CONNECT target leads, L4 policy, path normalization, and
where requests and refusals are reported.

Each is a small Protocol or callable so the owner can wire the real parts (waypoint.routing,
waypoint.authz, waypoint.paths, waypoint.telemetry) and tests can pass plain functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from waypoint.model import AuthzDecision, Endpoint, Peer, RequestView, ServiceRef


@dataclass(frozen=True, slots=True)
class Destination:
    """What a CONNECT target (the address the client dialled) leads to."""

    service: ServiceRef
    # Set when the client addressed one workload (its pod ip:port) rather than a Service VIP: requests
    # routed to `service` then go to this endpoint instead of a picked one.
    endpoint: Endpoint | None = None


class DownstreamReader(Protocol):
    """The client's bytes: the HBONE stream itself (loom.hbone.ServerStream) or, in tests, an
    asyncio.StreamReader. read() returns b"" at the end."""

    async def read(self, n: int, /) -> bytes: ...


class DownstreamWriter(Protocol):
    """Bytes to the client, with a socket writer's semantics: close() is graceful (what was written
    is still sent), writes after it are dropped, drain() waits for room and raises if the stream failed."""

    def write(self, data: bytes, /) -> None: ...

    async def drain(self) -> None: ...

    def write_blocked(self) -> bool:
        """True while drain() would wait (over the high-water mark) or raise (the stream failed)."""
        ...

    def close(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def is_closing(self) -> bool: ...


class ServiceResolver(Protocol):
    """Maps the CONNECT :authority (a Service VIP:port or a workload ip:port) to its destination."""

    def resolve(self, ip: str, port: int) -> Destination | None:
        """None when this waypoint serves no such address (the tunnel is refused)."""
        ...


@dataclass(frozen=True, slots=True)
class TunnelView:
    """One L4 tunnel to a TCP Service port, as L4 policy sees it."""

    source: Peer
    service: ServiceRef
    destination_ip: str  # the VIP or workload IP from the CONNECT
    destination_port: int


# L4 policy for TCP Services (the HTTP ones are authorized per request by model.Authorizer).
L4Authorizer = Callable[[TunnelView], AuthzDecision]

# Path normalization (waypoint.paths): the raw request target -> (normalized path, query without "?").
# Raises ValueError, whose message names what is wrong, for a target that must be refused (400).
Normalizer = Callable[[str], tuple[str, str]]


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request that got as far as a RequestView, with its outcome (metrics, access log).
    Not frozen, though nobody changes it: one is made per request, and freezing fifteen fields
    doubles the cost of making it."""

    view: RequestView
    start_time: float  # wall clock (time.time()) when the request head was complete
    duration: float  # seconds from the request head to the last byte sent to the client
    response_code: int  # what the client got; 0 when no response was sent (client went away, reset)
    response_flags: str  # Envoy's: "-", UH, UF, UO, UT, UC, URX, DC, NR...
    response_code_details: str  # Envoy-style: via_upstream, rbac_access_denied_matched_policy[...]...
    request_bytes: int  # request body bytes received from the client
    response_bytes: int  # response body bytes sent to the client
    route: str = ""  # "<namespace>/<name>" of the HTTPRoute that decided, "" for the default route
    authz: AuthzDecision | None = None
    backend: ServiceRef | None = None  # the Service the request was sent to (after routing)
    endpoint: Endpoint | None = None  # the endpoint of the last attempt
    attempts: int = 0  # upstream attempts made (1 + retries)
    grpc_status: str | None = None  # from the trailers (or a trailers-only response)
    upstream_protocol: str = ""  # "HTTP/1.1" | "HTTP/2" towards the backend


@dataclass(frozen=True, slots=True)
class RefusedRequest:
    """A request answered locally because its head or body was malformed (before routing), for the
    access log: what is known of it, and the answer."""

    start_time: float  # Unix seconds
    protocol: str  # "HTTP/1.1" | "HTTP/2"
    status: int  # the answer sent (400, 408, 413, 431, ...)
    details: str  # %RESPONSE_CODE_DETAILS%: "http1.<reason>", "http2.<reason>", "path_normalization_failed"
    peer_address: str  # the client's address
    destination: str  # the ip:port the client dialled (the Service VIP or the pod)
    method: str = ""  # known when the head was parsed
    path: str = ""
    authority: str = ""


@dataclass(frozen=True, slots=True)
class TunnelRecord:
    """One L4 tunnel through the waypoint (TCP Services), when it ended or was refused."""

    view: TunnelView
    start_time: float
    duration: float
    received: int  # bytes from the client
    sent: int  # bytes to the client
    response_flags: str  # "-", DENY, UH, UF
    endpoint: Endpoint | None = None
    error: str | None = None
    authz: AuthzDecision | None = None


class RequestObserver(Protocol):
    """Telemetry: per request, per tunnel, and every refusal of bad input by reason."""

    def record(self, record: RequestRecord) -> None: ...

    def record_tunnel(self, record: TunnelRecord) -> None: ...

    def refused(self, reason: str, request: RefusedRequest | None = None) -> None:
        """A protocol-level refusal (400/431/RST/GOAWAY...) that never reached routing or a backend;
        `request` when it was a request answered with a status (it gets an access log line)."""
        ...
