"""Reaching the controller: TLS gRPC channels, the trust root and the node credential.

Both the xDS stream and the CA calls go to the controller's one gRPC port over TLS, verified with the
mesh root (Istio's `root-cert.pem`), and carry `authorization: Bearer <credential>` plus `clusterid`.
The root may be given as PEM text or as a file; a file is re-read for every new channel, so a
rotated root is picked up on the next (re)connection. The credential comes from a callable that is
called for every stream and every CSR: Kubernetes rotates projected tokens, and a callable reading
the token file (`token_from_file`) always sends the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

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


def secure_channel(
    address: str,
    root: RootCertificate,
    *,
    server_name: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A TLS channel to `address` trusting only the mesh root. `server_name` overrides the name the
    controller's certificate is checked against (default: the host of `address`)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=read_root(root))
    channel_options = list(options)
    if server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=channel_options)
