"""The node proxy's HTTP surfaces: admin (:15000, localhost), metrics (:15020), readiness (:15021).

Theory of operation
-------------------
The data comes from objects the proxy assembly injects (`AdminSources`); this module only reads them
on request, on the event loop that owns them, so a dump is a consistent snapshot between two xDS
responses. Nothing here changes proxy state except the log levels (``POST /logging``).

* `AdminServer` (default 127.0.0.1:15000; localhost only, since it shows identities and changes
  log levels):

  - ``GET /config_dump``: JSON in the shape ``istioctl ztunnel-config`` reads (`config_dump`):
    ``workloads`` (list), ``services`` (list), ``policies`` (list, rules in a readable form),
    ``certificates`` (Istio's certificate dump), ``workloadState`` (per pod: Up/Pending, what the
    in-pod layer reports, and its connections in Istio's shape), and two loom extensions:
    ``connections`` (the live connection registry, flat) and ``rejected`` (resources refused by name,
    with the reason: what the proxy fails closed on);
  - ``GET /logging``: the current levels; ``POST /logging?level=[default,]scope:level,...`` changes
    them, ``POST /logging?reset`` restores the start-up levels;
  - ``GET /``: the endpoint list.

* `MetricsServer` (default 0.0.0.0:15020): ``GET /metrics`` and ``GET /stats/prometheus``, the
  Prometheus text exposition of the registry.
* `ReadinessServer` (default 0.0.0.0:15021): ``GET /healthz/ready``, 200 ``ready`` or 503 naming
  the blockers still held.

Servers are created and started inside the running loop (`await server.start()`); port 0 binds an
ephemeral port, and `server.port` tells which one was bound. `reuse_port=True` lets a new process bind
the same port while an old one drains (ztunnel restarts). The servers are `loom.httpserver.HttpServer`
(h11, one request per connection), not a web framework: these pages are too few and too small to be
worth the ~9 MB an idle proxy would otherwise carry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry

from loom.api import authorization_pb2, workload_pb2
from loom.httpserver import APPLICATION_JSON, HttpServer, Request, Response
from loom.identity import DEFAULT_TRUST_DOMAIN
from ztunnel.connections import ConnectionInfo, ConnectionRegistry, Direction
from ztunnel.identity import CertificateStatus
from ztunnel.readiness import Readiness
from ztunnel.state import HBONE_PORT, ProxyState, service_key, workload_ips
from ztunnel.state.workload import DEFAULT_SERVICE_ACCOUNT, ip_from_packed
from ztunnel.telemetry.access_log import SCOPES, LogControl, LogLevelError, parse_level_spec

logger = logging.getLogger("ztunnel.admin")

DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 15000
DEFAULT_METRICS_HOST = "0.0.0.0"
DEFAULT_METRICS_PORT = 15020
DEFAULT_READINESS_HOST = "0.0.0.0"
DEFAULT_READINESS_PORT = 15021

STATE_UP = "Up"
STATE_PENDING = "Pending"


# ---------------------------------------------------------------------------------------------------
# sources


class CertificateSnapshots(Protocol):
    """What the dump needs of `ztunnel.identity.CertificateManager`."""

    def snapshot(self) -> Sequence[CertificateStatus]: ...


@dataclass(frozen=True, slots=True)
class WorkloadRuntimeState:
    """One pod as the in-pod layer sees it, for ``workloadState``."""

    state: str  # STATE_UP: its proxy runs; STATE_PENDING: waiting (start failed, retry pending)
    name: str
    namespace: str
    service_account: str = ""
    # Anything else worth showing (netns inode, the last start error, ...); JSON-serializable values.
    info: Mapping[str, Any] = field(default_factory=dict)


class InpodWorkload(Protocol):
    """The shape of `ztunnel.inpod.WorkloadStatus` that `workload_states_from_inpod` reads."""

    @property
    def running(self) -> bool: ...

    @property
    def error(self) -> str: ...

    @property
    def netns_inode(self) -> int: ...

    @property
    def info(self) -> InpodWorkloadInfo: ...


class InpodWorkloadInfo(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def service_account(self) -> str: ...


def workload_states_from_inpod(statuses: Mapping[str, InpodWorkload]) -> dict[str, WorkloadRuntimeState]:
    """Adapt the in-pod client's `workloads()` (keyed by pod uid) to ``workloadState`` entries."""
    result = {}
    for uid, status in statuses.items():
        info: dict[str, Any] = {"netnsInode": status.netns_inode}
        if status.error:
            info["error"] = status.error
        result[uid] = WorkloadRuntimeState(
            STATE_UP if status.running else STATE_PENDING,
            status.info.name,
            status.info.namespace,
            status.info.service_account,
            info,
        )
    return result


