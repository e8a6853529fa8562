"""Typed, immutable view of the Kubernetes and Istio objects loom reads.

Theory of operation: configuration arrives as Kubernetes-format objects (from YAML files, or from the
Kubernetes API). `loom.resources.loader` validates each object and turns it into one of the frozen
dataclasses below; everything downstream (translation, the CA's node authorization, the lab) works on
these and never on raw dicts. A `ConfigSnapshot` maps `ResourceKey` to object; config sources produce
snapshots, translation consumes them.

Only the fields loom acts on are modelled. The original manifest is kept in `raw` so that
status/annotation writes and `loomctl` output can echo what the user wrote.

Conventions: absent lists are empty tuples; absent maps are empty `Mapping`s (never None); names are
kept exactly as written. Every dataclass is frozen and hashable-by-identity-safe for use in sets of keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

from loom.identity import DEFAULT_TRUST_DOMAIN as DEFAULT_TRUST_DOMAIN  # re-exported: a model constant

# Labels and annotations loom acts on (Istio's names, so users bring their habits unchanged).
LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
ANNOTATION_FOR_SERVICE_ACCOUNT = "istio.io/for-service-account"
ANNOTATION_REDIRECTION = "ambient.istio.io/redirection"
ANNOTATION_DRY_RUN = "istio.io/dry-run"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"
DEFAULT_ROOT_NAMESPACE = "istio-system"
HBONE_PORT = 15008


class ResourceKey(NamedTuple):
    """Identity of an object in a snapshot. Cluster-scoped kinds (Namespace) have namespace ""."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an object came from, for error messages: a file and 1-based document number, or an API."""

    source: str  # file path relative to the config root, or "kubernetes"
    document: int = 0  # 1-based YAML document index within the file; 0 when not from a file

    def __str__(self) -> str:
        return f"{self.source} doc {self.document}" if self.document else self.source


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    name: str
    namespace: str  # "" for cluster-scoped kinds
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    uid: str = ""
    resource_version: str = ""
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Resource:
    """Base of every modelled kind."""

    KIND: ClassVar[str] = ""
    API_GROUP: ClassVar[str] = ""  # "" for the core group
    # Whether `raw` keeps the manifest. Only kinds whose status loom writes need it; dropping it for
    # pods, services and namespaces halves the controller's memory per workload.
    KEEP_RAW: ClassVar[bool] = False
    meta: ObjectMeta
    origin: Origin | None = field(default=None, compare=False)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # see KEEP_RAW
    # Computed once: keys are looked up for every object on every snapshot merge and diff.
    key: ResourceKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ResourceKey(self.KIND, self.meta.namespace, self.meta.name))

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace


# ---------------------------------------------------------------------------------------------------
# core/v1 and apps/v1


@dataclass(frozen=True, slots=True)
class Namespace(Resource):
    KIND: ClassVar[str] = "Namespace"


