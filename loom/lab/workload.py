"""The lab's built-in workload: one small server for HTTP/1.1, HTTP/2, gRPC health and TCP echo, and the
`call` client that the demo and the tests point at it.

Theory of operation
-------------------
Every lab pod that is not told to run a command runs ``python -m loom.lab.workload serve --pod NAME
--namespace NS --port P ...``. It listens on every given port (8080 when none is given) and answers
whatever arrives, so that a Deployment of any sample (Bookinfo's ``productpage`` on 9080, a gRPC
service, a database port) is reachable with the protocol its clients speak, and every answer says which
pod produced it. That is what the demo and the tests need to see through the mesh: who answered, over
which protocol, with which request headers (the ones ztunnel or a waypoint added included).

*Protocol detection* (`detect_protocol`, pure) looks at the first bytes of a connection:

* the HTTP/2 connection preface (``PRI * HTTP/2.0``...) -> HTTP/2 with prior knowledge (h2);
* a first line ``TOKEN SP TARGET SP HTTP/1.x`` -> HTTP/1.1 (h11);
* anything else -> TCP echo.

The first bytes are awaited for as long as the idle timeout: a client that sends nothing is a TCP echo
client that has not spoken yet (echo has nothing to send before data arrives). Once bytes arrived, a
prefix that could still become a request line or the preface gets `Limits.detect_timeout` more to
complete; a client that stops in the middle of one is then echoed. The bytes read for detection are
handed to the protocol chosen, never lost.

*Answers.* HTTP (both versions) answers a JSON document `describe_request` with the pod, namespace,
method, target, request headers, peer address, protocol and the number of request-body bytes read
(chunked bodies included), and the header ``x-loom-pod: <namespace>/<pod>``. `plan_reply` (pure) turns
the request target into the status and delay: ``/status/<code>`` answers with that status (200-599;
the retry tests use it), ``?delay_ms=N`` waits N ms first (at most 10 s). HTTP/1.1 keeps connections
alive and honours ``Connection: close``; HTTP/2 serves concurrent streams, each in its own task, with
flow control in both directions (received data is acknowledged as it is counted; a response waits for
window updates). gRPC is HTTP/2 with ``content-type: application/grpc``: ``grpc.health.v1.Health/Check``
is answered SERVING (for any service name) with ``grpc-status: 0`` in the trailers; other methods get
UNIMPLEMENTED. The health messages are built with the protobuf library from a descriptor on first use
(`health_messages`), so pods that never see gRPC do not pay for importing protobuf.

*Bounds.* Header bytes (HTTP/1.1 request head, HTTP/2 header list), concurrent connections per process
(over the limit a connection is closed at once), concurrent HTTP/2 streams, gRPC message size, idle time
per connection, the detection wait, the reply delay. Each connection runs in its own task that catches
its own errors: no client can take the server down. One debug log line per request.

*The client* (``python -m loom.lab.workload call URL``) makes ``--count`` attempts, each on a new
connection (so that per-connection load balancing by ztunnel and Service VIPs shows in the pods that
answer), each bounded by ``--timeout``. ``http://`` speaks HTTP/1.1 (or HTTP/2 prior knowledge with
``--http2``), ``grpc://`` calls the health Check, ``tcp://`` sends a line and expects it echoed. Names
are resolved with the system resolver (`loop.getaddrinfo`), which inside a lab pod (``ip netns exec``)
reads the pod's resolv.conf and so the lab DNS. One JSON line per attempt, a summary line, exit status
0 only when every attempt succeeded.

Startup imports are kept to the standard library, h11 and h2: the lab starts one process per pod.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from http import HTTPStatus
from typing import Any, Final, TextIO
from urllib.parse import parse_qsl, quote, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

log = logging.getLogger("loom.lab.workload")

DEFAULT_PORT: Final = 8080
POD_HEADER: Final = "x-loom-pod"
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GRPC_HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse.ServingStatus values.
HEALTH_UNKNOWN: Final = 0
HEALTH_SERVING: Final = 1
# gRPC status codes used here (grpc/doc/statuscodes.md).
GRPC_OK: Final = 0
GRPC_RESOURCE_EXHAUSTED: Final = 8
GRPC_UNIMPLEMENTED: Final = 12
GRPC_INTERNAL: Final = 13
MAX_DELAY_MS: Final = 10_000
MAX_CALL_COUNT: Final = 100_000
# Environment variables (arguments take precedence). POD_NAME / POD_NAMESPACE are the downward-API
# names the lab also sets, accepted as fallbacks.
ENV_POD: Final = "LOOM_WORKLOAD_POD"
ENV_NAMESPACE: Final = "LOOM_WORKLOAD_NAMESPACE"
ENV_PORTS: Final = "LOOM_WORKLOAD_PORTS"
ENV_HOST: Final = "LOOM_WORKLOAD_HOST"
ENV_LOG_LEVEL: Final = "LOOM_WORKLOAD_LOG_LEVEL"
# A pod declares a handful of container ports; the bound keeps a typo from opening thousands.
MAX_PORTS: Final = 64

_READ_SIZE: Final = 64 * 1024
# Longest first line that detection waits for; h11 bounds the rest of the head.
_MAX_REQUEST_LINE: Final = 8 * 1024
# What the client keeps of a response body: the workload's answers are a few KiB.
_MAX_RESPONSE_BYTES: Final = 1024 * 1024
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TARGET_CHAR = rb"[\x21-\x7e\x80-\xff]"
_REQUEST_LINE = re.compile(_TCHAR + rb"+ " + _TARGET_CHAR + rb"+ HTTP/1\.[01]")
# A prefix of a request line that is not complete yet (no line end seen).
_REQUEST_LINE_START = re.compile(_TCHAR + rb"+(?: " + _TARGET_CHAR + rb"*(?: [HTP/.01]*\r?)?)?")
_STATUS_PATH = re.compile(r"/status/(\d{1,3})/?")
_SERVER_NAME: Final = "loom-lab-workload"


class Protocol(enum.Enum):
    HTTP1 = "HTTP/1.1"
    HTTP2 = "HTTP/2"
    TCP_ECHO = "tcp-echo"


def detect_protocol(prefix: bytes, *, final: bool) -> Protocol | None:
    """The protocol a connection speaks, from its first bytes; None while more bytes could change the
    answer. `final`: no more bytes will come in time (detection timeout or end of stream), decide now."""
    if prefix.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if not final and H2_PREFACE.startswith(prefix):
        return None
    line_end = prefix.find(b"\n", 0, _MAX_REQUEST_LINE + 1)
    if line_end >= 0:
        line = prefix[:line_end].removesuffix(b"\r")
        return Protocol.HTTP1 if _REQUEST_LINE.fullmatch(line) else Protocol.TCP_ECHO
    if final or len(prefix) > _MAX_REQUEST_LINE or not _REQUEST_LINE_START.fullmatch(prefix):
        return Protocol.TCP_ECHO
    return None


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-process bounds. The defaults fit a lab pod: generous for tests and demos, small enough that
    a misbehaving client cannot make the process buffer much."""

    # HTTP/1.1 request line + headers; HTTP/2 header list (advertised as SETTINGS_MAX_HEADER_LIST_SIZE).
    # Real requests carry well under 2 KiB even after a waypoint added its headers.
    max_header_bytes: int = 16 * 1024
    # Concurrent connections over all ports; one more is closed at once.
    max_connections: int = 1024
    # Seconds a connection may stay silent (no bytes from the client) before it is closed.
    idle_timeout: float = 60.0
    # Seconds a started request line or HTTP/2 preface may take to complete (see detect_protocol).
    detect_timeout: float = 0.5
    # Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 128
    # Request body kept for a gRPC call (health requests are a few bytes).
    max_grpc_message_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_header_bytes",
            "max_connections",
            "max_concurrent_streams",
            "max_grpc_message_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1, not {getattr(self, name)!r}")
        for name in ("idle_timeout", "detect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"Limits.{name} must be a positive number of seconds, not {getattr(self, name)!r}"
                )


_DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer to an HTTP request, decided from its method and target alone."""

    status: int  # HTTP status of the answer
    delay: float  # seconds to wait before answering (?delay_ms=)
    error: str = ""  # why the request was refused (then status is 4xx); "" when it was fine


def plan_reply(method: str, target: str) -> Reply:
    """The status and delay for a request: ``/status/<code>`` (200-599) and ``?delay_ms=N`` (<= 10 s)."""
    if method == "CONNECT":
        # Accepting CONNECT would switch the connection to a tunnel; the workload is an endpoint.
        return Reply(405, 0.0, "CONNECT is not supported: the lab workload is not a proxy")
    path, _, query = target.partition("?")
    status = 200
    if path == "/status" or path.startswith("/status/"):
        match = _STATUS_PATH.fullmatch(path)
        if match is None or not 200 <= int(match.group(1)) <= 599:
            return Reply(400, 0.0, f"path {path!r}: /status/<code> needs a status code from 200 to 599")
        status = int(match.group(1))
    try:
        params = parse_qsl(query, keep_blank_values=True, max_num_fields=64)
    except ValueError:
        return Reply(400, 0.0, "the query string has more than 64 parameters")
    delay_values = [value for key, value in params if key == "delay_ms"]
    delay_ms = 0
    if delay_values:
        raw = delay_values[0]
        if not raw.isascii() or not raw.isdigit():
            return Reply(
                400, 0.0, f"delay_ms={raw!r} is not valid: it must be a whole number of milliseconds"
            )
        delay_ms = min(int(raw), MAX_DELAY_MS)
    return Reply(status, delay_ms / 1000)


def headers_as_dict(pairs: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers as a JSON-friendly map: lower-case names, repeated headers joined with ", ",
    HTTP/2 pseudo-headers left out."""
    result: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode("latin-1").lower()
        if name.startswith(":"):
            continue
        value = raw_value.decode("utf-8", "replace")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


def describe_request(
    *,
    pod: str,
    namespace: str,
    protocol: Protocol,
    method: str,
    target: str,
    authority: str,
    headers: Mapping[str, str],
    peer: str,
    body_bytes: int,
    reply: Reply,
) -> dict[str, Any]:
    """The JSON document every HTTP answer carries."""
    document: dict[str, Any] = {
        "pod": pod,
        "namespace": namespace,
        "method": method,
        "path": target,  # the request target as received, query string included
        "authority": authority,  # Host (HTTP/1.1) or :authority (HTTP/2)
        "headers": dict(headers),
        "peer": peer,
        "protocol": protocol.value,
        "body_bytes": body_bytes,
        "status": reply.status,
    }
    if reply.error:
        document["error"] = reply.error
    return document


def _has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status not in (204, 304)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _format_address(sockaddr: Any) -> str:
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return str(sockaddr)
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------------
# gRPC framing and the health messages


class GrpcFrameError(ValueError):
    """A gRPC length-prefixed message that cannot be read."""


def encode_grpc_message(message: bytes) -> bytes:
    """One gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def decode_grpc_messages(body: bytes) -> list[bytes]:
    """The messages of a complete gRPC request or response body; GrpcFrameError names what is wrong."""
    messages: list[bytes] = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < 5:
            raise GrpcFrameError(f"truncated gRPC message header at byte {offset}")
        flag = body[offset]
        if flag == 1:
            raise GrpcFrameError("compressed gRPC messages are not supported (no grpc-encoding is accepted)")
        if flag != 0:
            raise GrpcFrameError(f"invalid gRPC compressed-flag byte {flag} at byte {offset}")
        length = int.from_bytes(body[offset + 1 : offset + 5], "big")
        end = offset + 5 + length
        if end > len(body):
            raise GrpcFrameError(
                f"gRPC message at byte {offset} declares {length} bytes "
                f"but only {len(body) - offset - 5} arrived"
            )
        messages.append(body[offset + 5 : end])
        offset = end
    return messages


@cache
def health_messages() -> tuple[Any, Any]:
    """(HealthCheckRequest, HealthCheckResponse) of grpc.health.v1, as protobuf message classes.

    loom/api has no copy of health.proto, so the two messages are declared here as a descriptor and
    turned into classes by the protobuf library, in a private pool (no clash with a generated
    grpc_health module in the same process). Built on first use: see the module docstring."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field_type = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="loom/lab/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file_proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL)
    response = file_proto.message_type.add(name="HealthCheckResponse")
    status_enum = response.enum_type.add(name="ServingStatus")
    for name, number in (("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3)):
        status_enum.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field_type.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field_type.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    request_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
    )
    response_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    )
    return request_class, response_class


