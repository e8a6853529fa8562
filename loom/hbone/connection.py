"""The asyncio machinery shared by both ends of an HBONE connection, and the tunnel streams on it.

Theory of operation
-------------------
`H2Endpoint` is an asyncio Protocol on the TLS transport. Bytes from the peer go through the
`FrameScanner` (limits, GOAWAY extraction) into h2; h2's events are dispatched to `StreamChannel`s, one
per CONNECT stream. Everything is callback driven: no task per stream or per chunk on the data path.

A channel moves bytes both ways between the HTTP/2 stream and a *sink* / *producer*:

* peer -> us: DATA goes into the channel's sink. The socket sink writes it to the upstream (or local)
  socket at once and acknowledges it to h2 (which opens the peer's flow-control window) only while
  that socket's write buffer is under its high-water mark, else when the socket calls resume_writing.
  A slow upstream therefore stops the peer within one window (4 MiB): back-pressure end to end.
  Buffer sinks (tunnel.read(), early data before the 200) acknowledge when the bytes are consumed.
* us -> peer: bytes from the producer are queued on the channel and turned into DATA frames as far as
  the peer's windows, its maximum frame size and our TLS transport allow: DATA is only handed to the
  transport while its buffer (plus what h2 holds unflushed) is under `transport_write_high_water`.
  Blocked channels wait in `_window_blocked` (resumed by WINDOW_UPDATE or a SETTINGS change) or in
  `_write_blocked` (resumed once the transport drains), in arrival order.
  When a channel holds more than `stream_send_high_water` the producer is paused (pause_reading on its
  socket) until it drains below `stream_send_low_water`. Memory per stream is bounded by that mark
  plus one read, whatever the peer does.

h2's output is flushed once per event-loop turn (`_schedule_flush`), so the frames produced by many
small operations leave in one TLS write. Half-close maps END_STREAM to write_eof and EOF to END_STREAM;
a reset stream aborts its socket and a socket error resets the stream (CONNECT_ERROR, RFC 9113 §8.5).

Protective limits: the scanner's violations, h2 protocol errors and an unanswered keepalive close the
connection (GOAWAY when it can still be sent, then abort) and are counted by reason. A peer that makes
us answer PING/SETTINGS while not reading our writes is cut off after `max_queued_control_frames`
answers or once the TLS buffer exceeds `outbound_queue_limit`. Every callback is guarded: an exception
closes this connection only, logged with the peer.

Hot path (measured with tests/integration/hbone/throughput.py; each change is behaviour-preserving and
tested against the original): `FrameReader` replaces h2's inbound frame buffer to copy each DATA
payload once instead of three times; `bounded_data_frame_repr` stops hyperframe from hex-encoding every
received payload for a log line nobody prints; `_take_output` hands h2's output buffer to the transport
instead of copying it; DATA is sent in frames as large as the peer allows, and h2's output is written
once per loop turn.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import itertools
import logging
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamState
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

from loom.hbone.errors import HboneConnectionError, HboneError, HboneProtocolViolation, TunnelReset
from loom.hbone.limits import H2Limits
from loom.hbone.protocol import FRAME_HEADER_SIZE, FrameScanner, GoAway, ScanLimits
from loom.hbone.stats import HboneStats
from loom.identity import Identity

if TYPE_CHECKING:
    from h2._typing import Buffer

logger = logging.getLogger("loom.hbone")

Address = tuple[str, int]

# Seconds a connection closed for misbehaviour may take to flush its GOAWAY before it is aborted.
ABANDON_LINGER = 1.0

# Queued writes smaller than this are joined into one DATA frame (up to the frame size allowed).
COALESCE_BELOW = 16 * 1024

# DATA payloads from this size on go to the transport as they are; smaller ones are copied behind
# their header into one buffer, up to COALESCE_RECORD bytes (see H2Endpoint._send_data).
DIRECT_DATA_MIN = 16 * 1024
COALESCE_RECORD = 64 * 1024
_DATA_HEADER = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type 0 (DATA), flags, stream id
_SENDABLE_STREAM_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_RECEIVING_STREAM_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
# h2's H2Stream.open: the states whose stream window acknowledge_received_data credits.
_OPEN_STREAM_STATES = frozenset(
    {StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE}
)
# A tuple: `in` finds a member by identity first, where a set would hash it, and ConnectionState is
# a plain Enum whose __hash__ is a Python function (checked for every DATA frame sent and received).
_OPEN_CONNECTION_STATES = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)


def bounded_data_frame_repr(frame: DataFrame) -> str:
    """hyperframe's text for a DATA frame body (hex of the first 10 bytes, then "..."), computed
    from those 10 bytes only.

    h2 formats every received frame for a trace log line whether or not anybody logs, and
    hyperframe's generic repr hex-encodes the whole serialized payload before cutting it to 10
    bytes: for 1 MiB frames that cost more than decrypting them (measured). The output is the same."""
    padding = frame.serialize_padding_data()
    data = memoryview(frame.data)
    total = len(padding) + len(data) + frame.pad_length
    if not total:
        return "None"
    head = (padding + data[:10].tobytes() + b"\0" * min(frame.pad_length, 10))[:10]
    return "<hex:" + binascii.hexlify(head).decode("ascii") + ("..." if total > 10 else "") + ">"


if "_body_repr" not in vars(DataFrame):  # a hyperframe that has its own (cheap) version keeps it
    DataFrame._body_repr = bounded_data_frame_repr  # type: ignore[method-assign,assignment]


class FrameReader(FrameBuffer):
    """h2's inbound frame buffer, with one copy of each DATA payload instead of three.

    h2's FrameBuffer appends every read to a bytearray, slices each frame out of it (a copy), then
    hyperframe copies the payload again; the bytearray also churns (append at the end, delete at the
    front). Measured on 1 GiB of large DATA frames that was a third of the receiving side's CPU.

    Here a frame lying within one read is parsed from a memoryview of it; a frame split across reads
    (the usual case for large frames: TLS hands over at most 256 KiB at a time) is collected as a list
    of views and joined once when complete. An unpadded DATA frame's payload is that one join (or one
    slice copy); other frames go through hyperframe's parse_body. Frame size is checked as soon as a
    header is known, CONTINUATION handling and the preface check are h2's own."""

    def __init__(self, server: bool) -> None:
        super().__init__(server=server)
        self._view: memoryview | None = None  # rest of the last read, starting at a frame boundary
        self._pieces: list[memoryview] = []  # an incomplete frame (and what follows it), in order
        self._pending = 0  # bytes in _pieces
        self._need: int | None = None  # size of the frame at the start of _pieces, once known
        self._frame: Frame | None = None  # its parsed header

    def add_data(self, data: Buffer) -> None:
        view = memoryview(data)
        if self._preamble_len:
            step = min(self._preamble_len, len(view))
            super().add_data(view[:step])  # h2 checks the client preface
            view = view[step:]
        if not view:
            return
        if self._view is not None:  # not consumed (only after an error): keep the order
            self._pieces.append(self._view)
            self._pending += len(self._view)
            self._view = None
        if self._pieces:
            self._pieces.append(view)
            self._pending += len(view)
        else:
            self._view = view

    def __next__(self) -> Frame:
        while True:
            frame = self._next_from_pieces() if self._pieces else self._next_from_view()
            if frame is None:
                raise StopIteration
            complete = self._update_header_buffer(frame)
            if complete is not None:
                return complete

    def _header(self, header: memoryview) -> tuple[Frame, int]:
        try:
            frame, length = Frame.parse_frame_header(header)
        except (InvalidDataError, InvalidFrameError) as err:
            raise h2.exceptions.ProtocolError(f"Received frame with invalid header: {err!s}") from err
        self._validate_frame_length(length)
        return frame, length

    def _next_from_view(self) -> Frame | None:
        view = self._view
        if view is None:
            return None
        if len(view) >= FRAME_HEADER_SIZE:
            frame, length = self._header(view[:FRAME_HEADER_SIZE])
            end = FRAME_HEADER_SIZE + length
            if len(view) >= end:
                self._view = view[end:] if len(view) > end else None
                return self._parse(frame, view[FRAME_HEADER_SIZE:end])
            self._frame, self._need = frame, end
        self._pieces = [view]
        self._pending = len(view)
        self._view = None
        return None

    def _next_from_pieces(self) -> Frame | None:
        if self._need is None:
            if self._pending < FRAME_HEADER_SIZE:
                return None
            header = memoryview(b"".join(self._cut(0, FRAME_HEADER_SIZE)))
            self._frame, length = self._header(header)
            self._need = FRAME_HEADER_SIZE + length
        if self._pending < self._need:
            return None
        frame, end = self._frame, self._need
        assert frame is not None
        body = b"".join(self._cut(FRAME_HEADER_SIZE, end))
        rest = self._cut(end, self._pending)
        self._frame, self._need = None, None
        if len(rest) == 1:
            self._pieces, self._pending, self._view = [], 0, rest[0]
        else:
            self._pieces, self._pending = rest, sum(len(r) for r in rest)
        return self._parse(frame, memoryview(body), body)

    def _cut(self, start: int, end: int) -> list[memoryview]:
        """Views covering bytes [start, end) of the concatenated pieces."""
        out: list[memoryview] = []
        offset = 0
        for piece in self._pieces:
            size = len(piece)
            low, high = max(start - offset, 0), min(end - offset, size)
            if low < high:
                out.append(piece[low:high])
            offset += size
            if offset >= end:
                break
        return out

    @staticmethod
    def _parse(frame: Frame, body: memoryview, joined: bytes | None = None) -> Frame:
        if type(frame) is DataFrame and "PADDED" not in frame.flags:
            # What DataFrame.parse_body does for an unpadded frame, with a single copy.
            frame.data = joined if joined is not None else body.tobytes()
            frame.body_len = len(body)
            return frame
        try:
            frame.parse_body(body)
        except InvalidDataError as err:
            raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
        return frame


