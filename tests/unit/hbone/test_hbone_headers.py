"""forwarded / baggage / traceparent: exact shapes of what we send, bounded parsing of what we get."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.hbone.headers import (
    MAX_BAGGAGE_MEMBERS,
    BaggageFields,
    Forwarded,
    IPAddress,
    baggage_fields,
    build_baggage,
    build_forwarded,
    build_traceparent,
    format_address,
    parse_baggage,
    parse_forwarded,
    parse_traceparent,
)


@pytest.mark.parametrize(
    ("ip", "port", "host", "expected"),
    [
        ("10.244.0.9", 43210, None, 'for="10.244.0.9:43210"'),
        (
            "10.244.0.9",
            43210,
            "echo.default.svc.cluster.local",
            'for="10.244.0.9:43210";host=echo.default.svc.cluster.local',
        ),
        ("fd00::9", 80, None, 'for="[fd00::9]:80"'),
    ],
    ids=["no service", "service known", "ipv6"],
)
def test_build_forwarded(ip: str, port: int, host: str | None, expected: str) -> None:
    assert build_forwarded(ip, port, host) == expected
    parsed = parse_forwarded(expected)
    assert parsed.for_ == format_address(ip, port)
    assert parsed.host == host


def test_build_forwarded_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="port"):
        build_forwarded("10.0.0.1", 70000)
    with pytest.raises(ValueError, match="host"):
        build_forwarded("10.0.0.1", 80, "bad host;x=y")
    with pytest.raises(ValueError):
        build_forwarded("not-an-ip", 80)


def test_parse_forwarded_first_element_only() -> None:
    assert parse_forwarded("for=192.0.2.1;host=a, for=198.51.100.2") == Forwarded("192.0.2.1", "a")
    assert parse_forwarded('For="[2001:db8::1]:4711";proto=https') == Forwarded("[2001:db8::1]:4711", None)
    assert parse_forwarded("garbage") == Forwarded(None, None)


def test_build_baggage_ztunnel_shape() -> None:
    fields = BaggageFields(
        cluster="Kubernetes",
        namespace="default",
        workload_type="Deployment",
        workload_name="sleep",
        service_name="sleep",
        service_version="v1",
    )
    assert build_baggage(fields) == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,"
        "service.name=sleep,service.version=v1"
    )
    located = BaggageFields("c", "ns", "pod", "p", "svc", "latest", region="eu west", zone="eu-west-1a")
    text = build_baggage(located)
    assert text.endswith(",cloud.region=eu%20west,cloud.availability_zone=eu-west-1a")
    assert baggage_fields(parse_baggage(text)) == BaggageFields(
        "c", "ns", "pod", "p", "svc", "latest", region="eu west", zone="eu-west-1a"
    )


def test_build_baggage_rejects_unknown_workload_type() -> None:
    with pytest.raises(ValueError, match="workload type"):
        build_baggage(BaggageFields("c", "ns", "virtualmachine", "x", "s", "v"))


def test_parse_baggage_tolerates_junk_and_is_bounded() -> None:
    assert parse_baggage("a=1;prop=x, b = 2 ,=3,c,a=9,bad key=1") == {"a": "1", "b": "2"}
    many = ",".join(f"k{i}=v" for i in range(1000))
    assert len(parse_baggage(many)) <= MAX_BAGGAGE_MEMBERS
    assert baggage_fields({"k8s.cluster.name": "c"}) is None


def test_traceparent_random_and_well_formed() -> None:
    seen = {build_traceparent() for _ in range(50)}
    assert len(seen) == 50
    for value in seen:
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", value)
        parsed = parse_traceparent(value)
        assert parsed is not None and parsed.trace_id and parsed.parent_id
    assert build_traceparent(1, 2) == "00-00000000000000000000000000000001-0000000000000002-00"
    with pytest.raises(ValueError):
        build_traceparent(0, 1)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-00000000000000000000000000000000-0000000000000001-00",
        "00-00000000000000000000000000000001-0000000000000000-00",
        "ff-00000000000000000000000000000001-0000000000000001-00",
        "00-0000000000000000000000000000000G-0000000000000001-00",
        "00-00000000000000000000000000000001-0000000000000001-00-extra",
        "00-1-1-00",
    ],
    ids=["empty", "zero trace", "zero parent", "version ff", "non-hex", "v00 extra field", "short"],
)
def test_parse_traceparent_invalid(value: str) -> None:
    assert parse_traceparent(value) is None


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_header_parsers_never_raise(value: str) -> None:
    parse_forwarded(value)
    members = parse_baggage(value)
    assert len(members) <= MAX_BAGGAGE_MEMBERS
    baggage_fields(members)
    parse_traceparent(value)


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("fd00::1", 15008, "[fd00::1]:15008"),
        (ipaddress.ip_address("10.0.0.1"), 80, "10.0.0.1:80"),
        (ipaddress.ip_address("fd00::1"), 15008, "[fd00::1]:15008"),
    ],
)
def test_format_address_brackets_ipv6(ip: str | IPAddress, port: int, expected: str) -> None:
    assert format_address(ip, port) == expected
