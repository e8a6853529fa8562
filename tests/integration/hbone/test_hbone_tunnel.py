"""HBONE end to end on loopback: client pool -> HBONE server -> TCP upstream, and back."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest

from loom.hbone import (
    ContextCache,
    Decision,
    HboneConnectionError,
    HboneError,
    HboneRejected,
    HboneServer,
    TunnelRequest,
    TunnelReset,
    TunnelResult,
    build_baggage,
    build_forwarded,
    build_traceparent,
    pump,
    pump_socket,
    server_context,
)
from loom.hbone.headers import BaggageFields
from loom.identity import WorkloadCertificate
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import (
    WAIT,
    Pki,
    echo_handler,
    listening_socket,
    pool,
    running_server,
    send_and_digest,
    start_echo,
    start_recorder,
    tcp_connector,
)

MIB = 1024 * 1024


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


async def test_echo_8_mib_sha256(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    calls: list[TunnelRequest] = []
    payload = os.urandom(8 * MIB)
    try:
        async with running_server(server_cert, echo_handler(echo, calls)) as sut, pool() as p:
            headers = [
                ("forwarded", build_forwarded("127.0.0.3", 40000)),
                (
                    "baggage",
                    build_baggage(BaggageFields("Kubernetes", "ns2", "deployment", "client", "client", "v1")),
                ),
                ("traceparent", build_traceparent()),
            ]
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9", headers)
            assert tunnel.peer_identity == server_cert.identity

            assert await send_and_digest(tunnel, payload) == hashlib.sha256(payload).digest()
            await asyncio.wait_for(tunnel.wait_closed(), WAIT)
            assert tunnel.error is None
            assert (tunnel.sent, tunnel.received) == (len(payload), len(payload))
    finally:
        await echo.close()
    (request,) = calls
    assert request.peer_identity == client_cert.identity
    assert request.authority == "127.0.0.1:9" and request.target.port == 9
    assert request.forwarded == 'for="127.0.0.3:40000"'
    assert request.baggage is not None and "k8s.namespace.name=ns2" in request.baggage
    assert request.traceparent is not None and request.traceparent.startswith("00-")
    assert request.local_address == sut.address


async def test_pump_socket_and_pump_streams(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    payload = os.urandom(3 * MIB + 17)
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            # pump_socket: the tunnel joined to a socket (what the ztunnel does with captured connections)
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            local, app = socket.socketpair()
            loop = asyncio.get_running_loop()
            pumping = asyncio.ensure_future(pump_socket(tunnel, local))
            app.setblocking(False)
            await loop.sock_sendall(app, payload)
            app.shutdown(socket.SHUT_WR)
            echoed = bytearray()
            while data := await asyncio.wait_for(loop.sock_recv(app, 1 << 20), WAIT):
                echoed += data
            app.close()
            result = await asyncio.wait_for(pumping, WAIT)
            assert bytes(echoed) == payload
            assert (result.sent, result.received, result.error) == (len(payload), len(payload), None)

            # pump: the tunnel and an asyncio stream pair
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            local, app = socket.socketpair()
            reader, writer = await asyncio.open_connection(sock=local)
            pumping = asyncio.ensure_future(pump(tunnel, reader, writer))
            app.setblocking(False)
            await loop.sock_sendall(app, payload)
            app.shutdown(socket.SHUT_WR)
            echoed = bytearray()
            while data := await asyncio.wait_for(loop.sock_recv(app, 1 << 20), WAIT):
                echoed += data
            app.close()
            result = await asyncio.wait_for(pumping, WAIT)
            assert bytes(echoed) == payload
            assert (result.sent, result.received, result.error) == (len(payload), len(payload), None)
            assert p.stats.dials == 1
    finally:
        await echo.close()


async def test_half_close_each_way(pki: Pki) -> None:
    """The client ends its side; the upstream still answers afterwards, then ends its side."""
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until EOF
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(answer_after_eof, "127.0.0.1", 0)
    address = upstream.sockets[0].getsockname()[:2]

    async def handler(request: TunnelRequest) -> Decision:
        return Decision(200, tcp_connector(address))

    try:
        async with running_server(server_cert, handler) as sut, pool() as p:
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            tunnel.write(b"question")
            tunnel.write_eof()
            answer = bytearray()
            while data := await asyncio.wait_for(tunnel.read(), WAIT):
                answer += data
            assert bytes(answer) == b"got question"
            await asyncio.wait_for(tunnel.wait_closed(), WAIT)
            assert tunnel.error is None
    finally:
        upstream.close()


@pytest.mark.parametrize(
    ("status", "flag"),
    [(400, "bad_request"), (401, "policy_denied"), (503, "upstream_unavailable")],
)
async def test_handler_statuses_reach_the_client(pki: Pki, status: int, flag: str) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")

    async def handler(request: TunnelRequest) -> Decision:
        return Decision(status, reason=f"test_{status}")

    async with running_server(server_cert, handler) as sut, pool() as p:
        with pytest.raises(HboneRejected) as caught:
            await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
        assert caught.value.status == status
        assert getattr(caught.value, flag)
        assert str(status) in str(caught.value)
        assert sut.server.stats.requests_rejected[f"test_{status}"] == 1
        assert sut.server.stats.responses[status] == 1
        # the connection stays usable for the next tunnel
        with pytest.raises(HboneRejected):
            await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
        assert p.stats.dials == 1


async def test_upstream_connect_failure_is_503(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    closed = listening_socket("127.0.0.1")
    closed_address = closed.getsockname()[:2]
    closed.close()  # nothing listens there any more: connection refused

    async def handler(request: TunnelRequest) -> Decision:
        return Decision(200, tcp_connector(closed_address))

    async with running_server(server_cert, handler) as sut, pool() as p:
        with pytest.raises(HboneRejected) as caught:
            await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
        assert caught.value.upstream_unavailable
        assert sut.server.stats.requests_rejected["upstream_connect_failed"] == 1


async def test_on_close_is_reported_once_when_an_admitted_tunnel_never_opens(pki: Pki) -> None:
    """The handler admitted the connection (and opened its telemetry record); the upstream then failed.
    on_close must still be called, exactly once, so the record is closed."""
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    closed = listening_socket("127.0.0.1")
    closed_address = closed.getsockname()[:2]
    closed.close()
    results: list[TunnelResult] = []

    async def handler(request: TunnelRequest) -> Decision:
        return Decision(200, tcp_connector(closed_address), on_close=results.append)

    async with running_server(server_cert, handler) as sut, pool() as p:
        with pytest.raises(HboneRejected):
            await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
        await eventually(lambda: len(results) == 1, within=WAIT)
        await asyncio.sleep(0.05)
        assert len(results) == 1
        assert (results[0].sent, results[0].received) == (0, 0)
        assert results[0].error is not None


async def test_handler_exception_is_503_and_connection_survives(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    failing = True

    async def handler(request: TunnelRequest) -> Decision:
        if failing:
            raise RuntimeError("policy store exploded")
        return Decision(200, tcp_connector(echo.address))

    try:
        async with running_server(server_cert, handler) as sut, pool() as p:
            with pytest.raises(HboneRejected) as caught:
                await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            assert caught.value.status == 503
            assert sut.server.stats.requests_rejected["handler_error"] == 1
            failing = False
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            tunnel.write(b"ping")
            assert await asyncio.wait_for(tunnel.read(), WAIT) == b"ping"
            tunnel.close()
    finally:
        await echo.close()


async def test_tunnel_results_and_server_side_close(pki: Pki) -> None:
    """on_close reports bytes both ways; ServerTunnel.close() (policy no longer allows) resets it."""
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    results: list[TunnelResult] = []

    async def handler(request: TunnelRequest) -> Decision:
        return Decision(200, tcp_connector(echo.address), on_close=results.append)

    try:
        async with running_server(server_cert, handler) as sut, pool() as p:
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            tunnel.write(b"hello")
            assert await asyncio.wait_for(tunnel.read(), WAIT) == b"hello"
            (live,) = sut.server.tunnels()
            assert (live.received, live.sent) == (5, 5)
            assert live.request.peer_identity == client_cert.identity
            live.close("policy_changed")
            with pytest.raises(TunnelReset):
                while await asyncio.wait_for(tunnel.read(), WAIT):
                    pass
            await eventually(lambda: len(results) == 1, within=WAIT)
            assert results[0].received == 5 and results[0].sent == 5
            assert results[0].error is not None
            assert sut.server.stats.requests_rejected["policy_changed"] == 1
            assert sut.server.tunnels() == []
    finally:
        await echo.close()


async def test_client_reset_aborts_upstream(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    recorder = await start_recorder()
    disconnected = asyncio.Event()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        disconnected.set()
        writer.close()

    upstream = await asyncio.start_server(watch, "127.0.0.1", 0)
    address = upstream.sockets[0].getsockname()[:2]

    async def handler(request: TunnelRequest) -> Decision:
        return Decision(200, tcp_connector(address))

    try:
        async with running_server(server_cert, handler) as sut, pool() as p:
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            tunnel.write(b"x" * 1000)
            await tunnel.drain()
            tunnel.close()
            await asyncio.wait_for(disconnected.wait(), WAIT)
            await eventually(lambda: not sut.server.tunnels(), within=WAIT)
    finally:
        upstream.close()
        await recorder.close()


async def test_client_sends_no_sni(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    contexts = ContextCache()
    names: list[str | None] = []
    server_context(server_cert, contexts).sni_callback = lambda _obj, name, _ctx: names.append(name)
    server = HboneServer(lambda: server_cert, echo_handler(echo), contexts=contexts)
    sock = listening_socket("127.0.0.2")
    try:
        server.serve(sock)
        async with pool() as p:
            tunnel = await p.connect(
                client_cert, [server_cert.identity], sock.getsockname()[:2], "127.0.0.1:9"
            )
            tunnel.close()
        assert names == [None]
    finally:
        await server.close()
        await echo.close()


async def test_many_concurrent_tunnels_share_one_connection(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()

    async def one(p_: object, i: int) -> bytes:
        tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
        message = f"tunnel {i} ".encode() * 1000
        tunnel.write(message)
        tunnel.write_eof()
        received = bytearray()
        while data := await tunnel.read():
            received += data
        assert bytes(received) == message
        return bytes(received)

    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            results = await asyncio.wait_for(asyncio.gather(*(one(p, i) for i in range(50))), WAIT)
            assert len(results) == 50
            assert p.stats.dials == 1
            assert echo.connections == 50
    finally:
        await echo.close()


async def test_certificate_provider_may_wait_and_may_fail(pki: Pki) -> None:
    """Connections are held until the listener's certificate exists; without one they are refused."""
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    ready = asyncio.Event()
    broken = False

    async def provider() -> WorkloadCertificate:
        if broken:
            raise HboneError("no certificate for this workload yet")
        await ready.wait()
        return server_cert

    server = HboneServer(provider, echo_handler(echo))
    sock = listening_socket("127.0.0.2")
    address = sock.getsockname()[:2]
    try:
        server.serve(sock)
        async with pool() as p:
            connecting = asyncio.ensure_future(
                p.connect(client_cert, [server_cert.identity], address, "127.0.0.1:9")
            )
            await asyncio.sleep(0.1)
            assert not connecting.done()
            ready.set()
            tunnel = await asyncio.wait_for(connecting, WAIT)
            assert not tunnel.closed
            tunnel.close()
            broken = True
            async with pool() as other:
                with pytest.raises(HboneConnectionError):
                    await other.connect(pki.issue("ns3", "c"), [server_cert.identity], address, "127.0.0.1:9")
        assert server.stats.connections_refused["no_certificate"] == 1
    finally:
        await server.close()
        await echo.close()
