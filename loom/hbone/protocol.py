"""Sans-IO parts of HBONE: CONNECT request validation, the inbound frame scanner, rapid-reset accounting.

Theory of operation
-------------------
h2 gives protocol correctness, not denial-of-service protection, and two of its behaviours do not fit
a tunnel server: it buffers a whole HEADERS+CONTINUATION run (up to 64 frames of up to our 1 MiB frame
size) before looking at it, and it treats a GOAWAY as the end of the connection (its state machine
refuses every later frame, so a graceful GOAWAY would kill the streams it promised to finish).

`FrameScanner` therefore sits in front of h2 and reads every frame *header* as bytes arrive (it never
copies payloads): it enforces the header-block byte and CONTINUATION caps, the frame size, empty-frame
and PRIORITY floods, counts the PING/SETTINGS frames that oblige us to answer (the connection compares
those with its unsent backlog), and takes GOAWAY frames out of the byte stream, handing them to the
connection instead of to h2. Removing GOAWAY is safe: it carries no HPACK state. Everything else is
passed through untouched as memoryview slices of the received buffer, normally one slice per read.
With `whole_data`, the commonest frame of all is the exception: a DATA frame without flags that lies
whole within one read is handed over on its own, as `(stream_id, frame)`, so HBONE can deliver it without
h2 parsing it into objects (it still charges h2's windows, and gives h2 the frame whenever the
stream or the windows are not in the plain state; see `H2Endpoint._receive_whole_data`). Such a frame
always starts where h2's frame buffer is empty: every earlier byte went to h2 in whole frames.

`parse_connect_request` validates a CONNECT the way RFC 9113 §8.5 and ztunnel's inbound do, with h2's
own header validation switched off (h2 turns a malformed request into a connection error, killing
every other tunnel on the connection; we answer 400 on that stream only). It returns the target or
raises `BadRequest` naming the reason, which becomes the counter label.

`ResetTracker` counts streams the client reset before (or just after) their response, the rapid reset
attack (CVE-2023-44487), and says when the connection has to go.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from loom.hbone.errors import HboneProtocolViolation

# Frame types (RFC 9113 §6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4

FRAME_HEADER_SIZE = 9
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_AUTHORITY_LENGTH = 300


class RejectReason(enum.StrEnum):
    """Why a CONNECT was answered 400 (the `reason` label of the rejection counter)."""

    NOT_CONNECT = "not_connect"
    MISSING_AUTHORITY = "missing_authority"
    MALFORMED_AUTHORITY = "malformed_authority"
    HOSTNAME_AUTHORITY = "hostname_authority"
    IPV6_ZONE = "ipv6_zone"
    BAD_PORT = "bad_port"
    SCHEME_OR_PATH = "scheme_or_path"
    EXTENDED_CONNECT = "extended_connect"
    MALFORMED_HEADERS = "malformed_headers"


class BadRequest(ValueError):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """Where the client asks to be connected (the CONNECT :authority)."""

    host: str  # canonical IP text, or a lower-cased DNS name when hostnames are allowed
    port: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None for a hostname

    @property
    def authority(self) -> str:
        return (
            f"[{self.host}]:{self.port}"
            if isinstance(self.ip, ipaddress.IPv6Address)
            else f"{self.host}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    target: ConnectTarget
    authority: str  # as received
    headers: tuple[tuple[str, str], ...]  # regular (non-pseudo) headers, in order, decoded as latin-1


# Connection-specific header fields are malformed in HTTP/2 (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":authority", b":scheme", b":path", b":protocol"})
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _check_name(name: bytes) -> None:
    if not name or not all(c in _TOKEN_CHARS for c in name):
        raise BadRequest(
            RejectReason.MALFORMED_HEADERS,
            f"header name {name[:64]!r} is not a lower-case token",
        )


def _check_value(name: bytes, value: bytes) -> None:
    if b"\x00" in value or b"\r" in value or b"\n" in value:
        raise BadRequest(
            RejectReason.MALFORMED_HEADERS, f"header {name[:64]!r} has NUL, CR or LF in its value"
        )
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise BadRequest(
            RejectReason.MALFORMED_HEADERS, f"header {name[:64]!r} value has leading or trailing whitespace"
        )


def parse_connect_request(
    headers: Sequence[tuple[bytes, bytes]], *, allow_hostname: bool = False
) -> ConnectRequest:
    """Validate an HBONE CONNECT request's header list; raise `BadRequest` on the first problem."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[str, str]] = []
    for name, value in headers:
        if name.startswith(b":"):
            if regular:
                raise BadRequest(
                    RejectReason.MALFORMED_HEADERS, f"pseudo-header {name!r} after regular headers"
                )
            if name in pseudo:
                raise BadRequest(RejectReason.MALFORMED_HEADERS, f"duplicate pseudo-header {name!r}")
            if name not in _REQUEST_PSEUDO:
                raise BadRequest(
                    RejectReason.MALFORMED_HEADERS, f"unknown request pseudo-header {name[:64]!r}"
                )
            _check_value(name, value)
            pseudo[name] = value
            continue
        _check_name(name)
        _check_value(name, value)
        text_name = name.decode("ascii")
        if text_name in _CONNECTION_SPECIFIC or (text_name == "te" and value != b"trailers"):
            raise BadRequest(
                RejectReason.MALFORMED_HEADERS, f"connection-specific header {text_name!r} is not allowed"
            )
        regular.append((text_name, value.decode("latin-1")))
    method = pseudo.get(b":method")
    if method != b"CONNECT":
        shown = "missing" if method is None else repr(method.decode("latin-1")[:32])
        raise BadRequest(RejectReason.NOT_CONNECT, f":method is {shown}, HBONE accepts only CONNECT")
    if b":scheme" in pseudo or b":path" in pseudo:
        raise BadRequest(RejectReason.SCHEME_OR_PATH, "CONNECT must not carry :scheme or :path")
    if b":protocol" in pseudo:
        raise BadRequest(RejectReason.EXTENDED_CONNECT, "extended CONNECT (:protocol) is not HBONE")
    authority = pseudo.get(b":authority")
    if not authority:
        raise BadRequest(RejectReason.MISSING_AUTHORITY, "CONNECT needs an :authority of ip:port")
    text = authority.decode("latin-1")
    return ConnectRequest(parse_authority(text, allow_hostname=allow_hostname), text, tuple(regular))


