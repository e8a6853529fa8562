"""The client-facing HTTP/1.1 side (h11, server): keep-alive, bodies streamed both ways, upgrades.

Theory of operation
-------------------
One `Http1Session` per HBONE tunnel whose bytes are HTTP/1.1. Requests are served strictly one at a
time: h11 holds a pipelined request until the previous response is complete (pipelining is safe, never
concurrent), and the socket is only read when h11 needs bytes for the current message.

Head: bytes are collected until the blank line ending the head (at most `max_request_head_bytes`, 431
beyond, and within `request_head_timeout` once the first byte came) and checked raw by
`h1head.check_request_head` before h11 sees them; then h11 parses. A refusal answers with a short
response and `Connection: close`, counts the reason with the observer, and ends the connection: after
a malformed request nothing that follows on the connection can be trusted.

Body: a task feeds h11's Data events into the request's `BodyPipe` (awaiting it: a slow backend stops
us reading the client). A client waiting for `100 Continue` gets it when the pipeline first reads the
body, i.e. only once the request was authorized and routed. A chunked-framing error in the body is a
400 and the end of the connection (the pipeline reads small bodies completely before contacting the
backend, so such a request never reaches it).

Response: h11 frames it for the client (Content-Length when the backend gave one, else chunked; the
trailers only when chunked). A response sent before the request body was read completely (a 403, an
early 413) ends the connection instead of reading and discarding an unknown amount. A 101 from the
backend switches the connection to a raw byte splice with the backend's tunnel (`splice_upgraded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from http import HTTPStatus
from typing import NoReturn

import h11

from loom.hbone import HboneError
from waypoint.proxy.body import BodyAborted, BodyPipe, RequestBody
from waypoint.proxy.deadline import Deadline
from waypoint.proxy.decide import local_head
from waypoint.proxy.h1head import HeadViolation, check_request_head, find_head_end
from waypoint.proxy.headers import HOP_BY_HOP, connection_tokens, valid_name, valid_value
from waypoint.proxy.interfaces import DownstreamReader, DownstreamWriter, RequestObserver
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import HTTP11, ProxyResponse, RequestHead, UpgradedStream
from waypoint.proxy.pipeline import ConnectionContext, RequestPipeline

logger = logging.getLogger("waypoint.proxy")

_READ_SIZE = 64 * 1024


class _SessionEnd(Exception):
    """The connection is over (closed by the client, refused, or not reusable)."""


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def refusal_bytes(status: int, text: str) -> bytes:
    """A complete, minimal HTTP/1.1 answer that closes the connection."""
    body = (text + "\n").encode("utf-8", "replace")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (status, _reason(status), len(body))
        + body
    )


def request_head_from_h11(event: h11.Request) -> RequestHead:
    """The protocol-neutral head of a request h11 parsed (and h1head checked)."""
    pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
    named = connection_tokens(pairs)
    authority = ""
    content_length: int | None = None
    chunked = False
    te_trailers = False
    expect_continue = False
    upgrade_value: str | None = None
    headers = []
    for name, value in pairs:
        if name == "host":
            authority = value
        elif name == "content-length":
            content_length = int(value.strip())
        elif name == "transfer-encoding":
            chunked = True
        elif name == "te":
            te_trailers = "trailers" in [t.strip().lower() for t in value.split(",")]
        elif name == "upgrade":
            upgrade_value = value.strip().lower()
        elif name == "expect":
            expect_continue = value.strip().lower() == "100-continue"
        elif name in HOP_BY_HOP or name in named:
            continue
        else:
            headers.append((name, value))
    # Only WebSocket upgrades are passed through (h2c and others are dropped: the request is forwarded
    # as a plain one).
    upgrade = "websocket" if upgrade_value == "websocket" and "upgrade" in named else None
    return RequestHead(
        method=event.method.decode("latin-1"),
        authority=authority,
        target=event.target.decode("latin-1"),
        headers=headers,
        protocol=HTTP11,
        content_length=None if chunked else content_length,
        has_body=chunked or bool(content_length),
        upgrade=upgrade,
        expect_continue=expect_continue,
        te_trailers=te_trailers,
    )


async def splice_upgraded(
    reader: DownstreamReader,
    writer: DownstreamWriter,
    client_leftover: bytes,
    upgraded: UpgradedStream,
) -> tuple[int, int]:
    """Copy raw bytes both ways between the client and the backend's tunnel until both directions
    ended, one chunk at a time (each waits for the other side to drain); (to backend, to client)."""
    tunnel = upgraded.tunnel
    counts = [0, 0]

    async def up() -> None:
        data = client_leftover
        while True:
            if data:
                tunnel.write(data)
                counts[0] += len(data)
                await tunnel.drain()
            data = await reader.read(_READ_SIZE)
            if not data:
                tunnel.write_eof()
                return

    async def down() -> None:
        data = upgraded.leftover
        while True:
            if data:
                writer.write(data)
                counts[1] += len(data)
                await writer.drain()
            data = await tunnel.read(_READ_SIZE)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except (HboneError, OSError) as e:
                logger.debug("upgraded connection ended", extra={"fields": {"error": str(e)}})
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tunnel.close()
    return counts[0], counts[1]


class Http1Session:
    """One client connection speaking HTTP/1.1 (see the module docstring)."""

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
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_request_head_bytes + 1024)
        self._pending = bytearray(prefix)  # bytes of the next head, not yet parsed by h11
        self.conn.receive_data(prefix)
        self._body_violation: HeadViolation | None = None
        self._continue_asked = asyncio.Event()
        self.requests = 0
        self.draining = False
        self._idle = False  # waiting for the first byte of the next request
        self._body_sent = 0  # response body bytes of the current response sent so far
        self.loop = asyncio.get_running_loop()

    def drain(self) -> None:
        """Finish the request in flight (if any), then close; an idle connection closes now."""
        self.draining = True
        if self._idle:
            self.writer.close()

    async def run(self) -> None:
        try:
            # Bounded by the connection's lifetime: every round serves one request or ends it.
            while True:
                event = await self._next_request()
                if event is None:
                    return
                if not await self._serve(event):
                    return
        except _SessionEnd:
            return
        except (ConnectionError, TimeoutError, HboneError) as e:
            logger.debug("HTTP/1.1 client connection ended", extra={"fields": {"error": str(e)}})
        finally:
            self.writer.close()

    # ------------------------------------------------------------------ reading

    async def _read(self, within: float) -> bytes:
        async with Deadline.within(self.loop, within):
            return await self.reader.read(_READ_SIZE)

    async def _refuse(
        self, status: int, reason: str, detail: str, head: RequestHead | None = None
    ) -> NoReturn:
        self.observer.refused(reason, self.ctx.refused(HTTP11, status, f"http1.{reason}", head))
        logger.info(
            "HTTP/1.1 request refused",
            extra={
                "fields": {
                    "peer": self.ctx.peer.address,
                    "status": status,
                    "reason": reason,
                    "detail": detail,
                }
            },
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            self.writer.write(refusal_bytes(status, f"{HTTPStatus(status).phrase}: {reason}"))
            async with Deadline.within(self.loop, self.limits.write_timeout):
                await self.writer.drain()
        raise _SessionEnd

    async def _next_request(self) -> h11.Request | None:
        """The next request, its head checked; None when the client closed between requests."""
        loop = self.loop
        head_deadline: float | None = (
            loop.time() + self.limits.request_head_timeout if self._pending else None
        )
        while True:
            end = find_head_end(self._pending)
            if end is not None:
                break
            if len(self._pending) > self.limits.max_request_head_bytes:
                await self._refuse(
                    431, "head_too_large", f"no end of the request head in {len(self._pending)} bytes"
                )
            if head_deadline is None:
                timeout = self.limits.idle_timeout
            else:
                timeout = head_deadline - loop.time()
                if timeout <= 0:
                    await self._refuse(408, "head_timeout", "the request head did not complete in time")
            if self.draining and not self._pending:
                return None
            self._idle = not self._pending
            try:
                data = await self._read(timeout)
            except TimeoutError:
                if head_deadline is None:
                    return None  # idle keep-alive connection
                await self._refuse(408, "head_timeout", "the request head did not complete in time")
            finally:
                self._idle = False
            if not data:
                return None
            if head_deadline is None:
                head_deadline = loop.time() + self.limits.request_head_timeout
            self._pending += data
            self.conn.receive_data(data)
        if end > self.limits.max_request_head_bytes:
            await self._refuse(431, "head_too_large", f"request head of {end} bytes")
        violation = check_request_head(
            bytes(self._pending[:end]), max_headers=self.limits.max_request_headers
        )
        if violation is not None:
            await self._refuse(violation.status, violation.reason, violation.detail)
        del self._pending[:end]
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as e:
            await self._refuse(e.error_status_hint, "bad_request", str(e))
        if not isinstance(event, h11.Request):
            await self._refuse(400, "bad_request", f"expected a request, got {type(event).__name__}")
        return event

    async def _read_body(self, pipe: BodyPipe) -> None:
        """Feed the request body into `pipe` (bounded: waits while the pipe is full)."""
        try:
            while True:
                try:
                    event = self.conn.next_event()
                except h11.RemoteProtocolError as e:
                    self._body_violation = HeadViolation(400, "bad_body", str(e))
                    pipe.abort(BodyAborted(f"malformed request body: {e}"))
                    return
                if event is h11.NEED_DATA:
                    if self.conn.they_are_waiting_for_100_continue and not self._continue_asked.is_set():
                        # Not asked for yet: wait until the pipeline reads (after authz and routing); a
                        # request answered without its body cancels this task instead.
                        await self._continue_asked.wait()
                        continue
                    data = await self._read(self.limits.idle_timeout)
                    if not data:
                        pipe.abort(BodyAborted("the client closed the connection mid-body"))
                        return
                    self.conn.receive_data(data)
                elif isinstance(event, h11.Data):
                    await pipe.put(bytes(event.data))
                    if pipe.cancelled:
                        return
                elif isinstance(event, h11.EndOfMessage):
                    pipe.finish(tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers))
                    self._pending = bytearray(self.conn.trailing_data[0])
                    return
                else:
                    pipe.abort(BodyAborted(f"unexpected {type(event).__name__} in the request body"))
                    return
        except (ConnectionError, TimeoutError) as e:
            pipe.abort(BodyAborted(f"reading the request body failed: {e}"))

    def _send_continue(self) -> None:
        self._continue_asked.set()
        if self.conn.they_are_waiting_for_100_continue:
            with contextlib.suppress(h11.LocalProtocolError):
                self.writer.write(
                    self.conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )

    # ------------------------------------------------------------------ serving

    async def _serve(self, event: h11.Request) -> bool:
        """One request; True when the connection may carry another."""
        self.requests += 1
        self._continue_asked.clear()
        head = request_head_from_h11(event)
        if not head.authority:
            # HTTP/1.0 needs no Host: the client addressed this Service, so that is the authority.
            head.authority = self.ctx.destination.service.hostname
        pipe: BodyPipe | None = None
        reader_task: asyncio.Task[None] | None = None
        if head.has_body:
            pipe = BodyPipe(self.limits.body_buffer, on_first_read=self._send_continue)
            reader_task = self.loop.create_task(self._read_body(pipe), name="waypoint-h1-body")
        else:
            self._drain_end_of_message()
        body = RequestBody(pipe, self.limits.retry_buffer)
        try:
            try:
                response = await self.pipeline.handle(self.ctx, head, body)
            except Exception:
                logger.exception("request pipeline failed")
                response_head, content = local_head(500, b"internal error", grpc=False)
                response = ProxyResponse(response_head, content=content)
            if self._body_violation is not None:
                response.complete(0, "malformed request body")
                violation = self._body_violation
                await self._refuse(violation.status, violation.reason, violation.detail, head)
            return await self._respond(head, response, pipe, reader_task)
        finally:
            if reader_task is not None and not reader_task.done():
                reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader_task
            body.cancel()

    def _drain_end_of_message(self) -> None:
        # A bodiless request: h11 has its EndOfMessage ready without more bytes.
        event = self.conn.next_event()
        if not isinstance(event, h11.EndOfMessage):
            raise _SessionEnd
        self._pending = bytearray(self.conn.trailing_data[0])

    async def _write(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            if self.writer.write_blocked():  # only then can drain() wait (or raise)
                async with Deadline.within(self.loop, self.limits.write_timeout):
                    await self.writer.drain()

    async def _respond(
        self,
        request: RequestHead,
        response: ProxyResponse,
        pipe: BodyPipe | None,
        reader_task: asyncio.Task[None] | None,
    ) -> bool:
        self._body_sent = 0
        error: str | None = "the response was not sent"
        try:
            if response.upgraded is not None:
                return await self._switch(response, response.upgraded)
            status = response.head.status
            bodiless = request.method == "HEAD" or status in (204, 304)
            chunked = response.head.content_length is None and not bodiless
            headers = [
                (n.encode("latin-1"), v.encode("latin-1"))
                for n, v in response.head.headers
                if valid_name(n) and valid_value(v)
            ]
            if response.head.content_length is not None:
                headers.append((b"content-length", str(response.head.content_length).encode()))
            elif response.body is None and not bodiless:
                headers.append((b"content-length", str(len(response.content)).encode()))
                chunked = False
            if pipe is not None and pipe.cancelled and not pipe.ended:
                headers.append((b"connection", b"close"))  # the rest of the request body is not read
            await self._write(
                self.conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
            )
            if not bodiless:
                await self._send_body(response)
            trailers = response.body.trailers if response.body is not None and chunked else ()
            if trailers and self.conn.their_http_version == b"1.1" and request.te_trailers:
                end = h11.EndOfMessage(
                    headers=[
                        (n.encode("latin-1"), v.encode("latin-1")) for n, v in trailers if valid_value(v)
                    ]
                )
            else:
                end = h11.EndOfMessage()
            await self._write(self.conn.send(end))
            error = None
        except TimeoutError:
            error = "timed out sending the response (route timeout, or the client is not reading)"
            return False
        except BodyAborted as e:
            error = str(e)
            return False
        except (ConnectionError, h11.LocalProtocolError) as e:
            error = f"sending the response failed: {e}"
            return False
        finally:
            response.complete(self._body_sent, error)
        if reader_task is not None and not reader_task.done():
            return False
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE and not self.draining:
            self.conn.start_next_cycle()
            return True
        return False

    async def _send_body(self, response: ProxyResponse) -> None:
        """The body, counted in `_body_sent` as it goes (a body failing midway is counted as far as
        it got)."""
        if response.body is None:
            if response.content:
                await self._write(self.conn.send(h11.Data(data=response.content)))
                self._body_sent = len(response.content)
            return
        async with Deadline(self.loop, response.deadline):
            while data := await response.body.read():
                await self._write(self.conn.send(h11.Data(data=data)))
                self._body_sent += len(data)

    async def _switch(self, response: ProxyResponse, upgraded: UpgradedStream) -> bool:
        headers = [
            (n.encode("latin-1"), v.encode("latin-1")) for n, v in response.head.headers if valid_value(v)
        ]
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        try:
            await self._write(self.conn.send(h11.InformationalResponse(status_code=101, headers=headers)))
        except (h11.LocalProtocolError, ConnectionError) as e:
            upgraded.tunnel.close()
            response.complete(0, f"cannot switch protocols: {e}")
            return False
        leftover, _ = self.conn.trailing_data
        to_backend, to_client = await splice_upgraded(self.reader, self.writer, bytes(leftover), upgraded)
        response.complete(to_client, None)
        logger.debug("upgraded connection done", extra={"fields": {"up": to_backend, "down": to_client}})
        return False
