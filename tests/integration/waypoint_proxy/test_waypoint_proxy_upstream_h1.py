"""The waypoint's HTTP/1.1 upstream side (`waypoint.proxy.upstream_h1.H1Upstream`), end to end: what a
backend sends back, byte for byte, and what the client, the request record and the connection pool
make of it.

The backend here is a `RawBackend`: an HBONE server that serves each tunnel itself (`Decision.serve`)
and answers each request it reads with the next scripted `Reply` (exact bytes, then keep the tunnel,
close it gracefully or reset it). It records every tunnel it accepted and the raw bytes of every
request, so tests can tell whether the waypoint reused a connection and what framing it sent.

These tests describe behaviour, not the parser underneath: they must hold for any implementation of
the upstream HTTP/1.1 client (they were written against the h11-based one and kept for its successor
on httptools, which changed, on purpose, what a connection is trusted with after an exchange: see the
close-delimited body and the bytes after a complete response).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from loom.hbone import Decision, HboneError, HboneServer, ServerStream, Tunnel, TunnelRequest
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import listening_socket
from tests.integration.waypoint_proxy.waypoint_harness import (
    VIP,
    WAIT,
    WEB,
    Backend,
    H1Client,
    Mesh,
    exchange_until_close,
    mesh,
    raw_exchange,
    status_of,
)

BACKEND_IP = "10.7.0.1"
MAX_REQUESTS_PER_TUNNEL = 100  # bounds for the backend's loops
MAX_CHUNKS = 10_000


# --------------------------------------------------------------------------------------- raw backend


@dataclass
class Reply:
    """What the backend answers to one request: `data` as is, then (after `gate` is set, when given)
    `rest`, then it keeps the tunnel for the next request, closes it (END_STREAM) or resets it."""

    data: bytes
    after: Literal["keep", "close", "abort"] = "keep"
    rest: bytes = b""
    gate: asyncio.Event | None = None


@dataclass
class ReceivedRequest:
    tunnel: int  # 1 for the first tunnel the backend accepted
    raw: bytes  # head and body, exactly as received

    @property
    def head(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1]

    @property
    def request_line(self) -> bytes:
        return self.raw.split(b"\r\n", 1)[0]

    @property
    def fields(self) -> list[tuple[str, str]]:
        """Header fields in order, as (name, value) with the name as sent."""
        lines = self.head[:-4].split(b"\r\n")[1:]
        pairs = [line.split(b":", 1) for line in lines]
        return [(name.decode("latin-1"), value.strip().decode("latin-1")) for name, value in pairs]


class _StreamBuffer:
    """Bounded reads of an HTTP/1.1 request from a served stream."""

    def __init__(self, stream: ServerStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        data = await asyncio.wait_for(self.stream.read(64 * 1024), WAIT)
        self.buffer += data
        return bool(data)

    async def until(self, marker: bytes) -> bytes | None:
        """Everything up to and including `marker`; None if the waypoint ended its side first."""
        while (index := self.buffer.find(marker)) < 0:
            if not await self._fill():
                return None
        end = index + len(marker)
        taken = bytes(self.buffer[:end])
        del self.buffer[:end]
        return taken

    async def exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not await self._fill():
                return None
        taken = bytes(self.buffer[:size])
        del self.buffer[:size]
        return taken

    async def request(self) -> bytes | None:
        """One whole request (head and body, framed by its own headers); None at the end."""
        head = await self.until(b"\r\n\r\n")
        if head is None:
            return None
        fields = {
            name.strip().lower(): value.strip().lower()
            for name, _, value in (line.partition(b":") for line in head[:-4].split(b"\r\n")[1:])
        }
        if fields.get(b"transfer-encoding") == b"chunked":
            body = bytearray()
            for _ in range(MAX_CHUNKS):
                size_line = await self.until(b"\r\n")
                if size_line is None:
                    return None
                body += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                data = await self.exactly(size + 2)
                if data is None:
                    return None
                body += data
            for _ in range(MAX_CHUNKS):  # the trailer fields, up to the blank line
                line = await self.until(b"\r\n")
                if line is None:
                    return None
                body += line
                if line == b"\r\n":
                    break
            return head + bytes(body)
        length = int(fields.get(b"content-length", b"0"))
        body_bytes = await self.exactly(length) if length else b""
        return None if body_bytes is None else head + body_bytes


class RawBackend:
    """An HBONE backend answering each request with the next scripted `Reply` (see the docstring)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = deque(replies)
        self.tunnel_requests: list[TunnelRequest] = []
        self.requests: list[ReceivedRequest] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def tunnels(self) -> int:
        return len(self.tunnel_requests)

    def attach(self, m: Mesh, ip: str = BACKEND_IP) -> Backend:
        certificate = m.pki.issue("default", "web")

        async def handle(request: TunnelRequest) -> Decision:
            self.tunnel_requests.append(request)
            number = len(self.tunnel_requests)
            return Decision(200, serve=lambda stream: self._start(stream, number))

        server = HboneServer(lambda: certificate, handle)
        listener = listening_socket("127.0.0.3")
        server.serve(listener)
        address = listener.getsockname()[:2]
        # Registered with the mesh, which closes the server and its listener when it ends.
        backend = Backend(ip, certificate, server, address, address, listener=listener)
        m.backends[ip] = backend
        m.hop_map[ip] = address
        return backend

    def _start(self, stream: ServerStream, tunnel: int) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(stream, tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: ServerStream, tunnel: int) -> None:
        reader = _StreamBuffer(stream)
        try:
            for _ in range(MAX_REQUESTS_PER_TUNNEL):
                raw = await reader.request()
                if raw is None or not self.replies:
                    stream.close()
                    return
                self.requests.append(ReceivedRequest(tunnel, raw))
                reply = self.replies.popleft()
                stream.write(reply.data)
                await stream.drain()
                if reply.gate is not None:
                    await asyncio.wait_for(reply.gate.wait(), WAIT)
                if reply.rest:
                    stream.write(reply.rest)
                    await stream.drain()
                if reply.after == "close":
                    stream.close()
                    return
                if reply.after == "abort":
                    stream.abort()
                    return
            stream.close()
        except (HboneError, OSError, TimeoutError):
            stream.abort()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def raw_mesh(tmp_path: Path, *replies: Reply) -> AsyncIterator[tuple[Mesh, RawBackend]]:
    """A mesh whose WEB Service (at VIP) has one endpoint: a RawBackend answering `replies` in order."""
    raw = RawBackend(list(replies))
    try:
        async with mesh(tmp_path) as m:
            m.serve(WEB, VIP, raw.attach(m))
            yield m, raw
    finally:
        await raw.stop()