def encode_health_request(service: str = "") -> bytes:
    request_class, _ = health_messages()
    data: bytes = request_class(service=service).SerializeToString()
    return data


def decode_health_request(data: bytes) -> str:
    """The service name of a HealthCheckRequest; ValueError when the bytes are not one."""
    from google.protobuf.message import DecodeError

    request_class, _ = health_messages()
    try:
        service: str = request_class.FromString(data).service
    except DecodeError as err:
        raise ValueError(f"not a grpc.health.v1.HealthCheckRequest: {err}") from err
    return service


def encode_health_response(status: int) -> bytes:
    _, response_class = health_messages()
    data: bytes = response_class(status=status).SerializeToString()
    return data


def decode_health_response(data: bytes) -> int:
    """The serving status of a HealthCheckResponse; ValueError when the bytes are not one."""
    from google.protobuf.message import DecodeError

    _, response_class = health_messages()
    try:
        status: int = response_class.FromString(data).status
    except DecodeError as err:
        raise ValueError(f"not a grpc.health.v1.HealthCheckResponse: {err}") from err
    return status


def _grpc_message_header(text: str) -> str:
    # grpc-message is percent-encoded (gRPC over HTTP/2 spec); keep printable ASCII readable.
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


# ---------------------------------------------------------------------------------------------------
# The server


@dataclass(slots=True)
class WorkloadStats:
    """Counters for tests and the log."""

    connections: int = 0  # accepted and served
    refused: int = 0  # closed at once because max_connections were open
    requests: int = 0  # HTTP/1.1 + HTTP/2 requests answered (gRPC included)


