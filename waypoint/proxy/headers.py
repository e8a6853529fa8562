"""Header handling shared by both protocols: field syntax, hop-by-hop removal, route edits, the
headers the waypoint adds (x-forwarded-proto, x-request-id, traceparent), and HTTP/2 request validation.

Theory of operation
-------------------
Everything here is pure. Names are lower-case `str`, values latin-1 `str` (see message.py).

`validate_h2_request` is the waypoint's own RFC 9113 §8.2-§8.3 check of a decoded HTTP/2 header list.
h2's validation is switched off on the downstream connection because it turns a malformed request into
a *connection* error (every other stream dies with it); here it becomes a stream error with a reason.
It is also the H2 -> H1 injection defence (checklist item 9): nothing that could become a second
request line, header or a smuggled framing header on an HTTP/1.1 backend survives it:

* CR, LF and NUL in any value, whitespace around a value (`header_injection`, `header_whitespace`);
* upper-case or otherwise invalid names (`uppercase_header`, `bad_header_name`);
* connection-specific headers (`connection_header`) and a `te` other than `trailers` (`bad_te`);
* pseudo-headers that are unknown, repeated, after regular headers, or missing; a `:method` that is
  not a token (`GET /admin`), `:path` not starting with `/` or carrying spaces or controls; CONNECT
  (extended CONNECT is not offered); `:authority` and `host` naming different hosts (`pseudo_header`,
  `bad_method`, `bad_path`, `connect_method`, `authority_mismatch`);
* more than `max_headers` fields or a list over `max_bytes` (RFC 7541 size) -> 431.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence

from waypoint.model import HeaderEdits
from waypoint.proxy.message import HTTP2, Headers, RequestHead
from waypoint.telemetry import (
    REQUEST_ID,
    TRACEPARENT,
    TRACESTATE,
    new_request_id,
    request_id_for,
    traceparent_for,
)

# RFC 9110 §7.6.1 and the proxy-specific ones every proxy drops; `te` is kept separately when it is
# "trailers" (gRPC needs it on HTTP/2).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "http2-settings",
    }
)
# Identity claims only a proxy that verified them may set; a client's copy is dropped.
FORGEABLE_IDENTITY_HEADERS = frozenset({"x-forwarded-client-cert"})
# Headers a route edit may never touch: they frame the message or are the proxy's own business.
PROTECTED = HOP_BY_HOP | {"content-length", "host"}
_FORWARDED_PROTO = "x-forwarded-proto"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
_LOWER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_REQUEST_ID = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z:=/]{1,128}")
_PATH = re.compile(r"[\x21-\x7e]+")
_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]{1,255}")
_PSEUDO_REQUEST = frozenset({":method", ":scheme", ":authority", ":path"})


def is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def valid_name(name: str) -> bool:
    """A lower-case field name (the form both protocols use inside the proxy)."""
    return _LOWER_TOKEN.fullmatch(name) is not None


def valid_value(value: str) -> bool:
    """A field value without CR, LF, NUL or other controls, and without surrounding whitespace."""
    return _FIELD_VALUE.fullmatch(value) is not None and value == value.strip(" \t")


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Lower-case names listed in Connection headers (they are hop-by-hop too)."""
    tokens: set[str] = set()
    for name, value in headers:
        if name == "connection":
            tokens.update(part.strip().lower() for part in value.split(",") if part.strip())
    return tokens


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop headers and those the Connection header names."""
    items = list(headers)
    named = connection_tokens(items)
    return [(n, v) for n, v in items if n not in HOP_BY_HOP and n not in named]


def apply_edits(headers: Sequence[tuple[str, str]], edits: HeaderEdits) -> Headers:
    """RequestHeaderModifier / ResponseHeaderModifier semantics: set replaces every value of a name,
    add appends, remove deletes. Edits of framing or hop-by-hop headers, or with invalid names or
    values, are ignored (the router's configuration must not be able to break the message)."""
    result = list(headers)
    for raw_name, value in edits.set:
        name = raw_name.lower()
        if name in PROTECTED or not valid_name(name) or not valid_value(value):
            continue
        result = [(n, v) for n, v in result if n != name]
        result.append((name, value))
    for raw_name, value in edits.add:
        name = raw_name.lower()
        if name in PROTECTED or not valid_name(name) or not valid_value(value):
            continue
        result.append((name, value))
    removed = {name.lower() for name in edits.remove} - PROTECTED
    return [(n, v) for n, v in result if n not in removed]


# The headers prepare_request_headers rewrites; every other header passes with one set lookup.
_PREPARED = FORGEABLE_IDENTITY_HEADERS | {REQUEST_ID, TRACEPARENT, TRACESTATE, _FORWARDED_PROTO}


def prepare_request_headers(
    headers: Headers,
    *,
    new_id: Callable[[], str] = new_request_id,
    random_bytes: Callable[[int], bytes] = random.randbytes,
) -> None:
    """In place: x-request-id when missing or malformed (generated) and traceparent with this hop's
    span id (a new trace when missing or malformed), see waypoint.telemetry's `request_id_for` and
    `traceparent_for` (each takes the place of the client's first, duplicates removed; appended when
    the client sent none); x-forwarded-proto: the hop from the client's ztunnel is always plaintext
    inside mTLS, so anything but an http/https value set by an earlier proxy is replaced by "http"
    (appended last); and identity headers a client could forge (x-forwarded-client-cert) removed: the
    only identity the waypoint vouches for is the one mTLS proved, which backends learn from HBONE,
    never from a header.

    One pass over the headers (most requests carry none of these): this runs on every request.
    `new_id` and `random_bytes` are the sources of new request ids and trace/span ids."""
    kept: Headers = []
    id_at = trace_at = -1
    client_id: str | None = None
    parents: list[str] = []
    has_tracestate = False
    proto: str | None = None
    for item in headers:
        name = item[0]
        if name not in _PREPARED:
            kept.append(item)
        elif name == REQUEST_ID:
            if id_at < 0:
                id_at, client_id = len(kept), item[1]
                kept.append(item)  # its place, filled in below
        elif name == TRACEPARENT:
            parents.append(item[1])
            if trace_at < 0:
                trace_at = len(kept)
                kept.append(item)
        elif name == TRACESTATE:
            has_tracestate = True
            kept.append(item)
        elif name == _FORWARDED_PROTO:
            if proto is None:
                proto = item[1]
            kept.append(item)
        # else: a forgeable identity header, dropped
    entry = (REQUEST_ID, request_id_for(client_id, new_id))
    if id_at < 0:
        kept.append(entry)
    else:
        kept[id_at] = entry
    traceparent, continued = traceparent_for(parents, random_bytes)
    if trace_at < 0:
        kept.append((TRACEPARENT, traceparent))
    else:
        kept[trace_at] = (TRACEPARENT, traceparent)
    if has_tracestate and not continued:
        kept = [item for item in kept if item[0] != TRACESTATE]
    if proto not in ("http", "https"):
        if proto is not None:
            kept = [item for item in kept if item[0] != _FORWARDED_PROTO]
        kept.append((_FORWARDED_PROTO, "http"))
    headers[:] = kept


def join_cookies(headers: Iterable[tuple[str, str]]) -> Headers:
    """HTTP/2 may split Cookie into several fields; HTTP/1.1 needs one (RFC 9113 §8.2.3)."""
    items = list(headers)
    cookies = [v for n, v in items if n == "cookie"]
    if len(cookies) <= 1:
        return items
    result = [(n, v) for n, v in items if n != "cookie"]
    result.append(("cookie", "; ".join(cookies)))
    return result


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """RFC 7541 §4.1 size: name + value + 32 per field."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


class MalformedRequest(Exception):
    """A request (or its trailers) that must not be processed; `status` None means reset the stream."""

    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status


def _check_field(name: bytes, value: bytes) -> None:
    if not name:
        raise MalformedRequest("bad_header_name", "an empty header name")
    if any(0x41 <= c <= 0x5A for c in name):
        raise MalformedRequest("uppercase_header", f"upper-case header name {name!r}")
    if any(c <= 0x20 or c >= 0x7F for c in name) or b":" in name[1:]:
        raise MalformedRequest("bad_header_name", f"invalid header name {name!r}")
    if any(c in (0x00, 0x0A, 0x0D) for c in value):
        raise MalformedRequest("header_injection", f"CR, LF or NUL in the value of {name!r}")
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise MalformedRequest("header_whitespace", f"whitespace around the value of {name!r}")
    if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
        raise MalformedRequest("header_injection", f"a control byte in the value of {name!r}")


def _check_regular(name: bytes, value: bytes) -> None:
    if name.decode("latin-1") in HOP_BY_HOP - {"te"}:
        raise MalformedRequest("connection_header", f"connection-specific header {name!r} in HTTP/2")
    if name == b"te" and value != b"trailers":
        raise MalformedRequest("bad_te", f"te: {value!r} (only 'trailers' is allowed in HTTP/2)")


def validate_h2_request(
    raw: Sequence[tuple[bytes, bytes]], *, max_headers: int, max_bytes: int, end_stream: bool
) -> RequestHead:
    """The request of a HEADERS frame (see the module docstring); raises MalformedRequest."""
    if len(raw) > max_headers:
        raise MalformedRequest("too_many_headers", f"{len(raw)} header fields, at most {max_headers}", 431)
    size = header_list_size(raw)
    if size > max_bytes:
        raise MalformedRequest(
            "header_list_too_large", f"header list of {size} bytes, at most {max_bytes}", 431
        )
    pseudo: dict[str, str] = {}
    regular: Headers = []
    for name, value in raw:
        _check_field(name, value)
        text_name = name.decode("latin-1")
        text_value = value.decode("latin-1")
        if name.startswith(b":"):
            if regular:
                raise MalformedRequest("pseudo_header", f"{text_name} after regular headers")
            if text_name not in _PSEUDO_REQUEST:
                raise MalformedRequest("pseudo_header", f"{text_name} is not a request pseudo-header")
            if text_name in pseudo:
                raise MalformedRequest("pseudo_header", f"{text_name} appears twice")
            pseudo[text_name] = text_value
            continue
        _check_regular(name, value)
        regular.append((text_name, text_value))
    method = pseudo.get(":method")
    if method is None:
        raise MalformedRequest("pseudo_header", ":method is missing")
    if not is_token(method):
        raise MalformedRequest("bad_method", f":method {method!r} is not a token")
    if method == "CONNECT":
        raise MalformedRequest("connect_method", "CONNECT is not proxied by the waypoint", 405)
    scheme = pseudo.get(":scheme")
    if scheme not in ("http", "https"):
        raise MalformedRequest("pseudo_header", f":scheme {scheme!r} must be http or https")
    path = pseudo.get(":path")
    if not path:
        raise MalformedRequest("pseudo_header", ":path is missing or empty")
    if _PATH.fullmatch(path) is None:
        raise MalformedRequest("bad_path", ":path contains spaces, controls or non-ASCII bytes")
    if not (path.startswith("/") or (path == "*" and method == "OPTIONS")):
        raise MalformedRequest("bad_path", f":path {path[:64]!r} does not start with '/'")
    hosts = [v for n, v in regular if n == "host"]
    if len(hosts) > 1:
        raise MalformedRequest("authority_mismatch", "more than one host header")
    authority = pseudo.get(":authority")
    if authority is not None and hosts and hosts[0].lower() != authority.lower():
        raise MalformedRequest("authority_mismatch", ":authority and host name different hosts")
    authority = authority if authority is not None else (hosts[0] if hosts else None)
    if not authority or _AUTHORITY.fullmatch(authority) is None:
        raise MalformedRequest("bad_authority", "no valid :authority (or host)")
    lengths = [v for n, v in regular if n == "content-length"]
    content_length = int(lengths[0]) if lengths and lengths[0].isdigit() else None
    return RequestHead(
        method=method,
        authority=authority,
        target=path,
        headers=[(n, v) for n, v in regular if n not in ("host", "content-length", "te")],
        protocol=HTTP2,
        scheme=scheme,
        content_length=content_length,
        has_body=not end_stream,
        te_trailers=any(n == "te" for n, _ in regular),
    )


def validate_trailers(raw: Sequence[tuple[bytes, bytes]], *, max_headers: int, max_bytes: int) -> Headers:
    """Trailers of an HTTP/2 request: regular fields only, same syntax rules."""
    if len(raw) > max_headers or header_list_size(raw) > max_bytes:
        raise MalformedRequest("header_list_too_large", "trailers over the header limits")
    result: Headers = []
    for name, value in raw:
        _check_field(name, value)
        if name.startswith(b":"):
            raise MalformedRequest("pseudo_header", "a pseudo-header in trailers")
        _check_regular(name, value)
        result.append((name.decode("latin-1"), value.decode("latin-1")))
    return result