def response(status: str, *headers: str, body: bytes = b"") -> bytes:
    """An HTTP/1.1 response head (`status` is the rest of the status line) and body, as bytes."""
    lines = [f"HTTP/1.1 {status}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def ok(body: bytes, *headers: str) -> bytes:
    return response("200 OK", f"Content-Length: {len(body)}", *headers, body=body)


async def read_until(tunnel: Tunnel, done: Callable[[bytes], bool], within: float = WAIT) -> bytes:
    """What the waypoint sent on `tunnel` until `done(received)` holds (bounded by `within`)."""
    received = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not done(bytes(received)):
        chunk = await asyncio.wait_for(tunnel.read(), max(0.0, deadline - loop.time()))
        if not chunk:
            raise AssertionError(f"the waypoint closed before the expected bytes: {bytes(received)!r}")
        received += chunk
    return bytes(received)


UPE_BODY = b"upstream protocol error"
UC_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


# ------------------------------------------------------------------------------ keep-alive and reuse


async def test_keep_alive_responses_share_one_backend_connection(tmp_path: Path) -> None:
    async with raw_mesh(tmp_path, Reply(ok(b"first")), Reply(ok(b"second", "X-Served: 2"))) as (m, raw):
        client = H1Client(await m.tunnel())
        first = await client.request("GET", "/one")
        second = await client.request("GET", "/two")
        assert (first.status, first.headers, first.body) == (200, {"content-length": "5"}, b"first")
        assert (second.status, second.body) == (200, b"second")
        assert second.headers == {"content-length": "6", "x-served": "2"}
        assert raw.tunnels == 1
        assert [(r.tunnel, r.request_line) for r in raw.requests] == [
            (1, b"GET /one HTTP/1.1"),
            (1, b"GET /two HTTP/1.1"),
        ]
        assert m.proxy.pools.stats.reused == 1
    records = m.observer.records
    assert [(r.response_code, r.response_flags, r.attempts) for r in records] == [(200, "-", 1)] * 2
    assert [r.response_bytes for r in records] == [5, 6]
    assert all(r.upstream_protocol == "HTTP/1.1" for r in records)


@pytest.mark.parametrize(
    "first_response",
    [
        ok(b"bye", "Connection: close"),
        response("200 OK", "Content-Length: 3", body=b"bye").replace(b"HTTP/1.1", b"HTTP/1.0"),
    ],
    ids=["connection-close", "http10"],
)
async def test_a_response_that_ends_the_connection_is_not_reused(
    tmp_path: Path, first_response: bytes
) -> None:
    # The backend keeps its side open: it is the waypoint that must not send another request on it.
    async with raw_mesh(tmp_path, Reply(first_response), Reply(ok(b"again"))) as (m, raw):
        client = H1Client(await m.tunnel())
        first = await client.request("GET", "/one")
        # Connection is hop-by-hop: the client's own connection to the waypoint stays open.
        assert (first.status, first.headers, first.body) == (200, {"content-length": "3"}, b"bye")
        second = await client.request("GET", "/two")
        assert (second.status, second.body) == (200, b"again")
        assert raw.tunnels == 2
        assert [r.tunnel for r in raw.requests] == [1, 2]
    assert [(r.response_code, r.response_flags, r.attempts) for r in m.observer.records] == [
        (200, "-", 1)
    ] * 2


# ------------------------------------------------------------------------------------ bodiless answers


async def test_head_response_declares_a_length_and_has_no_body(tmp_path: Path) -> None:
    replies = (Reply(response("200 OK", "Content-Length: 100", 'ETag: "v1"')), Reply(ok(b"after")))
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        client = H1Client(await m.tunnel())
        head = await client.request("HEAD", "/doc")
        assert (head.status, head.body) == (200, b"")
        assert head.headers == {"content-length": "100", "etag": '"v1"'}
        after = await client.request("GET", "/doc")  # the same client connection
        assert (after.status, after.body) == (200, b"after")
        # The backend connection is reused after a HEAD answer: nothing but its head belongs to it.
        assert [(r.tunnel, r.request_line) for r in raw.requests] == [
            (1, b"HEAD /doc HTTP/1.1"),
            (1, b"GET /doc HTTP/1.1"),
        ]
    assert [(r.response_code, r.response_flags, r.response_bytes) for r in m.observer.records] == [
        (200, "-", 0),
        (200, "-", 5),
    ]


async def test_204_and_304_have_no_body_and_keep_the_connection(tmp_path: Path) -> None:
    replies = (
        Reply(response("204 No Content", "X-Deleted: yes")),
        Reply(response("304 Not Modified", 'ETag: "v1"', "Cache-Control: max-age=60")),
        Reply(ok(b"fresh")),
    )
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        client = H1Client(await m.tunnel())
        deleted = await client.request("DELETE", "/item")
        assert (deleted.status, deleted.headers, deleted.body) == (204, {"x-deleted": "yes"}, b"")
        cached = await client.request("GET", "/item", [("if-none-match", '"v1"')])
        assert (cached.status, cached.body) == (304, b"")
        assert cached.headers == {"etag": '"v1"', "cache-control": "max-age=60"}
        fresh = await client.request("GET", "/item")
        assert (fresh.status, fresh.body) == (200, b"fresh")
        assert raw.tunnels == 1 and [r.tunnel for r in raw.requests] == [1, 1, 1]
    assert [(r.response_code, r.response_flags) for r in m.observer.records] == [
        (204, "-"),
        (304, "-"),
        (200, "-"),
    ]


# --------------------------------------------------------------------------------- framing of bodies


async def test_close_delimited_body_is_read_until_the_backend_closes(tmp_path: Path) -> None:
    replies = (
        Reply(
            response("200 OK", "Content-Type: text/plain", body=b"no length, "),
            rest=b"ends at close",
            after="close",
        ),
        Reply(ok(b"next")),
    )
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        client = H1Client(await m.tunnel())
        first = await client.request("GET", "/stream")
        assert (first.status, first.body) == (200, b"no length, ends at close")
        # The length is unknown when the head goes out: the client gets it chunked.
        assert first.headers == {"content-type": "text/plain", "transfer-encoding": "chunked"}
        second = await client.request("GET", "/next")
        assert (second.status, second.body) == (200, b"next")
        assert raw.tunnels == 2 and [r.tunnel for r in raw.requests] == [1, 2]
        # The connection whose end delimited the body is done: the next request goes straight to a
        # new one (never written to a closed connection first, which would fail a POST).
        assert m.proxy.pools.stats.reused == 0
    records = m.observer.records
    assert [(r.response_code, r.response_flags, r.attempts) for r in records] == [
        (200, "-", 1),
        (200, "-", 1),
    ]
    assert records[0].response_bytes == len(b"no length, ends at close")


async def test_interim_responses_are_hop_local(tmp_path: Path) -> None:
    replies = (
        Reply(response("103 Early Hints", "Link: </style.css>; rel=preload") + ok(b"page")),
        Reply(response("100 Continue") + ok(b"unasked continue")),
    )
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        client = H1Client(await m.tunnel())
        page = await client.request("GET", "/page")
        assert (page.status, page.informational, page.body) == (200, [], b"page")
        assert "link" not in page.headers
        other = await client.request("GET", "/other")
        assert (other.status, other.informational, other.body) == (200, [], b"unasked continue")
        assert raw.tunnels == 1
    assert [(r.response_code, r.response_flags) for r in m.observer.records] == [(200, "-"), (200, "-")]


async def test_response_trailers_reach_only_clients_that_accept_them(tmp_path: Path) -> None:
    chunked = response(
        "200 OK",
        "Transfer-Encoding: chunked",
        "Trailer: x-checksum",
        body=b"4\r\nbody\r\n3;ext=1\r\n!!!\r\n0\r\nx-checksum: abc\r\n\r\n",
    )
    async with raw_mesh(tmp_path, Reply(chunked), Reply(chunked)) as (m, raw):
        client = H1Client(await m.tunnel())
        accepting = await client.request("GET", "/t", [("te", "trailers")])
        assert (accepting.status, accepting.body, accepting.trailers) == (
            200,
            b"body!!!",
            {"x-checksum": "abc"},
        )
        assert accepting.headers == {"transfer-encoding": "chunked"}  # "trailer" is hop-by-hop here
        plain = await client.request("GET", "/t")
        assert (plain.status, plain.body, plain.trailers) == (200, b"body!!!", {})
        assert raw.tunnels == 1
        assert all(b"\r\nte:" not in r.head.lower() for r in raw.requests)  # te is not forwarded
    assert [(r.response_code, r.response_flags, r.response_bytes) for r in m.observer.records] == [
        (200, "-", 7),
        (200, "-", 7),
    ]


# ------------------------------------------------------------------------------------ broken backends


@pytest.mark.parametrize(
    "malformed",
    [
        b"HTTP/1.1 abc\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        response("200 OK", "Content-Length: 5", "Content-Length: 6", body=b"hello!"),
        response("200 OK", "Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["bad-status", "garbage", "conflicting-content-length", "bad-chunk-size"],
)
async def test_malformed_response_is_502_upe_and_the_connection_is_dropped(
    tmp_path: Path, malformed: bytes
) -> None:
    async with raw_mesh(tmp_path, Reply(malformed), Reply(ok(b"recovered"))) as (m, raw):
        client = H1Client(await m.tunnel())
        failed = await client.request("GET", "/broken")
        assert (failed.status, failed.body) == (502, UPE_BODY)
        recovered = await client.request("GET", "/after")  # the client's connection survives it
        assert (recovered.status, recovered.body) == (200, b"recovered")
        assert raw.tunnels == 2 and [r.tunnel for r in raw.requests] == [1, 2]
        assert m.picker.reports == [(BACKEND_IP, False), (BACKEND_IP, True)]
    failed_record, recovered_record = m.observer.records
    assert (failed_record.response_code, failed_record.response_flags) == (502, "UPE")
    assert failed_record.response_code_details == "upstream_protocol_error"
    assert failed_record.attempts == 1  # a protocol error is never retried
    assert (recovered_record.response_flags, recovered_record.attempts) == ("-", 1)


async def test_malformed_chunk_after_the_head_was_forwarded_cuts_the_response(tmp_path: Path) -> None:
    gate = asyncio.Event()
    head_and_chunk = response("200 OK", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n")
    replies = (Reply(head_and_chunk, rest=b"zz\r\nworld\r\n0\r\n\r\n", gate=gate), Reply(ok(b"recovered")))
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        tunnel = await m.tunnel()
        tunnel.write(b"GET /broken-later HTTP/1.1\r\nHost: web\r\n\r\n")
        started = await read_until(tunnel, lambda data: b"hello" in data)
        assert status_of(started) == 200
        gate.set()
        rest, closed = await exchange_until_close(tunnel, b"")
        assert closed and b"0\r\n\r\n" not in started + rest  # never a clean end of the body
        recovered = await H1Client(await m.tunnel()).request("GET", "/after")
        assert (recovered.status, recovered.body) == (200, b"recovered")
        assert raw.tunnels == 2
    record = m.observer.records[0]
    # Pinned: once the head went out, a framing error is reported as a reset (UC), not as UPE.
    assert (record.response_code, record.response_flags) == (200, "UC")
    assert record.response_code_details == "upstream_reset_after_response_started"


@pytest.mark.parametrize("ending", ["close", "abort"])
async def test_backend_ending_a_fresh_connection_before_responding_is_503_uc(
    tmp_path: Path, ending: Literal["close", "abort"]
) -> None:
    async with raw_mesh(tmp_path, Reply(b"", after=ending), Reply(ok(b"recovered"))) as (m, raw):
        client = H1Client(await m.tunnel())
        failed = await client.request("GET", "/dropped")
        assert (failed.status, failed.body) == (503, UC_BODY)
        recovered = await client.request("GET", "/after")
        assert (recovered.status, recovered.body) == (200, b"recovered")
        assert raw.tunnels == 2 and [r.tunnel for r in raw.requests] == [1, 2]
    failed_record = m.observer.records[0]
    assert (failed_record.response_code, failed_record.response_flags) == (503, "UC")
    assert failed_record.response_code_details == "upstream_reset_before_response_started"
    assert failed_record.attempts == 1  # a fresh connection: nothing to blame on a keep-alive race


async def test_reused_connection_closed_before_responding_resends_only_idempotent_requests(
    tmp_path: Path,
) -> None:
    replies = (
        Reply(ok(b"one")),
        Reply(b"", after="close"),  # the keep-alive race: the backend closes as the GET arrives
        Reply(ok(b"two")),
        Reply(b"", after="close"),  # the same for a POST
    )
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        client = H1Client(await m.tunnel())
        assert (await client.request("GET", "/one")).body == b"one"
        resent = await client.request("GET", "/two")
        assert (resent.status, resent.body) == (200, b"two")
        posted = await client.request("POST", "/three", body=b"data")
        assert (posted.status, posted.body) == (503, UC_BODY)
        assert [(r.tunnel, r.request_line) for r in raw.requests] == [
            (1, b"GET /one HTTP/1.1"),
            (1, b"GET /two HTTP/1.1"),
            (2, b"GET /two HTTP/1.1"),
            (2, b"POST /three HTTP/1.1"),
        ]
    records = m.observer.records
    assert [(r.response_code, r.response_flags, r.attempts) for r in records] == [
        (200, "-", 1),
        (200, "-", 2),
        (503, "UC", 1),
    ]


async def test_truncated_body_cuts_the_client_response_short(tmp_path: Path) -> None:
    gate = asyncio.Event()
    truncated = response("200 OK", "Content-Length: 100", body=b"x" * 50)
    async with raw_mesh(tmp_path, Reply(truncated, gate=gate, after="close"), Reply(ok(b"recovered"))) as (
        m,
        raw,
    ):
        tunnel = await m.tunnel()
        tunnel.write(b"GET /short HTTP/1.1\r\nHost: web\r\n\r\n")
        received = await read_until(tunnel, lambda data: data.endswith(b"x" * 50))
        assert status_of(received) == 200 and b"\r\ncontent-length: 100\r\n" in received.lower()
        gate.set()  # now the backend closes, 50 bytes short
        rest, closed = await exchange_until_close(tunnel, b"")
        assert (rest, closed) == (b"", True)
        recovered = await H1Client(await m.tunnel()).request("GET", "/after")
        assert (recovered.status, recovered.body) == (200, b"recovered")
        assert raw.tunnels == 2
    record = m.observer.records[0]
    assert (record.response_code, record.response_flags) == (200, "UC")
    assert record.response_code_details == "upstream_reset_after_response_started"
    assert record.response_bytes == 50  # what reached the client before the cut


@pytest.mark.parametrize(
    ("extra", "second_status", "second_body", "third_body", "tunnels"),
    [
        # A complete unasked-for response must never become the answer to the next request (a response
        # desync, every later answer one request behind).
        (ok(b"EVIL!"), 200, b"two", b"three", 2),
        # Bytes that are no response must not prefix the answer to the next request either.
        (b"GARBAGE", 200, b"two", b"three", 2),
    ],
    ids=["extra-response", "extra-garbage"],
)
async def test_bytes_after_a_complete_response_retire_the_connection(
    tmp_path: Path, extra: bytes, second_status: int, second_body: bytes, third_body: bytes, tunnels: int
) -> None:
    """Bytes a backend sends after a complete keep-alive response were never asked for: the connection
    cannot be trusted and is closed, so the next request gets its own answer on a new one."""
    replies = (Reply(ok(b"one") + extra), Reply(ok(b"two")), Reply(ok(b"three")))
    async with raw_mesh(tmp_path, *replies) as (m, raw):
        client = H1Client(await m.tunnel())
        first = await client.request("GET", "/one")
        assert (first.status, first.body) == (200, b"one")
        second = await client.request("GET", "/two")
        assert (second.status, second.body) == (second_status, second_body)
        third = await client.request("GET", "/three")
        assert (third.status, third.body) == (200, third_body)
        await eventually(lambda: len(raw.requests) == 3, within=WAIT, what="three requests at the backend")
        assert raw.tunnels == tunnels
        assert [r.request_line for r in raw.requests] == [
            b"GET /one HTTP/1.1",
            b"GET /two HTTP/1.1",
            b"GET /three HTTP/1.1",
        ]
        assert [r.tunnel for r in raw.requests] == [1, 2, 2]  # the first connection was not reused


# ------------------------------------------------------------------------------------ the request side


async def test_request_bodies_reach_the_backend_with_their_framing(tmp_path: Path) -> None:
    async with raw_mesh(tmp_path, Reply(ok(b"a")), Reply(ok(b"b"))) as (m, raw):
        # Both requests in one write, so the chunks reach the waypoint as the client framed them.
        answer = await raw_exchange(
            await m.tunnel(),
            b"POST /fixed HTTP/1.1\r\nHost: web\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
            b"hello world"
            b"POST /chunked HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n"
            b"Connection: close\r\n\r\n"
            b"5\r\nhello\r\n6;ext=x\r\n world\r\n0\r\nx-checksum: abc\r\nx-other: 1\r\n\r\n",
        )
        assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
        fixed, chunked = raw.requests
        assert (fixed.tunnel, chunked.tunnel) == (1, 1)
        assert fixed.fields[-1] == ("content-length", "11") and fixed.body == b"hello world"
        assert ("content-type", "text/plain") in fixed.fields
        # Re-chunked chunk for chunk (extensions dropped), the trailers after the last chunk.
        assert chunked.fields[-1] == ("transfer-encoding", "chunked")
        assert "content-length" not in dict(chunked.fields)
        assert chunked.body == b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\nx-other: 1\r\n\r\n"
    assert [(r.response_code, r.request_bytes) for r in m.observer.records] == [(200, 11), (200, 11)]


async def test_request_head_sent_upstream(tmp_path: Path) -> None:
    async with raw_mesh(tmp_path, Reply(ok(b"a")), Reply(ok(b"b"))) as (m, raw):
        answer = await raw_exchange(
            await m.tunnel(),
            b"GET /h?q=1 HTTP/1.1\r\nHost: web.default:80\r\nUser-Agent: curl\r\nAccept: */*\r\n"
            b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nCookie: a=1\r\n"
            b"Cookie: b=2\r\nX-Dup: 1\r\nX-Dup: 2\r\nProxy-Connection: x\r\nUpgrade: h2c\r\nTE: trailers\r\n"
            b"X-Request-Id: mine\r\n\r\n"
            b"GET /plain HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
        first, second = raw.requests
        assert first.request_line == b"GET /h?q=1 HTTP/1.1"
        # Host first, then the client's fields in order without the hop-by-hop ones (nor those its
        # Connection header named), the waypoint's own, and the cookies joined into one field at the end.
        assert [name for name, _ in first.fields] == [
            "host",
            "user-agent",
            "accept",
            "x-dup",
            "x-dup",
            "x-request-id",
            "traceparent",
            "x-forwarded-proto",
            "cookie",
        ]
        values = first.fields
        assert values[:5] == [
            ("host", "web.default:80"),
            ("user-agent", "curl"),
            ("accept", "*/*"),
            ("x-dup", "1"),
            ("x-dup", "2"),
        ]
        assert values[5] == ("x-request-id", "mine")
        assert values[6][1].startswith("00-") and len(values[6][1].split("-")) == 4
        assert values[7:] == [("x-forwarded-proto", "http"), ("cookie", "a=1; b=2")]
        # Without ids from the client the waypoint generates them (their values vary).
        assert second.request_line == b"GET /plain HTTP/1.1"
        assert [name for name, _ in second.fields] == [
            "host",
            "x-request-id",
            "traceparent",
            "x-forwarded-proto",
        ]
        assert second.fields[0] == ("host", "web") and all(value for _, value in second.fields)
        assert second.body == b"" and raw.tunnels == 1
