"""A node proxy's admin, metrics and readiness servers on 127.0.0.1 (ephemeral ports), fed by a real
ProxyState, a CertificateManager holding a certificate minted by the controller's CA, a connection
registry with two live connections, and a ProxyMetrics on its own registry."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from controller.ca.authority import CertificateAuthority
from loom.api import authorization_pb2, workload_pb2
from loom.identity import Identity, WorkloadCertificate
from ztunnel.admin import AdminServer, AdminSources, MetricsServer, ReadinessServer
from ztunnel.connections import CloseReason, ConnectionInfo, ConnectionRegistry, Direction, Transport
from ztunnel.identity import CertificateManager, build_csr, verify_issued
from ztunnel.identity.caclient import new_key
from ztunnel.readiness import BlockToken, Readiness
from ztunnel.state import ProxyState
from ztunnel.telemetry.access_log import SCOPES, LogControl
from ztunnel.telemetry.metrics import ProxyMetrics

CLUSTER = "Kubernetes"
PRODUCTPAGE = Identity("cluster.local", "default", "bookinfo-productpage")


def uid(name: str, namespace: str = "default") -> str:
    return f"{CLUSTER}//Pod/{namespace}/{name}"


def hostname(name: str, namespace: str = "default") -> str:
    return f"{name}.{namespace}.svc.cluster.local"


def waypoint_ref(name: str, namespace: str = "default") -> workload_pb2.GatewayAddress:
    return workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(namespace=namespace, hostname=hostname(name, namespace)),
        hbone_mtls_port=15008,
    )


def pod(
    name: str,
    ip: str,
    *,
    namespace: str = "default",
    account: str = "",
    node: str = "node-a",
    hbone: bool = True,
    native: bool = False,
    healthy: bool = True,
    services: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    waypoint: workload_pb2.GatewayAddress | None = None,
) -> workload_pb2.Address:
    address = workload_pb2.Address()
    w = address.workload
    w.uid, w.name, w.namespace = uid(name, namespace), name, namespace
    w.addresses.append(ipaddress.ip_address(ip).packed)
    w.tunnel_protocol = workload_pb2.HBONE if hbone else workload_pb2.NONE
    w.native_tunnel = native
    w.service_account = account
    w.node = node
    w.status = workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY
    w.cluster_id = CLUSTER
    w.workload_name = name.rsplit("-", 1)[0]
    w.canonical_name = name.split("-", 1)[0]
    w.canonical_revision = "v1"
    if waypoint is not None:
        w.waypoint.CopyFrom(waypoint)
    for svc, ports in (services or {}).items():
        w.services[f"{namespace}/{hostname(svc, namespace)}"].ports.extend(
            workload_pb2.Port(service_port=p, target_port=t) for p, t in ports
        )
    return address


def svc(
    name: str, vip: str, port: int, target: int, waypoint: workload_pb2.GatewayAddress | None = None
) -> workload_pb2.Address:
    address = workload_pb2.Address()
    s = address.service
    s.name, s.namespace, s.hostname = name, "default", hostname(name)
    s.addresses.add(network="", address=ipaddress.ip_address(vip).packed)
    s.ports.add(service_port=port, target_port=target)
    if waypoint is not None:
        s.waypoint.CopyFrom(waypoint)
    return address


def policy(
    name: str, namespace: str, scope: int, action: int, *, principal: str = "", namespace_match: str = ""
) -> authorization_pb2.Authorization:
    p = authorization_pb2.Authorization(name=name, namespace=namespace, scope=scope, action=action)  # type: ignore[arg-type]
    match = p.groups.add().rules.add().matches.add()
    if principal:
        match.principals.add(exact=principal)
    if namespace_match:
        match.namespaces.add(exact=namespace_match)
    return p


def build_state() -> tuple[ProxyState, list[authorization_pb2.Authorization]]:
    state = ProxyState("node-a")
    addresses = [
        pod(
            "productpage-v1-aaa",
            "10.244.1.10",
            account="bookinfo-productpage",
            services={"productpage": [(9080, 9080)]},
        ),
        pod(
            "reviews-v1-bbb",
            "10.244.1.20",
            waypoint=waypoint_ref("waypoint"),
            services={"reviews": [(9080, 9080)]},
        ),
        pod(
            "reviews-v2-ccc",
            "10.244.2.21",
            node="node-b",
            healthy=False,
            services={"reviews": [(9080, 9080)]},
        ),
        pod("waypoint-ddd", "10.244.1.99", native=True, services={"waypoint": [(15008, 15008)]}),
        pod("legacy-eee", "10.244.3.5", namespace="legacy", node="node-b", hbone=False),
        svc("productpage", "10.96.0.20", 9080, 9080),
        svc("reviews", "10.96.0.10", 9080, 9080, waypoint=waypoint_ref("waypoint")),
        svc("waypoint", "10.96.0.99", 15008, 15008),
    ]
    names = {
        a.workload.uid if a.WhichOneof("type") == "workload" else f"default/{a.service.hostname}": a
        for a in addresses
    }
    assert state.apply_addresses(names) == {}
    policies = [
        policy(
            "allow-curl",
            "default",
            authorization_pb2.WORKLOAD_SELECTOR,
            authorization_pb2.ALLOW,
            principal="cluster.local/ns/default/sa/curl",
        ),
        policy(
            "deny-legacy",
            "default",
            authorization_pb2.NAMESPACE,
            authorization_pb2.DENY,
            namespace_match="legacy",
        ),
        policy(
            "audit", "istio-system", authorization_pb2.GLOBAL, authorization_pb2.DENY, namespace_match="attic"
        ),
    ]
    assert state.apply_authorizations({f"{p.namespace}/{p.name}": p for p in policies}) == {}
    return state, policies


class CaSource:
    """A CertificateSource backed by a real CertificateAuthority (no network)."""

    def __init__(self, state_dir: Path) -> None:
        self.authority = CertificateAuthority.load_or_create(state_dir, "cluster.local")

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        key = new_key()
        chain = self.authority.sign(build_csr(identity, key), identity, dt.timedelta(hours=1))
        return verify_issued(identity, key, chain, self.authority.trust_bundle_pem, dt.datetime.now(dt.UTC))


@dataclass
class AdminHarness:
    state: ProxyState
    policies: list[authorization_pb2.Authorization]
    certificates: CertificateManager
    connections: ConnectionRegistry
    readiness: Readiness
    blockers: dict[str, BlockToken]
    log_control: LogControl
    prometheus: CollectorRegistry
    metrics: ProxyMetrics
    admin: AdminServer
    metrics_server: MetricsServer
    readiness_server: ReadinessServer
    closed: list[CloseReason]

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin.port}"


def _register_connections(registry: ConnectionRegistry, closed: list[CloseReason]) -> None:
    async def close(reason: CloseReason) -> None:
        closed.append(reason)

    registry.register(
        ConnectionInfo(
            uid("productpage-v1-aaa"),
            "productpage-v1-aaa.default",
            Direction.OUTBOUND,
            ipaddress.ip_address("10.244.1.10"),
            35380,
            ipaddress.ip_address("10.244.1.99"),
            15008,
            "10.96.0.10:9080",
            Transport.HBONE,
            PRODUCTPAGE,
        ),
        close,
    )
    registry.register(
        ConnectionInfo(
            uid("productpage-v1-aaa"),
            "productpage-v1-aaa.default",
            Direction.INBOUND,
            ipaddress.ip_address("10.244.1.10"),
            9080,
            ipaddress.ip_address("10.244.2.21"),
            41234,
            "10.244.1.10:9080",
            Transport.HBONE,
            Identity("cluster.local", "default", "default"),
        ),
        close,
    )


@asynccontextmanager
async def running_admin(tmp_path: Path, blockers: Iterable[str] = ()) -> AsyncIterator[AdminHarness]:
    """Everything above, started on 127.0.0.1 port 0; logging levels restored afterwards."""
    root = logging.getLogger()
    saved_levels = {name: logging.getLogger(name).level for name in ("", *SCOPES.values())}
    state, policies = build_state()
    certificates = CertificateManager(CaSource(tmp_path))
    await certificates.fetch(PRODUCTPAGE)
    connections = ConnectionRegistry()
    closed: list[CloseReason] = []
    _register_connections(connections, closed)
    readiness = Readiness()
    tokens = {name: readiness.block(name) for name in blockers}
    log_control = LogControl(logging.INFO)
    prometheus = CollectorRegistry()
    metrics = ProxyMetrics(prometheus, tag="test")
    sources = AdminSources(
        state=state,
        certificates=certificates,
        connections=connections,
        authorizations=lambda: policies,
        log_control=log_control,
    )
    admin = AdminServer(sources, "127.0.0.1", 0)
    metrics_server = MetricsServer(prometheus, "127.0.0.1", 0)
    readiness_server = ReadinessServer(readiness, "127.0.0.1", 0)
    try:
        for server in (admin, metrics_server, readiness_server):
            await server.start()
        yield AdminHarness(
            state,
            policies,
            certificates,
            connections,
            readiness,
            tokens,
            log_control,
            prometheus,
            metrics,
            admin,
            metrics_server,
            readiness_server,
            closed,
        )
    finally:
        for server in (admin, metrics_server, readiness_server):
            await server.stop()
        await certificates.close()
        for name, level in saved_levels.items():
            (logging.getLogger(name) if name else root).setLevel(level)
