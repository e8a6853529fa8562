"""The waypoint's control-plane client: its settings, its delta xDS session, and its configuration.

Theory of operation
-------------------
A waypoint holds two things from the controller, over one delta xDS stream (ztunnel's client,
`ztunnel.xds.XdsClient`, reused as is with a session of its own):

* its `WaypointConfig` (loom/api/waypoint.proto), the only one of that type it may see: its identity,
  the Services bound to it, and the HTTPRoutes and AuthorizationPolicies it enforces as the original
  manifests. `WaypointView.from_proto` parses them with loom.resources, the controller's own parser,
  so the waypoint and the controller read every field the same way;
* every `Address` (workloads and services), exactly what a node proxy gets, kept in a
  `ztunnel.state.ProxyState`: the waypoint resolves Services to endpoints with it.

Subscriptions: WaypointConfig first, then Address (policies before the addresses they govern), both
wildcard. Node: id `waypoint~<ip>~<pod>.<ns>~<ns>.svc.<domain>`, metadata NAMESPACE and WAYPOINT_NAME
naming the Gateway; the controller checks them against the credential, so a waypoint can never ask
for another's configuration.

Applying a WaypointConfig (fail closed): a resource named other than "<namespace>/<name>" of this
waypoint, or whose contents do not say the same, or with a manifest that cannot be read, is rejected
(NACK) and the previous configuration stays in force; an AuthorizationPolicy whose manifest does not
validate is kept as the loader's fail-closed stand-in (a DENY of everything it targets). When the
controller removes the configuration (the Gateway was deleted) the view becomes None: the waypoint
then has no policy to enforce and must refuse every request, never pass them unchecked.

Settings come from the environment (`WaypointXdsSettings.from_env`), the names the controller's
reconciler writes into the waypoint's Deployment (controller/waypoints/desired.py), the same names the
waypoint process's own configuration reads (waypoint/config.py):

    XDS_ADDRESS               host:port of the controller (default loom-controller.istio-system.svc:15012)
    CA_ADDRESS                the CA, default XDS_ADDRESS
    ROOT_CERT                 the mesh root (default /var/run/secrets/istio/root-cert.pem)
    WORKLOAD_TOKEN_FILE       the waypoint's own credential, re-read on every connect (default
                              /var/run/secrets/tokens/istio-token: a projected token, audience istio-ca;
                              in the lab, the file the controller writes). A node proxy's credential
                              does not work: it is never given a WaypointConfig.
    WAYPOINT_NAMESPACE        the Gateway's namespace (else POD_NAMESPACE)
    WAYPOINT_NAME             the Gateway's name
    SERVICE_ACCOUNT           the account the waypoint runs as: its certificate's identity
    TRUST_DOMAIN, CLUSTER_ID  default cluster.local, Kubernetes
    POD_NAME, INSTANCE_IP, NODE_NAME   optional, announced in the Node

Certificates: the waypoint asks the controller's CA for its own identity with ztunnel's client,
`CaClient(settings.ca_address, settings.root_cert, settings.token_source).fetch_certificate(
settings.identity)`; the CA grants a waypoint credential that identity and no other.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from loom.api import discovery_pb2, waypoint_pb2
from loom.identity import Identity
from loom.resources.loader import ObjectInvalid, UnsupportedKind, parse_object
from loom.resources.model import (
    DEFAULT_TRUST_DOMAIN,
    AuthorizationPolicy,
    Gateway,
    HTTPRoute,
    Origin,
    Resource,
)
from ztunnel.state import ProxyState
from ztunnel.xds import (
    ADDRESS_TYPE_URL,
    Backoff,
    NodeInfo,
    TokenSource,
    XdsClient,
    XdsSession,
    token_from_file,
)

WAYPOINT_CONFIG_TYPE_URL: Final = f"type.googleapis.com/{waypoint_pb2.WaypointConfig.DESCRIPTOR.full_name}"
# Policies before the addresses they govern (see the module docstring).
WAYPOINT_SUBSCRIPTIONS: Final = (WAYPOINT_CONFIG_TYPE_URL, ADDRESS_TYPE_URL)
PROXY_TYPE: Final = "waypoint"
WAYPOINT_NAME_METADATA: Final = "WAYPOINT_NAME"

ENV_XDS_ADDRESS: Final = "XDS_ADDRESS"
ENV_CA_ADDRESS: Final = "CA_ADDRESS"
ENV_ROOT_CERT: Final = "ROOT_CERT"
ENV_TOKEN_FILE: Final = "WORKLOAD_TOKEN_FILE"
ENV_NAMESPACE: Final = "WAYPOINT_NAMESPACE"
ENV_NAME: Final = "WAYPOINT_NAME"
ENV_SERVICE_ACCOUNT: Final = "SERVICE_ACCOUNT"
ENV_TRUST_DOMAIN: Final = "TRUST_DOMAIN"
ENV_CLUSTER_ID: Final = "CLUSTER_ID"
ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
ENV_INSTANCE_IP: Final = "INSTANCE_IP"
ENV_NODE_NAME: Final = "NODE_NAME"

DEFAULT_XDS_ADDRESS: Final = "loom-controller.istio-system.svc:15012"
DEFAULT_ROOT_CERT: Final = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN_FILE: Final = "/var/run/secrets/tokens/istio-token"
DEFAULT_CLUSTER_ID: Final = "Kubernetes"

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*\Z")
_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]+\Z")

R = TypeVar("R", bound=Resource)


# ---------------------------------------------------------------------------------------------------
# settings


class SettingsError(ValueError):
    """Invalid waypoint settings; `problems` has one `NAME=value is not valid: reason` per entry."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid waypoint settings:\n  " + "\n  ".join(problems))


