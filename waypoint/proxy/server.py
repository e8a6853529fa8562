"""`WaypointProxy`: the waypoint's HBONE listener (:15008) and what happens to each tunnel.

Theory of operation
-------------------
`loom.hbone.HboneServer` terminates HBONE (TLS 1.3 mTLS, HTTP/2 CONNECT, flood limits, early data
held until the decision). Per CONNECT the handler (`_decide`):

1. resolves the :authority (a Service VIP:port or a workload ip:port) with the `ServiceResolver`;
   unknown -> 404 (`unknown_destination`), nothing dialled;
2. TCP Services (L4 only): the `L4Authorizer` decides (denied -> 401, like ztunnel's inbound), then the
   connector picks an endpoint and opens an HBONE tunnel to it with the waypoint's own certificate
   (trying up to `tcp_connect_attempts` endpoints), and joins the two tunnels through a socket pair;
3. HTTP, HTTP/2 and gRPC Services: the decision asks the HBONE server to hand over the stream itself
   (`Decision.serve`): the HTTP session reads and writes the CONNECT stream (`ServerStream`) directly,
   no socket in between; the first bytes choose HTTP/2 (the preface) or HTTP/1.1.

Every HTTP session and L4 splice runs in a task tracked here; `stop(grace)` stops accepting, lets
tunnels finish for `grace` seconds, then closes everything, upstream pools included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Coroutine
from typing import Any

from loom.hbone import (
    ClientLimits,
    ConnectionPool,
    ContextCache,
    Decision,
    HboneServer,
    HboneStats,
    ServerLimits,
    SocketFactory,
    Tunnel,
    TunnelRequest,
    TunnelResult,
    pump_socket,
)
from loom.hbone.headers import format_address
from loom.hbone.protocol import CLIENT_PREFACE
from loom.hbone.server import CertificateProvider, ServerStream
from waypoint.model import AppProtocol, Authorizer, AuthzDecision, Endpoint, EndpointPicker, Peer, Router
from waypoint.proxy.deadline import Deadline
from waypoint.proxy.downstream_h1 import Http1Session
from waypoint.proxy.downstream_h2 import Http2Session
from waypoint.proxy.interfaces import (
    Destination,
    DownstreamReader,
    DownstreamWriter,
    L4Authorizer,
    Normalizer,
    RequestObserver,
    ServiceResolver,
    TunnelRecord,
    TunnelView,
)
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import UpstreamConnectFailure, UpstreamOverflow
from waypoint.proxy.pipeline import ConnectionContext, RequestPipeline
from waypoint.proxy.upstream import HBONE_PORT, TunnelOpener, UpstreamPools

logger = logging.getLogger("waypoint.proxy")


def deny_all_l4(view: TunnelView) -> AuthzDecision:
    """The L4 authorizer when none is configured: fail closed."""
    return AuthzDecision(False, reason="no L4 authorizer configured")


class WaypointProxy:
    """The waypoint data path (see the module docstring). Create and use it on the serving loop."""

    def __init__(
        self,
        *,
        certificate: CertificateProvider,
        resolver: ServiceResolver,
        router: Router,
        authorizer: Authorizer,
        picker: EndpointPicker,
        observer: RequestObserver,
        normalize: Normalizer,
        l4_authorizer: L4Authorizer = deny_all_l4,
        rng: random.Random | None = None,
        limits: ProxyLimits | None = None,
        server_limits: ServerLimits | None = None,
        client_limits: ClientLimits | None = None,
        socket_factory: SocketFactory | None = None,
        hbone_port: int = HBONE_PORT,
        server_stats: HboneStats | None = None,
        client_stats: HboneStats | None = None,
    ) -> None:
        self.limits = limits or ProxyLimits()
        self.resolver = resolver
        self.picker = picker
        self.observer = observer
        self.l4_authorizer = l4_authorizer
        self.rng = rng or random.Random()
        contexts = ContextCache()
        self.hbone_pool = ConnectionPool(
            client_limits, socket_factory=socket_factory, stats=client_stats, contexts=contexts
        )
        self.opener = TunnelOpener(self.hbone_pool, certificate, hbone_port=hbone_port)
        self.pools = UpstreamPools(self.opener, self.limits)
        self.pipeline = RequestPipeline(
            router=router,
            authorizer=authorizer,
            picker=picker,
            pools=self.pools,
            observer=observer,
            normalize=normalize,
            rng=self.rng,
            limits=self.limits,
        )
        self.server = HboneServer(
            certificate, self._decide, server_limits, stats=server_stats, contexts=contexts
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[Http1Session | Http2Session] = set()
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, sock: socket.socket) -> None:
        """Serve HBONE on `sock` (bound and listening, normally 0.0.0.0:15008)."""
        self.server.serve(sock)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let open tunnels finish for `grace` seconds; then close everything."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop_accepting()
        for session in list(self._sessions):
            session.drain()
        await self.server.shutdown(grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.pools.close()
        await self.hbone_pool.close()

    @property
    def active_sessions(self) -> int:
        return len(self._tasks)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ decisions

    async def _decide(self, request: TunnelRequest) -> Decision:
        target = request.target
        peer = Peer(request.peer_identity, format_address(*request.remote_address))
        try:
            destination = self.resolver.resolve(target.host, target.port)
        except Exception:
            logger.exception("service resolver failed", extra={"fields": {"authority": request.authority}})
            destination = None
        if destination is None:
            self.observer.refused("unknown_destination")
            logger.info(
                "tunnel to an unknown destination refused",
                extra={
                    "fields": {
                        "peer": peer.address,
                        "identity": peer.principal,
                        "authority": request.authority,
                    }
                },
            )
            return Decision(404, reason="unknown_destination")
        if destination.service.protocol is AppProtocol.TCP:
            return self._tcp_decision(peer, destination, target.host, target.port)
        ctx = ConnectionContext(peer, destination, target.host, target.port, asyncio.get_running_loop())

        def serve(stream: ServerStream) -> None:
            self._spawn(self._serve_http(stream, stream, ctx), "waypoint-http-session")

        return Decision(200, serve=serve)

    async def _serve_http(
        self, reader: DownstreamReader, writer: DownstreamWriter, ctx: ConnectionContext
    ) -> None:
        try:
            prefix = await self._first_bytes(reader)
            if not prefix:
                writer.close()
                return
            session: Http1Session | Http2Session
            if prefix.startswith(CLIENT_PREFACE):
                session = Http2Session(reader, writer, ctx, self.pipeline, self.observer, self.limits, prefix)
            else:
                session = Http1Session(reader, writer, ctx, self.pipeline, self.observer, self.limits, prefix)
            self._sessions.add(session)
            if self._stopped:
                session.drain()
            try:
                await session.run()
            finally:
                self._sessions.discard(session)
        except (ConnectionError, TimeoutError) as e:
            logger.debug("HTTP session ended", extra={"fields": {"error": str(e)}})
            writer.close()
        except Exception:
            logger.exception("HTTP session failed", extra={"fields": {"peer": ctx.peer.address}})
            writer.close()

    async def _first_bytes(self, reader: DownstreamReader) -> bytes:
        """Enough bytes to tell HTTP/2 (the 24-byte preface) from HTTP/1.1; b"" if the client left."""
        prefix = b""
        async with Deadline.within(asyncio.get_running_loop(), self.limits.first_bytes_timeout):
            while len(prefix) < len(CLIENT_PREFACE) and CLIENT_PREFACE.startswith(prefix):
                data = await reader.read(len(CLIENT_PREFACE) - len(prefix))
                if not data:
                    return prefix
                prefix += data
        return prefix

    # ------------------------------------------------------------------ L4

    def _tcp_decision(self, peer: Peer, destination: Destination, ip: str, port: int) -> Decision:
        view = TunnelView(peer, destination.service, ip, port)
        started = time.time()
        try:
            decision = self.l4_authorizer(view)
        except Exception:
            logger.exception("L4 authorizer failed; denying the tunnel")
            decision = AuthzDecision(False, reason="the L4 authorizer failed")
        if not decision.allowed:
            self._record_tunnel(view, started, 0.0, 0, 0, "DENY", None, decision.reason, decision)
            return Decision(401, reason="policy_denied")
        chosen: list[Endpoint] = []

        async def connect() -> socket.socket:
            tunnel = await self._open_tcp(view, destination, chosen, started, decision)
            ours, theirs = socket.socketpair()
            theirs.setblocking(False)
            self._spawn(self._splice(tunnel, ours), "waypoint-tcp-splice")
            return theirs

        def closed(result: TunnelResult) -> None:
            endpoint = chosen[-1] if chosen else None
            if endpoint is None:
                return  # refused before a backend was reached: recorded by _open_tcp
            self._record_tunnel(
                view,
                started,
                result.duration,
                result.received,
                result.sent,
                "-",
                endpoint,
                result.error,
                decision,
            )

        return Decision(200, upstream=connect, on_close=closed)

    async def _open_tcp(
        self,
        view: TunnelView,
        destination: Destination,
        chosen: list[Endpoint],
        started: float,
        decision: AuthzDecision,
    ) -> Tunnel:
        tried: set[str] = set()
        error = "no healthy upstream"
        flags = "UH"
        for _ in range(self.limits.tcp_connect_attempts):
            try:
                endpoint = destination.endpoint or self.picker.pick(destination.service, frozenset(tried))
            except Exception:
                logger.exception(
                    "endpoint picker failed", extra={"fields": {"service": view.service.hostname}}
                )
                endpoint = None
            if endpoint is None:
                break
            try:
                tunnel = await self.opener.open(endpoint)
            except (UpstreamConnectFailure, UpstreamOverflow) as e:
                self.picker.report(endpoint, False)
                tried.add(endpoint.ip)
                error, flags = str(e), "UF"
                if destination.endpoint is not None:
                    break
                continue
            self.picker.report(endpoint, True)
            chosen.append(endpoint)
            return tunnel
        self._record_tunnel(view, started, time.time() - started, 0, 0, flags, None, error, decision)
        raise ConnectionRefusedError(f"{view.service.hostname}:{view.service.port}: {error}")

    async def _splice(self, tunnel: Tunnel, sock: socket.socket) -> None:
        try:
            await pump_socket(tunnel, sock)
        finally:
            tunnel.close()
            with contextlib.suppress(OSError):
                sock.close()

    def _record_tunnel(
        self,
        view: TunnelView,
        started: float,
        duration: float,
        received: int,
        sent: int,
        flags: str,
        endpoint: Endpoint | None,
        error: str | None,
        decision: AuthzDecision,
    ) -> None:
        try:
            self.observer.record_tunnel(
                TunnelRecord(
                    view=view,
                    start_time=started,
                    duration=duration,
                    received=received,
                    sent=sent,
                    response_flags=flags,
                    endpoint=endpoint,
                    error=error,
                    authz=decision,
                )
            )
        except Exception:
            logger.exception("tunnel observer failed")
