"""The CA's key material and certificate issuance.

Theory of operation
-------------------
Two ways to get a signing CA, as in Istio:

* Self-signed (the default): on first start a root is generated (ECDSA P-256, 10 years, CA:true,
  O=<trust domain>) and persisted in `<state dir>/ca/` (key 0600, written atomically); later starts
  reload it, so node proxies keep trusting the same root across controller restarts. The root signs
  workload certificates directly.
* Plugged-in ("cacerts", Istio's layout): `ca-cert.pem` + `ca-key.pem` are an intermediate signing CA,
  `cert-chain.pem` its chain up to the root, `root-cert.pem` the trust bundle (it may hold several
  roots during a root rotation). Everything is checked at load: the key matches the signing cert, each
  chain element is issued by the next, the chain ends at a root of the bundle.

`sign()` trusts nothing in a CSR but its public key (after checking the CSR's self-signature and that
the key is EC P-256): the subject is empty and the only SAN is the identity the caller was authorized
for, whatever the CSR asked for. The chain returned is leaf first, root last (Istio's `cert_chain`).
Lifetimes are clamped to the configured maximum and never outlast the signing certificate.

This module only decides *what* to sign; *whether* a caller may have an identity is `service.py`'s job.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loom.identity import Identity

logger = logging.getLogger("controller.ca")

Clock = Callable[[], dt.datetime]

ROOT_TTL = dt.timedelta(days=3650)  # Istio's CITADEL_SELF_SIGNED_CA_CERT_TTL
DEFAULT_TTL = dt.timedelta(hours=24)  # Istio's DEFAULT_WORKLOAD_CERT_TTL
MAX_TTL = dt.timedelta(days=90)  # Istio's MAX_WORKLOAD_CERT_TTL
# Node clocks drift; a certificate valid from "now" would be rejected by a peer a few seconds behind.
CLOCK_SKEW = dt.timedelta(minutes=1)
# A P-256 CSR with one SAN is well under 1 KiB; anything far larger is not a CSR we would sign.
MAX_CSR_BYTES = 16 * 1024

SELF_SIGNED_DIR = "ca"
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
# Istio's plugged-in CA layout (the "cacerts" secret).
CACERTS_CERT = "ca-cert.pem"
CACERTS_KEY = "ca-key.pem"
CACERTS_ROOT = "root-cert.pem"
CACERTS_CHAIN = "cert-chain.pem"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CaError(Exception):
    """The CA's own key material is missing, inconsistent or unusable (a configuration problem)."""


class SigningError(ValueError):
    """A signing request that cannot be honoured (bad CSR, wrong key type, foreign identity)."""


@dataclass(frozen=True, slots=True)
class ServingCertificate:
    """A TLS server certificate with its private key."""

    key_pem: bytes
    chain_pem: tuple[str, ...]  # leaf first, then intermediates, root last
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def chain_bytes(self) -> bytes:
        return "".join(self.chain_pem).encode("ascii")

    def refresh_at(self) -> dt.datetime:
        """Half-life, like ztunnel's rotation of workload certificates."""
        return self.not_before + (self.not_after - self.not_before) / 2


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaError(f"{path}: not PEM certificates: {e}") from e
    return certs