@dataclass(frozen=True, slots=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Container:
    name: str
    image: str = ""
    ports: tuple[ContainerPort, ...] = ()
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PodTemplate:
    """spec of a Pod (also a Deployment's template.spec), reduced to what loom uses."""

    service_account: str = "default"
    node_name: str = ""
    host_network: bool = False
    containers: tuple[Container, ...] = ()


@dataclass(frozen=True, slots=True)
class Pod(Resource):
    KIND: ClassVar[str] = "Pod"
    spec: PodTemplate = field(default_factory=PodTemplate)
    # status.podIPs (status.podIP first); empty until the pod is scheduled and networked.
    ips: tuple[str, ...] = ()
    phase: str = "Running"  # status.phase; "Failed"/"Succeeded" pods are not workloads
    ready: bool = True  # from status.conditions Ready; unready pods are UNHEALTHY endpoints
    # Name of the controlling Deployment (from ownerReferences or the lab), for telemetry.
    owner_deployment: str = ""


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """matchLabels plus matchExpressions (In, NotIn, Exists, DoesNotExist)."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (key, operator, values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True, slots=True)
class Deployment(Resource):
    KIND: ClassVar[str] = "Deployment"
    KEEP_RAW: ClassVar[bool] = True  # few objects; the lab runs what the template declares
    API_GROUP: ClassVar[str] = "apps"
    replicas: int = 1
    selector: LabelSelector = field(default_factory=LabelSelector)
    template_labels: Mapping[str, str] = field(default_factory=dict)
    template_annotations: Mapping[str, str] = field(default_factory=dict)
    template: PodTemplate = field(default_factory=PodTemplate)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    # targetPort: a number, or the name of a container port; 0/"" means "same as port".
    target_port: int | str = 0
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service(Resource):
    KIND: ClassVar[str] = "Service"
    # None = no selector (endpoints managed elsewhere); an empty dict selects nothing in Kubernetes.
    selector: Mapping[str, str] | None = None
    ports: tuple[ServicePort, ...] = ()
    cluster_ips: tuple[str, ...] = ()  # spec.clusterIPs / clusterIP; empty until allocated
    headless: bool = False  # clusterIP: None
    type: str = "ClusterIP"


@dataclass(frozen=True, slots=True)
class ServiceAccount(Resource):
    KIND: ClassVar[str] = "ServiceAccount"


# ---------------------------------------------------------------------------------------------------
# security.istio.io (v1 and v1beta1 share one shape)


@dataclass(frozen=True, slots=True)
class PolicyTargetRef:
    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class PolicySource:
    """rules[].from[].source. Every field is a tuple of strings; empty means "not set"."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()  # L7 (JWT)
    not_request_principals: tuple[str, ...] = ()  # L7
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()  # L7 (X-Forwarded-For)
    not_remote_ip_blocks: tuple[str, ...] = ()  # L7


@dataclass(frozen=True, slots=True)
class PolicyOperation:
    """rules[].to[].operation. ports are strings in the API ("9080")."""

    hosts: tuple[str, ...] = ()  # L7
    not_hosts: tuple[str, ...] = ()  # L7
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()  # L7
    not_methods: tuple[str, ...] = ()  # L7
    paths: tuple[str, ...] = ()  # L7
    not_paths: tuple[str, ...] = ()  # L7


@dataclass(frozen=True, slots=True)
class PolicyCondition:
    """rules[].when[]: key plus values / notValues."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    sources: tuple[PolicySource, ...] = ()  # from[]
    operations: tuple[PolicyOperation, ...] = ()  # to[]
    conditions: tuple[PolicyCondition, ...] = ()  # when[]


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy(Resource):
    KIND: ClassVar[str] = "AuthorizationPolicy"
    KEEP_RAW: ClassVar[bool] = True
    API_GROUP: ClassVar[str] = "security.istio.io"
    selector: LabelSelector | None = None  # spec.selector (matchLabels); None = namespace/global scope
    target_refs: tuple[PolicyTargetRef, ...] = ()  # spec.targetRef + spec.targetRefs
    action: str = "ALLOW"  # ALLOW | DENY | AUDIT | CUSTOM
    # None = spec.rules absent; () = "rules: []" (ALLOW with no rules matches nothing: deny all).
    rules: tuple[PolicyRule, ...] | None = None
    provider: str = ""  # spec.provider.name for CUSTOM
    # The manifest failed validation. Dropping it could silently remove a DENY (or turn "allow only X"
    # into "allow all"), so it stands in as a DENY of every connection in its best-known scope until
    # it is fixed; selector/targetRefs keep only what could be read without error.
    invalid: bool = False

    @property
    def dry_run(self) -> bool:
        return self.meta.annotations.get(ANNOTATION_DRY_RUN, "").lower() == "true"


@dataclass(frozen=True, slots=True)
class PeerAuthentication(Resource):
    KIND: ClassVar[str] = "PeerAuthentication"
    KEEP_RAW: ClassVar[bool] = True
    API_GROUP: ClassVar[str] = "security.istio.io"
    selector: LabelSelector | None = None
    mode: str = "UNSET"  # UNSET | PERMISSIVE | STRICT | DISABLE
    port_level_mtls: Mapping[int, str] = field(default_factory=dict)  # port -> mode


# ---------------------------------------------------------------------------------------------------
# gateway.networking.k8s.io


@dataclass(frozen=True, slots=True)
class GatewayListener:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Gateway(Resource):
    KIND: ClassVar[str] = "Gateway"
    KEEP_RAW: ClassVar[bool] = True
    API_GROUP: ClassVar[str] = "gateway.networking.k8s.io"
    gateway_class: str = ""
    listeners: tuple[GatewayListener, ...] = ()

    @property
    def is_waypoint(self) -> bool:
        return self.gateway_class == WAYPOINT_GATEWAY_CLASS

    @property
    def for_service_account(self) -> str:
        """The service account this waypoint serves in the per-SA model ("" if not per-SA)."""
        return self.meta.annotations.get(ANNOTATION_FOR_SERVICE_ACCOUNT, "")

    @property
    def waypoint_for(self) -> str:
        """Traffic type of Istio's current model: service (default), workload, all or none."""
        return self.meta.labels.get(LABEL_WAYPOINT_FOR, "service")


@dataclass(frozen=True, slots=True)
class ParentRef:
    name: str
    kind: str = "Gateway"
    group: str = "gateway.networking.k8s.io"
    namespace: str = ""  # "" = the route's namespace
    port: int = 0  # 0 = any port
    section_name: str = ""


@dataclass(frozen=True, slots=True)
class HTTPPathMatch:
    type: str = "PathPrefix"  # Exact | PathPrefix | RegularExpression
    value: str = "/"


@dataclass(frozen=True, slots=True)
class HTTPValueMatch:
    """A header or query-parameter match."""

    name: str
    value: str
    type: str = "Exact"  # Exact | RegularExpression


@dataclass(frozen=True, slots=True)
class HTTPRouteMatch:
    path: HTTPPathMatch | None = None
    headers: tuple[HTTPValueMatch, ...] = ()
    query_params: tuple[HTTPValueMatch, ...] = ()
    method: str = ""


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    port: int = 0
    weight: int = 1
    kind: str = "Service"
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRouteFilter:
    """A filter; `type` selects which field of the original is meaningful, `config` keeps it verbatim."""

    type: str  # RequestHeaderModifier | ResponseHeaderModifier | RequestRedirect | URLRewrite | ...
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    matches: tuple[HTTPRouteMatch, ...] = ()
    filters: tuple[HTTPRouteFilter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeout_request: float | None = None  # seconds (timeouts.request)
    timeout_backend_request: float | None = None  # seconds (timeouts.backendRequest)
    retry: Mapping[str, Any] = field(default_factory=dict)  # retry (attempts, backoff, codes), verbatim


@dataclass(frozen=True, slots=True)
class HTTPRoute(Resource):
    KIND: ClassVar[str] = "HTTPRoute"
    KEEP_RAW: ClassVar[bool] = True
    API_GROUP: ClassVar[str] = "gateway.networking.k8s.io"
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRouteRule, ...] = ()


# Every kind the loader understands, by kind name.
KINDS: Mapping[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (
        Namespace,
        Pod,
        Deployment,
        Service,
        ServiceAccount,
        AuthorizationPolicy,
        PeerAuthentication,
        Gateway,
        HTTPRoute,
    )
}

R = TypeVar("R", bound=Resource)


class ConfigSnapshot(Mapping[ResourceKey, Resource]):
    """An immutable set of objects keyed by ResourceKey, with a cheap per-kind view.

    Snapshots are values: sources build a new one for each change (`with_changes`), and consumers
    can diff two snapshots by key and identity.
    """

    __slots__ = ("_by_kind", "_objects")

    def __init__(self, objects: Mapping[ResourceKey, Resource] | None = None) -> None:
        self._objects: dict[ResourceKey, Resource] = dict(objects or {})
        by_kind: dict[str, dict[ResourceKey, Resource]] = {}
        for key, obj in self._objects.items():
            by_kind.setdefault(key.kind, {})[key] = obj
        self._by_kind = by_kind

    @classmethod
    def of(cls, objects: list[Resource] | tuple[Resource, ...]) -> ConfigSnapshot:
        return cls({o.key: o for o in objects})

    def __getitem__(self, key: ResourceKey) -> Resource:
        return self._objects[key]

    def __iter__(self) -> Iterator[ResourceKey]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def of_kind(self, cls: type[R]) -> list[R]:
        """All objects of one kind, in a stable (key) order."""
        bucket = self._by_kind.get(cls.KIND, {})
        return [bucket[k] for k in sorted(bucket)]  # type: ignore[misc]

    def get_obj(self, cls: type[R], namespace: str, name: str) -> R | None:
        obj = self._objects.get(ResourceKey(cls.KIND, namespace, name))
        return obj if isinstance(obj, cls) else None

    def with_changes(
        self, upserts: list[Resource] | tuple[Resource, ...] = (), deletes: tuple[ResourceKey, ...] = ()
    ) -> ConfigSnapshot:
        objects = dict(self._objects)
        for key in deletes:
            objects.pop(key, None)
        for obj in upserts:
            objects[obj.key] = obj
        return ConfigSnapshot(objects)

    def changed_keys(self, other: ConfigSnapshot) -> set[ResourceKey]:
        """Keys added, removed or changed (by value) between self and other."""
        mine, theirs = self._objects, other._objects
        keys: set[ResourceKey] = set()
        found = 0
        for key, a in mine.items():
            b = theirs.get(key)
            if b is None:
                keys.add(key)
                continue
            found += 1
            # Snapshots share unchanged objects, so the identity test settles most keys without a
            # field-by-field comparison.
            if a is not b and a != b:
                keys.add(key)
        if found != len(theirs):
            keys.update(theirs.keys() - mine.keys())
        return keys
