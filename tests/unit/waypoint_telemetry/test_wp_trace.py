"""x-request-id and W3C traceparent handling: generated when missing or invalid, propagated as a
proxy does (same trace, new span), tracestate kept only with the trace it belongs to; the rules
(`request_id_for`, `traceparent_for`) and where the waypoint puts their results in a request
(`prepare_request_headers`)."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.proxy.headers import prepare_request_headers
from waypoint.telemetry import (
    TraceParent,
    parse_traceparent,
    request_id_for,
    traceparent_for,
    uuid4_text,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACEPARENT_SHAPE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
# What counting_bytes() makes of a request without a usable traceparent: span 0x11.., trace 0x22...
NEW_TRACE = f"00-{'22' * 16}-{'11' * 8}-01"
PROTO = ("x-forwarded-proto", "http")  # added to every request that came without one


def counting_bytes() -> Callable[[int], bytes]:
    """A deterministic random source: 0x11, 0x22, ... repeated to the size asked."""
    counter = itertools.count(1)

    def take(size: int) -> bytes:
        return bytes([(next(counter) * 0x11) & 0xFF]) * size

    return take


def prepared(*headers: tuple[str, str]) -> list[tuple[str, str]]:
    """The request's headers after prepare_request_headers, with new ids "new" and counting bytes."""
    result = list(headers)
    prepare_request_headers(result, new_id=lambda: "new", random_bytes=counting_bytes())
    return result


# --- x-request-id ------------------------------------------------------------------------------------


def test_request_id_generated_when_missing() -> None:
    assert uuid.UUID(request_id_for(None)).version == 4
    headers = prepared(("host", "a"))
    assert headers == [("host", "a"), ("x-request-id", "new"), ("traceparent", NEW_TRACE), PROTO]


def test_request_id_kept_when_present() -> None:
    given_id = "84961386-6d84-929d-98bd-c5aee93b5c88"
    assert request_id_for(given_id, lambda: "new") == given_id
    assert prepared(("x-request-id", given_id), ("host", "a"))[:2] == [
        ("x-request-id", given_id),
        ("host", "a"),
    ]


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "has space", "a" * 257, "tab\there", "caf\u00e9", "nul\x00"],
    ids=["empty", "blank", "space", "too-long", "tab", "non-ascii", "nul"],
)
def test_unusable_request_id_is_replaced_in_place(bad: str) -> None:
    assert request_id_for(bad, lambda: "new") == "new"
    headers = prepared(("host", "a"), ("x-request-id", bad), ("accept", "*/*"))
    assert headers[:3] == [("host", "a"), ("x-request-id", "new"), ("accept", "*/*")]


def test_duplicate_request_ids_collapse_to_the_first() -> None:
    headers = prepared(("x-request-id", "first"), ("host", "a"), ("x-request-id", "second"))
    assert headers == [("x-request-id", "first"), ("host", "a"), ("traceparent", NEW_TRACE), PROTO]


def test_request_id_of_maximum_length_is_kept() -> None:
    longest = "r" * 256
    assert request_id_for(longest) == longest
    assert request_id_for(f" {longest}\t") == longest  # surrounding whitespace is not part of it


# --- traceparent -------------------------------------------------------------------------------------


def test_new_trace_when_missing() -> None:
    # First random draw is the span id (8 bytes of 0x11), then the trace id (16 bytes of 0x22).
    assert traceparent_for([], counting_bytes()) == (NEW_TRACE, False)
    assert prepared(("host", "a")) == [
        ("host", "a"),
        ("x-request-id", "new"),
        ("traceparent", NEW_TRACE),
        PROTO,
    ]


def test_new_trace_with_real_randomness_has_the_w3c_shape() -> None:
    first, _ = traceparent_for([])
    second, _ = traceparent_for([])
    assert TRACEPARENT_SHAPE.match(first) and first.endswith("-01")
    assert first.split("-")[1] != second.split("-")[1]


