"""TLS for HBONE: TLS 1.3 only, ALPN h2, no SNI, mutual authentication with SPIFFE identities.

Theory of operation
-------------------
OpenSSL verifies the chain (both ways: the client requires the server's chain to lead to the mesh
roots, the server requires a client certificate leading to the same roots). It knows nothing of SPIFFE,
so the identity checks happen right after the handshake, before a single HTTP/2 byte is exchanged:

* `peer_identity()` reads the peer leaf and insists on exactly one URI SAN with the spiffe scheme
  (SPIFFE X509-SVID rules), else `PeerCertificateError`.
* The client requires that identity to be one of the expected destination identities
  (`check_server_identity`, else `IdentityMismatch`); the server requires the client to be in its
  own trust domain (`check_client_trust_domain`, else `TrustDomainMismatch`). Which identity a client
  may reach is authorization's business, later.

Hostname checks are off (identities are URIs, and HBONE sends no SNI: in-pod listeners already know
which certificate to serve). Session tickets are disabled, as in ztunnel.

Key material: Python's ssl loads keys only from files. We write the key and chain into an anonymous
memory file (memfd_create) and load it through /proc/self/fd, so the key never touches a file system.
Where memfd is unavailable, a 0600 file in a fresh 0700 private directory is used and removed right
after loading. Contexts are cached per (role, certificate serial, trust bundle), so the hot path never
re-parses keys; a rotated certificate has a new serial and gets a new context.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from loom.hbone.errors import (
    AlpnMismatch,
    IdentityMismatch,
    PeerCertificateError,
    TrustDomainMismatch,
)
from loom.identity import Identity, IdentityError, WorkloadCertificate

ALPN_H2 = "h2"
SPIFFE_PREFIX = "spiffe://"

Role = Literal["client", "server"]


@contextlib.contextmanager
def _private_pem_path(data: bytes) -> Iterator[str]:
    """A path that reads as `data` for as long as the context is open, visible to nobody else."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("loom-hbone-key", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="loom-hbone-")  # mode 0700
    try:
        path = os.path.join(directory, "identity.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _base_context(role: Role, certificate: WorkloadCertificate) -> ssl.SSLContext:
    if not certificate.chain_pem:
        raise PeerCertificateError(f"certificate for {certificate.identity} has an empty chain")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if role == "client" else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # ztunnel disables resumption: every connection proves its identity with a full handshake.
    ctx.options |= ssl.OP_NO_TICKET
    if role == "server":
        ctx.num_tickets = 0
    try:
        ctx.load_verify_locations(cadata=certificate.roots_pem)
    except (ssl.SSLError, ValueError) as e:
        raise PeerCertificateError(f"trust bundle for {certificate.identity} is not usable: {e}") from e
    pem = (certificate.key_pem + "".join(certificate.chain_pem)).encode("ascii")
    try:
        with _private_pem_path(pem) as path:
            ctx.load_cert_chain(path)
    except (ssl.SSLError, OSError) as e:
        raise PeerCertificateError(f"key or chain for {certificate.identity} is not usable: {e}") from e
    return ctx


class ContextCache:
    """SSL contexts per (role, certificate serial, trust bundle digest), least recently used evicted."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._contexts: OrderedDict[tuple[Role, int, str, bytes], ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, role: Role, certificate: WorkloadCertificate) -> ssl.SSLContext:
        roots_digest = hashlib.sha256(certificate.roots_pem.encode("utf-8", "replace")).digest()
        key = (role, certificate.serial, str(certificate.identity), roots_digest)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is not None:
                self._contexts.move_to_end(key)
                return ctx
        ctx = _base_context(role, certificate)
        with self._lock:
            self._contexts[key] = ctx
            while len(self._contexts) > self._capacity:
                self._contexts.popitem(last=False)
        return ctx

    def __len__(self) -> int:
        return len(self._contexts)


_default_cache = ContextCache()


def client_context(certificate: WorkloadCertificate, cache: ContextCache | None = None) -> ssl.SSLContext:
    """TLS 1.3 client context presenting `certificate`, verifying servers against its trust bundle."""
    return (cache if cache is not None else _default_cache).get("client", certificate)


def server_context(certificate: WorkloadCertificate, cache: ContextCache | None = None) -> ssl.SSLContext:
    """TLS 1.3 server context presenting `certificate` and requiring a client certificate."""
    return (cache if cache is not None else _default_cache).get("server", certificate)


def identity_from_certificate(der: bytes) -> Identity:
    """The SPIFFE identity of a DER certificate: exactly one URI SAN, spiffe scheme, workload form."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise PeerCertificateError(f"peer certificate is not valid DER: {e}") from e
    try:
        constraints = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as e:
        raise PeerCertificateError(f"peer certificate has malformed extensions: {e}") from e
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        raise PeerCertificateError("peer leaf certificate is a CA certificate (SPIFFE leaves must not be)")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerCertificateError(
            "peer certificate has no subjectAltName (need one spiffe:// URI)"
        ) from None
    except ValueError as e:
        raise PeerCertificateError(f"peer certificate has a malformed subjectAltName: {e}") from e
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerCertificateError(
            f"peer certificate has {len(uris)} URI SANs, need exactly one spiffe:// URI"
        )
    uri = uris[0]
    if not uri.startswith(SPIFFE_PREFIX):
        raise PeerCertificateError(f"peer certificate URI SAN {uri!r} is not a spiffe:// ID")
    try:
        return Identity.parse(uri)
    except IdentityError as e:
        raise PeerCertificateError(f"peer certificate: {e}") from e


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """The SPIFFE identity in the peer's leaf certificate of an established TLS session."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerCertificateError("peer presented no certificate")
    return identity_from_certificate(der)


def check_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN_H2:
        raise AlpnMismatch(f"TLS peer negotiated ALPN {selected!r}, HBONE needs {ALPN_H2!r}")


def check_server_identity(actual: Identity, expected: Collection[Identity]) -> None:
    """Client side: the server must be one of the identities the destination may have."""
    if actual not in expected:
        raise IdentityMismatch(actual, frozenset(expected))


def check_client_trust_domain(actual: Identity, own: Identity) -> None:
    """Server side: only clients of our own trust domain may open tunnels."""
    if actual.trust_domain != own.trust_domain:
        raise TrustDomainMismatch(actual, own.trust_domain)