@dataclass(frozen=True, slots=True)
class AdminSources:
    """Where the admin endpoints read from; every source is optional (its section is then empty)."""

    state: ProxyState | None = None
    certificates: CertificateSnapshots | None = None
    connections: ConnectionRegistry | None = None
    # The Authorization resources as received (for the readable rules); ProxyState keeps only the
    # compiled form.
    authorizations: Callable[[], Iterable[authorization_pb2.Authorization]] | None = None
    # Pods the in-pod layer serves, keyed by pod uid. None: this proxy has no per-pod setup, and every
    # local workload of `state` is reported Up.
    workload_state: Callable[[], Mapping[str, WorkloadRuntimeState]] | None = None
    log_control: LogControl | None = None


# ---------------------------------------------------------------------------------------------------
# config_dump (pure)


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return f"Unknown({value})"


def _ports(ports: Iterable[workload_pb2.Port]) -> dict[str, int]:
    return {str(p.service_port): p.target_port for p in ports}


def gateway_json(gateway: workload_pb2.GatewayAddress) -> dict[str, Any]:
    """A waypoint/gateway reference: destination "namespace/hostname" or "network/ip", and its port."""
    kind = gateway.WhichOneof("destination")
    if kind == "hostname":
        destination = f"{gateway.hostname.namespace}/{gateway.hostname.hostname}"
    elif kind == "address" and len(gateway.address.address) in (4, 16):
        destination = f"{gateway.address.network}/{ip_from_packed(gateway.address.address)}"
    else:
        destination = ""
    return {"destination": destination, "port": gateway.hbone_mtls_port or HBONE_PORT}


def workload_json(workload: workload_pb2.Workload) -> dict[str, Any]:
    entry: dict[str, Any] = {"workloadIps": [str(ip) for ip in workload_ips(workload)]}
    if workload.HasField("waypoint"):
        entry["waypoint"] = gateway_json(workload.waypoint)
    if workload.HasField("network_gateway"):
        entry["networkGateway"] = gateway_json(workload.network_gateway)
    entry.update(
        {
            "protocol": "HBONE" if workload.tunnel_protocol == workload_pb2.HBONE else "TCP",
            "uid": workload.uid,
            "name": workload.name,
            "namespace": workload.namespace,
            "trustDomain": workload.trust_domain or DEFAULT_TRUST_DOMAIN,
            "serviceAccount": workload.service_account or DEFAULT_SERVICE_ACCOUNT,
            "workloadName": workload.workload_name,
            "workloadType": _enum_name(workload_pb2.WorkloadType, workload.workload_type).lower(),
            "canonicalName": workload.canonical_name,
            "canonicalRevision": workload.canonical_revision,
            "network": workload.network,
            "node": workload.node,
            "nativeTunnel": workload.native_tunnel,
            "status": "Healthy" if workload.status == workload_pb2.HEALTHY else "Unhealthy",
            "clusterId": workload.cluster_id,
            "services": {key: _ports(ports.ports) for key, ports in workload.services.items()},
            "authorizationPolicies": list(workload.authorization_policies),
            "capacity": workload.capacity or 1,
        }
    )
    if workload.hostname:
        entry["hostname"] = workload.hostname
    if workload.HasField("locality"):
        loc = workload.locality
        entry["locality"] = {"region": loc.region, "zone": loc.zone, "subzone": loc.subzone}
    return entry


def service_json(service: workload_pb2.Service, state: ProxyState) -> dict[str, Any]:
    key = service_key(service)
    entry: dict[str, Any] = {
        "name": service.name,
        "namespace": service.namespace,
        "hostname": service.hostname,
        "vips": [f"{a.network}/{ip_from_packed(a.address)}" for a in service.addresses],
        "ports": _ports(service.ports),
        "endpoints": {
            e.workload.uid: {"workloadUid": e.workload.uid, "service": key, "port": _ports(e.ports.ports)}
            for e in state.endpoints(key)
        },
        "subjectAltNames": list(service.subject_alt_names),
        "ipFamilies": _enum_name(workload_pb2.IPFamilies, service.ip_families),
    }
    if service.HasField("waypoint"):
        entry["waypoint"] = gateway_json(service.waypoint)
    return entry


def _string_match(match: authorization_pb2.StringMatch) -> str:
    """Istio's AuthorizationPolicy spelling: "x" exact, "x*" prefix, "*x" suffix, "*" presence."""
    kind = match.WhichOneof("match_type")
    if kind == "exact":
        return match.exact
    if kind == "prefix":
        return match.prefix + "*"
    if kind == "suffix":
        return "*" + match.suffix
    if kind == "presence":
        return "*"
    return "(no pattern)"