def _address(value: Any) -> Address:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return ("", 0)


def configure_tcp(sock: socket.socket) -> None:
    """TCP options of HBONE sockets (ztunnel's): no Nagle, keepalive 180 s / 180 s / 9 probes."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 180)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 180)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9)


def socket_inode(sock: socket.socket) -> int:
    """The inode of a socket's open file: tells our socket apart from a later file with the same fd."""
    return os.fstat(sock.fileno()).st_ino


def release_unwrapped_socket(sock: socket.socket, inode: int) -> None:
    """Clean up after an event loop failed to wrap `sock` into a transport.

    asyncio closes the socket object then; uvloop sometimes closes the file descriptor underneath it
    (seen with a peer that reset the connection before the TLS handshake). Closing such a socket object
    again would close whatever file got that descriptor number since, so it is detached instead."""
    fd = sock.fileno()
    if fd == -1:
        return
    try:
        same = os.fstat(fd).st_ino == inode
    except OSError:
        same = False
    if same:
        sock.close()
    else:
        sock.detach()


async def wrap_socket(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
    *,
    accepted: bool = False,
    **kwargs: Any,
) -> None:
    """Make a transport for a connected socket; on failure the socket is released exactly once."""
    loop = asyncio.get_running_loop()
    inode = socket_inode(sock)
    try:
        if accepted:
            await loop.connect_accepted_socket(protocol_factory, sock=sock, **kwargs)
        else:
            await loop.create_connection(protocol_factory, sock=sock, **kwargs)
    except BaseException:
        release_unwrapped_socket(sock, inode)
        raise


class Producer(Protocol):
    """Whatever feeds a channel's outbound side; paused when the channel holds too much."""

    def pause_producing(self) -> None: ...

    def resume_producing(self) -> None: ...


# ----------------------------------------------------------------------------------------------- sinks


