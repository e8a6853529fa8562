"""One enrolled pod's proxy: listeners 15001 / 15006 / 15008 inside the pod's network namespace.

Theory of operation
-------------------
`WorkloadProxy.start()` creates the three listening ports inside the pod's namespace, for IPv4 and IPv6
(`InpodNetns.listener`: SO_REUSEPORT so a second ztunnel can bind them while this one drains, SO_MARK
0x539 so the capture rules skip ztunnel's own sockets) and serves them from the node proxy's event loop:

* 15001, outbound capture. Per connection: the original destination (SO_ORIGINAL_DST), this pod's own
  Workload (waiting for xDS, bounded by `workload_wait`, else refused), `decide.outbound`, then act on
  the plan: HBONE (direct or through a waypoint) with this pod's certificate over a connection pool
  whose TCP sockets are created inside this pod's namespace, so the peer sees the pod's own address;
  PASSTHROUGH: a plain marked socket from the pod to the next hop; REFUSE: close with RST.
* 15008, inbound HBONE, served by `loom.hbone.HboneServer` with this pod's current certificate (asked
  per connection, so renewals apply without a restart). The handler runs `decide.inbound` with the
  peer identity from mTLS; only on 200 is the application dialled, from inside the pod with the HBONE
  peer's address as source (IP_TRANSPARENT), so the app sees who really connected.
* 15006, inbound plaintext from clients outside the mesh: `decide.inbound_plaintext` (no identity, so
  STRICT refuses), then the same transparent connect to the app.

Every admitted connection gets one `ConnectionResult` (metrics, exactly one access log line) and is
registered in the live-connection registry with a closer, so a policy change can close inbound
connections it no longer allows, and a drain can close whatever is left at its deadline. Every
connection task runs under a guard: an exception ends that connection, never the listener.

`close_listeners()` stops accepting at once (the pod is going, or ztunnel is draining); then `drain()`
lets open connections finish until the deadline and closes the rest, or `abort()` closes them now. The
proxy owns its own duplicate of the pod's namespace fd (the node agent's copy is closed as soon as the
pod is stopped), because outbound connections still open new sockets in the pod while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from cni.rules import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, INPOD_MARK, OUTBOUND_PORT
from loom.hbone import (
    IPV6_UNAVAILABLE,
    BaggageFields,
    ClientLimits,
    ConnectionPool,
    Decision,
    HboneError,
    HboneServer,
    ServerTunnel,
    TunnelRequest,
    TunnelResult,
    build_baggage,
    build_forwarded,
    build_traceparent,
    configure_tcp,
    pump_socket,
)
from loom.identity import WorkloadCertificate
from ztunnel import decide
from ztunnel.connections import (
    CloseReason,
    ConnectionHandle,
    ConnectionInfo,
    Direction,
    Transport,
    cancelling_closer,
)
from ztunnel.identity import CertificateError
from ztunnel.inpod.netns import InpodNetns, original_dst
from ztunnel.inpod.protocol import WorkloadInfo
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.local import find_local_workload
from ztunnel.proxy.relay import refuse, relay
from ztunnel.state import Workload, workload_identity
from ztunnel.telemetry import ConnectionFailure, ResponseFlag

logger = logging.getLogger("ztunnel.proxy")

# A failing accept (EMFILE, ENOBUFS...) is retried after this pause instead of spinning.
_ACCEPT_BACKOFF = 0.05
_WORKLOAD_TYPE_NAMES = {0: "deployment", 1: "cronjob", 2: "pod", 3: "job"}
# Failures a connection can meet in normal operation (peer refused, unreachable, no certificate...):
# recorded by its ConnectionResult, so the guard does not log them again as bugs.
_EXPECTED_FAILURES = (HboneError, CertificateError, ConnectionFailure, OSError)
# Closing listeners: how long to wait for the accept loops to end by themselves, and the loop turns the
# HBONE server's accept loop needs to do the same.
_ACCEPT_STOP_WAIT = 1.0
# Per network namespace: /proc/sys/net follows the namespace of the thread that opens it.
_TCP_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
# Each port listens on both families: an IPv6 socket takes IPv6 only, so no address is IPv4-mapped.
_IPV6_ANY = "::"
_LISTEN_HOSTS = ("0.0.0.0", _IPV6_ANY)
# How long the closer of an inbound tunnel waits for the tunnel to report its end.
_CLOSE_WAIT = 2.0


class UnknownWorkload(Exception):
    """The pod's own Workload did not arrive over xDS in time."""


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(value)