class WorkloadServer:
    """The built-in workload on one or more ports. `start`/`stop` inside the running loop."""

    def __init__(
        self,
        pod: str,
        namespace: str,
        ports: Sequence[int] = (DEFAULT_PORT,),
        *,
        host: str = "0.0.0.0",
        limits: Limits | None = None,
    ) -> None:
        if not ports:
            raise ValueError("the workload needs at least one port")
        for port in ports:
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} is not valid: it must be from 1 to 65535 (0: any free port)")
        self.pod = pod
        self.namespace = namespace
        self.host = host
        self.limits = limits or Limits()
        self.stats = WorkloadStats()
        self._requested_ports = tuple(ports)
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def pod_header(self) -> str:
        return f"{self.namespace}/{self.pod}"

    @property
    def ports(self) -> list[int]:
        """The bound ports, in the order given (useful with port 0)."""
        return [int(server.sockets[0].getsockname()[1]) for server in self._servers if server.sockets]

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Listen on every port; OSError (port in use, no permission) after closing what was opened."""
        self._stopping = False
        try:
            for port in self._requested_ports:
                server = await asyncio.start_server(
                    self._accept, self.host, port, reuse_address=True, backlog=1024
                )
                self._servers.append(server)
        except OSError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        self._stopping = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:  # accepted by the kernel before `stop`, handed to us after it
            writer.close()
            return
        if len(self._connections) >= self.limits.max_connections:
            self.stats.refused += 1
            log.debug("refusing a connection: %d connections are open", len(self._connections))
            writer.close()
            return
        # Served in a task of our own rather than the one start_server made: `stop` cancels these, and
        # Python 3.11's streams log a spurious error when the task they created is cancelled.
        task = asyncio.create_task(self._serve_connection(reader, writer), name="workload-connection")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        # Also when `stop` cancels the task before it ever ran (its own `finally` then never runs).
        task.add_done_callback(lambda _: writer.close())

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        peer = _format_address(writer.get_extra_info("peername"))
        try:
            protocol, prefix = await self._detect(reader)
            if protocol is Protocol.HTTP2:
                await _Http2Session(self, reader, writer, peer).run(prefix)
            elif protocol is Protocol.HTTP1:
                await self._serve_http1(reader, writer, peer, prefix)
            else:
                await self._serve_echo(reader, writer, prefix)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as err:
            log.debug("connection from %s ended: %s", peer, err or type(err).__name__)
        except Exception:  # one connection's failure must never reach the listener
            log.exception("connection from %s failed", peer)
        finally:
            writer.close()

    # Timeouts use asyncio.timeout, never wait_for: Python 3.11's wait_for loses a cancellation that
    # arrives as the awaited operation completes, and `stop` would then wait for the idle timeout.
    async def _read(self, reader: asyncio.StreamReader, within: float | None = None) -> bytes:
        async with asyncio.timeout(within or self.limits.idle_timeout):
            return await reader.read(_READ_SIZE)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data:
            writer.write(data)
            async with asyncio.timeout(self.limits.idle_timeout):
                await writer.drain()

    async def _detect(self, reader: asyncio.StreamReader) -> tuple[Protocol, bytes]:
        prefix = await self._read(reader)
        if not prefix:
            return Protocol.TCP_ECHO, b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.detect_timeout
        while (protocol := detect_protocol(prefix, final=False)) is None:
            remaining = deadline - loop.time()
            more = b""
            if remaining > 0:
                try:
                    more = await self._read(reader, remaining)
                except TimeoutError:
                    pass
            if not more:
                return detect_protocol(prefix, final=True) or Protocol.TCP_ECHO, prefix
            prefix += more
        return protocol, prefix

    async def _serve_echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes
    ) -> None:
        data = prefix
        while data:
            await self._write(writer, data)
            data = await self._read(reader)
        # The client half-closed: say so in turn, so `nc -N`-style clients see the end of the echo.
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    # -- HTTP/1.1 ---------------------------------------------------------------------------------------

    async def _serve_http1(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, prefix: bytes
    ) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        connection.receive_data(prefix)
        request: h11.Request | None = None
        body_bytes = 0
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as err:
                await self._http1_error(connection, writer, err.error_status_hint, str(err), peer)
                return
            if event is h11.NEED_DATA:
                if connection.they_are_waiting_for_100_continue:
                    interim = h11.InformationalResponse(status_code=100, headers=[])
                    await self._write(writer, connection.send(interim) or b"")
                connection.receive_data(await self._read(reader))
            elif isinstance(event, h11.Request):
                # h11 bounds only heads that arrive in pieces; one that came in a single read is
                # measured here.
                head_bytes = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if head_bytes > self.limits.max_header_bytes:
                    limit = self.limits.max_header_bytes
                    reason = f"request head of {head_bytes} bytes is over the limit of {limit}"
                    await self._http1_error(connection, writer, 431, reason, peer)
                    return
                request, body_bytes = event, 0
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None  # h11 delivers a Request before its end
                await self._http1_respond(connection, writer, request, body_bytes, peer)
                request = None
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return  # Connection: close (either side), or HTTP/1.0 without keep-alive
                connection.start_next_cycle()
            else:  # ConnectionClosed, or PAUSED (never expected: every request is answered first)
                return

    async def _http1_respond(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body_bytes: int,
        peer: str,
    ) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("utf-8", "replace")
        headers = headers_as_dict(request.headers)
        reply = plan_reply(method, target)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        document = describe_request(
            pod=self.pod,
            namespace=self.namespace,
            protocol=Protocol.HTTP1,
            method=method,
            target=target,
            authority=headers.get("host", ""),
            headers=headers,
            peer=peer,
            body_bytes=body_bytes,
            reply=reply,
        )
        body = json.dumps(document).encode() + b"\n"
        response_headers = [
            ("content-type", "application/json"),
            (POD_HEADER, self.pod_header),
            ("server", _SERVER_NAME),
        ]
        send_body = _has_body(method, reply.status)
        if reply.status not in (204, 304):
            response_headers.append(("content-length", str(len(body))))
        response = h11.Response(
            status_code=reply.status, headers=response_headers, reason=_reason(reply.status)
        )
        data = connection.send(response) or b""
        if send_body:
            data += connection.send(h11.Data(data=body)) or b""
        data += connection.send(h11.EndOfMessage()) or b""
        self.stats.requests += 1
        log.debug(
            "%s %s %s -> %d (%d body bytes) from %s",
            "HTTP/1.1",
            method,
            target,
            reply.status,
            body_bytes,
            peer,
        )
        await self._write(writer, data)

    async def _http1_error(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, status: int, reason: str, peer: str
    ) -> None:
        log.debug("bad HTTP/1.1 request from %s: %s", peer, reason)
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"pod": self.pod, "namespace": self.namespace, "status": status, "error": reason})
        encoded = body.encode() + b"\n"
        response = h11.Response(
            status_code=status,
            headers=[
                ("content-type", "application/json"),
                ("content-length", str(len(encoded))),
                ("connection", "close"),
                (POD_HEADER, self.pod_header),
            ],
            reason=_reason(status),
        )
        data = (connection.send(response) or b"") + (connection.send(h11.Data(data=encoded)) or b"")
        data += connection.send(h11.EndOfMessage()) or b""
        await self._write(writer, data)


@dataclass(slots=True)
class _H2Stream:
    headers: list[tuple[bytes, bytes]]
    grpc: bool
    body_bytes: int = 0
    grpc_body: bytearray | None = None  # kept only for gRPC requests
    grpc_overflow: bool = False


class _Http2Session:
    """One HTTP/2 connection (prior knowledge): a read loop feeding h2, one task per answered stream."""

    def __init__(
        self, server: WorkloadServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self._server = server
        self._limits = server.limits
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._streams: dict[int, _H2Stream] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._window_waiters: list[asyncio.Future[None]] = []

    async def run(self, prefix: bytes) -> None:
        self._conn.initiate_connection()
        self._conn.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._limits.max_header_bytes,
            }
        )
        try:
            data = prefix
            while data and self._receive(data):
                await self._flush()
                data = await self._next_data()
            await self._flush()
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _next_data(self) -> bytes:
        while True:
            try:
                async with asyncio.timeout(self._limits.idle_timeout):
                    return await self._reader.read(_READ_SIZE)
            except TimeoutError:
                if self._tasks:
                    continue  # answers are still being sent (each bounded in time): not idle
                self._conn.close_connection()
                return b""

    async def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._writer.write(data)
            async with asyncio.timeout(self._limits.idle_timeout):
                await self._writer.drain()

    def _receive(self, data: bytes) -> bool:
        """Feed bytes to h2 and act on the events; False when the connection is over."""
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            # h2 has queued a GOAWAY naming the error; it goes out with the final flush.
            log.debug("HTTP/2 protocol error from %s: %s", self._peer, err)
            return False
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                headers = [(_as_bytes(n), _as_bytes(v)) for n, v in event.headers or ()]
                grpc = any(n == b"content-type" and v.startswith(b"application/grpc") for n, v in headers)
                self._streams[event.stream_id] = _H2Stream(
                    headers, grpc, grpc_body=bytearray() if grpc else None
                )
            elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                self._conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is not None and event.data:
                    self._count_body(stream, event.data)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    self._start_answer(event.stream_id, stream)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
                self._streams.pop(event.stream_id, None)
                task = self._tasks.get(event.stream_id)
                if task is not None:
                    task.cancel()
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._wake_window_waiters()
            elif isinstance(event, h2.events.ConnectionTerminated):
                return False
        return True

    def _count_body(self, stream: _H2Stream, data: bytes) -> None:
        stream.body_bytes += len(data)
        if stream.grpc_body is None:
            return
        if len(stream.grpc_body) + len(data) > self._limits.max_grpc_message_bytes:
            stream.grpc_overflow = True
            stream.grpc_body.clear()
        elif not stream.grpc_overflow:
            stream.grpc_body += data

    def _start_answer(self, stream_id: int, stream: _H2Stream) -> None:
        task = asyncio.create_task(self._answer(stream_id, stream), name=f"h2-stream-{stream_id}")
        self._tasks[stream_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(stream_id, None))

    async def _answer(self, stream_id: int, stream: _H2Stream) -> None:
        try:
            if stream.grpc:
                await self._answer_grpc(stream_id, stream)
            else:
                await self._answer_http(stream_id, stream)
            self._server.stats.requests += 1
        except (h2.exceptions.StreamClosedError, ConnectionError, TimeoutError) as err:
            log.debug(
                "HTTP/2 stream %d from %s ended early: %s", stream_id, self._peer, err or type(err).__name__
            )
        except h2.exceptions.ProtocolError as err:
            log.debug("HTTP/2 stream %d from %s: %s", stream_id, self._peer, err)
        except Exception:  # a bug in one answer must not stop the connection's other streams
            log.exception("answering HTTP/2 stream %d from %s failed", stream_id, self._peer)
            with contextlib.suppress(Exception):
                self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                await self._flush()

    async def _answer_http(self, stream_id: int, stream: _H2Stream) -> None:
        pseudo = {
            name: value.decode("utf-8", "replace") for name, value in stream.headers if name.startswith(b":")
        }
        method = pseudo.get(b":method", "")
        target = pseudo.get(b":path", "")
        headers = headers_as_dict(stream.headers)
        reply = plan_reply(method, target)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        document = describe_request(
            pod=self._server.pod,
            namespace=self._server.namespace,
            protocol=Protocol.HTTP2,
            method=method,
            target=target,
            authority=pseudo.get(b":authority", headers.get("host", "")),
            headers=headers,
            peer=self._peer,
            body_bytes=stream.body_bytes,
            reply=reply,
        )
        body = json.dumps(document).encode() + b"\n"
        response_headers = [
            (":status", str(reply.status)),
            ("content-type", "application/json"),
            (POD_HEADER, self._server.pod_header),
            ("server", _SERVER_NAME),
        ]
        if reply.status not in (204, 304):
            response_headers.append(("content-length", str(len(body))))
        send_body = _has_body(method, reply.status)
        self._conn.send_headers(stream_id, response_headers, end_stream=not send_body)
        await self._flush()
        if send_body:
            await self._send_data(stream_id, body)
            self._conn.end_stream(stream_id)
            await self._flush()
        log.debug(
            "%s %s %s -> %d (%d body bytes) from %s",
            "HTTP/2",
            method,
            target,
            reply.status,
            stream.body_bytes,
            self._peer,
        )

    async def _answer_grpc(self, stream_id: int, stream: _H2Stream) -> None:
        path = next(
            (value.decode("utf-8", "replace") for name, value in stream.headers if name == b":path"), ""
        )
        status, message, payload = self._grpc_outcome(path, stream)
        base = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            (POD_HEADER, self._server.pod_header),
        ]
        if payload is None:
            # Trailers-only response: the status rides on the only HEADERS frame.
            trailers = [("grpc-status", str(status)), ("grpc-message", _grpc_message_header(message))]
            self._conn.send_headers(stream_id, base + trailers, end_stream=True)
            await self._flush()
        else:
            self._conn.send_headers(stream_id, base)
            await self._flush()
            await self._send_data(stream_id, encode_grpc_message(payload))
            self._conn.send_headers(stream_id, [("grpc-status", str(GRPC_OK))], end_stream=True)
            await self._flush()
        log.debug("gRPC %s -> grpc-status %d from %s", path, status, self._peer)

    def _grpc_outcome(self, path: str, stream: _H2Stream) -> tuple[int, str, bytes | None]:
        """(grpc-status, grpc-message, response message or None for a trailers-only answer)."""
        if path != GRPC_HEALTH_CHECK:
            return GRPC_UNIMPLEMENTED, f"method {path} is not implemented by the lab workload", None
        if stream.grpc_overflow:
            limit = self._limits.max_grpc_message_bytes
            return GRPC_RESOURCE_EXHAUSTED, f"request larger than {limit} bytes", None
        try:
            messages = decode_grpc_messages(bytes(stream.grpc_body or b""))
            if len(messages) != 1:
                return (
                    GRPC_INTERNAL,
                    f"a unary call needs exactly one request message, got {len(messages)}",
                    None,
                )
            decode_health_request(messages[0])
        except ValueError as err:
            return GRPC_INTERNAL, str(err), None
        # Every service name is SERVING: the workload serves whatever a client asks it for.
        return GRPC_OK, "", encode_health_response(HEALTH_SERVING)

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        """Send `data` on a stream within the peer's flow-control windows, waiting for updates."""
        offset = 0
        while offset < len(data):
            allowed = min(
                self._conn.local_flow_control_window(stream_id),
                self._conn.max_outbound_frame_size,
                len(data) - offset,
            )
            if allowed <= 0:
                await self._wait_window()
                continue
            self._conn.send_data(stream_id, data[offset : offset + allowed])
            offset += allowed
            await self._flush()

    async def _wait_window(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._limits.idle_timeout):
                await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._window_waiters.remove(waiter)

    def _wake_window_waiters(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True, slots=True)