def _load_key(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CaError(f"{path}: not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{path}: unsupported key type {type(key).__name__} (need EC or RSA)")
    return key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


class CertificateAuthority:
    """Signs workload and serving certificates with one signing key."""

    def __init__(
        self,
        *,
        trust_domain: str,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        default_ttl: dt.timedelta = DEFAULT_TTL,
        max_ttl: dt.timedelta = MAX_TTL,
        clock: Clock = utc_now,
    ) -> None:
        """`chain`: the signing cert first, then intermediates, the root last. `roots`: trust bundle."""
        if not chain or chain[0] != signing_cert:
            raise CaError("chain must start with the signing certificate")
        if default_ttl <= dt.timedelta(0) or max_ttl <= dt.timedelta(0):
            raise CaError("certificate lifetimes must be positive")
        self.trust_domain = trust_domain
        self.signing_cert = signing_cert
        self._key = signing_key
        self._chain_pem = tuple(_pem(c) for c in chain)
        self.roots = tuple(roots)
        self.default_ttl = min(default_ttl, max_ttl)
        self.max_ttl = max_ttl
        self._clock = clock
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(signing_cert))

    # ------------------------------------------------------------------ construction

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: str,
        *,
        default_ttl: dt.timedelta = DEFAULT_TTL,
        max_ttl: dt.timedelta = MAX_TTL,
        clock: Clock = utc_now,
    ) -> CertificateAuthority:
        """The self-signed root in `<state_dir>/ca/`, generated on first use."""
        ca_dir = state_dir / SELF_SIGNED_DIR
        cert_path, key_path = ca_dir / ROOT_CERT_FILE, ca_dir / ROOT_KEY_FILE
        if cert_path.exists():
            if not key_path.exists():
                raise CaError(
                    f"{cert_path} exists but its key {key_path} does not; restore the key, or remove "
                    f"{ca_dir} to generate a new root (every node proxy must then get the new root)"
                )
            root, key = cls._load_self_signed(cert_path, key_path, clock)
            logger.info(
                "loaded self-signed root",
                extra={"fields": {"path": str(cert_path), "serial": format(root.serial_number, "x")}},
            )
        else:
            # A key without a certificate means a first start was interrupted before the root existed,
            # so nobody can trust it yet: generating a new pair is safe.
            root, key = cls._generate_root(trust_domain, clock)
            write_private_file(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            write_private_file(cert_path, root.public_bytes(serialization.Encoding.PEM))
            os.chmod(cert_path, 0o644)
            logger.info(
                "generated self-signed root",
                extra={"fields": {"path": str(cert_path), "trust_domain": trust_domain}},
            )
        return cls(
            trust_domain=trust_domain,
            signing_cert=root,
            signing_key=key,
            chain=[root],
            roots=[root],
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            clock=clock,
        )

    @classmethod
    def from_cacerts(
        cls,
        directory: Path,
        trust_domain: str,
        *,
        default_ttl: dt.timedelta = DEFAULT_TTL,
        max_ttl: dt.timedelta = MAX_TTL,
        clock: Clock = utc_now,
    ) -> CertificateAuthority:
        """An intermediate signing CA in Istio's cacerts layout."""
        missing = [
            n
            for n in (CACERTS_CERT, CACERTS_KEY, CACERTS_ROOT, CACERTS_CHAIN)
            if not (directory / n).is_file()
        ]
        if missing:
            raise CaError(f"{directory}: missing {', '.join(missing)} (Istio cacerts layout)")
        signing_certs = _load_certs(directory / CACERTS_CERT)
        if len(signing_certs) != 1:
            raise CaError(
                f"{directory / CACERTS_CERT}: expected exactly one certificate, found {len(signing_certs)}"
            )
        signing = signing_certs[0]
        key = _load_key(directory / CACERTS_KEY)
        roots = _load_certs(directory / CACERTS_ROOT)
        chain = _load_certs(directory / CACERTS_CHAIN)
        if not roots:
            raise CaError(f"{directory / CACERTS_ROOT}: no certificate")
        if _spki(key.public_key()) != _spki(signing.public_key()):
            raise CaError(f"{directory / CACERTS_KEY}: does not match the public key of {CACERTS_CERT}")
        if not _is_ca(signing):
            raise CaError(
                f"{directory / CACERTS_CERT}: not a CA certificate (BasicConstraints CA:true missing)"
            )
        now = clock()
        if signing.not_valid_after_utc <= now:
            raise CaError(f"{directory / CACERTS_CERT}: expired at {signing.not_valid_after_utc.isoformat()}")
        if not chain or chain[0] != signing:
            chain.insert(0, signing)
        for child, parent in itertools.pairwise(chain):
            if not _issued_by(child, parent):
                raise CaError(
                    f"{directory / CACERTS_CHAIN}: {child.subject.rfc4514_string()!r} is not issued by "
                    f"the next certificate {parent.subject.rfc4514_string()!r}"
                )
        top = chain[-1]
        if top not in roots:
            issuer = next((r for r in roots if _issued_by(top, r)), None)
            if issuer is None:
                raise CaError(
                    f"{directory / CACERTS_CHAIN}: does not lead to any root in {CACERTS_ROOT} "
                    f"(top of chain: {top.subject.rfc4514_string()!r})"
                )
            chain.append(issuer)
        logger.info(
            "loaded plugged-in signing CA",
            extra={"fields": {"dir": str(directory), "subject": signing.subject.rfc4514_string()}},
        )
        return cls(
            trust_domain=trust_domain,
            signing_cert=signing,
            signing_key=key,
            chain=chain,
            roots=roots,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            clock=clock,
        )

    @staticmethod
    def _generate_root(
        trust_domain: str, clock: Clock
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        now = clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    @staticmethod
    def _load_self_signed(
        cert_path: Path, key_path: Path, clock: Clock
    ) -> tuple[x509.Certificate, SigningKey]:
        certs = _load_certs(cert_path)
        if len(certs) != 1:
            raise CaError(f"{cert_path}: expected exactly one certificate, found {len(certs)}")
        root = certs[0]
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            # Someone loosened the permissions (a copy, a restore): tighten rather than refuse to start.
            logger.warning(
                "root key was readable by others; set its mode to 0600",
                extra={"fields": {"path": str(key_path), "mode": oct(mode)}},
            )
            os.chmod(key_path, 0o600)
        key = _load_key(key_path)
        if _spki(key.public_key()) != _spki(root.public_key()):
            raise CaError(f"{key_path}: does not match the public key of {cert_path}")
        if not _is_ca(root) or not _issued_by(root, root):
            raise CaError(f"{cert_path}: not a self-signed CA certificate")
        if root.not_valid_after_utc <= clock():
            raise CaError(
                f"{cert_path}: root expired at {root.not_valid_after_utc.isoformat()}; remove "
                f"{cert_path.parent} to generate a new one (every node proxy must then get the new root)"
            )
        return root, key

    # ------------------------------------------------------------------ queries

    @property
    def trust_bundle_pem(self) -> str:
        """The roots node proxies must trust (PEM, possibly several during a root rotation)."""
        return "".join(_pem(r) for r in self.roots)

    @property
    def chain_pem(self) -> tuple[str, ...]:
        """The signing certificate's chain: signing cert first, root last."""
        return self._chain_pem

    def effective_ttl(self, requested: dt.timedelta | None) -> dt.timedelta:
        """The lifetime granted for a request: default if unset/non-positive, clamped to the maximum."""
        if requested is None or requested <= dt.timedelta(0):
            return self.default_ttl
        return min(requested, self.max_ttl)

    # ------------------------------------------------------------------ issuance

    def sign(self, csr_pem: str | bytes, identity: Identity, ttl: dt.timedelta | None = None) -> list[str]:
        """Sign a workload certificate for `identity` with the CSR's public key; chain leaf first."""
        if identity.trust_domain != self.trust_domain:
            raise SigningError(
                f"identity {identity} is outside the trust domain {self.trust_domain!r} of this CA"
            )
        public_key = self._csr_public_key(csr_pem)
        leaf = self._issue(
            public_key, [x509.UniformResourceIdentifier(str(identity))], self.effective_ttl(ttl)
        )
        return [_pem(leaf), *self._chain_pem]

    def issue_serving_certificate(
        self,
        identity: Identity,
        dns_names: Sequence[str] = (),
        ips: Sequence[str] = (),
        ttl: dt.timedelta | None = None,
    ) -> ServingCertificate:
        """A fresh key and certificate for the controller's own TLS port."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
        names += [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        leaf = self._issue(key.public_key(), names, self.effective_ttl(ttl))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return ServingCertificate(
            key_pem=key_pem,
            chain_pem=(_pem(leaf), *self._chain_pem),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def _csr_public_key(self, csr_pem: str | bytes) -> ec.EllipticCurvePublicKey:
        data = csr_pem.encode("utf-8", "replace") if isinstance(csr_pem, str) else csr_pem
        if len(data) > MAX_CSR_BYTES:
            raise SigningError(f"CSR is {len(data)} bytes, more than the {MAX_CSR_BYTES} accepted")
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as e:
            raise SigningError(f"not a PEM-encoded PKCS#10 certificate signing request: {e}") from e
        try:
            public_key = csr.public_key()
            valid = csr.is_signature_valid
        except (ValueError, TypeError, x509.UnsupportedGeneralNameType, UnsupportedAlgorithm) as e:
            # UnsupportedAlgorithm: a curve or key type cryptography does not know (e.g. an odd OID).
            raise SigningError(f"CSR cannot be checked: {e}") from e
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            kind = (
                f"EC {public_key.curve.name}"
                if isinstance(public_key, ec.EllipticCurvePublicKey)
                else type(public_key).__name__.lstrip("_")
            )
            raise SigningError(f"CSR key is {kind}; workload keys must be EC P-256 (secp256r1)")
        if not valid:
            raise SigningError("CSR signature does not verify with its own public key")
        return public_key

    def _issue(
        self, public_key: ec.EllipticCurvePublicKey, names: list[x509.GeneralName], ttl: dt.timedelta
    ) -> x509.Certificate:
        now = self._clock()
        not_before = max(now - CLOCK_SKEW, self.signing_cert.not_valid_before_utc)
        not_after = min(now + ttl, self.signing_cert.not_valid_after_utc)
        if not_after <= now:
            raise SigningError(f"the signing certificate expired at {not_after.isoformat()}")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # An empty subject makes the SAN the only name, which X.509 requires to be critical.
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())
