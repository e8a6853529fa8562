"""Sans-IO checks and parsing of a raw HTTP/1.1 request head.

Theory of operation
-------------------
Parsers accept requests leniently where RFC 9112 allows leniency, and request smuggling lives exactly
there: two parties that frame the same bytes differently. The waypoint never forwards raw bytes
(every request is re-framed towards the backend), so a desync with the backend is impossible by
construction; still, a request whose framing is ambiguous is an attack or a broken client, and the
hardening checklist (item 8) wants it refused with 400 and the connection closed.

The HTTP/1.1 session therefore holds each request head back until the blank line that ends it has
arrived (`find_head_end`), bounded by `max_request_head_bytes` (431 beyond), and runs
`check_request_head` on the raw bytes first. What it refuses, each with its counter reason:

* bare LF line endings and bare CR: `bare_lf`, `bare_cr`;
* obs-fold continuation lines: `obs_fold`;
* control characters, NUL included, in header values: `control_char`;
* more than `max_request_headers` fields: `too_many_headers` (431);
* Transfer-Encoding with Content-Length: `te_and_cl`;
* Transfer-Encoding twice, or with any value but exactly `chunked` (tab or space variants,
  `identity, chunked`, `xchunked`): `bad_transfer_encoding`;
* Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1: faulty framing): `te_http10`;
* Content-Length twice (even with equal values), as a list, or not 1*DIGIT: `bad_content_length`;
* a version other than HTTP/1.0 / HTTP/1.1 (505), the CONNECT method (405), and request targets that
  are not origin-form (or `*` for OPTIONS): `http_version`, `connect_method`, `target_form`.

Only then is the head parsed, by llhttp (`parse_request_head`, through httptools: Node.js's parser,
strict mode), fed exactly the head's bytes, so that no parser state survives into the body or the next
request. llhttp refuses what is not HTTP (unknown methods, invalid tokens or URL bytes); the head must
also carry exactly one Host when it is HTTP/1.1 (RFC 9112 §3.2): `bad_request`, `missing_host`,
`multiple_host`.

Chunked body framing (chunk sizes, chunk-ext, the CRLF after each chunk) is h11's, which is strict:
invalid sizes, bare LF and garbage after a chunk are refused by it (`bad_body`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools

_TE_CHUNKED = re.compile(rb" *chunked *", re.IGNORECASE)
_CONTENT_LENGTH = re.compile(rb" *[0-9]{1,18} *")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/1\.[01]")


@dataclass(frozen=True, slots=True)
class HeadViolation:
    status: int  # what the client is answered before the connection is closed
    reason: str  # the refusal counter label
    detail: str  # for the log


def find_head_end(buffer: bytes | bytearray) -> int | None:
    """Offset just past the empty line ending the head; None while it has not arrived.

    Bare-LF heads (`\\n\\n`) are found too, so that they can be refused rather than waited on."""
    candidates = []
    crlf = buffer.find(b"\n\r\n")
    if crlf >= 0:
        candidates.append(crlf + 3)
    lf = buffer.find(b"\n\n")
    if lf >= 0:
        candidates.append(lf + 2)
    return min(candidates) if candidates else None


def check_request_head(head: bytes, *, max_headers: int) -> HeadViolation | None:
    """The first reason to refuse this complete request head (request line to empty line), or None."""
    if b"\r" in head.replace(b"\r\n", b""):
        return HeadViolation(400, "bare_cr", "a CR not followed by LF in the request head")
    lines = head.split(b"\n")
    # The head ends with the empty line, so splitting leaves a final empty element.
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines):
        if not line.endswith(b"\r"):
            return HeadViolation(400, "bare_lf", f"line {number + 1} of the request head ends with a bare LF")
    lines = [line[:-1] for line in lines]
    if not lines or lines[-1] != b"":
        return HeadViolation(400, "bad_request", "the request head does not end with an empty line")
    request_line, fields = lines[0], lines[1:-1]
    violation = _check_request_line(request_line)
    if violation is not None:
        return violation
    if len(fields) > max_headers:
        return HeadViolation(431, "too_many_headers", f"{len(fields)} header fields, at most {max_headers}")
    transfer_encodings: list[bytes] = []
    content_lengths: list[bytes] = []
    for line in fields:
        if line[:1] in (b" ", b"\t"):
            return HeadViolation(400, "obs_fold", "a header line continues the previous one (obs-fold)")
        name, colon, value = line.partition(b":")
        if not colon:
            return HeadViolation(400, "bad_request", "a header line without a colon")
        if _CONTROL.search(value):
            return HeadViolation(400, "control_char", f"header {name.decode('latin-1')!r} has a control byte")
        lower = name.lower()
        if lower == b"transfer-encoding":
            transfer_encodings.append(value)
        elif lower == b"content-length":
            content_lengths.append(value)
    if transfer_encodings and content_lengths:
        return HeadViolation(400, "te_and_cl", "both Transfer-Encoding and Content-Length")
    if transfer_encodings:
        if request_line.endswith(b"HTTP/1.0"):
            return HeadViolation(400, "te_http10", "Transfer-Encoding in an HTTP/1.0 request")
        if len(transfer_encodings) > 1 or not _TE_CHUNKED.fullmatch(transfer_encodings[0]):
            shown = b", ".join(transfer_encodings).decode("latin-1")
            return HeadViolation(
                400, "bad_transfer_encoding", f"Transfer-Encoding {shown!r} is not 'chunked'"
            )
    if content_lengths and (len(content_lengths) > 1 or not _CONTENT_LENGTH.fullmatch(content_lengths[0])):
        shown = b", ".join(content_lengths).decode("latin-1")
        return HeadViolation(400, "bad_content_length", f"Content-Length {shown!r} is not one decimal number")
    return None


def _check_request_line(line: bytes) -> HeadViolation | None:
    parts = line.split(b" ")
    if len(parts) != 3:
        return HeadViolation(400, "bad_request", "the request line is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _VERSION.fullmatch(version):
        return HeadViolation(505, "http_version", f"version {version.decode('latin-1')!r} is not supported")
    if method == b"CONNECT":
        return HeadViolation(405, "connect_method", "CONNECT is not proxied by the waypoint")
    if not (target.startswith(b"/") or (target == b"*" and method == b"OPTIONS")):
        return HeadViolation(400, "target_form", "the request target is not origin-form (/path)")
    return None


@dataclass(slots=True)
class ParsedRequestHead:
    """A request head as llhttp parsed it: names lower-cased, values without surrounding whitespace."""

    method: str
    target: str
    http10: bool  # HTTP/1.0 (else HTTP/1.1: check_request_head admits nothing else)
    headers: list[tuple[str, str]]


class _HeadCollector:
    """httptools callbacks for one head."""

    __slots__ = ("complete", "headers", "target")

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[str, str]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(head: bytes) -> ParsedRequestHead | HeadViolation:
    """Parse a head `check_request_head` admitted (request line to the empty line, nothing more)."""
    collector = _HeadCollector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # Upgrade with Connection: upgrade; the head is complete, the response decides the rest
    except httptools.HttpParserError as e:
        return HeadViolation(400, "bad_request", f"malformed request head: {e}")
    if not collector.complete:
        return HeadViolation(400, "bad_request", "the request head is incomplete")
    http10 = parser.get_http_version() == "1.0"
    hosts = sum(1 for name, _ in collector.headers if name == "host")
    if hosts > 1:
        return HeadViolation(400, "multiple_host", f"{hosts} Host headers")
    if not hosts and not http10:
        return HeadViolation(400, "missing_host", "an HTTP/1.1 request without Host")
    return ParsedRequestHead(
        parser.get_method().decode("ascii"), collector.target.decode("latin-1"), http10, collector.headers
    )
