"""CA key material and issuance (controller/ca/authority.py)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.ca.authority import (
    CLOCK_SKEW,
    ROOT_TTL,
    CaError,
    CertificateAuthority,
    SigningError,
)
from loom.identity import Identity

TD = "cluster.local"
ALICE = Identity(TD, "default", "alice")
BOB = Identity(TD, "default", "bob")
NOW = dt.datetime(2026, 11, 21, 12, 0, 0, tzinfo=dt.UTC)


def fixed_clock(now: dt.datetime = NOW) -> dt.datetime:
    return now


def make_csr(
    *sans: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    ca: bool = False,
    cn: str = "",
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(s) for s in sans]), critical=True
        )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def load_chain(pems: list[str] | tuple[str, ...]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def verify_client_chain(
    chain: list[x509.Certificate], roots: list[x509.Certificate], at: dt.datetime
) -> None:
    """Full RFC 5280 path validation for a client certificate (what a TLS peer does)."""
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).time(at).build_client_verifier()
    verifier.verify(chain[0], chain[1:])


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)


# ----------------------------------------------------------------------------------- self-signed root


def test_self_signed_root_is_generated_with_the_expected_shape(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    root = ca.signing_cert
    assert ca.roots == (root,)
    assert root.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD)])
    assert root.issuer == root.subject
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert root.not_valid_after_utc - root.not_valid_before_utc == ROOT_TTL + CLOCK_SKEW
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_root_files_are_persisted_privately_and_reloaded(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    key_path = tmp_path / "ca" / "root-key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca" / "root-cert.pem").stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")] == []
    second = CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    assert second.signing_cert == first.signing_cert
    # Certificates from the reloaded CA chain to the original root.
    chain = load_chain(second.sign(make_csr(), ALICE))
    verify_client_chain(chain, [first.signing_cert], NOW)


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    key_path = tmp_path / "ca" / "root-key.pem"
    os.chmod(key_path, 0o644)
    CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_key_without_certificate_is_regenerated(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "root-key.pem").write_text("left over from an interrupted first start")
    ca = CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    assert (tmp_path / "ca" / "root-cert.pem").read_text() == ca.trust_bundle_pem


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda d: (d / "root-key.pem").unlink(), "exists but its key", id="key deleted"),
        pytest.param(
            lambda d: (d / "root-key.pem").write_bytes(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "does not match",
            id="key replaced",
        ),
        pytest.param(
            lambda d: (d / "root-key.pem").write_text("junk"), "not an unencrypted PEM", id="key junk"
        ),
        pytest.param(
            lambda d: (d / "root-cert.pem").write_text("junk"), "not PEM certificates", id="cert junk"
        ),
    ],
)
def test_damaged_root_material_is_a_clear_error(tmp_path: Path, damage: object, message: str) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    damage(tmp_path / "ca")  # type: ignore[operator]
    with pytest.raises(CaError, match=message):
        CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)


def test_expired_root_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    later = NOW + ROOT_TTL + dt.timedelta(days=1)
    with pytest.raises(CaError, match="root expired"):
        CertificateAuthority.load_or_create(tmp_path, TD, clock=lambda: later)


# ----------------------------------------------------------------------------------- signing


def test_signed_leaf_has_exactly_the_expected_extensions(ca: CertificateAuthority) -> None:
    chain_pem = ca.sign(make_csr(str(ALICE)), ALICE)
    assert len(chain_pem) == 2 and chain_pem[-1] == ca.trust_bundle_pem
    leaf, root = load_chain(chain_pem)
    verify_client_chain([leaf, root], [root], NOW)
    leaf.verify_directly_issued_by(root)
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == root.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(ALICE))]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert {e.oid for e in leaf.extensions} == {
        x509.SubjectAlternativeName.oid,
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.SubjectKeyIdentifier.oid,
    }
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)


def test_only_the_authorized_identity_is_copied_never_the_csr_contents(ca: CertificateAuthority) -> None:
    csr = make_csr(str(BOB), "spiffe://evil.example/ns/x/sa/y", ca=True, cn="admin")
    leaf = load_chain(ca.sign(csr, ALICE))[0]
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(str(ALICE))
    ]
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_serial_numbers_are_random(ca: CertificateAuthority) -> None:
    serials = {load_chain(ca.sign(make_csr(), ALICE))[0].serial_number for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        pytest.param(None, dt.timedelta(hours=24), id="default"),
        pytest.param(dt.timedelta(0), dt.timedelta(hours=24), id="zero means default"),
        pytest.param(dt.timedelta(seconds=-5), dt.timedelta(hours=24), id="negative means default"),
        pytest.param(dt.timedelta(minutes=2), dt.timedelta(minutes=2), id="short honoured"),
        pytest.param(dt.timedelta(days=30), dt.timedelta(days=30), id="under maximum honoured"),
        pytest.param(dt.timedelta(days=365), dt.timedelta(days=90), id="clamped to maximum"),
    ],
)
def test_lifetime_is_clamped(
    ca: CertificateAuthority, requested: dt.timedelta | None, expected: dt.timedelta
) -> None:
    leaf = load_chain(ca.sign(make_csr(), ALICE, requested))[0]
    assert leaf.not_valid_after_utc - NOW == expected


def test_configured_maximum_applies(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(
        tmp_path, TD, default_ttl=dt.timedelta(hours=1), max_ttl=dt.timedelta(hours=2), clock=fixed_clock
    )
    assert load_chain(ca.sign(make_csr(), ALICE))[0].not_valid_after_utc == NOW + dt.timedelta(hours=1)
    leaf = load_chain(ca.sign(make_csr(), ALICE, dt.timedelta(days=1)))[0]
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=2)


def test_lifetime_never_outlasts_the_signing_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, clock=fixed_clock)
    near_end = ca.signing_cert.not_valid_after_utc - dt.timedelta(hours=1)
    late = CertificateAuthority.load_or_create(tmp_path, TD, clock=lambda: near_end)
    leaf = load_chain(late.sign(make_csr(), ALICE))[0]
    assert leaf.not_valid_after_utc == ca.signing_cert.not_valid_after_utc


def _tampered_csr() -> str:
    csr = x509.load_pem_x509_csr(make_csr(str(ALICE)).encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _unknown_curve_csr() -> str:
    """A P-256 CSR whose curve OID (1.2.840.10045.3.1.7) is changed to one cryptography does not know."""
    der = x509.load_pem_x509_csr(make_csr(str(ALICE)).encode()).public_bytes(serialization.Encoding.DER)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    assert der.count(p256) == 1
    return (
        x509.load_der_x509_csr(der.replace(p256, p256[:-1] + b"\x08"))
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        pytest.param("", "not a PEM-encoded", id="empty"),
        pytest.param(_unknown_curve_csr(), "cannot be checked", id="unknown curve"),
        pytest.param(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
            id="garbage",
        ),
        pytest.param("x" * 20000, "more than", id="oversized"),
        pytest.param(make_csr(key=rsa.generate_private_key(65537, 2048)), "must be EC P-256", id="rsa key"),
        pytest.param(make_csr(key=ec.generate_private_key(ec.SECP384R1())), "secp384r1", id="p-384 key"),
        pytest.param(_tampered_csr(), "signature does not verify", id="bad signature"),
    ],
)
def test_bad_csrs_are_refused(ca: CertificateAuthority, csr: str, message: str) -> None:
    with pytest.raises(SigningError, match=message):
        ca.sign(csr, ALICE)


def test_identity_of_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(SigningError, match="outside the trust domain"):
        ca.sign(make_csr(), Identity("other.domain", "default", "alice"))


def test_serving_certificate(ca: CertificateAuthority) -> None:
    controller = Identity(TD, "istio-system", "loom-controller")
    serving = ca.issue_serving_certificate(
        controller, ["loom-controller.istio-system.svc"], ["127.0.0.1", "::1"]
    )
    leaf, root = load_chain(serving.chain_pem)
    names = list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert names == [
        x509.UniformResourceIdentifier(str(controller)),
        x509.DNSName("loom-controller.istio-system.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    key = serialization.load_pem_private_key(serving.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("loom-controller.istio-system.svc"))
    )
    verifier.verify(leaf, [])
    assert serving.refresh_at() == NOW - CLOCK_SKEW + (dt.timedelta(hours=24) + CLOCK_SKEW) / 2


# ----------------------------------------------------------------------------------- plugged-in CA


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture
def cacerts(tmp_path: Path) -> tuple[Path, x509.Certificate, x509.Certificate]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("root", root_key, None, root_key)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert("intermediate", inter_key, root, root_key)
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(_pem(inter))
    (d / "ca-key.pem").write_bytes(
        inter_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (d / "root-cert.pem").write_bytes(_pem(root))
    (d / "cert-chain.pem").write_bytes(_pem(inter, root))
    return d, root, inter


def test_plugged_in_intermediate_signs_leaf_intermediate_root(
    cacerts: tuple[Path, x509.Certificate, x509.Certificate],
) -> None:
    d, root, inter = cacerts
    ca = CertificateAuthority.from_cacerts(d, TD, clock=fixed_clock)
    chain = load_chain(ca.sign(make_csr(), ALICE))
    assert chain[1:] == [inter, root]
    verify_client_chain(chain, [root], NOW)
    assert ca.trust_bundle_pem == _pem(root).decode()


def test_plugged_in_chain_without_root_gets_it_appended(
    cacerts: tuple[Path, x509.Certificate, x509.Certificate],
) -> None:
    d, root, inter = cacerts
    (d / "cert-chain.pem").write_bytes(_pem(inter))
    ca = CertificateAuthority.from_cacerts(d, TD, clock=fixed_clock)
    assert load_chain(ca.chain_pem) == [inter, root]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            lambda d, r, i: (d / "cert-chain.pem").unlink(), "missing cert-chain.pem", id="missing file"
        ),
        pytest.param(
            lambda d, r, i: (d / "ca-key.pem").write_bytes(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "does not match",
            id="wrong key",
        ),
        pytest.param(
            lambda d, r, i: (d / "root-cert.pem").write_bytes(
                _pem(_ca_cert("other", k := ec.generate_private_key(ec.SECP256R1()), None, k))
            ),
            "does not lead to any root",
            id="chain to another root",
        ),
        pytest.param(
            lambda d, r, i: (d / "cert-chain.pem").write_bytes(
                _pem(i, _ca_cert("other", k := ec.generate_private_key(ec.SECP256R1()), None, k))
            ),
            "is not issued by",
            id="broken chain",
        ),
    ],
)
def test_bad_cacerts_are_clear_errors(
    cacerts: tuple[Path, x509.Certificate, x509.Certificate], damage: object, message: str
) -> None:
    d, root, inter = cacerts
    damage(d, root, inter)  # type: ignore[operator]
    with pytest.raises(CaError, match=message):
        CertificateAuthority.from_cacerts(d, TD, clock=fixed_clock)
