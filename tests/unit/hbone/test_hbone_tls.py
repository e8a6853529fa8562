"""TLS contexts from workload certificates and SPIFFE identity checks of peer certificates."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from loom.hbone.errors import IdentityMismatch, PeerCertificateError, TrustDomainMismatch
from loom.hbone.limits import ClientLimits, ServerLimits
from loom.hbone.tls import (
    ContextCache,
    _private_pem_path,
    check_client_trust_domain,
    check_server_identity,
    client_context,
    identity_from_certificate,
    server_context,
)
from loom.identity import Identity
from tests.integration.hbone.hbone_harness import Pki


def self_signed(sans: list[x509.GeneralName], *, ca: bool = False) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_identity_from_workload_certificate(tmp_path: Path) -> None:
    cert = Pki.create(tmp_path).issue("default", "sleep")
    der = x509.load_pem_x509_certificate(cert.chain_pem[0].encode()).public_bytes(serialization.Encoding.DER)
    assert identity_from_certificate(der) == Identity("cluster.local", "default", "sleep")


@pytest.mark.parametrize(
    ("sans", "ca", "message"),
    [
        ([], False, "no subjectAltName"),
        ([x509.DNSName("sleep.default")], False, "0 URI SANs"),
        (
            [
                x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"),
                x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/c"),
            ],
            False,
            "2 URI SANs",
        ),
        ([x509.UniformResourceIdentifier("https://td/ns/a/sa/b")], False, "not a spiffe"),
        ([x509.UniformResourceIdentifier("spiffe://td/workload")], False, "expected spiffe"),
        ([x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b")], True, "CA certificate"),
    ],
    ids=["no SAN", "DNS only", "two URIs", "https URI", "non-workload path", "CA leaf"],
)
def test_identity_from_bad_certificates(sans: list[x509.GeneralName], ca: bool, message: str) -> None:
    with pytest.raises(PeerCertificateError, match=message):
        identity_from_certificate(self_signed(sans, ca=ca))


def test_identity_from_garbage() -> None:
    with pytest.raises(PeerCertificateError, match="DER"):
        identity_from_certificate(b"\x30\x03garbage")


def test_identity_checks() -> None:
    me = Identity("cluster.local", "ns", "server")
    client = Identity("cluster.local", "other", "client")
    check_server_identity(me, {me, client})
    with pytest.raises(IdentityMismatch, match="not one of the expected"):
        check_server_identity(me, {client})
    check_client_trust_domain(client, me)
    with pytest.raises(TrustDomainMismatch, match=r"evil\.local"):
        check_client_trust_domain(Identity("evil.local", "ns", "sa"), me)


def test_contexts_are_tls13_h2_mutual_and_cached(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    cert = pki.issue("ns", "sa")
    cache = ContextCache()
    client = client_context(cert, cache)
    server = server_context(cert, cache)
    for ctx in (client, server):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        assert ctx.options & ssl.OP_NO_TICKET
    assert client_context(cert, cache) is client
    assert server_context(cert, cache) is server
    rotated = pki.issue("ns", "sa")
    assert rotated.serial != cert.serial
    assert client_context(rotated, cache) is not client
    assert len(cache) == 3


def test_context_cache_is_bounded(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    cache = ContextCache(capacity=2)
    for i in range(4):
        client_context(pki.issue("ns", f"sa{i}"), cache)
    assert len(cache) == 2


def test_unusable_key_material_is_reported(tmp_path: Path) -> None:
    cert = Pki.create(tmp_path).issue("ns", "sa")
    other_key = Pki.create(tmp_path / "other").issue("ns", "sa").key_pem
    from dataclasses import replace

    with pytest.raises(PeerCertificateError, match="key or chain"):
        client_context(replace(cert, key_pem=other_key), ContextCache())
    with pytest.raises(PeerCertificateError, match="trust bundle"):
        client_context(replace(cert, roots_pem="not pem"), ContextCache())
    with pytest.raises(PeerCertificateError, match="empty chain"):
        client_context(replace(cert, chain_pem=()), ContextCache())


def test_private_pem_path_leaves_nothing_behind() -> None:
    fds_before = sorted(os.listdir("/proc/self/fd"))
    with _private_pem_path(b"secret") as path:
        with open(path, "rb") as f:
            assert f.read() == b"secret"
        assert path.startswith("/proc/self/fd/")  # an anonymous memory file, never on a file system
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


def test_limits_validation() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        ServerLimits(max_frame_size=1000)
    with pytest.raises(ValueError, match="connection_window"):
        ClientLimits(stream_window=1 << 22, connection_window=1 << 20)
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        ServerLimits(max_concurrent_streams=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        ClientLimits(idle_timeout=0)
    assert ClientLimits().max_header_list_size == 16 * 1024
    assert ServerLimits().max_header_list_size == 64 * 1024