def _check_address(text: str) -> str | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not _HOST.match(host):
        return "expected <host>:<port>"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return "the port must be a number from 1 to 65535"
    return None


@dataclass(frozen=True, slots=True)
class WaypointXdsSettings:
    """Who the waypoint is and how it reaches the controller."""

    namespace: str
    name: str
    service_account: str
    xds_address: str = DEFAULT_XDS_ADDRESS
    ca_address: str = DEFAULT_XDS_ADDRESS
    root_cert: Path = Path(DEFAULT_ROOT_CERT)
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = DEFAULT_CLUSTER_ID
    pod_name: str = ""
    instance_ip: str = ""
    node_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WaypointXdsSettings:
        """Read and validate every variable; all problems are reported at once (SettingsError)."""
        problems: list[str] = []

        def get(name: str, default: str = "") -> str:
            return env.get(name, "").strip() or default

        def need(name: str, value: str, pattern: re.Pattern[str], what: str) -> None:
            if not value:
                problems.append(f"{name} is not set: {what} is required")
            elif len(value) > 253 or not pattern.match(value):
                problems.append(f"{name}={value} is not valid: expected {what}")

        if get(ENV_NAMESPACE) or not get(ENV_POD_NAMESPACE):
            namespace_var, namespace = ENV_NAMESPACE, get(ENV_NAMESPACE)
        else:
            namespace_var, namespace = ENV_POD_NAMESPACE, get(ENV_POD_NAMESPACE)
        name = get(ENV_NAME)
        account = get(ENV_SERVICE_ACCOUNT)
        need(namespace_var, namespace, _DNS_LABEL, "the Gateway's namespace (a DNS label)")
        need(ENV_NAME, name, _DNS_1035_LABEL, "the Gateway's name (a DNS-1035 label)")
        need(ENV_SERVICE_ACCOUNT, account, _DNS_SUBDOMAIN, "the waypoint's service account")
        xds = get(ENV_XDS_ADDRESS, DEFAULT_XDS_ADDRESS)
        ca = get(ENV_CA_ADDRESS, xds)
        addresses = [(ENV_XDS_ADDRESS, xds)] + ([(ENV_CA_ADDRESS, ca)] if get(ENV_CA_ADDRESS) else [])
        for variable, address in addresses:
            problem = _check_address(address)
            if problem:
                problems.append(f"{variable}={address} is not valid: {problem}")
        trust_domain = get(ENV_TRUST_DOMAIN, DEFAULT_TRUST_DOMAIN)
        if not re.fullmatch(r"[a-z0-9._-]{1,255}", trust_domain):
            problems.append(f"{ENV_TRUST_DOMAIN}={trust_domain} is not valid: expected a SPIFFE trust domain")
        cluster_id = get(ENV_CLUSTER_ID, DEFAULT_CLUSTER_ID)
        if "/" in cluster_id or any(c.isspace() for c in cluster_id):
            problems.append(f"{ENV_CLUSTER_ID}={cluster_id} is not valid: no '/' or spaces allowed")
        if problems:
            raise SettingsError(problems)
        return cls(
            namespace=namespace,
            name=name,
            service_account=account,
            xds_address=xds,
            ca_address=ca,
            root_cert=Path(get(ENV_ROOT_CERT, DEFAULT_ROOT_CERT)),
            token_file=Path(get(ENV_TOKEN_FILE, DEFAULT_TOKEN_FILE)),
            trust_domain=trust_domain,
            cluster_id=cluster_id,
            pod_name=get(ENV_POD_NAME),
            instance_ip=get(ENV_INSTANCE_IP),
            node_name=get(ENV_NODE_NAME),
        )

    @property
    def key(self) -> str:
        """The WaypointConfig resource name: "<namespace>/<name>"."""
        return f"{self.namespace}/{self.name}"

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def token_source(self) -> TokenSource:
        return token_from_file(self.token_file)

    def node(self) -> NodeInfo:
        """The xDS Node this waypoint announces."""
        return NodeInfo(
            node_name=self.node_name,
            pod_name=self.pod_name or self.name,
            pod_namespace=self.namespace,
            instance_ip=self.instance_ip,
            proxy_type=PROXY_TYPE,
            extra_metadata=((WAYPOINT_NAME_METADATA, self.name),),
        )


