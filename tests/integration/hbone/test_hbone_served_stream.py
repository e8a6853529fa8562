"""`Decision.serve`: the handler reads and writes the accepted CONNECT stream itself (`ServerStream`),
as the waypoint does for HTTP, with no upstream socket. Early data first, graceful close, abort,
back-pressure, and a failing stream server taking down only its own stream."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import h2.errors
import h2.events
import pytest
from hyperframe.frame import DataFrame

from loom.hbone import (
    Decision,
    HboneConnectionError,
    ServerLimits,
    ServerStream,
    TunnelRequest,
    TunnelReset,
    TunnelResult,
)
from loom.hbone.connection import ChunkSink
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import (
    WAIT,
    Pki,
    RawH2Client,
    ServerUnderTest,
    pool,
    raw_client_context,
    running_server,
    send_and_digest,
)

MIB = 1024 * 1024
CONNECT = [(":method", "CONNECT"), (":authority", "127.0.0.1:9")]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


class Served:
    """A handler answering every CONNECT with `serve`, running `body(stream)` in a task per stream."""

    def __init__(self, body: Callable[[ServerStream], Coroutine[Any, Any, None]]) -> None:
        self.body = body
        self.streams: list[ServerStream] = []
        self.results: list[TunnelResult] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.release: asyncio.Event | None = None  # set: the decision waits for it

    async def __call__(self, request: TunnelRequest) -> Decision:
        if self.release is not None:
            await self.release.wait()

        def serve(stream: ServerStream) -> None:
            assert stream.request is request
            self.streams.append(stream)
            self.tasks.append(asyncio.ensure_future(self.body(stream)))

        return Decision(200, serve=serve, on_close=self.results.append)


async def echo_until_eof(stream: ServerStream) -> None:
    while data := await stream.read(64 * 1024):
        stream.write(data)
        await stream.drain()
    stream.close()


async def raw(sut: ServerUnderTest, pki: Pki, tmp_path: Path) -> RawH2Client:
    return await RawH2Client.connect(sut.address, raw_client_context(pki.issue("ns2", "raw"), tmp_path))


def test_a_200_decision_needs_exactly_one_way_to_carry_the_stream() -> None:
    async def connect() -> object:
        raise AssertionError("never dialled")

    with pytest.raises(ValueError, match="exactly one"):
        Decision(200)
    with pytest.raises(ValueError, match="exactly one"):
        Decision(200, upstream=connect, serve=lambda stream: None)  # type: ignore[arg-type]
    assert Decision(401).serve is None


async def test_served_stream_echoes_8_mib_both_ways(pki: Pki) -> None:
    served = Served(echo_until_eof)
    payload = os.urandom(8 * MIB)
    async with running_server(pki.issue("ns1", "server"), served) as sut, pool() as p:
        tunnel = await p.connect(
            pki.issue("ns2", "client"), [sut.certificate.identity], sut.address, "127.0.0.1:9"
        )

        assert await send_and_digest(tunnel, payload) == hashlib.sha256(payload).digest()
        await asyncio.wait_for(tunnel.wait_closed(), WAIT)
        await eventually(lambda: len(served.results) == 1, within=WAIT)
    result = served.results[0]
    assert (result.received, result.sent, result.error) == (len(payload), len(payload), None)
    assert served.streams[0].peer_identity == pki.issue("ns2", "client").identity


async def test_early_data_is_read_first(pki: Pki, tmp_path: Path) -> None:
    got: list[bytes] = []

    async def collect(stream: ServerStream) -> None:
        while data := await stream.read(1024):
            got.append(data)
        stream.close()

    served = Served(collect)
    served.release = asyncio.Event()
    async with running_server(pki.issue("ns1", "server"), served) as sut:
        client = await raw(sut, pki, tmp_path)
        stream_id = await client.request(CONNECT)
        client.h2.send_data(stream_id, b"early;")
        await client.flush()
        await eventually(lambda: sut.server.buffered_bytes >= 6, within=WAIT)
        assert served.streams == []  # nothing is served before the decision
        served.release.set()
        assert await client.response_status(stream_id) == 200
        client.h2.send_data(stream_id, b"late", end_stream=True)
        await client.flush()
        await client.wait_for(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
        client.close()
    assert b"".join(got) == b"early;late"


async def test_close_is_graceful_and_drops_what_the_client_still_sends(pki: Pki, tmp_path: Path) -> None:
    async def answer_and_close(stream: ServerStream) -> None:
        assert await stream.read(100) == b"hello"
        stream.write(b"bye")
        stream.close()
        assert stream.is_closing()
        stream.write(b"dropped after close")  # as a socket writer: silently dropped
        assert await stream.read(100) == b""  # the reader sees the end at once

    served = Served(answer_and_close)
    async with running_server(pki.issue("ns1", "server"), served) as sut:
        client = await raw(sut, pki, tmp_path)
        stream_id = await client.request(CONNECT)
        client.h2.send_data(stream_id, b"hello")
        await client.flush()
        assert await client.response_status(stream_id) == 200
        await client.wait_for(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
        data = b"".join(
            e.data
            for e in client.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )
        assert data == b"bye"
        await asyncio.wait_for(served.tasks[0], WAIT)
        # The client keeps sending after the server's END_STREAM: acknowledged and dropped (nothing is
        # held for a reader that is gone), then its own END_STREAM finishes the stream cleanly. More
        # than the 4 MiB stream window goes through, within h2's flow control: only a server giving the
        # window back for the dropped bytes lets that happen.
        served_stream = served.streams[0]
        sink = served_stream._channel.sink
        assert isinstance(sink, ChunkSink)
        total = ServerLimits().stream_window + MIB
        sent = 0
        deadline = asyncio.get_running_loop().time() + WAIT
        while sent < total:
            room = min(client.h2.local_flow_control_window(stream_id), 16384, total - sent)
            if room > 0:
                client.h2.send_data(stream_id, b"x" * room)
                sent += room
                await client.flush()
            else:
                assert asyncio.get_running_loop().time() < deadline, f"window not given back after {sent}"
                await client.read_events(0.2)
        await eventually(lambda: served_stream.received == 5 + total, within=WAIT)
        assert sink.buffered() == 0
        client.h2.end_stream(stream_id)
        await client.flush()
        await eventually(lambda: len(served.results) == 1, within=WAIT)
        client.close()
    assert served.results[0].error is None
    assert served.results[0].sent == 3


async def test_abort_resets_the_stream(pki: Pki) -> None:
    async def abort(stream: ServerStream) -> None:
        await stream.read(100)
        stream.abort()

    served = Served(abort)
    async with running_server(pki.issue("ns1", "server"), served) as sut, pool() as p:
        tunnel = await p.connect(
            pki.issue("ns2", "client"), [sut.certificate.identity], sut.address, "127.0.0.1:9"
        )
        tunnel.write(b"x")
        with pytest.raises(TunnelReset) as reset:
            await asyncio.wait_for(tunnel.read(), WAIT)
        assert reset.value.error_code == h2.errors.ErrorCodes.CANCEL
        await eventually(lambda: len(served.results) == 1, within=WAIT)
    assert served.results[0].error is not None


async def test_a_failing_stream_server_resets_only_its_stream(pki: Pki) -> None:
    calls = 0

    echoes: list[asyncio.Task[None]] = []

    def start_echo(stream: ServerStream) -> None:
        echoes.append(asyncio.ensure_future(echo_until_eof(stream)))

    async def handler(request: TunnelRequest) -> Decision:
        nonlocal calls
        calls += 1
        if calls == 1:

            def broken(stream: ServerStream) -> None:
                raise RuntimeError("bug in the stream server")

            return Decision(200, serve=broken)
        return Decision(200, serve=start_echo)

    async with running_server(pki.issue("ns1", "server"), handler) as sut, pool() as p:
        client = pki.issue("ns2", "client")
        first = await p.connect(client, [sut.certificate.identity], sut.address, "127.0.0.1:9")
        with pytest.raises(TunnelReset) as reset:
            await asyncio.wait_for(first.read(), WAIT)
        assert reset.value.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
        second = await p.connect(client, [sut.certificate.identity], sut.address, "127.0.0.1:9")
        assert second.connection is first.connection  # the same HTTP/2 connection survived
        second.write(b"still serving")
        assert await asyncio.wait_for(second.read(), WAIT) == b"still serving"
        second.close()
        [echo] = echoes
        with pytest.raises(TunnelReset):  # the client's reset ends the echo's read
            await asyncio.wait_for(echo, WAIT)


async def test_a_reader_that_stops_holds_at_most_one_stream_window(pki: Pki) -> None:
    window = ServerLimits().stream_window
    started = asyncio.Event()
    proceed = asyncio.Event()

    async def slow(stream: ServerStream) -> None:
        started.set()
        await proceed.wait()
        total = 0
        while data := await stream.read(MIB):
            total += len(data)
        stream.write(str(total).encode())
        stream.close()

    served = Served(slow)
    async with running_server(pki.issue("ns1", "server"), served) as sut, pool() as p:
        tunnel = await p.connect(
            pki.issue("ns2", "client"), [sut.certificate.identity], sut.address, "127.0.0.1:9"
        )
        await asyncio.wait_for(started.wait(), WAIT)
        for _ in range(12):
            tunnel.write(b"z" * MIB)  # 12 MiB queued on the client, the server reads nothing yet
        sink = served.streams[0]._channel.sink
        assert isinstance(sink, ChunkSink)
        await eventually(lambda: sink.buffered() >= window - MIB, within=WAIT)
        await asyncio.sleep(0.2)  # nothing more may arrive while nobody reads
        assert sink.buffered() <= window
        proceed.set()
        tunnel.write_eof()
        assert await asyncio.wait_for(tunnel.read(), WAIT) == str(12 * MIB).encode()


async def test_writes_after_the_stream_failed_are_dropped_and_drain_raises(pki: Pki) -> None:
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def write_after_reset(stream: ServerStream) -> None:
        try:
            await stream.read(100)  # the client resets the stream
        except HboneConnectionError:
            pass
        stream.write(b"late")
        try:
            await stream.drain()
        except HboneConnectionError as e:
            outcome.set_result(e)
        else:
            outcome.set_result(None)

    served = Served(write_after_reset)
    async with running_server(pki.issue("ns1", "server"), served) as sut, pool() as p:
        tunnel = await p.connect(
            pki.issue("ns2", "client"), [sut.certificate.identity], sut.address, "127.0.0.1:9"
        )
        await eventually(lambda: len(served.streams) == 1, within=WAIT)
        tunnel.close()  # RST_STREAM CANCEL
        assert isinstance(await asyncio.wait_for(outcome, WAIT), TunnelReset)


async def test_data_beyond_the_stream_window_is_a_flow_control_error(pki: Pki, tmp_path: Path) -> None:
    """The received-DATA fast path charges h2's windows: a peer that ignores them (raw frames past the
    4 MiB stream window while nobody reads) gets GOAWAY FLOW_CONTROL_ERROR, as from h2 itself."""
    started = asyncio.Event()

    async def never_read(stream: ServerStream) -> None:
        started.set()
        await asyncio.sleep(WAIT)

    served = Served(never_read)
    async with running_server(pki.issue("ns1", "server"), served) as sut:
        client = await raw(sut, pki, tmp_path)
        stream_id = await client.request(CONNECT)
        assert await client.response_status(stream_id) == 200
        await asyncio.wait_for(started.wait(), WAIT)
        chunk = b"f" * 16384
        for _ in range(ServerLimits().stream_window // len(chunk) + 2):
            client.frame(DataFrame(stream_id, data=chunk))
        await client.flush()
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert goaway.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
        client.close()
    for task in served.tasks:
        task.cancel()