def _cidr(address: authorization_pb2.Address) -> str:
    if len(address.address) not in (4, 16):
        return f"(invalid address {address.address.hex()})/{address.length}"
    return f"{ip_from_packed(address.address)}/{address.length}"


def match_json(match: authorization_pb2.Match) -> dict[str, Any]:
    """One Match with only the fields it sets, in camelCase (a readable form of the proto)."""
    entry: dict[str, Any] = {}
    for name, values in (
        ("namespaces", match.namespaces),
        ("notNamespaces", match.not_namespaces),
        ("principals", match.principals),
        ("notPrincipals", match.not_principals),
    ):
        if values:
            entry[name] = [_string_match(v) for v in values]
    for name, accounts in (
        ("serviceAccounts", match.service_accounts),
        ("notServiceAccounts", match.not_service_accounts),
    ):
        if accounts:
            entry[name] = [f"{a.namespace}/{a.serviceAccount}" for a in accounts]
    for name, cidrs in (
        ("sourceIps", match.source_ips),
        ("notSourceIps", match.not_source_ips),
        ("destinationIps", match.destination_ips),
        ("notDestinationIps", match.not_destination_ips),
    ):
        if cidrs:
            entry[name] = [_cidr(c) for c in cidrs]
    if match.destination_ports:
        entry["destinationPorts"] = list(match.destination_ports)
    if match.not_destination_ports:
        entry["notDestinationPorts"] = list(match.not_destination_ports)
    return entry


_SCOPE_NAMES = {
    authorization_pb2.GLOBAL: "Global",
    authorization_pb2.NAMESPACE: "Namespace",
    authorization_pb2.WORKLOAD_SELECTOR: "WorkloadSelector",
}
_ACTION_NAMES = {authorization_pb2.ALLOW: "Allow", authorization_pb2.DENY: "Deny"}


def policy_json(policy: authorization_pb2.Authorization, rejected: str = "") -> dict[str, Any]:
    """An Authorization: rules as groups (any) of clauses (all) of matches (any)."""
    entry: dict[str, Any] = {
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": _SCOPE_NAMES.get(policy.scope, f"Unknown({int(policy.scope)})"),
        "action": _ACTION_NAMES.get(policy.action, f"Unknown({int(policy.action)})"),
        "rules": [[[match_json(m) for m in rule.matches] for rule in group.rules] for group in policy.groups],
    }
    if policy.dry_run:
        entry["dryRun"] = True
    if rejected:
        entry["rejected"] = rejected
    return entry


def _connection_dump(info: ConnectionInfo) -> dict[str, str]:
    """Istio's per-workload connection entry."""
    if info.direction is Direction.INBOUND:
        return {
            "src": info.remote,
            "originalDst": info.local,
            "actualDst": info.local,
            "protocol": info.protocol,
        }
    return {
        "src": info.local,
        "originalDst": info.remote_target or info.remote,
        "actualDst": info.remote,
        "protocol": info.protocol,
    }


