"""The registry of live proxied connections: what `ztunnel-config connections` lists, what a policy
change re-checks, and what a drain waits for.

Theory of operation
-------------------
The proxy registers every connection once it is established (`register(info, closer)`), and
unregisters it when it ends (`ConnectionHandle.unregister`, or leaving the handle's `with` block).
`ConnectionInfo` is frozen and carries what the three users need:

* the table: the local workload ("name.namespace"), direction, local and remote socket addresses, the
  remote target (the HBONE authority of an outbound tunnel) and the protocol (HBONE or TCP);
* the policy re-check: for an inbound connection, the local workload's uid and exactly the facts it was
  authorized on (peer identity from mTLS, or none for plaintext; client address; destination address
  and port), so `loom.policy.rbac.Connection` can be rebuilt without touching the socket;
* closing: an async `closer(reason)` supplied by the proxy (typically `cancelling_closer(task)`).

`recheck(state)` is synchronous so it can run from a `ProxyState` watcher (`follow(state)` installs
one that re-checks after every response that changed policies or workloads): it decides every inbound
connection against the current state (`state.authorize`, DENY then ALLOW, failing closed; a local
workload that is no longer known is not allowed either), marks the refused ones as closing with
`CloseReason.LATE_REJECTION` and starts their closers as tasks the registry keeps. `settle()` waits
for the closers started so far. Outbound connections are not re-checked here: the destination's node
proxy owns that decision.

`drain(deadline)` is the shutdown helper: the listeners are already closed, so it waits until every
connection has ended on its own or the deadline (event loop time) has passed, then closes the rest with
`CloseReason.DRAIN_TIMEOUT` and waits (bounded) for their closers.

One misbehaving closer must not stop the others or the caller: closer exceptions are logged and
swallowed, and every wait on a closer is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from loom.api import workload_pb2
from loom.hbone.headers import IPAddress as IPAddress  # re-exported to ztunnel
from loom.hbone.headers import format_address
from loom.identity import Identity
from loom.policy.rbac import Connection, Decision
from ztunnel.state import ProxyState, StateChange

logger = logging.getLogger("ztunnel.proxy.connections")

# How long a closer may take before the registry stops waiting for it (it keeps running).
DEFAULT_CLOSE_WAIT = 5.0


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Transport(StrEnum):
    """How the connection is carried (the PROTOCOL column)."""

    HBONE = "HBONE"
    TCP = "TCP"


class CloseReason(StrEnum):
    """Why the proxy closed a connection it had admitted (passed to the closer, recorded in the log)."""

    LATE_REJECTION = "AuthorizationPolicyLateRejection"  # a policy change no longer allows it
    DRAIN_TIMEOUT = "DrainTimeout"  # still open when the drain deadline passed
    WORKLOAD_REMOVED = "WorkloadRemoved"  # its pod's proxy was torn down


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """One live connection, as registered by the proxy."""

    # The local workload this connection belongs to: the source of an outbound connection, the
    # destination of an inbound one. Its uid (the workload API resource name) and "name.namespace".
    workload_uid: str
    workload: str
    direction: Direction
    # Local side: outbound, the application's socket (source pod ip:port); inbound, the destination as
    # authorized (the pod's address and the port the client asked for).
    local_ip: IPAddress
    local_port: int
    # Remote side: outbound, the next hop dialled (pod or waypoint :15008, or the passthrough target);
    # inbound, the client's address (the source address that was authorized).
    remote_ip: IPAddress
    remote_port: int
    # Outbound HBONE: the `:authority` of the tunnel (the original destination). "" otherwise.
    remote_target: str
    protocol: Transport
    # Inbound: the peer identity from mTLS (None for plaintext on 15006). Outbound: the local
    # workload's identity. Shown in the dump; used by the re-check for inbound connections.
    source_identity: Identity | None = None

    @property
    def local(self) -> str:
        return format_address(self.local_ip, self.local_port)

    @property
    def remote(self) -> str:
        return format_address(self.remote_ip, self.remote_port)

    def authorization_request(self) -> Connection:
        """The `rbac.Connection` an inbound connection was admitted on."""
        return Connection(self.source_identity, self.remote_ip, self.local_ip, self.local_port)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "workload": self.workload,
            "workloadUid": self.workload_uid,
            "direction": self.direction.value,
            "local": self.local,
            "remote": self.remote,
            "remoteTarget": self.remote_target,
            "protocol": self.protocol.value,
        }
        if self.source_identity is not None:
            entry["sourceIdentity"] = str(self.source_identity)
        return entry


Closer = Callable[[CloseReason], Awaitable[None]]


class PolicyState(Protocol):
    """What the re-check needs of `ztunnel.state.ProxyState`."""

    def workload(self, uid: str) -> workload_pb2.Workload | None: ...

    def authorize(self, workload: workload_pb2.Workload, conn: Connection) -> Decision: ...


class ConnectionHandle:
    """A registered connection. `unregister()` (or leaving `with`) removes it; idempotent."""

    __slots__ = ("_closing", "_registry", "id", "info")

    def __init__(self, registry: ConnectionRegistry, handle_id: int, info: ConnectionInfo) -> None:
        self._registry = registry
        self.id = handle_id
        self.info = info
        self._closing: CloseReason | None = None

    @property
    def closing(self) -> CloseReason | None:
        """Why the registry is closing this connection (None while it is not)."""
        return self._closing

    def unregister(self) -> None:
        self._registry._remove(self.id)

    def __enter__(self) -> ConnectionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


@dataclass(slots=True)
class _Entry:
    handle: ConnectionHandle
    closer: Closer


class ConnectionRegistry:
    """Live connections of this node proxy (see the module docstring). One event loop owns it."""

    def __init__(self, close_wait: float = DEFAULT_CLOSE_WAIT) -> None:
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count(1)
        self._closing: set[asyncio.Task[None]] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._close_wait = close_wait

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, info: ConnectionInfo, closer: Closer) -> ConnectionHandle:
        handle = ConnectionHandle(self, next(self._ids), info)
        self._entries[handle.id] = _Entry(handle, closer)
        self._empty.clear()
        return handle

    def _remove(self, handle_id: int) -> None:
        if self._entries.pop(handle_id, None) is not None and not self._entries:
            self._empty.set()

    def connections(self) -> list[ConnectionInfo]:
        """Every live connection, in registration order."""
        return [entry.handle.info for entry in self._entries.values()]

    def __iter__(self) -> Iterator[ConnectionInfo]:
        return iter(self.connections())

    def to_json(self) -> list[dict[str, Any]]:
        return [info.to_json() for info in self.connections()]

    # ------------------------------------------------------------------ closing

    def close(self, handle: ConnectionHandle, reason: CloseReason) -> bool:
        """Start closing one connection; False when it is gone or already closing."""
        entry = self._entries.get(handle.id)
        if entry is None or entry.handle._closing is not None:
            return False
        entry.handle._closing = reason
        task = asyncio.get_running_loop().create_task(
            self._run_closer(entry, reason), name=f"close-connection-{handle.id}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return True

    async def _run_closer(self, entry: _Entry, reason: CloseReason) -> None:
        info = entry.handle.info
        try:
            await asyncio.wait_for(entry.closer(reason), self._close_wait)
        except TimeoutError:
            logger.warning(
                "connection closer did not finish in time",
                extra={"fields": {"workload": info.workload, "remote": info.remote, "reason": reason.value}},
            )
        except Exception as e:  # one broken closer must not stop the re-check or the drain
            logger.error(
                "connection closer failed",
                extra={"fields": {"workload": info.workload, "remote": info.remote, "error": repr(e)}},
            )

    async def settle(self) -> None:
        """Wait until every closer started so far has finished (each is bounded by `close_wait`)."""
        # asyncio.wait, not gather: cancelling the waiter must not cancel the closers themselves.
        while pending := {task for task in self._closing if not task.done()}:
            await asyncio.wait(pending)

    def close_all(self, reason: CloseReason) -> int:
        """Start closing every live connection not already closing; how many were started."""
        return sum(self.close(entry.handle, reason) for entry in list(self._entries.values()))

    # ------------------------------------------------------------------ policy re-check

    def recheck(self, state: PolicyState) -> int:
        """Close every inbound connection the current policy no longer allows; how many were closed."""
        closed = 0
        for entry in list(self._entries.values()):
            handle = entry.handle
            info = handle.info
            if info.direction is not Direction.INBOUND or handle._closing is not None:
                continue
            workload = state.workload(info.workload_uid)
            if workload is None:
                why = "the destination workload is no longer known"
            else:
                decision = state.authorize(workload, info.authorization_request())
                if decision.allowed:
                    continue
                why = str(decision)
            logger.info(
                "closing connection no longer allowed",
                extra={
                    "fields": {
                        "workload": info.workload,
                        "src": info.remote,
                        "dst": info.local,
                        "identity": str(info.source_identity or ""),
                        "reason": why,
                    }
                },
            )
            closed += self.close(handle, CloseReason.LATE_REJECTION)
        return closed

    def follow(self, state: ProxyState) -> Callable[[], None]:
        """Re-check after every applied xDS response that changed policies or workloads (call on the
        event loop); returns the function that stops following."""

        def on_change(change: StateChange) -> None:
            if change.policies or change.workloads:
                self.recheck(state)

        return state.watch(on_change)

    # ------------------------------------------------------------------ drain

    async def wait_empty(self) -> None:
        """Wait until no connection is registered (bound it with `asyncio.timeout`)."""
        await self._empty.wait()

    async def drain(self, deadline: float) -> int:
        """Let connections finish until `deadline` (event loop time, `loop.time()`), then close the rest;
        how many had to be closed."""
        remaining = deadline - asyncio.get_running_loop().time()
        if not self._entries:
            return 0
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._empty.wait()
            if not self._entries:
                return 0
        forced = self.close_all(CloseReason.DRAIN_TIMEOUT)
        logger.info("drain deadline passed; closing connections", extra={"fields": {"connections": forced}})
        await self.settle()
        return forced


def cancelling_closer(
    task: asyncio.Task[Any],
    on_close: Callable[[CloseReason], None] | None = None,
    wait: float = DEFAULT_CLOSE_WAIT,
) -> Closer:
    """A closer that records the reason (e.g. `ConnectionResult.closing`), cancels `task` (the
    connection's copy loop) and waits, bounded, for it to finish."""

    async def close(reason: CloseReason) -> None:
        if on_close is not None:
            on_close(reason)
        if task.done():
            return
        task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait({task}, timeout=wait)

    return close