# ---------------------------------------------------------------------------------------------------
# the configuration


class ConfigRejected(ValueError):
    """A WaypointConfig that cannot be used (the reason goes into the NACK)."""


@dataclass(frozen=True, slots=True)
class ServedService:
    namespace: str
    name: str
    hostname: str


@dataclass(frozen=True, slots=True)
class WaypointView:
    """One accepted WaypointConfig, parsed: what the waypoint's routing and authorization act on."""

    namespace: str
    name: str
    identity: Identity  # the waypoint's own
    traffic_type: str
    gateway: Gateway | None
    services: tuple[ServedService, ...]
    routes: tuple[HTTPRoute, ...]
    policies: tuple[AuthorizationPolicy, ...]

    @classmethod
    def from_proto(cls, config: waypoint_pb2.WaypointConfig, namespace: str, name: str) -> WaypointView:
        """Parse `config`, which must be the configuration of waypoint `namespace`/`name`."""
        if (config.namespace, config.name) != (namespace, name):
            raise ConfigRejected(
                f"the configuration is for waypoint {config.namespace}/{config.name}, not {namespace}/{name}"
            )
        if not config.trust_domain or not config.service_account:
            raise ConfigRejected("the configuration does not name the waypoint's identity")
        gateway: Gateway | None = None
        if config.HasField("gateway"):
            read = _read_manifest(config.gateway, Gateway)
            if read.key != (Gateway.KIND, namespace, name):
                raise ConfigRejected(f"the gateway manifest is {read.key}, not this waypoint's Gateway")
            gateway = read
        return cls(
            namespace=namespace,
            name=name,
            identity=Identity(config.trust_domain, namespace, config.service_account),
            traffic_type=config.traffic_type,
            gateway=gateway,
            services=tuple(ServedService(s.namespace, s.name, s.hostname) for s in config.services),
            routes=tuple(_read_manifest(m, HTTPRoute) for m in config.routes),
            policies=tuple(_read_manifest(m, AuthorizationPolicy) for m in config.policies),
        )


def _read_manifest(manifest: waypoint_pb2.Manifest, kind: type[R]) -> R:
    where = f"{manifest.kind} {manifest.namespace}/{manifest.name}"
    if manifest.kind != kind.KIND:
        raise ConfigRejected(f"{where}: expected a {kind.KIND}")
    try:
        doc: Any = json.loads(manifest.json)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigRejected(f"{where}: the manifest is not JSON: {e}") from e
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or doc.get("kind") != kind.KIND:
        raise ConfigRejected(f"{where}: the manifest is not a {kind.KIND} object")
    if (meta.get("namespace"), meta.get("name")) != (manifest.namespace, manifest.name):
        raise ConfigRejected(f"{where}: the manifest names {meta.get('namespace')}/{meta.get('name')}")
    origin = Origin(f"xds {where}")
    try:
        parsed = parse_object(doc, origin)
    except ObjectInvalid as invalid:
        # Only a policy has a stand-in (a DENY of its targets); anything else cannot be used.
        if isinstance(invalid.stand_in, kind):
            return invalid.stand_in
        raise ConfigRejected(f"{where}: {invalid}") from invalid
    except UnsupportedKind as e:
        raise ConfigRejected(f"{where}: {e.message}") from e
    if not isinstance(parsed, kind):
        raise ConfigRejected(f"{where}: parsed as a {parsed.KIND}")
    return parsed