class CallTarget:
    scheme: str  # "http", "grpc" or "tcp"
    host: str  # name or address, without brackets
    port: int
    target: str = "/"  # HTTP request target (path and query); "/" for grpc and tcp

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_call_url(url: str) -> CallTarget:
    """http://host[:port]/path, grpc://host:port or tcp://host:port; ValueError naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "grpc", "tcp"):
        raise ValueError(f"{url!r}: the URL must start with http://, grpc:// or tcp://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port must be a number from 1 to 65535") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r}: the URL names no host")
    if port is None:
        if scheme != "http":
            raise ValueError(f"{url!r}: {scheme}:// needs a port (host:port)")
        port = 80
    if port == 0:
        raise ValueError(f"{url!r}: the port must be a number from 1 to 65535")
    if scheme == "http":
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return CallTarget(scheme, host, port, target)
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r}: {scheme}:// takes no path or query")
    return CallTarget(scheme, host, port)


@dataclass(frozen=True, slots=True)
class CallOptions:
    target: CallTarget
    count: int = 1  # attempts, each on a new connection (1..MAX_CALL_COUNT)
    timeout: float = 5.0  # seconds per attempt: resolution, connection and exchange
    http2: bool = False  # http:// over HTTP/2 with prior knowledge
    expect_pod: str = ""  # every answer must come from a pod whose name starts with this
    expect_status: int | None = None  # HTTP status every answer must have; None: any 2xx
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers (http and grpc)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_CALL_COUNT:
            raise ValueError(f"count={self.count} is not valid: it must be from 1 to {MAX_CALL_COUNT}")
        if not 0 < self.timeout <= 3600:
            raise ValueError(f"timeout={self.timeout} is not valid: it must be from 0 to 3600 seconds")
        if self.expect_pod and self.target.scheme == "tcp":
            raise ValueError("--expect-pod needs an http:// or grpc:// URL: a TCP echo does not say its pod")
        if self.expect_status is not None and not 100 <= self.expect_status <= 599:
            raise ValueError(f"expect_status={self.expect_status} is not an HTTP status")


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one call, printed as one JSON line."""

    attempt: int  # 1-based
    ok: bool
    protocol: str  # HTTP/1.1, HTTP/2, gRPC or tcp-echo
    elapsed_ms: float
    address: str = ""  # the address connected to (after name resolution)
    status: int | None = None  # HTTP status
    grpc_status: int | None = None
    pod: str = ""
    namespace: str = ""
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True, slots=True)
class _Exchange:
    status: int | None = None
    grpc_status: int | None = None
    pod: str = ""
    namespace: str = ""
    error: str = ""  # why the answer is not the expected one; "" when it is


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as err:
        raise ConnectionError(f"cannot resolve {host!r}: {err.strerror}") from None
    last_error: OSError | None = None
    for _family, _type, _proto, _name, sockaddr in infos[:8]:
        address = _format_address(sockaddr)
        try:
            reader, writer = await asyncio.open_connection(str(sockaddr[0]), int(sockaddr[1]))
        except OSError as err:
            last_error = OSError(f"cannot connect to {address}: {err.strerror or err}")
            continue
        return reader, writer, address
    raise last_error or ConnectionError(f"{host!r} resolves to no address")


