"""The HBONE server: TLS 1.3 mTLS + HTTP/2 CONNECT on already-bound listening sockets (port 15008).

Theory of operation
-------------------
The ztunnel creates each listening socket inside a pod's network namespace and hands it to
`HboneServer.serve(sock)`. The server accepts in its own loop, which lets it refuse connections over
`max_connections` before any TLS work, ask the certificate provider for the *current* certificate of
that listener per connection (rotation needs no restart; a provider may wait until the certificate
exists), and bound the handshake (`handshake_timeout`). After the handshake the client must present a
certificate of our trust domain, else the connection is dropped before any HTTP/2 byte.

Per stream (`ServerConnection._on_request`):

1. The CONNECT is validated (`parse_connect_request`): a bad one is answered 400 with the reason
   counted, and nothing else happens — the handler is not called, nothing is dialled.
2. Excess streams (more than MAX_CONCURRENT_STREAMS open, or after our GOAWAY) get REFUSED_STREAM.
3. The handler decides (`Decision`): authorization, and which socket to dial. Until then DATA from the
   client (early data) is held in a bounded buffer, never written anywhere; over the bound the stream
   is reset, on a non-200 answer it is discarded.
4. Only for a 200 is the upstream dialled; only once it is connected is `:status 200` sent and the
   stream joined to the upstream socket (see connection.py for the pumping and back-pressure).
   A handler that serves the stream itself (the waypoint parses HTTP in it) answers with `serve`
   instead: `:status 200` is sent and it gets the stream as a `ServerStream` (read/write/drain), the
   early data first; no socket is involved.

Protection (each counted by reason in `HboneStats`): rapid reset (`ResetTracker`), control-frame and
outbound-queue floods, header block / CONTINUATION / header list caps, frame size, empty-frame and
PRIORITY floods (connection.py / protocol.py), connection cap, handshake timeout, idle timeout. Each
connection runs under a guard: an exception ends that connection only.

h2 treats a HEADERS frame beyond SETTINGS_MAX_CONCURRENT_STREAMS as a connection error, which would
take every tunnel on the connection down with it. RFC 9113 §5.1.2 allows refusing just that stream, so
`_ServerH2Connection` lifts h2's own check (its headers are still decoded: HPACK stays in sync) and the
server refuses the stream itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from loom.hbone.connection import (
    Address,
    ChunkSink,
    FastDataH2Connection,
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
    HboneError,
    PeerCertificateError,
    TrustDomainMismatch,
)
from loom.hbone.headers import BAGGAGE, FORWARDED, TRACEPARENT, format_address
from loom.hbone.limits import ServerLimits
from loom.hbone.protocol import BadRequest, ConnectTarget, GoAway, ResetTracker, parse_connect_request
from loom.hbone.stats import HboneStats
from loom.hbone.tls import (
    ContextCache,
    check_alpn,
    check_client_trust_domain,
    peer_identity,
    server_context,
)
from loom.identity import Identity, WorkloadCertificate

UpstreamConnector = Callable[[], Awaitable[socket.socket]]
CertificateProvider = Callable[[], WorkloadCertificate | Awaitable[WorkloadCertificate]]

DEFAULT_REJECT_REASONS = {
    400: "bad_request",
    401: "policy_denied",
    403: "policy_denied",
    503: "upstream_unavailable",
}


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """A validated CONNECT, as the handler sees it."""

    stream_id: int
    target: ConnectTarget  # the :authority, parsed (ip or, when allowed, hostname; port)
    authority: str  # the :authority as received
    headers: tuple[tuple[str, str], ...]  # regular headers in order (forwarded, baggage, traceparent, ...)
    peer_identity: Identity  # from the client's certificate: the only identity to trust
    local_address: Address  # the listener address that accepted the connection (the pod's ip:15008)
    remote_address: Address  # the connecting node/pod address

    def header(self, name: str) -> str | None:
        """First value of a header (names are lower-case in HTTP/2)."""
        return next((v for k, v in self.headers if k == name), None)

    @property
    def forwarded(self) -> str | None:
        return self.header(FORWARDED)

    @property
    def baggage(self) -> str | None:
        return self.header(BAGGAGE)

    @property
    def traceparent(self) -> str | None:
        return self.header(TRACEPARENT)


@dataclass(frozen=True, slots=True)
class TunnelResult:
    """How a tunnel ended (for metrics and the access log)."""

    request: TunnelRequest
    received: int  # bytes from the HBONE client (written upstream)
    sent: int  # bytes to the HBONE client (read from upstream)
    duration: float  # seconds from the request to the end
    reset_code: int | None  # HTTP/2 error code when the stream ended with RST_STREAM
    error: str | None  # why the tunnel failed, None for a clean close


@dataclass(frozen=True, slots=True)
class Decision:
    """The handler's answer. 200 needs either `upstream`, a coroutine function returning a connected
    socket (the ztunnel creates it in the pod's netns with the client's source address), or `serve`,
    called with the open stream right after the 200 is sent (it must not block: start a task)."""

    status: int
    upstream: UpstreamConnector | None = None
    serve: StreamHandler | None = field(default=None, compare=False)
    reason: str = ""  # counter label / log text for a refusal ("policy_denied", "no_workload", ...)
    response_headers: tuple[tuple[str, str], ...] = ()  # e.g. the destination's baggage on a 200
    on_close: Callable[[TunnelResult], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"HBONE status {self.status} is not a final HTTP status (200..599)")
        if self.status == 200 and (self.upstream is None) == (self.serve is None):
            raise ValueError("a 200 decision needs exactly one of an upstream connector and a stream server")


Handler = Callable[[TunnelRequest], Awaitable[Decision]]


class _ServerH2Connection(FastDataH2Connection):
    """h2 with its inbound MAX_CONCURRENT_STREAMS check lifted (see the module docstring)."""

    @property
    def open_inbound_streams(self) -> int:
        # h2 reads this property only for its stream-limit check. Keep its side effect (forgetting
        # closed streams) and report no open streams; the server counts and refuses streams itself.
        self._open_streams(1)
        return 0


class ServerStream(StreamTunnel):
    """An accepted stream served by the handler itself (`Decision.serve`).

    close() is a graceful close, as a socket's: what was written is still sent, then END_STREAM;
    whatever the client still sends is acknowledged and dropped, and a pending read() returns b"".
    abort() resets the stream."""

    def __init__(self, connection: ServerConnection, channel: StreamChannel, request: TunnelRequest) -> None:
        super().__init__(connection, channel)
        self.request = request
        self._closed_locally = False

    def is_closing(self) -> bool:
        return self._closed_locally or self._channel.finished or self._channel.eof_queued

    def write(self, data: bytes | memoryview) -> None:
        """As a socket's writer: bytes written after close() or once the stream ended are dropped
        (drain() and read() report a failed stream)."""
        if self._closed_locally or self._channel.finished:
            return
        super().write(data)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closed_locally:
            return
        self._closed_locally = True
        channel = self._channel
        if channel.finished:
            return
        sink = channel.sink
        if isinstance(sink, ChunkSink):
            self.connection.guarded(sink.discard)
        self.write_eof()


StreamHandler = Callable[[ServerStream], None]


class ServerTunnel:
    """A live tunnel, for the ztunnel's connection table and policy re-checks."""

    __slots__ = ("_channel", "_connection", "opened_at", "request")

    def __init__(self, connection: ServerConnection, channel: StreamChannel, request: TunnelRequest) -> None:
        self._connection = connection
        self._channel = channel
        self.request = request
        self.opened_at = channel.opened_at

    @property
    def received(self) -> int:
        return self._channel.received

    @property
    def sent(self) -> int:
        return self._channel.sent

    @property
    def closed(self) -> bool:
        return self._channel.finished

    def close(self, reason: str) -> None:
        """Reset the stream and abort the upstream (e.g. a policy change no longer allows it)."""
        if self._channel.finished:
            return
        self._connection.stats.request_rejected(reason)
        self._connection.guarded(
            self._connection.reset_stream,
            self._channel,
            ErrorCodes.CANCEL,
            HboneConnectionError(f"tunnel closed: {reason}"),
        )


