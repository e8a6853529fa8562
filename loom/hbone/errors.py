"""The HBONE package's exception hierarchy.

Every error a caller can see derives from `HboneError`. Errors that map to an HBONE response carry the
HTTP status, errors that end an HTTP/2 stream carry the reset code, and the messages are lower-case and
name the likely cause, so the ztunnel can put them into access logs unchanged.
"""

from __future__ import annotations

from loom.identity import Identity

CONNECT_TIMEOUT_HINT = "connection timed out, maybe a NetworkPolicy is blocking HBONE port 15008"

# What each HBONE status means (ztunnel's inbound answers them with exactly these meanings).
STATUS_MEANING = {
    200: "tunnel established",
    400: "bad request",
    401: "policy denied",
    503: "upstream unavailable",
}


class HboneError(Exception):
    """Base class of every error raised by loom.hbone."""


class PeerCertificateError(HboneError):
    """The peer's certificate is missing or does not carry exactly one SPIFFE URI SAN."""


class IdentityMismatch(HboneError):
    """The server presented a valid certificate for an identity the client did not expect."""

    def __init__(self, actual: Identity, expected: frozenset[Identity]) -> None:
        wanted = ", ".join(sorted(str(i) for i in expected)) or "(none)"
        super().__init__(f"server identity {actual} is not one of the expected identities: {wanted}")
        self.actual = actual
        self.expected = expected


class TrustDomainMismatch(HboneError):
    """A client certificate from another trust domain than the server's own."""

    def __init__(self, actual: Identity, trust_domain: str) -> None:
        super().__init__(
            f"client identity {actual} is from trust domain {actual.trust_domain!r}, "
            f"this server only accepts {trust_domain!r}"
        )
        self.actual = actual
        self.trust_domain = trust_domain


class AlpnMismatch(HboneError):
    """The TLS handshake did not negotiate ALPN h2."""


class HboneConnectTimeout(HboneError, TimeoutError):
    """The TCP connection to the next hop's HBONE port did not complete in time."""

    def __init__(self, next_hop: str, seconds: float) -> None:
        super().__init__(f"{next_hop}: {CONNECT_TIMEOUT_HINT} (no answer within {seconds:g} s)")
        self.next_hop = next_hop


class HboneConnectionError(HboneError, ConnectionError):
    """The HBONE connection failed or was closed underneath a stream."""


class HboneRejected(HboneError):
    """The HBONE server answered the CONNECT with a status other than 200."""

    def __init__(self, status: int, authority: str) -> None:
        meaning = STATUS_MEANING.get(status, "unexpected status")
        super().__init__(f"CONNECT {authority} answered {status} ({meaning})")
        self.status = status
        self.authority = authority

    @property
    def policy_denied(self) -> bool:
        return self.status == 401

    @property
    def upstream_unavailable(self) -> bool:
        return self.status == 503

    @property
    def bad_request(self) -> bool:
        return self.status == 400


class StreamRefused(HboneConnectionError):
    """The server did not process the stream (REFUSED_STREAM, or beyond a GOAWAY): safe to retry."""


class TunnelReset(HboneConnectionError):
    """The tunnel's HTTP/2 stream was reset (by the peer or because its connection went away)."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class HboneProtocolViolation(HboneError):
    """The peer broke a protective limit; `reason` is the counter label of the violation."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