ConfigWatcher = Callable[["WaypointView | None"], None]


class WaypointConfigState:
    """The waypoint's current configuration (None: none received, or removed: refuse everything).
    Written by the xDS session one response at a time; watchers run after each change."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self._view: WaypointView | None = None
        self._version = ""
        self._watchers: list[ConfigWatcher] = []

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def view(self) -> WaypointView | None:
        return self._view

    @property
    def version(self) -> str:
        """The xDS version of the configuration in force ("" when there is none)."""
        return self._version

    def watch(self, watcher: ConfigWatcher) -> Callable[[], None]:
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def apply(
        self, resources: Mapping[str, tuple[str, waypoint_pb2.WaypointConfig]], removals: Sequence[str]
    ) -> dict[str, str]:
        """Apply one response (name -> (version, config), removed names); returns name -> why rejected."""
        rejected: dict[str, str] = {}
        view, version, changed = self._view, self._version, False
        if self.key in removals and view is not None:
            view, version, changed = None, "", True
        for name, (resource_version, config) in resources.items():
            if name != self.key:
                rejected[name] = f"not this waypoint's configuration (this is {self.key})"
                continue
            try:
                view = WaypointView.from_proto(config, self.namespace, self.name)
            except ConfigRejected as e:
                rejected[name] = str(e)
                continue
            version, changed = resource_version, True
        if changed:
            self._view, self._version = view, version
            for watcher in list(self._watchers):
                watcher(view)
        return rejected


# ---------------------------------------------------------------------------------------------------
# the session and the client


class WaypointXdsSession(XdsSession):
    """ztunnel's delta session (Address handling, held versions, ACK/NACK), subscribing to the
    waypoint's types and applying WaypointConfig to a `WaypointConfigState`."""

    def __init__(self, addresses: ProxyState, config: WaypointConfigState, node: NodeInfo) -> None:
        super().__init__(addresses, node, subscriptions=WAYPOINT_SUBSCRIPTIONS)
        self.config = config

    def _apply_other(
        self, response: discovery_pb2.DeltaDiscoveryResponse, held: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        if response.type_url != WAYPOINT_CONFIG_TYPE_URL:
            return super()._apply_other(response, held)
        decoded: dict[str, tuple[str, waypoint_pb2.WaypointConfig]] = {}
        rejected: dict[str, str] = {}
        for i, resource in enumerate(response.resources):
            name = resource.name or f"(resource #{i})"
            if not resource.name:
                rejected[name] = "a resource without a name cannot be tracked"
                continue
            if resource.resource.type_url != WAYPOINT_CONFIG_TYPE_URL:
                rejected[name] = f"carries {resource.resource.type_url or 'no type'}"
                continue
            try:
                config = waypoint_pb2.WaypointConfig.FromString(resource.resource.value)
            except DecodeError as e:
                rejected[name] = f"cannot be decoded: {e}"
                continue
            decoded[name] = (resource.version, config)
        removals = list(response.removed_resources)
        rejected.update(self.config.apply(decoded, removals))
        for name in removals:
            held.pop(name, None)
        for name, (version, _) in decoded.items():
            if name not in rejected:
                held[name] = version
        return len(decoded.keys() - rejected.keys()), rejected


class WaypointXds:
    """The waypoint's xDS client: `addresses` (every Address) and `config` (its WaypointConfig),
    kept in sync with the controller from `start()` until `close()`; `ready` is set once both types
    have been answered."""

    def __init__(
        self,
        settings: WaypointXdsSettings,
        *,
        registry: CollectorRegistry | None = None,
        backoff: Backoff | None = None,
        server_name: str | None = None,
    ) -> None:
        self.settings = settings
        self.addresses = ProxyState()
        self.config = WaypointConfigState(settings.namespace, settings.name)
        node = settings.node()
        self.session = WaypointXdsSession(self.addresses, self.config, node)
        self.client = XdsClient(
            settings.xds_address,
            settings.root_cert,
            settings.token_source,
            node.node_name,
            self.addresses,
            session=self.session,
            cluster_id=settings.cluster_id,
            registry=registry,
            backoff=backoff,
            server_name=server_name,
        )

    @property
    def ready(self) -> asyncio.Event:
        return self.client.ready

    def start(self) -> asyncio.Task[None]:
        return self.client.start()

    async def close(self) -> None:
        await self.client.close()
