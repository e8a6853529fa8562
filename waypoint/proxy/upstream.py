"""Connections from the waypoint to backend pods: HBONE tunnels with the waypoint's own certificate, and
HTTP connections on them, reused.

Theory of operation
-------------------
`TunnelOpener.open(endpoint)` asks `loom.hbone.ConnectionPool` for a CONNECT tunnel to
`endpoint.ip:endpoint.port` through `endpoint.ip:15008`, presenting the waypoint's current certificate
(asked per tunnel, so rotation needs nothing) and requiring the endpoint's SPIFFE identity. The HBONE
pool multiplexes tunnels to the same node over one TLS connection; each tunnel is one TCP connection
as the backend application sees it.

`UpstreamPools` keeps HTTP connections on those tunnels per endpoint (ip, port, identity, protocol):

* HTTP/1.1: idle keep-alive connections, most recently used first, at most `h1_max_idle_per_endpoint`;
  one that the backend closed while idle is noticed (its tunnel ended) and dropped at checkout;
* HTTP/2 and gRPC: one multiplexed connection, a further one (up to `h2_max_connections_per_endpoint`)
  only while the existing ones have no free stream; concurrent first requests share one dial;
* at most `max_connections_per_endpoint` connections per endpoint, beyond which requests fail with
  `UpstreamOverflow` (503 UO, Envoy's circuit breaker);
* a sweeper closes connections idle for `upstream_idle_timeout`; it runs only while connections exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

from loom.hbone import ConnectionPool, HboneError, Tunnel
from loom.hbone.headers import format_address
from loom.hbone.server import CertificateProvider
from loom.identity import Identity, WorkloadCertificate
from waypoint.model import Endpoint
from waypoint.proxy.body import AttemptBody
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import (
    HTTP2,
    RequestHead,
    UpstreamConnectFailure,
    UpstreamOverflow,
    UpstreamResponse,
)
from waypoint.proxy.upstream_h1 import H1Upstream
from waypoint.proxy.upstream_h2 import H2Upstream

logger = logging.getLogger("waypoint.proxy")

HBONE_PORT = 15008


class TunnelOpener:
    """HBONE tunnels to endpoints with the waypoint's identity."""

    def __init__(
        self, pool: ConnectionPool, certificate: CertificateProvider, *, hbone_port: int = HBONE_PORT
    ):
        self.pool = pool
        self.certificate = certificate
        self.hbone_port = hbone_port

    async def _certificate(self) -> WorkloadCertificate:
        value = self.certificate()
        if inspect.isawaitable(value):
            return await value
        return value

    async def open(self, endpoint: Endpoint) -> Tunnel:
        """A tunnel to the endpoint's application port; UpstreamConnectFailure naming why not."""
        authority = format_address(endpoint.ip, endpoint.port)
        try:
            certificate = await self._certificate()
        except Exception as e:  # the certificate source's own errors: fail closed, never crash the request
            raise UpstreamConnectFailure(f"no certificate for the waypoint's own identity: {e}") from e
        try:
            return await self.pool.connect(
                certificate, [endpoint.identity], (endpoint.ip, self.hbone_port), authority
            )
        except (HboneError, OSError) as e:
            raise UpstreamConnectFailure(
                f"HBONE to {format_address(endpoint.ip, self.hbone_port)} for {authority} failed: {e}"
            ) from e


class EndpointKey(NamedTuple):
    """A pool's key (a tuple: it is made and hashed for every request)."""

    ip: str
    port: int
    identity: Identity
    protocol: str


@dataclass(eq=False)
class _Entry:
    idle: list[H1Upstream] = field(default_factory=list)
    h2: list[H2Upstream] = field(default_factory=list)
    connections: int = 0  # open connections (HTTP/1.1 busy and idle, HTTP/2), plus dials in flight
    h2_dial: asyncio.Task[H2Upstream] | None = None


@dataclass(slots=True)
class UpstreamStats:
    """Counters for tests and the admin view."""

    opened: int = 0  # connections established
    reused: int = 0  # requests sent on an already used HTTP/1.1 connection
    connect_failures: int = 0
    overflows: int = 0
    expired: int = 0  # idle connections closed by the sweeper