def _pod_from(document: Any, pod_header: str) -> tuple[str, str]:
    if isinstance(document, dict) and isinstance(document.get("pod"), str):
        return document["pod"], str(document.get("namespace", ""))
    namespace, _, pod = pod_header.rpartition("/")
    return pod, namespace


async def _http1_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: CallOptions
) -> tuple[int, dict[str, str], bytes]:
    target = options.target
    connection = h11.Connection(h11.CLIENT)
    headers = [
        ("host", target.authority),
        ("user-agent", "loom-lab-call"),
        ("connection", "close"),
        *options.headers,
    ]
    data = connection.send(h11.Request(method="GET", target=target.target, headers=headers)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    writer.write(data)
    await writer.drain()
    status = 0
    response_headers: dict[str, str] = {}
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(_READ_SIZE))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = headers_as_dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_RESPONSE_BYTES:
                raise ConnectionError(f"the response body is larger than {_MAX_RESPONSE_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, response_headers, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("the server closed the connection before answering")
        # InformationalResponse (100 Continue): keep reading


@dataclass(frozen=True, slots=True)
class _H2Response:
    headers: dict[str, str]  # pseudo-headers included (":status")
    body: bytes
    trailers: dict[str, str]


async def _http2_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> _H2Response:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, list(headers), end_stream=not body)
    if body:
        conn.send_data(stream_id, body, end_stream=True)  # a few bytes: far inside the initial window
    writer.write(conn.data_to_send())
    await writer.drain()
    response_headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    received = bytearray()
    ended = False
    while not ended:
        data = await reader.read(_READ_SIZE)
        if not data:
            raise ConnectionError("the server closed the connection before the response ended")
        for event in conn.receive_data(data):
            if getattr(event, "stream_id", stream_id) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                response_headers = _h2_headers(event.headers)
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = _h2_headers(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                received += event.data or b""
                conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
                if len(received) > _MAX_RESPONSE_BYTES:
                    raise ConnectionError(f"the response body is larger than {_MAX_RESPONSE_BYTES} bytes")
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
            elif isinstance(event, h2.events.StreamReset):
                raise ConnectionError(f"the server reset the stream (error code {event.error_code})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionError(
                    f"the server ended the connection (GOAWAY, error code {event.error_code})"
                )
        pending = conn.data_to_send()
        if pending:
            writer.write(pending)
            await writer.drain()
    conn.close_connection()
    writer.write(conn.data_to_send())
    await writer.drain()
    return _H2Response(response_headers, bytes(received), trailers)


def _h2_headers(headers: Iterable[tuple[bytes | str, bytes | str]] | None) -> dict[str, str]:
    return {
        _as_bytes(name).decode("latin-1").lower(): _as_bytes(value).decode("utf-8", "replace")
        for name, value in headers or ()
    }


def _check_pod(options: CallOptions, pod: str) -> str:
    if options.expect_pod and not pod.startswith(options.expect_pod):
        return f"answered by pod {pod!r}, expected a pod starting with {options.expect_pod!r}"
    return ""


async def _call_http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: CallOptions
) -> _Exchange:
    target = options.target
    if options.http2:
        request = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", target.authority),
            (":path", target.target),
            ("user-agent", "loom-lab-call"),
            *((name.lower(), value) for name, value in options.headers),
        ]
        response = await _http2_exchange(reader, writer, request, b"")
        status_text = response.headers.get(":status", "0")
        status = int(status_text) if status_text.isdigit() else 0
        headers, body = response.headers, response.body
    else:
        status, headers, body = await _http1_exchange(reader, writer, options)
    try:
        document: Any = json.loads(body)
    except ValueError:
        document = None
    pod, namespace = _pod_from(document, headers.get(POD_HEADER, ""))
    if options.expect_status is not None:
        error = (
            "" if status == options.expect_status else f"status {status}, expected {options.expect_status}"
        )
    else:
        error = "" if 200 <= status <= 299 else f"status {status}"
    return _Exchange(status=status, pod=pod, namespace=namespace, error=error or _check_pod(options, pod))


