"""Test helpers for HBONE: real workload certificates from the controller's CA, loopback upstreams, an
HBONE server fixture and a raw HTTP/2-over-TLS client that can send whatever a hostile peer would."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hyperframe.frame import Frame

from controller.ca.authority import CertificateAuthority
from loom.hbone import (
    ClientLimits,
    ConnectionPool,
    Decision,
    HboneServer,
    ServerLimits,
    Tunnel,
    TunnelRequest,
)
from loom.hbone.connection import release_unwrapped_socket, socket_inode
from loom.identity import Identity, WorkloadCertificate

WAIT = 10.0  # upper bound of every wait in these tests; normal runs take milliseconds


def make_csr(identity: Identity) -> tuple[str, str]:
    """(key PEM, CSR PEM) for `identity`: EC P-256, empty subject, one critical URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass
class Pki:
    """A trust domain with its CA; issues real workload certificates."""

    ca: CertificateAuthority
    trust_domain: str
    extra_roots: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, state_dir: Path, trust_domain: str = "cluster.local") -> Pki:
        return cls(CertificateAuthority.load_or_create(state_dir, trust_domain), trust_domain)

    @property
    def roots_pem(self) -> str:
        return self.ca.trust_bundle_pem + "".join(self.extra_roots)

    def issue(self, namespace: str, service_account: str) -> WorkloadCertificate:
        identity = Identity(self.trust_domain, namespace, service_account)
        key_pem, csr_pem = make_csr(identity)
        chain = self.ca.sign(csr_pem, identity)
        leaf = x509.load_pem_x509_certificate(chain[0].encode("ascii"))
        return WorkloadCertificate(
            identity=identity,
            key_pem=key_pem,
            chain_pem=tuple(chain[:-1]),  # leaf first, without the root
            roots_pem=self.roots_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
        )


# ------------------------------------------------------------------------------------------ upstreams


@dataclass
class Upstream:
    """A loopback TCP server standing in for an application."""

    server: asyncio.Server
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


async def start_echo(host: str = "127.0.0.1") -> Upstream:
    """Echoes every byte back; half-closes after the client does."""
    holder: list[Upstream] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].connections += 1
        try:
            while data := await reader.read(256 * 1024):
                holder[0].received += data
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0)
    holder.append(Upstream(server))
    return holder[0]


async def start_recorder(host: str = "127.0.0.1") -> Upstream:
    """Records every byte it receives and sends nothing."""
    holder: list[Upstream] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].connections += 1
        try:
            while data := await reader.read(65536):
                holder[0].received += data
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0)
    holder.append(Upstream(server))
    return holder[0]


def tcp_connector(address: tuple[str, int]) -> Callable[[], Awaitable[socket.socket]]:
    """An upstream connector dialling `address` (the ztunnel's would dial inside the pod netns)."""

    async def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def listening_socket(host: str, *, sndbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        # Accepted sockets inherit it: a small kernel buffer makes "the peer is not reading" visible fast.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def echo_handler(
    upstream: Upstream, calls: list[TunnelRequest] | None = None
) -> Callable[[TunnelRequest], Awaitable[Decision]]:
    """A handler allowing every request, dialling `upstream` whatever the authority says."""

    async def handle(request: TunnelRequest) -> Decision:
        if calls is not None:
            calls.append(request)
        return Decision(200, tcp_connector(upstream.address))

    return handle


@dataclass
class ServerUnderTest:
    server: HboneServer
    address: tuple[str, int]
    certificate: WorkloadCertificate


@contextlib.asynccontextmanager
async def running_server(
    certificate: WorkloadCertificate,
    handler: Callable[[TunnelRequest], Awaitable[Decision]],
    *,
    host: str = "127.0.0.2",
    limits: ServerLimits | None = None,
    sndbuf: int | None = None,
    allow_hostname_authority: bool = False,
) -> AsyncIterator[ServerUnderTest]:
    server = HboneServer(
        lambda: certificate, handler, limits, allow_hostname_authority=allow_hostname_authority
    )
    sock = listening_socket(host, sndbuf=sndbuf)
    address = sock.getsockname()[:2]
    try:
        server.serve(sock)
        yield ServerUnderTest(server, address, certificate)
    finally:
        await server.close()
        sock.close()