def _baggage(workload: Workload, cluster_id: str) -> str | None:
    """ztunnel's `baggage` describing `workload`; None when the workload lacks what it needs."""
    try:
        return build_baggage(
            BaggageFields(
                cluster=workload.cluster_id or cluster_id,
                namespace=workload.namespace,
                workload_type=_WORKLOAD_TYPE_NAMES.get(workload.workload_type, "pod"),
                workload_name=workload.workload_name or workload.name,
                service_name=workload.canonical_name or workload.name,
                service_version=workload.canonical_revision or "latest",
                region=workload.locality.region or None,
                zone=workload.locality.zone or None,
            )
        )
    except ValueError:
        return None


def _enable_listener_handoff() -> None:
    """Set net.ipv4.tcp_migrate_req=1 in the current (pod) namespace; best effort.

    During a ztunnel restart the old and the new process both listen on the pod's ports with
    SO_REUSEPORT. When the old one closes its listeners, the kernel by default resets every connection
    still in their accept queues (and half-open ones): new connections would fail. With this sysctl
    (Linux >= 5.14) those connections move to the new process's listener of the same group instead.
    It only changes what happens when a SO_REUSEPORT listener closes, so it is harmless to the app."""
    try:
        with open(_TCP_MIGRATE_REQ, "w") as sysctl:
            sysctl.write("1")
    except OSError as e:
        logger.debug("cannot enable tcp_migrate_req in the pod", extra={"fields": {"error": str(e)}})


