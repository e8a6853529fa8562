"""x-request-id and W3C traceparent handling: generated when missing or invalid, propagated as a
proxy does (same trace, new span), tracestate kept only with the trace it belongs to."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.telemetry import (
    TraceParent,
    ensure_request_id,
    parse_traceparent,
    propagate_trace,
    uuid4_text,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACEPARENT_SHAPE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


def counting_bytes() -> Callable[[int], bytes]:
    """A deterministic random source: 0x11, 0x22, ... repeated to the size asked."""
    counter = itertools.count(1)

    def take(size: int) -> bytes:
        return bytes([(next(counter) * 0x11) & 0xFF]) * size

    return take


def traceparent_of(headers: tuple[tuple[str, str], ...]) -> str:
    [value] = [v for k, v in headers if k == "traceparent"]
    return value


# --- x-request-id ------------------------------------------------------------------------------------


def test_request_id_generated_when_missing() -> None:
    headers, request_id = ensure_request_id((("host", "a"),))
    assert uuid.UUID(request_id).version == 4
    assert headers == (("host", "a"), ("x-request-id", request_id))


def test_request_id_kept_when_present() -> None:
    given_id = "84961386-6d84-929d-98bd-c5aee93b5c88"
    headers, request_id = ensure_request_id((("x-request-id", given_id), ("host", "a")), lambda: "new")
    assert request_id == given_id
    assert headers == (("x-request-id", given_id), ("host", "a"))


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "has space", "a" * 257, "tab\there", "caf\u00e9", "nul\x00"],
    ids=["empty", "blank", "space", "too-long", "tab", "non-ascii", "nul"],
)
def test_unusable_request_id_is_replaced_in_place(bad: str) -> None:
    headers, request_id = ensure_request_id(
        (("host", "a"), ("x-request-id", bad), ("accept", "*/*")), lambda: "new"
    )
    assert request_id == "new"
    assert headers == (("host", "a"), ("x-request-id", "new"), ("accept", "*/*"))


def test_duplicate_request_ids_collapse_to_the_first() -> None:
    headers, request_id = ensure_request_id(
        (("X-Request-Id", "first"), ("host", "a"), ("x-request-id", "second")), lambda: "new"
    )
    assert request_id == "first"
    assert headers == (("x-request-id", "first"), ("host", "a"))


def test_request_id_of_maximum_length_is_kept() -> None:
    longest = "r" * 256
    assert ensure_request_id((("x-request-id", longest),))[1] == longest


# --- traceparent -------------------------------------------------------------------------------------


def test_new_trace_when_missing() -> None:
    headers = propagate_trace((("host", "a"),), counting_bytes())
    # First random draw is the span id (8 bytes of 0x11), then the trace id (16 bytes of 0x22).
    assert headers == (("host", "a"), ("traceparent", f"00-{'22' * 16}-{'11' * 8}-01"))


def test_new_trace_with_real_randomness_has_the_w3c_shape() -> None:
    first = traceparent_of(propagate_trace(()))
    second = traceparent_of(propagate_trace(()))
    assert TRACEPARENT_SHAPE.match(first) and first.endswith("-01")
    assert first.split("-")[1] != second.split("-")[1]


def test_valid_parent_keeps_the_trace_and_gets_a_child_span() -> None:
    headers = propagate_trace(
        (("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE"), ("host", "a")), counting_bytes()
    )
    assert headers == (
        ("traceparent", f"00-{TRACE_ID}-{'11' * 8}-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("host", "a"),
    )


def test_unsampled_flag_is_kept() -> None:
    headers = propagate_trace((("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"),), counting_bytes())
    assert traceparent_of(headers) == f"00-{TRACE_ID}-{'11' * 8}-00"


def test_a_later_version_is_parsed_and_sent_as_version_00() -> None:
    headers = propagate_trace(
        (("traceparent", f"cc-{TRACE_ID}-{PARENT_ID}-03-what-the-future-holds"),), counting_bytes()
    )
    assert traceparent_of(headers) == f"00-{TRACE_ID}-{'11' * 8}-01"


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
    headers = propagate_trace(
        (("host", "a"), ("traceparent", value), ("tracestate", "congo=t61rcWkgMzE")), counting_bytes()
    )
    assert headers == (("host", "a"), ("traceparent", f"00-{'22' * 16}-{'11' * 8}-01"))


def test_two_traceparents_are_invalid() -> None:
    headers = propagate_trace(
        (("traceparent", VALID), ("tracestate", "a=b"), ("Traceparent", VALID)), counting_bytes()
    )
    assert headers == (("traceparent", f"00-{'22' * 16}-{'11' * 8}-01"),)


def test_tracestate_without_a_traceparent_is_dropped() -> None:
    headers = propagate_trace((("tracestate", "a=b"),), counting_bytes())
    assert [k for k, _ in headers] == ["traceparent"]


def test_surrounding_whitespace_is_tolerated() -> None:
    parsed = parse_traceparent(f" {VALID}\t")
    assert parsed == TraceParent(TRACE_ID, PARENT_ID, 1, 0)
    assert parsed is not None and parsed.sampled and str(parsed) == VALID


def test_an_all_zero_random_source_is_retried_then_refused() -> None:
    draws = iter([b"\x00" * 8, b"\x07" * 8, b"\x09" * 16])
    headers = propagate_trace((), lambda size: next(draws))
    assert traceparent_of(headers) == f"00-{'09' * 16}-{'07' * 8}-01"
    with pytest.raises(RuntimeError, match="only zero bytes"):
        propagate_trace((), lambda size: b"\x00" * size)


@given(
    st.one_of(
        st.text(max_size=80),
        st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[a-z]{0,4})?", fullmatch=True),
    )
)
def test_any_input_yields_one_well_formed_traceparent(value: str) -> None:
    headers = propagate_trace((("traceparent", value), ("x", "y")))
    result = traceparent_of(headers)
    assert TRACEPARENT_SHAPE.match(result)
    parsed = parse_traceparent(value)
    if parsed is not None:
        assert result.split("-")[1] == parsed.trace_id
        assert result.split("-")[2] != parsed.parent_id  # equal with probability 2^-64


@given(st.integers(min_value=0, max_value=(1 << 128) - 1))
def test_request_ids_are_the_uuid4_the_uuid_module_makes_of_the_same_bits(bits: int) -> None:
    assert uuid4_text(bits) == str(uuid.UUID(int=bits, version=4))
