"""The protocol-neutral request and response the two sides of the proxy exchange.

The downstream sessions (HTTP/1.1 via llhttp, HTTP/2 via h2) turn what a client sent into a
`RequestHead` plus a body pipe; the upstream connections turn a `RequestHead` back into either
protocol. Header names are lower-case, values are `str` decoded as latin-1 (a lossless view of the
bytes), hop-by-hop headers are gone and the host is the separate `authority`.

`ProxyError` and its subclasses carry the status and Envoy response flag a failure turns into, so
the pipeline maps an exception to an answer in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loom.hbone import Tunnel
from waypoint.proxy.body import BodyPipe, Trailers

Headers = list[tuple[str, str]]

HTTP11 = "HTTP/1.1"
HTTP2 = "HTTP/2"


@dataclass(slots=True)
class RequestHead:
    method: str
    authority: str  # Host (HTTP/1.1) or :authority (HTTP/2)
    target: str  # path and query as the client sent it ("*" for OPTIONS *)
    headers: Headers  # regular headers, lower-case names, no hop-by-hop, no host
    protocol: str  # HTTP11 | HTTP2 (the downstream protocol)
    scheme: str = "http"
    content_length: int | None = None  # declared by the client (None: unknown or no body)
    has_body: bool = False  # False only when it is known that no body follows
    upgrade: str | None = None  # "websocket" for an HTTP/1.1 upgrade request
    expect_continue: bool = False  # the client waits for 100 Continue before sending the body
    te_trailers: bool = False  # the client accepts trailers ("te: trailers"; gRPC needs it on HTTP/2)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers  # lower-case names, no hop-by-hop
    content_length: int | None = None


@dataclass(slots=True)
class UpgradedStream:
    """After a 101 from the backend: the tunnel to it, now a raw byte stream, and the bytes the backend
    already sent after its 101 head."""

    tunnel: Tunnel
    leftover: bytes


@dataclass(slots=True)
class UpstreamResponse:
    """A backend's answer to one attempt, once its head arrived."""

    head: ResponseHead
    body: BodyPipe | None  # None: no body follows (HEAD, 204, 304, END_STREAM on the head)
    upgraded: UpgradedStream | None
    protocol: str  # HTTP11 | HTTP2 (towards the backend)
    trailers_only: bool = False  # HTTP/2 response that ended on its HEADERS (gRPC trailers-only)


@dataclass(slots=True)
class ProxyResponse:
    """What a session sends back: a head, then a body from `body` (or `content`), then trailers."""

    head: ResponseHead
    body: BodyPipe | None = None  # streamed from the backend
    content: bytes = b""  # a local answer (403, redirect, direct response, errors)
    upgraded: UpgradedStream | None = None  # after a 101: the raw byte stream to the backend
    trailers: Trailers = ()
    # Loop time by which the whole response must have been sent (the route's timeout), None: no bound.
    deadline: float | None = None
    # Called once by the session when it finished sending (or failed): body bytes sent, and an error
    # text (None: the client got the whole response).
    on_complete: Callable[[int, str | None], None] | None = None

    def complete(self, sent: int, error: str | None) -> None:
        callback, self.on_complete = self.on_complete, None
        if callback is not None:
            callback(sent, error)


class ProxyError(Exception):
    """A failure that ends a request with a local answer."""

    status = 502
    flags = "-"
    details = "upstream_error"

    def __init__(self, message: str, *, status: int | None = None, flags: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if flags is not None:
            self.flags = flags


class NoHealthyUpstream(ProxyError):
    status = 503
    flags = "UH"
    details = "no_healthy_upstream"


class UpstreamConnectFailure(ProxyError):
    """The HBONE tunnel (or the connection on it) to the endpoint could not be established."""

    status = 503
    flags = "UF"
    details = "upstream_connect_failure"


class UpstreamOverflow(ProxyError):
    status = 503
    flags = "UO"
    details = "upstream_overflow"


class UpstreamReset(ProxyError):
    """The backend reset the stream or closed the connection before a complete response head."""

    status = 503
    flags = "UC"
    details = "upstream_reset_before_response_started"

    def __init__(self, message: str, *, refused: bool = False, stale: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # the backend promised it did not process the request (REFUSED_STREAM)
        # A reused keep-alive connection the backend closed before any response byte: the usual race
        # with its idle timeout; an idempotent request is safe to send again on a fresh connection.
        self.stale = stale


class UpstreamTimeout(ProxyError):
    status = 504
    flags = "UT"
    details = "upstream_response_timeout"


class UpstreamProtocolError(ProxyError):
    """The backend answered something that is not acceptable HTTP."""

    status = 502
    flags = "UPE"
    details = "upstream_protocol_error"
