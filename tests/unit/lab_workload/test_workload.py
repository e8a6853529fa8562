"""The lab's built-in workload: pure cores table-driven, the server over real loopback sockets with
independent clients (h11, h2, curl, grpcio), and the `call` client against the server."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import pytest
from google.protobuf import empty_pb2, unknown_fields
from hypothesis import given
from hypothesis import strategies as st

from loom.lab.workload import (
    GRPC_HEALTH_CHECK,
    H2_PREFACE,
    HEALTH_SERVING,
    MAX_DELAY_MS,
    CallOptions,
    CallTarget,
    GrpcFrameError,
    Limits,
    Protocol,
    Reply,
    WorkloadServer,
    decode_grpc_messages,
    decode_health_request,
    decode_health_response,
    detect_protocol,
    encode_grpc_message,
    encode_health_request,
    encode_health_response,
    headers_as_dict,
    main,
    parse_call_url,
    plan_reply,
    run_calls,
    serve_config,
)
from loom.testing.waiting import eventually

LOOPBACK = "127.0.0.1"
TIMEOUT = 5.0

# ---------------------------------------------------------------------------------------------------
# Pure cores


@pytest.mark.parametrize(
    ("prefix", "final", "expected"),
    [
        pytest.param(H2_PREFACE, False, Protocol.HTTP2, id="whole h2 preface"),
        pytest.param(H2_PREFACE + b"\x00\x00\x00\x04", False, Protocol.HTTP2, id="preface and a frame"),
        pytest.param(H2_PREFACE[:10], False, None, id="part of the preface waits"),
        pytest.param(H2_PREFACE[:10], True, Protocol.TCP_ECHO, id="part of the preface then silence"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False, Protocol.HTTP1, id="http/1.1 request"),
        pytest.param(b"POST /x?y=1 HTTP/1.0\n", False, Protocol.HTTP1, id="http/1.0 with bare LF"),
        pytest.param(b"GET / HTTP/1.1", False, None, id="request line without its end waits"),
        pytest.param(b"GET / HTTP/1.1", True, Protocol.TCP_ECHO, id="request line never finished"),
        pytest.param(b"GE", False, None, id="a method prefix waits"),
        pytest.param(b"hello\n", False, Protocol.TCP_ECHO, id="a text line is echo"),
        pytest.param(b"hello world\n", False, Protocol.TCP_ECHO, id="two words are echo"),
        pytest.param(b"GET / HTTP/2.0\r\n", False, Protocol.TCP_ECHO, id="other http version is echo"),
        pytest.param(b"\x16\x03\x01\x02\x00", False, Protocol.TCP_ECHO, id="tls client hello is echo"),
        pytest.param(b"\x00\x01", False, Protocol.TCP_ECHO, id="binary is echo"),
        pytest.param(b"GET  / HTTP/1.1\r\n", False, Protocol.TCP_ECHO, id="double space is echo"),
        pytest.param(b"A" * 9000, False, Protocol.TCP_ECHO, id="over-long first line is echo"),
        pytest.param(b"", True, Protocol.TCP_ECHO, id="nothing at all is echo"),
    ],
)
def test_detect_protocol(prefix: bytes, final: bool, expected: Protocol | None) -> None:
    assert detect_protocol(prefix, final=final) is expected


@given(st.binary(max_size=200))
def test_detect_protocol_always_decides_when_final(prefix: bytes) -> None:
    assert detect_protocol(prefix, final=True) is not None


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        pytest.param("GET", "/", Reply(200, 0.0), id="plain"),
        pytest.param("GET", "/status/503", Reply(503, 0.0), id="status path"),
        pytest.param("POST", "/status/204/", Reply(204, 0.0), id="status path with slash"),
        pytest.param("GET", "/status/200?delay_ms=250", Reply(200, 0.25), id="status and delay"),
        pytest.param("GET", "/x?delay_ms=99999999", Reply(200, MAX_DELAY_MS / 1000), id="delay bounded"),
        pytest.param("GET", "/x?a=1&delay_ms=5&delay_ms=7", Reply(200, 0.005), id="first delay wins"),
        pytest.param("GET", "/statusx", Reply(200, 0.0), id="not the status path"),
    ],
)
def test_plan_reply(method: str, target: str, expected: Reply) -> None:
    assert plan_reply(method, target) == expected


@pytest.mark.parametrize(
    ("method", "target", "status", "mentions"),
    [
        pytest.param("GET", "/status/99", 400, "200 to 599", id="status below range"),
        pytest.param("GET", "/status/600", 400, "200 to 599", id="status above range"),
        pytest.param("GET", "/status/abc", 400, "/status/abc", id="status not a number"),
        pytest.param("GET", "/status", 400, "/status", id="status without code"),
        pytest.param("GET", "/?delay_ms=-5", 400, "delay_ms='-5'", id="negative delay"),
        pytest.param("GET", "/?delay_ms=1.5", 400, "whole number", id="fractional delay"),
        pytest.param("GET", "/?" + "&".join(f"k{i}=v" for i in range(80)), 400, "64", id="too many params"),
        pytest.param("CONNECT", "example:443", 405, "CONNECT", id="connect refused"),
    ],
)
def test_plan_reply_refusals(method: str, target: str, status: int, mentions: str) -> None:
    reply = plan_reply(method, target)
    assert reply.status == status
    assert mentions in reply.error


def test_headers_as_dict_joins_repeats_and_drops_pseudo_headers() -> None:
    pairs = [(b":path", b"/"), (b"Accept", b"a"), (b"accept", b"b"), (b"X-Name", b"caf\xc3\xa9")]
    assert headers_as_dict(pairs) == {"accept": "a, b", "x-name": "café"}


def test_grpc_frames_round_trip() -> None:
    body = encode_grpc_message(b"abc") + encode_grpc_message(b"") + encode_grpc_message(b"\x00" * 300)
    assert decode_grpc_messages(body) == [b"abc", b"", b"\x00" * 300]


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        pytest.param(b"\x00\x00\x00", "truncated", id="short header"),
        pytest.param(b"\x00\x00\x00\x00\x05ab", "declares 5 bytes", id="short message"),
        pytest.param(b"\x01\x00\x00\x00\x00", "compressed", id="compressed flag"),
        pytest.param(b"\x07\x00\x00\x00\x00", "flag byte 7", id="bad flag"),
    ],
)
def test_grpc_frame_errors(body: bytes, mentions: str) -> None:
    with pytest.raises(GrpcFrameError, match=mentions):
        decode_grpc_messages(body)


@given(st.binary(max_size=64))
def test_grpc_frame_decoder_only_raises_its_error(body: bytes) -> None:
    try:
        messages = decode_grpc_messages(body)
    except GrpcFrameError:
        return
    assert b"".join(encode_grpc_message(m) for m in messages) == body


def test_health_response_is_field_1_varint_serving_per_protobufs_own_parser() -> None:
    wire = encode_health_response(HEALTH_SERVING)
    assert wire == b"\x08\x01"
    # Read back with protobuf's generic wire parser (unknown fields of an empty message), not with the
    # message class that produced it.
    fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(wire))
    decoded = [(fields[i].field_number, fields[i].wire_type, fields[i].data) for i in range(len(fields))]
    assert decoded == [(1, 0, HEALTH_SERVING)]  # field 1, wire type 0 (varint), value 1
    assert decode_health_response(wire) == HEALTH_SERVING


def test_health_request_round_trip_and_garbage() -> None:
    assert encode_health_request("") == b""
    assert decode_health_request(encode_health_request("reviews")) == "reviews"
    with pytest.raises(ValueError, match="HealthCheckRequest"):
        decode_health_request(b"\x0a\x05ab")  # a string field that claims 5 bytes and has 2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://reviews:9080/a?b=1", CallTarget("http", "reviews", 9080, "/a?b=1"), id="http"),
        pytest.param("http://reviews", CallTarget("http", "reviews", 80, "/"), id="http default port"),
        pytest.param("http://[::1]:8080/", CallTarget("http", "::1", 8080, "/"), id="ipv6"),
        pytest.param("grpc://10.0.0.1:50051", CallTarget("grpc", "10.0.0.1", 50051), id="grpc"),
        pytest.param("tcp://db:5432/", CallTarget("tcp", "db", 5432), id="tcp"),
    ],
)
def test_parse_call_url(url: str, expected: CallTarget) -> None:
    assert parse_call_url(url) == expected


@pytest.mark.parametrize(
    ("url", "mentions"),
    [
        pytest.param("ftp://a:1", "http://, grpc:// or tcp://", id="scheme"),
        pytest.param("grpc://a", "needs a port", id="grpc without port"),
        pytest.param("tcp://a:99999", "port", id="port out of range"),
        pytest.param("http://a:0/", "port", id="port zero"),
        pytest.param("tcp://a:1/path", "no path", id="tcp with path"),
        pytest.param("http://:80/", "no host", id="no host"),
    ],
)
def test_parse_call_url_errors(url: str, mentions: str) -> None:
    with pytest.raises(ValueError, match=mentions):
        parse_call_url(url)


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        pytest.param({"count": 0}, "count=0", id="count zero"),
        pytest.param({"count": 100_001}, "count=100001", id="count too high"),
        pytest.param({"timeout": 0}, "timeout=0", id="timeout zero"),
        pytest.param({"expect_status": 42}, "expect_status=42", id="bad status"),
    ],
)
def test_call_options_errors(changes: dict[str, Any], mentions: str) -> None:
    with pytest.raises(ValueError, match=mentions):
        CallOptions(target=CallTarget("http", "a", 80), **changes)


def test_call_options_expect_pod_needs_a_protocol_that_names_pods() -> None:
    with pytest.raises(ValueError, match="--expect-pod"):
        CallOptions(target=CallTarget("tcp", "a", 1), expect_pod="x")


def _serve_args(**overrides: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "port": [],
        "pod": "",
        "namespace": "",
        "host": "",
        "log_level": "",
        "max_connections": 1024,
        "idle_timeout": 60.0,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_serve_config_arguments_win_over_environment() -> None:
    env = {"LOOM_WORKLOAD_POD": "env-pod", "LOOM_WORKLOAD_PORTS": "1,2", "LOOM_WORKLOAD_NAMESPACE": "env-ns"}
    config = serve_config(_serve_args(pod="arg-pod", port=["9080", "9080", "9443"]), env)
    assert (config.pod, config.namespace, config.ports) == ("arg-pod", "env-ns", (9080, 9443))


def test_serve_config_environment_and_defaults() -> None:
    config = serve_config(_serve_args(), {"LOOM_WORKLOAD_PORTS": "80, 81", "POD_NAME": "downward"})
    assert (config.pod, config.namespace, config.ports, config.host) == (
        "downward",
        "default",
        (80, 81),
        "0.0.0.0",
    )
    assert serve_config(_serve_args(pod="p"), {}).ports == (8080,)


@pytest.mark.parametrize(
    ("overrides", "env", "mentions"),
    [
        pytest.param({"port": ["http"]}, {}, "--port: 'http'", id="port not a number"),
        pytest.param(
            {}, {"LOOM_WORKLOAD_PORTS": "70000"}, "LOOM_WORKLOAD_PORTS: '70000'", id="env port range"
        ),
        pytest.param({"log_level": "loud"}, {}, "loud", id="log level"),
        pytest.param({"max_connections": 0}, {}, "max_connections", id="limits"),
    ],
)
def test_serve_config_errors(overrides: dict[str, Any], env: dict[str, str], mentions: str) -> None:
    with pytest.raises(ValueError, match=re.escape(mentions)):
        serve_config(_serve_args(pod="p", **overrides), env)


# ---------------------------------------------------------------------------------------------------
# The server over loopback


@asynccontextmanager
async def running(limits: Limits | None = None, ports: int = 1) -> AsyncIterator[WorkloadServer]:
    server = WorkloadServer("pod-a", "ns1", [0] * ports, host=LOOPBACK, limits=limits)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        yield reader, writer
    finally:
        writer.close()


@dataclass
class H1Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def document(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


async def h1_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client: h11.Connection,
    request: h11.Request,
    body_chunks: tuple[bytes, ...] = (),
) -> H1Response:
    writer.write(client.send(request) or b"")
    for chunk in body_chunks:
        writer.write(client.send(h11.Data(data=chunk)) or b"")
    writer.write(client.send(h11.EndOfMessage()) or b"")
    await writer.drain()
    status, headers, body = 0, {}, bytearray()
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, headers_as_dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return H1Response(status, headers, bytes(body))
            else:
                raise AssertionError(f"unexpected {event!r}")


async def test_http1_keep_alive_chunked_body_and_connection_close() -> None:
    async with running() as server, connection(server.ports[0]) as (reader, writer):
        client = h11.Connection(h11.CLIENT)
        first = await h1_exchange(
            reader, writer, client, h11.Request(method="GET", target="/one?x=1", headers=[("Host", "svc")])
        )
        assert first.status == 200
        assert first.headers["x-loom-pod"] == "ns1/pod-a"
        document = first.document
        assert document["pod"] == "pod-a"
        assert document["namespace"] == "ns1"
        assert document["method"] == "GET"
        assert document["path"] == "/one?x=1"
        assert document["protocol"] == "HTTP/1.1"
        assert document["headers"]["host"] == "svc"
        local_port = writer.get_extra_info("sockname")[1]
        assert document["peer"] == f"{LOOPBACK}:{local_port}"

        client.start_next_cycle()
        # No content-length: h11 sends the body chunked.
        chunked = h11.Request(
            method="POST", target="/two", headers=[("Host", "svc"), ("Transfer-Encoding", "chunked")]
        )
        second = await h1_exchange(reader, writer, client, chunked, (b"a" * 1000, b"b" * 2345, b"c"))
        assert second.document["body_bytes"] == 3346
        assert second.document["headers"]["transfer-encoding"] == "chunked"
        assert second.document["peer"] == document["peer"]  # the same connection was kept

        client.start_next_cycle()
        closing = h11.Request(
            method="GET", target="/three", headers=[("Host", "svc"), ("Connection", "close")]
        )
        third = await h1_exchange(reader, writer, client, closing)
        assert third.status == 200
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""  # the server closed its side


async def test_http1_status_delay_head_and_every_port() -> None:
    async with running(ports=2) as server:
        assert len(set(server.ports)) == 2
        for port in server.ports:
            async with connection(port) as (reader, writer):
                client = h11.Connection(h11.CLIENT)
                loop = asyncio.get_running_loop()
                started = loop.time()
                request = h11.Request(method="GET", target="/status/503?delay_ms=50", headers=[("Host", "a")])
                response = await h1_exchange(reader, writer, client, request)
                assert loop.time() - started >= 0.05
                assert response.status == 503
                assert response.document["status"] == 503
                client.start_next_cycle()
                head = await h1_exchange(
                    reader, writer, client, h11.Request(method="HEAD", target="/", headers=[("Host", "a")])
                )
                assert head.status == 200
                assert head.body == b""
                assert int(head.headers["content-length"]) > 0
                client.start_next_cycle()
                no_content = await h1_exchange(
                    reader,
                    writer,
                    client,
                    h11.Request(method="GET", target="/status/204", headers=[("Host", "a")]),
                )
                assert (no_content.status, no_content.body) == (204, b"")
        assert server.stats.requests == 6


async def test_http1_expect_100_continue() -> None:
    async with running() as server, connection(server.ports[0]) as (reader, writer):
        writer.write(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        client = h11.Connection(h11.CLIENT)
        # Let h11 know the request that was sent by hand, then read the final response with it.
        client.send(h11.Request(method="PUT", target="/up", headers=[("Host", "a"), ("Content-Length", "5")]))
        client.send(h11.Data(data=b"hello"))
        client.send(h11.EndOfMessage())
        writer.write(b"hello")
        await writer.drain()
        response = await h1_exchange_read(reader, client)
        assert response.document["body_bytes"] == 5


async def h1_exchange_read(reader: asyncio.StreamReader, client: h11.Connection) -> H1Response:
    status, headers, body = 0, {}, bytearray()
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, headers_as_dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return H1Response(status, headers, bytes(body))


async def raw_http1(port: int, request: bytes, *, half_close: bool = False) -> bytes:
    async with connection(port) as (reader, writer):
        writer.write(request)
        if half_close:
            writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()  # every error answer closes the connection


async def test_http1_bad_requests_are_answered_and_closed() -> None:
    async with running(Limits(max_header_bytes=1024)) as server:
        port = server.ports[0]
        too_big = await raw_http1(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 4000 + b"\r\n\r\n")
        assert too_big.startswith(b"HTTP/1.1 431 ")
        malformed = await raw_http1(port, b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n")
        assert malformed.startswith(b"HTTP/1.1 400 ")
        assert b"ns1/pod-a" in malformed
        cut = await raw_http1(
            port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc", half_close=True
        )
        assert cut.startswith(b"HTTP/1.1 400 ")  # the body ended 7 bytes early
        # The server is unharmed.
        ok = await raw_http1(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")


@dataclass
class H2Result:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    order: int = 0

    @property
    def document(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


class H2Client:
    """A test HTTP/2 client on the h2 library: several streams, explicit flow control."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial_window: int = 65535
    ) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window}
        )
        self.conn.initiate_connection()
        self.results: dict[int, H2Result] = {}
        self.finished = 0
        self.terminated: h2.events.ConnectionTerminated | None = None

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    def request(
        self, method: str, path: str, extra: tuple[tuple[str, str], ...] = (), body: bool = False
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":authority", "wl"), (":path", path), *extra]
        self.conn.send_headers(stream_id, headers, end_stream=not body)
        self.results[stream_id] = H2Result()
        return stream_id

    async def send_body(self, stream_id: int, data: bytes) -> None:
        """Send within the server's windows, reading (and so learning of window updates) as needed."""
        offset = 0
        while offset < len(data):
            size = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
                len(data) - offset,
            )
            if size == 0:
                await self.flush()
                await self.read_once()
                continue
            self.conn.send_data(stream_id, data[offset : offset + size])
            offset += size
        self.conn.end_stream(stream_id)
        await self.flush()

    async def read_once(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionError("server closed")
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
                continue
            result = self.results.get(getattr(event, "stream_id", 0) or 0)
            if result is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                result.headers = dict(event.headers or ())  # type: ignore[arg-type]
            elif isinstance(event, h2.events.TrailersReceived):
                result.trailers = dict(event.headers or ())  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                result.body += event.data or b""
                # Hand the window back slowly: one acknowledgement per frame keeps the server waiting.
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
            elif isinstance(event, h2.events.StreamEnded):
                self.finished += 1
                result.ended, result.order = True, self.finished
        await self.flush()

    async def until_done(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not all(r.ended for r in self.results.values()):
                await self.read_once()


async def test_http2_concurrent_streams_bodies_and_flow_control() -> None:
    async with running() as server, connection(server.ports[0]) as (reader, writer):
        # A 16-byte window: the server must split each answer and wait for window updates.
        client = H2Client(reader, writer, initial_window=16)
        slow = client.request("GET", "/slow?delay_ms=300")
        upload = client.request("POST", "/upload", (("content-type", "application/octet-stream"),), body=True)
        fast = client.request("GET", "/status/201", (("x-test", "yes"),))
        await client.flush()
        # Larger than the default 65,535-byte window: the server must acknowledge as it counts.
        await client.send_body(upload, b"z" * 200_000)
        await client.until_done()
        results = client.results
        assert results[fast].order < results[slow].order  # streams are answered independently
        assert results[fast].headers[":status"] == "201"
        assert results[fast].headers["x-loom-pod"] == "ns1/pod-a"
        assert results[fast].document["headers"]["x-test"] == "yes"
        assert results[fast].document["protocol"] == "HTTP/2"
        assert results[fast].document["authority"] == "wl"
        assert results[upload].document["body_bytes"] == 200_000
        assert results[upload].document["method"] == "POST"
        assert results[slow].document["path"] == "/slow?delay_ms=300"
        assert int(results[slow].headers["content-length"]) == len(results[slow].body)


async def test_http2_protocol_error_gets_goaway_and_server_survives() -> None:
    async with running() as server:
        async with connection(server.ports[0]) as (reader, writer):
            # The preface, then a frame that is not a SETTINGS frame.
            writer.write(H2_PREFACE + b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"\x00" * 8)
            await writer.drain()
            received = bytearray()
            async with asyncio.timeout(TIMEOUT):
                while chunk := await reader.read(65536):
                    received += chunk
            assert b"\x07\x00\x00\x00\x00\x00" in received  # a GOAWAY frame header (type 7, stream 0)
        async with connection(server.ports[0]) as (reader, writer):
            client = H2Client(reader, writer)
            stream = client.request("GET", "/after")
            await client.flush()
            await client.until_done()
            assert client.results[stream].headers[":status"] == "200"


def _curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


async def run_curl(*args: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        _curl(), "--silent", "--show-error", "--max-time", "5", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(10):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def test_curl_http2_prior_knowledge_and_http1_chunked_upload() -> None:
    async with running() as server:
        url = f"http://{LOOPBACK}:{server.ports[0]}/curl?q=1"
        code, out, err = await run_curl("--http2-prior-knowledge", "--data-binary", "x" * 70_000, url)
        assert code == 0, err
        document = json.loads(out)
        assert (document["protocol"], document["method"], document["body_bytes"]) == (
            "HTTP/2",
            "POST",
            70_000,
        )
        code, out, err = await run_curl(
            "--http1.1", "-H", "Transfer-Encoding: chunked", "--data-binary", "y" * 5000, "-D", "-", url
        )
        assert code == 0, err
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"x-loom-pod: ns1/pod-a" in head
        document = json.loads(body)
        assert (document["protocol"], document["body_bytes"]) == ("HTTP/1.1", 5000)
        assert document["headers"]["transfer-encoding"] == "chunked"


async def test_grpc_health_check_with_grpcio() -> None:
    async with running() as server, grpc.aio.insecure_channel(f"{LOOPBACK}:{server.ports[0]}") as channel:
        check = channel.unary_unary(
            GRPC_HEALTH_CHECK, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
        )
        call = check(encode_health_request("reviews"), timeout=TIMEOUT)
        answer = await call
        assert answer == b"\x08\x01"  # HealthCheckResponse{status: SERVING}
        assert await call.code() == grpc.StatusCode.OK
        metadata = await call.initial_metadata()
        assert ("x-loom-pod", "ns1/pod-a") in list(metadata or ())
        assert await check(b"", timeout=TIMEOUT) == b"\x08\x01"

        watch = channel.unary_unary(
            "/grpc.health.v1.Health/Watch",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
            await watch(b"", timeout=TIMEOUT)
        assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED

        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await check(b"\x0a\x05ab", timeout=TIMEOUT)
        assert garbage.value.code() == grpc.StatusCode.INTERNAL
        assert "HealthCheckRequest" in (garbage.value.details() or "")


async def test_grpc_request_over_the_message_limit_is_resource_exhausted() -> None:
    async with (
        running(Limits(max_grpc_message_bytes=100)) as server,
        grpc.aio.insecure_channel(f"{LOOPBACK}:{server.ports[0]}") as channel,
    ):
        check = channel.unary_unary(
            GRPC_HEALTH_CHECK, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await check(encode_health_request("s" * 500), timeout=TIMEOUT)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_tcp_echo_silent_client_partial_request_line_and_half_close() -> None:
    async with running(Limits(detect_timeout=0.05)) as server:
        async with connection(server.ports[0]) as (reader, writer):
            # A client that sends nothing gets nothing: echo has nothing to say yet.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await reader.read(1)
            writer.write(b"hello\n")
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                assert await reader.readexactly(6) == b"hello\n"
            blob = bytes(range(256)) * 400
            writer.write(blob)
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                assert await reader.readexactly(len(blob)) == blob
            writer.write_eof()
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b""  # the server ends its side in turn
        async with connection(server.ports[0]) as (reader, writer):
            # Looks like the start of a request line, then stops: echoed after the detection bound.
            writer.write(b"GET /x")
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                assert await reader.readexactly(6) == b"GET /x"


async def test_connection_limit_and_idle_timeout() -> None:
    async with running(Limits(max_connections=2, idle_timeout=0.2)) as server:
        port = server.ports[0]
        async with connection(port) as (r1, w1), connection(port) as (r2, w2):
            for reader, writer in ((r1, w1), (r2, w2)):
                writer.write(b"ping\n")
                await writer.drain()
                async with asyncio.timeout(TIMEOUT):
                    assert await reader.readexactly(5) == b"ping\n"
            async with connection(port) as (r3, _w3):
                async with asyncio.timeout(TIMEOUT):
                    assert await r3.read() == b""  # refused: closed at once
            assert server.stats.refused == 1
            async with asyncio.timeout(TIMEOUT):
                assert await r1.read() == b""  # silent for longer than the idle timeout
                assert await r2.read() == b""
        await eventually(lambda: server.active_connections == 0, what="every connection closed")
        async with connection(port) as (reader, writer):
            writer.write(b"again\n")
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                assert await reader.readexactly(6) == b"again\n"


async def test_stop_closes_open_connections() -> None:
    server = WorkloadServer("pod-a", "ns1", [0], host=LOOPBACK)
    await server.start()
    async with connection(server.ports[0]) as (reader, writer):
        writer.write(b"x\n")
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            await reader.readexactly(2)
        await server.stop()
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
    assert server.active_connections == 0


async def test_start_fails_cleanly_when_a_port_is_taken() -> None:
    async with running() as taken:
        second = WorkloadServer("pod-b", "ns1", [0, taken.ports[0]], host=LOOPBACK)
        with pytest.raises(OSError):
            await second.start()
        assert second.ports == []


# ---------------------------------------------------------------------------------------------------
# The call client


def lines_of(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines()]


@pytest.mark.parametrize(
    ("url_template", "http2"),
    [
        pytest.param("http://{host}:{port}/c?delay_ms=1", False, id="http1"),
        pytest.param("http://{host}:{port}/c", True, id="http2"),
        pytest.param("grpc://{host}:{port}", False, id="grpc"),
        pytest.param("tcp://{host}:{port}", False, id="tcp"),
    ],
)
async def test_call_succeeds_for_every_protocol(url_template: str, http2: bool) -> None:
    async with running() as server:
        target = parse_call_url(url_template.format(host="localhost", port=server.ports[0]))
        expect_pod = "" if target.scheme == "tcp" else "pod-"
        out = io.StringIO()
        code = await run_calls(CallOptions(target, count=3, http2=http2, expect_pod=expect_pod), out)
        lines = lines_of(out.getvalue())
        assert code == 0, out.getvalue()
        assert len(lines) == 4
        for number, line in enumerate(lines[:3], start=1):
            assert line["attempt"] == number
            assert line["ok"] is True
            assert line["address"] == f"{LOOPBACK}:{server.ports[0]}"
            if target.scheme != "tcp":
                assert (line["pod"], line["namespace"]) == ("pod-a", "ns1")
        assert lines[3]["summary"] is True
        assert (lines[3]["attempts"], lines[3]["succeeded"], lines[3]["failed"]) == (3, 3, 0)
        if target.scheme != "tcp":
            assert lines[3]["pods"] == {"ns1/pod-a": 3}


async def test_call_reports_failures() -> None:
    async with running() as server:
        port = server.ports[0]
        cases = [
            (
                CallOptions(parse_call_url(f"http://{LOOPBACK}:{port}/"), expect_pod="reviews"),
                "expected a pod",
            ),
            (CallOptions(parse_call_url(f"http://{LOOPBACK}:{port}/status/503")), "status 503"),
            (
                CallOptions(parse_call_url(f"http://{LOOPBACK}:{port}/?delay_ms=2000"), timeout=0.2),
                "no answer within 0.2 s",
            ),
        ]
        for options, mentions in cases:
            out = io.StringIO()
            assert await run_calls(options, out) == 1
            attempt = lines_of(out.getvalue())[0]
            assert attempt["ok"] is False
            assert mentions in attempt["error"]
        out = io.StringIO()
        expected = CallOptions(parse_call_url(f"http://{LOOPBACK}:{port}/status/503"), expect_status=503)
        assert await run_calls(expected, out) == 0
    # Nothing listens on the port any more.
    out = io.StringIO()
    assert await run_calls(CallOptions(parse_call_url(f"tcp://{LOOPBACK}:{port}")), out) == 1
    assert "cannot connect" in lines_of(out.getvalue())[0]["error"]


@pytest.mark.parametrize("host", ["no-such-host.invalid", "x" * 70 + ".invalid"])
async def test_call_reports_names_that_do_not_resolve(host: str) -> None:
    out = io.StringIO()
    options = CallOptions(parse_call_url(f"http://{host}:80/"), timeout=3)
    assert await run_calls(options, out) == 1
    assert f"cannot resolve {host!r}" in lines_of(out.getvalue())[0]["error"]


def test_main_rejects_bad_call_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["call", "tcp://a:1", "--expect-pod", "x"])
    assert exit_info.value.code == 2
    assert "--expect-pod" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The entry point as the lab runs it


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    return env


async def test_module_serve_and_call_processes() -> None:
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loom.lab.workload", "--pod", "proc-pod", "--namespace", "procns",
        "--port", "0", "--host", LOOPBACK, "--log-level", "debug",
        stderr=asyncio.subprocess.PIPE, env=_child_env(),
    )  # fmt: skip
    try:
        assert serve.stderr is not None
        async with asyncio.timeout(15):
            while True:
                line = (await serve.stderr.readline()).decode()
                assert line, "the workload exited before listening"
                found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if found:
                    port = int(found.group(1))
                    break
        call = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loom.lab.workload", "call", f"http://{LOOPBACK}:{port}/p", "--count", "2",
            "--expect-pod", "proc-", "-H", "x-extra: 1", stdout=asyncio.subprocess.PIPE, env=_child_env(),
        )  # fmt: skip
        async with asyncio.timeout(15):
            stdout, _ = await call.communicate()
        assert call.returncode == 0, stdout
        lines = lines_of(stdout.decode())
        assert [line.get("ok") for line in lines[:2]] == [True, True]
        assert lines[2]["pods"] == {"procns/proc-pod": 2}
        async with asyncio.timeout(15):
            debug_line = (await serve.stderr.readline()).decode()
        assert "GET /p -> 200" in debug_line  # one debug line per request
    finally:
        if serve.returncode is None:
            serve.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await serve.communicate()
    assert serve.returncode == 0
