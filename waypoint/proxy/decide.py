"""Pure decisions of the request pipeline: the request view, the backend of a weighted split, the
upstream request, whether and when to retry, and local answers (including gRPC's form of them).

Nothing here does I/O or keeps state; waypoint.proxy.pipeline acts on what these return.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from waypoint.model import AppProtocol, Forward, Peer, RequestView, RetryPolicy, WeightedBackend
from waypoint.proxy.headers import apply_edits
from waypoint.proxy.interfaces import Destination
from waypoint.proxy.message import HTTP2, HTTP11, RequestHead, ResponseHead

# RFC 9110 §9.2.2 idempotent methods that Envoy retries (POST/PATCH are never retried here).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Envoy's max retry interval defaults to 10x the base interval.
MAX_BACKOFF_FACTOR = 10
# Local answers Envoy gives, kept so clients and operators see familiar texts.
RBAC_DENIED_BODY = b"RBAC: access denied"
LOCAL_BODIES = {
    "UH": b"no healthy upstream",
    "UF": b"upstream connect error or disconnect/reset before headers. reset reason: connection failure",
    "UC": b"upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    "UT": b"upstream request timeout",
    "UO": b"upstream overflow",
    "UPE": b"upstream protocol error",
}
# gRPC's mapping of HTTP statuses (doc/http-grpc-status-mapping.md) for answers the proxy makes itself.
_GRPC_FROM_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
GRPC_UNKNOWN = 2


def is_grpc(headers: Sequence[tuple[str, str]]) -> bool:
    # A loop, not any() over a generator (a frame resumed per header): this runs for every request.
    for name, value in headers:  # noqa: SIM110
        if name == "content-type" and value.startswith("application/grpc"):
            return True
    return False


def build_view(
    head: RequestHead, path: str, query: str, source: Peer, destination: Destination, destination_ip: str
) -> RequestView:
    return RequestView(
        method=head.method,
        authority=head.authority,
        path=path,
        query=query,
        raw_path=head.target,
        headers=tuple(head.headers),
        protocol=head.protocol,
        grpc=is_grpc(head.headers),
        source=source,
        service=destination.service,
        destination_ip=destination_ip,
    )


def choose_backend(backends: Sequence[WeightedBackend], rng: random.Random) -> WeightedBackend | None:
    """A backend drawn with probability weight / total weight; None when no weight is positive."""
    live = [b for b in backends if b.weight > 0]
    total = sum([b.weight for b in live])
    if not live or total <= 0:
        return None
    point = rng.random() * total
    for backend in live:
        point -= backend.weight
        if point < 0:
            return backend
    return live[-1]


def upstream_protocol(protocol: AppProtocol) -> str:
    """What the waypoint speaks to the backend: HTTP/2 for http2 and grpc ports, else HTTP/1.1."""
    return HTTP2 if protocol in (AppProtocol.HTTP2, AppProtocol.GRPC) else HTTP11


def upstream_request(
    head: RequestHead, forward: Forward, path: str, query: str, protocol: str
) -> RequestHead:
    """The request the backend gets: route header edits, the normalized (or rewritten) path, authority
    rewrite; Expect is answered by the waypoint, so it is not forwarded; an upgrade only on HTTP/1.1."""
    headers = apply_edits([(n, v) for n, v in head.headers if n != "expect"], forward.request_headers)
    new_path = forward.rewrite_path if forward.rewrite_path is not None else path
    target = new_path + (f"?{query}" if query else "") if new_path != "*" else "*"
    # Field by field rather than dataclasses.replace, which costs a tenth of this function per request.
    return RequestHead(
        method=head.method,
        authority=forward.rewrite_authority or head.authority,
        target=target,
        headers=headers,
        protocol=head.protocol,
        scheme=head.scheme,
        content_length=head.content_length,
        has_body=head.has_body,
        upgrade=head.upgrade if protocol == HTTP11 else None,
        expect_continue=False,
        te_trailers=head.te_trailers,
    )


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """How many attempts a request gets and on which outcomes it tries again."""

    attempts: int  # total, first included
    policy: RetryPolicy


def retry_plan(method: str, policy: RetryPolicy) -> RetryPlan:
    attempts = 1 + max(0, policy.attempts) if method in IDEMPOTENT_METHODS else 1
    return RetryPlan(attempts, policy)


def retry_on_status(plan: RetryPlan, status: int) -> bool:
    return status in plan.policy.on_status


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Seconds before retry `retry_number` (1 for the first): the base doubling each time, capped at
    10x the base, drawn from the upper half of that so retries of many requests spread out."""
    base = max(0.0, policy.backoff)
    ceiling = min(base * 2 ** (retry_number - 1), base * MAX_BACKOFF_FACTOR)
    return rng.uniform(ceiling / 2, ceiling)


def grpc_status_for(http_status: int) -> int:
    return _GRPC_FROM_HTTP.get(http_status, GRPC_UNKNOWN)


def local_head(
    status: int, body: bytes, *, grpc: bool, extra: Sequence[tuple[str, str]] = ()
) -> tuple[ResponseHead, bytes]:
    """An answer made by the waypoint itself. For a gRPC request it is a trailers-only gRPC response
    (HTTP 200, grpc-status mapped from `status`, the text as grpc-message), as Envoy does."""
    if grpc and status >= 300:
        headers = [
            ("content-type", "application/grpc"),
            ("grpc-status", str(grpc_status_for(status))),
            ("grpc-message", _grpc_message(body.decode("utf-8", "replace"))),
            *extra,
        ]
        return ResponseHead(200, headers, None), b""
    headers = list(extra)
    if body:
        headers.append(("content-type", "text/plain"))
    return ResponseHead(status, headers, len(body)), body


def _grpc_message(text: str) -> str:
    # grpc-message is percent-encoded UTF-8 outside printable ASCII (and "%" itself).
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode("utf-8"))


def response_headers(head: ResponseHead, forward: Forward) -> ResponseHead:
    edits = forward.response_headers
    if not (edits.set or edits.add or edits.remove):
        return head  # the usual route edits nothing: no copy of the head
    return ResponseHead(head.status, apply_edits(head.headers, edits), head.content_length)
