"""A minimal asyncio HTTP/1.1 server for small operational endpoints (admin, metrics, readiness).

Theory of operation
-------------------
Operational endpoints answer a handful of short requests per minute, so this server trades features for
a small footprint: the idle node proxy should not pay for a full web framework (aiohttp costs about
9 MB of resident memory) to serve three plain-text pages. The HTTP parsing is h11 (sans-IO, already a
data-path dependency); this module only moves bytes and routes.

One connection carries one request: the response always says ``Connection: close`` and the connection
is closed after it. Each connection has a hard deadline for the whole exchange (`Limits.timeout`),
incomplete headers are bounded by h11 (`Limits.max_header_bytes` plus one read, answered 431) and bodies by
`Limits.max_body_bytes` (answered 413). Routing is a pure function (`route`): an unknown path is
404, a known path with another method is 405 with ``Allow``. A handler that raises is answered 500 and
logged; a malformed request is answered 400. No connection's failure reaches the listener: every
connection task catches and logs its own errors, and `stop()` cancels the ones still open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote

import h11

_logger = logging.getLogger("loom.http")

TEXT_PLAIN = "text/plain; charset=utf-8"
APPLICATION_JSON = "application/json; charset=utf-8"
_READ_CHUNK = 16 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str  # upper case, e.g. "GET"
    path: str  # percent-decoded, without the query string
    # Query parameters; a key given twice keeps its first value, a key without "=" maps to "".
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: str | bytes = b""
    content_type: str = TEXT_PLAIN
    headers: Sequence[tuple[str, str]] = ()  # extra headers


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Limits:
    # Operational requests are a request line and a few headers; 16 KiB is generous and bounds what
    # one slow client can make the process buffer.
    max_header_bytes: int = 16 * 1024
    # The only bodies expected are empty POSTs (parameters travel in the query string).
    max_body_bytes: int = 4 * 1024
    # The whole exchange, from accept to close: a stalled client cannot hold a connection longer.
    timeout: float = 10.0


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def route(routes: Sequence[tuple[str, str, Handler]], method: str, path: str) -> Handler | Response:
    """The handler for (method, path), or the 404/405 response to send instead."""
    allowed = [m for m, p, _ in routes if p == path]
    for m, p, handler in routes:
        if p == path and m == method:
            return handler
    if not allowed:
        return Response(404, f"no such endpoint: {path}\n")
    return Response(
        405, f"{method} is not allowed on {path}\n", headers=[("Allow", ", ".join(sorted(set(allowed))))]
    )


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into the decoded path and its query parameters."""
    path, _, query = target.partition("?")
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(key, value)
    return unquote(path), params


class HttpServer:
    """One listening socket with a fixed route table ((method, path, handler), ...); start/stop inside
    the running loop. `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        routes: Sequence[tuple[str, str, Handler]],
        *,
        reuse_port: bool = False,
        limits: Limits | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self._requested_port = port
        self._routes = tuple(routes)
        self._reuse_port = reuse_port
        self.limits = limits or Limits()
        self._logger = logger or _logger
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._port is None:
            raise RuntimeError(f"the {self.name} server is not started")
        return self._port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"the {self.name} server is already started")
        try:
            server = await asyncio.start_server(
                self._serve,
                self.host,
                self._requested_port,
                reuse_address=True,
                reuse_port=self._reuse_port or None,
            )
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot listen on {self.host}:{self._requested_port} ({self.name}): {e.strerror or e}",
            ) from e
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        self._logger.info(f"{self.name} server listening", extra={"fields": {"address": self.address}})

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Before Python 3.12 wait_closed() does not wait for open connections: cancel them here.
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(self.limits.timeout):
                await self._exchange(reader, writer)
                writer.close()
                await writer.wait_closed()
        except TimeoutError:
            self._logger.debug(f"{self.name} connection timed out", extra={"fields": {"peer": str(peer)}})
        except (ConnectionError, h11.ProtocolError) as e:
            self._logger.debug(
                f"{self.name} connection failed", extra={"fields": {"peer": str(peer), "error": str(e)}}
            )
        except Exception:
            self._logger.exception(f"{self.name} connection failed", extra={"fields": {"peer": str(peer)}})
        finally:
            if task is not None:
                self._connections.discard(task)
            # abort() is a no-op on a closed transport and never blocks on a peer that stopped reading.
            writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            request = await self._read_request(conn, reader)
        except h11.RemoteProtocolError as e:
            response = Response(e.error_status_hint, f"bad request: {e}\n")
        except _BadRequest as e:
            response = Response(e.status, f"bad request: {e}\n")
        else:
            if request is None:  # the client closed before sending a request
                return
            response = await self._respond(request)
        await self._write_response(conn, writer, response)

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_CHUNK))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise _BadRequest(413, f"body larger than {self.limits.max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                path, query = parse_target(head.target.decode("ascii", "replace"))
                return Request(head.method.decode("ascii", "replace"), path, query, bytes(body))
            elif isinstance(event, h11.ConnectionClosed) and head is None:
                return None
            else:
                raise _BadRequest(400, f"unexpected {type(event).__name__}")

    async def _respond(self, request: Request) -> Response:
        found = route(self._routes, request.method, request.path)
        if isinstance(found, Response):
            return found
        try:
            return await found(request)
        except Exception:
            self._logger.exception(
                f"{self.name} handler failed",
                extra={"fields": {"method": request.method, "path": request.path}},
            )
            return Response(500, "internal error\n")

    async def _write_response(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        body = response.body.encode() if isinstance(response.body, str) else response.body
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *response.headers,
        ]
        # h11 lets a server answer (e.g. 400) even when the request could not be parsed.
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await writer.drain()
