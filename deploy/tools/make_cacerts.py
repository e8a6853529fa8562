"""Create the mesh CA for a Kubernetes install: a root, and an intermediate in Istio's `cacerts` layout.

Theory of operation
-------------------
In Kubernetes the controller signs with a *plugged-in* intermediate (`loom-controller --cacerts-dir`,
mounted from the Secret `cacerts`, Istio's name and file layout), and the node proxies trust the root from
the ConfigMap `istio-ca-root-cert`. Both come from the files this tool writes into `--out`:

    root-cert.pem    the root: the ConfigMap istio-ca-root-cert, and the Secret cacerts
    root-key.pem     the root's key: keep it OFFLINE, it is only needed to issue a new intermediate
    ca-cert.pem      the intermediate signing CA                     } the Secret cacerts
    ca-key.pem       its key                                         }
    cert-chain.pem   the intermediate then the root                  }

Keys are ECDSA P-256 (what workload certificates use too), written with mode 0600. Validity: the root 10
years (Istio's self-signed root lifetime), the intermediate 2 years; workload certificates never outlast
the intermediate, so replace it well before it expires. Existing files are never overwritten: an
existing CA is what every node proxy trusts, and replacing it by accident would cut every proxy off.

The root's subject carries the trust domain as its organization, like the controller's own self-signed
root. Run as `python -m deploy.tools.make_cacerts --out DIR` (in the image, or in the project's venv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_DAYS = 3650
DEFAULT_CA_DAYS = 730
# Certificates start a little in the past: a node whose clock runs behind must still accept them.
CLOCK_SKEW = dt.timedelta(minutes=5)
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")


class CacertsError(Exception):
    """The CA cannot be written; the message names the file or setting."""


@dataclass(frozen=True, slots=True)
class Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _issue_ca(
    subject: x509.Name,
    issuer: Authority | None,
    now: dt.datetime,
    days: int,
    path_length: int | None,
) -> Authority:
    """A CA certificate for a new key; self-signed when `issuer` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer_key = issuer.key if issuer is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False
        )
    )
    return Authority(builder.sign(signer_key, hashes.SHA256()), key)


def make_authorities(
    trust_domain: str, *, root_days: int, ca_days: int, now: dt.datetime | None = None
) -> tuple[Authority, Authority]:
    """(root, intermediate); the intermediate may sign only leaf certificates (path length 0)."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise CacertsError(
            f"--trust-domain {trust_domain!r}: expected lowercase letters, digits, '.', '-', '_'"
        )
    if not 0 < ca_days < root_days:
        raise CacertsError(f"the intermediate's {ca_days} days must be positive and shorter than the root's")
    moment = now or dt.datetime.now(dt.UTC)
    organization = x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)
    root = _issue_ca(
        x509.Name([organization, x509.NameAttribute(NameOID.COMMON_NAME, "loom root CA")]),
        None,
        moment,
        root_days,
        path_length=1,
    )
    intermediate = _issue_ca(
        x509.Name([organization, x509.NameAttribute(NameOID.COMMON_NAME, "loom intermediate CA")]),
        root,
        moment,
        ca_days,
        path_length=0,
    )
    return root, intermediate


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_cacerts(out: Path, root: Authority, intermediate: Authority) -> list[Path]:
    """Write the five files into `out` (created if needed); refuses if any of them exists."""
    files = {
        ROOT_CERT: (_pem(root.certificate), 0o644),
        ROOT_KEY: (_key_pem(root.key), 0o600),
        CA_CERT: (_pem(intermediate.certificate), 0o644),
        CA_KEY: (_key_pem(intermediate.key), 0o600),
        CERT_CHAIN: (_pem(intermediate.certificate) + _pem(root.certificate), 0o644),
    }
    existing = [name for name in files if (out / name).exists()]
    if existing:
        raise CacertsError(
            f"{out} already holds {', '.join(existing)}; a CA is never overwritten (choose another --out)"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (data, mode) in files.items():
        path = out / name
        # O_EXCL: a file created meanwhile by someone else is not replaced either.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_cacerts", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the five PEM files")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="(default %(default)s)")
    parser.add_argument("--root-days", type=int, default=DEFAULT_ROOT_DAYS, help="(default %(default)s)")
    parser.add_argument("--ca-days", type=int, default=DEFAULT_CA_DAYS, help="(default %(default)s)")
    args = parser.parse_args(argv)
    try:
        root, intermediate = make_authorities(
            args.trust_domain, root_days=args.root_days, ca_days=args.ca_days
        )
        written = write_cacerts(args.out, root, intermediate)
    except (CacertsError, OSError) as e:
        print(f"make_cacerts: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"keep {args.out / ROOT_KEY} offline; the cluster needs only the other four files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
