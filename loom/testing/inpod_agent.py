"""A stand-in node agent and a recording proxy manager, for testing ztunnel's in-pod side.

`InpodTestAgent` is the server end of ZDS (reference §4.3), as small as the real agent's protocol
allows: it listens on a unix SOCK_SEQPACKET socket; for every ztunnel that connects it waits for the
hello, sends its current snapshot (`add` with the pod's netns fd as SCM_RIGHTS for pods it has a
namespace path for, `keep` for the others), waits for each ack, sends `snapshot_sent`, and then sends
`add`/`del` on demand to the newest connection, returning each ack's error. Every wait is bounded.

`enrol(pod)` installs the in-pod redirection rules of `cni.rules` in a pod namespace, as the node
agent does before it hands the pod to ztunnel.

`RecordingProxyManager` implements ztunnel's `ProxyManager`: it records starts and stops and, when
asked, really opens the in-pod listeners (15001, 15006, 15008) inside the pod's namespace so tests can
connect to them. Failures can be injected per uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from cni.agent.zds_server import exchange, send_datagram
from cni.rules import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, InpodRules, IpFamily
from loom.api import zds_pb2
from loom.testing.netns import Netns, Pod, apply_inpod_rules, remove_inpod_rules
from ztunnel.inpod.netns import InpodNetns
from ztunnel.inpod.protocol import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    ProtocolError,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_hello,
)

log = logging.getLogger(__name__)

INPOD_PORTS: Final = (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT)
_MAX_RESPONSE: Final = 1024


def enrol(
    target: Pod | Netns, rules: InpodRules | None = None, families: Iterable[IpFamily] = (IpFamily.V4,)
) -> None:
    """Install the in-pod redirection rules in a pod's namespace (idempotent), as the node agent does
    before it hands the pod to ztunnel."""
    apply_inpod_rules(target.netns if isinstance(target, Pod) else target, rules, tuple(families))


def unenrol(
    target: Pod | Netns, rules: InpodRules | None = None, families: Iterable[IpFamily] = (IpFamily.V4,)
) -> None:
    """Remove the in-pod rules again (a no-op where there are none)."""
    remove_inpod_rules(target.netns if isinstance(target, Pod) else target, rules, tuple(families))


@dataclass(frozen=True, slots=True)
class AgentPod:
    """A pod as the agent knows it; without `netns_path` it goes into snapshots as `keep`."""

    uid: str
    info: WorkloadInfo
    netns_path: str | None = None


@dataclass(eq=False)
class AgentConnection:
    """One accepted ztunnel connection and what happened on it."""

    sock: socket.socket
    number: int
    hello_version: int = 0
    # (request, ack error) in order
    exchanges: list[tuple[Request, str]] = field(default_factory=list)
    snapshot_done: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class InpodTestAgent:
    """See the module docstring. Use as `async with InpodTestAgent(path) as agent:`."""

    def __init__(self, socket_path: str, *, io_timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.io_timeout = io_timeout
        # What the next snapshot contains, by uid; `add`/`delete` keep it up to date like a real agent.
        self.pods: dict[str, AgentPod] = {}
        self.connections: list[AgentConnection] = []
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one request in flight per agent, like the real one
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> InpodTestAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            server.bind(self.socket_path)
            server.listen(8)
            server.setblocking(False)
        except BaseException:
            server.close()
            raise
        self._server = server
        self._spawn(self._accept_loop(server), "inpod-agent-accept")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for connection in self.connections:
            connection.sock.close()
            connection.closed.set()
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(server)
            sock.setblocking(False)
            connection = AgentConnection(sock, number=len(self.connections) + 1)
            self.connections.append(connection)
            self._spawn(self._serve(connection), f"inpod-agent-conn-{connection.number}")

    async def _serve(self, connection: AgentConnection) -> None:
        try:
            async with asyncio.timeout(self.io_timeout):
                hello = await asyncio.get_running_loop().sock_recv(connection.sock, _MAX_RESPONSE)
            connection.hello_version = decode_hello(hello)
            if connection.hello_version != zds_pb2.V1:
                raise ProtocolError(f"ztunnel announced version {connection.hello_version}, expected V1")
            async with self._lock:
                for pod in list(self.pods.values()):
                    if pod.netns_path is not None:
                        await self._exchange(connection, AddWorkload(pod.uid, pod.info, -1), pod.netns_path)
                    else:
                        await self._exchange(connection, KeepWorkload(pod.uid), None)
                await self._exchange(connection, SnapshotSent(), None)
            connection.snapshot_done.set()
        except (OSError, TimeoutError, ProtocolError) as err:
            log.info("test agent: connection %d failed during hello/snapshot: %s", connection.number, err)
            self._mark_closed(connection)
        async with self._changed:
            self._changed.notify_all()

    def _mark_closed(self, connection: AgentConnection) -> None:
        connection.sock.close()
        connection.closed.set()

    async def _exchange(self, connection: AgentConnection, request: Request, netns_path: str | None) -> str:
        """Send one request (with the namespace fd for adds) and wait for its ack: the production
        server's exchange; failures only mark the connection closed here."""
        try:
            error = await exchange(connection.sock, request, netns_path, self.io_timeout)
        except BaseException:
            self._mark_closed(connection)
            raise
        connection.exchanges.append((request, error))
        return error

    # -- controls for tests ---------------------------------------------------------------------------

    def current(self) -> AgentConnection | None:
        """The newest connection that is still open."""
        for connection in reversed(self.connections):
            if not connection.closed.is_set():
                return connection
        return None

    async def wait_snapshot(self, connections: int = 1, within: float = 5.0) -> AgentConnection:
        """Wait until the `connections`-th connection has completed its snapshot; returns it."""

        def done() -> bool:
            return (
                len(self.connections) >= connections
                and self.connections[connections - 1].snapshot_done.is_set()
            )

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(done)
        return self.connections[connections - 1]

    async def _newest_ready(self) -> AgentConnection:
        connection = self.current()
        if connection is None or not connection.snapshot_done.is_set():
            raise ConnectionError("no ztunnel connection with a completed snapshot")
        return connection

    async def add(self, uid: str, info: WorkloadInfo, netns_path: str) -> str:
        """Record the pod and send `add` with its namespace fd to the newest connection; the ack's error."""
        self.pods[uid] = AgentPod(uid, info, netns_path)
        async with self._lock:
            connection = await self._newest_ready()
            return await self._exchange(connection, AddWorkload(uid, info, -1), netns_path)

    async def delete(self, uid: str) -> str:
        """Forget the pod and send `del` to the newest connection; the ack's error."""
        self.pods.pop(uid, None)
        async with self._lock:
            connection = await self._newest_ready()
            return await self._exchange(connection, DelWorkload(uid), None)

    async def send_raw(self, datagram: bytes, fds: Iterable[int] = ()) -> bytes:
        """Send an arbitrary datagram to the newest connection and return the raw reply (b"" on EOF)."""
        async with self._lock:
            connection = await self._newest_ready()
            async with asyncio.timeout(self.io_timeout):
                await send_datagram(connection.sock, datagram, fds)
                return await asyncio.get_running_loop().sock_recv(connection.sock, _MAX_RESPONSE)

    async def disconnect(self) -> None:
        """Close the newest connection (ztunnel then reconnects and gets a fresh snapshot)."""
        connection = self.current()
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
            self._mark_closed(connection)


