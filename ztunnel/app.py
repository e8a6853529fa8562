"""The loom-ztunnel process, assembled: control plane clients, in-pod proxies, HTTP surfaces, lifecycle.

Theory of operation
-------------------
`ZtunnelApp.start()` builds, on the running loop:

* `ProxyState` (this node's name) fed by the delta `XdsClient`;
* `CaClient` + `CertificateManager`, tracking the state (certificates for local identities are
  prefetched when their workloads appear, forgotten when none needs them);
* the data path: `ProxyContext` (state, certificates, metrics, live-connection registry re-checked on
  policy changes) and the `InpodProxyManager` driven by the `InpodClient` (ZDS);
* admin (:15000), metrics (:15020) and readiness (:15021) servers; readiness is blocked until the first
  full xDS configuration and the first complete in-pod snapshot.

Then the clients run as tasks. `shutdown()` is SIGTERM: readiness goes down, the ZDS connection is closed
(the node agent then sends new pods to the newest ztunnel), every pod listener closes at once, open
connections drain until `CONNECTION_TERMINATION_DEADLINE` and are closed; then the control plane clients
and the servers stop. `abort()` (a second SIGTERM) closes every connection immediately, which makes a
running `shutdown()` finish at once. All listeners bind with SO_REUSEPORT, so a new ztunnel can take
over the pods while this one drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CollectorRegistry

from loom.hbone import ClientLimits, ServerLimits
from ztunnel.admin import (
    AdminServer,
    AdminSources,
    MetricsServer,
    ReadinessServer,
    workload_states_from_inpod,
)
from ztunnel.config import Config
from ztunnel.connections import ConnectionRegistry
from ztunnel.identity import CaClient, CertificateManager
from ztunnel.inpod import InpodClient, InpodClientConfig
from ztunnel.proxy import InpodProxyManager, ProxyContext, ProxySettings
from ztunnel.readiness import Readiness
from ztunnel.state import ProxyState
from ztunnel.telemetry import LogControl, ProxyMetrics
from ztunnel.xds import Backoff, XdsClient, token_from_file

logger = logging.getLogger("ztunnel")


class ZtunnelApp:
    """One node proxy (see the module docstring). Several can run in one process (tests)."""

    def __init__(
        self,
        config: Config,
        *,
        log_control: LogControl | None = None,
        inpod_config: InpodClientConfig | None = None,
        settings: ProxySettings | None = None,
        xds_backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.log_control = log_control
        self.inpod_config = inpod_config or InpodClientConfig(socket_path=config.inpod_uds)
        self.settings = settings or ProxySettings(
            drain_deadline=config.connection_termination_deadline.total_seconds(),
            cluster_id=config.cluster_id,
            client_limits=ClientLimits(
                max_streams_per_connection=config.pool_max_streams_per_connection,
                idle_timeout=config.pool_unused_release_timeout.total_seconds(),
            ),
            server_limits=ServerLimits(),
        )
        self.xds_backoff = xds_backoff
        self.rng = rng or random.Random()
        self.registry = CollectorRegistry(auto_describe=True)
        self.readiness = Readiness()
        self.state = ProxyState(config.node_name)
        self.connections = ConnectionRegistry()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._shutdown_started = False
        self._servers: list[AdminServer | MetricsServer | ReadinessServer] = []

    async def start(self) -> None:
        """Build everything and start serving; raises (with everything released) if a port is taken."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        config = self.config
        token = token_from_file(config.node_token_file)
        xds_blocker = self.readiness.block("xds")
        inpod_blocker = self.readiness.block("inpod")
        self.xds = XdsClient(
            config.xds_address,
            config.root_cert,
            token,
            config.node_name,
            self.state,
            cluster_id=config.cluster_id,
            registry=self.registry,
            backoff=self.xds_backoff,
            rng=self.rng,
        )
        self.ca = CaClient(
            config.ca_address, config.root_cert, token, cluster_id=config.cluster_id, ttl=config.secret_ttl
        )
        self.certificates = CertificateManager(self.ca, rng=self.rng)
        self.certificates.track(self.state)
        self.metrics = ProxyMetrics(self.registry)
        self.context = ProxyContext(
            self.state, self.certificates, self.metrics, self.connections, self.settings, rng=self.rng
        )
        self.manager = InpodProxyManager(self.context)
        self.inpod = InpodClient(self.manager, self.inpod_config)
        sources = AdminSources(
            state=self.state,
            certificates=self.certificates,
            connections=self.connections,
            authorizations=lambda: self.state.authorizations.values(),
            workload_state=lambda: workload_states_from_inpod(self.inpod.workloads()),
            log_control=self.log_control,
        )
        self.admin = AdminServer(sources, *config.admin_addr, reuse_port=True)
        self.metrics_server = MetricsServer(self.registry, *config.metrics_addr, reuse_port=True)
        self.readiness_server = ReadinessServer(self.readiness, *config.readiness_addr, reuse_port=True)
        try:
            for server in (self.admin, self.metrics_server, self.readiness_server):
                await server.start()
                self._servers.append(server)
        except BaseException:
            await self._stop_servers()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            self.xds.start(),
            loop.create_task(self.inpod.run(), name="inpod-client"),
            loop.create_task(
                self._release_when(self.xds.ready.wait(), xds_blocker.release), name="ready-xds"
            ),
            loop.create_task(
                self._release_when(self.inpod.wait_ready(), inpod_blocker.release), name="ready-inpod"
            ),
        ]
        logger.info(
            "ztunnel started",
            extra={
                "fields": {
                    "node": config.node_name,
                    "controller": config.xds_address,
                    "inpod": self.inpod_config.socket_path,
                }
            },
        )

    @staticmethod
    async def _release_when(waiting: Awaitable[object], release: Callable[[], None]) -> None:
        await waiting
        release()

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    @property
    def ports(self) -> Mapping[str, int]:
        """The bound HTTP ports by name (admin, metrics, readiness)."""
        return {server.name: server.port for server in self._servers}

    async def shutdown(self) -> None:
        """SIGTERM: listeners closed now, connections drained until the deadline, then everything stops."""
        if self._shutdown_started:
            return
        self._shutdown_started = True
        self.readiness.block("shutdown")
        deadline = self.settings.drain_deadline
        # Stop taking pods: the node agent hands new ones to the newest ztunnel connection.
        await self._cancel_tasks(names=("inpod-client", "ready-inpod"))
        await self.manager.shutdown(deadline)
        await self._close()

    async def abort(self) -> None:
        """A second SIGTERM, or teardown: close every connection now."""
        self._shutdown_started = True
        await self.manager.close_listeners()
        await self.manager.abort()

    async def stop(self) -> None:
        """Immediate stop (tests' teardown): abort connections, then release everything."""
        if not self._started:
            return
        await self.abort()
        await self._close()

    async def _close(self) -> None:
        await self._cancel_tasks()
        await self.xds.close()
        await self.certificates.close()
        await self.ca.close()
        self.context.close()
        await self._stop_servers()

    async def _cancel_tasks(self, names: tuple[str, ...] | None = None) -> None:
        chosen = [t for t in self._tasks if names is None or t.get_name() in names]
        for task in chosen:
            task.cancel()
        for task in chosen:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = [t for t in self._tasks if t not in chosen]

    async def _stop_servers(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.stop()