class ChunkSink:
    """Holds received DATA until consumed (tunnel.read()) or handed to a socket sink.

    With a `limit`, it is the early-data buffer of a server stream awaiting its decision: exceeding it
    calls `on_overflow` instead of buffering more."""

    __slots__ = (
        "_chunks",
        "_discarding",
        "_limit",
        "_on_overflow",
        "_waiter",
        "channel",
        "eof",
        "error",
        "size",
    )

    def __init__(
        self, channel: StreamChannel, limit: int | None = None, on_overflow: Callable[[], None] | None = None
    ) -> None:
        self.channel = channel
        self._chunks: deque[tuple[bytes, int]] = deque()
        self.size = 0
        self.eof = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._limit = limit
        self._on_overflow = on_overflow
        self._discarding = False

    def lift_limit(self) -> None:
        """The stream was answered: from now on flow control alone bounds what is buffered."""
        self._limit = None
        self._on_overflow = None

    def discard(self) -> None:
        """The reader is gone (closed its side): drop what is held and whatever still arrives,
        giving the window back, and let a pending read() see the end."""
        self._discarding = True
        owed = self.release()
        if owed:
            self.channel.endpoint.ack(self.channel.stream_id, owed)
        self.eof = True
        self._wake()

    def deliver(self, data: bytes, flow_len: int) -> None:
        if self._discarding:
            self.channel.endpoint.ack(self.channel.stream_id, flow_len)
            return
        if self._limit is not None and self.size + len(data) > self._limit:
            self.channel.endpoint.ack(self.channel.stream_id, flow_len)
            if self._on_overflow is not None:
                self._on_overflow()
            return
        self._chunks.append((data, flow_len))
        self.size += len(data)
        self._wake()

    def end(self) -> None:
        self.eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def close(self) -> None:
        self.eof = True
        self._wake()

    def buffered(self) -> int:
        return self.size

    def release(self) -> int:
        """Drop everything held; return the flow-controlled bytes that still need acknowledging."""
        owed = sum(flow for _, flow in self._chunks)
        self._chunks.clear()
        self.size = 0
        return owed

    def release_credit(self) -> int:
        """The stream ended cleanly: keep the bytes readable, but hand the connection-level window
        back now (nothing more can arrive on the stream; a reader may never come)."""
        owed = sum(flow for _, flow in self._chunks)
        self._chunks = deque((data, 0) for data, _ in self._chunks)
        return owed

    def take_all(self) -> list[tuple[bytes, int]]:
        chunks = list(self._chunks)
        self._chunks.clear()
        self.size = 0
        return chunks

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            self._waiter = self.channel.endpoint.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data, flow = self._chunks[0]
        if len(data) <= max_bytes:
            self._chunks.popleft()
            self.size -= len(data)
            self.channel.endpoint.ack(self.channel.stream_id, flow)
            return data
        head, rest = data[:max_bytes], data[max_bytes:]
        # Padding (if any) stays with the rest and is acknowledged with its last byte.
        self._chunks[0] = (rest, max(0, flow - max_bytes))
        self.size -= max_bytes
        self.channel.endpoint.ack(self.channel.stream_id, min(flow, max_bytes))
        return head


class SocketBridge(asyncio.Protocol):
    """A plain TCP socket (the upstream application, or the local client) joined to a channel.

    It is the channel's producer (socket reads become DATA) and its sink (DATA is written to the
    socket, acknowledged once the socket's buffer is under its high-water mark)."""

    def __init__(self, channel: StreamChannel, high_water: int) -> None:
        self.channel = channel
        self.high_water = high_water
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.closed = False
        self._pending_ack = 0
        self.lost: asyncio.Future[None] = channel.endpoint.loop.create_future()

    # -- asyncio.Protocol (the socket side)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport; they implement its interface.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.high_water)

    def data_received(self, data: bytes) -> None:
        self.channel.endpoint.guarded(self.channel.send, data)

    def eof_received(self) -> bool:
        self.channel.endpoint.guarded(self.channel.send_eof)
        return True  # keep the socket open for the other direction (TCP half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self.channel.endpoint.guarded(self.channel.source_lost, exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        owed, self._pending_ack = self._pending_ack, 0
        if owed:
            self.channel.endpoint.guarded(self.channel.endpoint.ack, self.channel.stream_id, owed)

    # -- producer

    def pause_producing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_producing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- sink

    def deliver(self, data: bytes, flow_len: int) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            self.channel.endpoint.ack(self.channel.stream_id, flow_len)
            return
        self.transport.write(data)
        if self.write_paused:
            self._pending_ack += flow_len
        else:
            self.channel.endpoint.ack(self.channel.stream_id, flow_len)

    def end(self) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def fail(self, error: BaseException) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def buffered(self) -> int:
        if self.transport is None or self.closed:
            return 0
        return self.transport.get_write_buffer_size()

    def release(self) -> int:
        owed, self._pending_ack = self._pending_ack, 0
        return owed


Sink = ChunkSink | SocketBridge


class DrainWaiter:
    """The producer of a tunnel used through write()/drain()."""

    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    def pause_producing(self) -> None:
        if self._future is None:
            self._future = self._loop.create_future()

    def resume_producing(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)

    @property
    def waiting(self) -> bool:
        return self._future is not None

    async def wait(self) -> None:
        if self._future is not None:
            await asyncio.shield(self._future)


# --------------------------------------------------------------------------------------------- channel


