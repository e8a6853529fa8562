"""A loopback mesh for the waypoint data path: client HBONE pool -> WaypointProxy -> backend HBONE stubs.

Backends are real: an `HboneServer` with the backend pod's certificate, in front of the lab workload
(`loom.lab.workload.WorkloadServer`: HTTP/1.1, HTTP/2, gRPC health, answers with the headers it saw)
or of `ScriptedServer` (HTTP/1.1 behaviours the workload does not have: streamed and echoed bodies,
upgrades, hanging). Endpoints get made-up pod IPs; the waypoint's HBONE socket factory maps
`<pod ip>:15008` to the stub's loopback address. The routing, authorization, picking, telemetry and
path normalization parts are the small fakes below, so each test states exactly what they answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11

from loom.hbone import (
    ClientLimits,
    ConnectionPool,
    Decision,
    HboneServer,
    ServerLimits,
    Tunnel,
    TunnelRequest,
    default_socket_factory,
)
from loom.identity import Identity, WorkloadCertificate
from loom.lab.workload import WorkloadServer
from tests.integration.hbone.hbone_harness import Pki, listening_socket, tcp_connector
from waypoint.model import (
    AppProtocol,
    AuthzDecision,
    Endpoint,
    Forward,
    RequestView,
    RouteAction,
    ServiceRef,
    WeightedBackend,
)
from waypoint.proxy import (
    Destination,
    ProxyLimits,
    RefusedRequest,
    RequestRecord,
    TunnelRecord,
    TunnelView,
    WaypointProxy,
)

WAIT = 10.0
VIP = "10.96.0.10"
TCP_VIP = "10.96.0.20"
GRPC_VIP = "10.96.0.30"
H2_VIP = "10.96.0.40"


def service(name: str, protocol: AppProtocol, port: int = 80, namespace: str = "default") -> ServiceRef:
    return ServiceRef(namespace, name, f"{name}.{namespace}.svc.cluster.local", port, 8080, protocol)


WEB = service("web", AppProtocol.HTTP)
WEB_V2 = service("web-v2", AppProtocol.HTTP)
DB = service("db", AppProtocol.TCP, port=5432)
GRPC = service("grpc", AppProtocol.GRPC, port=9090)
H2SVC = service("h2", AppProtocol.HTTP2, port=8080)


# ----------------------------------------------------------------------------------------------- fakes


class RecordingObserver:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.tunnels: list[TunnelRecord] = []
        self.refusals: Counter[str] = Counter()
        self.refused_requests: list[RefusedRequest] = []  # the refusals answered with a status

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)

    def record_tunnel(self, record: TunnelRecord) -> None:
        self.tunnels.append(record)

    def refused(self, reason: str, request: RefusedRequest | None = None) -> None:
        self.refusals[reason] += 1
        if request is not None:
            self.refused_requests.append(request)


class FnRouter:
    """Routes with a function the test sets; by default everything goes to the addressed Service."""

    def __init__(self) -> None:
        self.fn: Callable[[RequestView], RouteAction] = lambda view: Forward(
            (WeightedBackend(view.service, 1),)
        )
        self.views: list[RequestView] = []

    def route(self, request: RequestView) -> RouteAction:
        self.views.append(request)
        return self.fn(request)


class FnAuthorizer:
    def __init__(self) -> None:
        self.fn: Callable[[RequestView], AuthzDecision] = lambda view: AuthzDecision(True)
        self.views: list[RequestView] = []

    def check(self, request: RequestView) -> AuthzDecision:
        self.views.append(request)
        return self.fn(request)


class ListPicker:
    """Endpoints per Service hostname, handed out in order, skipping excluded and removed ones."""

    def __init__(self) -> None:
        self.endpoints: dict[str, list[Endpoint]] = {}
        self.reports: list[tuple[str, bool]] = []

    def pick(self, service: ServiceRef, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        return next((e for e in self.endpoints.get(service.hostname, []) if e.ip not in exclude), None)

    def report(self, endpoint: Endpoint, success: bool) -> None:
        self.reports.append((endpoint.ip, success))


def simple_normalize(target: str) -> tuple[str, str]:
    """Stand-in for waypoint.paths: merge slashes, refuse dot segments and encoded NUL."""
    path, _, query = target.partition("?")
    if "%00" in path or "/../" in path + "/" or "/./" in path + "/":
        raise ValueError(f"path {path!r} has a dot segment or an encoded NUL")
    while "//" in path:
        path = path.replace("//", "/")
    return path, query


class StaticResolver:
    def __init__(self) -> None:
        self.destinations: dict[tuple[str, int], Destination] = {}

    def resolve(self, ip: str, port: int) -> Destination | None:
        return self.destinations.get((ip, port))


# ------------------------------------------------------------------------------------------- backends


class ScriptedServer:
    """HTTP/1.1 behaviours for tests, by path: /stream?n=&size= (chunked download), /echo (echoes the
    body, chunked, as it arrives), /ws (101 then raw echo), /upgrade-200 (200 + Upgrade header, no
    switch), /trailers (chunked body with a trailer), /hang (never answers), anything else: 200 "ok".
    """

    def __init__(self, *, fail_status: int | None = None, hang: bool = False) -> None:
        self.fail_status = fail_status  # answer every request with this status
        self.hang = hang  # never answer any request
        self.requests = 0
        self.heads: list[h11.Request] = []
        self.body_bytes = 0
        self.protocol_errors: list[str] = []  # what h11 refused in what the waypoint sent
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Served in a task of our own: cancelling the one start_server made makes Python 3.11 log.
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except h11.RemoteProtocolError as e:
            self.protocol_errors.append(str(e))
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return
            self.requests += 1
            self.heads.append(event)
            target = event.target.decode()
            path, _, query = target.partition("?")
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            if path == "/hang" or self.hang:
                await asyncio.sleep(3600)
            if path == "/ws":
                await self._websocket(conn, reader, writer)
                return
            if path == "/echo":
                writer.write(
                    conn.send(h11.Response(status_code=200, headers=[("content-type", "x/echo")])) or b""
                )
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Data):
                        self.body_bytes += len(event.data)
                        writer.write(conn.send(h11.Data(data=bytes(event.data))) or b"")
                        await writer.drain()
                    else:
                        break
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
            else:
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Data):
                        self.body_bytes += len(event.data)
                if self.fail_status is not None:
                    headers = [("content-length", "6")]
                    response = h11.Response(status_code=self.fail_status, headers=headers)
                    writer.write(conn.send(response) or b"")
                    writer.write(conn.send(h11.Data(data=b"failed")) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                elif path == "/stream":
                    count, size = int(params.get("n", "4")), int(params.get("size", "1024"))
                    writer.write(conn.send(h11.Response(status_code=200, headers=[])) or b"")
                    for i in range(count):
                        writer.write(conn.send(h11.Data(data=bytes([65 + i % 26]) * size)) or b"")
                        await writer.drain()
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                elif path == "/trailers":
                    writer.write(conn.send(h11.Response(status_code=200, headers=[])) or b"")
                    writer.write(conn.send(h11.Data(data=b"body")) or b"")
                    writer.write(conn.send(h11.EndOfMessage(headers=[("x-checksum", "abc")])) or b"")
                elif path == "/upgrade-200":
                    headers = [("upgrade", "websocket"), ("content-length", "2")]
                    writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
                    writer.write(conn.send(h11.Data(data=b"ok")) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                else:
                    body = b"ok"
                    headers = [("content-length", str(len(body)))]
                    writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _websocket(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        end = conn.next_event()  # a GET: the end of the request follows its head at once
        assert isinstance(end, h11.EndOfMessage), end
        switch = h11.InformationalResponse(
            status_code=101, headers=[("upgrade", "websocket"), ("connection", "upgrade")]
        )
        writer.write(conn.send(switch) or b"")
        leftover, _ = conn.trailing_data
        writer.write(b"welcome:" + bytes(leftover))
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()


@dataclass
class Backend:
    """One backend pod: its HBONE server and its application."""

    ip: str  # the made-up pod IP the waypoint dials
    certificate: WorkloadCertificate
    server: HboneServer
    address: tuple[str, int]  # where its HBONE server really listens
    app_address: tuple[str, int]
    workload: WorkloadServer | None = None
    scripted: ScriptedServer | None = None
    tunnels: list[TunnelRequest] = field(default_factory=list)
    listener: socket.socket | None = None

    def endpoint(self, port: int = 8080) -> Endpoint:
        return Endpoint(
            self.ip, port, self.certificate.identity, workload=f"pod-{self.ip}", namespace="default"
        )

    @property
    def requests(self) -> int:
        if self.workload is not None:
            return self.workload.stats.requests
        assert self.scripted is not None
        return self.scripted.requests


@dataclass
class Mesh:
    pki: Pki
    waypoint_cert: WorkloadCertificate
    client_cert: WorkloadCertificate
    proxy: WaypointProxy
    address: tuple[str, int]
    client: ConnectionPool
    router: FnRouter
    authorizer: FnAuthorizer
    picker: ListPicker
    observer: RecordingObserver
    resolver: StaticResolver
    backends: dict[str, Backend]
    hop_map: dict[str, tuple[str, int]]
    l4_decisions: list[TunnelView] = field(default_factory=list)
    l4_allow: bool = True

    async def tunnel(self, authority: str = f"{VIP}:80", headers: Sequence[tuple[str, str]] = ()) -> Tunnel:
        return await self.client.connect(
            self.client_cert, [self.waypoint_cert.identity], self.address, authority, headers
        )

    async def add_backend(
        self,
        ip: str,
        *,
        scripted: bool = False,
        sa: str = "web",
        fail_status: int | None = None,
        hang: bool = False,
    ) -> Backend:
        certificate = self.pki.issue("default", sa)
        app: WorkloadServer | ScriptedServer
        if scripted or fail_status is not None or hang:
            app = ScriptedServer(fail_status=fail_status, hang=hang)
            await app.start()
            app_address = app.address
        else:
            app = WorkloadServer(f"pod-{ip}", "default", [0], host="127.0.0.1")
            await app.start()
            app_address = ("127.0.0.1", app.ports[0])
        tunnels: list[TunnelRequest] = []

        async def handle(request: TunnelRequest) -> Decision:
            tunnels.append(request)
            return Decision(200, tcp_connector(app_address))

        server = HboneServer(lambda: certificate, handle)
        listener = listening_socket("127.0.0.3")
        server.serve(listener)
        address = listener.getsockname()[:2]
        backend = Backend(
            ip,
            certificate,
            server,
            address,
            app_address,
            workload=app if isinstance(app, WorkloadServer) else None,
            scripted=app if isinstance(app, ScriptedServer) else None,
            tunnels=tunnels,
            listener=listener,
        )
        self.backends[ip] = backend
        self.hop_map[ip] = address
        return backend

    def serve(self, svc: ServiceRef, vip: str, *backends: Backend) -> None:
        self.resolver.destinations[(vip, svc.port)] = Destination(svc)
        self.picker.endpoints[svc.hostname] = [b.endpoint(svc.target_port) for b in backends]


@contextlib.asynccontextmanager
async def mesh(
    tmp_path: Path,
    *,
    limits: ProxyLimits | None = None,
    server_limits: ServerLimits | None = None,
    client_limits: ClientLimits | None = None,
) -> AsyncIterator[Mesh]:
    pki = Pki.create(tmp_path)
    waypoint_cert = pki.issue("default", "waypoint")
    client_cert = pki.issue("default", "client")
    router, authorizer, picker = FnRouter(), FnAuthorizer(), ListPicker()
    observer, resolver = RecordingObserver(), StaticResolver()
    hop_map: dict[str, tuple[str, int]] = {}
    holder: list[Mesh] = []

    async def socket_factory(next_hop: tuple[str, int], source_ip: str | None) -> socket.socket:
        mapped = hop_map.get(next_hop[0])
        if mapped is None:
            raise ConnectionRefusedError(f"no backend at {next_hop[0]}")
        return await default_socket_factory(mapped, None)

    def l4_authorizer(view: TunnelView) -> AuthzDecision:
        holder[0].l4_decisions.append(view)
        return AuthzDecision(holder[0].l4_allow, policy="default/l4", reason="test")

    proxy = WaypointProxy(
        certificate=lambda: waypoint_cert,
        resolver=resolver,
        router=router,
        authorizer=authorizer,
        picker=picker,
        observer=observer,
        normalize=simple_normalize,
        l4_authorizer=l4_authorizer,
        rng=random.Random(7),
        limits=limits,
        server_limits=server_limits,
        client_limits=client_limits,
        socket_factory=socket_factory,
    )
    listener = listening_socket("127.0.0.2")
    proxy.start(listener)
    client = ConnectionPool()
    result = Mesh(
        pki,
        waypoint_cert,
        client_cert,
        proxy,
        listener.getsockname()[:2],
        client,
        router,
        authorizer,
        picker,
        observer,
        resolver,
        {},
        hop_map,
    )
    holder.append(result)
    try:
        yield result
    finally:
        await client.close()
        await proxy.stop(0.5)
        listener.close()
        for backend in result.backends.values():
            await backend.server.close()
            if backend.listener is not None:
                backend.listener.close()
            if backend.workload is not None:
                await backend.workload.stop()
            if backend.scripted is not None:
                await backend.scripted.stop()


# -------------------------------------------------------------------------------------------- clients


@dataclass
class H1Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)
    informational: list[int] = field(default_factory=list)


class H1Client:
    """HTTP/1.1 over an HBONE tunnel, keep-alive, with h11."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.conn = h11.Connection(h11.CLIENT)

    async def _next(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await asyncio.wait_for(self.tunnel.read(), WAIT))

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | Sequence[bytes] = b"",
        *,
        host: str = "web.default.svc.cluster.local",
    ) -> H1Response:
        chunks = [body] if isinstance(body, bytes) else list(body)
        all_headers = [("host", host), *headers]
        if isinstance(body, bytes) and body:
            all_headers.append(("content-length", str(len(body))))
        elif not isinstance(body, bytes):
            all_headers.append(("transfer-encoding", "chunked"))
        self.tunnel.write(
            self.conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        )
        for chunk in chunks:
            if chunk:
                self.tunnel.write(self.conn.send(h11.Data(data=chunk)) or b"")
                await self.tunnel.drain()
        self.tunnel.write(self.conn.send(h11.EndOfMessage()) or b"")
        return await self.response()

    async def response(self) -> H1Response:
        informational: list[int] = []
        while True:
            event = await self._next()
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                continue
            assert isinstance(event, h11.Response), event
            break
        headers = {n.decode(): v.decode() for n, v in event.headers}
        body = bytearray()
        trailers: dict[str, str] = {}
        while True:
            part = await self._next()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                trailers = {n.decode(): v.decode() for n, v in part.headers}
                break
            else:
                raise AssertionError(f"unexpected {part!r}")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return H1Response(event.status_code, headers, bytes(body), trailers, informational)


