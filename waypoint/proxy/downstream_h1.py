"""The client-facing HTTP/1.1 side (server): keep-alive, bodies streamed both ways, upgrades.

Theory of operation
-------------------
One `Http1Session` per HBONE tunnel whose bytes are HTTP/1.1. Requests are served strictly one at a
time: a pipelined request waits in the buffer until the previous response is complete (pipelining is
safe, never concurrent), and the socket is only read when the current message needs bytes.

Head: bytes are collected until the blank line ending the head (at most `max_request_head_bytes`, 431
beyond, and within `request_head_timeout` once the first byte came), checked raw by
`h1head.check_request_head`, then parsed by llhttp (`h1head.parse_request_head`, fed exactly the
head). A refusal answers with a short response and `Connection: close`, counts the reason with the
observer, and ends the connection: after a malformed request nothing that follows on the connection
can be trusted.

Body: its framing comes from the checked head (check_request_head admits one Content-Length, or
Transfer-Encoding: chunked alone). A task feeds it into the request's `BodyPipe` (awaiting it: a slow
backend stops us reading the client): a Content-Length body is counted off the buffer; a chunked body
is decoded by h11's chunked reader (`ChunkedDecoder`), which also says where the body ended, so the
bytes after it stay for the next request. A client waiting for `100 Continue` gets it when the
pipeline first reads the body, i.e. only once the request was authorized and routed. A chunked-framing
error in the body is a 400 and the end of the connection (the pipeline reads small bodies completely
before contacting the backend, so such a request never reaches it).

Response: framed here (Content-Length when the backend gave one, else chunked for HTTP/1.1 clients
and close-delimited for HTTP/1.0 ones; the trailers only when chunked and the client asked for them
with `TE: trailers`), as h11 would: a HEAD response carries the framing headers a GET would get,
`Connection: close` is added whenever the connection will close after it. An HTTP/1.0 client's
connection closes after every response. A response sent before the request body was read completely
(a 403, an early 413) ends the connection instead of reading and discarding an unknown amount. A 101
from the backend switches the connection to a raw byte splice with the backend's tunnel
(`splice_upgraded`).
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
from waypoint.proxy.h1head import (
    HeadViolation,
    ParsedRequestHead,
    check_request_head,
    find_head_end,
    parse_request_head,
)
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


def request_head_from_parsed(parsed: ParsedRequestHead) -> tuple[RequestHead, bool]:
    """The protocol-neutral head of a request llhttp parsed (and h1head checked), and whether the
    client lets the connection carry another request after it (h11's rule: HTTP/1.1 without
    `Connection: close`; HTTP/1.0 connections are never kept)."""
    pairs = parsed.headers
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
            content_length = int(value)
        elif name == "transfer-encoding":
            chunked = True
        elif name == "te":
            te_trailers = "trailers" in [t.strip().lower() for t in value.split(",")]
        elif name == "upgrade":
            upgrade_value = value.lower()
        elif name == "expect":
            # RFC 9110 §10.1.1: HTTP/1.0 clients cannot wait for an interim response.
            expect_continue = value.lower() == "100-continue" and not parsed.http10
        elif name in HOP_BY_HOP or name in named:
            continue
        else:
            headers.append((name, value))
    # Only WebSocket upgrades are passed through (h2c and others are dropped: the request is forwarded
    # as a plain one).
    upgrade = "websocket" if upgrade_value == "websocket" and "upgrade" in named else None
    head = RequestHead(
        method=parsed.method,
        authority=authority,
        target=parsed.target,
        headers=headers,
        protocol=HTTP11,
        content_length=None if chunked else content_length,
        has_body=chunked or bool(content_length),
        upgrade=upgrade,
        expect_continue=expect_continue,
        te_trailers=te_trailers,
    )
    return head, not parsed.http10 and "close" not in named


def response_head_bytes(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Status line and fields (names and values already checked by valid_name / valid_value)."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
    return b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)) + lines.encode("latin-1") + b"\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[str, str]]) -> bytes:
    return b"0\r\n" + "".join(f"{n}: {v}\r\n" for n, v in trailers).encode("latin-1") + b"\r\n"


class ChunkedDecoder:
    """One chunked request body, decoded by h11's strict chunked reader.

    h11 frames a whole message, so it is handed a fixed head announcing a chunked body, then the raw
    bytes after the real (checked) head. Its `trailing_data` tells where the body ended: those bytes
    are the next pipelined request. Errors in the chunk framing raise h11.RemoteProtocolError."""

    _HEAD = b"POST / HTTP/1.1\r\nhost: body\r\ntransfer-encoding: chunked\r\n\r\n"

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER)
        self._conn.receive_data(self._HEAD)
        event = self._conn.next_event()
        assert isinstance(event, h11.Request)

    def feed(self, data: bytes) -> None:
        self._conn.receive_data(data)

    def next(self) -> bytes | list[tuple[str, str]] | None:
        """Decoded body bytes; the trailers (a list) once the body ended; None when it needs bytes."""
        event = self._conn.next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
        if event is h11.NEED_DATA:
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a chunked body")

    @property
    def leftover(self) -> bytes:
        """Bytes received after the end of the body (valid once next() returned the trailers)."""
        return bytes(self._conn.trailing_data[0])


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
        self._pending = bytearray(prefix)  # received, not yet consumed: the next head, or body bytes
        self._body_violation: HeadViolation | None = None
        self._continue_asked = asyncio.Event()
        self._waiting_for_continue = False  # the client sent Expect: 100-continue and no body yet
        self._body_read = True  # the current request's body was read to its end
        self._client_keeps_alive = False  # the current request allows another after it
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
                parsed = await self._next_request()
                if parsed is None:
                    return
                if not await self._serve(parsed):
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

    async def _next_request(self) -> ParsedRequestHead | None:
        """The next request's head, checked and parsed; None when the client closed between requests."""
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
        if end > self.limits.max_request_head_bytes:
            await self._refuse(431, "head_too_large", f"request head of {end} bytes")
        raw = bytes(self._pending[:end])
        violation = check_request_head(raw, max_headers=self.limits.max_request_headers)
        if violation is not None:
            await self._refuse(violation.status, violation.reason, violation.detail)
        parsed = parse_request_head(raw)
        if isinstance(parsed, HeadViolation):
            await self._refuse(parsed.status, parsed.reason, parsed.detail)
        del self._pending[:end]
        return parsed

    async def _more(self) -> None:
        """Read more of the request body into the buffer (after a `100 Continue` if one is awaited)."""
        if self._waiting_for_continue and not self._continue_asked.is_set():
            # Not asked for yet: wait until the pipeline reads (after authz and routing); a request
            # answered without its body cancels this task instead.
            await self._continue_asked.wait()
        data = await self._read(self.limits.idle_timeout)
        if not data:
            raise BodyAborted("the client closed the connection mid-body")
        self._waiting_for_continue = False
        self._pending += data

    async def _read_body(self, head: RequestHead, pipe: BodyPipe) -> None:
        """Feed the request body into `pipe` (bounded: waits while the pipe is full)."""
        try:
            if head.content_length is not None:
                await self._read_counted_body(head.content_length, pipe)
            else:
                await self._read_chunked_body(pipe)
        except BodyAborted as e:
            pipe.abort(e)
        except (ConnectionError, TimeoutError) as e:
            pipe.abort(BodyAborted(f"reading the request body failed: {e}"))

    async def _read_counted_body(self, length: int, pipe: BodyPipe) -> None:
        remaining = length
        while remaining:
            if not self._pending:
                await self._more()
            data = bytes(self._pending[:remaining])
            del self._pending[: len(data)]
            remaining -= len(data)
            await pipe.put(data)
            if pipe.cancelled:
                return
        self._body_read = True
        pipe.finish(())

    async def _read_chunked_body(self, pipe: BodyPipe) -> None:
        decoder = ChunkedDecoder()
        if self._pending:  # (h11 takes an empty feed for the end of the connection)
            decoder.feed(bytes(self._pending))
            self._pending.clear()
        while True:
            try:
                item = decoder.next()
            except h11.RemoteProtocolError as e:
                self._body_violation = HeadViolation(400, "bad_body", str(e))
                raise BodyAborted(f"malformed request body: {e}") from e
            if item is None:
                await self._more()
                decoder.feed(bytes(self._pending))
                self._pending.clear()
            elif isinstance(item, bytes):
                await pipe.put(item)
                if pipe.cancelled:
                    return
            else:
                self._pending = bytearray(decoder.leftover)
                self._body_read = True
                pipe.finish(tuple(item))
                return

    def _send_continue(self) -> None:
        self._continue_asked.set()
        if self._waiting_for_continue:
            self._waiting_for_continue = False
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # ------------------------------------------------------------------ serving

    async def _serve(self, parsed: ParsedRequestHead) -> bool:
        """One request; True when the connection may carry another."""
        self.requests += 1
        self._continue_asked.clear()
        head, self._client_keeps_alive = request_head_from_parsed(parsed)
        if not head.authority:
            # HTTP/1.0 needs no Host: the client addressed this Service, so that is the authority.
            head.authority = self.ctx.destination.service.hostname
        pipe: BodyPipe | None = None
        reader_task: asyncio.Task[None] | None = None
        if head.has_body:
            self._body_read = False
            self._waiting_for_continue = head.expect_continue and not self._pending
            pipe = BodyPipe(self.limits.body_buffer, on_first_read=self._send_continue)
            reader_task = self.loop.create_task(self._read_body(head, pipe), name="waypoint-h1-body")
        else:
            self._body_read = True
            self._waiting_for_continue = False
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
            return await self._respond(parsed, head, response, pipe, reader_task)
        finally:
            if reader_task is not None and not reader_task.done():
                reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader_task
            body.cancel()

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        if self.writer.write_blocked():  # only then can drain() wait (or raise)
            async with Deadline.within(self.loop, self.limits.write_timeout):
                await self.writer.drain()

    async def _respond(
        self,
        parsed: ParsedRequestHead,
        request: RequestHead,
        response: ProxyResponse,
        pipe: BodyPipe | None,
        reader_task: asyncio.Task[None] | None,
    ) -> bool:
        self._body_sent = 0
        self._waiting_for_continue = False  # a response ends the wait (RFC 9110 §10.1.1)
        error: str | None = "the response was not sent"
        keep = self._client_keeps_alive and not self.draining
        try:
            if response.upgraded is not None:
                return await self._switch(response, response.upgraded)
            status = response.head.status
            # A HEAD response carries the framing headers a GET would get, without the body.
            no_body = request.method == "HEAD" or status in (204, 304)
            chunked = False
            headers = [(n, v) for n, v in response.head.headers if valid_name(n) and valid_value(v)]
            if response.head.content_length is not None:
                headers.append(("content-length", str(response.head.content_length)))
            elif response.body is None and not no_body:
                headers.append(("content-length", str(len(response.content))))
            elif status not in (204, 304):
                # A body of unknown length: chunked for HTTP/1.1; an HTTP/1.0 client cannot decode
                # that, so its body ends with the connection (no framing header at all).
                if parsed.http10:
                    keep = False
                else:
                    headers.append(("transfer-encoding", "chunked"))
                    chunked = not no_body
            if pipe is not None and pipe.cancelled and not pipe.ended:
                keep = False  # the rest of the request body is not read
            if not keep:
                headers.append(("connection", "close"))
            await self._write(response_head_bytes(status, headers))
            if not no_body:
                await self._send_body(response, chunked)
            if chunked:
                trailers = response.body.trailers if response.body is not None and request.te_trailers else ()
                await self._write(last_chunk([(n, v) for n, v in trailers if valid_value(v)]))
            error = None
        except TimeoutError:
            error = "timed out sending the response (route timeout, or the client is not reading)"
            return False
        except BodyAborted as e:
            error = str(e)
            return False
        except ConnectionError as e:
            error = f"sending the response failed: {e}"
            return False
        finally:
            response.complete(self._body_sent, error)
        if reader_task is not None and not reader_task.done():
            return False
        return keep and self._body_read

    async def _send_body(self, response: ProxyResponse, chunked: bool) -> None:
        """The body, counted in `_body_sent` as it goes (a body failing midway is counted as far as
        it got)."""
        if response.body is None:
            if response.content:
                await self._write(chunk(response.content) if chunked else response.content)
                self._body_sent = len(response.content)
            return
        if response.deadline is None:  # no route timeout: no timer to arm and cancel per response
            await self._copy_body(response.body, chunked)
            return
        async with Deadline(self.loop, response.deadline):
            await self._copy_body(response.body, chunked)

    async def _copy_body(self, body: BodyPipe, chunked: bool) -> None:
        while data := await body.read():
            await self._write(chunk(data) if chunked else data)
            self._body_sent += len(data)

    async def _switch(self, response: ProxyResponse, upgraded: UpgradedStream) -> bool:
        headers = [(n, v) for n, v in response.head.headers if valid_name(n) and valid_value(v)]
        headers += [("connection", "upgrade"), ("upgrade", "websocket")]
        try:
            await self._write(response_head_bytes(101, headers))
        except (ConnectionError, TimeoutError) as e:
            upgraded.tunnel.close()
            response.complete(0, f"cannot switch protocols: {e}")
            return False
        leftover, self._pending = bytes(self._pending), bytearray()
        to_backend, to_client = await splice_upgraded(self.reader, self.writer, leftover, upgraded)
        response.complete(to_client, None)
        logger.debug("upgraded connection done", extra={"fields": {"up": to_backend, "down": to_client}})
        return False