class StreamChannel:
    """One CONNECT stream: a byte pipe in both directions over a shared HTTP/2 connection."""

    __slots__ = (
        "_out",
        "_producer_paused",
        "can_send",
        "done",
        "endpoint",
        "eof_queued",
        "error",
        "finished",
        "local_ended",
        "on_finish",
        "opened_at",
        "out_size",
        "producer",
        "received",
        "remote_ended",
        "reset_code",
        "responded_at",
        "sent",
        "sink",
        "stream_id",
    )

    def __init__(self, endpoint: H2Endpoint, stream_id: int) -> None:
        self.endpoint = endpoint
        self.stream_id = stream_id
        self.sink: Sink = ChunkSink(self)
        self.producer: Producer | None = None
        self._out: deque[bytes | memoryview] = deque()
        self.out_size = 0
        self.eof_queued = False  # send_eof() was called (read-only outside this class)
        self._producer_paused = False
        self.can_send = False  # DATA may flow only once the response (200) is sent / received
        self.local_ended = False
        self.remote_ended = False
        self.finished = False
        self.sent = 0  # tunnel payload bytes sent to the peer
        self.received = 0  # tunnel payload bytes received from the peer
        self.reset_code: int | None = None
        self.error: BaseException | None = None
        self.opened_at = endpoint.loop.time()
        self.responded_at: float | None = None
        self.done: asyncio.Future[None] = endpoint.loop.create_future()
        self.on_finish: list[Callable[[StreamChannel], None]] = []

    # -- outbound

    def send(self, data: bytes | memoryview) -> None:
        if self.finished or self.eof_queued or not data:
            return
        self._out.append(data)
        self.out_size += len(data)
        self.endpoint.pump_soon(self)
        if self.out_size >= self.endpoint.limits.stream_send_high_water and not self._producer_paused:
            self._producer_paused = True
            if self.producer is not None:
                self.producer.pause_producing()

    def send_eof(self) -> None:
        if self.finished or self.eof_queued:
            return
        self.eof_queued = True
        self.endpoint.pump_soon(self)

    def take(self, size: int) -> bytes | memoryview:
        """The next DATA payload, at most `size` bytes: small writes queued together leave as one frame
        (joined: a copy of a few KiB costs less than a frame each), larger ones as they are."""
        out = self._out
        head = out[0]
        if len(out) > 1 and len(head) < COALESCE_BELOW:
            total, count = len(head), 1
            for chunk in itertools.islice(out, 1, None):
                if total >= COALESCE_BELOW or total + len(chunk) > size:
                    break
                total += len(chunk)
                count += 1
            if count > 1:
                self.out_size -= total
                return b"".join([out.popleft() for _ in range(count)])
        if len(head) <= size:
            self._out.popleft()
        else:
            view = memoryview(head)
            self._out[0] = view[size:]
            head = view[:size]
        self.out_size -= len(head)
        return head

    def drained(self) -> None:
        """Called after DATA left the channel: resume the producer once under the low-water mark."""
        if self._producer_paused and self.out_size <= self.endpoint.limits.stream_send_low_water:
            self._producer_paused = False
            if self.producer is not None:
                self.producer.resume_producing()

    def set_producer(self, producer: Producer) -> None:
        self.producer = producer
        if self._producer_paused:
            producer.pause_producing()

    # -- inbound

    def attach_sink(self, sink: SocketBridge) -> None:
        """Hand over from the buffering sink to a socket; buffered bytes go first."""
        old = self.sink
        self.sink = sink
        if isinstance(old, ChunkSink):
            for data, flow in old.take_all():
                sink.deliver(data, flow)
            if old.eof:
                sink.end()

    def source_lost(self, exc: BaseException | None) -> None:
        """The socket feeding this channel closed (exc None: cleanly)."""
        if self.finished:
            return
        if exc is not None:
            self.endpoint.reset_stream(
                self, ErrorCodes.CONNECT_ERROR, HboneConnectionError(f"socket error: {exc}")
            )
            return
        self.send_eof()

    def ack(self, flow_len: int) -> None:
        self.endpoint.ack(self.stream_id, flow_len)

    def buffered(self) -> int:
        return self.out_size + self.sink.buffered()


# -------------------------------------------------------------------------------------------- endpoint


class FastDataH2Connection(h2.connection.H2Connection):
    """h2 with the common received DATA frame handled in a few lines instead of its per-frame
    machinery (a debug repr of every frame, two state machines, event construction through them):
    on an open stream, unpadded, without END_STREAM, for a stream without a declared content length
    (CONNECT streams have none). h2's connection and stream windows are charged exactly as its own
    path charges them, and the event delivered is h2's DataReceived. Anything else, a frame beyond
    either window included, goes through h2 unchanged (which raises its FlowControlError)."""

    def take_plain_data(self, stream_id: int, size: int) -> bool:
        """Charge h2's windows for a DATA frame without flags of `size` payload bytes, as h2 itself
        would, when it is the plain case (open stream without a content length, open connection, a
        frame size h2 takes, room in both windows); False, with nothing charged, for anything else,
        which h2's own path must handle (and refuse, if it is an error)."""
        stream = self.streams.get(stream_id)
        connection_window = self._inbound_flow_control_window_manager
        if (
            stream is None
            or stream.state_machine.state not in _RECEIVING_STREAM_STATES
            or stream._expected_content_length is not None
            or self.state_machine.state not in _OPEN_CONNECTION_STATES
            or size > self.max_inbound_frame_size  # before our SETTINGS are acknowledged: 16 KiB
            or size > connection_window.current_window_size
            or size > stream._inbound_window_manager.current_window_size
        ):
            return False
        # WindowManager.window_consumed, whose below-zero check the conditions above make moot.
        connection_window.current_window_size -= size
        stream._inbound_window_manager.current_window_size -= size
        stream._actual_content_length += size
        return True

    def acknowledge_quietly(self, size: int, stream_id: int) -> bool:
        """acknowledge_received_data(size, stream_id) for the usual case, an open stream where
        neither window is due a WINDOW_UPDATE yet: the processed bytes are counted where h2 counts
        them, and, as in h2, nothing is sent. An update is due (h2's WindowManager rule) once half a
        window was processed, or sooner when the window is exhausted. False, with nothing counted,
        when an update is due or the stream is not open: then h2's own method must do it."""
        stream = self.streams.get(stream_id)
        if stream is None or size <= 0 or stream.state_machine.state not in _OPEN_STREAM_STATES:
            return False
        connection_window = self._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        connection_processed = connection_window._bytes_processed + size
        stream_processed = stream_window._bytes_processed + size
        if (
            connection_window.current_window_size == 0
            or stream_window.current_window_size == 0
            or connection_processed >= connection_window.max_window_size // 2
            or stream_processed >= stream_window.max_window_size // 2
        ):
            return False
        connection_window._bytes_processed = connection_processed
        stream_window._bytes_processed = stream_processed
        return True

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        if frame.__class__ is DataFrame and not frame.flags:
            data = frame.data
            size = len(data)
            if self.take_plain_data(frame.stream_id, size):
                return [
                    h2.events.DataReceived(stream_id=frame.stream_id, data=data, flow_controlled_length=size)
                ]
        return super()._receive_frame(frame)


class ConnectionAbandoned(Exception):
    """Raised inside event handling once the connection decided to close (stops the dispatch)."""


