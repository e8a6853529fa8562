"""ztunnel's ZDS client: receives pods and their netns fds from the node agent and runs their proxies.

Theory of operation
-------------------
`InpodClient.run()` keeps one connection to the node agent's unix SOCK_SEQPACKET socket (reference §4.3),
reconnecting with a jittered exponential backoff (5-10 ms first, doubling, at most 15 s). Each datagram
is one request; `AddWorkload` carries the pod's netns fd as SCM_RIGHTS ancillary data. The sans-IO
machine in `ztunnel.inpod.protocol` turns requests into commands, which this module executes against a
`ProxyManager` (the part of ztunnel that owns the listeners) and answers with exactly one ack each.

Per pod (uid) the client keeps the namespace it was given and whether its proxy runs:

* `add` of a new uid starts the proxy; the same uid with the same namespace (inode) again is a no-op;
  the same uid with a *different* namespace (the pod sandbox was recreated) drains the old proxy and
  starts a new one;
* a failed start is acked with its error, kept, and retried every `retry_interval` until it works or the
  pod is deleted or left out of a snapshot;
* `del` stops the proxy at once (the pod is gone); `snapshot_sent` drains every proxy that the snapshot
  did not add or keep;
* proxies outlive connections: a node-agent restart must not cut pod traffic, and the next snapshot
  reconciles whatever changed meanwhile.

Readiness: set once a snapshot is complete on the current connection and every proxy runs; cleared when
the connection drops. A start that fails later (after readiness) is retried but does not unready ztunnel,
so one broken pod cannot take the node's proxy out of service.

Every request is handled under one lock with the retries, so the manager never sees two operations on
the node at once. Receiving has no deadline (an idle agent is normal); sending an ack has one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from ztunnel.inpod.netns import InpodNetns, NetnsError, NetnsSwitcher
from ztunnel.inpod.protocol import (
    MAX_REQUEST_SIZE,
    Ack,
    Command,
    KeepProxy,
    ProtocolError,
    Reconcile,
    SendHello,
    StartProxy,
    StopProxy,
    WorkloadInfo,
    ZdsClientProtocol,
    encode_ack,
    encode_hello,
)

log = logging.getLogger(__name__)

# The socket both DaemonSets share through a hostPath (Istio's INPOD_UDS default).
DEFAULT_SOCKET_PATH: Final = "/var/run/ztunnel/ztunnel.sock"
_FD_SIZE: Final = array.array("i").itemsize
# Room for exactly one fd: a request with more is truncated (MSG_CTRUNC) and rejected. CMSG_LEN, not
# CMSG_SPACE: the alignment padding of CMSG_SPACE would leave room for a second fd on 64-bit kernels.
ANCILLARY_BUFFER_SIZE: Final = socket.CMSG_LEN(_FD_SIZE)


class ProxyManager(Protocol):
    """What runs the per-pod proxies (listeners 15001/15006/15008 inside the pod's namespace).

    `start` either succeeds or raises and leaves nothing behind (it is simply called again on retry).
    The client owns `netns` and closes it right after `stop` returns; sockets created inside stay valid,
    and a manager that must open new sockets in the pod while draining takes its own `netns.dup()`.
    `stop` returns once the pod's listeners are closed; with `drain`, open connections may finish in
    the background up to the drain deadline."""

    async def start(self, uid: str, workload: WorkloadInfo, netns: InpodNetns) -> None: ...

    async def stop(self, uid: str, drain: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class InpodClientConfig:
    socket_path: str = DEFAULT_SOCKET_PATH
    # The first reconnect waits a random time in [min, max] (so restarted ztunnels do not reconnect in
    # lock step), then each failure doubles the wait up to `backoff_max` (Istio's ztunnel: 5-10 ms, 15 s).
    backoff_initial_min: float = 0.005
    backoff_initial_max: float = 0.010
    backoff_max: float = 15.0
    # Failed proxy starts are retried this often (Istio's ztunnel retries after 5 s).
    retry_interval: float = 5.0
    # Deadline for connecting and for sending one datagram; the agent's own read/write deadline is 5 s.
    io_timeout: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if not self.socket_path:
            problems.append("socket_path is empty")
        if not 0 < self.backoff_initial_min <= self.backoff_initial_max <= self.backoff_max:
            problems.append(
                "need 0 < backoff_initial_min <= backoff_initial_max <= backoff_max, got "
                f"{self.backoff_initial_min}, {self.backoff_initial_max}, {self.backoff_max}"
            )
        for name in ("retry_interval", "io_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid in-pod client configuration: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """One pod as the client sees it (for the admin endpoint and tests)."""

    uid: str
    info: WorkloadInfo
    netns_inode: int
    running: bool  # False: the last start failed and a retry is pending
    error: str  # why the last start failed; "" when running


class ZdsTransportError(Exception):
    """A datagram the client cannot take (truncated, unexpected ancillary data)."""


class ConnectionClosed(ZdsTransportError):
    """The node agent closed the connection."""


def take_request(
    data: bytes, ancdata: Iterable[tuple[int, int, bytes]], msg_flags: int
) -> tuple[bytes, list[int]]:
    """The request bytes and received fds of one `recvmsg` result.

    Raises ConnectionClosed at end of stream and ZdsTransportError for a truncated datagram, truncated
    ancillary data (more fds than expected) or ancillary data other than SCM_RIGHTS; any fds received
    are closed before raising, so nothing leaks."""
    fds: list[int] = []
    unexpected: list[tuple[int, int]] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
        else:
            unexpected.append((level, kind))
    problem = ""
    if msg_flags & socket.MSG_TRUNC:
        problem = f"request longer than {MAX_REQUEST_SIZE} bytes (truncated)"
    elif msg_flags & socket.MSG_CTRUNC:
        problem = "ancillary data truncated (more than one file descriptor sent)"
    elif unexpected:
        problem = f"unexpected ancillary data (level, type) {unexpected}"
    elif not data and not fds:
        raise ConnectionClosed("the node agent closed the connection")
    if problem:
        close_fds(fds)
        raise ZdsTransportError(problem)
    return data, fds


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Backoff:
    """Jittered exponential reconnect delays."""

    def __init__(self, config: InpodClientConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self._current: float | None = None

    def next_delay(self) -> float:
        c = self._config
        if self._current is None:
            self._current = self._rng.uniform(c.backoff_initial_min, c.backoff_initial_max)
        else:
            self._current = min(self._current * 2, c.backoff_max)
        return self._current

    def reset(self) -> None:
        self._current = None


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def receive_request(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One request datagram and its fds from a non-blocking SEQPACKET socket (see `take_request`)."""
    while True:
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(
                MAX_REQUEST_SIZE, ANCILLARY_BUFFER_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            await _readable(sock)
            continue
        return take_request(data, ancdata, msg_flags)


@dataclass(eq=False)
class _Proxy:
    uid: str
    info: WorkloadInfo
    netns: InpodNetns
    running: bool = False
    error: str = ""


class InpodClient:
    """Serves the node agent's requests for the lifetime of `run()`; see the module docstring."""

    def __init__(
        self,
        manager: ProxyManager,
        config: InpodClientConfig | None = None,
        *,
        switcher: NetnsSwitcher | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._manager = manager
        self._config = config if config is not None else InpodClientConfig()
        self._switcher = switcher
        self._backoff = Backoff(self._config, rng)
        self._protocol = ZdsClientProtocol()
        self._proxies: dict[str, _Proxy] = {}
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._retry_wake = asyncio.Event()
        self._snapshot_done = False
        self._connected = False
        self._connections = 0

    # -- observation ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Return once ready (callers bound this with a timeout)."""
        await self._ready.wait()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connections(self) -> int:
        """How many connections to the node agent were established so far."""
        return self._connections

    def workloads(self) -> Mapping[str, WorkloadStatus]:
        return {
            uid: WorkloadStatus(uid, p.info, p.netns.inode, p.running, p.error)
            for uid, p in self._proxies.items()
        }

    # -- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect -- until cancelled. Proxies keep running when this ends."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._retry_failed_starts(), name="inpod-retry")
            await self._connect_forever()

    async def stop_all(self, drain: bool = True) -> None:
        """Stop every proxy and release every namespace (ztunnel shutting down)."""
        async with self._lock:
            for proxy in list(self._proxies.values()):
                await self._stop(proxy, drain)

    async def _connect_forever(self) -> None:
        path = self._config.socket_path
        while True:
            try:
                await self._session()
            except ConnectionClosed:
                log.info("node agent at %s closed the connection", path)
            except (OSError, TimeoutError) as err:
                log.warning("cannot talk to the node agent at %s (%s); is loom-cni-agent running?", path, err)
            except (ProtocolError, ZdsTransportError) as err:
                log.error(
                    "node agent at %s broke the protocol (%s); reconnecting for a fresh snapshot", path, err
                )
            except Exception:
                # A bug must not end in-pod service for the whole node: log it and start over.
                log.exception("in-pod client session failed")
            delay = self._backoff.next_delay()
            log.debug("reconnecting to the node agent in %.3f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self._config.io_timeout):
                await loop.sock_connect(sock, self._config.socket_path)
            self._connected = True
            self._connections += 1
            async with self._lock:
                await self._execute(sock, self._protocol.connected())
            while True:
                data, fds = await receive_request(sock)
                unowned = fds  # closed here unless a command took them over
                try:
                    async with self._lock:
                        try:
                            commands = self._protocol.receive(data, fds)
                        except ProtocolError as err:
                            with contextlib.suppress(OSError, TimeoutError):
                                await self._send(sock, encode_ack(str(err)))
                            raise
                        # From here the StartProxy command owns the fd (`_add` takes it synchronously).
                        unowned = []
                        # The agent is really talking to us: the next failure starts the backoff afresh.
                        self._backoff.reset()
                        await self._execute(sock, commands)
                finally:
                    close_fds(unowned)
        finally:
            sock.close()
            self._connected = False
            self._snapshot_done = False
            self._ready.clear()
            self._protocol.disconnected()

    async def _send(self, sock: socket.socket, datagram: bytes) -> None:
        async with asyncio.timeout(self._config.io_timeout):
            await asyncio.get_running_loop().sock_sendall(sock, datagram)

    # -- executing commands ---------------------------------------------------------------------------

    async def _execute(self, sock: socket.socket, commands: Iterable[Command]) -> None:
        failure = ""
        for command in commands:
            match command:
                case SendHello():
                    await self._send(sock, encode_hello())
                case StartProxy(uid=uid, info=info, netns_fd=fd):
                    failure = failure or await self._add(uid, info, fd)
                case KeepProxy(uid=uid):
                    if uid not in self._proxies:
                        failure = (
                            failure
                            or f"keep for unknown workload {uid}: no proxy runs for it and no netns was sent"
                        )
                case StopProxy(uid=uid, drain=drain):
                    proxy = self._proxies.get(uid)
                    if proxy is not None:
                        failure = failure or await self._stop(proxy, drain)
                case Reconcile(keep=keep):
                    for proxy in [p for uid, p in self._proxies.items() if uid not in keep]:
                        log.info(
                            "pod %s (uid %s) was not in the snapshot: draining its proxy",
                            _name(proxy),
                            proxy.uid,
                        )
                        failure = failure or await self._stop(proxy, drain=True)
                    self._snapshot_done = True
                    self._update_readiness()
                case Ack(error=error):
                    await self._send(sock, encode_ack(error or failure))
                    failure = ""

    async def _add(self, uid: str, info: WorkloadInfo, fd: int) -> str:
        try:
            netns = InpodNetns(fd, switcher=self._switcher)
        except NetnsError as err:
            close_fds([fd])
            return f"add {uid}: {err}"
        proxy = self._proxies.get(uid)
        if proxy is not None:
            if proxy.netns.identity == netns.identity:
                netns.close()
                # Same pod, same sandbox: nothing to do, unless it is waiting for a retry anyway.
                return "" if proxy.running else await self._try_start(proxy)
            log.info("pod %s (uid %s) has a new network namespace: restarting its proxy", _name(proxy), uid)
            await self._stop(proxy, drain=True)
        proxy = _Proxy(uid, info, netns)
        self._proxies[uid] = proxy
        return await self._try_start(proxy)

    async def _try_start(self, proxy: _Proxy) -> str:
        try:
            await self._manager.start(proxy.uid, proxy.info, proxy.netns)
        except Exception as err:
            proxy.running = False
            proxy.error = f"failed to start the proxy for pod {_name(proxy)} (uid {proxy.uid}): {err}"
            log.warning("%s; retrying in %s s", proxy.error, self._config.retry_interval)
            self._retry_wake.set()
            return proxy.error
        proxy.running, proxy.error = True, ""
        return ""

    async def _stop(self, proxy: _Proxy, drain: bool) -> str:
        if self._proxies.get(proxy.uid) is proxy:
            del self._proxies[proxy.uid]
        try:
            if proxy.running:
                await self._manager.stop(proxy.uid, drain)
        except Exception as err:
            log.exception("stopping the proxy for pod %s (uid %s) failed", _name(proxy), proxy.uid)
            return f"failed to stop the proxy for pod {_name(proxy)} (uid {proxy.uid}): {err}"
        finally:
            proxy.running = False
            proxy.netns.close()
            self._update_readiness()
        return ""

    def _update_readiness(self) -> None:
        if (
            self._snapshot_done
            and not self._ready.is_set()
            and all(p.running for p in self._proxies.values())
        ):
            self._ready.set()

    async def _retry_failed_starts(self) -> None:
        while True:
            await self._retry_wake.wait()
            self._retry_wake.clear()
            await asyncio.sleep(self._config.retry_interval)
            async with self._lock:
                for proxy in [p for p in self._proxies.values() if not p.running]:
                    if self._proxies.get(proxy.uid) is proxy and not proxy.running:
                        await self._try_start(proxy)
                self._update_readiness()


def _name(proxy: _Proxy) -> str:
    return f"{proxy.info.namespace}/{proxy.info.name}"
