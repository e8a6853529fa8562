"""One HTTP/1.1 connection to a backend, over one HBONE tunnel (httptools parses, we frame).

Theory of operation
-------------------
`exchange()` sends one request and returns as soon as the response head arrived; the request body is
sent by a task of its own meanwhile (a backend may answer before it read the body). The response is
parsed by httptools (llhttp, the parser of Node.js: strict about framing, in C): its callbacks collect
the head, body chunks and trailers into a `_Response`. A body that arrived complete with its head
(the usual small response) ends the exchange at once; otherwise a pump task feeds the rest into a
`BodyPipe` that the downstream session consumes, one chunk at a time (the request side awaits the
tunnel's drain after each write, the response side awaits the pipe), so a slow party stalls only its
own request.

The request head is framed here (method, target, host first, the forwarded fields, then the framing
fields), after checking every field name is a token and nothing carries a control character: the
downstream parsers already refuse those, so a failure here means a route filter produced it, and the
request is answered 502 without anything sent. Bodies are sent as they came: with their
Content-Length, or chunked (trailers after the last chunk).

What llhttp does not know is handled here: the answer to a HEAD request has no body whatever its
Content-Length says (the head ends the exchange; every exchange has a parser of its own), a body without
Content-Length or chunked framing runs until the backend closes (its end is the tunnel's end), and
interim 1xx answers (100, 103) are hop-local and skipped. A 101 to an upgrade request hands the tunnel
over as an `UpgradedStream`, with the bytes that followed the head.

A connection goes back to the pool only after a complete exchange that both sides keep alive (HTTP/1.1
without `Connection: close`, or HTTP/1.0 with keep-alive), with the request body sent completely and
nothing unasked for after the response; anything else (an error, a client that went away mid-body, an
upgrade) closes it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Final

import httptools

from loom.hbone import HboneError, Tunnel
from waypoint.proxy.body import AttemptBody, BodyAborted, BodyPipe, Trailers
from waypoint.proxy.headers import HOP_BY_HOP, connection_tokens, join_cookies
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import (
    HTTP11,
    RequestHead,
    ResponseHead,
    UpgradedStream,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamResponse,
)

logger = logging.getLogger("waypoint.proxy")

_READ_SIZE = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Anything that could end a line or a field early: controls but HTAB (DEL too), in names and values.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(r"[\x21-\x7e]+")


class RequestEncodingError(ValueError):
    """A request head that cannot be sent as HTTP/1.1 (a name that is no token, a control character)."""


def encode_request_head(head: RequestHead) -> bytes:
    """The HTTP/1.1 request head for `head`: request line, Host, the fields, the framing fields."""
    if not _TOKEN.fullmatch(head.method):
        raise RequestEncodingError(f"method {head.method[:40]!r} is not a token")
    if not _TARGET.fullmatch(head.target):
        raise RequestEncodingError(f"request target {head.target[:80]!r} has spaces or control characters")
    lines = [f"{head.method} {head.target} HTTP/1.1", f"host: {head.authority}"]
    for name, value in join_cookies(head.headers):
        if not _TOKEN.fullmatch(name):
            raise RequestEncodingError(f"field name {name[:40]!r} is not a token")
        lines.append(f"{name}: {value}")
    if head.content_length is not None:
        lines.append(f"content-length: {head.content_length}")
    elif head.has_body:
        lines.append("transfer-encoding: chunked")
    if head.upgrade is not None:
        lines.append("connection: upgrade")
        lines.append(f"upgrade: {head.upgrade}")
    text = "\r\n".join(lines)
    # One scan for the whole head: the joins above put CR LF only between the lines.
    if _CONTROL.search(text.replace("\r\n", " ")):
        raise RequestEncodingError("a request field carries a control character")
    try:
        return (text + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError as e:
        raise RequestEncodingError(f"a request field is not latin-1: {e}") from e


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Trailers) -> bytes:
    fields = [f"{name}: {value}" for name, value in trailers if _TOKEN.fullmatch(name)]
    text = "".join(f"{field}\r\n" for field in fields if not _CONTROL.search(field))
    return b"0\r\n" + text.encode("latin-1", "replace") + b"\r\n"


class _Response:
    """httptools' callback target for the answer to one request: head, body chunks, trailers."""

    __slots__ = (
        "body",
        "complete",
        "extra",
        "head_bytes",
        "head_done",
        "headers",
        "interim",
        "keep_alive",
        "no_body",
        "parser",
        "status",
        "trailers",
        "until_eof",
    )

    def __init__(self, no_body: bool) -> None:
        # The parser holds us and we hold it: H1Upstream breaks that cycle with release() when the
        # exchange ends, so the pair is freed at once instead of waiting for the cycle collector.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.no_body = no_body  # the answer to HEAD: nothing follows its head
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        self.body: list[bytes] = []  # received, not yet handed on
        self.head_done = False
        self.head_bytes = 0  # bytes fed before the head was complete (bounded)
        self.complete = False
        self.keep_alive = False
        self.until_eof = False  # no Content-Length and not chunked: the body ends with the connection
        self.interim = False  # the message being parsed is a 1xx other than 101
        self.extra = False  # bytes after the complete response: the connection cannot be reused

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        field = (name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t"))
        (self.trailers if self.head_done else self.headers).append(field)

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        parser = self.parser
        if parser is None:
            return
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # hop-local (100 Continue, 103 Early Hints): dropped
            return
        self.status = status
        self.head_done = True
        self.keep_alive = parser.should_keep_alive()
        names = {name for name, _ in self.headers}
        framed = "content-length" in names or "transfer-encoding" in names
        bodiless = self.no_body or status in (101, 204, 304)
        self.until_eof = not framed and not bodiless
        if self.no_body:
            # llhttp does not know the request was HEAD and would wait for Content-Length bytes: the
            # exchange ends with the head (the next exchange has a parser of its own); anything after
            # it was never asked for (on_body marks it).
            self.complete = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.extra = True
        else:
            self.body.append(bytes(body))

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.headers = []
            return
        if not self.complete:
            self.complete = True
            parser = self.parser
            self.keep_alive = self.keep_alive and parser is not None and parser.should_keep_alive()

    # -- feeding

    def feed(self, data: bytes, head_limit: int) -> int | None:
        """Parse `data`; the offset of the bytes after a 101's head (None otherwise). Raises
        UpstreamProtocolError for what is not a valid response."""
        parser = self.parser
        if parser is None:
            raise UpstreamProtocolError("the response was already released")
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            return int(e.args[0]) if e.args else len(data)
        except httptools.HttpParserError as e:
            if self.complete:
                self.extra = True  # garbage after a complete response: ours is fine, the connection not
                return None
            raise UpstreamProtocolError(f"invalid HTTP/1.1 response: {e}") from e
        if not self.head_done and self.head_bytes > head_limit:
            raise UpstreamProtocolError(f"response head larger than {head_limit} bytes")
        return None

    def release(self) -> None:
        """The exchange ended: drop the parser (and with it the only reference it had to us)."""
        self.parser = None

    def take_body(self) -> list[bytes]:
        chunks, self.body = self.body, []
        return chunks

    def response_head(self) -> ResponseHead:
        named = connection_tokens(self.headers)
        content_length: int | None = None
        headers = []
        for name, value in self.headers:
            if name == "content-length":
                content_length = int(value) if value.isdigit() else None
                continue
            if name in HOP_BY_HOP or name in named:
                continue
            headers.append((name, value))
        return ResponseHead(self.status, headers, content_length)


# How long a politely closed idle tunnel may take to finish before it is reset.
IDLE_CLOSE_GRACE: Final = 1.0


class H1Upstream:
    """An HTTP/1.1 client connection on an HBONE tunnel; one request at a time."""

    protocol = HTTP11

    def __init__(
        self,
        tunnel: Tunnel,
        limits: ProxyLimits,
        on_idle: Callable[[H1Upstream], None],
        on_closed: Callable[[H1Upstream], None],
    ) -> None:
        self.tunnel = tunnel
        self.limits = limits
        self._on_idle = on_idle  # a complete keep-alive exchange: back to the pool
        self._on_closed = on_closed  # called once, when the pool must forget this connection
        self.requests = 0
        self.loop = asyncio.get_running_loop()  # looked up once: each lookup is a system call on 3.11
        self.idle_since = self.loop.time()
        self._busy = False  # an exchange is in flight (from the request to the end of the response)
        self._current: _Response | None = None  # the response of the exchange in flight
        self._request_sent = True  # the request (with its body) was sent completely
        self._sender: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def usable(self) -> bool:
        # Bytes waiting on an idle connection were never asked for: it cannot carry another exchange.
        return not self.closed and not self.tunnel.closed and not self._busy and not self.tunnel.pending

    def close_idle(self) -> None:
        """Close a connection with no request in flight the polite way: END_STREAM on the tunnel, so the
        backend's ztunnel sees a clean close (not a reset it would count as a failed connection); the
        tunnel is reset only if the backend side has not finished within IDLE_CLOSE_GRACE."""
        if self.closed:
            return
        tunnel = self.tunnel
        try:
            tunnel.write_eof()
        except Exception:
            self.close()
            return
        self.close(keep_tunnel=True)
        self.loop.call_later(IDLE_CLOSE_GRACE, tunnel.close)

    def close(self, *, keep_tunnel: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._release()
        current = asyncio.current_task(self.loop)
        for task in (self._sender, self._pump):
            if task is not None and not task.done() and task is not current:
                task.cancel()
        if not keep_tunnel:
            self.tunnel.close()
        self._on_closed(self)

    async def exchange(self, head: RequestHead, body: AttemptBody | None) -> UpstreamResponse:
        """Send `head` (its body streamed by a task), return once the response head arrived."""
        reused = self.requests > 0
        self.requests += 1
        self._busy = True
        received_any = False
        response = self._current = _Response(no_body=head.method == "HEAD")
        try:
            try:
                request = encode_request_head(head)
            except RequestEncodingError as e:
                raise UpstreamProtocolError(f"cannot send the request as HTTP/1.1: {e}") from e
            chunked = head.content_length is None and head.has_body
            if body is None or body.empty:
                self._request_sent = True
                self.tunnel.write(request + b"0\r\n\r\n" if chunked else request)
            else:
                self._request_sent = False
                self.tunnel.write(request)
                self._sender = self.loop.create_task(
                    self._send_body(body, head.content_length), name="waypoint-h1-body-up"
                )
            head_limit = self.limits.max_response_head_bytes
            while not response.head_done:
                data = await self.tunnel.read(_READ_SIZE)
                if not data:
                    if not received_any:
                        raise UpstreamReset(
                            "the backend closed the connection before responding", stale=reused
                        )
                    raise UpstreamProtocolError("the backend closed the connection within the response head")
                received_any = True
                upgrade_at = response.feed(data, head_limit)
                if upgrade_at is not None:
                    if response.status != 101 or head.upgrade is None:
                        raise UpstreamProtocolError("the backend switched protocols unasked")
                    return self._upgraded(response, data[upgrade_at:])
            if response.status == 101:
                raise UpstreamProtocolError("a 101 answer without a protocol switch")
            return self._response(response)
        except (HboneError, OSError) as e:
            self.close()
            raise UpstreamReset(
                f"HBONE tunnel to the backend failed: {e}", stale=reused and not received_any
            ) from e
        except BaseException:
            self.close()
            raise

    def _upgraded(self, response: _Response, leftover: bytes) -> UpstreamResponse:
        self.close(keep_tunnel=True)  # the tunnel now belongs to the upgraded stream
        return UpstreamResponse(
            head=response.response_head(),
            body=None,
            upgraded=UpgradedStream(self.tunnel, leftover),
            protocol=HTTP11,
        )

    def _response(self, response: _Response) -> UpstreamResponse:
        head = response.response_head()
        no_body = response.no_body or response.status in (204, 304)
        pipe = BodyPipe(self.limits.body_buffer)
        for chunk in response.take_body():
            pipe.feed(chunk)
        # A body already complete (the usual small response arrives with its head) ends the exchange
        # here: no pump task, no hand-over per chunk.
        if response.complete:
            pipe.finish(tuple(response.trailers))
            self._end_exchange(pipe, self._reusable(response))
        else:
            self._pump = self.loop.create_task(self._pump_body(response, pipe), name="waypoint-h1-body-down")
        return UpstreamResponse(head=head, body=None if no_body else pipe, upgraded=None, protocol=HTTP11)

    def _reusable(self, response: _Response) -> bool:
        """After the response ended: whether the connection can carry another request."""
        sender = self._sender
        if sender is not None:
            if not sender.done():
                return False  # the backend answered before reading the whole request body (e.g. 413)
            if sender.cancelled() or sender.exception() is not None:
                return False
        return (
            self._request_sent
            and response.complete
            and response.keep_alive
            and not response.extra
            and not response.until_eof
            and not self.closed
        )

    def _release(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.release()

    def _end_exchange(self, pipe: BodyPipe, reusable: bool) -> None:
        self._sender = None
        self._pump = None
        self._release()
        if reusable:
            self._busy = False
            self.idle_since = self.loop.time()
            self._on_idle(self)
        else:
            pipe.abort(BodyAborted("the backend connection closed"))
            self.close()

    async def _send_body(self, body: AttemptBody, content_length: int | None) -> None:
        sent = 0
        try:
            while data := await body.read():
                sent += len(data)
                if content_length is None:
                    self.tunnel.write(encode_chunk(data))
                elif sent > content_length:
                    raise BodyAborted(f"more than the declared {content_length} body bytes")
                else:
                    self.tunnel.write(data)
                await self.tunnel.drain()
            if content_length is None:
                self.tunnel.write(encode_last_chunk(body.trailers))
            elif sent != content_length:
                raise BodyAborted(f"{sent} body bytes of the declared {content_length}")
            self._request_sent = True
        except (HboneError, OSError, BodyAborted) as e:
            # The client's body failed or the backend went away: the exchange cannot complete.
            logger.debug("request body to the backend ended early", extra={"fields": {"error": str(e)}})
            self.close()

    async def _pump_body(self, response: _Response, pipe: BodyPipe) -> None:
        reusable = False
        try:
            while True:
                for chunk in response.take_body():
                    await pipe.put(chunk)
                    if pipe.cancelled:
                        return  # the client is gone: this connection is mid-body, close it
                if response.complete:
                    pipe.finish(tuple(response.trailers))
                    break
                data = await self.tunnel.read(_READ_SIZE)
                if not data:
                    if response.until_eof:
                        pipe.finish(())  # a body delimited by the end of the connection
                        break
                    raise UpstreamProtocolError("the backend closed the connection mid-body")
                response.feed(data, self.limits.max_response_head_bytes)
            reusable = self._reusable(response)
        except (HboneError, OSError, UpstreamProtocolError) as e:
            pipe.abort(BodyAborted(f"the backend's response body failed: {e}"))
        finally:
            self._end_exchange(pipe, reusable)
