"""HTTP/2 request validation (the H2 -> H1 injection defence), hop-by-hop removal, route header edits
and the headers the waypoint adds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.hbone.headers import parse_traceparent
from waypoint.model import HeaderEdits
from waypoint.proxy.headers import (
    MalformedRequest,
    apply_edits,
    join_cookies,
    prepare_request_headers,
    strip_hop_by_hop,
    valid_value,
    validate_h2_request,
    validate_trailers,
)
from waypoint.proxy.message import RequestHead
from waypoint.telemetry import request_id_for, traceparent_for

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web:80"), (b":path", b"/a?b=1")]


def validate(headers: list[tuple[bytes, bytes]], end_stream: bool = True) -> RequestHead:
    return validate_h2_request(headers, max_headers=20, max_bytes=4096, end_stream=end_stream)


def test_valid_request() -> None:
    head = validate(
        [*BASE, (b"x-a", b"1"), (b"te", b"trailers"), (b"content-length", b"3")], end_stream=False
    )
    assert (head.method, head.authority, head.target, head.scheme) == ("GET", "web:80", "/a?b=1", "http")
    assert head.headers == [("x-a", "1")]
    assert head.te_trailers and head.content_length == 3 and head.has_body
    assert not validate(BASE).has_body
    host_only = validate([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"h")])
    assert host_only.authority == "h"
    star = validate(
        [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"*")]
    )
    assert star.target == "*"


REFUSED = [
    ("cr in value", [*BASE, (b"x-a", b"a\rb")], "header_injection", None),
    ("lf in value", [*BASE, (b"x-a", b"a\nGET / HTTP/1.1")], "header_injection", None),
    ("nul in value", [*BASE, (b"x-a", b"a\x00")], "header_injection", None),
    ("control in value", [*BASE, (b"x-a", b"a\x07")], "header_injection", None),
    ("leading space", [*BASE, (b"x-a", b" a")], "header_whitespace", None),
    ("trailing tab", [*BASE, (b"x-a", b"a\t")], "header_whitespace", None),
    ("uppercase", [*BASE, (b"X-A", b"1")], "uppercase_header", None),
    ("space in name", [*BASE, (b"x a", b"1")], "bad_header_name", None),
    ("colon in name", [*BASE, (b"x:a", b"1")], "bad_header_name", None),
    ("empty name", [*BASE, (b"", b"1")], "bad_header_name", None),
    ("connection", [*BASE, (b"connection", b"close")], "connection_header", None),
    ("keep-alive", [*BASE, (b"keep-alive", b"1")], "connection_header", None),
    ("proxy-connection", [*BASE, (b"proxy-connection", b"1")], "connection_header", None),
    ("transfer-encoding", [*BASE, (b"transfer-encoding", b"chunked")], "connection_header", None),
    ("upgrade", [*BASE, (b"upgrade", b"h2c")], "connection_header", None),
    ("te gzip", [*BASE, (b"te", b"gzip")], "bad_te", None),
    ("te list", [*BASE, (b"te", b"trailers, gzip")], "bad_te", None),
    ("method with spaces", [(b":method", b"GET /x HTTP/1.1"), *BASE[1:]], "bad_method", None),
    ("missing method", BASE[1:], "pseudo_header", None),
    ("duplicate method", [*BASE, (b":method", b"POST")], "pseudo_header", None),
    ("pseudo after regular", [*BASE[:2], (b"x", b"1"), *BASE[2:]], "pseudo_header", None),
    ("response pseudo", [*BASE, (b":status", b"200")], "pseudo_header", None),
    ("protocol pseudo", [*BASE, (b":protocol", b"websocket")], "pseudo_header", None),
    ("bad scheme", [BASE[0], (b":scheme", b"ftp"), *BASE[2:]], "pseudo_header", None),
    ("empty path", [*BASE[:3], (b":path", b"")], "pseudo_header", None),
    ("relative path", [*BASE[:3], (b":path", b"admin")], "bad_path", None),
    ("asterisk with GET", [*BASE[:3], (b":path", b"*")], "bad_path", None),
    ("space in path", [*BASE[:3], (b":path", b"/a b")], "bad_path", None),
    ("non-ascii path", [*BASE[:3], (b":path", b"/caf\xc3\xa9")], "bad_path", None),
    ("host mismatch", [*BASE, (b"host", b"other")], "authority_mismatch", None),
    ("two hosts", [*BASE[:2], BASE[3], (b"host", b"a"), (b"host", b"a")], "authority_mismatch", None),
    ("no authority", [BASE[0], BASE[1], BASE[3]], "bad_authority", None),
    ("authority with space", [*BASE[:2], (b":authority", b"a b"), BASE[3]], "bad_authority", None),
    ("connect", [(b":method", b"CONNECT"), (b":authority", b"a:1")], "connect_method", 405),
    ("too many headers", BASE + [(b"x-%d" % i, b"1") for i in range(20)], "too_many_headers", 431),
    ("list too large", [*BASE, (b"x-big", b"a" * 5000)], "header_list_too_large", 431),
]


@pytest.mark.parametrize(
    ("headers", "reason", "status"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused(headers: list[tuple[bytes, bytes]], reason: str, status: int | None) -> None:
    with pytest.raises(MalformedRequest) as refused:
        validate(headers)
    assert (refused.value.reason, refused.value.status) == (reason, status)


def test_host_equal_to_authority_in_another_case_is_accepted() -> None:
    assert validate([*BASE, (b"host", b"WEB:80")]).authority == "web:80"


def test_trailers() -> None:
    assert validate_trailers([(b"grpc-status", b"0")], max_headers=5, max_bytes=100) == [("grpc-status", "0")]
    for bad in ([(b":path", b"/")], [(b"x", b"a\r\nb")], [(b"connection", b"x")]):
        with pytest.raises(MalformedRequest):
            validate_trailers(bad, max_headers=5, max_bytes=100)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=12))
def test_what_passes_can_never_inject_into_http1(headers: list[tuple[bytes, bytes]]) -> None:
    try:
        head = validate([*BASE, *headers])
    except MalformedRequest:
        return
    for name, value in [("method", head.method), ("target", head.target), ("authority", head.authority)]:
        assert not any(c in value for c in " \r\n\x00"), name
    for name, value in head.headers:
        assert valid_value(value) and name == name.lower()
        assert name not in ("connection", "transfer-encoding", "upgrade", "keep-alive", "host", "te")


def test_strip_hop_by_hop_includes_connection_tokens() -> None:
    headers = [("connection", "x-secret, close"), ("x-secret", "1"), ("keep-alive", "5"), ("x-ok", "2")]
    assert strip_hop_by_hop(headers) == [("x-ok", "2")]


def test_apply_edits() -> None:
    headers = [("x-a", "1"), ("x-a", "2"), ("x-b", "3"), ("content-length", "9")]
    edits = HeaderEdits(
        set=(("X-A", "new"), ("content-length", "0"), ("x-bad", "a\nb")),
        add=(("x-b", "4"), ("transfer-encoding", "chunked"), ("Bad Name", "x")),
        remove=("x-gone", "content-length"),
    )
    assert apply_edits(headers, edits) == [
        ("x-b", "3"),
        ("content-length", "9"),
        ("x-a", "new"),
        ("x-b", "4"),
    ]
    assert apply_edits(headers, HeaderEdits(remove=("X-A",))) == [("x-b", "3"), ("content-length", "9")]


def test_prepare_request_headers() -> None:
    headers = [("x-forwarded-client-cert", "By=forged"), ("x-forwarded-proto", "gopher")]
    prepare_request_headers(headers)
    names = dict(headers)
    assert "x-forwarded-client-cert" not in names and names["x-forwarded-proto"] == "http"
    assert len(names["x-request-id"]) == 36 and parse_traceparent(names["traceparent"]) is not None
    kept = [("x-request-id", "abc-1"), ("traceparent", names["traceparent"]), ("x-forwarded-proto", "https")]
    again = list(kept)
    prepare_request_headers(again)
    assert dict(again)["x-request-id"] == "abc-1" and dict(again)["x-forwarded-proto"] == "https"
    parent, child = parse_traceparent(names["traceparent"]), parse_traceparent(dict(again)["traceparent"])
    assert parent is not None and child is not None
    assert child.trace_id == parent.trace_id and child.parent_id != parent.parent_id  # this hop's span
    invalid = [("x-request-id", "bad id\t"), ("traceparent", "00-zz")]
    prepare_request_headers(invalid)
    assert dict(invalid)["x-request-id"] != "bad id\t" and dict(invalid)["traceparent"] != "00-zz"


def rule_by_rule(
    headers: list[tuple[str, str]], request_id: str, traceparent: str, continued: bool
) -> list[tuple[str, str]]:
    """What prepare_request_headers must do, one rule at a time (the test's oracle), given the ids
    request_id_for and traceparent_for chose: drop forgeable identity headers; the request id in the
    place of the client's first x-request-id (others dropped) or appended; this hop's traceparent in
    the place of the client's first (others dropped) or appended, tracestate kept only when the trace
    continues; x-forwarded-proto kept when its first value is http or https, else replaced at the end."""
    step = [(n, v) for n, v in headers if n != "x-forwarded-client-cert"]
    for name, value in (("x-request-id", request_id), ("traceparent", traceparent)):
        places = [i for i, (n, _) in enumerate(step) if n == name]
        if places:
            step = [(name, value) if i == places[0] else h for i, h in enumerate(step) if i not in places[1:]]
        else:
            step.append((name, value))
    if not continued:
        step = [(n, v) for n, v in step if n != "tracestate"]
    proto = next((v for n, v in step if n == "x-forwarded-proto"), None)
    if proto not in ("http", "https"):
        step = [(n, v) for n, v in step if n != "x-forwarded-proto"] + [("x-forwarded-proto", "http")]
    return step


_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_HEADER_CHOICES = st.sampled_from(
    [
        ("x-request-id", "abc-1"),
        ("x-request-id", " spaced "),
        ("x-request-id", "bad id"),
        ("traceparent", _TRACE),
        ("traceparent", "00-zz"),
        ("tracestate", "a=b"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-client-cert", "By=forged"),
        ("host", "web"),
        ("x-other", "1"),
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_HEADER_CHOICES, max_size=8), st.integers(min_value=0, max_value=2**32))
def test_prepare_request_headers_applies_each_rule(headers: list[tuple[str, str]], seed: int) -> None:
    prepared = list(headers)
    prepare_request_headers(prepared, new_id=lambda: "generated", random_bytes=random.Random(seed).randbytes)
    client_id = next((v for n, v in headers if n == "x-request-id"), None)
    parents = [v for n, v in headers if n == "traceparent"]
    traceparent, continued = traceparent_for(parents, random.Random(seed).randbytes)
    request_id = request_id_for(client_id, lambda: "generated")
    assert prepared == rule_by_rule(headers, request_id, traceparent, continued)


def test_join_cookies() -> None:
    assert join_cookies([("cookie", "a=1"), ("x", "y"), ("cookie", "b=2")]) == [
        ("x", "y"),
        ("cookie", "a=1; b=2"),
    ]
    assert join_cookies([("cookie", "a=1")]) == [("cookie", "a=1")]
