"""HBONE: TCP tunnelled over HTTP/2 CONNECT inside TLS 1.3 mTLS with SPIFFE identities.

Used by the ztunnel (inbound server on each pod's port 15008, outbound pool) and by the waypoint.

Modules:

* `tls`: SSL contexts from a WorkloadCertificate, peer identity extraction and checks.
* `headers`: builders and bounded parsers of `forwarded`, `baggage`, `traceparent`.
* `protocol`: sans-IO CONNECT validation, the inbound frame scanner (flood limits), rapid-reset counting.
* `connection`: the asyncio HTTP/2 endpoint and tunnel streams with end-to-end back-pressure.
* `server`: `HboneServer` on caller-created listening sockets, `Decision`/`TunnelRequest`.
* `client`: `ConnectionPool`, `Tunnel`, `pump`, `pump_socket`.
* `limits`, `stats`, `errors`: tunables with reasons, counters by reason, the exception hierarchy.
"""

from loom.hbone.client import (
    ClientConnection,
    ConnectionPool,
    PoolKey,
    PumpResult,
    SocketFactory,
    Tunnel,
    default_socket_factory,
    pump,
    pump_socket,
)
from loom.hbone.connection import configure_tcp
from loom.hbone.errors import (
    CONNECT_TIMEOUT_HINT,
    AlpnMismatch,
    HboneConnectionError,
    HboneConnectTimeout,
    HboneError,
    HboneProtocolViolation,
    HboneRejected,
    IdentityMismatch,
    PeerCertificateError,
    StreamRefused,
    TrustDomainMismatch,
    TunnelReset,
)
from loom.hbone.headers import (
    BaggageFields,
    build_baggage,
    build_forwarded,
    build_traceparent,
    parse_baggage,
    parse_forwarded,
    parse_traceparent,
)
from loom.hbone.limits import ClientLimits, ServerLimits
from loom.hbone.protocol import (
    BadRequest,
    ConnectTarget,
    RejectReason,
    parse_authority,
    parse_connect_request,
)
from loom.hbone.server import (
    IPV6_UNAVAILABLE,
    CertificateProvider,
    Decision,
    Handler,
    HboneServer,
    ServerConnection,
    ServerStream,
    ServerTunnel,
    StreamHandler,
    TunnelRequest,
    TunnelResult,
    UpstreamConnector,
    listening_socket,
)
from loom.hbone.stats import HboneStats
from loom.hbone.tls import (
    ContextCache,
    client_context,
    identity_from_certificate,
    peer_identity,
    server_context,
)

__all__ = [
    "CONNECT_TIMEOUT_HINT",
    "IPV6_UNAVAILABLE",
    "AlpnMismatch",
    "BadRequest",
    "BaggageFields",
    "CertificateProvider",
    "ClientConnection",
    "ClientLimits",
    "ConnectTarget",
    "ConnectionPool",
    "ContextCache",
    "Decision",
    "Handler",
    "HboneConnectTimeout",
    "HboneConnectionError",
    "HboneError",
    "HboneProtocolViolation",
    "HboneRejected",
    "HboneServer",
    "HboneStats",
    "IdentityMismatch",
    "PeerCertificateError",
    "PoolKey",
    "PumpResult",
    "RejectReason",
    "ServerConnection",
    "ServerLimits",
    "ServerStream",
    "ServerTunnel",
    "SocketFactory",
    "StreamHandler",
    "StreamRefused",
    "TrustDomainMismatch",
    "Tunnel",
    "TunnelRequest",
    "TunnelReset",
    "TunnelResult",
    "UpstreamConnector",
    "build_baggage",
    "build_forwarded",
    "build_traceparent",
    "client_context",
    "configure_tcp",
    "default_socket_factory",
    "identity_from_certificate",
    "listening_socket",
    "parse_authority",
    "parse_baggage",
    "parse_connect_request",
    "parse_forwarded",
    "parse_traceparent",
    "peer_identity",
    "pump",
    "pump_socket",
    "server_context",
]