async def _call_grpc(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: CallOptions
) -> _Exchange:
    target = options.target
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", target.authority),
        (":path", GRPC_HEALTH_CHECK),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "loom-lab-call"),
        *((name.lower(), value) for name, value in options.headers),
    ]
    response = await _http2_exchange(reader, writer, request, encode_grpc_message(encode_health_request()))
    status_text = response.headers.get(":status", "0")
    status = int(status_text) if status_text.isdigit() else 0
    # A trailers-only answer carries grpc-status in its headers.
    outcome = response.trailers or response.headers
    grpc_text = outcome.get("grpc-status", "")
    grpc_status = int(grpc_text) if grpc_text.isdigit() else None
    pod, namespace = _pod_from(None, response.headers.get(POD_HEADER, ""))
    if grpc_status != GRPC_OK:
        message = outcome.get("grpc-message", "")
        error = f"grpc-status {grpc_status if grpc_status is not None else 'missing'}" + (
            f": {message}" if message else ""
        )
        return _Exchange(status=status, grpc_status=grpc_status, pod=pod, namespace=namespace, error=error)
    try:
        messages = decode_grpc_messages(response.body)
        if len(messages) != 1:
            raise ValueError(f"expected one response message, got {len(messages)}")
        serving = decode_health_response(messages[0])
    except ValueError as err:
        return _Exchange(status=status, grpc_status=grpc_status, pod=pod, namespace=namespace, error=str(err))
    error = (
        "" if serving == HEALTH_SERVING else f"health status {serving}, expected SERVING ({HEALTH_SERVING})"
    )
    return _Exchange(
        status=status,
        grpc_status=grpc_status,
        pod=pod,
        namespace=namespace,
        error=error or _check_pod(options, pod),
    )


async def _call_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attempt: int) -> _Exchange:
    line = f"loom-call {attempt} {secrets.token_hex(8)}\n".encode()
    writer.write(line)
    await writer.drain()
    echoed = bytearray()
    while len(echoed) < len(line):
        data = await reader.read(len(line) - len(echoed))
        if not data:
            return _Exchange(error=f"the connection closed after {len(echoed)} of {len(line)} echoed bytes")
        echoed += data
    return _Exchange(error="" if echoed == line else f"echo differs: sent {line!r}, got {bytes(echoed)!r}")


async def call_once(options: CallOptions, attempt: int) -> Attempt:
    """One attempt on a new connection, bounded by options.timeout; never raises for network trouble."""
    target = options.target
    if target.scheme == "grpc":
        protocol = "gRPC"
    elif target.scheme == "tcp":
        protocol = Protocol.TCP_ECHO.value
    else:
        protocol = Protocol.HTTP2.value if options.http2 else Protocol.HTTP1.value
    loop = asyncio.get_running_loop()
    started = loop.time()
    address = ""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(options.timeout):
            reader, writer, address = await _connect(target.host, target.port)
            if target.scheme == "grpc":
                exchange = await _call_grpc(reader, writer, options)
            elif target.scheme == "tcp":
                exchange = await _call_tcp(reader, writer, attempt)
            else:
                exchange = await _call_http(reader, writer, options)
    except TimeoutError:
        exchange = _Exchange(error=f"no answer within {options.timeout:g} s")
    except (OSError, asyncio.IncompleteReadError) as err:
        exchange = _Exchange(error=str(err) or type(err).__name__)
    except UnicodeError as err:  # a host name IDNA cannot encode (e.g. a label over 63 characters)
        exchange = _Exchange(error=f"cannot resolve {target.host!r}: {err}")
    except (h11.ProtocolError, h2.exceptions.ProtocolError) as err:
        exchange = _Exchange(error=f"protocol error: {err}")
    finally:
        if writer is not None:
            writer.close()
    return Attempt(
        attempt=attempt,
        ok=not exchange.error,
        protocol=protocol,
        elapsed_ms=round((loop.time() - started) * 1000, 3),
        address=address,
        status=exchange.status,
        grpc_status=exchange.grpc_status,
        pod=exchange.pod,
        namespace=exchange.namespace,
        error=exchange.error,
    )


async def run_calls(options: CallOptions, out: TextIO) -> int:
    """Make every attempt, print one JSON line each and a summary; 0 only if every attempt succeeded."""
    succeeded = 0
    pods: dict[str, int] = {}
    for attempt in range(1, options.count + 1):
        result = await call_once(options, attempt)
        print(result.to_json(), file=out, flush=True)
        if result.ok:
            succeeded += 1
        if result.pod:
            key = f"{result.namespace}/{result.pod}" if result.namespace else result.pod
            pods[key] = pods.get(key, 0) + 1
    summary = {
        "summary": True,
        "attempts": options.count,
        "succeeded": succeeded,
        "failed": options.count - succeeded,
        "pods": dict(sorted(pods.items())),
    }
    print(json.dumps(summary), file=out, flush=True)
    return 0 if succeeded == options.count else 1


