"""Sans-IO HBONE pieces: CONNECT validation, the inbound frame scanner, rapid-reset accounting."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.hbone.errors import HboneProtocolViolation
from loom.hbone.protocol import (
    CLIENT_PREFACE,
    BadRequest,
    FrameScanner,
    GoAway,
    RejectReason,
    ResetTracker,
    ScanLimits,
    parse_authority,
    parse_connect_request,
)

LIMITS = ScanLimits(
    max_frame_size=1 << 20,
    max_header_block_bytes=64 * 1024,
    max_continuation_frames=16,
    max_empty_frames=100,
    priority_frames_per_stream=100,
    max_goaway_payload=16 * 1024,
)


# ------------------------------------------------------------------------------------------ authority


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("10.244.0.42:8080", "10.244.0.42", 8080),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
        ("[::1]:80", "::1", 80),
        ("[2001:DB8::1]:443", "2001:db8::1", 443),
        ("[::ffff:10.0.0.1]:15008", "::ffff:a00:1", 15008),
    ],
    ids=["pod ip", "port 1", "port 65535", "ipv6 loopback", "ipv6 upper-case", "ipv4-mapped ipv6"],
)
def test_authority_accepted(authority: str, host: str, port: int) -> None:
    target = parse_authority(authority)
    assert (target.host, target.port) == (host, port)
    assert target.ip == ipaddress.ip_address(host)
    assert parse_authority(target.authority) == target


@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        ("", RejectReason.MISSING_AUTHORITY),
        ("echo.default.svc.cluster.local:80", RejectReason.HOSTNAME_AUTHORITY),
        ("[fe80::1%eth0]:80", RejectReason.IPV6_ZONE),
        ("[fe80::1%25eth0]:80", RejectReason.IPV6_ZONE),
        ("fe80::1%eth0:80", RejectReason.IPV6_ZONE),
        ("10.0.0.1:0", RejectReason.BAD_PORT),
        ("10.0.0.1:65536", RejectReason.BAD_PORT),
        ("10.0.0.1:080", RejectReason.BAD_PORT),
        ("10.0.0.1:+80", RejectReason.BAD_PORT),
        ("10.0.0.1:", RejectReason.BAD_PORT),
        ("10.0.0.1:\uff18\uff10", RejectReason.BAD_PORT),
        ("10.0.0.1", RejectReason.MALFORMED_AUTHORITY),
        (":80", RejectReason.MALFORMED_AUTHORITY),
        ("::1:80", RejectReason.MALFORMED_AUTHORITY),
        ("[::1]80", RejectReason.MALFORMED_AUTHORITY),
        ("[::1:80", RejectReason.MALFORMED_AUTHORITY),
        ("[not-ip]:80", RejectReason.MALFORMED_AUTHORITY),
        ("999.1.1.1:80", RejectReason.MALFORMED_AUTHORITY),
        ("10.0.0.01:80", RejectReason.MALFORMED_AUTHORITY),
        ("user@10.0.0.1:80", RejectReason.MALFORMED_AUTHORITY),
        ("10.0.0.1:80/x", RejectReason.MALFORMED_AUTHORITY),
        ("10.0.0.1 :80", RejectReason.MALFORMED_AUTHORITY),
        ("bad_host!:80", RejectReason.MALFORMED_AUTHORITY),
        ("a" * 400 + ":80", RejectReason.MALFORMED_AUTHORITY),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, str) else str(v),
)
def test_authority_rejected(authority: str, reason: RejectReason) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_authority(authority)
    assert caught.value.reason == reason
    assert caught.value.detail


def test_hostname_authority_only_when_allowed() -> None:
    target = parse_authority("Echo.Default.svc.cluster.local.:80", allow_hostname=True)
    assert (target.host, target.port, target.ip) == ("echo.default.svc.cluster.local", 80, None)
    assert target.authority == "echo.default.svc.cluster.local:80"
    with pytest.raises(BadRequest):
        parse_authority("-bad-.example:80", allow_hostname=True)


# ------------------------------------------------------------------------------------ CONNECT request


def req(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


def test_connect_request_parsed() -> None:
    request = parse_connect_request(
        req(
            (":method", "CONNECT"),
            (":authority", "10.0.0.7:8080"),
            ("forwarded", 'for="10.0.0.9:4567"'),
            ("baggage", "k8s.cluster.name=Kubernetes"),
            ("traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"),
            ("te", "trailers"),
        )
    )
    assert request.target.host == "10.0.0.7" and request.target.port == 8080
    assert request.authority == "10.0.0.7:8080"
    assert [k for k, _ in request.headers] == ["forwarded", "baggage", "traceparent", "te"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (req((":method", "GET"), (":authority", "10.0.0.1:80")), RejectReason.NOT_CONNECT),
        (req((":method", "connect"), (":authority", "10.0.0.1:80")), RejectReason.NOT_CONNECT),
        (req((":authority", "10.0.0.1:80")), RejectReason.NOT_CONNECT),
        (req((":method", "CONNECT")), RejectReason.MISSING_AUTHORITY),
        (req((":method", "CONNECT"), (":authority", "")), RejectReason.MISSING_AUTHORITY),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")),
            RejectReason.SCHEME_OR_PATH,
        ),
        (
            req((":method", "CONNECT"), (":scheme", "https"), (":authority", "10.0.0.1:80")),
            RejectReason.SCHEME_OR_PATH,
        ),
        (
            req((":method", "CONNECT"), (":protocol", "websocket"), (":authority", "10.0.0.1:80")),
            RejectReason.EXTENDED_CONNECT,
        ),
        (req((":method", "CONNECT"), (":method", "CONNECT")), RejectReason.MALFORMED_HEADERS),
        (req((":method", "CONNECT"), (":status", "200")), RejectReason.MALFORMED_HEADERS),
        (
            req((":method", "CONNECT"), ("x", "1"), (":authority", "10.0.0.1:80")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("Forwarded", "x")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("connection", "close")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("te", "gzip")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-a", "b\r\nx-b: c")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-a", " padded")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (
            req((":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("", "empty name")),
            RejectReason.MALFORMED_HEADERS,
        ),
        (req((":method", "CONNECT"), (":authority", "10.0.0.1:0")), RejectReason.BAD_PORT),
    ],
    ids=[
        "GET",
        "lower-case connect",
        "no method",
        "no authority",
        "empty authority",
        "path",
        "scheme",
        "extended connect",
        "duplicate pseudo",
        "response pseudo",
        "pseudo after regular",
        "upper-case name",
        "connection header",
        "te gzip",
        "CRLF in value",
        "leading space",
        "empty name",
        "port 0",
    ],
)
def test_connect_request_rejected(headers: list[tuple[bytes, bytes]], reason: RejectReason) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_connect_request(headers)
    assert caught.value.reason == reason


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=8), st.booleans())
@settings(max_examples=300, deadline=None)
def test_connect_request_fuzz_raises_only_bad_request(
    headers: list[tuple[bytes, bytes]], hostname: bool
) -> None:
    try:
        request = parse_connect_request(headers, allow_hostname=hostname)
    except BadRequest as e:
        assert isinstance(e.reason, RejectReason)
    else:
        assert 1 <= request.target.port <= 65535


# ---------------------------------------------------------------------------------------- frame scanner


def ser(*frames: Frame) -> bytes:
    return b"".join(f.serialize() for f in frames)


def scan_all(scanner: FrameScanner, data: bytes, cuts: list[int]) -> tuple[bytes, list[GoAway], int]:
    """Feed `data` in pieces cut at `cuts`; return the bytes passed through, GOAWAYs, answers owed."""
    passed = bytearray()
    goaways: list[GoAway] = []
    owed = 0
    points = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    for start, end in itertools.pairwise(points):
        result = scanner.feed(data[start:end])
        for segment in result.segments:
            passed += segment[1] if isinstance(segment, tuple) else segment
        goaways += result.goaways
        owed += result.answers_owed
    return bytes(passed), goaways, owed


def some_frames() -> list[Frame]:
    encoder = Encoder()
    block = encoder.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    return [
        SettingsFrame(0, settings={0x4: 1 << 22}),
        HeadersFrame(1, data=block, flags=["END_HEADERS"]),
        DataFrame(1, data=b"x" * 1000),
        PingFrame(0, opaque_data=b"12345678"),
        WindowUpdateFrame(1, window_increment=1000),
        DataFrame(1, data=b"", flags=["END_STREAM"]),
        RstStreamFrame(1, error_code=8),
    ]


@given(
    st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    st.integers(min_value=0, max_value=7),
    st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_scanner_passes_everything_but_goaway_whatever_the_cuts(
    cuts: list[int], goaway_at: int, whole: bool
) -> None:
    frames = some_frames()
    goaway = GoAwayFrame(0, last_stream_id=7, error_code=0, additional_data=b"bye")
    with_goaway = [*frames[:goaway_at], goaway, *frames[goaway_at:]]
    data = CLIENT_PREFACE + ser(*with_goaway)
    passed, goaways, owed = scan_all(FrameScanner(LIMITS, server=True, whole_data=whole), data, cuts)
    assert passed == CLIENT_PREFACE + ser(*frames)
    assert goaways == [GoAway(7, 0, b"bye")]
    assert owed == 2  # one SETTINGS, one PING


def test_scanner_single_read_is_zero_copy_segments_around_whole_data_frames() -> None:
    frames = some_frames()
    data = ser(*frames)
    result = FrameScanner(LIMITS, server=False, whole_data=True).feed(data)
    before, whole, after = result.segments
    # Views of the read itself (nothing copied): the frames before the DATA frame, the DATA frame
    # with its header as (stream id, frame), then everything after it (END_STREAM DATA included).
    assert isinstance(before, memoryview) and isinstance(after, memoryview)
    assert before.obj is data and after.obj is data
    assert bytes(before) == ser(*frames[:2])
    assert isinstance(whole, tuple)
    assert whole[0] == 1 and bytes(whole[1]) == ser(frames[2]) and whole[1].obj is data
    assert bytes(after) == ser(*frames[3:])


def test_scanner_hands_only_whole_flagless_nonempty_data_frames_over() -> None:
    scanner = FrameScanner(LIMITS, server=False, whole_data=True)
    plain = [DataFrame(3, data=b"a" * 100), DataFrame(5, data=b"b" * 7)]
    result = scanner.feed(ser(*plain))
    assert [(sid, bytes(frame)) for sid, frame in result.segments] == [
        (3, ser(plain[0])),
        (5, ser(plain[1])),
    ]
    # With flags (END_STREAM, PADDED), empty, or split across reads: bytes for h2 as before.
    for frames in (
        [DataFrame(3, data=b"a" * 100, flags=["END_STREAM"])],
        [DataFrame(3, data=b"a" * 100, flags=["PADDED"], pad_length=4)],
        [DataFrame(3, data=b"")],
    ):
        result = FrameScanner(LIMITS, server=False, whole_data=True).feed(ser(*frames))
        assert not any(isinstance(segment, tuple) for segment in result.segments)
    split = ser(DataFrame(3, data=b"a" * 100))
    scanner = FrameScanner(LIMITS, server=False, whole_data=True)
    segments = scanner.feed(split[:50]).segments + scanner.feed(split[50:]).segments
    assert not any(isinstance(segment, tuple) for segment in segments)
    assert b"".join(bytes(segment) for segment in segments) == split  # type: ignore[arg-type]


def test_scanner_whole_data_frames_keep_their_place_among_other_frames() -> None:
    # The preface of a server connection, a DATA frame right after it, one cut short by the read.
    frames = some_frames()
    data = CLIENT_PREFACE + ser(DataFrame(1, data=b"z" * 10), *frames)
    cut = len(data) - 3
    scanner = FrameScanner(LIMITS, server=True, whole_data=True)
    segments = scanner.feed(data[:cut]).segments + scanner.feed(data[cut:]).segments
    kinds = ["whole" if isinstance(segment, tuple) else "bytes" for segment in segments]
    assert kinds == ["bytes", "whole", "bytes", "whole", "bytes", "bytes"]
    # Without whole_data (the waypoint's HTTP/2 from applications): bytes only, as they came.
    plain = FrameScanner(LIMITS, server=True).feed(data).segments
    assert len(plain) == 1 and bytes(plain[0]) == data  # type: ignore[arg-type]
    rebuilt = b"".join(bytes(s[1]) if isinstance(s, tuple) else bytes(s) for s in segments)
    assert rebuilt == data


def test_scanner_counts_only_frames_that_need_answers() -> None:
    data = ser(
        PingFrame(0, opaque_data=b"a" * 8),
        PingFrame(0, opaque_data=b"b" * 8, flags=["ACK"]),
        SettingsFrame(0),
        SettingsFrame(0, flags=["ACK"]),
    )
    assert FrameScanner(LIMITS, server=False).feed(data).answers_owed == 2


def test_scanner_header_block_cap_counts_continuations() -> None:
    scanner = FrameScanner(LIMITS, server=False)
    frames: list[Frame] = [HeadersFrame(1, data=b"\x00" * 16384)]
    frames += [ContinuationFrame(1, data=b"\x00" * 16384) for _ in range(4)]
    with pytest.raises(HboneProtocolViolation) as caught:
        scanner.feed(ser(*frames))
    assert caught.value.reason == "header_block_too_large"


def test_scanner_header_block_cap_applies_before_payload_arrives() -> None:
    # Only the 9-byte header of a 1 MiB HEADERS frame: refused before buffering its payload.
    header = HeadersFrame(1, data=b"\x00" * (1 << 20)).serialize()[:9]
    with pytest.raises(HboneProtocolViolation) as caught:
        FrameScanner(LIMITS, server=False).feed(header)
    assert caught.value.reason == "header_block_too_large"


def test_scanner_continuation_flood() -> None:
    scanner = FrameScanner(LIMITS, server=False)
    frames: list[Frame] = [HeadersFrame(1, data=b"\x00")]
    frames += [ContinuationFrame(1, data=b"") for _ in range(17)]
    with pytest.raises(HboneProtocolViolation) as caught:
        scanner.feed(ser(*frames))
    assert caught.value.reason == "continuation_flood"


def test_scanner_frame_too_large() -> None:
    header = DataFrame(1, data=b"\x00" * ((1 << 20) + 1)).serialize()[:9]
    with pytest.raises(HboneProtocolViolation) as caught:
        FrameScanner(LIMITS, server=False).feed(header)
    assert caught.value.reason == "frame_too_large"


def test_scanner_empty_frame_flood() -> None:
    scanner = FrameScanner(LIMITS, server=False)
    scanner.feed(ser(*[DataFrame(1, data=b"") for _ in range(100)]))
    scanner.feed(ser(DataFrame(1, data=b"x")))  # any payload resets the streak
    scanner.feed(ser(*[DataFrame(1, data=b"") for _ in range(100)]))
    with pytest.raises(HboneProtocolViolation) as caught:
        scanner.feed(ser(DataFrame(1, data=b"")))
    assert caught.value.reason == "empty_frame_flood"


def test_scanner_priority_flood_budget_grows_with_streams() -> None:
    scanner = FrameScanner(LIMITS, server=False)
    scanner.feed(ser(*[PriorityFrame(1) for _ in range(100)]))
    scanner.feed(ser(HeadersFrame(1, data=b"\x82", flags=["END_HEADERS"])))
    scanner.feed(ser(*[PriorityFrame(1) for _ in range(100)]))
    with pytest.raises(HboneProtocolViolation) as caught:
        scanner.feed(ser(PriorityFrame(1)))
    assert caught.value.reason == "priority_flood"


def test_scanner_rejects_frames_inside_header_block() -> None:
    scanner = FrameScanner(LIMITS, server=False)
    with pytest.raises(HboneProtocolViolation) as caught:
        scanner.feed(ser(HeadersFrame(1, data=b"\x82"), PingFrame(0, opaque_data=b"x" * 8)))
    assert caught.value.reason == "protocol_error"


def test_scanner_rejects_short_or_huge_goaway() -> None:
    short = bytes([0, 0, 4, 7, 0, 0, 0, 0, 0]) + b"\x00" * 4
    with pytest.raises(HboneProtocolViolation):
        FrameScanner(LIMITS, server=False).feed(short)
    huge = GoAwayFrame(0, additional_data=b"x" * (17 * 1024)).serialize()[:9]
    with pytest.raises(HboneProtocolViolation):
        FrameScanner(LIMITS, server=False).feed(huge)


# ------------------------------------------------------------------------------------------ rapid reset


def test_reset_tracker_trips_only_on_many_premature_resets() -> None:
    tracker = ResetTracker(min_streams=100)
    for _ in range(100):
        tracker.stream_opened()
        assert not tracker.stream_reset(premature=True)
    tracker.stream_opened()
    assert tracker.stream_reset(premature=True)


def test_reset_tracker_tolerates_resets_among_many_good_streams() -> None:
    tracker = ResetTracker(min_streams=100)
    for i in range(1000):
        tracker.stream_opened()
        # 45% of streams reset early: within the ratio, never trips
        assert not tracker.stream_reset(premature=i % 20 < 9)
    assert not tracker.stream_reset(premature=False)
