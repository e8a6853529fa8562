"""Hostile input at the HBONE server (hardening checklist items 1-7, 26, 27): each is refused cleanly,
counted by reason, nothing is dialled, and the server keeps serving everyone else.

The client here is a raw HTTP/2 client over TLS driven by the test (hbone_harness.RawH2Client)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import h2.errors
import h2.events
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
)

from loom.hbone import Decision, ServerLimits, TunnelRequest
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import (
    WAIT,
    Pki,
    RawH2Client,
    ServerUnderTest,
    Upstream,
    pool,
    raw_client_context,
    running_server,
    start_echo,
    start_recorder,
    tcp_connector,
)

CONNECT = [(":method", "CONNECT"), (":authority", "127.0.0.1:9")]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


@pytest.fixture
async def recorder() -> AsyncIterator[Upstream]:
    upstream = await start_recorder()
    yield upstream
    await upstream.close()


class Calls:
    """A handler that records calls and allows them to the recorder, unless told to wait or deny."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.requests: list[TunnelRequest] = []
        self.release = asyncio.Event()
        self.hold = False
        self.status = 200

    async def __call__(self, request: TunnelRequest) -> Decision:
        self.requests.append(request)
        if self.hold:
            await self.release.wait()
        if self.status != 200:
            return Decision(self.status, reason="test_denied")
        return Decision(200, tcp_connector(self.upstream.address))


async def raw(sut: ServerUnderTest, pki: Pki, tmp_path: Path, **kwargs: int) -> RawH2Client:
    context = raw_client_context(pki.issue("ns2", "raw"), tmp_path)
    return await RawH2Client.connect(sut.address, context, **kwargs)


async def assert_still_serving(sut: ServerUnderTest, pki: Pki) -> None:
    """A well-behaved client still gets a working tunnel (the process was not affected)."""
    echo = await start_echo()
    original = sut.server.handler

    async def to_echo(request: TunnelRequest) -> Decision:
        return Decision(200, tcp_connector(echo.address))

    sut.server.handler = to_echo
    try:
        async with pool() as p:
            tunnel = await p.connect(
                pki.issue("ns3", "good"), [sut.certificate.identity], sut.address, "127.0.0.1:9"
            )
            tunnel.write(b"still alive")
            assert await asyncio.wait_for(tunnel.read(), WAIT) == b"still alive"
            tunnel.close()
    finally:
        sut.server.handler = original
        await echo.close()


# ------------------------------------------------------------------------------ item 6: bad CONNECTs


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(":method", "GET"), (":authority", "127.0.0.1:9")], "not_connect"),
        ([(":method", "CONNECT")], "missing_authority"),
        ([(":method", "CONNECT"), (":authority", "")], "missing_authority"),
        ([(":method", "CONNECT"), (":authority", "echo.default.svc:80")], "hostname_authority"),
        ([(":method", "CONNECT"), (":authority", "[fe80::1%eth0]:80")], "ipv6_zone"),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:0")], "bad_port"),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:65536")], "bad_port"),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:9"), (":path", "/")], "scheme_or_path"),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:9"), ("Upper", "x")], "malformed_headers"),
    ],
    ids=[
        "GET",
        "no authority",
        "empty authority",
        "hostname",
        "ipv6 zone",
        "port 0",
        "port 65536",
        "path",
        "upper",
    ],
)
async def test_bad_connect_is_400_and_nothing_is_dialled(
    pki: Pki, recorder: Upstream, tmp_path: Path, headers: list[tuple[str, str]], reason: str
) -> None:
    calls = Calls(recorder)
    async with running_server(pki.issue("ns1", "server"), calls) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(headers)
        assert await client.response_status(stream) == 400
        # the connection is still fine for a good request on another stream
        good = await client.request(CONNECT)
        assert await client.response_status(good) == 200
        client.close()
        assert sut.server.stats.requests_rejected[reason] == 1
        assert len(calls.requests) == 1  # only the good one reached the handler
        assert recorder.connections <= 1


