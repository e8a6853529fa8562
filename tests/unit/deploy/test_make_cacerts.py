"""make_cacerts (deploy/tools/make_cacerts.py) writes a CA that loom-controller loads with --cacerts-dir
and whose workload certificates verify against the root the node proxies get."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca.authority import CertificateAuthority
from deploy.tools.make_cacerts import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    ROOT_CERT,
    ROOT_KEY,
    CacertsError,
    main,
    make_authorities,
    write_cacerts,
)
from loom.identity import Identity
from ztunnel.identity.caclient import verify_issued

WORKLOAD = Identity("cluster.local", "default", "reviews")


def csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_the_controller_signs_with_the_written_ca_and_ztunnel_accepts_it(tmp_path: Path) -> None:
    """The controller loads the files as `--cacerts-dir`; what it issues passes ztunnel's own check
    against root-cert.pem, the file the istio-ca-root-cert ConfigMap is made from."""
    assert main(["--out", str(tmp_path / "ca")]) == 0
    authority = CertificateAuthority.from_cacerts(tmp_path / "ca", "cluster.local")
    key = ec.generate_private_key(ec.SECP256R1())
    chain = authority.sign(csr_pem(key), WORKLOAD)
    root_pem = (tmp_path / "ca" / ROOT_CERT).read_text()
    issued = verify_issued(WORKLOAD, key, chain, root_pem, dt.datetime.now(dt.UTC))
    assert len(issued.chain_pem) == 2  # the leaf and the intermediate; the root comes from the ConfigMap
    assert issued.roots_pem == root_pem


def test_keys_are_private_and_the_chain_is_intermediate_then_root(tmp_path: Path) -> None:
    root, intermediate = make_authorities("example.org", root_days=3650, ca_days=365)
    write_cacerts(tmp_path, root, intermediate)
    for name in (ROOT_KEY, CA_KEY):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((tmp_path / CERT_CHAIN).read_bytes())
    assert chain == [intermediate.certificate, root.certificate]
    assert x509.load_pem_x509_certificate((tmp_path / CA_CERT).read_bytes()) == intermediate.certificate
    constraints = intermediate.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0, "the intermediate signs leaves only"
    organization = root.certificate.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    assert [a.value for a in organization] == ["example.org"]
    lifetime = intermediate.certificate.not_valid_after_utc - intermediate.certificate.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)


def test_an_existing_ca_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    before = (tmp_path / CA_KEY).read_bytes()
    assert main(["--out", str(tmp_path)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert (tmp_path / CA_KEY).read_bytes() == before


@pytest.mark.parametrize(
    ("trust_domain", "root_days", "ca_days", "problem"),
    [
        ("Cluster.Local", 3650, 730, "--trust-domain"),
        ("cluster.local", 365, 730, "shorter than the root's"),
        ("cluster.local", 3650, 0, "must be positive"),
    ],
)
def test_bad_settings_are_named(trust_domain: str, root_days: int, ca_days: int, problem: str) -> None:
    with pytest.raises(CacertsError, match=problem):
        make_authorities(trust_domain, root_days=root_days, ca_days=ca_days)
