"""The node agent's side of ZDS (reference §4.3): hands pod namespaces to the node's ztunnel(s).

Theory of operation
-------------------
ztunnel connects to a unix SOCK_SEQPACKET socket the agent listens on; every message is one datagram
holding one protobuf message, and a pod's netns fd travels as SCM_RIGHTS with its `add`.

Per connection: ztunnel sends `ZdsHello{V1}`; the agent answers with its snapshot, one request per pod
it has captured (`add` with the netns fd, or `keep` when it has no namespace path for the pod, e.g. after
an agent restart), each acked before the next, then `snapshot_sent`, also acked. From then on the
connection is *ready*. `add` goes to the NEWEST ready connection (during a ztunnel rolling update the new
process takes over new pods; the old one is draining), `del` goes to ALL ready connections (either may
still run a proxy for the pod).

After each completed snapshot the server calls `on_snapshot` (when set) with every pod's ack error
("" = accepted), so the agent learns which pods a newly connected ztunnel took over (a pod that was
"pending" because no ztunnel was there becomes enrolled this way).

One exchange is in flight at a time per server (a lock), so an ack is always read by the request that
waits for it. Every send and ack wait is bounded by `io_timeout`; a connection that fails, times out or
sends garbage is closed and forgotten (ztunnel reconnects and gets a fresh snapshot). A keepalive task
checks idle connections every `keepalive_interval` for EOF, so a ztunnel that exited is noticed before
the next pod needs it and `ready` reports the truth.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import select
import socket
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from loom.api import zds_pb2
from ztunnel.inpod.protocol import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    ProtocolError,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    decode_hello,
    encode_request,
)

log = logging.getLogger(__name__)

# ztunnel's own read buffer is 1024 bytes; an ack or hello is far smaller.
MAX_DATAGRAM: Final = 1024
DEFAULT_IO_TIMEOUT: Final = 5.0
DEFAULT_KEEPALIVE_INTERVAL: Final = 1.0


class ZtunnelUnavailable(ConnectionError):
    """No ztunnel connection has completed its snapshot; the caller should report "retry"."""


class NamespaceUnavailable(OSError):
    """The pod's network namespace could not be opened (its sandbox is gone): nothing was sent, and the
    connection to ztunnel is fine."""


@dataclass(frozen=True, slots=True)
class ZdsPod:
    """A captured pod as the snapshot lists it; without `netns_path` it is sent as `keep`."""

    uid: str
    info: WorkloadInfo
    netns_path: str | None = None


@dataclass(eq=False)
class ZtunnelConnection:
    sock: socket.socket
    number: int
    ready: bool = False
    closed: bool = False
    exchanges: list[tuple[Request, str]] = field(default_factory=list)  # (request, ack error), in order


async def _wait_writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


async def send_datagram(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """One datagram on a non-blocking SEQPACKET socket, with `fds` as SCM_RIGHTS."""
    fd_list = list(fds)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
    while True:
        try:
            sock.sendmsg([data], ancillary)
            return
        except (BlockingIOError, InterruptedError):
            await _wait_writable(sock)


async def exchange(sock: socket.socket, request: Request, netns_path: str | None, io_timeout: float) -> str:
    """Send one request (an add carries a fresh fd of `netns_path` as SCM_RIGHTS) and return the error
    text of ztunnel's ack ("" on success). Raises OSError, TimeoutError or ProtocolError; the caller
    decides what a failure means for the connection."""
    fds: list[int] = []
    try:
        if netns_path is not None:
            try:
                fds.append(os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise NamespaceUnavailable(
                    exc.errno, f"cannot open the pod's network namespace {netns_path}: {exc.strerror}"
                ) from None
        async with asyncio.timeout(io_timeout):
            await send_datagram(sock, encode_request(request), fds)
            response = await asyncio.get_running_loop().sock_recv(sock, MAX_DATAGRAM)
    finally:
        for fd in fds:
            os.close(fd)  # ztunnel received its own copy
    if not response:
        raise ConnectionResetError("ztunnel closed the connection before acking")
    return decode_ack(response)


class ZdsServer:
    """See the module docstring. `async with ZdsServer(path) as server:` or start()/close()."""

    def __init__(
        self,
        socket_path: str,
        *,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        mode: int = 0o600,
    ) -> None:
        self.socket_path = socket_path
        self.io_timeout = io_timeout
        self.keepalive_interval = keepalive_interval
        self.mode = mode
        self.pods: dict[str, ZdsPod] = {}  # what the next snapshot contains, by uid
        self.connections: list[ZtunnelConnection] = []  # open connections, oldest first
        # Called after each completed snapshot with {uid: ack error} ("" = accepted); must not block.
        self.on_snapshot: Callable[[Mapping[str, str]], None] | None = None
        self._accepted = 0
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> ZdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        """Whether at least one ztunnel has completed its snapshot (adds can be delivered)."""
        return self.ready_connections > 0

    @property
    def ready_connections(self) -> int:
        """Open ztunnel connections that completed their snapshot (2 during a rolling update)."""
        return sum(1 for c in self.connections if c.ready and not c.closed)

    async def start(self) -> None:
        parent = os.path.dirname(self.socket_path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)  # a stale socket of a previous agent
            server.bind(self.socket_path)
            os.chmod(self.socket_path, self.mode)  # before listen: nobody can connect in between
            server.listen(8)
            server.setblocking(False)
        except BaseException:
            server.close()
            raise
        self._server = server
        self._spawn(self._accept_loop(server), "zds-accept")
        self._spawn(self._keepalive_loop(), "zds-keepalive")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for connection in list(self.connections):
            self._drop(connection, "agent shutting down")
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _drop(self, connection: ZtunnelConnection, why: str) -> None:
        if connection.closed:
            return
        log.info("ztunnel connection %d closed: %s", connection.number, why)
        connection.closed = True
        connection.sock.close()
        with contextlib.suppress(ValueError):
            self.connections.remove(connection)

    async def _accept_loop(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(server)
            except OSError as exc:
                log.warning("accepting a ztunnel connection failed: %s", exc)
                await asyncio.sleep(0.2)  # e.g. EMFILE: do not spin
                continue
            sock.setblocking(False)
            self._accepted += 1
            connection = ZtunnelConnection(sock, number=self._accepted)
            self.connections.append(connection)
            self._spawn(self._greet(connection), f"zds-conn-{connection.number}")
            # Rate limit (Istio: 5/s) so a crash-looping client cannot monopolise the agent.
            await asyncio.sleep(0.2)

    async def _greet(self, connection: ZtunnelConnection) -> None:
        try:
            async with asyncio.timeout(self.io_timeout):
                hello = await asyncio.get_running_loop().sock_recv(connection.sock, MAX_DATAGRAM)
            version = decode_hello(hello)
            if version != zds_pb2.V1:
                raise ProtocolError(f"ztunnel announced protocol version {version}, this agent speaks V1")
            results: dict[str, str] = {}
            async with self._lock:
                for pod in list(self.pods.values()):
                    request: Request = (
                        AddWorkload(pod.uid, pod.info, -1)
                        if pod.netns_path is not None
                        else KeepWorkload(pod.uid)
                    )
                    try:
                        error = await self._exchange(connection, request, pod.netns_path)
                    except NamespaceUnavailable as exc:
                        error = str(exc)  # a sandbox deleted behind our back must not cost the others
                    results[pod.uid] = error
                    if error:
                        log.warning(
                            "ztunnel %d rejected pod %s in the snapshot: %s",
                            connection.number,
                            pod.uid,
                            error,
                        )
                error = await self._exchange(connection, SnapshotSent(), None)
                if error:
                    log.warning(
                        "ztunnel %d reported a problem with the snapshot: %s", connection.number, error
                    )
                connection.ready = True
            log.info("ztunnel connection %d ready (%d pods in its snapshot)", connection.number, len(results))
        except (OSError, TimeoutError, ProtocolError) as exc:
            self._drop(connection, f"failed during hello/snapshot: {exc}")
        else:
            if self.on_snapshot is not None:
                try:
                    self.on_snapshot(results)
                except Exception:  # a consumer bug must not cost the connection
                    log.exception("the snapshot callback failed")
        await self._notify()

    async def _exchange(self, connection: ZtunnelConnection, request: Request, netns_path: str | None) -> str:
        """Send one request (adds carry a fresh fd of `netns_path`) and return its ack's error text.

        Any failure closes the connection and is raised (OSError, TimeoutError or ProtocolError), except
        NamespaceUnavailable: nothing was sent, so the connection stays usable."""
        try:
            error = await exchange(connection.sock, request, netns_path, self.io_timeout)
        except NamespaceUnavailable:
            raise
        except BaseException as exc:
            self._drop(connection, f"{type(request).__name__} failed: {exc!r}")
            raise
        connection.exchanges.append((request, error))
        return error

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_interval)
            async with self._lock:
                gone = [c for c in self.connections if c.ready and _peer_closed(c.sock)]
                for connection in gone:
                    self._drop(connection, "ztunnel went away (EOF)")
            if gone:
                await self._notify()

    async def wait_ready(self, within: float, connections: int = 1) -> None:
        """Wait until `connections` ztunnel connections are ready (TimeoutError otherwise)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: sum(c.ready for c in self.connections) >= connections)

    async def add(self, uid: str, info: WorkloadInfo, netns_path: str) -> str:
        """Record the pod for future snapshots and send `add` to the newest ready connection.

        Returns ztunnel's ack error ("" on success), or why the pod's namespace could not be sent.
        Raises ZtunnelUnavailable when no ztunnel is ready or the exchange failed (the pod stays
        recorded: the next snapshot carries it)."""
        self.pods[uid] = ZdsPod(uid, info, netns_path)
        async with self._lock:
            ready = [c for c in self.connections if c.ready and not c.closed]
            if not ready:
                raise ZtunnelUnavailable("no ztunnel connection")
            try:
                return await self._exchange(ready[-1], AddWorkload(uid, info, -1), netns_path)
            except NamespaceUnavailable as exc:
                return str(exc)
            except (OSError, TimeoutError, ProtocolError) as exc:
                raise ZtunnelUnavailable(f"ztunnel connection failed during add: {exc!r}") from exc

    async def delete(self, uid: str) -> list[str]:
        """Forget the pod and send `del` to every ready connection; the ack errors that were not empty.

        A connection that fails is closed (its ztunnel reconnects and gets a snapshot without the pod)."""
        self.pods.pop(uid, None)
        errors: list[str] = []
        async with self._lock:
            for connection in [c for c in self.connections if c.ready and not c.closed]:
                try:
                    error = await self._exchange(connection, DelWorkload(uid), None)
                except (OSError, TimeoutError, ProtocolError) as exc:
                    errors.append(f"connection {connection.number}: {exc!r}")
                    continue
                if error:
                    errors.append(f"connection {connection.number}: {error}")
        await self._notify()
        return errors


def _peer_closed(sock: socket.socket) -> bool:
    """Whether an idle connection has reached EOF (or failed), without consuming data."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(MAX_DATAGRAM, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
