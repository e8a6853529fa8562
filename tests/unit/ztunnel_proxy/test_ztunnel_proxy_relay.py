"""The plain TCP relay (both directions, half-close, bounded memory, errors) and RST refusal, on
loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from ztunnel.proxy import RelayResult, refuse, relay

WAIT = 5.0


async def connected_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection on 127.0.0.1 (non-blocking)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, listener.getsockname())
        server, _ = await loop.sock_accept(listener)
    server.setblocking(False)
    return client, server


@contextlib.asynccontextmanager
async def relayed() -> AsyncIterator[tuple[socket.socket, socket.socket, asyncio.Task[RelayResult]]]:
    """client <-> [a relay b] <-> upstream; yields (client, upstream, relay task)."""
    client, a = await connected_pair()
    b, upstream = await connected_pair()
    task: asyncio.Task[RelayResult] = asyncio.ensure_future(relay(a, b, chunk=1024))
    try:
        yield client, upstream, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        client.close()
        upstream.close()


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    async with asyncio.timeout(WAIT):
        while data := await loop.sock_recv(sock, 65536):
            chunks.append(data)
    return b"".join(chunks)


async def test_bytes_flow_both_ways_with_half_close() -> None:
    loop = asyncio.get_running_loop()
    async with relayed() as (client, upstream, task):
        request = bytes(range(256)) * 400  # 100 KiB: many chunks of 1 KiB
        await loop.sock_sendall(client, request)
        client.shutdown(socket.SHUT_WR)
        assert await read_all(upstream) == request, "EOF reached the upstream after the data"
        # The other direction still works after the client's half-close.
        await loop.sock_sendall(upstream, b"response")
        upstream.shutdown(socket.SHUT_WR)
        assert await read_all(client) == b"response"
        result = await asyncio.wait_for(task, WAIT)
        assert result.a_to_b == len(request)
        assert result.b_to_a == len(b"response")
        assert result.error is None


async def test_a_reset_ends_the_relay_with_an_error_and_closes_both_sides() -> None:
    async with relayed() as (client, upstream, task):
        refuse(upstream)
        result = await asyncio.wait_for(task, WAIT)
        assert result.error is not None or result.b_to_a == 0
        with pytest.raises(OSError):
            async with asyncio.timeout(WAIT):
                data = await asyncio.get_running_loop().sock_recv(client, 10)
                if data == b"":
                    raise ConnectionResetError("closed")


async def test_a_slow_reader_stalls_the_relay_instead_of_buffering() -> None:
    loop = asyncio.get_running_loop()
    async with relayed() as (client, _upstream, task):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        payload = b"x" * 65536
        # The upstream never reads: after the socket buffers fill, the sender is stalled.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                for _ in range(1000):  # bounded: 64 MiB at most
                    await loop.sock_sendall(client, payload)
                    sent += len(payload)
        assert sent < 64 * 1024 * 1024, "the relay must not absorb unbounded data"
        assert not task.done()


async def test_cancelling_the_relay_resets_both_sides() -> None:
    async with relayed() as (client, upstream, task):
        await asyncio.sleep(0.01)  # let the relay start its copy loops
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for sock in (client, upstream):
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(WAIT):
                    await asyncio.get_running_loop().sock_recv(sock, 10)


async def test_refuse_sends_an_rst() -> None:
    client, server = await connected_pair()
    try:
        refuse(server)
        assert server.fileno() == -1
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT):
                await asyncio.get_running_loop().sock_recv(client, 10)
    finally:
        client.close()


def test_chunk_must_be_positive() -> None:
    async def run() -> None:
        a, b = await connected_pair()
        try:
            with pytest.raises(ValueError):
                await relay(a, b, chunk=0)
        finally:
            a.close()
            b.close()

    asyncio.run(run())