async def send_and_digest(tunnel: Tunnel, payload: bytes, *, chunk: int = 1 << 20) -> bytes:
    """Write `payload` into the tunnel in `chunk`-sized writes (each drained), then EOF, while reading
    everything that comes back; the SHA-256 digest of what came back, once the peer ended its side."""

    async def read_all() -> bytes:
        digest = hashlib.sha256()
        while data := await tunnel.read():
            digest.update(data)
        return digest.digest()

    reader = asyncio.ensure_future(read_all())
    try:
        for offset in range(0, len(payload), chunk):
            tunnel.write(payload[offset : offset + chunk])
            await tunnel.drain()
        tunnel.write_eof()
        return await asyncio.wait_for(reader, WAIT)
    finally:
        reader.cancel()


@contextlib.asynccontextmanager
async def pool(limits: ClientLimits | None = None, **kwargs: object) -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(limits, **kwargs)  # type: ignore[arg-type]
    try:
        yield p
    finally:
        await p.close()


# ------------------------------------------------------------------------------------ raw h2 client


def raw_client_context(certificate: WorkloadCertificate, tmp_dir: Path) -> ssl.SSLContext:
    """A plain ssl client context (not loom's) presenting `certificate`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(cadata=certificate.roots_pem)
    path = tmp_dir / f"client-{certificate.serial}.pem"
    path.write_text(certificate.key_pem + "".join(certificate.chain_pem))
    ctx.load_cert_chain(str(path))
    return ctx


class RawH2Client:
    """An HTTP/2 client over TLS driven by the test: h2 for well-formed frames (with validation off, so
    it sends malformed requests too) plus raw frame bytes for the rest."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    async def connect(
        cls,
        address: tuple[str, int],
        context: ssl.SSLContext,
        *,
        rcvbuf: int | None = None,
        window: int | None = None,
    ) -> RawH2Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        inode = socket_inode(sock)
        try:
            reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname="")
        except BaseException:
            release_unwrapped_socket(sock, inode)
            raise
        client = cls(reader, writer)
        client.h2.initiate_connection()
        if window is not None:
            client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            client.h2.increment_flow_control_window(window)
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def frame(self, frame: Frame) -> None:
        self.writer.write(frame.serialize())

    async def request(self, headers: Sequence[tuple[str, str]], *, end_stream: bool = False) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in headers], end_stream=end_stream)
        await self.flush()
        return stream_id

    async def read_events(self, within: float = 1.0) -> list[h2.events.Event]:
        """Events from whatever arrives within `within` seconds (empty at EOF)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), within)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = self.reader.at_eof() or self.closed
            return []
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        self.events.extend(events)
        with contextlib.suppress(ConnectionError):
            await self.flush()
        return events

    async def wait_for(
        self, predicate: Callable[[h2.events.Event], bool], within: float = WAIT
    ) -> h2.events.Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        for event in self.events:
            if predicate(event):
                return event
        while loop.time() < deadline:
            events = await self.read_events(min(0.5, deadline - loop.time()))
            for event in events:
                if predicate(event):
                    return event
            if self.closed:
                break
        raise TimeoutError("expected HTTP/2 event did not arrive")

    async def response_status(self, stream_id: int, within: float = WAIT) -> int:
        event = await self.wait_for(
            lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id, within
        )
        assert isinstance(event, h2.events.ResponseReceived)
        return int(dict(event.headers or [])[b":status"])

    async def wait_closed(self, within: float = WAIT) -> None:
        """Read (and drop) until the server closes the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 20), deadline - loop.time())
            except (ConnectionError, ssl.SSLError):
                return
            except TimeoutError:
                break
            if not data:
                return
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.events.extend(self.h2.receive_data(data))
        raise TimeoutError("server did not close the connection")

    def close(self) -> None:
        self.writer.close()
