"""The HBONE client: a pool of mTLS HTTP/2 connections and CONNECT tunnels over them.

Theory of operation
-------------------
`ConnectionPool.connect()` returns a `Tunnel` (one CONNECT stream) to `authority` through the next hop
(the destination pod's or the waypoint's ip:15008). Connections are pooled per `PoolKey` = (source
identity, expected destination identities, next hop, source ip) as ztunnel does:

* a connection carries at most min(100, the server's MAX_CONCURRENT_STREAMS) streams; when all of a
  key's connections are full another one is dialled;
* one dial per key is in flight at a time: concurrent callers wait for it and share its result (or
  its error: one unreachable peer costs one connect timeout, not one per waiting caller);
* connections that received a GOAWAY, or whose keepalive failed, are never handed out again; streams
  the server refused (REFUSED_STREAM, or above the GOAWAY's last stream id) are retried on another
  connection, since the server promises it did not process them;
* a connection without streams for `idle_timeout` (5 minutes) is closed.

The TCP socket is created by `socket_factory(next_hop, source_ip)`: the ztunnel passes one that creates
it inside the pod's network namespace with SO_MARK and the pod's source address. The connect is bounded
by `connect_timeout`, with ztunnel's hint that a NetworkPolicy may be blocking port 15008.

The server's identity is checked against the expected set right after the TLS handshake; no SNI is
sent. A CONNECT answered with anything but 200 raises `HboneRejected` (401 policy denied, 503 upstream
unavailable, 400 bad request).

`Tunnel` has read()/write()/drain()/write_eof()/close() for code that handles bytes itself; `pump()`
copies between a tunnel and an asyncio stream pair, and `pump_socket()` joins a tunnel directly to a
connected socket (callback-driven, no task per chunk: the fast path). Both half-close properly and
return the byte counts for metrics and access logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from loom.hbone.connection import (
    DEFAULT_READ_SIZE,
    Address,
    ChunkSink,
    H2Endpoint,
    SocketBridge,
    StreamChannel,
    StreamTunnel,
    configure_tcp,
    logger,
    wrap_socket,
)
from loom.hbone.errors import (
    AlpnMismatch,
    HboneConnectionError,
    HboneConnectTimeout,
    HboneError,
    HboneRejected,
    IdentityMismatch,
    PeerCertificateError,
    StreamRefused,
)
from loom.hbone.headers import format_address
from loom.hbone.limits import ClientLimits
from loom.hbone.protocol import GoAway
from loom.hbone.stats import HboneStats
from loom.hbone.tls import ContextCache, check_alpn, check_server_identity, client_context, peer_identity
from loom.identity import Identity, WorkloadCertificate

SocketFactory = Callable[[Address, str | None], Awaitable[socket.socket]]

# A refused stream is retried on another connection this many times.
MAX_CONNECT_ATTEMPTS = 3
# Rounds of "wait for the dial, find the new connection full" before giving up (bounded loop).
MAX_CHECKOUT_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: Identity  # who we are (the client certificate's identity)
    destinations: frozenset[Identity]  # identities the server may prove
    next_hop: Address  # ip:15008 the TCP connection goes to
    source_ip: str | None = None  # the (possibly spoofed) source address the socket binds to


async def default_socket_factory(next_hop: Address, source_ip: str | None) -> socket.socket:
    """A plain TCP connection from this host (tests, and callers outside any pod network namespace)."""
    host, port = next_hop
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        configure_tcp(sock)
        if source_ip:
            sock.bind((source_ip, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class ClientConnection(H2Endpoint):
    server_side = False

    def __init__(self, pool: ConnectionPool, key: PoolKey) -> None:
        super().__init__(pool.limits, pool.stats)
        self.pool = pool
        self.key = key
        self.client_limits = pool.limits
        # Until the server's SETTINGS arrive, assume ztunnel's initial_max_send_streams.
        self.peer_max_streams = pool.limits.max_streams_per_connection
        self._responses: dict[int, asyncio.Future[tuple[int, list[tuple[str, str]]]]] = {}

    def _local_settings(self) -> dict[int, int]:
        limits = self.client_limits
        return {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        }

    @property
    def _idle_timeout(self) -> float | None:
        return self.client_limits.idle_timeout

    def _on_tls_established(self, ssl_object: ssl.SSLObject) -> None:
        check_alpn(ssl_object)
        identity = peer_identity(ssl_object)
        self.peer_identity = identity
        check_server_identity(identity, self.key.destinations)

    @property
    def capacity(self) -> int:
        return min(self.client_limits.max_streams_per_connection, self.peer_max_streams)

    @property
    def usable(self) -> bool:
        return not self.closing and self.goaway_received is None and self.transport is not None

    def has_room(self) -> bool:
        return self.usable and len(self.channels) < self.capacity

    # ------------------------------------------------------------------ events

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream_id = event.stream_id
            future = self._responses.pop(stream_id or 0, None)
            if future is None or future.done():
                return
            status = 0
            headers: list[tuple[str, str]] = []
            for name, value in event.headers or []:
                key = name.decode("latin-1") if isinstance(name, bytes) else name
                text = value.decode("latin-1") if isinstance(value, bytes) else value
                if key == ":status":
                    status = int(text) if text.isdigit() else 0
                elif not key.startswith(":"):
                    headers.append((key, text))
            future.set_result((status, headers))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None and changed.new_value is not None:
                self.peer_max_streams = changed.new_value

    def _on_goaway(self, goaway: GoAway) -> None:
        self.pool._forget(self)
        for stream_id, channel in list(self.channels.items()):
            if stream_id > goaway.last_stream_id:
                self.reset_stream(
                    channel,
                    ErrorCodes.CANCEL,
                    StreamRefused(f"stream {stream_id} not processed: server sent GOAWAY"),
                )
        if not self.channels:
            self.close_gracefully("peer_goaway")

    def _on_channel_finished(self, channel: StreamChannel) -> None:
        future = self._responses.pop(channel.stream_id, None)
        if future is not None and not future.done():
            error = channel.error
            if channel.reset_code == ErrorCodes.REFUSED_STREAM:
                error = StreamRefused(f"stream {channel.stream_id} refused by the server")
            future.set_exception(error or HboneConnectionError("stream closed before the response"))
        if self.goaway_received is not None and not self.channels and not self.closing:
            self.close_gracefully("peer_goaway")

    def _on_idle(self) -> None:
        self.pool._forget(self)
        self.close_gracefully("idle_timeout")

    def _on_connection_lost(self) -> None:
        self.pool._forget(self)
        for future in self._responses.values():
            if not future.done():
                future.set_exception(HboneConnectionError(f"connection to {self.peer_label} closed"))
        self._responses.clear()

    # ------------------------------------------------------------------ streams

    async def open_tunnel(self, authority: str, headers: Sequence[tuple[str, str]]) -> Tunnel:
        """Send a CONNECT on this connection and wait for the answer."""
        if not self.has_room():
            raise StreamRefused("connection has no room for another stream")
        stream_id = self.h2.get_next_available_stream_id()
        channel = StreamChannel(self, stream_id)
        channel.sink = ChunkSink(channel)
        future: asyncio.Future[tuple[int, list[tuple[str, str]]]] = self.loop.create_future()
        self._responses[stream_id] = future
        self.channels[stream_id] = channel
        self._disarm_idle()
        request = [(":method", "CONNECT"), (":authority", authority), *headers]
        try:
            self.send_headers(channel, request, end_stream=False)
        except h2.exceptions.TooManyStreamsError as e:
            self._finish(channel, StreamRefused(str(e)))
            raise StreamRefused(f"server allows fewer streams: {e}") from e
        except h2.exceptions.ProtocolError as e:
            self._finish(channel, HboneConnectionError(str(e)))
            raise HboneConnectionError(f"cannot open a stream to {self.peer_label}: {e}") from e
        try:
            status, response_headers = await asyncio.wait_for(
                asyncio.shield(future), self.client_limits.response_timeout
            )
        except TimeoutError:
            self.guarded(self.reset_stream, channel, ErrorCodes.CANCEL, HboneConnectionError("no response"))
            raise HboneError(
                f"CONNECT {authority}: no response from {self.peer_label} within "
                f"{self.client_limits.response_timeout:g} s"
            ) from None
        except asyncio.CancelledError:
            self.guarded(self.reset_stream, channel, ErrorCodes.CANCEL, HboneConnectionError("cancelled"))
            raise
        self.stats.response(status)
        if status != 200:
            if not channel.finished:
                self.guarded(self.reset_stream, channel, ErrorCodes.CANCEL, None)
            raise HboneRejected(status, authority)
        channel.can_send = True
        channel.responded_at = self.loop.time()
        return Tunnel(self, channel, tuple(response_headers))


class Tunnel(StreamTunnel):
    """One established HBONE tunnel (a CONNECT stream answered 200), from the client's side."""

    connection: ClientConnection

    def __init__(
        self,
        connection: ClientConnection,
        channel: StreamChannel,
        response_headers: tuple[tuple[str, str], ...],
    ) -> None:
        super().__init__(connection, channel)
        self.response_headers = response_headers

    def response_header(self, name: str) -> str | None:
        return next((v for k, v in self.response_headers if k == name), None)

    def close(self) -> None:
        """Close now: a tunnel not finished both ways is reset (CANCEL)."""
        self.abort()

    def splice(self, bridge: SocketBridge) -> None:
        self._spliced = True
        channel = self._channel
        channel.set_producer(bridge)
        channel.attach_sink(bridge)
        self.connection.guarded(self.connection.pump_out, channel)