def _parse_port(text: str, authority: str) -> int:
    if (
        not text
        or not text.isascii()
        or not text.isdigit()
        or len(text) > 5
        or (len(text) > 1 and text[0] == "0")
    ):
        raise BadRequest(
            RejectReason.BAD_PORT, f"{authority!r}: port {text!r} is not a decimal number 1..65535"
        )
    port = int(text)
    if not 1 <= port <= 65535:
        raise BadRequest(RejectReason.BAD_PORT, f"{authority!r}: port {port} is not in 1..65535")
    return port


def _is_dns_name(host: str) -> bool:
    if not host.isascii() or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    )


def parse_authority(authority: str, *, allow_hostname: bool = False) -> ConnectTarget:
    """`ip:port` or `[ipv6]:port` (or `hostname:port` when allowed) as a ConnectTarget."""
    if not authority:
        raise BadRequest(RejectReason.MISSING_AUTHORITY, "CONNECT needs an :authority of ip:port")
    if len(authority) > MAX_AUTHORITY_LENGTH:
        raise BadRequest(RejectReason.MALFORMED_AUTHORITY, f"authority is {len(authority)} characters long")
    if "@" in authority or "/" in authority or any(c.isspace() for c in authority):
        raise BadRequest(RejectReason.MALFORMED_AUTHORITY, f"{authority[:64]!r} is not host:port")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1 : close + 2] != ":":
            raise BadRequest(RejectReason.MALFORMED_AUTHORITY, f"{authority!r}: expected [ipv6]:port")
        inner = authority[1:close]
        if "%" in inner:
            raise BadRequest(RejectReason.IPV6_ZONE, f"{authority!r}: IPv6 zone ids are not allowed")
        try:
            ip6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise BadRequest(
                RejectReason.MALFORMED_AUTHORITY, f"{authority!r}: {inner!r} is not an IPv6 address"
            ) from None
        port = _parse_port(authority[close + 2 :], authority)
        return ConnectTarget(str(ip6), port, ip6)
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host:
        raise BadRequest(RejectReason.MALFORMED_AUTHORITY, f"{authority!r}: expected ip:port")
    if ":" in host:
        if "%" in host:
            raise BadRequest(RejectReason.IPV6_ZONE, f"{authority!r}: IPv6 zone ids are not allowed")
        raise BadRequest(RejectReason.MALFORMED_AUTHORITY, f"{authority!r}: IPv6 addresses need brackets")
    port = _parse_port(port_text, authority)
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return ConnectTarget(str(ip4), port, ip4)
    if all(c.isdigit() or c == "." for c in host):
        raise BadRequest(
            RejectReason.MALFORMED_AUTHORITY, f"{authority!r}: {host!r} is not a valid IPv4 address"
        )
    if not _is_dns_name(host):
        raise BadRequest(
            RejectReason.MALFORMED_AUTHORITY, f"{authority!r}: {host!r} is neither an IP nor a DNS name"
        )
    if not allow_hostname:
        raise BadRequest(
            RejectReason.HOSTNAME_AUTHORITY, f"{authority!r}: the authority must be an IP address"
        )
    return ConnectTarget(host.lower().rstrip("."), port, None)