class H2Endpoint(asyncio.Protocol):
    """One HBONE HTTP/2 connection over TLS; subclassed by the server and client connections."""

    server_side = False

    def __init__(self, limits: H2Limits, stats: HboneStats) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.stats = stats
        self.h2 = self._install_h2()
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, StreamChannel] = {}
        # Channels with queued bytes, by what they wait for: the peer's flow-control window, or room
        # in our TLS transport. Insertion order gives round-robin fairness.
        self._window_blocked: dict[int, StreamChannel] = {}
        self._write_blocked: dict[int, StreamChannel] = {}
        self._scanner = FrameScanner(
            ScanLimits(
                max_frame_size=limits.max_frame_size,
                max_header_block_bytes=limits.max_header_block_bytes,
                max_continuation_frames=limits.max_continuation_frames,
                max_empty_frames=limits.max_empty_frames,
                priority_frames_per_stream=limits.priority_frames_per_stream,
                max_goaway_payload=limits.max_goaway_payload,
            ),
            server=self.server_side,
            whole_data=True,
        )
        self._write_paused = False
        self._unflushed = 0
        self._flush_handle: asyncio.Handle | None = None
        self._pump_pending: dict[int, StreamChannel] = {}  # channels with bytes queued this loop turn
        self._out_frames: list[bytes | bytearray | memoryview] = []  # output framed here (_send_data)
        self._control_backlog = 0
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._ping_sent_at = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self.closing = False
        self.close_reason: str | None = None
        self.goaway_received: GoAway | None = None
        self.goaway_sent_last_stream: int | None = None
        self.last_processed_stream = 0  # highest peer-initiated stream handed to the application
        self.peer_identity: Identity | None = None
        self.local_address: Address = ("", 0)
        self.remote_address: Address = ("", 0)
        self.setup_error: BaseException | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()

    def _make_h2(self) -> FastDataH2Connection:
        config = h2.config.H2Configuration(client_side=not self.server_side, header_encoding=None)
        return FastDataH2Connection(config)

    def _install_h2(self) -> FastDataH2Connection:
        h2conn = self._make_h2()
        h2conn.incoming_buffer = FrameReader(server=self.server_side)
        return h2conn

    # ------------------------------------------------------------------ subclass hooks

    def _on_tls_established(self, ssl_object: ssl.SSLObject) -> None:
        """Identity checks right after the handshake; raise to refuse the connection."""

    def _local_settings(self) -> dict[int, int]:
        raise NotImplementedError

    def _on_event(self, event: h2.events.Event) -> None:
        """Role-specific events (requests on the server, responses on the client)."""

    def _on_stream_reset_by_peer(self, channel: StreamChannel) -> None:
        """Server: rapid reset accounting."""

    def _on_channel_finished(self, channel: StreamChannel) -> None:
        """Pool capacity / idle timers."""

    def _on_goaway(self, goaway: GoAway) -> None:
        """Peer's GOAWAY (after the common handling)."""

    def _on_idle(self) -> None:
        """No stream for the idle timeout."""

    def _on_connection_lost(self) -> None:
        """Deregistration."""

    @property
    def _idle_timeout(self) -> float | None:
        return None

    @property
    def peer_label(self) -> str:
        host, port = self.remote_address
        who = str(self.peer_identity) if self.peer_identity else "unauthenticated"
        return f"{host}:{port} ({who})"

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.local_address = _address(transport.get_extra_info("sockname"))
        self.remote_address = _address(transport.get_extra_info("peername"))
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            if not isinstance(ssl_object, ssl.SSLObject):
                raise HboneError("HBONE needs a TLS transport")
            self._on_tls_established(ssl_object)
        except HboneError as e:
            self.setup_error = e
            self.closing = True
            self.close_reason = "identity"
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.limits.transport_write_high_water)
        h2conn = self.h2
        h2conn.initiate_connection()
        h2conn.update_settings(self._local_settings())
        grow = self.limits.connection_window - h2conn.inbound_flow_control_window
        if grow > 0:
            h2conn.increment_flow_control_window(grow)
        self._flush()
        self._keepalive_handle = self.loop.call_later(self.limits.keepalive_interval, self._keepalive_tick)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            scan = self._scanner.feed(data)
            h2conn = self.h2
            for segment in scan.segments:
                if isinstance(segment, tuple):
                    self._receive_whole_data(*segment)
                    continue
                events = h2conn.receive_data(segment)
                if events:
                    self._dispatch(events)
            for goaway in scan.goaways:
                self._handle_goaway(goaway)
            if scan.answers_owed:
                self._count_answers(scan.answers_owed)
            self._flush()
            self._check_outbound_queue()
        except ConnectionAbandoned:
            return
        except HboneProtocolViolation as e:
            self.abandon(e.reason, ErrorCodes.ENHANCE_YOUR_CALM, e.detail)
        except h2.exceptions.DenialOfServiceError as e:
            self.abandon("header_list_too_large", ErrorCodes.ENHANCE_YOUR_CALM, str(e), goaway_queued=True)
        except h2.exceptions.ProtocolError as e:
            self.abandon("protocol_error", ErrorCodes.PROTOCOL_ERROR, str(e), goaway_queued=True)
        except Exception:
            logger.exception("HBONE connection failed", extra={"fields": {"peer": self.peer_label}})
            self.abandon("internal_error", ErrorCodes.INTERNAL_ERROR, "internal error")

    def eof_received(self) -> bool | None:
        return None  # the peer closed its side: close ours, streams get reset in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        for handle in (self._keepalive_handle, self._idle_handle, self._abort_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = None
        if self.close_reason is None:
            self.close_reason = "peer_closed" if exc is None else "connection_error"
        error = HboneConnectionError(
            f"HBONE connection to {self.peer_label} closed ({self.close_reason})"
            + (f": {exc}" if exc else "")
        )
        for channel in list(self.channels.values()):
            self._finish(channel, error)
        try:
            self._on_connection_lost()
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._control_backlog = 0
        self.guarded(self._pump_write_blocked)

    # ------------------------------------------------------------------ guard

    def guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a callback from outside h2's event dispatch; errors close this connection only."""
        if self.closing:
            # Late callbacks (a socket closing after its connection) still must tear their stream down.
            try:
                fn(*args)
            except Exception:
                logger.debug("callback after close failed", exc_info=True)
            return
        try:
            fn(*args)
            if self._flush_handle is None:  # usually set already (fn queued data with pump_soon)
                self._schedule_flush()
        except ConnectionAbandoned:
            return
        except Exception:
            logger.exception("HBONE stream callback failed", extra={"fields": {"peer": self.peer_label}})
            self.abandon("internal_error", ErrorCodes.INTERNAL_ERROR, "internal error")

    # ------------------------------------------------------------------ events

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if self.closing:
                raise ConnectionAbandoned
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._on_data(event)  # type: ignore[arg-type]
            elif kind is h2.events.WindowUpdated:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                if stream_id:
                    channel = self._window_blocked.get(stream_id)
                    if channel is not None:
                        self.pump_out(channel)
                else:
                    self._pump_window_blocked()
            elif kind is h2.events.StreamEnded:
                self._on_stream_ended(event.stream_id)  # type: ignore[attr-defined]
            elif kind is h2.events.StreamReset:
                self._on_stream_reset(event)  # type: ignore[arg-type]
            elif kind is h2.events.PingAckReceived:
                if event.ping_data == self._ping_payload:  # type: ignore[attr-defined]
                    self._ping_payload = None
            elif kind is h2.events.RemoteSettingsChanged:
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:  # type: ignore[attr-defined]
                    self._pump_window_blocked()
                self._on_event(event)
            else:
                self._on_event(event)

    def _receive_whole_data(self, stream_id: int, frame: memoryview) -> None:
        """A DATA frame without flags that arrived whole (the scanner cut it out; h2's frame buffer
        is empty). In the plain case (FastDataH2Connection.take_plain_data) it is delivered without
        frame and event objects, the payload copied once; anything else is h2's to handle, and so is
        its error."""
        if self.closing:
            raise ConnectionAbandoned
        size = len(frame) - FRAME_HEADER_SIZE
        if not self.h2.take_plain_data(stream_id, size):
            events = self.h2.receive_data(frame)
            if events:
                self._dispatch(events)
            return
        channel = self.channels.get(stream_id)
        if channel is None:
            self.ack(stream_id, size)  # a stream we already finished (frames in flight)
            return
        channel.received += size
        channel.sink.deliver(frame[FRAME_HEADER_SIZE:].tobytes(), size)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        data = event.data
        flow = event.flow_controlled_length
        channel = self.channels.get(stream_id)
        if channel is None or data is None:
            # A stream we already finished (frames in flight): give the window back.
            self.ack(stream_id, flow or 0)
            return
        channel.received += len(data)
        channel.sink.deliver(data, flow or len(data))

    def _on_stream_ended(self, stream_id: int) -> None:
        channel = self.channels.get(stream_id)
        if channel is None:
            return
        channel.remote_ended = True
        channel.sink.end()
        if channel.local_ended:
            self._finish(channel, None)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        channel = self.channels.get(event.stream_id)
        if channel is None:
            return
        code = int(event.error_code) if event.error_code is not None else 0
        channel.reset_code = code
        if event.remote_reset:
            self._on_stream_reset_by_peer(channel)
        self._finish(
            channel, TunnelReset(f"stream {event.stream_id} reset by peer (error code {code})", code)
        )

    def _handle_goaway(self, goaway: GoAway) -> None:
        self.goaway_received = goaway
        logger.debug(
            "GOAWAY received",
            extra={
                "fields": {
                    "peer": self.peer_label,
                    "last_stream_id": goaway.last_stream_id,
                    "error_code": goaway.error_code,
                }
            },
        )
        self._on_goaway(goaway)

    # ------------------------------------------------------------------ outbound data

    def _transport_full(self) -> bool:
        return self._write_paused or self._unflushed >= self.limits.transport_write_high_water

    def pump_out(self, channel: StreamChannel) -> None:
        """Turn the channel's queued bytes into DATA frames as far as windows and the transport allow."""
        if not channel.can_send or channel.finished or self.closing:
            return
        h2conn = self.h2
        stream_id = channel.stream_id
        self._window_blocked.pop(stream_id, None)
        self._write_blocked.pop(stream_id, None)
        queued = False
        try:
            while channel.out_size:
                if self._transport_full():
                    self._write_blocked[stream_id] = channel
                    break
                window = h2conn.local_flow_control_window(stream_id)
                if window <= 0:
                    self._window_blocked[stream_id] = channel
                    break
                chunk = channel.take(min(window, h2conn.max_outbound_frame_size))
                # The last bytes before a queued EOF carry END_STREAM themselves (no empty DATA frame).
                last = channel.eof_queued and not channel.out_size
                self._send_data(stream_id, chunk, last)
                self._unflushed += len(chunk)
                channel.sent += len(chunk)
                queued = True
                if last:
                    channel.local_ended = True
            else:
                if channel.eof_queued and not channel.local_ended:
                    h2conn.end_stream(stream_id)
                    channel.local_ended = True
                    queued = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as e:
            self._finish(channel, HboneConnectionError(f"stream {stream_id} closed: {e}"))
            return
        if queued:
            if self._flush_handle is None:  # set while _flush_soon pumps
                self._schedule_flush()
            channel.drained()
        if channel.local_ended and channel.remote_ended:
            self._finish(channel, None)

    def _pump_window_blocked(self) -> None:
        for channel in list(self._window_blocked.values()):
            if self.closing:
                break
            self.pump_out(channel)

    def _pump_write_blocked(self) -> None:
        for channel in list(self._write_blocked.values()):
            if self._transport_full() or self.closing:
                break
            self.pump_out(channel)

    def ack(self, stream_id: int, flow_len: int) -> None:
        if flow_len <= 0 or self.closing:
            return
        h2conn = self.h2
        if h2conn.acknowledge_quietly(flow_len, stream_id):
            return  # counted; nothing to send
        try:
            h2conn.acknowledge_received_data(flow_len, stream_id)
        except (h2.exceptions.ProtocolError, ValueError):
            return
        # h2 answers with WINDOW_UPDATE only once half a window was consumed: most acknowledgements
        # leave nothing to send, and need no flush of their own.
        if getattr(h2conn, "_data_to_send", True):
            self._schedule_flush()

    def send_headers(self, channel: StreamChannel, headers: list[tuple[str, str]], end_stream: bool) -> None:
        self.h2.send_headers(channel.stream_id, headers, end_stream=end_stream)
        if end_stream:
            channel.local_ended = True
        self._schedule_flush()

    def reset_stream(self, channel: StreamChannel, code: ErrorCodes, error: BaseException | None) -> None:
        if channel.finished:
            return
        if not self.closing:
            try:
                self.h2.reset_stream(channel.stream_id, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                pass
            except h2.exceptions.ProtocolError:
                pass
            self._schedule_flush()
        channel.reset_code = int(code)
        self._finish(channel, error)

    def _finish(self, channel: StreamChannel, error: BaseException | None) -> None:
        """Tear a channel down: give back its flow-control credit, close or abort its socket."""
        if channel.finished:
            return
        channel.finished = True
        self.channels.pop(channel.stream_id, None)
        self._window_blocked.pop(channel.stream_id, None)
        self._write_blocked.pop(channel.stream_id, None)
        self._pump_pending.pop(channel.stream_id, None)
        channel.error = error
        sink = channel.sink
        # A clean end keeps unread bytes readable; a failure drops them.
        owed = sink.release_credit() if error is None and isinstance(sink, ChunkSink) else sink.release()
        if owed:
            self.ack(channel.stream_id, owed)
        if error is not None:
            sink.fail(error)
        else:
            sink.close()
        channel.producer = None
        if not channel.done.done():
            channel.done.set_result(None)
        for callback in channel.on_finish:
            try:
                callback(channel)
            except Exception:
                logger.exception("tunnel close callback failed", extra={"fields": {"peer": self.peer_label}})
        self._on_channel_finished(channel)
        if not self.channels:
            self._arm_idle()

    # ------------------------------------------------------------------ flushing, queue limits

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closing:
            self._flush_handle = self.loop.call_soon(self._flush_soon)

    def pump_soon(self, channel: StreamChannel) -> None:
        """Pump the channel in this loop turn's flush: what several writes queue in one turn leaves in
        as few DATA frames as the peer's windows allow."""
        self._pump_pending[channel.stream_id] = channel
        if self._flush_handle is None:
            self._schedule_flush()

    def _flush_soon(self) -> None:
        try:
            try:
                pending = self._pump_pending
                if pending:
                    # While the flush handle is still set, pumping schedules no further flush.
                    self._pump_pending = {}
                    for channel in pending.values():
                        self.pump_out(channel)
            finally:
                self._flush_handle = None
            self._flush()
            self._check_outbound_queue()
        except ConnectionAbandoned:
            return
        except Exception:
            logger.exception("HBONE flush failed", extra={"fields": {"peer": self.peer_label}})
            self.abandon("internal_error", ErrorCodes.INTERNAL_ERROR, "internal error")

    def _send_data(self, stream_id: int, chunk: bytes | memoryview, end_stream: bool) -> None:
        """One DATA frame, framed here rather than by h2, whose send_data costs microseconds of Python
        per frame and copies every payload twice (into a frame object, then into its output buffer; a
        memoryview three times). The 9-byte header is made here; a large payload goes to the transport
        as it is, a small one is copied behind the header into our output buffer (small frames of one
        loop turn then leave in one TLS record). Either way it is queued after whatever h2 holds so
        far, so the order on the wire is kept, and h2's connection and stream windows are debited
        exactly as its send_data would. The caller (pump_out) cuts `chunk` to both windows and the
        frame size; the END_STREAM frame, and a stream or connection h2 would not send on, go through
        h2 (which raises the right error)."""
        h2conn = self.h2
        size = len(chunk)
        stream = None if end_stream else h2conn.streams.get(stream_id)
        if (
            stream is None
            or stream.state_machine.state not in _SENDABLE_STREAM_STATES
            or h2conn.state_machine.state not in _OPEN_CONNECTION_STATES
        ):
            h2conn.send_data(stream_id, chunk, end_stream=end_stream)
            return
        frames = self._out_frames
        pending = self._take_output()
        if pending:
            frames.append(pending if isinstance(pending, bytearray) else bytearray(pending))
        header = _DATA_HEADER.pack(size >> 16, size & 0xFFFF, 0, 0, stream_id)
        # Every bytearray in the list is ours (h2's buffer once taken, or made here): it can grow.
        tail = frames[-1] if frames else None
        if size < DIRECT_DATA_MIN:
            if isinstance(tail, bytearray) and len(tail) < COALESCE_RECORD:
                tail += header
                tail += chunk
            else:
                frames.append(bytearray(header) + chunk)
        else:
            if isinstance(tail, bytearray):
                tail += header  # with what precedes it: no TLS record of 9 bytes
            else:
                frames.append(header)
            frames.append(chunk)
        stream.outbound_flow_control_window -= size
        h2conn.outbound_flow_control_window -= size

    def _pending_output(self) -> list[bytes | bytearray | memoryview]:
        """Everything queued for the peer, in order: frames framed here, then h2's buffer."""
        frames = self._out_frames
        self._out_frames = []
        data = self._take_output()
        if data:
            frames.append(data)
        return frames

    def _write_pending(self) -> None:
        if not self._out_frames and not getattr(self.h2, "_data_to_send", True):
            return  # the usual flush after a read: nothing to send
        frames = self._pending_output()
        transport = self.transport
        if frames and transport is not None and not transport.is_closing():
            if len(frames) == 1:
                transport.write(frames[0])
            else:
                transport.writelines(frames)

    def _take_output(self) -> bytes | bytearray:
        """h2's pending output. data_to_send() copies its buffer into a new bytes object; taking the
        buffer itself (h2 starts a new one, as data_to_send does) saves a copy of every payload byte."""
        h2conn = self.h2
        buffer = getattr(h2conn, "_data_to_send", None)
        if not isinstance(buffer, bytearray):
            return h2conn.data_to_send()
        if not buffer:
            return b""  # nothing queued: h2 keeps its (empty) buffer
        h2conn._data_to_send = bytearray()
        return buffer

    def _flush(self) -> None:
        self._unflushed = 0
        self._write_pending()
        if self._write_blocked and not self._write_paused and not self.closing:
            self._pump_write_blocked()

    def _count_answers(self, owed: int) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() == 0:
            self._control_backlog = 0
            return
        self._control_backlog += owed
        if self._control_backlog > self.limits.max_queued_control_frames:
            self.abandon(
                "control_frame_flood",
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"{self._control_backlog} PING/SETTINGS answers queued while the peer is not reading",
                abort=True,
            )
            raise ConnectionAbandoned

    def _check_outbound_queue(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        size = transport.get_write_buffer_size()
        if size > self.limits.outbound_queue_limit:
            self.abandon(
                "outbound_queue_overflow",
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"{size} bytes unsent: the peer is not reading",
                abort=True,
            )
            raise ConnectionAbandoned

    # ------------------------------------------------------------------ keepalive, idle, close

    def _keepalive_tick(self) -> None:
        self._keepalive_handle = None
        if self.closing:
            return
        now = self.loop.time()
        if self._ping_payload is not None:
            waited = now - self._ping_sent_at
            if waited >= self.limits.keepalive_timeout:
                self.abandon(
                    "keepalive_timeout",
                    ErrorCodes.NO_ERROR,
                    f"no PING answer within {waited:.1f} s",
                    abort=True,
                )
                return
            delay = min(self.limits.keepalive_interval, self.limits.keepalive_timeout - waited)
        else:
            self._ping_payload = os.urandom(8)
            self._ping_sent_at = now
            try:
                self.h2.ping(self._ping_payload)
            except h2.exceptions.ProtocolError:
                return
            self._schedule_flush()
            delay = min(self.limits.keepalive_interval, self.limits.keepalive_timeout)
        self._keepalive_handle = self.loop.call_later(delay, self._keepalive_tick)

    def _arm_idle(self) -> None:
        timeout = self._idle_timeout
        if timeout is None or self.closing:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_handle = self.loop.call_later(timeout, self._idle_fired)

    def _disarm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _idle_fired(self) -> None:
        self._idle_handle = None
        if not self.channels and not self.closing:
            self._on_idle()

    def send_goaway(self, last_stream_id: int, error_code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """A GOAWAY that leaves h2's state open, so streams up to `last_stream_id` can finish
        (h2 itself would refuse every frame after its own GOAWAY)."""
        if self.closing or self.transport is None:
            return
        self._flush()
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=int(error_code))
        self.transport.write(frame.serialize())
        self.goaway_sent_last_stream = last_stream_id

    def abandon(
        self,
        reason: str,
        error_code: ErrorCodes,
        detail: str,
        *,
        goaway_queued: bool = False,
        abort: bool = False,
    ) -> None:
        """Close the connection because of `reason` (counted): GOAWAY if it can still go, then close."""
        if self.closing:
            return
        self.close_reason = reason
        self.stats.connection_closed(reason)
        log = logger.info if error_code == ErrorCodes.NO_ERROR else logger.warning
        log(
            "closing HBONE connection",
            extra={"fields": {"peer": self.peer_label, "reason": reason, "detail": detail}},
        )
        transport = self.transport
        if transport is None:
            self.closing = True
            return
        if not abort:
            try:
                if not goaway_queued:
                    # Streams above the last one we handled were never looked at: say so, the client
                    # may retry them elsewhere.
                    self.h2.close_connection(
                        error_code=error_code,
                        additional_data=reason.encode(),
                        last_stream_id=self.last_processed_stream,
                    )
                self._write_pending()
            except h2.exceptions.ProtocolError:
                pass
        self.closing = True
        self._disarm_idle()
        if abort or transport.get_write_buffer_size() > self.limits.transport_write_high_water:
            # A peer that is not reading would keep a graceful close pending forever.
            transport.abort()
        else:
            transport.close()
            # close() waits for the buffer to drain. A well-behaved peer gets a keepalive period to
            # read its GOAWAY, a misbehaving one a moment.
            linger = self.limits.keepalive_timeout if error_code == ErrorCodes.NO_ERROR else ABANDON_LINGER
            self._abort_handle = self.loop.call_later(linger, transport.abort)

    def close_gracefully(self, reason: str) -> None:
        """Close a connection that has no streams (idle, drained): GOAWAY NO_ERROR, then close."""
        self.abandon(reason, ErrorCodes.NO_ERROR, "no streams left")

    @property
    def buffered_bytes(self) -> int:
        """Bytes this connection holds in memory: TLS write buffer, h2 output, channel buffers."""
        total = self._unflushed
        if self.transport is not None and not self.transport.is_closing():
            total += self.transport.get_write_buffer_size()
        for channel in self.channels.values():
            total += channel.buffered()
        return total


# --------------------------------------------------------------------------------------- stream access

# Default read() size: the TLS layer hands over at most 256 KiB at a time anyway.
DEFAULT_READ_SIZE = 256 * 1024


class StreamTunnel:
    """One answered CONNECT stream as a byte stream: read()/write()/drain()/write_eof(), for code that
    handles the bytes itself (the client's `Tunnel`, the server's `ServerStream`). Received DATA waits
    in the channel's `ChunkSink` and is acknowledged to the peer as it is read, so a slow reader holds
    at most one stream window; write() queues on the channel and drain() waits for its low-water mark."""

    def __init__(self, connection: H2Endpoint, channel: StreamChannel) -> None:
        self.connection = connection
        self._channel = channel
        self._drain = DrainWaiter(connection.loop)
        channel.set_producer(self._drain)
        channel.on_finish.append(lambda _ch: self._drain.resume_producing())
        self._spliced = False

    @property
    def stream_id(self) -> int:
        return self._channel.stream_id

    @property
    def peer_identity(self) -> Identity | None:
        return self.connection.peer_identity

    @property
    def sent(self) -> int:
        """Payload bytes sent into the tunnel so far."""
        return self._channel.sent

    @property
    def received(self) -> int:
        """Payload bytes received from the tunnel so far."""
        return self._channel.received

    @property
    def closed(self) -> bool:
        return self._channel.finished

    @property
    def error(self) -> BaseException | None:
        return self._channel.error

    @property
    def pending(self) -> int:
        """Bytes received and not read yet."""
        return self._channel.sink.buffered()

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        """Up to `max_bytes` from the tunnel; b"" once the peer ended its side."""
        sink = self._channel.sink
        if not isinstance(sink, ChunkSink) or self._spliced:
            raise HboneError("tunnel is spliced to a socket; read() is not available")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        return await sink.read(max_bytes)

    def write(self, data: bytes | memoryview) -> None:
        channel = self._channel
        if channel.finished:
            raise channel.error or HboneConnectionError("tunnel is closed")
        if channel.eof_queued:
            raise HboneError("write() after write_eof()")
        # The bytes wait in the channel until the peer's window allows: keep our own immutable copy
        # of anything the caller might reuse (a bytearray or a view of one).
        self.connection.guarded(channel.send, data if isinstance(data, bytes) else bytes(data))

    async def drain(self) -> None:
        """Wait until the tunnel's send buffer is below its low-water mark."""
        await self._drain.wait()
        channel = self._channel
        if channel.finished and channel.error is not None:
            raise channel.error

    def write_blocked(self) -> bool:
        """True while drain() would wait (over the low-water mark) or raise (the stream failed)."""
        channel = self._channel
        return self._drain.waiting or (channel.finished and channel.error is not None)

    def write_eof(self) -> None:
        self.connection.guarded(self._channel.send_eof)

    def abort(self) -> None:
        """Reset now (CANCEL) unless finished both ways; unsent and unread bytes are dropped."""
        channel = self._channel
        if not channel.finished:
            self.connection.guarded(
                self.connection.reset_stream,
                channel,
                ErrorCodes.CANCEL,
                HboneConnectionError("closed locally"),
            )

    async def wait_closed(self) -> None:
        await asyncio.shield(self._channel.done)
