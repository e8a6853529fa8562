"""The client-facing HTTP/2 side (h2, server, prior knowledge): streams, flow control, trailers, floods.

Theory of operation
-------------------
One `Http2Session` per HBONE tunnel whose bytes start with the HTTP/2 preface. A read loop passes the
bytes through `loom.hbone.protocol.FrameScanner` (frame size, header-block bytes, CONTINUATION,
empty-frame and PRIORITY floods, counted before h2 buffers anything; GOAWAY frames are taken out) into
h2, and dispatches h2's events; every request stream runs the pipeline in a task of its own.

h2's own header validation is off: it would make any malformed request a connection error. Instead
`headers.validate_h2_request` checks each request and the stream alone is refused: RST_STREAM
PROTOCOL_ERROR for a malformed request (injection, pseudo-header misuse, connection headers, `te`),
431 for too many or too large headers, 405 for CONNECT. h2 still decodes every header block, so HPACK
stays in sync, and its decoder stops at `h2_header_list_hard_cap` (beyond that the connection is
closed: ENHANCE_YOUR_CALM); a dynamic table size update above our SETTINGS_HEADER_TABLE_SIZE is a
COMPRESSION error of the connection (hpack). A client's large SETTINGS_HEADER_TABLE_SIZE is capped for
our encoder at `h2_encoder_table_size`.

Floods close the connection with GOAWAY ENHANCE_YOUR_CALM, each counted by reason: more than
`rapid_reset_limit` streams reset by the client before their response was complete within
`rapid_reset_window` (`rapid_reset`), more than `control_frame_limit` PING/SETTINGS frames within
`control_frame_window` (`control_frame_flood`), and the scanner's limits. Streams beyond
SETTINGS_MAX_CONCURRENT_STREAMS are refused (REFUSED_STREAM, `too_many_streams`); h2's own check, which
would be a connection error, is lifted as in the HBONE server.

Flow control: request DATA goes into the stream's `BodyPipe` and is acknowledged to h2 (reopening the
client's window) only as the upstream side consumes it; response DATA is sent within the client's
windows, waiting for WINDOW_UPDATE, and after each write for the socket to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame

from loom.hbone.errors import HboneProtocolViolation
from loom.hbone.protocol import FrameScanner, ScanLimits
from waypoint.proxy.body import BodyAborted, BodyPipe, RequestBody
from waypoint.proxy.deadline import Deadline
from waypoint.proxy.decide import local_head
from waypoint.proxy.flood import WindowedCounter
from waypoint.proxy.headers import (
    HOP_BY_HOP,
    MalformedRequest,
    valid_name,
    valid_value,
    validate_h2_request,
    validate_trailers,
)
from waypoint.proxy.interfaces import DownstreamReader, DownstreamWriter, RequestObserver
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import HTTP2, ProxyResponse, RequestHead
from waypoint.proxy.pipeline import ConnectionContext, RequestPipeline

logger = logging.getLogger("waypoint.proxy")

_READ_SIZE = 256 * 1024
_GOAWAY_PAYLOAD = 16 * 1024
_CLOSE_LINGER = 1.0  # seconds a closing connection gets to flush its GOAWAY


class _InnerH2Connection(h2.connection.H2Connection):
    """h2 with its inbound stream limit lifted and a hard HPACK header-list cap (module docstring)."""

    hard_header_list_cap = 0

    @property
    def open_inbound_streams(self) -> int:
        # h2 reads this only for its stream-limit check; keep its side effect (forgetting closed
        # streams) and let the session refuse excess streams itself.
        self._open_streams(1)
        return 0

    def _local_settings_acked(self) -> dict[SettingCodes | int, h2.settings.ChangedSetting]:
        changes = super()._local_settings_acked()
        # Lists between the advertised limit and the hard cap are decoded and answered 431 per stream.
        self.decoder.max_header_list_size = self.hard_header_list_cap
        return changes


class _Stream:
    __slots__ = ("body", "head", "remote_ended", "responded", "sent", "task", "trailers")

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.body: BodyPipe | None = None
        self.task: asyncio.Task[None] | None = None
        self.responded = False  # the response is complete (the stream is ours no more)
        self.remote_ended = False
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.sent = 0


class Http2Session:
    """One client connection speaking HTTP/2 (see the module docstring)."""

    def __init__(
        self,
        reader: DownstreamReader,
        writer: DownstreamWriter,
        ctx: ConnectionContext,
        pipeline: RequestPipeline,
        observer: RequestObserver,
        limits: ProxyLimits,
        prefix: bytes = b"",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.ctx = ctx
        self.pipeline = pipeline
        self.observer = observer
        self.limits = limits
        self.prefix = prefix
        self.loop = asyncio.get_running_loop()
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = _InnerH2Connection(config)
        self.h2.hard_header_list_cap = limits.h2_header_list_hard_cap
        self.h2.decoder.max_header_list_size = limits.h2_header_list_hard_cap
        self.scanner = FrameScanner(
            ScanLimits(
                max_frame_size=limits.h2_max_frame_size,
                max_header_block_bytes=limits.h2_header_list_hard_cap,
                max_continuation_frames=limits.h2_max_continuation_frames,
                max_empty_frames=limits.max_empty_frames,
                priority_frames_per_stream=limits.priority_frames_per_stream,
                max_goaway_payload=_GOAWAY_PAYLOAD,
            ),
            server=True,
        )
        self.resets = WindowedCounter(limits.rapid_reset_limit, limits.rapid_reset_window)
        self.control = WindowedCounter(limits.control_frame_limit, limits.control_frame_window)
        self.streams: dict[int, _Stream] = {}
        self.window = asyncio.Event()
        self.closing = False
        self.draining = False
        self.close_reason: str | None = None
        self.last_stream = 0

    # ------------------------------------------------------------------ connection

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.h2_max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: self.limits.h2_stream_window,
                SettingCodes.MAX_FRAME_SIZE: self.limits.h2_max_frame_size,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_request_head_bytes,
                SettingCodes.HEADER_TABLE_SIZE: self.limits.h2_header_table_size,
                SettingCodes.ENABLE_PUSH: 0,
            }
        )
        grow = self.limits.h2_connection_window - self.h2.inbound_flow_control_window
        if grow > 0:
            self.h2.increment_flow_control_window(grow)
        self._flush()
        try:
            data = self.prefix
            while not self.closing:
                if data:
                    self._receive(data)
                    await self._drain()
                if self.closing or (self.draining and not self.streams):
                    break
                data = await self._next_data()
                if not data:
                    break
        except (ConnectionError, TimeoutError) as e:
            logger.debug("HTTP/2 client connection ended", extra={"fields": {"error": str(e)}})
        finally:
            await self._shutdown()

    async def _next_data(self) -> bytes:
        # Bounded: each round either returns bytes or ends an idle connection.
        while True:
            try:
                async with Deadline.within(self.loop, self.limits.idle_timeout):
                    return await self.reader.read(_READ_SIZE)
            except TimeoutError:
                if not self.streams:
                    self._goaway(ErrorCodes.NO_ERROR, "idle_timeout")
                    return b""

    def drain(self) -> None:
        """GOAWAY NO_ERROR: no new streams; the open ones finish, then the connection closes."""
        if self.closing or self.draining:
            return
        self.draining = True
        if not self.streams:
            self._goaway(ErrorCodes.NO_ERROR, "drained")
            self.writer.close()
            return
        # A GOAWAY frame of our own rather than h2's close_connection, which would end h2's state
        # machine and with it the streams we promise to finish.
        self._flush()
        frame = GoAwayFrame(0, last_stream_id=self.last_stream, error_code=int(ErrorCodes.NO_ERROR))
        self.writer.write(frame.serialize())

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _drain(self) -> None:
        self._flush()
        if self.writer.write_blocked():  # only then can drain() wait (or raise)
            async with Deadline.within(self.loop, self.limits.write_timeout):
                await self.writer.drain()

    def _goaway(self, code: ErrorCodes, reason: str, detail: str = "") -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        if code != ErrorCodes.NO_ERROR:
            self.observer.refused(reason)
            logger.info(
                "closing HTTP/2 client connection",
                extra={"fields": {"peer": self.ctx.peer.address, "reason": reason, "detail": detail}},
            )
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(
                error_code=code, additional_data=reason.encode()[:64], last_stream_id=self.last_stream
            )
        self._flush()

    async def _shutdown(self) -> None:
        self.closing = True
        tasks = [s.task for s in self.streams.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for stream in self.streams.values():
            if stream.body is not None:
                stream.body.abort(BodyAborted("the client connection closed"))
        self.streams.clear()
        with contextlib.suppress(ConnectionError, TimeoutError):
            self._flush()
            async with asyncio.timeout(_CLOSE_LINGER):
                await self.writer.drain()
        self.writer.close()

    # ------------------------------------------------------------------ inbound

    def _receive(self, data: bytes) -> None:
        try:
            scan = self.scanner.feed(data)
            if scan.answers_owed and self.control.add(self.loop.time(), scan.answers_owed):
                self._goaway(
                    ErrorCodes.ENHANCE_YOUR_CALM, "control_frame_flood", "too many PING/SETTINGS frames"
                )
                return
            for segment in scan.segments:
                # Whole DATA frames are cut out only for HBONE (whole_data); h2 parses them all here.
                events = self.h2.receive_data(segment[1] if isinstance(segment, tuple) else segment)
                for event in events:
                    if self.closing:
                        return
                    self._on_event(event)
            if scan.goaways:
                self.draining = True  # the client is going away: finish what is open, take nothing new
        except HboneProtocolViolation as e:
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, e.reason, e.detail)
        except h2.exceptions.DenialOfServiceError as e:
            self._fatal("header_list_too_large", e)
        except h2.exceptions.ProtocolError as e:
            self._fatal("hpack_error" if isinstance(e.__cause__, HPACKError) else "protocol_error", e)
        self._flush()

    def _fatal(self, reason: str, error: Exception) -> None:
        """h2 already queued its GOAWAY for this protocol error; count it and close."""
        self.observer.refused(reason)
        logger.info(
            "HTTP/2 client protocol error",
            extra={"fields": {"peer": self.ctx.peer.address, "reason": reason, "error": str(error)}},
        )
        self.closing = True
        self.close_reason = reason
        self._flush()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            flow = event.flow_controlled_length or 0
            if stream is None or stream.body is None:
                self._ack(event.stream_id or 0, flow)
            else:
                stream.body.feed(event.data or b"", flow)
        elif isinstance(event, h2.events.TrailersReceived):
            self._on_trailers(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.remote_ended = True
                if stream.body is not None:
                    stream.body.finish(stream.trailers)
                self._forget_if_done(event.stream_id or 0, stream)
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(SettingCodes.HEADER_TABLE_SIZE)
            if changed is not None and changed.new_value > self.limits.h2_encoder_table_size:
                # We may use a table this large for our responses; we choose to use less.
                self.h2.encoder.header_table_size = self.limits.h2_encoder_table_size
            self.window.set()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        self.last_stream = max(self.last_stream, stream_id)
        if self.draining:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.limits.h2_max_concurrent_streams:
            self.observer.refused("too_many_streams")
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        ended = event.stream_ended is not None
        raw = [(bytes(n), bytes(v)) for n, v in event.headers or []]
        try:
            head = validate_h2_request(
                raw,
                max_headers=self.limits.max_request_headers,
                max_bytes=self.limits.max_request_head_bytes,
                end_stream=ended,
            )
        except MalformedRequest as e:
            self._refuse_stream(stream_id, e, ended)
            return
        stream = _Stream()
        stream.head = head
        stream.remote_ended = ended
        if not ended:
            stream.body = BodyPipe(self.limits.body_buffer, on_consumed=lambda n: self._ack(stream_id, n))
        self.streams[stream_id] = stream
        stream.task = self.loop.create_task(
            self._serve(stream_id, stream, head), name=f"waypoint-h2-stream-{stream_id}"
        )

    def _refuse_stream(self, stream_id: int, error: MalformedRequest, ended: bool) -> None:
        answered = None
        if error.status is not None:
            answered = self.ctx.refused(HTTP2, error.status, f"http2.{error.reason}")
        self.observer.refused(error.reason, answered)
        logger.info(
            "HTTP/2 request refused",
            extra={"fields": {"peer": self.ctx.peer.address, "reason": error.reason, "detail": error.detail}},
        )
        if error.status is None:
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        body = f"{error.reason}\n".encode()
        try:
            self.h2.send_headers(
                stream_id,
                [
                    (":status", str(error.status)),
                    ("content-type", "text/plain"),
                    ("content-length", str(len(body))),
                ],
            )
            self.h2.send_data(stream_id, body, end_stream=True)
            if not ended:
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream_id = event.stream_id or 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        raw = [(bytes(n), bytes(v)) for n, v in event.headers or []]
        try:
            stream.trailers = tuple(
                validate_trailers(
                    raw,
                    max_headers=self.limits.max_request_headers,
                    max_bytes=self.limits.max_request_head_bytes,
                )
            )
        except MalformedRequest as e:
            self.observer.refused(e.reason)
            if stream.body is not None:
                stream.body.abort(BodyAborted(f"malformed trailers: {e}"))
            self._cancel_stream(stream_id, stream, ErrorCodes.PROTOCOL_ERROR)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream_id = event.stream_id or 0
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if not stream.responded and self.resets.add(self.loop.time()):
            limits = self.limits
            detail = f"more than {limits.rapid_reset_limit} resets within {limits.rapid_reset_window:g} s"
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, "rapid_reset", detail)
        if stream.body is not None:
            stream.body.abort(BodyAborted("the client reset the stream"))
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _ack(self, stream_id: int, size: int) -> None:
        if self.closing or size <= 0:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.acknowledge_received_data(size, stream_id)
            self._flush()

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
        self._flush()

    def _cancel_stream(self, stream_id: int, stream: _Stream, code: ErrorCodes) -> None:
        self.streams.pop(stream_id, None)
        self._reset(stream_id, code)
        if stream.task is not None and not stream.task.done() and stream.task is not asyncio.current_task():
            stream.task.cancel()

    def _forget_if_done(self, stream_id: int, stream: _Stream) -> None:
        if stream.responded and stream.remote_ended:
            self.streams.pop(stream_id, None)

    # ------------------------------------------------------------------ serving a stream

    async def _serve(self, stream_id: int, stream: _Stream, head: RequestHead) -> None:
        body = RequestBody(stream.body, self.limits.retry_buffer)
        response: ProxyResponse | None = None
        error: str | None = "the stream ended before the response"
        try:
            try:
                response = await self.pipeline.handle(self.ctx, head, body)
            except Exception:
                logger.exception("request pipeline failed")
                response_head, content = local_head(500, b"internal error", grpc=False)
                response = ProxyResponse(response_head, content=content)
            error = await self._respond(stream_id, stream, response)
        except asyncio.CancelledError:
            error = "the client reset the stream"
            raise
        except Exception:  # a bug in one stream must not end the connection's other streams
            logger.exception("HTTP/2 stream failed", extra={"fields": {"peer": self.ctx.peer.address}})
            error = "internal error"
            self._reset(stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            stream.responded = True
            if response is not None:
                response.complete(stream.sent, error)
            body.cancel()
            if stream_id in self.streams:
                if not stream.remote_ended and not self.closing:
                    # Answered before the request body ended: tell the client to stop (RFC 9113 §8.1).
                    self._reset(stream_id, ErrorCodes.NO_ERROR)
                    self.streams.pop(stream_id, None)
                else:
                    self._forget_if_done(stream_id, stream)
            if self.draining and not self.streams and not self.closing:
                self._goaway(ErrorCodes.NO_ERROR, "drained")
                self.writer.close()  # wakes the read loop; close() still sends what is buffered

    async def _respond(self, stream_id: int, stream: _Stream, response: ProxyResponse) -> str | None:
        """Send the response; None when the client got all of it, else why not."""
        if self.closing or stream_id not in self.streams:
            return "the client reset the stream"
        method = stream.head.method if stream.head is not None else ""
        bodiless = method == "HEAD" or response.head.status in (204, 304)
        headers = [(":status", str(response.head.status))]
        headers += [
            (n, v)
            for n, v in response.head.headers
            if n not in HOP_BY_HOP and valid_name(n) and valid_value(v)
        ]
        if response.head.content_length is not None:
            headers.append(("content-length", str(response.head.content_length)))
        elif response.body is None and not bodiless:
            headers.append(("content-length", str(len(response.content))))
        has_more = not bodiless and (response.body is not None or bool(response.content))
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not has_more)
            await self._drain()
            if not has_more:
                return None
            if response.body is None:
                await self._send_data(stream_id, stream, response.content)
                self.h2.end_stream(stream_id)
                await self._drain()
                return None
            async with Deadline(self.loop, response.deadline):
                while data := await response.body.read():
                    await self._send_data(stream_id, stream, data)
            trailers = [(n, v) for n, v in response.body.trailers if valid_name(n) and valid_value(v)]
            if trailers:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream_id)
            await self._drain()
            return None
        except BodyAborted as e:
            self._reset(stream_id, ErrorCodes.INTERNAL_ERROR)
            return str(e)
        except TimeoutError:
            self._reset(stream_id, ErrorCodes.CANCEL)
            return "timed out sending the response (route timeout, or the client is not reading)"
        except _StreamGone:
            return "the client reset the stream"
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return "the client reset the stream"
        except ConnectionError as e:
            return f"the client connection failed: {e}"
        except h2.exceptions.ProtocolError as e:
            self._reset(stream_id, ErrorCodes.INTERNAL_ERROR)
            return f"cannot send the response: {e}"

    async def _send_data(self, stream_id: int, stream: _Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closing or stream_id not in self.streams:
                raise _StreamGone
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            self.h2.send_data(stream_id, view[:size].tobytes())
            stream.sent += size
            view = view[size:]
            await self._drain()


class _StreamGone(Exception):
    """The stream was reset or the connection is closing while we were sending."""