async def raw_exchange(tunnel: Tunnel, data: bytes, within: float = WAIT) -> bytes:
    """Send raw bytes, read until the waypoint closes (or `within` passes); everything it sent."""
    tunnel.write(data)
    received = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    with contextlib.suppress(Exception):
        while loop.time() < deadline:
            chunk = await asyncio.wait_for(tunnel.read(), deadline - loop.time())
            if not chunk:
                break
            received += chunk
    return bytes(received)


async def exchange_until_close(tunnel: Tunnel, data: bytes, within: float = WAIT) -> tuple[bytes, bool]:
    """Send raw bytes; everything the waypoint answered, and whether it then closed its side."""
    tunnel.write(data)
    received = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    try:
        while loop.time() < deadline:
            chunk = await asyncio.wait_for(tunnel.read(), deadline - loop.time())
            if not chunk:
                return bytes(received), True
            received += chunk
    except TimeoutError:
        return bytes(received), False
    except Exception:
        return bytes(received), True  # reset: closed too
    return bytes(received), False


def status_of(raw: bytes) -> int:
    line = raw.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@dataclass
class H2Stream:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(dict(self.headers).get(":status", "0"))


class H2Client:
    """HTTP/2 (prior knowledge) over an HBONE tunnel; validation off so tests can send malformed
    requests; a reader task collects responses per stream."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="latin-1",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.streams: dict[int, H2Stream] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> H2Client:
        self.h2.initiate_connection()
        self.flush()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.tunnel.closed:
            self.tunnel.write(data)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.tunnel.close()

    async def _read_loop(self) -> None:
        try:
            while data := await self.tunnel.read():
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._on_event(event)
                self.flush()
                self.changed.set()
        except Exception:
            pass
        finally:
            self.closed = True
            self.changed.set()

    def _on_event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self.streams.setdefault(sid, H2Stream()) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = [(str(n), str(v)) for n, v in event.headers or []]
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.body += event.data or b""
            self.h2.acknowledge_received_data(event.flow_controlled_length or 0, sid or 0)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = [(str(n), str(v)) for n, v in event.headers or []]
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def send(self, headers: Sequence[tuple[str, str]], body: bytes = b"", *, end_stream: bool = True) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.streams[stream_id] = H2Stream()
        encoded = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        self.h2.send_headers(stream_id, encoded, end_stream=end_stream and not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=end_stream)
        self.flush()
        return stream_id

    async def wait(self, predicate: Callable[[], bool], within: float = WAIT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            if self.closed:
                if predicate():
                    return
                raise ConnectionError("the HTTP/2 connection closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("condition not reached")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def response(self, stream_id: int) -> H2Stream:
        stream = self.streams[stream_id]
        await self.wait(lambda: stream.ended or stream.reset is not None)
        return stream


def request_headers(
    path: str = "/", method: str = "GET", authority: str = "web.default.svc.cluster.local", **extra: str
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "http"),
        (":authority", authority),
        (":path", path),
        *((k.replace("_", "-"), v) for k, v in extra.items()),
    ]


def waypoint_identity(mesh_: Mesh) -> Identity:
    return mesh_.waypoint_cert.identity
