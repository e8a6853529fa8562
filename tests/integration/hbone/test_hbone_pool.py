"""Connection pool: reuse, the per-connection stream cap, one dial per key, idle eviction, GOAWAY,
connect timeouts and keepalive."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from loom.hbone import (
    CONNECT_TIMEOUT_HINT,
    ClientLimits,
    Decision,
    HboneConnectionError,
    HboneConnectTimeout,
    ServerLimits,
    Tunnel,
    TunnelRequest,
)
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import (
    WAIT,
    Pki,
    echo_handler,
    pool,
    running_server,
    start_echo,
    tcp_connector,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


async def echo_once(tunnel: Tunnel, message: bytes = b"ping") -> None:
    tunnel.write(message)
    assert await asyncio.wait_for(tunnel.read(), WAIT) == message


async def test_sequential_tunnels_reuse_one_connection(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            for _ in range(10):
                tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
                await echo_once(tunnel)
                tunnel.write_eof()
                assert await asyncio.wait_for(tunnel.read(), WAIT) == b""
                await asyncio.wait_for(tunnel.wait_closed(), WAIT)
            assert p.stats.dials == 1
            assert len(p.connections()) == 1
            # another source identity, or another expected set, is another pool key
            other = pki.issue("ns2", "other-client")
            tunnel = await p.connect(other, [server_cert.identity], sut.address, "127.0.0.1:9")
            tunnel.close()
            assert p.stats.dials == 2
    finally:
        await echo.close()


async def test_stream_cap_and_single_dial(pki: Pki) -> None:
    """150 concurrent tunnels on a fresh pool: dials happen one at a time per key, and no connection
    carries more than 100 streams."""
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    dial_count = 0
    in_flight = 0
    max_in_flight = 0

    async def counting_factory(next_hop: tuple[str, int], source_ip: str | None) -> socket.socket:
        nonlocal dial_count, in_flight, max_in_flight
        dial_count += 1
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await asyncio.sleep(0.05)  # a slow network: many callers arrive during the dial
            return await tcp_connector(next_hop)()
        finally:
            in_flight -= 1

    try:
        async with (
            running_server(server_cert, echo_handler(echo)) as sut,
            pool(socket_factory=counting_factory) as p,
        ):
            tunnels = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
                        for _ in range(150)
                    )
                ),
                WAIT,
            )
            connections = p.connections()
            assert dial_count == len(connections) == 2
            assert max_in_flight == 1
            assert sorted(len(c.channels) for c in connections) == [50, 100]
            await asyncio.gather(*(echo_once(t) for t in tunnels))
            for t in tunnels:
                t.close()
    finally:
        await echo.close()


async def test_server_stream_limit_lowers_pool_capacity(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    try:
        async with (
            running_server(
                server_cert, echo_handler(echo), limits=ServerLimits(max_concurrent_streams=10)
            ) as sut,
            pool() as p,
        ):
            first = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await echo_once(first)
            assert p.connections()[0].capacity == 10
            rest = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
                        for _ in range(24)
                    )
                ),
                WAIT,
            )
            assert len(p.connections()) == 3
            assert all(len(c.channels) <= 10 for c in p.connections())
            assert sut.server.stats.requests_rejected["too_many_streams"] == 0
            for t in [first, *rest]:
                t.close()
    finally:
        await echo.close()


async def test_idle_connections_are_evicted(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    try:
        async with (
            running_server(server_cert, echo_handler(echo)) as sut,
            pool(ClientLimits(idle_timeout=0.2)) as p,
        ):
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            (connection,) = p.connections()
            await asyncio.sleep(0.4)  # an open tunnel keeps its connection, however long
            assert not connection.closing
            await echo_once(tunnel)
            tunnel.close()
            await asyncio.wait_for(connection.closed, WAIT)
            assert connection.close_reason == "idle_timeout"
            assert p.connections() == []
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await echo_once(tunnel)
            tunnel.close()
            assert p.stats.dials == 2
            assert p.stats.connections_closed["idle_timeout"] == 1
    finally:
        await echo.close()


async def test_goaway_keeps_open_tunnels_and_stops_reuse(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            (server_connection,) = sut.server.connections
            (client_connection,) = p.connections()
            server_connection.drain()  # graceful GOAWAY: open streams may finish
            await eventually(lambda: client_connection.goaway_received is not None, within=WAIT)
            assert p.connections() == []
            # the open tunnel still works both ways after the GOAWAY
            await echo_once(tunnel, b"after goaway" * 1000)
            # a new tunnel goes over a new connection
            second = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await echo_once(second)
            assert p.stats.dials == 2
            tunnel.write_eof()
            assert await asyncio.wait_for(tunnel.read(), WAIT) == b""
            await asyncio.wait_for(tunnel.wait_closed(), WAIT)
            await asyncio.wait_for(client_connection.closed, WAIT)
            await asyncio.wait_for(server_connection.closed, WAIT)
            assert server_connection.close_reason == "drained"
            second.close()
    finally:
        await echo.close()


async def test_server_shutdown_drains_then_closes(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await echo_once(tunnel)
            shutdown = asyncio.ensure_future(sut.server.shutdown(grace=0.3))
            await asyncio.sleep(0.1)
            await echo_once(tunnel, b"still draining")  # within the grace period the tunnel works
            await asyncio.wait_for(shutdown, WAIT)
            assert sut.server.stats.connections_closed["drain_deadline"] == 1
            await asyncio.wait_for(tunnel.wait_closed(), WAIT)
            assert tunnel.error is not None
    finally:
        await echo.close()


async def test_connect_timeout_names_the_likely_cause(pki: Pki) -> None:
    client_cert = pki.issue("ns2", "client")

    async def black_hole(next_hop: tuple[str, int], source_ip: str | None) -> socket.socket:
        await asyncio.sleep(WAIT)  # like a SYN dropped by a NetworkPolicy
        raise AssertionError("not reached")

    async with pool(ClientLimits(connect_timeout=0.1), socket_factory=black_hole) as p:
        with pytest.raises(HboneConnectTimeout) as caught:
            await p.connect(client_cert, [client_cert.identity], ("127.0.0.9", 15008), "127.0.0.1:9")
    assert CONNECT_TIMEOUT_HINT in str(caught.value)
    assert "127.0.0.9:15008" in str(caught.value)
    assert p.stats.dial_failures["connect_timeout"] == 1


async def test_waiters_share_one_failed_dial(pki: Pki) -> None:
    client_cert = pki.issue("ns2", "client")
    dials = 0

    async def refusing(next_hop: tuple[str, int], source_ip: str | None) -> socket.socket:
        nonlocal dials
        dials += 1
        await asyncio.sleep(0.05)
        raise ConnectionRefusedError(111, "Connection refused")

    async with pool(socket_factory=refusing) as p:
        results = await asyncio.gather(
            *(
                p.connect(client_cert, [client_cert.identity], ("127.0.0.9", 15008), "127.0.0.1:9")
                for _ in range(5)
            ),
            return_exceptions=True,
        )
    assert all(isinstance(r, HboneConnectionError) for r in results)
    assert "Connection refused" in str(results[0])
    assert dials == 1


async def test_socket_factory_gets_next_hop_and_source_ip(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    seen: list[tuple[tuple[str, int], str | None]] = []
    peers: list[tuple[str, int]] = []

    async def factory(next_hop: tuple[str, int], source_ip: str | None) -> socket.socket:
        seen.append((next_hop, source_ip))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source_ip or "127.0.0.1", 0))
        await asyncio.get_running_loop().sock_connect(sock, next_hop)
        return sock

    async def handler(request: TunnelRequest) -> Decision:
        peers.append(request.remote_address)
        return Decision(200, tcp_connector(echo.address))

    try:
        async with running_server(server_cert, handler) as sut, pool(socket_factory=factory) as p:
            tunnel = await p.connect(
                client_cert, [server_cert.identity], sut.address, "127.0.0.1:9", source_ip="127.0.0.3"
            )
            await echo_once(tunnel)
            tunnel.close()
        assert seen == [(sut.address, "127.0.0.3")]
        assert peers[0][0] == "127.0.0.3"
    finally:
        await echo.close()


async def test_keepalive_pings_keep_a_quiet_connection_alive(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "client")
    echo = await start_echo()
    fast = {"keepalive_interval": 0.05, "keepalive_timeout": 1.0}
    try:
        async with (
            running_server(server_cert, echo_handler(echo), limits=ServerLimits(**fast)) as sut,  # type: ignore[arg-type]
            pool(ClientLimits(**fast)) as p,  # type: ignore[arg-type]
        ):
            tunnel = await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await asyncio.sleep(0.5)  # about ten keepalive rounds, all answered
            await echo_once(tunnel)
            assert sut.server.stats.connections_closed["keepalive_timeout"] == 0
            assert p.stats.connections_closed["keepalive_timeout"] == 0
            tunnel.close()
    finally:
        await echo.close()
