"""Checking what a CA returns (ztunnel.identity.caclient.verify_issued): exact SAN, our key, a chain to
the configured roots only, validity at the current time; and the CSR the proxy sends."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loom.identity import Identity
from ztunnel.identity import InvalidCertificate, build_csr, verify_issued
from ztunnel.identity.caclient import new_key

ALICE = Identity("cluster.local", "default", "alice")
NOW = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class MiniCa:
    """A root (and optionally an intermediate) that can issue any leaf a test needs."""

    def __init__(self, name: str, *, intermediate: bool = False) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca_cert(name, self.root_key, self.root_key, None)
        self.signing_key, self.signing = self.root_key, self.root
        self.intermediates: list[x509.Certificate] = []
        if intermediate:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._ca_cert(f"{name} intermediate", key, self.root_key, self.root)
            self.signing_key, self.signing = key, cert
            self.intermediates = [cert]

    @staticmethod
    def _ca_cert(
        name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer_key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
            .sign(issuer_key, hashes.SHA256())
        )

    def leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        names: Sequence[x509.GeneralName] | None,
        *,
        lifetime: dt.timedelta = dt.timedelta(hours=1),
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(minutes=1))
            .not_valid_after(NOW + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signing_key.public_key()),
                critical=False,
            )
        )
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
        return builder.sign(self.signing_key, hashes.SHA256())

    def chain(self, leaf: x509.Certificate, *, with_root: bool = True) -> list[str]:
        return [pem(leaf), *(pem(c) for c in self.intermediates), *([pem(self.root)] if with_root else [])]


URI = x509.UniformResourceIdentifier


def test_good_chain_with_intermediate() -> None:
    ca = MiniCa("mesh", intermediate=True)
    key = new_key()
    leaf = ca.leaf(key.public_key(), [URI(str(ALICE))])
    cert = verify_issued(ALICE, key, ca.chain(leaf), pem(ca.root), NOW)
    assert cert.identity == ALICE
    assert cert.chain_pem == (pem(leaf), pem(ca.intermediates[0]))  # root left out
    assert cert.roots_pem == pem(ca.root)
    assert cert.serial == leaf.serial_number
    assert cert.not_after == NOW + dt.timedelta(hours=1)
    assert cert.refresh_at == cert.not_before + (cert.not_after - cert.not_before) / 2
    loaded = serialization.load_pem_private_key(cert.key_pem.encode(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        pytest.param(
            [URI("spiffe://cluster.local/ns/default/sa/bob")],
            "names spiffe://cluster.local/ns/default/sa/bob",
            id="another identity",
        ),
        pytest.param(
            [URI(str(ALICE)), URI("spiffe://cluster.local/ns/default/sa/bob")],
            "not exactly",
            id="an extra identity",
        ),
        pytest.param([URI(str(ALICE)), x509.DNSName("alice.example")], "not exactly", id="an extra dns name"),
        pytest.param([], "names nothing", id="empty san"),
        pytest.param(None, "no subjectAltName", id="no san extension"),
        pytest.param(
            [URI("spiffe://other.domain/ns/default/sa/alice")], "not exactly", id="other trust domain"
        ),
    ],
)
def test_san_must_be_exactly_the_identity(names: list[x509.GeneralName] | None, message: str) -> None:
    ca = MiniCa("mesh")
    key = new_key()
    if names == []:
        # An empty SubjectAlternativeName cannot be built; an unrelated-only SAN stands for "no URI".
        names = [x509.DNSName("x.example")]
        message = "names x.example"
    leaf = ca.leaf(key.public_key(), names)
    with pytest.raises(InvalidCertificate, match=message):
        verify_issued(ALICE, key, ca.chain(leaf), pem(ca.root), NOW)


def test_leaf_must_certify_our_key() -> None:
    ca = MiniCa("mesh")
    leaf = ca.leaf(new_key().public_key(), [URI(str(ALICE))])
    with pytest.raises(InvalidCertificate, match="does not certify the requested key"):
        verify_issued(ALICE, new_key(), ca.chain(leaf), pem(ca.root), NOW)


def test_chain_must_lead_to_a_configured_root() -> None:
    trusted, rogue = MiniCa("mesh"), MiniCa("rogue")
    key = new_key()
    leaf = rogue.leaf(key.public_key(), [URI(str(ALICE))])
    # The response carries its own root: never trusted for that.
    with pytest.raises(InvalidCertificate, match="does not verify to the trust roots"):
        verify_issued(ALICE, key, rogue.chain(leaf), pem(trusted.root), NOW)
    # With both roots configured (a root rotation overlap) it verifies.
    cert = verify_issued(ALICE, key, rogue.chain(leaf), pem(trusted.root) + pem(rogue.root), NOW)
    assert cert.chain_pem == (pem(leaf),)


def test_expired_or_not_yet_valid_is_rejected() -> None:
    ca = MiniCa("mesh")
    key = new_key()
    leaf = ca.leaf(key.public_key(), [URI(str(ALICE))])
    with pytest.raises(InvalidCertificate, match="does not verify"):
        verify_issued(ALICE, key, ca.chain(leaf), pem(ca.root), NOW + dt.timedelta(hours=2))
    with pytest.raises(InvalidCertificate, match="does not verify"):
        verify_issued(ALICE, key, ca.chain(leaf), pem(ca.root), NOW - dt.timedelta(hours=1))


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        pytest.param([], "empty chain", id="empty"),
        pytest.param(["not a certificate"], "unreadable PEM", id="no pem block"),
        pytest.param(
            ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
            "unreadable PEM",
            id="corrupt pem",
        ),
    ],
)
def test_unreadable_answers(chain: list[str], message: str) -> None:
    ca = MiniCa("mesh")
    with pytest.raises(InvalidCertificate, match=message):
        verify_issued(ALICE, new_key(), chain, pem(ca.root), NOW)


def test_csr_shape() -> None:
    key = new_key()
    csr = x509.load_pem_x509_csr(build_csr(ALICE, key).encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [URI("spiffe://cluster.local/ns/default/sa/alice")]
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*der) == key.public_key().public_bytes(*der)