class UpstreamPools:
    """HTTP connections to backends, per endpoint and protocol (see the module docstring)."""

    def __init__(self, opener: TunnelOpener, limits: ProxyLimits) -> None:
        self.opener = opener
        self.limits = limits
        self.stats = UpstreamStats()
        self._entries: dict[EndpointKey, _Entry] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    def open_connections(self) -> int:
        return sum(entry.connections for entry in self._entries.values())

    async def exchange(
        self, endpoint: Endpoint, protocol: str, head: RequestHead, body: AttemptBody | None
    ) -> UpstreamResponse:
        """Send one request attempt to `endpoint`; returns the response head (body still streaming)."""
        if self._closed:
            raise UpstreamConnectFailure("the waypoint is shutting down")
        key = EndpointKey(endpoint.ip, endpoint.port, endpoint.identity, protocol)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        if protocol == HTTP2:
            h2conn = await self._h2_connection(key, entry, endpoint)
            return await h2conn.exchange(head, body)
        h1conn = await self._h1_connection(key, entry, endpoint)
        return await h1conn.exchange(head, body)

    # ------------------------------------------------------------------ HTTP/1.1

    async def _h1_connection(self, key: EndpointKey, entry: _Entry, endpoint: Endpoint) -> H1Upstream:
        while entry.idle:
            connection = entry.idle.pop()
            if connection.usable:
                self.stats.reused += 1
                return connection
            connection.close()
        self._reserve(entry, endpoint)
        try:
            tunnel = await self.opener.open(endpoint)
        except BaseException:
            self._unreserve(key, entry)
            raise
        self.stats.opened += 1
        self._ensure_sweeper()
        return H1Upstream(
            tunnel,
            self.limits,
            on_idle=lambda c: self._h1_idle(key, entry, c),
            on_closed=lambda _c: self._unreserve(key, entry),
        )

    def _h1_idle(self, key: EndpointKey, entry: _Entry, connection: H1Upstream) -> None:
        if self._closed or len(entry.idle) >= self.limits.h1_max_idle_per_endpoint:
            connection.close_idle()
            return
        entry.idle.append(connection)

    # ------------------------------------------------------------------ HTTP/2

    async def _h2_connection(self, key: EndpointKey, entry: _Entry, endpoint: Endpoint) -> H2Upstream:
        # Bounded: each round either returns, dials, waits for the one dial in flight, or raises.
        for _ in range(self.limits.h2_max_connections_per_endpoint + 2):
            entry.h2 = [c for c in entry.h2 if c.usable]
            for connection in entry.h2:
                if connection.has_room():
                    return connection
            if entry.h2_dial is None:
                if len(entry.h2) >= self.limits.h2_max_connections_per_endpoint:
                    break
                entry.h2_dial = asyncio.get_running_loop().create_task(
                    self._dial_h2(key, entry, endpoint), name="waypoint-h2-dial"
                )
                # Waiters may all be gone when it fails; the error is theirs, not the loop's.
                entry.h2_dial.add_done_callback(lambda t: t.cancelled() or t.exception())
            await asyncio.shield(entry.h2_dial)
        self.stats.overflows += 1
        raise UpstreamOverflow(
            f"every HTTP/2 connection to {endpoint.ip}:{endpoint.port} is at its stream limit"
        )

    async def _dial_h2(self, key: EndpointKey, entry: _Entry, endpoint: Endpoint) -> H2Upstream:
        try:
            self._reserve(entry, endpoint)
            try:
                tunnel = await self.opener.open(endpoint)
            except BaseException:
                self._unreserve(key, entry)
                raise
            self.stats.opened += 1
            connection = H2Upstream(tunnel, self.limits, on_closed=lambda _c: self._unreserve(key, entry))
            connection.start()
            entry.h2.append(connection)
            self._ensure_sweeper()
            return connection
        finally:
            entry.h2_dial = None

    # ------------------------------------------------------------------ accounting

    def _reserve(self, entry: _Entry, endpoint: Endpoint) -> None:
        if entry.connections >= self.limits.max_connections_per_endpoint:
            self.stats.overflows += 1
            raise UpstreamOverflow(
                f"{entry.connections} connections to {endpoint.ip}:{endpoint.port} "
                f"(limit {self.limits.max_connections_per_endpoint})"
            )
        entry.connections += 1

    def _unreserve(self, key: EndpointKey, entry: _Entry) -> None:
        entry.connections -= 1
        empty = entry.connections <= 0 and not entry.idle and not entry.h2 and entry.h2_dial is None
        if empty and self._entries.get(key) is entry:
            del self._entries[key]

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="waypoint-upstream-sweep"
            )

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.upstream_idle_timeout
        while self._entries and not self._closed:
            await asyncio.sleep(timeout / 2)
            now = loop.time()
            for key, entry in list(self._entries.items()):
                entry.h2 = [c for c in entry.h2 if c.usable]
                for connection in [c for c in entry.idle if now - c.idle_since >= timeout or not c.usable]:
                    entry.idle.remove(connection)
                    self.stats.expired += 1
                    if connection.usable:
                        connection.close_idle()
                    else:
                        connection.close()
                for h2conn in [c for c in entry.h2 if not c.streams and now - c.idle_since >= timeout]:
                    entry.h2.remove(h2conn)
                    self.stats.expired += 1
                    h2conn.close("idle")
                empty = entry.connections <= 0 and not entry.idle and not entry.h2 and entry.h2_dial is None
                if empty and self._entries.get(key) is entry:
                    del self._entries[key]

    async def close(self) -> None:
        """Close every pooled connection (busy HTTP/1.1 ones close when their exchange ends)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for entry in list(self._entries.values()):
            if entry.h2_dial is not None:
                entry.h2_dial.cancel()
            for connection in list(entry.idle):
                connection.close()
            entry.idle.clear()
            for h2conn in list(entry.h2):
                h2conn.close("the waypoint is shutting down")
            entry.h2.clear()
