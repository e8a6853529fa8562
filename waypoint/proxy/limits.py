"""Tunables of the waypoint data path, each with the reason for its default.

Protective limits are chosen so a well-behaved client never meets them (Envoy's defaults were the model
where it has one) and each names the one misbehaviour it stops; they surface as refusal reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

KIB = 1024
MIB = 1024 * 1024

# RFC 9113 §6.5.2 bounds of SETTINGS_MAX_FRAME_SIZE and window sizes.
_MIN_FRAME_SIZE = 16_384
_MAX_FRAME_SIZE = 2**24 - 1
_MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Every bound the waypoint proxy applies, downstream (clients) and upstream (backends)."""

    # --- request heads, both protocols
    # Envoy's max_request_headers_kb (60 KiB) and max_headers_count (100): over either -> 431.
    max_request_head_bytes: int = 60 * KIB
    max_request_headers: int = 100
    # Seconds a client may take to deliver a complete HTTP/1.1 request head (slowloris).
    request_head_timeout: float = 10.0

    # --- HTTP/2 downstream (client -> waypoint)
    # Envoy's waypoint listener allows 100 streams per connection.
    h2_max_concurrent_streams: int = 100
    # Per-stream and connection receive windows: they bound what a client can make us hold per request
    # body before we read it (the body pipe acknowledges as the upstream consumes).
    h2_stream_window: int = 1 * MIB
    h2_connection_window: int = 4 * MIB
    h2_max_frame_size: int = 64 * KIB
    # The HPACK dynamic table we allow the client to use (SETTINGS_HEADER_TABLE_SIZE: the RFC default).
    h2_header_table_size: int = 4096
    # The most of a client's advertised table size we use when encoding responses.
    h2_encoder_table_size: int = 4096
    # Header lists between max_request_head_bytes and this many times it are answered 431 on their
    # stream; beyond it HPACK decoding stops and the connection is closed (ENHANCE_YOUR_CALM).
    h2_header_list_hard_factor: int = 2
    # A HEADERS block spread over more CONTINUATION frames than this is a flood.
    h2_max_continuation_frames: int = 16
    # Rapid reset (CVE-2023-44487): more client resets of unanswered streams than this within the
    # window -> GOAWAY ENHANCE_YOUR_CALM.
    rapid_reset_limit: int = 100
    rapid_reset_window: float = 10.0
    # PING and SETTINGS frames (not ACKs) within the window. Generous: gRPC clients send a BDP ping per
    # burst of data; a flood sends thousands per read. (The read loop also stops reading while our
    # answers are not being read, which bounds what a flood can queue whatever this limit is.)
    control_frame_limit: int = 1000
    control_frame_window: float = 10.0
    # Envoy's max_consecutive_inbound_frames_with_empty_payload is 1; zero-length DATA and CONTINUATION.
    max_empty_frames: int = 100
    priority_frames_per_stream: int = 100
    # How long a client that opened a connection has to send the HTTP/2 preface or a request line.
    first_bytes_timeout: float = 10.0

    # --- bodies
    # Bytes buffered per direction of one request between the two sides; a full buffer stops reading
    # from the producing side (HTTP/1.1: the socket, HTTP/2: flow-control acknowledgements).
    body_buffer: int = 64 * KIB
    # A request body up to this size is kept for retries; once more was sent upstream the request is
    # no longer retried (the bytes are gone).
    retry_buffer: int = 64 * KIB

    # --- downstream connections
    # A client connection without any request in flight for this long is closed.
    idle_timeout: float = 300.0
    # A client that does not read what we send for this long is cut off.
    write_timeout: float = 60.0

    # --- upstream (waypoint -> backend pods over HBONE)
    # Envoy's default circuit breaker: connections per endpoint; over it the request fails 503 UO.
    max_connections_per_endpoint: int = 1024
    # Idle HTTP/1.1 connections kept per endpoint for reuse. Must cover the concurrency a busy client
    # brings: with 16, 32 concurrent clients made the waypoint open a new tunnel for every second
    # request (bench/waypoint_pair.py); idle ones expire after upstream_idle_timeout anyway.
    h1_max_idle_per_endpoint: int = 128
    # HTTP/2 backends get one multiplexed connection; more only when its streams are all in use.
    h2_max_connections_per_endpoint: int = 4
    # An upstream connection without requests for this long is closed (well under the 60 s the lab
    # workload and typical servers keep idle connections, so we close first and never reuse a dying one).
    upstream_idle_timeout: float = 30.0
    max_response_head_bytes: int = 64 * KIB
    # The backend's answer to a request is awaited at most this long when the route sets no timeout
    # (Istio disables route timeouts by default; an unbounded wait would pin resources forever).
    default_response_timeout: float = 300.0
    # L4 (TCP) services: endpoints tried before the tunnel is refused 503.
    tcp_connect_attempts: int = 3

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not value > 0:
                problems.append(f"{f.name}={value} must be positive")
        if not _MIN_FRAME_SIZE <= self.h2_max_frame_size <= _MAX_FRAME_SIZE:
            problems.append(f"h2_max_frame_size={self.h2_max_frame_size} must be in [16384, 2^24-1]")
        if not 65_535 <= self.h2_stream_window <= _MAX_WINDOW:
            problems.append(f"h2_stream_window={self.h2_stream_window} must be in [65535, 2^31-1]")
        if not self.h2_stream_window <= self.h2_connection_window <= _MAX_WINDOW:
            problems.append("h2_connection_window must be >= h2_stream_window and <= 2^31-1")
        if self.retry_buffer > 16 * MIB:
            problems.append(
                f"retry_buffer={self.retry_buffer} must be at most 16 MiB (it is held per request)"
            )
        if problems:
            raise ValueError("invalid waypoint proxy limits: " + "; ".join(problems))

    @property
    def h2_header_list_hard_cap(self) -> int:
        return self.max_request_head_bytes * self.h2_header_list_hard_factor
