"""Reaching the controller: TLS gRPC channels, the trust root and the node credential.

Both the xDS stream and the CA calls go to the controller's one gRPC port over TLS, verified with the
mesh root (Istio's `root-cert.pem`) and the controller's name, and carry `authorization: Bearer
<credential>` plus `clusterid`. The root may be given as PEM text or as a file; a file is re-read for
every new channel, so a rotated root is picked up on the next (re)connection. The credential comes
from a callable that is called for every stream and every CSR: Kubernetes rotates projected tokens,
and a callable reading the token file (`token_from_file`) always sends the current one.

The client is grpclib: gRPC over the h2 state machine and the ssl module, both already loaded by the
data path, on the proxy's own event loop. grpcio would add its C core (its own TLS stack, six
threads and about 15 MB of resident memory per proxy) for two client calls; the controller, which
serves many proxies, keeps grpcio's server (`tests/integration/ztunnel_cp` runs one against this
client).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError

# PEM text, or a file holding it (re-read at each new channel).
RootCertificate = str | Path
TokenSource = Callable[[], str]

# Istio's default CLUSTER_ID, sent as the `clusterid` header.
DEFAULT_CLUSTER_ID = "Kubernetes"
# Projected tokens are about 1 KiB; anything far larger in the token file is a mistake, not a token.
MAX_TOKEN_BYTES = 8192


class CredentialError(Exception):
    """The root certificate or the node credential cannot be read (names the file and the cause)."""


def read_root(root: RootCertificate) -> bytes:
    if isinstance(root, Path):
        try:
            data = root.read_bytes()
        except OSError as e:
            raise CredentialError(f"cannot read the root certificate {root}: {e.strerror or e}") from e
        origin = str(root)
    else:
        data = root.encode("ascii", "replace")
        origin = "the configured root certificate"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CredentialError(f"{origin} holds no PEM certificate")
    return data


def token_from_file(path: Path) -> TokenSource:
    """A token source that reads `path` on every call (the kubelet rewrites projected tokens)."""

    def read() -> str:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CredentialError(f"cannot read the node credential {path}: {e.strerror or e}") from e
        if len(data) > MAX_TOKEN_BYTES:
            raise CredentialError(f"{path} holds {len(data)} bytes, too many for a token")
        token = data.decode("ascii", "replace").strip()
        if not token:
            raise CredentialError(f"{path} is empty")
        return token

    return read


def call_metadata(
    token_source: TokenSource, cluster_id: str = DEFAULT_CLUSTER_ID
) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer credential (fetched now) and the cluster id."""
    token = token_source().strip()
    if not token or any(c in token for c in "\r\n"):
        raise CredentialError("the node credential is empty or spans several lines")
    return (("authorization", f"Bearer {token}"), ("clusterid", cluster_id))


class BoundedProtoCodec(ProtoCodec):
    """Protobuf messages of at most `max_bytes`; a larger one fails its call with RESOURCE_EXHAUSTED,
    as grpcio's receive limit would. grpclib has no receive limit of its own: the message has been
    buffered by then, so this bounds what is decoded and kept, not that one read (the peer is the
    controller, authenticated by the mesh root)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"received message larger than max ({len(data)} vs. {self.max_bytes})",
            )
        return super().decode(data, message_type)


def tls_context(root: RootCertificate) -> ssl.SSLContext:
    """TLS 1.2+ trusting only the mesh root, checking the server's name, offering ALPN h2 (gRPC)."""
    pem = read_root(root).decode("ascii", "replace")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem)
    except ssl.SSLError as e:
        origin = str(root) if isinstance(root, Path) else "the configured root certificate"
        raise CredentialError(f"{origin} cannot be loaded: {e.reason or e}") from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def split_address(address: str) -> tuple[str, int]:
    """host:port (or [v6]:port) of the controller; ValueError naming the address when malformed."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"controller address {address!r} is not host:port")
    return host, int(port)


def secure_channel(
    address: str,
    root: RootCertificate,
    *,
    server_name: str | None = None,
    keepalive_seconds: float | None = None,
    keepalive_timeout_seconds: float = 10.0,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> Channel:
    """A TLS channel to `address` trusting only the mesh root; it connects on its first call.
    `server_name` overrides the name the controller's certificate is checked against (default: the
    host of `address`). With `keepalive_seconds`, an idle connection is pinged that often and dropped
    when a ping is not answered within `keepalive_timeout_seconds` (a powered-off controller does not
    close TCP)."""
    host, port = split_address(address)
    keepalive: dict[str, Any] = {}
    if keepalive_seconds is not None:
        # A ping every keepalive_seconds for as long as the connection lives, also when no data moves
        # (grpclib's default stops after two such pings, which would leave an idle xDS stream blind).
        keepalive = {
            "_keepalive_time": keepalive_seconds,
            "_keepalive_timeout": keepalive_timeout_seconds,
            "_keepalive_permit_without_calls": True,
            "_http2_max_pings_without_data": 0,
            "_http2_min_sent_ping_interval_without_data": keepalive_seconds,
        }
    config = Configuration(ssl_target_name_override=server_name or host, **keepalive)
    return Channel(
        host, port, ssl=tls_context(root), config=config, codec=BoundedProtoCodec(max_message_bytes)
    )


# Failures of a call that mean "the controller could not be reached or went away", as opposed to an
# answer (a refusal, a broken stream): they decide the xDS termination reason and CA retry class.
CONNECTION_STATUSES = frozenset({Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED})


def describe_call_error(error: BaseException) -> tuple[bool, str]:
    """(is a connection failure, text) for an exception out of a grpclib call."""
    if isinstance(error, GRPCError):
        return error.status in CONNECTION_STATUSES, f"{error.status.name}: {error.message}"
    if isinstance(error, TimeoutError):
        return True, "DEADLINE_EXCEEDED: no answer in time"
    if isinstance(error, ssl.SSLCertVerificationError):
        return True, f"UNAVAILABLE: the controller's certificate was refused: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return True, f"UNAVAILABLE: TLS with the controller failed: {error.reason or error}"
    if isinstance(error, (OSError, StreamTerminatedError)):
        return True, f"UNAVAILABLE: {error}"
    return False, f"{type(error).__name__}: {error}"


CALL_ERRORS = (GRPCError, StreamTerminatedError, OSError, TimeoutError)