def _workload_state_json(sources: AdminSources) -> dict[str, Any]:
    by_workload: dict[str, dict[str, list[dict[str, str]]]] = {}
    if sources.connections is not None:
        for info in sources.connections.connections():
            lists = by_workload.setdefault(info.workload, {"inbound": [], "outbound": []})
            lists[info.direction.value].append(_connection_dump(info))

    def entry(
        state: str, name: str, namespace: str, account: str, extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {
            "state": state,
            "info": {"name": name, "namespace": namespace, "serviceAccount": account, **extra},
            "connections": by_workload.get(f"{name}.{namespace}", {"inbound": [], "outbound": []}),
        }

    if sources.workload_state is not None:
        return {
            uid: entry(ws.state, ws.name, ws.namespace, ws.service_account, ws.info)
            for uid, ws in sorted(sources.workload_state().items())
        }
    if sources.state is None:
        return {}
    return {
        w.uid: entry(STATE_UP, w.name, w.namespace, w.service_account or DEFAULT_SERVICE_ACCOUNT, {})
        for w in sorted(sources.state.local_workloads(), key=lambda w: w.uid)
    }


class DumpError(Exception):
    """Building one section of the dump failed; names the section."""

    def __init__(self, section: str, error: Exception) -> None:
        super().__init__(f"config_dump section {section!r} failed: {error!r}")
        self.section = section


def config_dump(sources: AdminSources) -> dict[str, Any]:
    """The whole dump (see the module docstring). Raises DumpError naming a section that failed."""
    state = sources.state
    rejected = dict(state.rejected) if state is not None else {}

    def workloads() -> list[dict[str, Any]]:
        if state is None:
            return []
        return [workload_json(w) for w in sorted(state.workloads(), key=lambda w: w.uid)]

    def services() -> list[dict[str, Any]]:
        if state is None:
            return []
        return [service_json(s, state) for s in sorted(state.services(), key=service_key)]

    def policies() -> list[dict[str, Any]]:
        if sources.authorizations is None:
            return []
        found = sorted(sources.authorizations(), key=lambda p: (p.namespace, p.name))
        return [policy_json(p, rejected.get(f"{p.namespace}/{p.name}", "")) for p in found]

    def certificates() -> list[dict[str, Any]]:
        if sources.certificates is None:
            return []
        return [status.to_json() for status in sources.certificates.snapshot()]

    def connections() -> list[dict[str, Any]]:
        return sources.connections.to_json() if sources.connections is not None else []

    builders: dict[str, Callable[[], Any]] = {
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates,
        "workloadState": lambda: _workload_state_json(sources),
        "connections": connections,
        "rejected": lambda: dict(sorted(rejected.items())),
    }
    dump: dict[str, Any] = {}
    for section, build in builders.items():
        try:
            dump[section] = build()
        except Exception as e:  # name the broken section instead of a bare 500
            raise DumpError(section, e) from e
    return dump


# ---------------------------------------------------------------------------------------------------
# servers


_INDEX = """\
loom ztunnel admin
  GET  /config_dump       workloads, services, policies, certificates, workloadState, connections
  GET  /logging           current log levels
  POST /logging?level=    change levels: [default,]scope:level,...  (scopes: {scopes})
  POST /logging?reset     back to the start-up levels
"""


class AdminServer(HttpServer):
    def __init__(
        self,
        sources: AdminSources,
        host: str = DEFAULT_ADMIN_HOST,
        port: int = DEFAULT_ADMIN_PORT,
        *,
        reuse_port: bool = False,
    ) -> None:
        routes = [
            ("GET", "/", self._index),
            ("GET", "/config_dump", self._config_dump),
            ("GET", "/logging", self._get_logging),
            ("POST", "/logging", self._post_logging),
        ]
        super().__init__("admin", host, port, routes, reuse_port=reuse_port, logger=logger)
        self.sources = sources

    async def _index(self, request: Request) -> Response:
        return Response(body=_INDEX.format(scopes=", ".join(SCOPES)))

    async def _config_dump(self, request: Request) -> Response:
        try:
            dump = config_dump(self.sources)
        except DumpError as e:
            logger.exception("config_dump failed", extra={"fields": {"section": e.section}})
            return Response(500, f"{e}\n")
        return Response(body=json.dumps(dump, indent=2) + "\n", content_type=APPLICATION_JSON)

    async def _get_logging(self, request: Request) -> Response:
        control = self.sources.log_control
        if control is None:
            return Response(404, "log levels are not managed by this process\n")
        return Response(body=control.describe() + "\n")

    async def _post_logging(self, request: Request) -> Response:
        control = self.sources.log_control
        if control is None:
            return Response(404, "log levels are not managed by this process\n")
        query = request.query
        if "reset" not in query and "level" not in query:
            return Response(400, "expected ?level=[default,]scope:level,... or ?reset\n")
        try:
            if "level" in query:
                # Validate before resetting, so a bad request changes nothing.
                parse_level_spec(query["level"])
            if "reset" in query:
                control.reset()
            if "level" in query:
                control.set(query["level"])
        except LogLevelError as e:
            return Response(400, f"{e}\n")
        logger.info("log levels changed", extra={"fields": {"levels": control.describe()}})
        return Response(body=control.describe() + "\n")


class MetricsServer(HttpServer):
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = DEFAULT_METRICS_HOST,
        port: int = DEFAULT_METRICS_PORT,
        *,
        reuse_port: bool = False,
    ) -> None:
        routes = [("GET", "/metrics", self._metrics), ("GET", "/stats/prometheus", self._metrics)]
        super().__init__("metrics", host, port, routes, reuse_port=reuse_port, logger=logger)
        self.registry = registry

    async def _metrics(self, request: Request) -> Response:
        body = prometheus_client.generate_latest(self.registry)
        return Response(body=body, content_type=prometheus_client.CONTENT_TYPE_LATEST)


class ReadinessServer(HttpServer):
    def __init__(
        self,
        readiness: Readiness,
        host: str = DEFAULT_READINESS_HOST,
        port: int = DEFAULT_READINESS_PORT,
        *,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(
            "readiness",
            host,
            port,
            [("GET", "/healthz/ready", self._ready)],
            reuse_port=reuse_port,
            logger=logger,
        )
        self.readiness = readiness

    async def _ready(self, request: Request) -> Response:
        if self.readiness.ready:
            return Response(body="ready\n")
        return Response(503, f"not ready, waiting for: {', '.join(self.readiness.pending)}\n")