async def test_hostname_authority_when_allowed(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    calls = Calls(recorder)
    async with running_server(pki.issue("ns1", "server"), calls, allow_hostname_authority=True) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(
            [(":method", "CONNECT"), (":authority", "echo.default.svc.cluster.local:80")]
        )
        assert await client.response_status(stream) == 200
        client.close()
    assert calls.requests[0].target.host == "echo.default.svc.cluster.local"
    assert calls.requests[0].target.ip is None


# ----------------------------------------------------------------------------- item 7: early data


@pytest.mark.parametrize("status", [401, 503])
async def test_early_data_never_reaches_upstream_when_denied(
    pki: Pki, recorder: Upstream, tmp_path: Path, status: int
) -> None:
    calls = Calls(recorder)
    calls.hold = True
    calls.status = status
    async with running_server(pki.issue("ns1", "server"), calls) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(CONNECT)
        client.h2.send_data(stream, b"EARLY-SECRET" * 100)
        await client.flush()
        # the server holds the early data while the handler decides
        await eventually(lambda: sut.server.buffered_bytes >= 1200, within=WAIT)
        calls.release.set()
        assert await client.response_status(stream) == status
        await asyncio.sleep(0.05)
        client.close()
    assert recorder.connections == 0
    assert bytes(recorder.received) == b""


async def test_early_data_goes_upstream_only_after_the_decision(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    calls = Calls(recorder)
    calls.hold = True
    async with running_server(pki.issue("ns1", "server"), calls) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(CONNECT)
        client.h2.send_data(stream, b"early;")
        await client.flush()
        await eventually(lambda: sut.server.buffered_bytes >= 6, within=WAIT)
        assert recorder.connections == 0
        calls.release.set()
        assert await client.response_status(stream) == 200
        client.h2.send_data(stream, b"late")
        await client.flush()
        await eventually(lambda: bytes(recorder.received) == b"early;late", within=WAIT)
        client.close()


async def test_early_data_over_the_bound_resets_the_stream(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    calls = Calls(recorder)
    calls.hold = True
    limits = ServerLimits(early_data_limit=16 * 1024)
    async with running_server(pki.issue("ns1", "server"), calls, limits=limits) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(CONNECT)
        client.h2.send_data(stream, b"x" * 16000)
        client.h2.send_data(stream, b"x" * 16000)
        await client.flush()
        reset = await client.wait_for(
            lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == stream
        )
        assert isinstance(reset, h2.events.StreamReset)
        assert reset.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert sut.server.stats.requests_rejected["early_data_overflow"] == 1
        calls.release.set()
        await asyncio.sleep(0.05)
        client.close()
        assert recorder.connections == 0
        await assert_still_serving(sut, pki)


async def test_data_beyond_the_stream_window_is_a_flow_control_error(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    calls = Calls(recorder)
    calls.hold = True  # nothing reads the stream while the decision is pending: its window only shrinks
    limits = ServerLimits(stream_window=65535, early_data_limit=1 << 20)
    async with running_server(pki.issue("ns1", "server"), calls, limits=limits) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(CONNECT)
        # Small frames written at once (each lies whole in a read, the server's fast path): 80,000
        # bytes against a window of 65,535, sent raw past the client's own flow control.
        for _ in range(5):
            client.frame(DataFrame(stream, data=b"x" * 16000))
        await client.writer.drain()
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert goaway.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
        await client.wait_closed()
        assert sut.server.stats.connections_closed["protocol_error"] == 1
        calls.release.set()
        await asyncio.sleep(0.05)
        assert recorder.connections == 0
        await assert_still_serving(sut, pki)


async def test_data_on_a_stream_never_opened_is_a_connection_error(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    async with running_server(pki.issue("ns1", "server"), Calls(recorder)) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request(CONNECT)
        assert await client.response_status(stream) == 200
        # DATA on a stream id the client skipped (idle, never opened): h2's connection error.
        client.frame(DataFrame(stream + 2, data=b"stray"))
        await client.writer.drain()
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await client.wait_closed()
        assert bytes(recorder.received) == b""
        await assert_still_serving(sut, pki)


# ------------------------------------------------------------------------------ item 1: rapid reset


async def test_rapid_reset_gets_goaway(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    calls = Calls(recorder)
    calls.hold = True  # a slow policy decision: every stream is still pending when it is reset
    async with running_server(pki.issue("ns1", "server"), calls) as sut:
        client = await raw(sut, pki, tmp_path)
        for _ in range(1000):
            stream_id = client.h2.get_next_available_stream_id()
            client.h2.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in CONNECT])
            client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await client.flush()
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        # cut off after about 100 streams (> 100 premature resets, > 50 %), not after all 1000
        assert goaway.last_stream_id is not None and goaway.last_stream_id < 2 * 150
        assert len(calls.requests) <= 150
        assert sut.server.stats.connections_closed["rapid_reset"] == 1
        client.close()
        calls.release.set()
        assert recorder.connections == 0
        await assert_still_serving(sut, pki)


# ----------------------------------------------------------------------- item 3: control-frame floods


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_control_frame_flood_without_reading_closes(
    pki: Pki, recorder: Upstream, tmp_path: Path, kind: str
) -> None:
    async with running_server(pki.issue("ns1", "server"), Calls(recorder), sndbuf=4096) as sut:
        client = await raw(sut, pki, tmp_path, rcvbuf=4096)
        frame = PingFrame(0, opaque_data=b"12345678") if kind == "ping" else SettingsFrame(0)
        batch = frame.serialize() * 2000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        # never read; keep provoking answers until the server gives up on us
        while sut.server.stats.connections_closed["control_frame_flood"] == 0 and loop.time() < deadline:
            try:
                client.send_raw(batch)
                await asyncio.wait_for(client.writer.drain(), 1.0)
            except (ConnectionError, TimeoutError):
                break
            assert sut.server.buffered_bytes < 1024 * 1024
        await eventually(lambda: sut.server.stats.connections_closed["control_frame_flood"] == 1, within=WAIT)
        await eventually(lambda: not sut.server.connections, within=WAIT)
        client.close()
        await assert_still_serving(sut, pki)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([DataFrame(1, data=b"")] * 200, "empty_frame_flood"),
        ([PriorityFrame(1, depends_on=0)] * 300, "priority_flood"),
    ],
    ids=["empty DATA", "PRIORITY"],
)
async def test_useless_frame_floods_close(
    pki: Pki, recorder: Upstream, tmp_path: Path, frames: list[DataFrame], reason: str
) -> None:
    calls = Calls(recorder)
    calls.hold = True
    async with running_server(pki.issue("ns1", "server"), calls) as sut:
        client = await raw(sut, pki, tmp_path)
        await client.request(CONNECT)
        client.send_raw(b"".join(f.serialize() for f in frames))
        await client.writer.drain()
        await client.wait_closed()
        assert sut.server.stats.connections_closed[reason] == 1
        calls.release.set()
        await assert_still_serving(sut, pki)


# ------------------------------------------------------------------- items 2, 4, 5: header abuse


def header_block(headers: list[tuple[str, str]]) -> bytes:
    return Encoder().encode(headers, huffman=False)


async def test_continuation_flood_closes(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    async with running_server(pki.issue("ns1", "server"), Calls(recorder)) as sut:
        client = await raw(sut, pki, tmp_path)
        block = header_block(CONNECT)
        frames: list[Frame] = [HeadersFrame(1, data=block[:5])]
        frames += [ContinuationFrame(1, data=b"") for _ in range(10_000)]
        client.send_raw(b"".join(f.serialize() for f in frames))
        with pytest.raises((ConnectionError, TimeoutError, OSError)):
            await asyncio.wait_for(client.writer.drain(), 1.0)
            await client.wait_closed()
            raise ConnectionResetError("closed as expected")
        assert sut.server.stats.connections_closed["continuation_flood"] == 1
        assert recorder.connections == 0
        await assert_still_serving(sut, pki)


async def test_one_megabyte_header_is_refused_before_buffering(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    async with running_server(pki.issue("ns1", "server"), Calls(recorder)) as sut:
        client = await raw(sut, pki, tmp_path)
        block = header_block([*CONNECT, ("x-big", "v" * (1 << 20))])
        frames: list[Frame] = [HeadersFrame(1, data=block[:16384])]
        frames += [ContinuationFrame(1, data=block[i : i + 16384]) for i in range(16384, len(block), 16384)]
        frames[-1].flags.add("END_HEADERS")
        client.send_raw(b"".join(f.serialize() for f in frames))
        with pytest.raises((ConnectionError, TimeoutError, OSError)):
            await asyncio.wait_for(client.writer.drain(), 2.0)
            await client.wait_closed()
            raise ConnectionResetError("closed as expected")
        assert sut.server.stats.connections_closed["header_block_too_large"] == 1
        await assert_still_serving(sut, pki)


async def test_five_thousand_tiny_headers_are_refused(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    calls = Calls(recorder)
    async with running_server(pki.issue("ns1", "server"), calls) as sut:
        client = await raw(sut, pki, tmp_path)
        # ~10 KiB encoded (under every encoded-size cap), ~185 KiB decoded (RFC 7541 sizes): an HPACK bomb.
        block = header_block([*CONNECT, *[("x", "") for _ in range(5000)]])
        assert len(block) < 16 * 1024
        client.send_raw(HeadersFrame(1, data=block, flags=["END_HEADERS"]).serialize())
        await client.writer.drain()
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert sut.server.stats.connections_closed["header_list_too_large"] == 1
        assert calls.requests == []
        await assert_still_serving(sut, pki)


async def test_oversized_frame_is_refused(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    async with running_server(pki.issue("ns1", "server"), Calls(recorder)) as sut:
        client = await raw(sut, pki, tmp_path)
        # A frame header announcing 16 MiB - 1: refused on sight, nothing buffered.
        client.send_raw(bytes([0xFF, 0xFF, 0xFF, 0x0, 0x0, 0, 0, 0, 1]))
        await client.writer.drain()
        await client.wait_closed()
        assert sut.server.stats.connections_closed["frame_too_large"] == 1


async def test_garbage_instead_of_http2_closes_with_protocol_error(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    async with running_server(pki.issue("ns1", "server"), Calls(recorder)) as sut:
        client = await raw(sut, pki, tmp_path)
        client.send_raw(
            bytes([0, 0, 8, 0x6, 0, 0, 0, 0, 3]) + b"12345678"
        )  # PING on a stream: protocol error
        await client.writer.drain()
        await client.wait_closed()
        assert sut.server.stats.connections_closed["protocol_error"] == 1
        await assert_still_serving(sut, pki)


# --------------------------------------------------------------- streams and connections over the cap


async def test_streams_over_the_limit_are_refused_alone(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    calls = Calls(recorder)
    calls.hold = True
    async with running_server(
        pki.issue("ns1", "server"), calls, limits=ServerLimits(max_concurrent_streams=5)
    ) as sut:
        client = await raw(sut, pki, tmp_path)
        # Sent before reading the server's SETTINGS, so the client's h2 does not hold the 6th back.
        streams = [await client.request(CONNECT) for _ in range(5)]
        extra = await client.request(CONNECT)
        reset = await client.wait_for(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == extra)
        assert isinstance(reset, h2.events.StreamReset)
        assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        assert sut.server.stats.requests_rejected["too_many_streams"] == 1
        calls.release.set()
        for stream in streams:
            assert await client.response_status(stream) == 200
        client.close()


async def test_connections_over_the_cap_are_refused(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    async with running_server(
        pki.issue("ns1", "server"), Calls(recorder), limits=ServerLimits(max_connections=2)
    ) as sut:
        first = await raw(sut, pki, tmp_path)
        second = await raw(sut, pki, tmp_path)
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            third = await asyncio.wait_for(raw(sut, pki, tmp_path), WAIT)
            await asyncio.wait_for(third.reader.read(1), WAIT)
            raise ConnectionResetError("closed without data")
        assert sut.server.stats.connections_refused["connection_limit"] == 1
        stream = await first.request(CONNECT)
        assert await first.response_status(stream) == 200
        first.close()
        second.close()
        await eventually(lambda: sut.server.active_connections == 0, within=WAIT)
        await assert_still_serving(sut, pki)


async def test_handshake_timeout(pki: Pki, recorder: Upstream) -> None:
    limits = ServerLimits(handshake_timeout=0.2)
    async with running_server(pki.issue("ns1", "server"), Calls(recorder), limits=limits) as sut:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, sut.address)  # and then say nothing
        try:
            await eventually(
                lambda: sut.server.stats.connections_refused["handshake_timeout"] == 1, within=WAIT
            )
            assert await asyncio.wait_for(loop.sock_recv(sock, 1), WAIT) == b""
        finally:
            sock.close()
        assert sut.server.active_connections == 0


async def test_idle_connection_gets_goaway(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    async with running_server(
        pki.issue("ns1", "server"), Calls(recorder), limits=ServerLimits(idle_timeout=0.2)
    ) as sut:
        client = await raw(sut, pki, tmp_path)
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert sut.server.stats.connections_closed["idle_timeout"] == 1
        client.close()


async def test_unanswered_keepalive_closes(pki: Pki, recorder: Upstream, tmp_path: Path) -> None:
    limits = ServerLimits(keepalive_interval=0.05, keepalive_timeout=0.2)
    async with running_server(pki.issue("ns1", "server"), Calls(recorder), limits=limits) as sut:
        client = await raw(sut, pki, tmp_path)  # never reads, so never answers the server's PINGs
        await eventually(lambda: sut.server.stats.connections_closed["keepalive_timeout"] == 1, within=WAIT)
        client.close()


# ---------------------------------------------------------------------------- item 27: slow reader


async def test_slow_reader_keeps_server_memory_bounded(pki: Pki, tmp_path: Path) -> None:
    """The upstream streams 64 MiB towards a client that stops reading: the server holds at most about
    the watermark for that connection, pausing the upstream, and other connections are unaffected."""
    total = 64 * 1024 * 1024
    written = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        chunk = b"z" * 65536
        try:
            while written < total:
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    source = await asyncio.start_server(firehose, "127.0.0.1", 0)
    address = source.sockets[0].getsockname()[:2]
    echo = await start_echo()

    async def handler(request: TunnelRequest) -> Decision:
        target = address if request.target.port == 1 else echo.address
        return Decision(200, tcp_connector(target))

    try:
        async with running_server(pki.issue("ns1", "server"), handler, sndbuf=16384) as sut:
            # Large windows: flow control would allow 1 GiB, only the unread socket holds it back.
            client = await raw(sut, pki, tmp_path, rcvbuf=16384, window=(1 << 30))
            stream = await client.request([(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
            assert await client.response_status(stream) == 200
            (connection,) = sut.server.connections
            loop = asyncio.get_running_loop()
            peak = 0
            last, stable_since = -1, loop.time()
            deadline = loop.time() + WAIT
            # the client reads nothing more; watch until the upstream is stalled by back-pressure
            while loop.time() < deadline and loop.time() - stable_since < 0.3:
                peak = max(peak, connection.buffered_bytes)
                if written != last:
                    last, stable_since = written, loop.time()
                await asyncio.sleep(0.01)
            assert written < total, "the upstream was never paused"
            limits = sut.server.limits
            bound = limits.stream_send_high_water + limits.transport_write_high_water + 2 * 256 * 1024
            assert peak <= bound, f"server buffered {peak} bytes for one slow reader (bound {bound})"
            # meanwhile another client is served normally
            async with pool() as p:
                tunnel = await p.connect(
                    pki.issue("ns3", "other"), [sut.certificate.identity], sut.address, "127.0.0.1:2"
                )
                tunnel.write(b"x" * 100_000)
                received = 0
                while received < 100_000:
                    received += len(await asyncio.wait_for(tunnel.read(), WAIT))
                tunnel.close()
            client.close()
    finally:
        source.close()
        await echo.close()


async def test_idle_timeout_still_applies_after_rejected_requests(
    pki: Pki, recorder: Upstream, tmp_path: Path
) -> None:
    async with running_server(
        pki.issue("ns1", "server"), Calls(recorder), limits=ServerLimits(idle_timeout=0.3)
    ) as sut:
        client = await raw(sut, pki, tmp_path)
        stream = await client.request([(":method", "GET"), (":authority", "127.0.0.1:9")], end_stream=True)
        assert await client.response_status(stream) == 400
        goaway = await client.wait_for(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(goaway, h2.events.ConnectionTerminated)
        assert sut.server.stats.connections_closed["idle_timeout"] == 1
        client.close()