@dataclass(frozen=True, slots=True)
class PumpResult:
    sent: int  # bytes from the local side into the tunnel
    received: int  # bytes from the tunnel to the local side
    error: str | None  # None when both directions closed cleanly


async def pump(
    tunnel: Tunnel,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    read_size: int = DEFAULT_READ_SIZE,
) -> PumpResult:
    """Copy both ways between a tunnel and a local stream pair, with half-close, until both are done."""

    async def outbound() -> None:
        while True:
            data = await reader.read(read_size)
            if not data:
                tunnel.write_eof()
                return
            tunnel.write(data)
            await tunnel.drain()

    async def inbound() -> None:
        while True:
            data = await tunnel.read(read_size)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    error: str | None = None
    tasks = [asyncio.ensure_future(outbound()), asyncio.ensure_future(inbound())]
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except (OSError, HboneError) as e:
                error = str(e) or type(e).__name__
                break
        if error is None:
            await tunnel.wait_closed()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if error is not None or not tunnel.closed:
            tunnel.close()
        writer.close()
        with contextlib.suppress(OSError, HboneError):
            await writer.wait_closed()
    return PumpResult(tunnel.sent, tunnel.received, error)


async def pump_socket(tunnel: Tunnel, sock: socket.socket) -> PumpResult:
    """Join a tunnel to a connected socket until both directions are done (the fast path)."""
    connection = tunnel.connection
    bridge = SocketBridge(tunnel._channel, connection.client_limits.local_write_high_water)
    sock.setblocking(False)
    try:
        await wrap_socket(lambda: bridge, sock)
    except OSError as e:
        tunnel.close()
        return PumpResult(tunnel.sent, tunnel.received, f"local socket: {e}")
    tunnel.splice(bridge)
    try:
        await tunnel.wait_closed()
    except asyncio.CancelledError:
        tunnel.close()
        bridge.fail(HboneConnectionError("cancelled"))
        raise
    error = tunnel.error
    return PumpResult(tunnel.sent, tunnel.received, None if error is None else str(error))


