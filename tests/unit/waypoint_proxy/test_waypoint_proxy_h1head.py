"""Raw HTTP/1.1 request-head checks (the smuggling defences a lenient parser leaves to us) and the
llhttp parse behind them, table-driven, plus property tests: any bytes either pass or give a
violation, never an exception, and whatever passes has one unambiguous body framing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.proxy.h1head import (
    HeadViolation,
    ParsedRequestHead,
    check_request_head,
    find_head_end,
    parse_request_head,
)

OK = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"

CASES = [
    ("plain GET", OK, None),
    ("HTTP/1.0", b"GET / HTTP/1.0\r\n\r\n", None),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: web\r\n\r\n", None),
    ("chunked", b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    ("chunked any case", b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: CHUNKED\r\n\r\n", None),
    ("content-length", b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\n\r\n", None),
    ("tab inside a value", b"GET / HTTP/1.1\r\nHost: w\r\nX-A: a\tb\r\n\r\n", None),
    ("obs-text value", b"GET / HTTP/1.1\r\nHost: w\r\nX-A: caf\xe9\r\n\r\n", None),
    (
        "te and cl",
        b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "te_and_cl",
    ),
    (
        "te twice",
        b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "bad_transfer_encoding",
    ),
    ("te tab", b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding:\tchunked\r\n\r\n", "bad_transfer_encoding"),
    (
        "te trailing tab",
        b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\t\r\n\r\n",
        "bad_transfer_encoding",
    ),
    (
        "te list",
        b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "bad_transfer_encoding",
    ),
    (
        "te vertical tab",
        b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: \x0bchunked\r\n\r\n",
        "control_char",
    ),
    ("te in 1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "te_http10"),
    (
        "cl twice",
        b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        "bad_content_length",
    ),
    ("cl negative", b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: -1\r\n\r\n", "bad_content_length"),
    (
        "cl huge",
        b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 1234567890123456789012\r\n\r\n",
        "bad_content_length",
    ),
    ("bare lf", b"GET / HTTP/1.1\nHost: w\n\n", "bare_lf"),
    ("bare cr", b"GET / HTTP/1.1\r\nHost: w\rX: 1\r\n\r\n", "bare_cr"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: w\r\n\tfolded\r\n\r\n", "obs_fold"),
    ("nul", b"GET / HTTP/1.1\r\nHost: w\r\nX: \x00\r\n\r\n", "control_char"),
    ("del", b"GET / HTTP/1.1\r\nHost: w\r\nX: a\x7fb\r\n\r\n", "control_char"),
    ("no colon", b"GET / HTTP/1.1\r\nHost: w\r\nnocolon\r\n\r\n", "bad_request"),
    ("version 2", b"GET / HTTP/2.0\r\n\r\n", "http_version"),
    ("version 0.9 style", b"GET /\r\n\r\n", "bad_request"),
    ("connect", b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", "connect_method"),
    ("absolute form", b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "target_form"),
    ("asterisk GET", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "target_form"),
]


@pytest.mark.parametrize(("head", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_request_head(head: bytes, reason: str | None) -> None:
    end = find_head_end(head)
    assert end == len(head)
    violation = check_request_head(head[:end], max_headers=100)
    assert (violation.reason if violation else None) == reason


@pytest.mark.parametrize(
    ("head", "status"), [(b"GET / HTTP/2.0\r\n\r\n", 505), (b"CONNECT a:1 HTTP/1.1\r\n\r\n", 405)]
)
def test_statuses(head: bytes, status: int) -> None:
    violation = check_request_head(head, max_headers=10)
    assert violation is not None and violation.status == status


def test_header_count() -> None:
    many = b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 11 + b"\r\n"
    violation = check_request_head(many, max_headers=10)
    assert violation is not None and (violation.status, violation.reason) == (431, "too_many_headers")


@pytest.mark.parametrize(
    ("buffer", "end"),
    [
        (b"", None),
        (b"GET / HTTP/1.1\r\nHost: w\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: w\r\n\r\nbody", 27),
        (b"GET / HTTP/1.1\nHost: w\n\nbody", 24),
        (b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", 18),
    ],
)
def test_find_head_end(buffer: bytes, end: int | None) -> None:
    assert find_head_end(buffer) == end


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    head = data + b"\r\n\r\n"
    end = find_head_end(head)
    assert end is not None
    violation = check_request_head(head[:end], max_headers=20)
    assert violation is None or 400 <= violation.status <= 505


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"X-A", b"Host", b"Content-Length", b"Transfer-Encoding", b"Te", b"Upgrade"]),
            st.binary(max_size=12),
        ),
        max_size=6,
    )
)
def test_heads_that_pass_are_parsed_with_one_framing(fields: list[tuple[bytes, bytes]]) -> None:
    head = b"POST /p HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    if check_request_head(head, max_headers=20) is not None:
        return
    parsed = parse_request_head(head)
    if isinstance(parsed, HeadViolation):
        assert parsed.status == 400  # llhttp refuses what we let through (e.g. no Host): also a refusal
        return
    names = [n for n, _ in parsed.headers]
    # Whatever passed both has at most one framing header, so the body length is unambiguous.
    assert names.count("transfer-encoding") + names.count("content-length") <= 1
    assert names.count("host") == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parsing_arbitrary_heads_never_raises(data: bytes) -> None:
    head = b"GET /" + data + b"\r\nHost: w\r\n\r\n"
    end = find_head_end(head)
    assert end is not None
    result = parse_request_head(head[:end])
    assert isinstance(result, (ParsedRequestHead, HeadViolation))


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (
            b"GET /a?b=1 HTTP/1.1\r\nHost: web\r\nX-Mixed-Case:  spaced value \t\r\n\r\n",
            ParsedRequestHead("GET", "/a?b=1", False, [("host", "web"), ("x-mixed-case", "spaced value")]),
        ),
        (b"GET / HTTP/1.0\r\n\r\n", ParsedRequestHead("GET", "/", True, [])),
        (
            b"GET /ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            ParsedRequestHead(
                "GET", "/ws", False, [("host", "w"), ("connection", "Upgrade"), ("upgrade", "websocket")]
            ),
        ),
        (b"OPTIONS * HTTP/1.1\r\nHost: w\r\n\r\n", ParsedRequestHead("OPTIONS", "*", False, [("host", "w")])),
        (b"GET / HTTP/1.1\r\n\r\n", HeadViolation(400, "missing_host", "an HTTP/1.1 request without Host")),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            HeadViolation(400, "multiple_host", "2 Host headers"),
        ),
        (
            b"FROB / HTTP/1.1\r\nHost: w\r\n\r\n",
            HeadViolation(400, "bad_request", "malformed request head: Invalid method encountered"),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: w\r\nX(A): y\r\n\r\n",
            HeadViolation(400, "bad_request", "malformed request head: Invalid header token"),
        ),
    ],
)
def test_parse_request_head(head: bytes, expected: ParsedRequestHead | HeadViolation) -> None:
    assert check_request_head(head, max_headers=20) is None
    assert parse_request_head(head) == expected
