"""`loom-waypoint` assembled: xDS, certificates, the pure parts and the data path.

Theory of operation
-------------------
* `waypoint.xds.WaypointXds` keeps the mesh's Address resources (a ztunnel `ProxyState`) and this
  waypoint's WaypointConfig (HTTPRoutes and AuthorizationPolicies as manifests) in sync with the
  controller. Every config change rebuilds the `RouteTable` and the `WaypointAuthorizer` (pure, a few
  ms) and swaps them in at once; requests in flight keep the tables they started with.
* Until the first WaypointConfig arrives nothing is served: `WaypointState.resolve` answers None for
  every destination, so tunnels are refused rather than forwarded without policy (fail closed).
* Certificates for the waypoint's own identity come from the controller's CA through ztunnel's
  `CertificateManager` (renewal at half-life, backoff); the HBONE server asks for the current one per
  connection, so rotation needs no restart, and upstream connections use the same one.
* Endpoints: the balancer's view of a Service is refreshed from the Address state when its generation
  changed since the last pick for that Service.
* L4 (TCP) Services are authorized with the same AuthorizationPolicies on their L4 attributes only.
* Telemetry: `istio_requests_*` with reporter="waypoint", `loom_waypoint_refused_total{reason}`, one
  access log line per request on stdout; the source workload's labels come from the Address state.
* Readiness (:15021 /healthz/ready) once xDS answered both types and the first certificate was issued.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Mapping
from typing import Final, cast

from prometheus_client import CollectorRegistry

from loom.hbone import IPV6_UNAVAILABLE, listening_socket
from loom.hbone.headers import format_address
from loom.hbone.stats import HboneStats
from loom.identity import Identity, WorkloadCertificate
from waypoint.authz import WaypointAuthorizer
from waypoint.balancer import EndpointBalancer, service_key
from waypoint.config import Config
from waypoint.model import AuthzDecision, Endpoint, RequestView, RouteAction, ServiceRef
from waypoint.paths import PathError, normalize_path
from waypoint.proxy import WaypointProxy
from waypoint.proxy.interfaces import Destination, RefusedRequest, RequestRecord, TunnelRecord, TunnelView
from waypoint.routing import RouteTable
from waypoint.state import WaypointState
from waypoint.telemetry import (
    AccessLog,
    AccessLogEntry,
    DestinationInfo,
    ResponseFlag,
    SourceInfo,
    WaypointMetrics,
    WorkloadInfo,
)
from waypoint.xds import WaypointView, WaypointXds, WaypointXdsSettings
from ztunnel.admin import MetricsServer, ReadinessServer
from ztunnel.identity.caclient import CaClient
from ztunnel.identity.manager import CertificateManager
from ztunnel.readiness import Readiness
from ztunnel.state.store import StateChange

log = logging.getLogger("loom.waypoint")


def normalize(target: str) -> tuple[str, str]:
    """waypoint.paths for the proxy: (path, query), or ValueError naming why the target is refused."""
    result = normalize_path(target)
    if isinstance(result, PathError):
        raise ValueError(result.reason)
    return result.path, result.query


# The unspecified IPv4 address means every address: IPv6 gets a listener of its own (IPv6 only, so no
# client address is ever IPv4-mapped), where the kernel has IPv6.
_EVERY_IPV4 = "0.0.0.0"
_EVERY_IPV6 = "::"


def hbone_listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for HBONE on host:port; for 0.0.0.0 also on [::] (see above)."""
    listeners = [listening_socket(host, port)]
    if host == _EVERY_IPV4:
        try:
            listeners.append(listening_socket(_EVERY_IPV6, port))
        except OSError as e:
            if e.errno not in IPV6_UNAVAILABLE:
                listeners[0].close()
                raise
            log.info("no IPv6 here (%s); HBONE on IPv4 only", e.strerror)
    return listeners


# Telemetry labels kept per (side, address, identity); past this many the cache starts over.
INFO_CACHE_SIZE: Final = 4096


