"""Waypoint binding: which waypoint traffic to a Service or to a Workload must traverse.

A waypoint is a Gateway of class istio-waypoint. Proxies reach it by hostname: the GatewayAddress
sent is `<gateway>.<namespace>.svc.<cluster_domain>` on the HBONE port 15008, which the node proxy
resolves to the waypoint's Service and its endpoints.

Two binding models are supported side by side.

* Istio's current model: the label `istio.io/use-waypoint` on a Pod, a Service or a Namespace names
  the waypoint (`<name>`, or `<namespace>/<name>`; `istio.io/use-waypoint-namespace` on the same object
  names another namespace). The value `none` (or `#none`) opts the object out. The waypoint's traffic
  type, label `istio.io/waypoint-for` on the Gateway (`service` when unset, `workload`, `all`, `none`),
  decides what the label binds: a Service gets `Service.waypoint` only for `service`/`all`, a Pod gets
  `Workload.waypoint` only for `workload`/`all`.
* The per-service-account model (loom's own): a waypoint Gateway annotated
  `istio.io/for-service-account: <sa>` serves the pods of its namespace that run as `<sa>`. Those pods
  get `Workload.waypoint`, and a Service gets `Service.waypoint` when every pod behind it (at least one)
  is served by that same waypoint. When the pods behind a Service are mixed, the Service gets no
  per-service-account waypoint and a warning names it: sending all of its traffic through one
  account's waypoint would apply that account's L7 policy to the others. Such a Gateway serves both
  kinds of traffic unless its `istio.io/waypoint-for` label says otherwise.

Precedence, highest first (the first rule that applies decides; the chosen waypoint's traffic type
may then bind nothing, with no fallback to a lower rule):

  for a Workload                            for a Service
  0. a waypoint's own pods: never bound     0. a waypoint's own Service: never bound
  1. use-waypoint on the Pod (or none)      1. use-waypoint on the Service (or none)
  2. per-service-account waypoint           2. per-service-account waypoint of all its pods
     of the pod's service account              (mixed pods: warning, rule 3 still applies)
  3. use-waypoint on the Namespace          3. use-waypoint on the Namespace

So an explicit label on the object always wins, and the per-service-account waypoint wins over a
namespace-wide label. A pod whose own use-waypoint label names anything but its account's waypoint
(including "none") is not served by that waypoint, which also makes the Services in front of it mixed.

Fail closed on a missing waypoint (stricter than Istio, which sends no waypoint and lets the node
proxy route around it, silently skipping the L7 policy): when a label names a Gateway that does not
exist or is not of class istio-waypoint, loom still binds the hostname. The node proxy cannot resolve
it, so connections fail until the waypoint exists, and a warning names the object, the label and the
missing waypoint. The traffic type of a waypoint that does not exist is unknown, so both Services and
Workloads are bound. A label value that is not a valid reference (e.g. "a/b/c") is treated the same
way: it names a waypoint that cannot exist.

Not checked: whether a cross-namespace waypoint's listeners allow the attachment (allowedRoutes is not
in the model); the binding is made as if they did.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from controller.translate.serialized import serialize
from loom.api import workload_pb2
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import (
    HBONE_PORT,
    LABEL_USE_WAYPOINT,
    LABEL_USE_WAYPOINT_NAMESPACE,
    LABEL_WAYPOINT_FOR,
    Gateway,
    Pod,
    Resource,
    Service,
)

LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
LABEL_TUNNEL = "networking.istio.io/tunnel"
TUNNEL_HTTP = "http"
OPT_OUT_VALUES = frozenset({"none", "#none"})

SERVICE_TRAFFIC = "service"
WORKLOAD_TRAFFIC = "workload"
_TRAFFIC_TYPES: Mapping[str, frozenset[str]] = {
    "service": frozenset({SERVICE_TRAFFIC}),
    "workload": frozenset({WORKLOAD_TRAFFIC}),
    "all": frozenset({SERVICE_TRAFFIC, WORKLOAD_TRAFFIC}),
    "none": frozenset(),
}
_BOTH = _TRAFFIC_TYPES["all"]
_LABEL_FIELD = f"metadata.labels[{LABEL_USE_WAYPOINT}]"


@dataclass(frozen=True, slots=True, order=True)
class WaypointRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class UseWaypoint:
    """An istio.io/use-waypoint label: a waypoint reference, or an explicit opt-out (`ref` None)."""

    ref: WaypointRef | None
    raw: str


def parse_use_waypoint(labels: Mapping[str, str], own_namespace: str) -> UseWaypoint | None:
    """The use-waypoint choice of an object with these labels; None when it has no such label."""
    raw = labels.get(LABEL_USE_WAYPOINT)
    if raw is None:
        return None
    if raw in OPT_OUT_VALUES:
        return UseWaypoint(None, raw)
    namespace = labels.get(LABEL_USE_WAYPOINT_NAMESPACE) or own_namespace
    parts = raw.split("/")
    if len(parts) == 2 and parts[0] and parts[1]:
        return UseWaypoint(WaypointRef(parts[0], parts[1]), raw)
    # A plain name -- or something that is not a valid reference at all, which then names a waypoint
    # that cannot exist: bound anyway, so traffic fails closed (see the module docstring).
    return UseWaypoint(WaypointRef(namespace, raw), raw)


def _warning(subject: Resource, field: str, message: str) -> Diagnostic:
    return Diagnostic(Severity.WARNING, message, origin=subject.origin, key=subject.key, field=field)


class WaypointIndex:
    """The waypoint Gateways of one snapshot and the binding rules above."""

    def __init__(self, gateways: Iterable[Gateway], cluster_domain: str) -> None:
        self._cluster_domain = cluster_domain
        self._gateways: dict[WaypointRef, Gateway] = {}
        self._traffic: dict[WaypointRef, frozenset[str]] = {}
        self._per_sa: dict[tuple[str, str], WaypointRef] = {}
        self._per_sa_namespaces: set[str] = set()
        self._addresses: dict[WaypointRef, bytes] = {}
        self.diagnostics: list[Diagnostic] = []
        for gateway in sorted(gateways, key=lambda g: g.key):
            ref = WaypointRef(gateway.namespace, gateway.name)
            self._gateways[ref] = gateway
            if gateway.is_waypoint:
                self._add_waypoint(ref, gateway)

    def _add_waypoint(self, ref: WaypointRef, gateway: Gateway) -> None:
        account = gateway.for_service_account
        label = gateway.meta.labels.get(LABEL_WAYPOINT_FOR)
        if label is None:
            traffic = _BOTH if account else _TRAFFIC_TYPES["service"]
        elif label in _TRAFFIC_TYPES:
            traffic = _TRAFFIC_TYPES[label]
        else:
            traffic = _BOTH
            self.diagnostics.append(
                _warning(
                    gateway,
                    f"metadata.labels[{LABEL_WAYPOINT_FOR}]",
                    f"unknown waypoint traffic type {label!r} (expected service, workload, all or none); "
                    "loom binds both service and workload traffic to this waypoint",
                )
            )
        self._traffic[ref] = traffic
        if account:
            owner = self._per_sa.get((ref.namespace, account))
            if owner is None:
                self._per_sa[(ref.namespace, account)] = ref
                self._per_sa_namespaces.add(ref.namespace)
            else:
                self.diagnostics.append(
                    _warning(
                        gateway,
                        "metadata.annotations[istio.io/for-service-account]",
                        f"waypoint {owner} already serves service account {account!r} in namespace "
                        f"{ref.namespace}; this waypoint is not used for it",
                    )
                )

    # --- lookups -----------------------------------------------------------------------------------

    def address(self, ref: WaypointRef) -> bytes:
        """The GatewayAddress of a waypoint, serialized (no message is kept); the same object for the
        same waypoint, so bindings compare by identity."""
        cached = self._addresses.get(ref)
        if cached is None:
            cached = serialize(
                workload_pb2.GatewayAddress(
                    hostname=workload_pb2.NamespacedHostname(
                        namespace=ref.namespace,
                        hostname=f"{ref.name}.{ref.namespace}.svc.{self._cluster_domain}",
                    ),
                    hbone_mtls_port=HBONE_PORT,
                )
            )
            self._addresses[ref] = cached
        return cached

    def is_waypoint(self, namespace: str, name: str) -> bool:
        gateway = self._gateways.get(WaypointRef(namespace, name))
        return gateway is not None and gateway.is_waypoint

    def is_waypoint_pod(self, pod: Pod) -> bool:
        """A waypoint's own pod: it speaks HBONE itself and never gets a waypoint."""
        labels = pod.meta.labels
        if labels.get(LABEL_TUNNEL) == TUNNEL_HTTP:
            return True
        gateway_name = labels.get(LABEL_GATEWAY_NAME)
        return gateway_name is not None and self.is_waypoint(pod.namespace, gateway_name)

    def is_waypoint_service(self, service: Service) -> bool:
        """The Service in front of a waypoint (named after its Gateway)."""
        return self.is_waypoint(service.namespace, service.name)

    def has_per_service_account(self, namespace: str) -> bool:
        return namespace in self._per_sa_namespaces

    def per_service_account(self, namespace: str, service_account: str) -> WaypointRef | None:
        return self._per_sa.get((namespace, service_account))

    # --- binding -----------------------------------------------------------------------------------

    def _resolve(
        self, ref: WaypointRef, choice: UseWaypoint, traffic: str, subject: Resource | None
    ) -> tuple[bytes | None, Diagnostic | None]:
        """Bind `traffic` to the waypoint `ref` a use-waypoint label names; `subject` is the labelled
        Pod/Service to warn about (None for a Namespace's label: that warning is issued once per
        namespace, by `missing_waypoint_warning`)."""
        gateway = self._gateways.get(ref)
        if gateway is None or not gateway.is_waypoint:
            diagnostic = None if subject is None else self.missing_waypoint_warning(subject, choice)
            return self.address(ref), diagnostic
        if traffic in self._traffic[ref]:
            return self.address(ref), None
        diagnostic = None
        if subject is not None:
            declared = gateway.meta.labels.get(LABEL_WAYPOINT_FOR, "service")
            diagnostic = _warning(
                subject,
                _LABEL_FIELD,
                f"{LABEL_USE_WAYPOINT}={choice.raw!r} names waypoint {ref}, which does not serve "
                f"{traffic} traffic ({LABEL_WAYPOINT_FOR}={declared}); this {subject.KIND} gets no waypoint",
            )
        return None, diagnostic

    def missing_waypoint_warning(self, subject: Resource, choice: UseWaypoint) -> Diagnostic | None:
        """The warning for a label naming a waypoint that does not exist (None if it exists)."""
        ref = choice.ref
        if ref is None:
            return None
        gateway = self._gateways.get(ref)
        if gateway is not None and gateway.is_waypoint:
            return None
        if gateway is None:
            problem = f"there is no Gateway {ref}"
        else:
            problem = f"Gateway {ref} has class {gateway.gateway_class!r}, not istio-waypoint"
        hostname = f"{ref.name}.{ref.namespace}.svc.{self._cluster_domain}"
        return _warning(
            subject,
            _LABEL_FIELD,
            f"{LABEL_USE_WAYPOINT}={choice.raw!r} names waypoint {ref}, but {problem}; loom binds the "
            f"traffic to {hostname} anyway, so connections fail until the waypoint exists instead of "
            "bypassing its policy",
        )

    def workload_binding(
        self, pod: Pod, namespace_choice: UseWaypoint | None
    ) -> tuple[bytes | None, WaypointRef | None, Diagnostic | None]:
        """(Workload.waypoint (a serialized GatewayAddress), the per-service-account waypoint serving
        the pod, warning)."""
        if self.is_waypoint_pod(pod):
            return None, None, None
        explicit = parse_use_waypoint(pod.meta.labels, pod.namespace)
        if explicit is not None:
            if explicit.ref is None:
                return None, None, None
            address, diagnostic = self._resolve(explicit.ref, explicit, WORKLOAD_TRAFFIC, pod)
            per_sa = self._per_sa.get((pod.namespace, pod.spec.service_account))
            return address, (per_sa if per_sa == explicit.ref else None), diagnostic
        per_sa = self._per_sa.get((pod.namespace, pod.spec.service_account))
        if per_sa is not None:
            bound = self.address(per_sa) if WORKLOAD_TRAFFIC in self._traffic[per_sa] else None
            return bound, per_sa, None
        if namespace_choice is not None and namespace_choice.ref is not None:
            address, _ = self._resolve(namespace_choice.ref, namespace_choice, WORKLOAD_TRAFFIC, None)
            return address, None, None
        return None, None, None

    def service_binding_depends_on_pods(self, service: Service) -> bool:
        """Whether rule 2 can apply, i.e. whether a pod change can change this Service's waypoint."""
        return (
            not self.is_waypoint_service(service)
            and LABEL_USE_WAYPOINT not in service.meta.labels
            and self.has_per_service_account(service.namespace)
        )

    def service_binding(
        self,
        service: Service,
        namespace_choice: UseWaypoint | None,
        endpoint_waypoints: Collection[WaypointRef | None],
    ) -> tuple[bytes | None, tuple[Diagnostic, ...]]:
        """(Service.waypoint (a serialized GatewayAddress), warnings). `endpoint_waypoints` holds, for
        each pod behind the Service, the per-service-account waypoint serving it (None for a pod no
        such waypoint serves)."""
        if self.is_waypoint_service(service):
            return None, ()
        explicit = parse_use_waypoint(service.meta.labels, service.namespace)
        if explicit is not None:
            if explicit.ref is None:
                return None, ()
            address, diagnostic = self._resolve(explicit.ref, explicit, SERVICE_TRAFFIC, service)
            return address, (diagnostic,) if diagnostic is not None else ()
        diagnostics: tuple[Diagnostic, ...] = ()
        if endpoint_waypoints:
            servers = set(endpoint_waypoints)
            served = sorted(ref for ref in servers if ref is not None)
            if len(servers) == 1 and served:
                ref = served[0]
                return (self.address(ref) if SERVICE_TRAFFIC in self._traffic[ref] else None), ()
            if served:
                unserved = sum(1 for ref in endpoint_waypoints if ref is None)
                parts = [f"waypoint {ref}" for ref in served]
                if unserved:
                    parts.append(f"no per-service-account waypoint ({unserved} pod(s))")
                diagnostics = (
                    _warning(
                        service,
                        "spec.selector",
                        "the pods behind this Service are not all served by one per-service-account "
                        f"waypoint (they are served by: {', '.join(parts)}); loom gives the Service no "
                        "per-service-account waypoint. Select pods of a single service account, or label "
                        f"the Service {LABEL_USE_WAYPOINT}",
                    ),
                )
        if namespace_choice is not None and namespace_choice.ref is not None:
            address, _ = self._resolve(namespace_choice.ref, namespace_choice, SERVICE_TRAFFIC, None)
            return address, diagnostics
        return None, diagnostics
