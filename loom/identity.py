"""SPIFFE identities: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

SPIFFE_SCHEME = "spiffe://"
# Istio's default trust domain (SPIFFE IDs spiffe://cluster.local/ns/<ns>/sa/<sa>).
DEFAULT_TRUST_DOMAIN = "cluster.local"


class IdentityError(ValueError):
    """A string that is not a well-formed workload SPIFFE ID."""


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy principals use: without the spiffe:// prefix."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        if not uri.startswith(SPIFFE_SCHEME):
            raise IdentityError(f"{uri!r}: not a SPIFFE ID (must start with {SPIFFE_SCHEME})")
        parts = uri[len(SPIFFE_SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts[i] for i in (0, 2, 4)):
            raise IdentityError(f"{uri!r}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>")
        return cls(parts[0], parts[2], parts[4])


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A workload's key and certificate chain as the CA issued them, plus the trust bundle.

    Produced by the node proxy's identity manager, consumed by the HBONE TLS contexts and by the
    admin config dump. PEM text throughout, since that is what the CA API carries and what Python's
    ssl module loads."""

    identity: Identity
    key_pem: str  # PKCS#8 private key (EC P-256)
    chain_pem: tuple[str, ...]  # leaf first, then intermediates (the root is not included)
    roots_pem: str  # the trust bundle: every root (and only roots) peers' chains must lead to
    not_before: datetime
    not_after: datetime
    serial: int

    @property
    def refresh_at(self) -> datetime:
        """Half-life: when a replacement is requested (Istio's rule), leaving the other half for retries."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after