# ---------------------------------------------------------------------------------------------- scanner


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame the peer sent (taken out of the byte stream before h2 sees it)."""

    last_stream_id: int
    error_code: int
    debug_data: bytes


@dataclass(frozen=True, slots=True)
class ScanLimits:
    max_frame_size: int
    max_header_block_bytes: int
    max_continuation_frames: int
    max_empty_frames: int
    priority_frames_per_stream: int
    max_goaway_payload: int


# A DATA frame without flags, whole within one read: (stream id, the frame with its 9-byte header).
WholeData = tuple[int, memoryview]


@dataclass(slots=True)
class ScanResult:
    segments: list[memoryview | bytes | WholeData]  # in order: bytes to feed to h2, or a WholeData
    goaways: list[GoAway]
    answers_owed: int  # PING and SETTINGS frames (not ACKs) that h2 will answer


class FrameScanner:
    """Reads frame headers of the peer's byte stream; see the module docstring."""

    __slots__ = (
        "_block_bytes",
        "_block_frames",
        "_empty_streak",
        "_goaway_buf",
        "_goaway_left",
        "_header",
        "_highest_stream",
        "_in_block",
        "_limits",
        "_preface_left",
        "_priority_frames",
        "_skip",
        "_streams_opened",
        "_whole_data",
    )

    def __init__(self, limits: ScanLimits, *, server: bool, whole_data: bool = False) -> None:
        self._limits = limits
        self._whole_data = whole_data
        self._preface_left = len(CLIENT_PREFACE) if server else 0
        self._header = bytearray()  # a frame header split across reads
        self._skip = 0  # payload bytes of the current (passed-through) frame still to come
        self._goaway_left = 0  # payload bytes of the current GOAWAY still to capture
        self._goaway_buf = bytearray()
        self._in_block = False
        self._block_bytes = 0
        self._block_frames = 0
        self._empty_streak = 0
        self._priority_frames = 0
        self._streams_opened = 0
        self._highest_stream = 0

    def feed(self, data: bytes) -> ScanResult:
        view = memoryview(data)
        n = len(view)
        pos = 0
        segments: list[memoryview | bytes | WholeData] = []
        goaways: list[GoAway] = []
        owed = 0
        if self._preface_left:
            # h2 validates the preface itself; we only step over it.
            step = min(self._preface_left, n)
            self._preface_left -= step
            pos = step
        run_start = 0  # start of the bytes passed through since the last cut
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            if self._goaway_left:
                step = min(self._goaway_left, n - pos)
                self._goaway_buf += view[pos : pos + step]
                self._goaway_left -= step
                pos += step
                run_start = pos
                if not self._goaway_left:
                    goaways.append(self._parse_goaway())
                continue
            header_in_view = not self._header and n - pos >= FRAME_HEADER_SIZE
            if header_in_view:
                header = view[pos : pos + FRAME_HEADER_SIZE]
                pos += FRAME_HEADER_SIZE
            else:
                # A header split across reads is held back until complete, so a GOAWAY can be cut out.
                if pos > run_start:
                    segments.append(view[run_start:pos])
                step = min(FRAME_HEADER_SIZE - len(self._header), n - pos)
                self._header += view[pos : pos + step]
                pos += step
                run_start = pos
                if len(self._header) < FRAME_HEADER_SIZE:
                    break
                header = memoryview(bytes(self._header))
                self._header.clear()
            length = (header[0] << 16) | (header[1] << 8) | header[2]
            frame_type = header[3]
            flags = header[4]
            stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            owed += self._check(length, frame_type, flags, stream_id)
            if frame_type == GOAWAY:
                if header_in_view and pos - FRAME_HEADER_SIZE > run_start:
                    segments.append(view[run_start : pos - FRAME_HEADER_SIZE])
                run_start = pos
                self._goaway_left = length
                if not length:
                    goaways.append(self._parse_goaway())
                continue
            if not header_in_view:
                segments.append(header.tobytes())
            elif frame_type == DATA and not flags and length and pos + length <= n and self._whole_data:
                start = pos - FRAME_HEADER_SIZE
                if start > run_start:
                    segments.append(view[run_start:start])
                pos += length
                segments.append((stream_id, view[start:pos]))
                run_start = pos
                continue
            self._skip = length
        if pos > run_start:
            segments.append(view if run_start == 0 and pos == n else view[run_start:pos])
        return ScanResult(segments, goaways, owed)

    def _parse_goaway(self) -> GoAway:
        payload = bytes(self._goaway_buf)
        self._goaway_buf = bytearray()
        if len(payload) < 8:
            raise HboneProtocolViolation("protocol_error", f"GOAWAY payload of {len(payload)} bytes (need 8)")
        return GoAway(
            last_stream_id=int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF,
            error_code=int.from_bytes(payload[4:8], "big"),
            debug_data=payload[8:],
        )

    def _check(self, length: int, frame_type: int, flags: int, stream_id: int) -> int:
        """Apply the limits to one frame header; return 1 if the frame obliges us to answer."""
        limits = self._limits
        if length > limits.max_frame_size:
            raise HboneProtocolViolation(
                "frame_too_large", f"frame of {length} bytes exceeds our maximum of {limits.max_frame_size}"
            )
        if self._in_block and frame_type != CONTINUATION:
            # h2 reports this too, but only once the whole frame has been buffered.
            raise HboneProtocolViolation("protocol_error", f"frame type {frame_type} inside a header block")
        empty = length == 0
        if frame_type == DATA:
            empty = empty and not flags & FLAG_END_STREAM
        elif frame_type in (HEADERS, PUSH_PROMISE):
            self._block_bytes = length
            self._block_frames = 0
            self._in_block = not flags & FLAG_END_HEADERS
            if frame_type == HEADERS and stream_id > self._highest_stream:
                self._highest_stream = stream_id
                self._streams_opened += 1
            self._check_block()
            empty = False
        elif frame_type == CONTINUATION:
            self._block_bytes += length
            self._block_frames += 1
            if self._block_frames > limits.max_continuation_frames:
                raise HboneProtocolViolation(
                    "continuation_flood",
                    f"more than {limits.max_continuation_frames} CONTINUATION frames in one header block",
                )
            self._check_block()
            if flags & FLAG_END_HEADERS:
                self._in_block = False
            empty = empty and not flags & FLAG_END_HEADERS
        elif frame_type == PRIORITY:
            self._priority_frames += 1
            budget = limits.priority_frames_per_stream * (1 + self._streams_opened)
            if self._priority_frames > budget:
                raise HboneProtocolViolation(
                    "priority_flood",
                    f"{self._priority_frames} PRIORITY frames for {self._streams_opened} streams",
                )
            empty = False
        elif frame_type == GOAWAY and length > limits.max_goaway_payload:
            raise HboneProtocolViolation("protocol_error", f"GOAWAY with {length} bytes of payload")
        else:
            empty = False
        if empty:
            self._empty_streak += 1
            if self._empty_streak > limits.max_empty_frames:
                raise HboneProtocolViolation(
                    "empty_frame_flood", f"more than {limits.max_empty_frames} consecutive empty frames"
                )
        else:
            self._empty_streak = 0
        if frame_type in (PING, SETTINGS) and not flags & FLAG_ACK:
            return 1
        return 0

    def _check_block(self) -> None:
        if self._block_bytes > self._limits.max_header_block_bytes:
            raise HboneProtocolViolation(
                "header_block_too_large",
                f"header block of more than {self._limits.max_header_block_bytes} bytes",
            )


# ---------------------------------------------------------------------------------------- rapid reset


class ResetTracker:
    """Counts streams opened and streams the client reset prematurely on one connection."""

    __slots__ = ("min_streams", "opened", "premature")

    def __init__(self, min_streams: int) -> None:
        self.min_streams = min_streams
        self.opened = 0
        self.premature = 0

    def stream_opened(self) -> None:
        self.opened += 1

    def stream_reset(self, premature: bool) -> bool:
        """Record a client reset; True when the connection should be closed (rapid reset)."""
        if not premature:
            return False
        self.premature += 1
        return self.premature > self.min_streams and self.premature * 2 > self.opened
