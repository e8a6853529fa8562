"""The loom-controller process: configuration source -> translation -> xDS + CA, plus /ready and /metrics.

Theory of operation
-------------------
    source.run(on_change) ──► on_change(snapshot, diagnostics)       (event loop, cheap)
                                 ├─ current snapshot + NodeIndex replaced at once (the CA authorizes
                                 │  against the newest pods even while a translation is running)
                                 └─ wake the translation worker
    translation worker ──► Translator.update(snapshot) + xds.prepare   (worker thread: the event loop
                            │                                           keeps serving streams and CSRs)
                            └─► xds.publish_prepared ─► debounced push to every stream
                                diagnostics logged once each; in Kubernetes mode, AuthorizationPolicy
                                status conditions written (only when they change)

Waypoints: every translation also yields each waypoint's WaypointConfig (controller/waypoints/xds.py),
served next to the translation to that waypoint only; waypoints authenticate with their own credential
(controller/waypoints/auth.py). With `--deploy-waypoints` a reconciler task runs the waypoint Gateways
(controller/waypoints/reconciler.py) after every snapshot and whenever it asks to be run again: on
Kubernetes through the API server, in directory mode into the lab store given by `--lab-store`.

Root certificate: in Kubernetes mode a publisher (controller/rootcert.py) keeps the ConfigMap
`istio-ca-root-cert` (the CA's trust bundle, which ztunnel and waypoints mount) in every namespace, as
istiod does; it runs after every snapshot (new namespaces) and rereads every namespace's ConfigMap
periodically (restoring deleted or edited ones).

Snapshots arriving while a translation runs are coalesced: the worker always translates the newest one
next, so a burst of N changes costs at most two translations. A translation that raises is logged and
counted, and the previous state stays served (never an empty one). `/ready` answers 200 only once the
first translation has been committed to the xDS server.

One gRPC port (TLS; the certificate is issued by our own CA and rotated at half-life at handshake time)
carries both the delta xDS service and the CA service. `stop()` marks the controller unready, ends every
xDS stream cleanly, stops the gRPC server with a short grace for in-flight CSRs, and closes the HTTP
server; it is safe to call after a partial `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
from aiohttp import web

from controller.auth import (
    LabNodeAuthenticator,
    NodeAuthenticator,
    TokenReviewer,
)
from controller.ca.authority import CaError, CertificateAuthority, ServingCertificate, write_private_file
from controller.ca.service import CertificateService, NodeIndex
from controller.config import Config, HostPort
from controller.metrics import ControllerMetrics
from controller.sources.base import ConfigSource
from controller.translate import MeshConfig, Translation, Translator
from controller.waypoints.auth import KubernetesMeshAuthenticator, LabMeshAuthenticator
from controller.waypoints.desired import LabSettings, WaypointSettings
from controller.waypoints.reconciler import WaypointReconciler
from controller.waypoints.xds import WAYPOINT_CONFIG_TYPE_URL, WaypointConfigBuilder
from controller.xds.resources import ResourceSet, prepare
from controller.xds.server import XdsServer
from loom.identity import Identity
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import AuthorizationPolicy, ConfigSnapshot, ResourceKey

if TYPE_CHECKING:
    from controller.rootcert import RootCertPublisher

logger = logging.getLogger("controller.app")

# The root node proxies must trust, published where the lab (and an operator) can pick it up.
PUBLISHED_ROOT_FILE = "root-cert.pem"
CONTROLLER_SERVICE_ACCOUNT = "loom-controller"
# The serving certificate is re-issued at half-life; a week keeps rotations rare and a leaked key short-lived.
SERVING_CERT_TTL = dt.timedelta(days=7)
# In-flight CSRs get this long to finish on shutdown; xDS streams are ended explicitly before.
SHUTDOWN_GRACE_SECONDS = 1.0
# A source that crashed (a bug: sources retry transient failures themselves) is restarted after this.
SOURCE_RESTART_SECONDS = (0.5, 30.0)
# Condition written on AuthorizationPolicies enforced by node proxies (Istio's condition type).
ZTUNNEL_CONDITION = "ZtunnelAccepted"
# Messages longer than this are cut in status conditions (Kubernetes allows 32 KiB; keep it readable).
MAX_CONDITION_MESSAGE = 1024
# Where the lab's waypoint credentials are written, under the state directory (never the config dir).
WAYPOINT_TOKEN_DIR = "waypoint-tokens"
# A reconcile that raised (a bug: failures are reported, not raised) is tried again after this.
WAYPOINT_RETRY_SECONDS = 5.0
# gRPC message limits: CSRs and xDS requests are small; responses are split by the delta state machine.
_GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", 1024 * 1024),
    ("grpc.so_reuseport", 0),
    # Detect dead node proxies (a powered-off node does not close its TCP connection).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


class StartupError(Exception):
    """The controller cannot start (bad CA material, unreadable config path, port in use, ...)."""


class ControllerApp:
    """All of loom-controller, startable and stoppable in-process (tests use port 0)."""

    def __init__(
        self,
        config: Config,
        *,
        source: ConfigSource | None = None,
        token_reviewer: TokenReviewer | None = None,
    ) -> None:
        """`source` replaces the one `config` selects (tests inject a KubernetesSource on a fake API
        server); `token_reviewer` defaults to the source when it can review tokens."""
        self.config = config
        self.metrics = ControllerMetrics()
        self._source = source
        self._token_reviewer = token_reviewer
        self._snapshot = ConfigSnapshot()
        self._source_diagnostics: tuple[Diagnostic, ...] = ()
        # Built from the snapshot on the first certificate request after a change, not on every
        # change: a 10,000-pod index costs ~10 ms and config changes far outnumber CSRs.
        self._node_index: NodeIndex | None = NodeIndex()
        self._changed = asyncio.Event()
        self._ready = False
        self._logged_diagnostics: set[str] = set()
        self._status_written: dict[ResourceKey, Mapping[str, Any]] = {}
        self._status_queue: dict[ResourceKey, dict[str, Any]] = {}
        self._status_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc_server: grpc.aio.Server | None = None
        self._http_runner: web.AppRunner | None = None
        self._serving_lock = threading.Lock()
        self._serving: ServingCertificate | None = None
        self.authority: CertificateAuthority | None = None
        self.lab_credentials: LabNodeAuthenticator | None = None
        self.lab_mesh_credentials: LabMeshAuthenticator | None = None
        self.waypoints: WaypointReconciler | None = None
        self._waypoint_wake = asyncio.Event()
        self.root_certs: RootCertPublisher | None = None  # Kubernetes mode only
        self._root_cert_wake = asyncio.Event()
        self.xds: XdsServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        config = self.config
        try:
            authority, self.lab_credentials = await asyncio.to_thread(self._prepare_state)
        except (CaError, OSError, ValueError) as e:
            raise StartupError(str(e)) from e
        source = self._source or self._make_source()
        self._source = source
        authenticator = self._make_authenticator(source)
        self.xds = XdsServer(
            authenticator, self.metrics, debounce=config.debounce, max_delay=config.max_push_delay
        )
        await self.xds.start()
        self.authority = authority
        ca_service = CertificateService(authority, authenticator, lambda: self.node_index, self.metrics)

        server = grpc.aio.server(options=_GRPC_OPTIONS)
        server.add_generic_rpc_handlers((self.xds.method_handlers(), ca_service.method_handlers()))
        try:
            self.grpc_port = server.add_secure_port(str(config.grpc_addr), self._server_credentials())
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {config.grpc_addr} (gRPC): {e}") from e
        if self.grpc_port == 0:
            raise StartupError(f"cannot listen on {config.grpc_addr} (gRPC)")
        await server.start()
        self._grpc_server = server

        http = web.Application()
        http.router.add_get("/ready", self._handle_ready)
        http.router.add_get("/metrics", self._handle_metrics)
        runner = web.AppRunner(http, access_log=None, handle_signals=False)
        await runner.setup()
        self._http_runner = runner
        site = web.TCPSite(runner, config.http_addr.host, config.http_addr.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot listen on {config.http_addr} (HTTP): {e.strerror or e}") from e
        self.http_port = int(runner.addresses[0][1])

        self._tasks = [
            asyncio.create_task(self._run_source(source), name="config-source"),
            asyncio.create_task(self._translate_loop(), name="translate"),
        ]
        if config.kubernetes:
            self._tasks.append(asyncio.create_task(self._status_writer(), name="policy-status"))
            self.root_certs = self._make_root_cert_publisher(source, authority)
            self._tasks.append(asyncio.create_task(self._root_cert_loop(self.root_certs), name="root-cert"))
        if config.deploy_waypoints:
            self.waypoints = self._make_waypoint_reconciler(source)
            self._tasks.append(asyncio.create_task(self._waypoint_loop(self.waypoints), name="waypoints"))
        logger.info(
            "controller started",
            extra={
                "fields": {
                    "grpc": self.grpc_address,
                    "http": self.http_address,
                    "source": "kubernetes" if config.kubernetes else ",".join(map(str, config.config_dirs)),
                    "trust_domain": config.trust_domain,
                }
            },
        )

    async def stop(self) -> None:
        self._ready = False
        self.metrics.ready.set(0)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.xds is not None:
            await self.xds.close()
        if self._grpc_server is not None:
            server, self._grpc_server = self._grpc_server, None
            await server.stop(SHUTDOWN_GRACE_SECONDS)
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            await runner.cleanup()
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    # ------------------------------------------------------------------ queries

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def snapshot(self) -> ConfigSnapshot:
        return self._snapshot

    @property
    def node_index(self) -> NodeIndex:
        if self._node_index is None:
            self._node_index = NodeIndex.from_snapshot(self._snapshot)
        return self._node_index

    @property
    def grpc_address(self) -> str:
        return str(HostPort(self.config.grpc_addr.host, self.grpc_port))

    @property
    def http_address(self) -> str:
        return str(HostPort(self.config.http_addr.host, self.http_port))

    @property
    def root_cert_pem(self) -> str:
        if self.authority is None:
            raise RuntimeError("the controller has not started")
        return self.authority.trust_bundle_pem

    def issue_node_token(self, node: str) -> str:
        """A lab credential for `node` (directory mode only)."""
        if self.lab_credentials is None:
            raise RuntimeError("node credentials are only issued in directory mode, after start()")
        return self.lab_credentials.issue_node_token(node)

    def issue_waypoint_token(self, namespace: str, name: str) -> str:
        """A lab credential for the waypoint of Gateway `namespace`/`name` (directory mode only)."""
        if self.lab_mesh_credentials is None:
            raise RuntimeError("waypoint credentials are only issued in directory mode, after start()")
        return self.lab_mesh_credentials.issue_waypoint_token(namespace, name)

    # ------------------------------------------------------------------ wiring

    def _prepare_state(self) -> tuple[CertificateAuthority, LabNodeAuthenticator | None]:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if config.cacerts_dir is not None:
            authority = CertificateAuthority.from_cacerts(
                config.cacerts_dir,
                config.trust_domain,
                default_ttl=config.cert_ttl,
                max_ttl=config.max_cert_ttl,
            )
        else:
            authority = CertificateAuthority.load_or_create(
                config.state_dir,
                config.trust_domain,
                default_ttl=config.cert_ttl,
                max_ttl=config.max_cert_ttl,
            )
        publish_root(config.state_dir, authority.trust_bundle_pem)
        lab = None if config.kubernetes else LabNodeAuthenticator.load_or_create(config.state_dir)
        return authority, lab

    def _make_source(self) -> ConfigSource:
        # Only the source in use is imported: kubernetes_asyncio is slow to import and unused in the lab.
        if self.config.kubernetes:
            from controller.sources.kubernetes import KubernetesSource

            return KubernetesSource.from_environment()
        from controller.sources.directory import DirectorySource

        try:
            # 10 ms of quiet closes a batch of file events: editors and `kubectl`-style atomic
            # renames finish well within it, and it keeps a change's propagation short.
            return DirectorySource(self.config.config_dirs, debounce=0.01)
        except (FileNotFoundError, ValueError) as e:
            raise StartupError(str(e)) from e

    def _make_authenticator(self, source: ConfigSource) -> NodeAuthenticator:
        # Node proxies as before; waypoints with their own credential (controller/waypoints/auth.py).
        if not self.config.kubernetes:
            if self.lab_credentials is None:
                raise StartupError("node credentials were not loaded")
            self.lab_mesh_credentials = LabMeshAuthenticator(self.lab_credentials, lambda: self._snapshot)
            return self.lab_mesh_credentials
        reviewer = self._token_reviewer
        if reviewer is None:
            if not hasattr(source, "token_review"):
                raise StartupError("Kubernetes mode needs a source that can review tokens")
            reviewer = cast(TokenReviewer, source)
        return KubernetesMeshAuthenticator(
            reviewer,
            lambda: self._snapshot,
            self.config.trusted_node_accounts,
        )

    def _make_waypoint_reconciler(self, source: ConfigSource) -> WaypointReconciler:
        config = self.config
        settings = WaypointSettings(
            xds_address=str(self._waypoint_xds_address()),
            image=config.waypoint_image,
            trust_domain=config.trust_domain,
            cluster_id=config.cluster_id,
            root_namespace=config.root_namespace,
        )
        if config.kubernetes:
            from controller.waypoints.kubernetes import KubernetesApplier, KubernetesWriter

            if not all(hasattr(source, m) for m in ("get_object", "create_or_update", "delete_object")):
                raise StartupError("--deploy-waypoints on Kubernetes needs a source that can write objects")
            command = config.waypoint_command or settings.command
            return WaypointReconciler(
                dataclasses.replace(settings, command=command),
                KubernetesApplier(cast(KubernetesWriter, source)),
            )
        from controller.waypoints.store import LabCredentialFiles, StoreApplier, lab_waypoint_command
        from loom.lab.store import LabStore

        if config.lab_store is None or self.lab_mesh_credentials is None:
            raise StartupError("--deploy-waypoints in directory mode needs --lab-store")
        lab = LabSettings(
            root_cert=config.state_dir / PUBLISHED_ROOT_FILE, token_dir=config.state_dir / WAYPOINT_TOKEN_DIR
        )
        settings = dataclasses.replace(
            settings, command=config.waypoint_command or lab_waypoint_command(), lab=lab
        )
        return WaypointReconciler(
            settings,
            StoreApplier(LabStore(config.lab_store)),
            credentials=LabCredentialFiles(self.lab_mesh_credentials.issue_waypoint_token, lab),
        )

    def _make_root_cert_publisher(
        self, source: ConfigSource, authority: CertificateAuthority
    ) -> RootCertPublisher:
        """The CA's trust bundle as istio-ca-root-cert in every namespace (controller/rootcert.py)."""
        from controller.rootcert import ConfigMapWriter, RootCertPublisher

        if not all(hasattr(source, m) for m in ("get_object", "create_or_update")):
            raise StartupError("Kubernetes mode needs a source that can write objects (istio-ca-root-cert)")
        return RootCertPublisher(
            cast(ConfigMapWriter, source), lambda: authority.trust_bundle_pem, registry=self.metrics.registry
        )

    async def _root_cert_loop(self, publisher: RootCertPublisher) -> None:
        from controller.rootcert import namespace_names

        await publisher.run(self._root_cert_wake, lambda: namespace_names(self._snapshot))

    def _waypoint_xds_address(self) -> HostPort:
        """Where waypoints dial the controller: as configured, else the gRPC listen address if it is a
        specific one, else the first serving-certificate IP (the lab), else its first DNS name."""
        config = self.config
        if config.waypoint_xds_address is not None:
            return config.waypoint_xds_address
        host = config.grpc_addr.host
        if host not in ("0.0.0.0", "::"):
            return HostPort(host, self.grpc_port)
        if config.tls_ips:
            return HostPort(config.tls_ips[0], self.grpc_port)
        return HostPort(config.tls_dns_names[0], self.grpc_port)

    def _server_credentials(self) -> grpc.ServerCredentials:
        initial = self._serving_configuration(force=True)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC at each handshake (on a gRPC thread): rotate once past half-life.
            try:
                return self._serving_configuration(force=False)
            except Exception:  # keep serving the current certificate rather than failing handshakes
                logger.exception("could not rotate the serving certificate")
                return None

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=False)

    def _serving_configuration(self, *, force: bool) -> grpc.ServerCertificateConfiguration | None:
        if self.authority is None:
            raise RuntimeError("the CA is not loaded")
        with self._serving_lock:
            now = dt.datetime.now(dt.UTC)
            if not force and self._serving is not None and now < self._serving.refresh_at():
                return None
            identity = Identity(
                self.config.trust_domain, self.config.root_namespace, CONTROLLER_SERVICE_ACCOUNT
            )
            self._serving = self.authority.issue_serving_certificate(
                identity, self.config.tls_dns_names, self.config.serving_ips, SERVING_CERT_TTL
            )
            # Leaf and intermediates; the root is left out since every client already has it.
            chain = "".join(self._serving.chain_pem[:-1]).encode("ascii")
            logger.info(
                "serving certificate issued",
                extra={
                    "fields": {"not_after": self._serving.not_after.isoformat(), "identity": str(identity)}
                },
            )
            return grpc.ssl_server_certificate_configuration([(self._serving.key_pem, chain)])

    # ------------------------------------------------------------------ configuration flow

    def _on_change(self, snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        self._snapshot = snapshot
        self._source_diagnostics = diagnostics
        self._node_index = None
        self.metrics.config_objects.set(len(snapshot))
        self._changed.set()
        self._waypoint_wake.set()
        self._root_cert_wake.set()

    async def _run_source(self, source: ConfigSource) -> None:
        delay, max_delay = SOURCE_RESTART_SECONDS
        while True:
            started = time.monotonic()
            try:
                await source.run(self._on_change)
                logger.error("configuration source returned; restarting it")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("configuration source failed; restarting it")
            if time.monotonic() - started > max_delay:
                delay = SOURCE_RESTART_SECONDS[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def _translate_loop(self) -> None:
        xds = self.xds
        if xds is None:
            raise RuntimeError("the xDS server is not created")
        mesh = MeshConfig(
            trust_domain=self.config.trust_domain,
            root_namespace=self.config.root_namespace,
            cluster_id=self.config.cluster_id,
            require_redirection_annotation=self.config.kubernetes,
        )
        translator = Translator(mesh)
        waypoint_configs = WaypointConfigBuilder(mesh)
        while True:
            await self._changed.wait()
            self._changed.clear()
            snapshot, source_diagnostics = self._snapshot, self._source_diagnostics
            previous = xds.latest_prepared
            started = time.perf_counter()
            try:
                translation, prepared = await asyncio.to_thread(
                    _translate, translator, waypoint_configs, snapshot, previous
                )
            except Exception:
                self.metrics.translations.labels(result="error").inc()
                logger.exception("translation failed; the previous configuration stays served")
                continue
            self.metrics.translation_seconds.observe(time.perf_counter() - started)
            self.metrics.translations.labels(result="ok").inc()
            target = xds.generation + 1
            xds.publish_prepared(prepared)
            self._report_diagnostics(source_diagnostics + translation.diagnostics)
            if self.config.kubernetes:
                self._queue_policy_status(snapshot, translation.diagnostics)
            if not self._ready:
                await xds.wait_for_generation(target)
                self._ready = True
                self.metrics.ready.set(1)
                logger.info(
                    "first configuration served",
                    extra={
                        "fields": {
                            "objects": len(snapshot),
                            "addresses": len(translation.addresses),
                            "authorizations": len(translation.authorizations),
                        }
                    },
                )

    async def _waypoint_loop(self, reconciler: WaypointReconciler) -> None:
        """Reconcile after every snapshot (the first one included: nothing runs before the source has
        delivered one), and again when the reconciler asks to be (unready waypoints, failed writes)."""
        retry_after: float | None = None
        while True:
            resync = False
            try:
                async with asyncio.timeout(retry_after):
                    await self._waypoint_wake.wait()
            except TimeoutError:
                resync = True
            self._waypoint_wake.clear()
            try:
                report = await reconciler.reconcile(self._snapshot, resync=resync)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("waypoint reconcile failed; trying again")
                retry_after = WAYPOINT_RETRY_SECONDS
                continue
            retry_after = report.retry_after

    def _report_diagnostics(self, diagnostics: Sequence[Diagnostic]) -> None:
        """Log each diagnostic once while it persists (again only if it goes away and comes back)."""
        current = {str(d): d for d in diagnostics}
        for text, diagnostic in current.items():
            if text not in self._logged_diagnostics:
                level = logging.ERROR if diagnostic.is_error else logging.WARNING
                logging.getLogger("controller.config").log(level, text)
        self._logged_diagnostics = set(current)
        for severity in Severity:
            count = sum(1 for d in current.values() if d.severity is severity)
            self.metrics.config_diagnostics.labels(severity=severity.value).set(count)

    # ------------------------------------------------------------------ policy status (Kubernetes)

    def _queue_policy_status(self, snapshot: ConfigSnapshot, diagnostics: Sequence[Diagnostic]) -> None:
        by_policy: dict[ResourceKey, list[Diagnostic]] = {}
        for d in diagnostics:
            if d.key is not None and d.key.kind == AuthorizationPolicy.KIND:
                by_policy.setdefault(d.key, []).append(d)
        for policy in snapshot.of_kind(AuthorizationPolicy):
            if policy.target_refs:
                continue  # enforced by a waypoint, not by node proxies
            condition = policy_condition(policy, by_policy.get(policy.key, []))
            if _condition_current(policy, condition) or self._status_written.get(policy.key) == condition:
                continue
            self._status_queue[policy.key] = _status_with(policy, condition)
            self._status_written[policy.key] = condition
        for key in [k for k in self._status_written if k not in snapshot]:
            del self._status_written[key]
        if self._status_queue:
            self._status_wake.set()

    async def _status_writer(self) -> None:
        patch = getattr(self._source, "patch_status", None)
        if patch is None:
            return
        while True:
            await self._status_wake.wait()
            self._status_wake.clear()
            while self._status_queue:
                key = next(iter(self._status_queue))
                status = self._status_queue.pop(key)
                try:
                    await patch(key, status)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # Forget it so the next snapshot tries again; never retry in a tight loop.
                    self._status_written.pop(key, None)
                    logger.warning(
                        "could not write policy status", extra={"fields": {"policy": str(key), "error": e}}
                    )

    # ------------------------------------------------------------------ HTTP

    async def _handle_ready(self, request: web.Request) -> web.Response:
        if self._ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: the first configuration is not served yet\n")

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _translate(
    translator: Translator, waypoints: WaypointConfigBuilder, snapshot: ConfigSnapshot, previous: ResourceSet
) -> tuple[Translation, ResourceSet]:
    translation = translator.update(snapshot)
    configs = waypoints.build(snapshot, translation)
    return translation, prepare(translation, previous, {WAYPOINT_CONFIG_TYPE_URL: configs})


def policy_condition(policy: AuthorizationPolicy, diagnostics: Sequence[Diagnostic]) -> dict[str, Any]:
    """The ZtunnelAccepted condition for a node-proxy-enforced policy, from its diagnostics."""
    condition: dict[str, Any] = {
        "type": ZTUNNEL_CONDITION,
        "status": "True",
        "reason": "Accepted",
        "message": "attached to the node proxies",
        "observedGeneration": policy.meta.generation,
    }
    if diagnostics:
        errors = [d for d in diagnostics if d.is_error]
        message = "; ".join(
            f"{d.field}: {d.message}" if d.field else d.message for d in (errors or list(diagnostics))
        )
        condition.update(
            status="False" if errors else "True",
            reason="Invalid" if errors else "UnsupportedValue",
            message=message[:MAX_CONDITION_MESSAGE],
        )
    return condition


def _existing_conditions(policy: AuthorizationPolicy) -> list[Mapping[str, Any]]:
    status = policy.raw.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    return [c for c in conditions if isinstance(c, Mapping)] if isinstance(conditions, list) else []


def _condition_current(policy: AuthorizationPolicy, condition: Mapping[str, Any]) -> bool:
    for existing in _existing_conditions(policy):
        if existing.get("type") == condition["type"]:
            return all(existing.get(k) == v for k, v in condition.items())
    return False


def _status_with(policy: AuthorizationPolicy, condition: Mapping[str, Any]) -> dict[str, Any]:
    """The policy's status with our condition replaced (others kept: a merge patch replaces lists)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    others = [dict(c) for c in _existing_conditions(policy) if c.get("type") != condition["type"]]
    return {"conditions": [*others, {**condition, "lastTransitionTime": now}]}


def publish_root(state_dir: Path, pem: str) -> Path:
    """Write the trust bundle where node proxies in the lab read it; returns the path."""
    path = state_dir / PUBLISHED_ROOT_FILE
    write_private_file(path, pem.encode("ascii"))
    os.chmod(path, 0o644)
    return path