# ---------------------------------------------------------------------------------------------------
# Entry point


@dataclass(frozen=True, slots=True)
class ServeConfig:
    pod: str
    namespace: str
    ports: tuple[int, ...]
    host: str = "0.0.0.0"
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)


def _parse_ports(values: Sequence[str], where: str) -> tuple[int, ...]:
    ports: list[int] = []
    for value in values:
        text = value.strip()
        if not text.isdigit() or not 0 <= int(text) <= 65535:
            raise ValueError(f"{where}: {value!r} is not a port number (1-65535, or 0 for any free port)")
        if int(text) not in ports:
            ports.append(int(text))
    if len(ports) > MAX_PORTS:
        raise ValueError(f"{where}: {len(ports)} ports given, at most {MAX_PORTS} are allowed")
    return tuple(ports)


def serve_config(args: argparse.Namespace, env: Mapping[str, str]) -> ServeConfig:
    """The serve settings from arguments, then LOOM_WORKLOAD_* (POD_NAME/POD_NAMESPACE), then defaults."""
    if args.port:
        ports = _parse_ports(args.port, "--port")
    elif env.get(ENV_PORTS, "").strip():
        ports = _parse_ports(re.split(r"[,\s]+", env[ENV_PORTS].strip()), ENV_PORTS)
    else:
        ports = (DEFAULT_PORT,)
    pod = args.pod or env.get(ENV_POD) or env.get("POD_NAME") or socket.gethostname()
    namespace = args.namespace or env.get(ENV_NAMESPACE) or env.get("POD_NAMESPACE") or "default"
    log_level = (args.log_level or env.get(ENV_LOG_LEVEL) or "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"log level {log_level!r} is not valid: use debug, info, warning or error")
    limits = Limits(max_connections=args.max_connections, idle_timeout=args.idle_timeout)
    return ServeConfig(pod, namespace, ports, args.host or env.get(ENV_HOST) or "0.0.0.0", log_level, limits)


async def serve(config: ServeConfig, ready: Callable[[WorkloadServer], None] | None = None) -> int:
    """Run the workload until SIGTERM or SIGINT; the exit code."""
    server = WorkloadServer(
        config.pod, config.namespace, config.ports, host=config.host, limits=config.limits
    )
    try:
        await server.start()
    except OSError as err:
        log.error("the lab workload cannot listen on %s port(s) %s: %s", config.host, config.ports, err)
        return 1
    addresses = ", ".join(f"{config.host}:{port}" for port in server.ports)
    log.info("lab workload %s/%s listening on %s", config.namespace, config.pod, addresses)
    if ready is not None:
        ready(server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
    log.info("lab workload %s/%s stopped", config.namespace, config.pod)
    return 0


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed (as every loom process does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    result: int = uvloop.run(main())
    return result


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loom.lab.workload",
        description="The lab's built-in workload (serve, the default) and its test client (call).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="answer HTTP/1.1, HTTP/2, gRPC health and TCP echo")
    serve_parser.add_argument(
        "--pod", default="", help=f"pod name (env {ENV_POD}, POD_NAME; default: hostname)"
    )
    serve_parser.add_argument(
        "--namespace", default="", help=f"namespace (env {ENV_NAMESPACE}; default: default)"
    )
    serve_parser.add_argument(
        "--port",
        action="append",
        default=[],
        help=f"port to listen on, repeatable (env {ENV_PORTS}; default 8080)",
    )
    serve_parser.add_argument(
        "--host", default="", help=f"address to listen on (env {ENV_HOST}; default 0.0.0.0)"
    )
    serve_parser.add_argument(
        "--log-level", default="", help=f"debug|info|warning|error (env {ENV_LOG_LEVEL})"
    )
    serve_parser.add_argument("--max-connections", type=int, default=_DEFAULT_LIMITS.max_connections)
    serve_parser.add_argument(
        "--idle-timeout", type=float, default=_DEFAULT_LIMITS.idle_timeout, help="seconds"
    )
    call_parser = commands.add_parser("call", help="call a workload and report every answer as JSON")
    call_parser.add_argument("url", help="http://host[:port]/path, grpc://host:port or tcp://host:port")
    call_parser.add_argument("--count", type=int, default=1, help=f"attempts (1-{MAX_CALL_COUNT}; default 1)")
    call_parser.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt (default 5)")
    call_parser.add_argument("--http2", action="store_true", help="HTTP/2 with prior knowledge for http://")
    call_parser.add_argument(
        "--expect-pod", default="", metavar="PREFIX", help="fail unless the pod starts so"
    )
    call_parser.add_argument(
        "--expect-status", type=int, default=None, help="HTTP status to expect (default 2xx)"
    )
    call_parser.add_argument(
        "--header", "-H", action="append", default=[], metavar="NAME:VALUE", help="extra request header"
    )
    return parser


def _call_options(args: argparse.Namespace) -> CallOptions:
    headers: list[tuple[str, str]] = []
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise ValueError(f"--header {header!r} is not valid: write NAME:VALUE")
        headers.append((name.strip(), value.strip()))
    return CallOptions(
        target=parse_call_url(args.url),
        count=args.count,
        timeout=args.timeout,
        http2=args.http2,
        expect_pod=args.expect_pod,
        expect_status=args.expect_status,
        headers=tuple(headers),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "serve")
    parser = _build_parser()
    args = parser.parse_args(args_list)
    if args.command == "call":
        try:
            options = _call_options(args)
        except ValueError as err:
            parser.error(str(err))
        return _run(lambda: run_calls(options, sys.stdout))
    try:
        config = serve_config(args, os.environ)
    except ValueError as err:
        parser.error(str(err))
    level = logging.getLevelName(config.log_level.upper())
    # Debug is for the workload's own one line per request; hpack/h2 debug output is per header.
    logging.basicConfig(
        level=max(level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.setLevel(level)
    return _run(lambda: serve(config))


if __name__ == "__main__":
    sys.exit(main())