class ServerConnection(H2Endpoint):
    server_side = True

    def __init__(self, server: HboneServer, certificate: WorkloadCertificate) -> None:
        self.server = server
        self.certificate = certificate
        self.server_limits = server.limits
        super().__init__(server.limits, server.stats)
        self.tracker = ResetTracker(server.limits.rapid_reset_min_streams)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.tunnels: dict[int, ServerTunnel] = {}
        self.draining = False

    def _make_h2(self) -> FastDataH2Connection:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # Our own validation answers 400 on the stream; h2's would fail the whole connection.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        return _ServerH2Connection(config)

    def _local_settings(self) -> dict[int, int]:
        limits = self.server_limits
        return {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            SettingCodes.ENABLE_PUSH: 0,
        }

    @property
    def _idle_timeout(self) -> float | None:
        return self.server_limits.idle_timeout

    def _on_tls_established(self, ssl_object: ssl.SSLObject) -> None:
        check_alpn(ssl_object)
        identity = peer_identity(ssl_object)
        self.peer_identity = identity
        check_client_trust_domain(identity, self.certificate.identity)

    # ------------------------------------------------------------------ requests

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_id is not None:
            # RFC 9113 §8.5: only DATA, RST_STREAM, WINDOW_UPDATE and PRIORITY after a CONNECT.
            channel = self.channels.get(event.stream_id)
            if channel is not None:
                self.reset_stream(
                    channel, ErrorCodes.PROTOCOL_ERROR, HboneConnectionError("trailers on a tunnel")
                )
            else:
                self._reset_unknown(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _reset_unknown(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass
        self._schedule_flush()

    def _refuse(self, stream_id: int, reason: str) -> None:
        self.stats.request_rejected(reason)
        self._reset_unknown(stream_id, ErrorCodes.REFUSED_STREAM)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        if self.draining or (
            self.goaway_sent_last_stream is not None and stream_id > self.goaway_sent_last_stream
        ):
            self._refuse(stream_id, "draining")
            return
        if len(self.channels) >= self.server_limits.max_concurrent_streams:
            self._refuse(stream_id, "too_many_streams")
            # Refused streams cost us a frame each; a client that keeps opening them is counted too.
            self.tracker.stream_opened()
            if self.tracker.stream_reset(premature=True):
                self._rapid_reset()
            return
        self.tracker.stream_opened()
        self.last_processed_stream = stream_id
        try:
            request = parse_connect_request(
                event.headers or [], allow_hostname=self.server.allow_hostname_authority
            )
        except BadRequest as e:
            self.stats.request_rejected(str(e.reason))
            self.stats.response(400)
            logger.info(
                "HBONE request rejected",
                extra={
                    "fields": {
                        "peer": self.peer_label,
                        "status": 400,
                        "reason": str(e.reason),
                        "detail": e.detail,
                    }
                },
            )
            try:
                self.h2.send_headers(stream_id, [(":status", "400")], end_stream=True)
                if not event.stream_ended:
                    self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._schedule_flush()
            return
        peer = self.peer_identity
        if peer is None:  # cannot happen: the connection exists only after the identity check passed
            raise HboneError("request on a connection without a verified peer identity")
        channel = StreamChannel(self, stream_id)
        channel.sink = ChunkSink(
            channel,
            limit=self.server_limits.early_data_limit,
            on_overflow=lambda: self._early_overflow(channel),
        )
        self.channels[stream_id] = channel
        self._disarm_idle()
        tunnel_request = TunnelRequest(
            stream_id=stream_id,
            target=request.target,
            authority=request.authority,
            headers=request.headers,
            peer_identity=peer,
            local_address=self.local_address,
            remote_address=self.remote_address,
        )
        task = self.loop.create_task(self._decide(channel, tunnel_request), name=f"hbone-decide-{stream_id}")
        self._tasks[stream_id] = task
        task.add_done_callback(functools.partial(self._forget_task, stream_id))
        channel.on_finish.append(self._cancel_decision)

    def _forget_task(self, stream_id: int, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(stream_id, None)

    def _cancel_decision(self, channel: StreamChannel) -> None:
        task = self._tasks.get(channel.stream_id)
        if task is not None and not task.done() and channel.responded_at is None:
            task.cancel()

    def _early_overflow(self, channel: StreamChannel) -> None:
        self.stats.request_rejected("early_data_overflow")
        self.reset_stream(
            channel,
            ErrorCodes.ENHANCE_YOUR_CALM,
            HboneConnectionError(
                f"more than {self.server_limits.early_data_limit} bytes before the response"
            ),
        )

    def _respond(
        self, channel: StreamChannel, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """A final non-200 answer: the early data is discarded, the stream closed."""
        if channel.finished or self.closing:
            return
        self.stats.response(status)
        self.stats.request_rejected(reason)
        logger.info(
            "HBONE request refused",
            extra={
                "fields": {
                    "peer": self.peer_label,
                    "stream": channel.stream_id,
                    "status": status,
                    "reason": reason,
                }
            },
        )
        channel.responded_at = self.loop.time()
        try:
            self.send_headers(channel, [(":status", str(status)), *headers], end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        if channel.remote_ended:
            self._finish(channel, None)
        else:
            # Tell the client to stop sending (RFC 9113 §8.1); whatever it sent is dropped.
            self.reset_stream(channel, ErrorCodes.NO_ERROR, None)

    async def _decide(self, channel: StreamChannel, request: TunnelRequest) -> None:
        limits = self.server_limits
        sock: socket.socket | None = None
        decision: Decision | None = None
        # Once the tunnel is open its own finish callback reports the result; until then this
        # method owes the handler's on_close a call whatever happens (connect failure, the client
        # resetting the stream, cancellation), so every admitted connection is accounted for once.
        opened = False
        started = self.loop.time()
        try:
            try:
                decision = await asyncio.wait_for(self.server.handler(request), limits.decision_timeout)
            except TimeoutError:
                self.guarded(self._respond, channel, 503, "decision_timeout")
                return
            except Exception:
                logger.exception("HBONE handler failed", extra={"fields": {"peer": self.peer_label}})
                self.guarded(self._respond, channel, 503, "handler_error")
                return
            if channel.finished:
                return
            if decision.status == 200 and decision.serve is not None:
                opened = True  # _open_tunnel registers the finish callback before anything can fail
                self.guarded(self._open_tunnel, channel, request, decision, None)
                return
            if decision.status != 200 or decision.upstream is None:
                reason = decision.reason or DEFAULT_REJECT_REASONS.get(
                    decision.status, f"status_{decision.status}"
                )
                self.guarded(self._respond, channel, decision.status, reason, decision.response_headers)
                return
            try:
                sock = await asyncio.wait_for(decision.upstream(), limits.upstream_connect_timeout)
            except TimeoutError:
                self.guarded(self._respond, channel, 503, "upstream_connect_timeout")
                return
            except OSError as e:
                logger.info(
                    "HBONE upstream connect failed",
                    extra={
                        "fields": {"peer": self.peer_label, "authority": request.authority, "error": str(e)}
                    },
                )
                self.guarded(self._respond, channel, 503, "upstream_connect_failed")
                return
            bridge = SocketBridge(channel, limits.upstream_write_high_water)
            owned, sock = sock, None  # the transport owns it from here, also when wrapping fails
            await wrap_socket(lambda: bridge, owned)
            if channel.finished or self.closing:
                bridge.fail(HboneConnectionError("stream ended before the upstream was ready"))
                return
            opened = True  # _open_tunnel registers the finish callback before anything can fail
            self.guarded(self._open_tunnel, channel, request, decision, bridge)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("HBONE tunnel setup failed", extra={"fields": {"peer": self.peer_label}})
            self.guarded(self._respond, channel, 503, "internal_error")
        finally:
            if sock is not None:
                sock.close()
            if decision is not None and decision.on_close is not None and not opened:
                error = channel.error if channel.error is not None else "the tunnel was not opened"
                decision.on_close(
                    TunnelResult(
                        request=request,
                        received=0,
                        sent=0,
                        duration=self.loop.time() - started,
                        reset_code=channel.reset_code,
                        error=str(error),
                    )
                )

    def _open_tunnel(
        self,
        channel: StreamChannel,
        request: TunnelRequest,
        decision: Decision,
        bridge: SocketBridge | None,
    ) -> None:
        """Answer 200 and join the stream to the upstream socket (`bridge`), or hand it to the
        decision's `serve`."""
        on_close = decision.on_close

        def finished(ch: StreamChannel) -> None:
            self.tunnels.pop(ch.stream_id, None)
            if on_close is not None:
                on_close(
                    TunnelResult(
                        request=request,
                        received=ch.received,
                        sent=ch.sent,
                        duration=self.loop.time() - ch.opened_at,
                        reset_code=ch.reset_code,
                        error=None if ch.error is None else str(ch.error),
                    )
                )

        channel.on_finish.append(finished)  # first: from here on `finished` reports the result
        self.tunnels[channel.stream_id] = ServerTunnel(self, channel, request)
        self.send_headers(channel, [(":status", "200"), *decision.response_headers], end_stream=False)
        self.stats.response(200)
        channel.responded_at = self.loop.time()
        channel.can_send = True
        if bridge is not None:
            channel.set_producer(bridge)
            channel.attach_sink(bridge)
            self.pump_out(channel)
            return
        sink = channel.sink
        if isinstance(sink, ChunkSink):
            sink.lift_limit()
        serve = decision.serve
        assert serve is not None  # a 200 decision has a bridge or a stream server
        stream = ServerStream(self, channel, request)
        try:
            serve(stream)
        except Exception as e:  # the handler's bug ends its stream, not the connection
            logger.exception("HBONE stream server failed", extra={"fields": {"peer": self.peer_label}})
            self.reset_stream(channel, ErrorCodes.INTERNAL_ERROR, HboneConnectionError(f"stream server: {e}"))

    # ------------------------------------------------------------------ resets, goaway, idle, drain

    def _on_stream_reset_by_peer(self, channel: StreamChannel) -> None:
        responded = channel.responded_at
        premature = responded is None or (
            self.loop.time() - channel.opened_at < self.server_limits.premature_reset_seconds
        )
        if self.tracker.stream_reset(premature):
            self._rapid_reset()

    def _rapid_reset(self) -> None:
        self.abandon(
            "rapid_reset",
            ErrorCodes.ENHANCE_YOUR_CALM,
            f"{self.tracker.premature} of {self.tracker.opened} streams reset prematurely",
        )

    def _on_goaway(self, goaway: GoAway) -> None:
        # A client going away: nothing new will come; close once our streams are done.
        self.draining = True
        if not self.channels:
            self.close_gracefully("peer_goaway")

    def _on_idle(self) -> None:
        self.close_gracefully("idle_timeout")

    def _on_channel_finished(self, channel: StreamChannel) -> None:
        if self.draining and not self.channels and not self.closing:
            self.close_gracefully("drained")

    def drain(self) -> None:
        """Stop taking new streams (GOAWAY NO_ERROR), close once the open ones end."""
        if self.closing or self.draining:
            return
        self.draining = True
        self.send_goaway(self.last_processed_stream)
        if not self.channels:
            self.close_gracefully("drained")

    def _on_connection_lost(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self.tunnels.clear()


def _refuse_socket(sock: socket.socket) -> None:
    """Close with RST: the client learns at once, and no TIME_WAIT is left behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 0.1  # seconds, after an accept error such as EMFILE: do not spin


class HboneServer:
    """Serves HBONE on listening sockets created by the caller."""

    def __init__(
        self,
        certificate: CertificateProvider,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        stats: HboneStats | None = None,
        contexts: ContextCache | None = None,
        allow_hostname_authority: bool = False,
    ) -> None:
        self.certificate_provider = certificate
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.stats = stats or HboneStats("server")
        self.contexts = contexts
        self.allow_hostname_authority = allow_hostname_authority
        self.connections: set[ServerConnection] = set()
        self._accept_tasks: dict[socket.socket, asyncio.Task[None]] = {}
        self._connection_tasks: set[asyncio.Task[None]] = set()
        self._active = 0  # accepted sockets, including those still in the handshake
        self._stopping = False

    # ------------------------------------------------------------------ listeners

    def serve(self, sock: socket.socket) -> None:
        """Start accepting on `sock` (bound and listening; made non-blocking here)."""
        if self._stopping:
            raise HboneError("server is shutting down")
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name=f"hbone-accept-{sock.fileno()}"
        )
        self._accept_tasks[sock] = task

    async def stop_accepting(self, close_sockets: bool = True, within: float = 1.0) -> None:
        """Stop accepting without losing a connection the kernel already handed over.

        The listening sockets are shut down first, so each accept loop ends by itself (accept fails
        with EINVAL) after serving whatever it accepted; cancelling an accept instead could drop a
        socket accepted but not yet delivered, leaving its client hanging. Queued connections not yet
        accepted move to another SO_REUSEPORT listener where the kernel supports it. Loops still
        running after `within` seconds are cancelled."""
        self._stopping = True
        tasks = dict(self._accept_tasks)
        self._accept_tasks.clear()
        for sock in tasks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if tasks:
            _, pending = await asyncio.wait(tasks.values(), timeout=within)
            for task in pending:
                task.cancel()
        if close_sockets:
            for sock in tasks:
                sock.close()

    @property
    def active_connections(self) -> int:
        return self._active

    def tunnels(self) -> list[ServerTunnel]:
        return [t for c in self.connections for t in c.tunnels.values()]

    @property
    def buffered_bytes(self) -> int:
        return sum(c.buffered_bytes for c in self.connections)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if e.errno in (errno.EBADF, errno.EINVAL) or sock.fileno() == -1:
                    return  # the listener was closed
                reason = "accept_resources" if e.errno in _TRANSIENT_ACCEPT_ERRORS else "accept_error"
                self.stats.connection_refused(reason)
                logger.warning("HBONE accept failed", extra={"fields": {"error": str(e), "reason": reason}})
                await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            if self._stopping:
                _refuse_socket(conn)
                continue
            if self._active >= self.limits.max_connections:
                self.stats.connection_refused("connection_limit")
                _refuse_socket(conn)
                continue
            self._active += 1
            task = loop.create_task(self._serve_connection(conn, _peer(addr)), name="hbone-connection")
            self._connection_tasks.add(task)
            task.add_done_callback(self._connection_tasks.discard)

    async def _certificate(self) -> WorkloadCertificate:
        value = self.certificate_provider()
        if inspect.isawaitable(value):
            return await value
        return value

    async def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        protocol: ServerConnection | None = None
        handed_over = False
        try:
            conn.setblocking(False)
            configure_tcp(conn)
            try:
                certificate = await asyncio.wait_for(self._certificate(), self.limits.handshake_timeout)
                context = server_context(certificate, self.contexts)
            except (HboneError, TimeoutError, OSError) as e:
                self.stats.connection_refused("no_certificate")
                logger.warning(
                    "HBONE listener has no usable certificate",
                    extra={"fields": {"peer": peer, "error": str(e)}},
                )
                return

            def make_protocol() -> ServerConnection:
                nonlocal protocol
                protocol = ServerConnection(self, certificate)
                return protocol

            handed_over = True
            try:
                await wrap_socket(
                    make_protocol,
                    conn,
                    accepted=True,
                    ssl=context,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
            except (ssl.SSLError, OSError) as e:
                # asyncio and uvloop report a handshake timeout as ConnectionAbortedError("longer than").
                timed_out = isinstance(e, TimeoutError) or "longer than" in str(e)
                reason = "handshake_timeout" if timed_out else "handshake_failed"
                self.stats.connection_refused(reason)
                logger.info(
                    "HBONE handshake failed",
                    extra={"fields": {"peer": peer, "reason": reason, "error": str(e)}},
                )
                return
            if protocol is None:
                return
            if protocol.setup_error is not None:
                reason = _setup_failure_reason(protocol.setup_error)
                self.stats.connection_refused(reason)
                logger.warning(
                    "HBONE client refused",
                    extra={"fields": {"peer": peer, "reason": reason, "error": str(protocol.setup_error)}},
                )
                return
            self.connections.add(protocol)
            self.stats.connection_opened()
            await protocol.closed
        except asyncio.CancelledError:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            raise
        except Exception:
            logger.exception("HBONE connection failed", extra={"fields": {"peer": peer}})
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
        finally:
            self._active -= 1
            if protocol is not None:
                self.connections.discard(protocol)
            if not handed_over:
                conn.close()

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let open tunnels finish for up to `grace` seconds, then close the rest."""
        await self.stop_accepting()
        for connection in list(self.connections):
            connection.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            closing = [asyncio.ensure_future(c.closed) for c in list(self.connections)]
            await asyncio.wait(closing, timeout=max(0.0, deadline - loop.time()))
        for connection in list(self.connections):
            connection.abandon("drain_deadline", ErrorCodes.NO_ERROR, "drain deadline reached")
        tasks = list(self._connection_tasks)
        for task in tasks:
            if not task.done():
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.shutdown(0.0)


# What creating or binding an IPv6 socket fails with where the kernel (or the namespace) has no IPv6.
IPV6_UNAVAILABLE: Final = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def listening_socket(
    host: str,
    port: int,
    backlog: int = 1024,
    *,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A bound, listening, non-blocking TCP socket on host:port. An IPv6 one takes IPv6 only, so "::"
    and "0.0.0.0" listen on the same port side by side and no peer address is ever IPv4-mapped.
    `prepare` sets further options before the bind (the ztunnel's in-pod listeners: SO_REUSEPORT,
    the mark, IP_TRANSPARENT); the socket is closed if anything fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if prepare is not None:
            prepare(sock)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer(addr: object) -> str:
    """The peer's ip:port for logs ([ip]:port for IPv6, whose accept gives a 4-tuple)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_address(str(addr[0]), int(addr[1]))
    return str(addr)


def _setup_failure_reason(error: BaseException) -> str:
    if isinstance(error, TrustDomainMismatch):
        return "trust_domain_mismatch"
    if isinstance(error, AlpnMismatch):
        return "alpn_mismatch"
    if isinstance(error, PeerCertificateError):
        return "bad_peer_certificate"
    return "setup_failed"