class WorkloadProxy:
    """The listeners and connections of one pod (see the module docstring)."""

    def __init__(self, context: ProxyContext, uid: str, info: WorkloadInfo, netns: InpodNetns) -> None:
        self.context = context
        self.uid = uid
        self.info = info
        self.netns = netns  # owned: closed when the proxy has fully ended
        settings = context.settings
        limits: ClientLimits = settings.client_limits
        self.pool = ConnectionPool(
            limits, socket_factory=self._dial, stats=context.client_stats, contexts=context.tls_contexts
        )
        self.hbone = HboneServer(
            self._server_certificate,
            self._decide_tunnel,
            settings.server_limits,
            stats=context.server_stats,
            contexts=context.tls_contexts,
        )
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._xds_uid: str | None = None
        self._closing = False
        self._closed = False
        self._ended = False

    def __repr__(self) -> str:
        return f"WorkloadProxy({self.info.namespace}/{self.info.name}, uid={self.uid})"

    @property
    def name(self) -> str:
        return f"{self.info.name}.{self.info.namespace}"

    @property
    def open_connections(self) -> int:
        return len(self._connections) + sum(len(c.tunnels) for c in self.hbone.connections)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the three listeners in the pod, for IPv4 and (where the pod's kernel has it) IPv6, and
        start serving; on failure nothing is left open."""
        await self.netns.run(_enable_listener_handoff)
        bound: dict[int, list[socket.socket]] = {}
        try:
            for host in _LISTEN_HOSTS:
                for port in (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT):
                    try:
                        sock = await self.netns.listener(port, host=host)
                    except OSError as e:
                        if host == _IPV6_ANY and e.errno in IPV6_UNAVAILABLE:
                            logger.info(
                                "no IPv6 in the pod; listening on IPv4 only",
                                extra={"fields": {"workload": self.name, "error": str(e)}},
                            )
                            break
                        raise
                    self._listeners.append(sock)
                    bound.setdefault(port, []).append(sock)
        except BaseException:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        loop = asyncio.get_running_loop()
        handlers = (
            (OUTBOUND_PORT, self._outbound, "outbound"),
            (INBOUND_PLAINTEXT_PORT, self._inbound_plaintext, "plain"),
        )
        self._accept_tasks = [
            loop.create_task(self._accept_loop(sock, handler), name=f"{kind}-{self.uid}")
            for port, handler, kind in handlers
            for sock in bound[port]
        ]
        for sock in bound[INBOUND_HBONE_PORT]:
            self.hbone.serve(sock)
        logger.info("proxy started", extra={"fields": {"workload": self.name, "uid": self.uid}})

    async def close_listeners(self) -> None:
        """Stop accepting new connections now (idempotent).

        The listeners are shut down first, which ends their accept loops from the inside (accept fails
        with EINVAL): a connection the kernel handed over just before is still served, never dropped,
        and connections still queued move to a newer ztunnel's listeners (see
        `_enable_listener_handoff`). Cancelling an accept instead could lose a socket that was accepted
        but not yet delivered, leaving its client hanging."""
        if self._closing:
            return
        self._closing = True
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._accept_tasks:
            await asyncio.wait(self._accept_tasks, timeout=_ACCEPT_STOP_WAIT)
        await self.hbone.stop_accepting(within=_ACCEPT_STOP_WAIT)  # its listener ends the same way
        self._closed = True
        for task in self._accept_tasks:
            task.cancel()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()

    async def drain(self, deadline: float) -> None:
        """Let open connections finish for up to `deadline` seconds, then close the rest."""
        await self.close_listeners()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        try:
            hbone_drain = loop.create_task(self.hbone.shutdown(deadline), name=f"hbone-drain-{self.uid}")
            if self._connections:
                await asyncio.wait(set(self._connections), timeout=max(0.0, end - loop.time()))
            await hbone_drain
        finally:
            await self._end()

    async def abort(self) -> None:
        """Close listeners and every open connection now."""
        await self.close_listeners()
        await self._end()

    async def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        for task in list(self._connections):
            task.cancel()
        await self.hbone.close()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=_CLOSE_WAIT)
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        await self.pool.close()
        self.netns.close()
        logger.info("proxy stopped", extra={"fields": {"workload": self.name, "uid": self.uid}})

    # ------------------------------------------------------------------ helpers

    def local_workload(self) -> Workload | None:
        state = self.context.state
        if self._xds_uid is not None:
            workload = state.workload(self._xds_uid)
            if workload is not None:
                return workload
        workload = find_local_workload(state, self.uid, self.info)
        if workload is not None:
            self._xds_uid = workload.uid
        return workload

    async def wait_local_workload(self) -> Workload:
        workload = await self.context.changes.wait_for(
            self.local_workload, self.context.settings.workload_wait
        )
        if workload is None:
            raise UnknownWorkload(
                f"workload {self.info.namespace}/{self.info.name} (uid {self.uid}) is not known to this "
                f"proxy after {self.context.settings.workload_wait:g} s"
            )
        return workload

    async def _server_certificate(self) -> WorkloadCertificate:
        workload = await self.wait_local_workload()
        return await self.context.certificates.fetch(workload_identity(workload))

    async def _dial(self, next_hop: tuple[str, int], source_ip: str | None) -> socket.socket:
        """The pool's socket factory: a marked TCP connection from inside the pod (its own address)."""
        sock = await self.netns.socket_for(next_hop, src_ip=source_ip, mark=INPOD_MARK)
        try:
            configure_tcp(sock)
            await asyncio.get_running_loop().sock_connect(sock, next_hop)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept_loop(
        self,
        listener: socket.socket,
        handler: Any,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as e:
                if e.errno in (errno.EBADF, errno.EINVAL) or listener.fileno() == -1:
                    return
                logger.warning("accept failed", extra={"fields": {"workload": self.name, "error": str(e)}})
                await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            if self._closed:
                refuse(conn)
                continue
            conn.setblocking(False)
            # An IPv6 peer comes as (host, port, flowinfo, scope_id); the handlers take (host, port).
            self._spawn(self._guard(handler(conn, (peer[0], peer[1])), conn), f"conn-{self.uid}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _guard(self, work: Coroutine[Any, Any, None], conn: socket.socket) -> None:
        """One connection's top level: whatever goes wrong ends this connection only."""
        try:
            await work
        except asyncio.CancelledError:
            refuse(conn)
            raise
        except _EXPECTED_FAILURES as e:
            # Already recorded (metrics, access log) by the connection's result; nothing more to say.
            logger.debug("connection failed", extra={"fields": {"workload": self.name, "error": repr(e)}})
            refuse(conn)
        except Exception:
            logger.exception("connection handler failed", extra={"fields": {"workload": self.name}})
            refuse(conn)

    def _register(
        self,
        direction: Direction,
        workload: Workload,
        local: tuple[str, int],
        remote: tuple[str, int],
        *,
        remote_target: str = "",
        protocol: Transport,
        identity: Any,
        closer: Any,
    ) -> ConnectionHandle:
        info = ConnectionInfo(
            workload_uid=workload.uid,
            workload=f"{workload.name}.{workload.namespace}",
            direction=direction,
            local_ip=_ip(local[0]),
            local_port=local[1],
            remote_ip=_ip(remote[0]),
            remote_port=remote[1],
            remote_target=remote_target,
            protocol=protocol,
            source_identity=identity,
        )
        return self.context.registry.register(info, closer)

    # ------------------------------------------------------------------ outbound (15001)

    def _captured_destination(
        self, conn: socket.socket, peer: tuple[str, int], direction: Direction, listener: str
    ) -> tuple[str, int] | None:
        """Where a redirected connection was going (SO_ORIGINAL_DST); None after refusing it."""
        try:
            return original_dst(conn)
        except (OSError, ValueError) as e:
            self.context.metrics.log_early_deny(direction, peer, listener, f"no original destination: {e}")
            refuse(conn)
            return None

    async def _outbound(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        metrics = self.context.metrics
        destination = self._captured_destination(conn, peer, Direction.OUTBOUND, f"{peer[0]}:{OUTBOUND_PORT}")
        if destination is None:
            return
        try:
            source = await self.wait_local_workload()
        except UnknownWorkload as e:
            metrics.log_early_deny(Direction.OUTBOUND, peer, destination, e)
            refuse(conn)
            return
        state = self.context.state
        plan = decide.outbound(state, source, destination, self.context.rng)
        if plan.kind is decide.OutboundKind.REFUSE:
            metrics.log_early_deny(Direction.OUTBOUND, peer, destination, plan.reason)
            refuse(conn)
            return
        if plan.kind is decide.OutboundKind.PASSTHROUGH:
            await self._outbound_passthrough(conn, peer, source, plan)
        else:
            await self._outbound_hbone(conn, peer, source, plan)

    async def _outbound_passthrough(
        self, conn: socket.socket, peer: tuple[str, int], source: Workload, plan: decide.OutboundPlan
    ) -> None:
        assert plan.next_hop is not None
        next_hop = (str(plan.next_hop[0]), plan.next_hop[1])
        result = self.context.metrics.connection(
            Direction.OUTBOUND,
            src_addr=peer,
            dst_addr=next_hop,
            source=source,
            destination=plan.destination_workload,
            service=plan.destination_service,
            source_identity=workload_identity(source),
        )
        task = asyncio.current_task()
        assert task is not None
        with result:
            handle = self._register(
                Direction.OUTBOUND,
                source,
                peer,
                next_hop,
                protocol=Transport.TCP,
                identity=workload_identity(source),
                closer=cancelling_closer(task, result.closing),
            )
            with handle:
                try:
                    upstream = await self.netns.connect(next_hop, mark=INPOD_MARK)
                except (OSError, TimeoutError) as e:
                    refuse(conn)
                    raise ConnectionFailure(
                        ResponseFlag.CONNECT, f"connect to {next_hop[0]}:{next_hop[1]}: {e}"
                    ) from e
                outcome = await relay(conn, upstream, chunk=self.context.settings.relay_chunk)
                result.record_bytes(outcome.a_to_b, outcome.b_to_a)
                if outcome.error is not None:
                    result.fail(outcome.error, ResponseFlag.CONNECT)

    def _hbone_headers(self, source: Workload, peer: tuple[str, int]) -> list[tuple[str, str]]:
        headers = [("forwarded", build_forwarded(peer[0], peer[1])), ("traceparent", build_traceparent())]
        baggage = _baggage(source, self.context.settings.cluster_id)
        if baggage is not None:
            headers.append(("baggage", baggage))
        return headers

    async def _outbound_hbone(
        self, conn: socket.socket, peer: tuple[str, int], source: Workload, plan: decide.OutboundPlan
    ) -> None:
        assert plan.next_hop is not None
        next_hop = (str(plan.next_hop[0]), plan.next_hop[1])
        identity = workload_identity(source)
        result = self.context.metrics.connection(
            Direction.OUTBOUND,
            src_addr=peer,
            dst_addr=next_hop,
            source=source,
            destination=plan.destination_workload,
            service=plan.destination_service,
            source_identity=identity,
            destination_identity=plan.expected_identities[0] if plan.expected_identities else None,
            hbone_addr=plan.authority,
            mtls=True,
        )
        task = asyncio.current_task()
        assert task is not None
        handed_over = False
        with result:
            handle = self._register(
                Direction.OUTBOUND,
                source,
                peer,
                next_hop,
                remote_target=plan.authority,
                protocol=Transport.HBONE,
                identity=identity,
                closer=cancelling_closer(task, result.closing),
            )
            with handle:
                tunnel = None
                try:
                    certificate = await self.context.certificates.fetch(identity)
                    tunnel = await self.pool.connect(
                        certificate,
                        plan.expected_identities,
                        next_hop,
                        plan.authority,
                        self._hbone_headers(source, peer),
                    )
                    handed_over = True  # from here the tunnel's transport owns `conn`
                    outcome = await pump_socket(tunnel, conn)
                except BaseException:
                    if tunnel is not None:
                        tunnel.close()
                    if not handed_over:
                        refuse(conn)
                    raise
                result.record_bytes(outcome.sent, outcome.received)
                if outcome.error is not None:
                    result.fail(outcome.error, ResponseFlag.CONNECT)

    # ------------------------------------------------------------------ inbound plaintext (15006)

    async def _inbound_plaintext(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        metrics = self.context.metrics
        destination = self._captured_destination(conn, peer, Direction.INBOUND, f"?:{INBOUND_PLAINTEXT_PORT}")
        if destination is None:
            return
        local = await self.context.changes.wait_for(self.local_workload, self.context.settings.workload_wait)
        state = self.context.state
        plan = decide.inbound_plaintext(state, local, peer[0], destination[0], destination[1])
        result = metrics.connection(
            Direction.INBOUND,
            src_addr=peer,
            dst_addr=destination,
            source=state.workload_by_ip(peer[0]),
            destination=local,
            destination_identity=workload_identity(local) if local is not None else None,
        )
        task = asyncio.current_task()
        assert task is not None
        with result:
            if not plan.admitted or local is None or plan.app_address is None:
                refuse(conn)
                flag = ResponseFlag.DENY if plan.status == 401 else ResponseFlag.CONNECT
                raise ConnectionFailure(flag, f"{plan.reason.value}: {plan.detail}")
            app = (str(plan.app_address[0]), plan.app_address[1])
            handle = self._register(
                Direction.INBOUND,
                local,
                app,
                peer,
                protocol=Transport.TCP,
                identity=None,
                closer=cancelling_closer(task, result.closing),
            )
            with handle:
                try:
                    upstream = await self.netns.connect(app, src_ip=peer[0], mark=INPOD_MARK)
                except (OSError, TimeoutError) as e:
                    refuse(conn)
                    raise ConnectionFailure(
                        ResponseFlag.CONNECT, f"connect to the app at {app[0]}:{app[1]}: {e}"
                    ) from e
                outcome = await relay(conn, upstream, chunk=self.context.settings.relay_chunk)
                result.record_bytes(outcome.a_to_b, outcome.b_to_a)
                if outcome.error is not None:
                    result.fail(outcome.error, ResponseFlag.CONNECT)

    # ------------------------------------------------------------------ inbound HBONE (15008)

    def _find_tunnel(self, request: TunnelRequest) -> ServerTunnel | None:
        for tunnel in self.hbone.tunnels():
            if tunnel.request is request:
                return tunnel
        return None

    async def _decide_tunnel(self, request: TunnelRequest) -> Decision:
        """The HBONE handler: decide with the peer's mTLS identity; dial the app only on 200."""
        state = self.context.state
        local = await self.context.changes.wait_for(self.local_workload, self.context.settings.workload_wait)
        src_ip = request.remote_address[0]
        plan = decide.inbound(state, local, request.authority, request.peer_identity, src_ip)
        result = self.context.metrics.connection(
            Direction.INBOUND,
            src_addr=request.remote_address,
            dst_addr=(str(plan.app_address[0]), plan.app_address[1])
            if plan.app_address
            else request.authority,
            source=state.workload_by_ip(src_ip),
            destination=local,
            source_identity=request.peer_identity,
            destination_identity=workload_identity(local) if local is not None else None,
            hbone_addr=request.authority,
            mtls=True,
        )
        result.open()
        if not plan.admitted or local is None or plan.app_address is None:
            flag = ResponseFlag.DENY if plan.status == 401 else ResponseFlag.CONNECT
            result.fail(f"{plan.reason.value}: {plan.detail}", flag)
            result.finish()
            return Decision(plan.status, reason=plan.reason.value)
        app = (str(plan.app_address[0]), plan.app_address[1])
        ended = asyncio.Event()
        handle: ConnectionHandle | None = None

        def finish(tunnel_result: TunnelResult | None, error: BaseException | None = None) -> None:
            # Reached once per admitted connection, but possibly from two places: a failed app connect
            # (with the precise error) and the HBONE server's on_close, which it always calls.
            if ended.is_set():
                return
            if tunnel_result is not None:
                # The initiator (the HBONE client) "sent" what we received from it.
                result.record_bytes(tunnel_result.received, tunnel_result.sent)
                if tunnel_result.error is not None:
                    result.fail(tunnel_result.error, ResponseFlag.CONNECT)
            result.finish(error)
            if handle is not None:
                handle.unregister()
            ended.set()

        async def closer(reason: CloseReason) -> None:
            result.closing(reason)
            tunnel = self._find_tunnel(request)
            if tunnel is None:
                # Admitted but not (or no longer) a live tunnel: nothing to reset; record the end.
                finish(None)
                return
            tunnel.close(reason.value)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), _CLOSE_WAIT)

        async def upstream() -> socket.socket:
            nonlocal handle
            try:
                sock = await self.netns.connect(app, src_ip=src_ip, mark=INPOD_MARK)
            except BaseException as e:
                finish(None, e)
                raise
            handle = self._register(
                Direction.INBOUND,
                local,
                app,
                request.remote_address,
                remote_target=request.authority,
                protocol=Transport.HBONE,
                identity=request.peer_identity,
                closer=closer,
            )
            return sock

        return Decision(200, upstream=upstream, on_close=lambda r: finish(r))


__all__ = ["UnknownWorkload", "WorkloadProxy"]
