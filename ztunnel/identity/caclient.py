"""Certificates from the controller's CA: CSR, CreateCertificate, and checking what came back.

The node proxy asks on behalf of a workload on its node (Istio's impersonation): a fresh EC P-256 key
per request, a CSR with an empty subject and the workload's SPIFFE ID as the only, critical, URI SAN,
and request metadata `ImpersonatedIdentity: spiffe://...`. The call carries the node credential as a
bearer token and the `clusterid` header.

Nothing the CA returns is taken on trust (`verify_issued`): the leaf's subjectAltName must be exactly
the requested SPIFFE ID (nothing more, nothing less), the leaf must certify the key this proxy just
generated, and the chain must verify, at the current time, to the configured trust roots, never to a
root the response itself supplies. Any failure raises `InvalidCertificate` and the certificate is not
used.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from loom.api import ca_pb2
from loom.identity import Identity, WorkloadCertificate
from ztunnel.identity.clock import Clock, SystemClock
from ztunnel.xds.channel import (
    CALL_ERRORS,
    DEFAULT_CLUSTER_ID,
    CredentialError,
    RootCertificate,
    TokenSource,
    call_metadata,
    describe_call_error,
    read_root,
    secure_channel,
)

CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
# Istio's SECRET_TTL default.
DEFAULT_CERT_TTL = dt.timedelta(hours=24)
# A CSR round trip is milliseconds; a CA that has not answered in 10 s is treated as unavailable.
DEFAULT_CALL_TIMEOUT_SECONDS = 10.0


class CertificateError(Exception):
    """A certificate could not be obtained."""


class CaUnavailable(CertificateError):
    """The CA could not be reached (or did not answer in time)."""


class CertificateRefused(CertificateError):
    """The CA answered with an error (for node authorization failures always the same opaque one)."""

    def __init__(self, message: str, code: Status | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidCertificate(CertificateError):
    """The CA's answer is not a certificate this proxy may use (wrong SAN, key, or chain)."""


class CertificateSource(Protocol):
    """Where the identity manager gets certificates (the CA client, or a fake in tests)."""

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate: ...


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(identity: Identity, key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM CSR: empty subject, the SPIFFE ID as the only URI SAN, critical (SPIFFE X509-SVID)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _public_bytes(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_issued(
    identity: Identity,
    key: ec.EllipticCurvePrivateKey,
    cert_chain: Sequence[str],
    roots_pem: str,
    now: dt.datetime,
) -> WorkloadCertificate:
    """Check a CA answer (`cert_chain`: leaf first, then intermediates, possibly the root last) and
    build the WorkloadCertificate; raises InvalidCertificate naming the problem."""
    certs: list[x509.Certificate] = []
    try:
        for element in cert_chain:
            certs.extend(x509.load_pem_x509_certificates(element.encode("ascii", "replace")))
        roots = x509.load_pem_x509_certificates(roots_pem.encode("ascii", "replace"))
    except ValueError as e:
        raise InvalidCertificate(f"certificate for {identity}: unreadable PEM: {e}") from e
    if not certs:
        raise InvalidCertificate(f"certificate for {identity}: the CA returned an empty chain")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise InvalidCertificate(f"certificate for {identity}: the leaf has no subjectAltName") from e
    names = list(san)
    if names != [x509.UniformResourceIdentifier(str(identity))]:
        shown = ", ".join(str(getattr(n, "value", n)) for n in names) or "nothing"
        raise InvalidCertificate(
            f"certificate for {identity}: the leaf names {shown}, not exactly {identity}"
        )
    if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
        raise InvalidCertificate(f"certificate for {identity}: the leaf does not certify the requested key")
    root_set = set(roots)
    # Roots in the response are ignored: trust comes only from the configured bundle.
    intermediates = [c for c in certs[1:] if c not in root_set and c.issuer != c.subject]
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as e:
        raise InvalidCertificate(
            f"certificate for {identity}: does not verify to the trust roots: {e}"
        ) from e
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return WorkloadCertificate(
        identity=identity,
        key_pem=key_pem,
        chain_pem=(_pem(leaf), *(_pem(c) for c in intermediates)),
        roots_pem="".join(_pem(r) for r in roots),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
    )


class CaClient:
    """CreateCertificate calls to the controller's CA (a `CertificateSource`)."""

    def __init__(
        self,
        address: str,
        root_cert: RootCertificate,
        token_source: TokenSource,
        *,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        ttl: dt.timedelta = DEFAULT_CERT_TTL,
        server_name: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT_SECONDS,
        clock: Clock | None = None,
    ) -> None:
        """`root_cert`: the mesh root as PEM text or a file (re-read per call; a change rebuilds the
        channel); it is also the trust bundle issued chains must verify to."""
        if ttl <= dt.timedelta(0):
            raise ValueError("the requested certificate lifetime must be positive")
        self._address = address
        self._root = root_cert
        self._token_source = token_source
        self._cluster_id = cluster_id
        self._ttl = ttl
        self._server_name = server_name
        self._timeout = timeout
        self._clock = clock or SystemClock()
        self._channel: Channel | None = None
        self._channel_root = b""

    def _channel_for(self, root: bytes) -> Channel:
        """The channel for this root (a changed root gets a new one); it reconnects by itself on the
        next call after a failure, and the identity manager's schedule spaces the retries."""
        if self._channel is not None and root == self._channel_root:
            return self._channel
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        # From the configured source (a file is named in errors); `root` is what was just read from it.
        self._channel = secure_channel(self._address, self._root, server_name=self._server_name)
        self._channel_root = root
        return self._channel

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        try:
            root = read_root(self._root)
            metadata = call_metadata(self._token_source, self._cluster_id)
            channel = self._channel_for(root)
        except CredentialError as e:
            raise CaUnavailable(str(e)) from e
        key = new_key()
        request = ca_pb2.IstioCertificateRequest(
            csr=build_csr(identity, key), validity_duration=int(self._ttl.total_seconds())
        )
        request.metadata.update({IMPERSONATED_IDENTITY: str(identity)})
        call = UnaryUnaryMethod(
            channel,
            CA_METHOD,
            ca_pb2.IstioCertificateRequest,
            ca_pb2.IstioCertificateResponse,
        )
        try:
            response = await call(request, metadata=metadata, timeout=self._timeout)
        except CALL_ERRORS as e:
            unreachable, text = describe_call_error(e)
            message = f"certificate for {identity}: {text}"
            if unreachable:
                raise CaUnavailable(message) from e
            raise CertificateRefused(message, e.status if isinstance(e, GRPCError) else None) from e
        return verify_issued(
            identity, key, list(response.cert_chain), root.decode("ascii", "replace"), self._clock.now()
        )

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
