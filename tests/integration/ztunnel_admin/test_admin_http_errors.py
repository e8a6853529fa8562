"""The admin servers' HTTP edge cases (loom.httpserver), over raw sockets on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from loom.httpserver import HttpServer, Limits, Request, Response, parse_target, route
from ztunnel.admin import AdminServer, AdminSources

pytestmark = pytest.mark.timeout(30)


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes (bounded by a timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture
async def admin() -> AsyncIterator[AdminServer]:
    server = AdminServer(AdminSources(), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, id="unknown path"),
        pytest.param(b"DELETE /logging HTTP/1.1\r\nHost: x\r\n\r\n", 405, id="known path, wrong method"),
        pytest.param(b"not http at all\r\n\r\n", 400, id="garbage request line"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40000 + b"\r\n\r\n", 431, id="oversized headers"
        ),
        pytest.param(
            b"POST /logging?reset HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n" + b"a" * 9000,
            413,
            id="oversized body",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 200, id="index"),
    ],
)
async def test_status_for_request(admin: AdminServer, raw: bytes, status: int) -> None:
    response = await exchange(admin.port, raw)
    assert status_of(response) == status
    assert b"\r\nconnection: close\r\n" in response.lower()


async def test_405_names_the_allowed_methods(admin: AdminServer) -> None:
    response = await exchange(admin.port, b"PUT /logging HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"\r\nAllow: GET, POST\r\n" in response


async def test_a_failing_handler_is_500_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: Request) -> Response:
        raise ValueError("boom")

    async def fine(request: Request) -> Response:
        return Response(200, f"{request.method} {request.path} {dict(request.query)}\n")

    server = HttpServer("test", "127.0.0.1", 0, [("GET", "/broken", broken), ("GET", "/fine", fine)])
    await server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="loom.http"):
            response = await exchange(server.port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 500
        assert any("test handler failed" in r.getMessage() for r in caplog.records)
        response = await exchange(server.port, b"GET /fi%6Ee?a=1&b&a=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.endswith(b"\r\n\r\nGET /fine {'a': '1', 'b': ''}\n")
    finally:
        await server.stop()


async def test_a_stalled_client_is_dropped_after_the_timeout() -> None:
    async def fine(request: Request) -> Response:
        return Response(200, "ok\n")

    server = HttpServer("test", "127.0.0.1", 0, [("GET", "/", fine)], limits=Limits(timeout=0.2))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\n")  # and never finish the headers
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.stop()


async def test_stop_closes_open_connections() -> None:
    async def fine(request: Request) -> Response:
        return Response(200, "ok\n")

    server = HttpServer("test", "127.0.0.1", 0, [("GET", "/", fine)])
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # let the server accept it
    await asyncio.wait_for(server.stop(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_route_and_target_parsing() -> None:
    async def handler(request: Request) -> Response:
        return Response()

    routes = [("GET", "/a", handler), ("POST", "/a", handler)]
    assert route(routes, "GET", "/a") is handler
    missing = route(routes, "GET", "/b")
    assert isinstance(missing, Response) and missing.status == 404
    wrong = route(routes, "PUT", "/a")
    assert isinstance(wrong, Response) and wrong.status == 405
    assert list(wrong.headers) == [("Allow", "GET, POST")]
    assert parse_target("/logging?level=a%3Adebug&reset") == ("/logging", {"level": "a:debug", "reset": ""})
    assert parse_target("/") == ("/", {})