class WaypointApp:
    """See the module docstring."""

    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        self.config = config
        self.settings = WaypointXdsSettings.from_env(env)
        self.identity = self.settings.identity
        self.registry = CollectorRegistry()
        self.xds = WaypointXds(self.settings, registry=self.registry)
        self.state = WaypointState(self.xds.addresses)
        self.certificates = CertificateManager(
            CaClient(self.settings.ca_address, self.settings.root_cert, self.settings.token_source)
        )
        self.metrics = WaypointMetrics(self.registry, cluster_id=self.settings.cluster_id)
        self.access_log = AccessLog()
        self._infos: dict[tuple[str, str, Identity | None], WorkloadInfo | None] = {}
        self._info_generation = -1
        self.balancer = EndpointBalancer()
        self._generations: dict[tuple[str, str, int], int] = {}
        self._rng = random.Random()
        self._waypoint = (self.settings.namespace, self.settings.name)
        self._router = RouteTable.build((), self.state.service_ref, waypoint=self._waypoint, rng=self._rng)
        self._authorizer = WaypointAuthorizer.build((), waypoint=self._waypoint)
        self.readiness = Readiness()
        self._config_block = self.readiness.block("waypoint configuration")
        self._cert_block = self.readiness.block("certificate")
        self.proxy = WaypointProxy(
            certificate=self._certificate,
            resolver=self,
            router=self,
            authorizer=self,
            picker=self,
            observer=self,
            normalize=normalize,
            l4_authorizer=self._authorize_tunnel,
            rng=self._rng,
            limits=config.limits,
            server_stats=HboneStats("server", self.registry),
            client_stats=HboneStats("client", self.registry),
        )
        self.metrics_server = MetricsServer(self.registry, *config.metrics_addr)
        self.readiness_server = ReadinessServer(self.readiness, *config.readiness_addr)
        self._listeners: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._unwatch = self.xds.config.watch(self._on_config)
        # Routes name backend Services that may arrive (or change ports) after the route itself.
        self._unwatch_addresses = self.xds.addresses.watch(self._on_addresses)
        self._rebuild_pending = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.readiness_server.start()
        await self.metrics_server.start()
        self.xds.start()
        self._tasks.append(asyncio.create_task(self._first_certificate(), name="waypoint-first-cert"))
        host, port = self.config.listen_addr
        self._listeners = hbone_listeners(host, port)
        for listener in self._listeners:
            self.proxy.start(listener)
        log.info(
            "waypoint %s/%s serving HBONE on %s as %s",
            *self._waypoint,
            ", ".join(format_address(*sock.getsockname()[:2]) for sock in self._listeners),
            self.identity,
        )

    async def stop(self) -> None:
        grace = self.config.termination_deadline.total_seconds()
        await self.proxy.stop(grace)
        self.access_log.flush()
        for task in self._tasks:
            task.cancel()
        self._unwatch()
        self._unwatch_addresses()
        await self.xds.close()
        await self.certificates.close()
        await self.metrics_server.stop()
        await self.readiness_server.stop()

    async def _first_certificate(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.certificates.fetch(self.identity)
            except Exception as exc:  # the CA is unreachable or refuses: retried, reported
                log.warning("no certificate for %s yet: %s", self.identity, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self._cert_block.release()
            return

    async def _certificate(self) -> WorkloadCertificate:
        return await self.certificates.fetch(self.identity)

    # -- configuration -----------------------------------------------------------------------------
    def _on_addresses(self, change: StateChange) -> None:
        if change.services and not self._rebuild_pending:
            # Coalesce a burst of Address updates into one rebuild on the next loop iteration.
            self._rebuild_pending = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_pending = False
        self._on_config(self.state.view)

    def _on_config(self, view: WaypointView | None) -> None:
        self.state.view = view
        routes = view.routes if view is not None else ()
        policies = view.policies if view is not None else ()
        router = RouteTable.build(routes, self.state.service_ref, waypoint=self._waypoint, rng=self._rng)
        authorizer = WaypointAuthorizer.build(
            policies, waypoint=self._waypoint, trust_domain=self.settings.trust_domain
        )
        for diagnostic in (*router.diagnostics, *authorizer.diagnostics):
            log.warning("configuration: %s", diagnostic)
        self._router, self._authorizer = router, authorizer
        if view is not None:
            self._config_block.release()
            log.info(
                "configuration: %d services, %d routes, %d policies",
                len(view.services),
                len(routes),
                len(policies),
            )

    # -- the proxy's interfaces --------------------------------------------------------------------
    def resolve(self, ip: str, port: int) -> Destination | None:
        return self.state.resolve(ip, port)

    def route(self, request: RequestView) -> RouteAction:
        return self._router.route(request)

    def check(self, request: RequestView) -> AuthzDecision:
        return self._authorizer.check(request)

    def _authorize_tunnel(self, tunnel: TunnelView) -> AuthzDecision:
        return self._authorizer.check_connection(tunnel.source, tunnel.service, tunnel.destination_ip)

    def pick(self, service: ServiceRef, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        key = service_key(service)
        generation = self.xds.addresses.generation
        if self._generations.get(key) != generation:
            self.balancer.update(key, self.state.endpoints(service))
            self._generations[key] = generation
        return self.balancer.pick(service, exclude)

    def report(self, endpoint: Endpoint, success: bool) -> None:
        self.balancer.report(endpoint, success)

    # -- telemetry ---------------------------------------------------------------------------------
    def _info_cache(self) -> dict[tuple[str, str, Identity | None], WorkloadInfo | None]:
        """The telemetry labels of source and destination workloads, by (side, address, identity),
        valid while the workload state is unchanged: most requests come from and go to the same few
        pods, and looking them up and building their labels was a tenth of a request's cost."""
        generation = self.xds.addresses.generation
        if generation != self._info_generation or len(self._infos) > INFO_CACHE_SIZE:
            self._infos.clear()
            self._info_generation = generation
        return self._infos

    def _source(self, request: RequestView) -> SourceInfo | None:
        cache = self._info_cache()
        ip = request.source.address.rsplit(":", 1)[0].strip("[]")
        key = ("source", ip, request.source.identity)
        if key in cache:
            return cast(SourceInfo | None, cache[key])
        try:
            workload = self.xds.addresses.workload_by_ip(ip)
        except ValueError:
            workload = None
        info = SourceInfo.from_workload(workload, request.source.identity) if workload else None
        cache[key] = info
        return info

    def _destination(self, endpoint: Endpoint | None) -> DestinationInfo | None:
        if endpoint is None:
            return None
        cache = self._info_cache()
        key = ("destination", endpoint.ip, endpoint.identity)
        if key in cache:
            return cast(DestinationInfo | None, cache[key])
        workload = self.xds.addresses.workload_by_ip(endpoint.ip)
        info = DestinationInfo.from_workload(workload, endpoint.identity) if workload else None
        cache[key] = info
        return info

    def record(self, record: RequestRecord) -> None:
        self.metrics.record(
            record.view,
            record.response_code,
            record.duration,
            record.request_bytes,
            record.response_bytes,
            endpoint=record.endpoint,
            source_workload=self._source(record.view),
            grpc_status=record.grpc_status,
            response_flags=record.response_flags,
            destination=self._destination(record.endpoint),
            service=record.backend,
        )
        self.access_log.write(
            AccessLogEntry.for_request(
                record.view,
                record.start_time,
                record.response_code,
                response_flags=record.response_flags,
                response_code_details=record.response_code_details,
                bytes_received=record.request_bytes,
                bytes_sent=record.response_bytes,
                duration_ms=int(record.duration * 1000),
                endpoint=record.endpoint,
                service=record.backend,
                route_name=record.route,
            )
        )

    def record_tunnel(self, record: TunnelRecord) -> None:
        log.info(
            "tcp %s -> %s/%s:%d %s sent=%d received=%d%s",
            record.view.source.principal or record.view.source.address,
            record.view.service.namespace,
            record.view.service.name,
            record.view.service.port,
            record.response_flags,
            record.sent,
            record.received,
            f" error={record.error}" if record.error else "",
        )

    def refused(self, reason: str, request: RefusedRequest | None = None) -> None:
        """Counted by reason; a request answered with a status also gets its access log line (flag
        DPE). Not in istio_requests_total: like Envoy's codec errors, it never reached the filters."""
        self.metrics.refused(reason)
        if request is not None:
            self.access_log.write(
                AccessLogEntry(
                    start_time=request.start_time,
                    method=request.method,
                    path=request.path,
                    protocol=request.protocol,
                    response_code=request.status,
                    response_flags=ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR.value,
                    response_code_details=request.details,
                    authority=request.authority,
                    downstream_local_address=request.destination,
                    downstream_remote_address=request.peer_address,
                    duration_ms=0,
                )
            )