@dataclass
class StartRecord:
    uid: str
    info: WorkloadInfo
    netns_inode: int


class RecordingProxyManager:
    """A ProxyManager that records calls and (with `open_listeners`) opens the in-pod listeners."""

    def __init__(self, *, open_listeners: bool = False, ports: tuple[int, ...] = INPOD_PORTS) -> None:
        self.open_listeners = open_listeners
        self.ports = ports
        self.events: list[tuple[str, str]] = []  # ("start" | "stop" | "stop-drain" | "start-failed", uid)
        self.starts: list[StartRecord] = []
        self.running: dict[str, StartRecord] = {}
        self.listeners: dict[str, dict[int, socket.socket]] = {}
        # uid -> how many of its next starts fail
        self.fail_starts: dict[str, int] = {}
        self.changed = asyncio.Event()

    async def start(self, uid: str, workload: WorkloadInfo, netns: InpodNetns) -> None:
        if uid in self.running:
            raise AssertionError(f"start of {uid} while it is running: the client must stop it first")
        if self.fail_starts.get(uid, 0) > 0:
            self.fail_starts[uid] -= 1
            self.events.append(("start-failed", uid))
            self.changed.set()
            raise OSError(f"injected start failure for {uid}")
        sockets: dict[int, socket.socket] = {}
        try:
            if self.open_listeners:
                for port in self.ports:
                    sockets[port] = await netns.listener(port)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        record = StartRecord(uid, workload, netns.inode)
        self.starts.append(record)
        self.running[uid] = record
        self.listeners[uid] = sockets
        self.events.append(("start", uid))
        self.changed.set()

    async def stop(self, uid: str, drain: bool) -> None:
        if uid not in self.running:
            raise AssertionError(f"stop of {uid}, which is not running")
        del self.running[uid]
        for sock in self.listeners.pop(uid, {}).values():
            sock.close()
        self.events.append(("stop-drain" if drain else "stop", uid))
        self.changed.set()

    def close(self) -> None:
        for sockets in self.listeners.values():
            for sock in sockets.values():
                sock.close()
        self.listeners.clear()