class _PoolEntry:
    __slots__ = ("connections", "dialing")

    def __init__(self) -> None:
        self.connections: list[ClientConnection] = []
        self.dialing: asyncio.Task[ClientConnection] | None = None


class ConnectionPool:
    """HBONE connections pooled per (source identity, destination identities, next hop, source ip)."""

    def __init__(
        self,
        limits: ClientLimits | None = None,
        *,
        socket_factory: SocketFactory | None = None,
        stats: HboneStats | None = None,
        contexts: ContextCache | None = None,
    ) -> None:
        self.limits = limits or ClientLimits()
        self.socket_factory = socket_factory or default_socket_factory
        self.stats = stats or HboneStats("client")
        self.contexts = contexts
        self._entries: dict[PoolKey, _PoolEntry] = {}
        self._closed = False

    def connections(self) -> list[ClientConnection]:
        return [c for entry in self._entries.values() for c in entry.connections]

    async def connect(
        self,
        source_cert: WorkloadCertificate,
        expected_identities: Collection[Identity],
        next_hop: Address,
        authority: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        source_ip: str | None = None,
    ) -> Tunnel:
        """A tunnel to `authority` through `next_hop`; raises HboneRejected for a non-200 answer."""
        if self._closed:
            raise HboneError("connection pool is closed")
        destinations = frozenset(expected_identities)
        if not destinations:
            raise ValueError("expected_identities must name at least one identity")
        key = PoolKey(source_cert.identity, destinations, (next_hop[0], int(next_hop[1])), source_ip)
        last_error: StreamRefused | None = None
        for _ in range(MAX_CONNECT_ATTEMPTS):
            connection = await self._checkout(key, source_cert)
            try:
                return await connection.open_tunnel(authority, headers)
            except StreamRefused as e:
                last_error = e
        assert last_error is not None
        raise last_error

    async def _checkout(self, key: PoolKey, certificate: WorkloadCertificate) -> ClientConnection:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _PoolEntry()
        for _ in range(MAX_CHECKOUT_ROUNDS):
            for connection in entry.connections:
                if connection.has_room():
                    return connection
            dialing = entry.dialing
            if dialing is None:
                dialing = entry.dialing = asyncio.get_running_loop().create_task(
                    self._dial_into(entry, key, certificate), name="hbone-dial"
                )
                # Waiters may all be gone when it fails; the error is theirs, not the loop's.
                dialing.add_done_callback(lambda t: t.cancelled() or t.exception())
            await asyncio.shield(dialing)
        raise HboneConnectionError(
            f"no HBONE connection to {format_address(*key.next_hop)} has room for a stream"
        )

    async def _dial_into(
        self, entry: _PoolEntry, key: PoolKey, certificate: WorkloadCertificate
    ) -> ClientConnection:
        try:
            connection = await self._dial(key, certificate)
            entry.connections.append(connection)
            return connection
        finally:
            entry.dialing = None

    async def _dial(self, key: PoolKey, certificate: WorkloadCertificate) -> ClientConnection:
        limits = self.limits
        next_hop = format_address(*key.next_hop)
        self.stats.dial()
        try:
            sock = await asyncio.wait_for(
                self.socket_factory(key.next_hop, key.source_ip), limits.connect_timeout
            )
        except TimeoutError:
            self.stats.dial_failed("connect_timeout")
            raise HboneConnectTimeout(next_hop, limits.connect_timeout) from None
        except OSError as e:
            self.stats.dial_failed("connect_error")
            raise HboneConnectionError(f"{next_hop}: connect failed: {e.strerror or e}") from e
        context = client_context(certificate, self.contexts)
        protocol: ClientConnection | None = None

        def make_protocol() -> ClientConnection:
            nonlocal protocol
            protocol = ClientConnection(self, key)
            return protocol

        try:
            await wrap_socket(
                make_protocol,
                sock,
                ssl=context,
                server_hostname="",  # no SNI (and no hostname check: identities are verified below)
                ssl_handshake_timeout=limits.handshake_timeout,
            )
        except (ssl.SSLError, OSError) as e:
            self.stats.dial_failed("handshake_failed")
            raise HboneConnectionError(f"{next_hop}: TLS handshake failed: {e}") from e
        assert protocol is not None
        if protocol.setup_error is not None:
            error = protocol.setup_error
            reason = (
                "identity_mismatch"
                if isinstance(error, IdentityMismatch)
                else "alpn_mismatch"
                if isinstance(error, AlpnMismatch)
                else "bad_peer_certificate"
                if isinstance(error, PeerCertificateError)
                else "setup_failed"
            )
            self.stats.dial_failed(reason)
            raise error
        self.stats.connection_opened()
        logger.debug(
            "HBONE connection established",
            extra={"fields": {"peer": protocol.peer_label, "source": str(key.source)}},
        )
        return protocol

    def _forget(self, connection: ClientConnection) -> None:
        entry = self._entries.get(connection.key)
        if entry is None:
            return
        with contextlib.suppress(ValueError):
            entry.connections.remove(connection)
        if not entry.connections and entry.dialing is None:
            del self._entries[connection.key]

    async def close(self) -> None:
        """Close every connection (GOAWAY, then close) and stop dialling."""
        self._closed = True
        closing: list[asyncio.Future[None]] = []
        for entry in list(self._entries.values()):
            if entry.dialing is not None:
                entry.dialing.cancel()
            for connection in list(entry.connections):
                connection.close_gracefully("pool_closed")
                closing.append(connection.closed)
        self._entries.clear()
        if closing:
            await asyncio.wait(closing, timeout=self.limits.keepalive_timeout)
