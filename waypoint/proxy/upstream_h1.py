"""One HTTP/1.1 connection to a backend, over one HBONE tunnel (h11, client side).

Theory of operation
-------------------
`exchange()` sends one request and returns as soon as the response head arrived; the request body is
sent by a task of its own meanwhile (a backend may answer before it read the body) and the response
body is pumped by another into a `BodyPipe` that the downstream session consumes. Both pumps move one
chunk at a time: the request side awaits the tunnel's drain (HBONE flow control) after each write, the
response side awaits the pipe (the client's pace), so a slow party stalls only its own request.

A connection goes back to the pool only when h11 says both sides are DONE (a complete exchange with
keep-alive); anything else (Connection: close, an error, a client that went away mid-body, an upgrade)
closes it. After a 101 the tunnel is handed over as an `UpgradedStream` and the connection object is
finished with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import h11

from loom.hbone import HboneError, Tunnel
from waypoint.proxy.body import AttemptBody, BodyAborted, BodyPipe
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


def _h1_request(head: RequestHead) -> h11.Request:
    headers: list[tuple[bytes, bytes]] = [(b"host", head.authority.encode("latin-1"))]
    for name, value in join_cookies(head.headers):
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
    if head.content_length is not None:
        headers.append((b"content-length", str(head.content_length).encode("ascii")))
    elif head.has_body:
        headers.append((b"transfer-encoding", b"chunked"))
    if head.upgrade is not None:
        headers.append((b"connection", b"upgrade"))
        headers.append((b"upgrade", head.upgrade.encode("latin-1")))
    return h11.Request(
        method=head.method.encode("latin-1"), target=head.target.encode("latin-1"), headers=headers
    )


def response_head_from_h11(event: h11.Response | h11.InformationalResponse) -> ResponseHead:
    pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
    named = connection_tokens(pairs)
    content_length: int | None = None
    headers = []
    for name, value in pairs:
        if name == "content-length":
            content_length = int(value) if value.isdigit() else None
            continue
        if name in HOP_BY_HOP or name in named:
            continue
        headers.append((name, value))
    return ResponseHead(event.status_code, headers, content_length)


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
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.max_response_head_bytes)
        self.requests = 0
        self.idle_since = asyncio.get_running_loop().time()
        self._sender: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def usable(self) -> bool:
        return not self.closed and not self.tunnel.closed and self.conn.our_state is h11.IDLE

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
        asyncio.get_running_loop().call_later(IDLE_CLOSE_GRACE, tunnel.close)

    def close(self, *, keep_tunnel: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for task in (self._sender, self._pump):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        if not keep_tunnel:
            self.tunnel.close()
        self._on_closed(self)

    def _write(self, data: bytes | None) -> None:
        if data:
            self.tunnel.write(data)

    async def exchange(self, head: RequestHead, body: AttemptBody | None) -> UpstreamResponse:
        """Send `head` (its body streamed by a task), return once the response head arrived."""
        reused = self.requests > 0
        self.requests += 1
        received_any = False
        try:
            self._write(self.conn.send(_h1_request(head)))
            if body is None or body.empty:
                self._write(self.conn.send(h11.EndOfMessage()))
            else:
                self._sender = asyncio.get_running_loop().create_task(
                    self._send_body(body, chunked=head.content_length is None), name="waypoint-h1-body-up"
                )
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.tunnel.read(_READ_SIZE)
                    received_any = received_any or bool(data)
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101 and head.upgrade is not None:
                        return self._upgraded(event)
                    continue  # 100 Continue (we never forward Expect) and 1xx hints are hop-local
                if isinstance(event, h11.Response):
                    return self._response(head, event)
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamReset("the backend closed the connection before responding", stale=reused)
                raise UpstreamProtocolError(f"unexpected {type(event).__name__} before the response head")
        except h11.RemoteProtocolError as e:
            self.close()
            if not received_any:
                raise UpstreamReset(f"the backend closed the connection: {e}", stale=reused) from e
            raise UpstreamProtocolError(f"invalid HTTP/1.1 response: {e}") from e
        except h11.LocalProtocolError as e:
            self.close()
            raise UpstreamProtocolError(f"cannot send the request as HTTP/1.1: {e}") from e
        except (HboneError, OSError) as e:
            self.close()
            raise UpstreamReset(
                f"HBONE tunnel to the backend failed: {e}", stale=reused and not received_any
            ) from e
        except BaseException:
            self.close()
            raise

    def _upgraded(self, event: h11.InformationalResponse) -> UpstreamResponse:
        leftover, _ = self.conn.trailing_data
        self.close(keep_tunnel=True)  # the tunnel now belongs to the upgraded stream
        return UpstreamResponse(
            head=response_head_from_h11(event),
            body=None,
            upgraded=UpgradedStream(self.tunnel, bytes(leftover)),
            protocol=HTTP11,
        )

    def _response(self, head: RequestHead, event: h11.Response) -> UpstreamResponse:
        response = response_head_from_h11(event)
        # h11 knows these have no body and ends them at once; the exchange still has to end to recycle
        # the connection.
        no_body = head.method == "HEAD" or event.status_code in (204, 304)
        pipe = BodyPipe(self.limits.body_buffer)
        # What of the body came with the head is taken now. A body already complete (the usual small
        # response arrives with its head) ends the exchange here: no pump task, no hand-over per chunk.
        if self._take_buffered(pipe):
            self._end_exchange(pipe, self._exchange_complete())
        else:
            self._pump = asyncio.get_running_loop().create_task(
                self._pump_body(pipe), name="waypoint-h1-body-down"
            )
        return UpstreamResponse(head=response, body=None if no_body else pipe, upgraded=None, protocol=HTTP11)

    def _take_buffered(self, pipe: BodyPipe) -> bool:
        """Feed the body events h11 can produce without more bytes into `pipe` (up to its high-water
        mark); True once the response is complete."""
        while pipe.size <= self.limits.body_buffer:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Data):
                pipe.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                pipe.finish(tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers))
                return True
            else:
                raise UpstreamProtocolError(f"unexpected {type(event).__name__} in the response body")
        return False

    def _exchange_complete(self) -> bool:
        """After the response ended: whether the connection can carry another request (the request
        body was sent completely and both sides are DONE), and if so, ready it for the next."""
        sender = self._sender
        if sender is not None:
            if not sender.done():
                return False  # the backend answered before reading the whole request body (e.g. 413)
            if sender.cancelled() or sender.exception() is not None:
                return False
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE and not self.closed:
            self.conn.start_next_cycle()
            self.idle_since = asyncio.get_running_loop().time()
            return True
        return False

    def _end_exchange(self, pipe: BodyPipe, reusable: bool) -> None:
        self._sender = None
        self._pump = None
        if reusable:
            self._on_idle(self)
        else:
            pipe.abort(BodyAborted("the backend connection closed"))
            self.close()

    async def _send_body(self, body: AttemptBody, *, chunked: bool) -> None:
        try:
            while data := await body.read():
                self._write(self.conn.send(h11.Data(data=data)))
                await self.tunnel.drain()
            trailers = (
                [(n.encode("latin-1"), v.encode("latin-1")) for n, v in body.trailers] if chunked else []
            )
            self._write(self.conn.send(h11.EndOfMessage(headers=trailers)))
        except (HboneError, OSError, h11.LocalProtocolError, BodyAborted) as e:
            # The client's body failed or the backend went away: the exchange cannot complete.
            logger.debug("request body to the backend ended early", extra={"fields": {"error": str(e)}})
            self.close()

    async def _pump_body(self, pipe: BodyPipe) -> None:
        reusable = False
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.tunnel.read(_READ_SIZE))
                elif isinstance(event, h11.Data):
                    await pipe.put(bytes(event.data))
                    if pipe.cancelled:
                        return  # the client is gone: this connection is mid-body, close it
                elif isinstance(event, h11.EndOfMessage):
                    trailers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers)
                    pipe.finish(trailers)
                    break
                else:
                    raise UpstreamProtocolError(f"unexpected {type(event).__name__} in the response body")
            reusable = self._exchange_complete()
        except (h11.RemoteProtocolError, HboneError, OSError, UpstreamProtocolError) as e:
            pipe.abort(BodyAborted(f"the backend's response body failed: {e}"))
        finally:
            self._end_exchange(pipe, reusable)
