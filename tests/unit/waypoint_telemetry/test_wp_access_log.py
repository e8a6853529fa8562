"""The access log line: Istio's default TEXT format field for field (golden lines), "-" for absent
values, one line per request whatever the headers hold, and a sink that never fails a request."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import logging
import re
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.model import Peer
from waypoint.telemetry import (
    AccessLog,
    AccessLogEntry,
    _format_escaped,
    format_access_log,
    format_start_time,
    upstream_cluster_name,
)

from .builders import CLIENT, endpoint, request, service_ref

T0 = dt.datetime(2020, 11, 25, 21, 26, 18, 409000, tzinfo=dt.UTC).timestamp()

# Istio's documented example line of its default format (docs: tasks/observability/logs/access-log).
ISTIO_EXAMPLE = (
    '[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" 418 - via_upstream - "-" 0 135 4 4 "-" '
    '"curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000" "10.44.1.27:80" '
    "outbound|8000||httpbin.foo.svc.cluster.local 10.44.1.23:37652 10.0.45.184:8000 10.44.1.23:46520 "
    "- default"
)


def test_the_istio_documentation_example() -> None:
    entry = AccessLogEntry(
        start_time=T0,
        method="GET",
        path="/status/418",
        protocol="HTTP/1.1",
        response_code=418,
        response_flags="-",
        response_code_details="via_upstream",
        bytes_received=0,
        bytes_sent=135,
        duration_ms=4,
        upstream_service_time_ms=4,
        user_agent="curl/7.73.0-DEV",
        request_id="84961386-6d84-929d-98bd-c5aee93b5c88",
        authority="httpbin:8000",
        upstream_host="10.44.1.27:80",
        upstream_cluster="outbound|8000||httpbin.foo.svc.cluster.local",
        upstream_local_address="10.44.1.23:37652",
        downstream_local_address="10.0.45.184:8000",
        downstream_remote_address="10.44.1.23:46520",
        route_name="default",
    )
    assert format_access_log(entry) == ISTIO_EXAMPLE


def test_everything_absent_prints_dashes() -> None:
    entry = AccessLogEntry(start_time=T0, method="", path="", protocol="", response_code=0)
    assert format_access_log(entry) == (
        '[2020-11-25T21:26:18.409Z] "- - -" 0 - - - "-" 0 0 - - "-" "-" "-" "-" "-" - - - - - -'
    )


def test_entry_for_a_request_through_the_waypoint() -> None:
    view = request(
        path="/reviews/1",
        query="u=normal",
        headers=(
            ("user-agent", "curl/8.5.0"),
            ("x-request-id", "0f1e2d3c-aaaa-4bbb-8ccc-123456789abc"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ),
    )
    entry = AccessLogEntry.for_request(
        view,
        T0,
        200,
        response_code_details="via_upstream",
        bytes_received=0,
        bytes_sent=295,
        duration_ms=7,
        upstream_service_time_ms=6,
        endpoint=endpoint(),
        route_name="bookinfo/reviews",
        upstream_local_address="10.244.3.3:51000",
    )
    assert format_access_log(entry) == (
        '[2020-11-25T21:26:18.409Z] "GET /reviews/1?u=normal HTTP/1.1" 200 - via_upstream - "-" 0 295 7 6 '
        '"10.0.0.1,10.0.0.2" "curl/8.5.0" "0f1e2d3c-aaaa-4bbb-8ccc-123456789abc" "reviews.bookinfo:9080" '
        '"10.244.2.9:9080" inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local 10.244.3.3:51000 '
        "10.96.0.20:9080 10.244.1.7:41234 - bookinfo/reviews"
    )


def test_entry_takes_the_first_of_repeated_headers_and_an_explicit_request_id() -> None:
    view = request(
        headers=(
            ("x-request-id", "first-id"),
            ("user-agent", "first-agent"),
            ("x-forwarded-for", "10.0.0.1"),
            ("user-agent", "second-agent"),
            ("x-request-id", "second-id"),
            ("x-forwarded-for", "10.0.0.2"),
        )
    )
    entry = AccessLogEntry.for_request(view, T0, 200)
    assert (entry.user_agent, entry.request_id, entry.x_forwarded_for) == (
        "first-agent",
        "first-id",
        "10.0.0.1,10.0.0.2",
    )
    assert AccessLogEntry.for_request(view, T0, 200, request_id="generated").request_id == "generated"
    assert AccessLogEntry.for_request(request(), T0, 200).request_id == ""


def test_entry_for_a_denied_request() -> None:
    entry = AccessLogEntry.for_request(
        request(method="DELETE", path="/admin"),
        T0,
        403,
        response_code_details="rbac_access_denied_matched_policy[ns[bookinfo]-policy[deny-admin]-rule[0]]",
        bytes_sent=19,
        duration_ms=0,
        request_id="generated-id",
        service=service_ref("reviews-canary"),
    )
    line = format_access_log(entry)
    assert line.startswith(
        '[2020-11-25T21:26:18.409Z] "DELETE /admin HTTP/1.1" 403 - rbac_access_denied_matched'
    )
    assert '"generated-id"' in line
    assert ' "-" inbound-vip|9080|http|reviews-canary.bookinfo.svc.cluster.local - ' in line


def test_hostile_values_stay_on_one_line_and_keep_the_field_count() -> None:
    entry = AccessLogEntry(
        start_time=T0,
        method="GET",
        path='/a"b\\c',
        protocol="HTTP/1.1",
        response_code=200,
        response_code_details="details with spaces",
        user_agent='evil"\r\n[2020-01-01T00:00:00.000Z] "GET / HTTP/1.1" 200',
        authority="h\x00st",
        route_name="r\tn",
    )
    line = format_access_log(entry)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert '"evil\\"\\x0d\\x0a[2020-01-01T00:00:00.000Z] \\"GET / HTTP/1.1\\" 200"' in line
    assert '"GET /a\\"b\\\\c HTTP/1.1"' in line
    assert " details_with_spaces " in line and line.endswith(" r_n")
    assert '"h\\x00st"' in line
    # Split like a log shipper would (quotes group, backslash escapes): still the 22 fields.
    assert len(shlex.split(line.replace("[", "").replace("]", ""), posix=True)) == 22


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (T0, "2020-11-25T21:26:18.409Z"),
        (1714816745.0287099, "2024-05-04T09:59:05.028Z"),  # milliseconds truncated, as Envoy does
        (1714816745.9999996, "2024-05-04T09:59:06.000Z"),  # beyond microseconds: rounds into the next second
    ],
)
def test_start_time_format(timestamp: float, expected: str) -> None:
    assert format_start_time(timestamp) == expected


def test_upstream_cluster_name() -> None:
    assert upstream_cluster_name(service_ref()) == "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local"


def test_access_log_writes_one_line_per_entry() -> None:
    stream = io.StringIO()
    sink = AccessLog(stream)
    entry = AccessLogEntry(start_time=T0, method="GET", path="/", protocol="HTTP/2", response_code=200)
    sink.write(entry)
    sink.write(entry)
    assert stream.getvalue() == (format_access_log(entry) + "\n") * 2
    AccessLog(stream, enabled=False).write(entry)
    assert stream.getvalue().count("\n") == 2


def test_a_broken_sink_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    stream.close()
    sink = AccessLog(stream)
    entry = AccessLogEntry(start_time=T0, method="GET", path="/", protocol="HTTP/2", response_code=200)
    with caplog.at_level(logging.WARNING, logger="waypoint.telemetry"):
        sink.write(entry)
        sink.write(entry)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("access log: cannot write (I/O operation on closed")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_on_a_loop_lines_are_batched_into_one_write() -> None:
    stream = CountingStream()
    sink = AccessLog(stream, flush_interval=0.05)
    entry = AccessLogEntry(start_time=T0, method="GET", path="/", protocol="HTTP/1.1", response_code=200)
    for _ in range(5):
        sink.write(entry)
    assert stream.getvalue() == ""  # held until the interval ends
    await asyncio.sleep(0.2)
    assert stream.getvalue() == (format_access_log(entry) + "\n") * 5
    assert stream.writes == 1
    sink.write(entry)
    sink.flush()  # at stop: what is pending goes now, and the scheduled write finds nothing
    assert stream.getvalue().count("\n") == 6
    await asyncio.sleep(0.1)
    assert stream.getvalue().count("\n") == 6 and stream.writes == 2


async def test_a_zero_flush_interval_writes_each_line_at_once() -> None:
    stream = io.StringIO()
    sink = AccessLog(stream, flush_interval=0)
    entry = AccessLogEntry(start_time=T0, method="GET", path="/", protocol="HTTP/1.1", response_code=200)
    sink.write(entry)
    assert stream.getvalue() == format_access_log(entry) + "\n"


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "with space",
        'quote"inside',
        "back\\slash",
        "tab\there",
        "nl\nhere",
        "del\x7f",
        "nul\x00",
        "em\u2003space",
        "line\u2028sep",
        "caf\u00e9",
        "\u00a0nbsp",
        "",
    ],
)
def test_field_fast_paths_agree_with_the_escaping_rules(value: str) -> None:
    control = re.compile(r"[\x00-\x1f\x7f]")
    quoted_special = re.compile(r'[\x00-\x1f\x7f"\\]')

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return "\\" + char if char in '"\\' else f"\\x{ord(char):02x}"

    expected_quoted = '"' + (quoted_special.sub(escape, value) if value else "-") + '"'
    expected_bare = control.sub(escape, re.sub(r"\s+", "_", value)) if value else "-"
    entry = AccessLogEntry(
        start_time=T0,
        method="GET",
        path="/",
        protocol="HTTP/1.1",
        response_code=200,
        user_agent=value,
        route_name=value,
    )
    fields = format_access_log(entry)
    assert expected_quoted in fields
    assert fields.endswith(" " + expected_bare)


TEXT_FIELDS = [f.name for f in dataclasses.fields(AccessLogEntry) if f.type == "str"]
# Characters each escaping rule treats specially, among ordinary ones.
FIELD_TEXT = st.text(alphabet=st.sampled_from('ab/:. "\\\t\n\x00\x7f\u2003\u2028\u00e9-_'), max_size=6)


@settings(max_examples=400)
@given(values=st.fixed_dictionaries({name: FIELD_TEXT for name in TEXT_FIELDS}), numbers=st.booleans())
def test_the_whole_line_check_agrees_with_escaping_value_by_value(
    values: dict[str, str], numbers: bool
) -> None:
    """format_access_log checks all values at once and writes them as they are when none needs
    escaping; the line is the one escaping value by value gives, whatever the values."""
    entry = AccessLogEntry(
        start_time=T0,
        response_code=200,
        duration_ms=7 if numbers else None,
        upstream_service_time_ms=3 if numbers else None,
        **values,
    )
    assert format_access_log(entry) == _format_escaped(entry)


def test_start_time_is_right_across_seconds() -> None:
    base = dt.datetime(2026, 11, 21, 9, 59, 59, 999000, tzinfo=dt.UTC).timestamp()
    assert format_start_time(base) == "2026-11-21T09:59:59.999Z"
    assert format_start_time(base + 0.002) == "2026-11-21T10:00:00.001Z"
    assert format_start_time(base) == "2026-11-21T09:59:59.999Z"  # out of order: still right


def test_ipv6_addresses_are_bracketed_as_envoy_prints_them() -> None:
    view = dataclasses.replace(
        request(), destination_ip="fd00:10:96::14", source=Peer(CLIENT, "[fd00::7]:41234")
    )
    six = dataclasses.replace(endpoint(), ip="fd00:10:244::9")
    fields = shlex.split(format_access_log(AccessLogEntry.for_request(view, T0, 200, endpoint=six)))
    # authority, upstream host, cluster, upstream local, downstream local, downstream remote, SNI
    assert fields[-8:-1] == [
        "reviews.bookinfo:9080",
        "[fd00:10:244::9]:9080",
        "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local",
        "-",
        "[fd00:10:96::14]:9080",
        "[fd00::7]:41234",
        "-",
    ]