def test_valid_parent_keeps_the_trace_and_gets_a_child_span() -> None:
    assert traceparent_for([VALID], counting_bytes()) == (f"00-{TRACE_ID}-{'11' * 8}-01", True)
    headers = prepared(("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE"), ("host", "a"))
    assert headers[:3] == [
        ("traceparent", f"00-{TRACE_ID}-{'11' * 8}-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("host", "a"),
    ]


def test_unsampled_flag_is_kept() -> None:
    value, continued = traceparent_for([f"00-{TRACE_ID}-{PARENT_ID}-00"], counting_bytes())
    assert (value, continued) == (f"00-{TRACE_ID}-{'11' * 8}-00", True)


def test_a_later_version_is_parsed_and_sent_as_version_00() -> None:
    value, _ = traceparent_for([f"cc-{TRACE_ID}-{PARENT_ID}-03-what-the-future-holds"], counting_bytes())
    assert value == f"00-{TRACE_ID}-{'11' * 8}-01"


INVALID_PARENTS = {
    "upper-case": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "zero-trace": f"00-{'0' * 32}-{PARENT_ID}-01",
    "zero-parent": f"00-{TRACE_ID}-{'0' * 16}-01",
    "version-ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "version-00-extra-field": f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
    "later-version-no-dash": f"01-{TRACE_ID}-{PARENT_ID}-01x",
    "short-trace": f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    "long-parent": f"00-{TRACE_ID}-{PARENT_ID}0-01",
    "not-hex": f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01",
    "empty": "",
    "garbage": "hello",
}


@pytest.mark.parametrize("value", list(INVALID_PARENTS.values()), ids=list(INVALID_PARENTS))
def test_invalid_parent_restarts_the_trace_and_drops_tracestate(value: str) -> None:
    assert parse_traceparent(value) is None
    assert traceparent_for([value], counting_bytes()) == (NEW_TRACE, False)
    headers = prepared(("host", "a"), ("traceparent", value), ("tracestate", "congo=t61rcWkgMzE"))
    assert headers == [("host", "a"), ("traceparent", NEW_TRACE), ("x-request-id", "new"), PROTO]


def test_two_traceparents_are_invalid() -> None:
    assert traceparent_for([VALID, VALID], counting_bytes()) == (NEW_TRACE, False)
    headers = prepared(("traceparent", VALID), ("tracestate", "a=b"), ("traceparent", VALID))
    assert headers == [("traceparent", NEW_TRACE), ("x-request-id", "new"), PROTO]


def test_tracestate_without_a_traceparent_is_dropped() -> None:
    assert [k for k, _ in prepared(("tracestate", "a=b"))] == ["x-request-id", "traceparent", PROTO[0]]


def test_surrounding_whitespace_is_tolerated() -> None:
    parsed = parse_traceparent(f" {VALID}\t")
    assert parsed == TraceParent(TRACE_ID, PARENT_ID, 1, 0)
    assert parsed is not None and parsed.sampled and str(parsed) == VALID


def test_an_all_zero_random_source_is_retried_then_refused() -> None:
    draws = iter([b"\x00" * 8, b"\x07" * 8, b"\x09" * 16])
    assert traceparent_for([], lambda size: next(draws)) == (f"00-{'09' * 16}-{'07' * 8}-01", False)
    with pytest.raises(RuntimeError, match="only zero bytes"):
        traceparent_for([], lambda size: b"\x00" * size)


@given(
    st.one_of(
        st.text(max_size=80),
        st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[a-z]{0,4})?", fullmatch=True),
    )
)
def test_any_input_yields_one_well_formed_traceparent(value: str) -> None:
    headers = [("traceparent", value), ("x", "y")]
    prepare_request_headers(headers)
    [result] = [v for k, v in headers if k == "traceparent"]
    assert TRACEPARENT_SHAPE.match(result)
    parsed = parse_traceparent(value)
    if parsed is not None:
        assert result.split("-")[1] == parsed.trace_id
        assert result.split("-")[2] != parsed.parent_id  # equal with probability 2^-64


@given(st.integers(min_value=0, max_value=(1 << 128) - 1))
def test_request_ids_are_the_uuid4_the_uuid_module_makes_of_the_same_bits(bits: int) -> None:
    assert uuid4_text(bits) == str(uuid.UUID(int=bits, version=4))
