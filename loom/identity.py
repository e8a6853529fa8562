"""SPIFFE identities: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

from dataclasses import dataclass

SPIFFE_SCHEME = "spiffe://"


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
