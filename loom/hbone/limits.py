"""Tunables of HBONE connections, with the reason for every default.

Window, frame and stream numbers are ztunnel's (see the project's reference notes on HTTP/2 settings);
the protective limits are ours (Envoy's flood counters were the model) and are chosen so a
well-behaved peer can never reach them: each names the one misbehaviour it stops.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * 1024

# RFC 9113 §6.5.2 bounds.
MIN_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = 2**24 - 1
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Settings and limits shared by both ends of an HBONE connection."""

    # Flow control. 4 MiB per stream and 4x that per connection (ztunnel: "avoids cross-stream
    # deadlock"); a sender can never have more than this in flight towards us.
    stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    # Largest DATA frame we accept (and so the largest the peer will send us). Big frames keep the
    # per-frame Python cost small relative to the bytes moved.
    max_frame_size: int = 1 * MIB
    # Decoded header list (RFC 7541 size: name + value + 32 per field) and encoded header block caps.
    # The encoded cap is enforced while frames arrive, before h2 buffers a HEADERS+CONTINUATION run.
    max_header_list_size: int = 64 * KIB
    max_header_block_bytes: int = 64 * KIB
    # A 64 KiB block needs at most 4 CONTINUATIONs at the minimum frame size; 16 is generous.
    max_continuation_frames: int = 16
    # Keepalive: ztunnel pings every 10 s and drops a connection whose PING is not answered in 20 s.
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0
    handshake_timeout: float = 10.0
    # Send side buffering per stream: the producer (the upstream socket) is paused above `high` and
    # resumed below `low`, so one stream never holds much more than `high` plus one read.
    stream_send_high_water: int = 512 * KIB
    stream_send_low_water: int = 128 * KIB
    # DATA is only handed to the TLS transport while its buffer is under this mark.
    transport_write_high_water: int = 256 * KIB
    # Beyond DATA (gated above), only frames the peer provokes (PING/SETTINGS ACKs, RST_STREAM,
    # WINDOW_UPDATE) can grow the TLS buffer. A peer that provokes but never reads is cut off here.
    outbound_queue_limit: int = 4 * MIB
    # Envoy's max_outbound_control_frames: ACKs queued while the peer is not draining our writes.
    max_queued_control_frames: int = 1000
    # Envoy's max_consecutive_inbound_frames_with_empty_payload (ours is laxer: 1 is Envoy's default).
    max_empty_frames: int = 100
    # Envoy's max_inbound_priority_frames_per_stream.
    priority_frames_per_stream: int = 100
    # GOAWAY frames are parsed by us (h2 would close the whole connection state on one); their debug
    # data has no use beyond logging.
    max_goaway_payload: int = 16 * KIB

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            problems.append(f"max_frame_size={self.max_frame_size} must be in [{MIN_FRAME_SIZE}, 2^24-1]")
        if not DEFAULT_WINDOW <= self.stream_window <= MAX_WINDOW:
            problems.append(f"stream_window={self.stream_window} must be in [65535, 2^31-1]")
        if not self.stream_window <= self.connection_window <= MAX_WINDOW:
            problems.append(
                f"connection_window={self.connection_window} must be >= stream_window and <= 2^31-1"
            )
        if not 0 < self.stream_send_low_water < self.stream_send_high_water:
            problems.append("stream_send_low_water must be positive and below stream_send_high_water")
        for name in (
            "max_header_list_size",
            "max_header_block_bytes",
            "max_continuation_frames",
            "transport_write_high_water",
            "outbound_queue_limit",
            "max_queued_control_frames",
            "max_empty_frames",
            "priority_frames_per_stream",
            "max_goaway_payload",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        for name in ("keepalive_interval", "keepalive_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("invalid HBONE limits: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class ServerLimits(H2Limits):
    """Limits of the HBONE server (the inbound side, port 15008)."""

    # ztunnel advertises 200; streams beyond it are refused with REFUSED_STREAM (retryable).
    max_concurrent_streams: int = 200
    # TLS connections per server (one server per pod listener); over it new ones are closed at once.
    max_connections: int = 4096
    # A connection without streams for this long gets a GOAWAY (clients evict theirs after 5 min).
    idle_timeout: float = 600.0
    # The handler's decision (authorization) and the upstream dial each get this long.
    decision_timeout: float = 10.0
    upstream_connect_timeout: float = 10.0
    # Tunnel bytes that arrive before the 200 are held (never sent upstream) up to this much.
    early_data_limit: int = 64 * KIB
    # Rapid reset (CVE-2023-44487): once more than `rapid_reset_min_streams` streams were reset by the
    # client prematurely (before the response or within `premature_reset_seconds` of it) and they are
    # more than half of all streams, the connection gets GOAWAY ENHANCE_YOUR_CALM.
    rapid_reset_min_streams: int = 100
    premature_reset_seconds: float = 1.0
    # Write buffer limit of each upstream (application) socket: DATA is acknowledged to the client only
    # once the upstream buffer is under this mark, which is what carries back-pressure end to end.
    upstream_write_high_water: int = 256 * KIB

    def __post_init__(self) -> None:
        H2Limits.__post_init__(self)
        problems = [
            f"{name}={getattr(self, name)} must be positive"
            for name in (
                "max_concurrent_streams",
                "max_connections",
                "idle_timeout",
                "decision_timeout",
                "upstream_connect_timeout",
                "early_data_limit",
                "rapid_reset_min_streams",
                "premature_reset_seconds",
                "upstream_write_high_water",
            )
            if getattr(self, name) <= 0
        ]
        if problems:
            raise ValueError("invalid HBONE server limits: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class ClientLimits(H2Limits):
    """Limits of the HBONE client connection pool (the outbound side)."""

    # ztunnel's client header list limit is 16 KiB (responses carry a status and a baggage header).
    max_header_list_size: int = 16 * KIB
    max_header_block_bytes: int = 16 * KIB
    # POOL_MAX_STREAMS_PER_CONNECTION; the server's MAX_CONCURRENT_STREAMS lowers it further.
    max_streams_per_connection: int = 100
    # POOL_UNUSED_RELEASE_TIMEOUT.
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    # The server spends up to 10 s deciding and 10 s dialling; a response later than this is abandoned.
    response_timeout: float = 25.0
    # Local socket write buffer of a spliced tunnel (see ServerLimits.upstream_write_high_water).
    local_write_high_water: int = 256 * KIB

    def __post_init__(self) -> None:
        H2Limits.__post_init__(self)
        problems = [
            f"{name}={getattr(self, name)} must be positive"
            for name in (
                "max_streams_per_connection",
                "idle_timeout",
                "connect_timeout",
                "response_timeout",
                "local_write_high_water",
            )
            if getattr(self, name) <= 0
        ]
        if problems:
            raise ValueError("invalid HBONE client limits: " + "; ".join(problems))
