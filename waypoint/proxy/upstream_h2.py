"""One multiplexed HTTP/2 connection to a backend, over one HBONE tunnel (h2, client side).

Theory of operation
-------------------
A reader task feeds the tunnel's bytes to h2 and dispatches the events to per-stream state: the
response head resolves the waiting `exchange()`, DATA goes into the stream's response `BodyPipe`
(acknowledged to h2, reopening the backend's window, only when the client side consumed it: end-to-end
back-pressure), trailers end the pipe, a reset fails whichever of the two is pending.

Request bodies are sent by one task per stream: DATA is cut to the backend's stream and connection
windows and frame size, and the task waits for a WINDOW_UPDATE (or SETTINGS change) when the window is
empty and for the tunnel to drain after each write.

The connection takes streams while the backend's SETTINGS_MAX_CONCURRENT_STREAMS allows and it did not
send GOAWAY. Streams above a GOAWAY's last stream id, and streams reset with REFUSED_STREAM, fail with
`UpstreamReset(refused=True)`: the backend promises it never processed them, so any request may be
sent again. Errors of the connection fail every stream on it and remove it from the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from loom.hbone import HboneError, Tunnel
from waypoint.proxy.body import AttemptBody, BodyAborted, BodyPipe
from waypoint.proxy.headers import HOP_BY_HOP
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import (
    HTTP2,
    RequestHead,
    ResponseHead,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamResponse,
)

logger = logging.getLogger("waypoint.proxy")

_READ_SIZE = 256 * 1024
# Streams we open on one connection at most, whatever the backend allows (ztunnel's pool uses 100).
_MAX_STREAMS = 100


class _Stream:
    __slots__ = ("body", "head_future", "method", "sender", "trailers")

    def __init__(self, loop: asyncio.AbstractEventLoop, method: str, body: BodyPipe) -> None:
        self.method = method
        self.head_future: asyncio.Future[tuple[ResponseHead, bool]] = loop.create_future()
        self.body = body
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.sender: asyncio.Task[None] | None = None


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def response_head_from_h2(headers: list[tuple[bytes | str, bytes | str]]) -> ResponseHead:
    status = 0
    content_length: int | None = None
    result = []
    for raw_name, raw_value in headers:
        name, value = _text(raw_name), _text(raw_value)
        if name == ":status":
            status = int(value) if value.isdigit() else 0
        elif name.startswith(":"):
            continue
        elif name == "content-length":
            content_length = int(value) if value.isdigit() else None
        elif name not in HOP_BY_HOP:
            result.append((name, value))
    if not 100 <= status <= 599:
        raise UpstreamProtocolError(f"the backend answered :status {status!r}")
    return ResponseHead(status, result, content_length)


class H2Upstream:
    """A client HTTP/2 connection (prior knowledge) on an HBONE tunnel, many streams at once."""

    protocol = HTTP2

    def __init__(self, tunnel: Tunnel, limits: ProxyLimits, on_closed: Callable[[H2Upstream], None]) -> None:
        self.tunnel = tunnel
        self.limits = limits
        self._on_closed = on_closed
        self.loop = asyncio.get_running_loop()
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway_last_stream: int | None = None
        self.idle_since = self.loop.time()
        self._window = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: self.limits.h2_stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_response_head_bytes,
            }
        )
        grow = self.limits.h2_connection_window - self.h2.inbound_flow_control_window
        if grow > 0:
            self.h2.increment_flow_control_window(grow)
        self._flush()
        self._reader = self.loop.create_task(self._read_loop(), name="waypoint-h2-upstream")

    @property
    def capacity(self) -> int:
        return min(_MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)

    def has_room(self) -> bool:
        return (
            not self.closed
            and not self.tunnel.closed
            and self.goaway_last_stream is None
            and len(self.streams) < self.capacity
        )

    @property
    def usable(self) -> bool:
        return not self.closed and not self.tunnel.closed and self.goaway_last_stream is None

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.tunnel.write(data)

    def close(self, error: str = "connection closed") -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, HboneError, OSError):
            self.h2.close_connection()
            self._flush()
            self.tunnel.write_eof()
        self.closed = True
        for stream in list(self.streams.values()):
            self._fail(stream, UpstreamReset(f"HTTP/2 connection to the backend ended: {error}"))
        self.streams.clear()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self.tunnel.close()
        self._window.set()
        self._on_closed(self)

    # ------------------------------------------------------------------ requests

    async def exchange(self, head: RequestHead, body: AttemptBody | None) -> UpstreamResponse:
        if not self.has_room():
            raise UpstreamReset("the HTTP/2 connection to the backend has no room", refused=True)
        stream_id = self.h2.get_next_available_stream_id()
        pipe = BodyPipe(self.limits.body_buffer, on_consumed=lambda n: self._ack(stream_id, n))
        stream = _Stream(self.loop, head.method, pipe)
        self.streams[stream_id] = stream
        has_body = body is not None and not body.empty
        headers: list[tuple[str, str]] = [
            (":method", head.method),
            (":scheme", "http"),
            (":authority", head.authority),
            (":path", head.target),
        ]
        headers.extend(head.headers)
        if head.te_trailers:
            headers.append(("te", "trailers"))
        if head.content_length is not None:
            headers.append(("content-length", str(head.content_length)))
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not has_body)
            self._flush()
        except (h2.exceptions.ProtocolError, HboneError, OSError) as e:
            self.streams.pop(stream_id, None)
            raise UpstreamReset(f"cannot open a stream to the backend: {e}") from e
        if body is not None and has_body:
            stream.sender = self.loop.create_task(
                self._send_body(stream_id, body), name="waypoint-h2-body-up"
            )
        try:
            response, ended = await stream.head_future
        except asyncio.CancelledError:
            self._reset(stream_id, ErrorCodes.CANCEL)
            raise
        return UpstreamResponse(
            head=response,
            body=None if ended else pipe,
            upgraded=None,
            protocol=HTTP2,
            trailers_only=ended,
        )

    async def _send_body(self, stream_id: int, body: AttemptBody) -> None:
        try:
            while data := await body.read():
                view = memoryview(data)
                while view:
                    window = self._send_window(stream_id)
                    if window is None:
                        return  # the stream is gone (reset or answered and closed)
                    if window <= 0:
                        self._window.clear()
                        await self._window.wait()
                        continue
                    size = min(window, self.h2.max_outbound_frame_size, len(view))
                    self.h2.send_data(stream_id, view[:size].tobytes())
                    view = view[size:]
                    self._flush()
                    await self.tunnel.drain()
            if stream_id not in self.streams:
                return
            trailers = list(body.trailers)
            if trailers:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream_id)
            self._flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return
        except (BodyAborted, HboneError, OSError, h2.exceptions.ProtocolError) as e:
            logger.debug("request body to the backend ended early", extra={"fields": {"error": str(e)}})
            self._reset(stream_id, ErrorCodes.CANCEL)

    def _send_window(self, stream_id: int) -> int | None:
        if self.closed or stream_id not in self.streams:
            return None
        try:
            return self.h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return None

    def _ack(self, stream_id: int, size: int) -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, HboneError, OSError):
            self.h2.acknowledge_received_data(size, stream_id)
            self._flush()

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, HboneError, OSError):
            self.h2.reset_stream(stream_id, code)
            self._flush()
        self._fail(stream, UpstreamReset(f"stream {stream_id} to the backend was cancelled"))
        self._stream_gone()

    def _fail(self, stream: _Stream, error: UpstreamReset) -> None:
        if not stream.head_future.done():
            stream.head_future.set_exception(error)
        stream.body.abort(BodyAborted(str(error)))
        if (
            stream.sender is not None
            and not stream.sender.done()
            and stream.sender is not asyncio.current_task()
        ):
            stream.sender.cancel()

    def _stream_gone(self) -> None:
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.goaway_last_stream is not None:
                self.close("the backend sent GOAWAY")

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        error = "the backend closed the connection"
        try:
            while not self.closed:
                data = await self.tunnel.read(_READ_SIZE)
                if not data:
                    break
                events = self.h2.receive_data(data)
                for event in events:
                    self._on_event(event)
                self._flush()
        except (h2.exceptions.ProtocolError, UpstreamProtocolError) as e:
            error = f"HTTP/2 protocol error from the backend: {e}"
            with contextlib.suppress(HboneError, OSError):
                self._flush()
        except (HboneError, OSError) as e:
            error = f"HBONE tunnel failed: {e}"
        finally:
            self.close(error)

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and not stream.head_future.done():
                try:
                    head = response_head_from_h2(list(event.headers or []))
                except UpstreamProtocolError as e:
                    stream.head_future.set_exception(e)
                    self._reset(event.stream_id or 0, ErrorCodes.PROTOCOL_ERROR)
                    return
                stream.head_future.set_result((head, event.stream_ended is not None))
                if event.stream_ended is not None:
                    stream.trailers = tuple((n, v) for n, v in head.headers)
                    self._end(event.stream_id or 0)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            flow = event.flow_controlled_length or 0
            if stream is None:
                self._ack(event.stream_id or 0, flow)
            else:
                stream.body.feed(event.data or b"", flow)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = tuple(
                    (_text(n), _text(v)) for n, v in event.headers or [] if not _text(n).startswith(":")
                )
        elif isinstance(event, h2.events.StreamEnded):
            self._end(event.stream_id or 0)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id or 0, None)
            if stream is not None:
                code = event.error_code
                self._fail(
                    stream,
                    UpstreamReset(
                        f"the backend reset stream {event.stream_id} ({code!s})",
                        refused=code == ErrorCodes.REFUSED_STREAM,
                    ),
                )
                self._stream_gone()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 accepts no frame after a GOAWAY, so even the streams the backend would still finish
            # cannot complete here; those it never processed are marked safe to send again.
            last = event.last_stream_id or 0
            self.goaway_last_stream = last
            for stream_id in list(self.streams):
                stream = self.streams.pop(stream_id)
                self._fail(
                    stream,
                    UpstreamReset(f"the backend sent GOAWAY (last stream {last})", refused=stream_id > last),
                )
            self.close("the backend sent GOAWAY")

    def _end(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.body.finish(stream.trailers)
        if stream.sender is not None and not stream.sender.done():
            # The backend answered before reading the whole request body: stop sending it.
            stream.sender.cancel()
            with contextlib.suppress(h2.exceptions.ProtocolError, HboneError, OSError):
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._stream_gone()
