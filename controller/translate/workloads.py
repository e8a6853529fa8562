"""Pods -> `Workload` resources.

Which pods: every Pod with at least one valid IP whose phase is not Failed or Succeeded, except
hostNetwork pods (they share the node's network namespace and cannot be captured). Pods that are not
enrolled are still sent, with tunnel_protocol NONE: the node proxies need them to know that traffic to
those addresses leaves the mesh.

Enrolment (tunnel_protocol HBONE), Istio's rules: never in namespace kube-system, never for pods with a
sidecar (annotation sidecar.istio.io/status); otherwise the pod's label istio.io/dataplane-mode wins
("ambient" enrols, "none" opts out), and without it (or with a value loom does not know, with a
warning) the Namespace's label decides. With `MeshConfig.require_redirection_annotation` an enrolled
pod also needs ambient.istio.io/redirection=enabled, which the CNI node agent writes once the pod's
traffic is captured. A waypoint's own pod (see `waypoints`) speaks HBONE itself: it is sent with
native_tunnel and is never captured (tunnel_protocol NONE), since capturing it would tunnel twice.

Identity: trust_domain is left empty for the default cluster.local and service_account for "default",
as in Istio's workload API. Telemetry names follow Istio: canonical name from the labels
service.istio.io/canonical-name, app.kubernetes.io/name, app, else the workload name; canonical revision
from service.istio.io/canonical-revision, app.kubernetes.io/version, version, else "latest"; the
workload is the owning Deployment (type DEPLOYMENT) or else the pod itself (type POD).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.translate.context import TranslationContext
from controller.translate.serialized import serialize
from controller.translate.services import container_ports_by_name, ip_bytes
from controller.translate.waypoints import WaypointRef
from loom.api import workload_pb2
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import (
    ANNOTATION_REDIRECTION,
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_NONE,
    DEFAULT_TRUST_DOMAIN,
    LABEL_DATAPLANE_MODE,
    Pod,
    ResourceKey,
)

ANNOTATION_SIDECAR_STATUS = "sidecar.istio.io/status"
REDIRECTION_ENABLED = "enabled"
EXCLUDED_NAMESPACES = frozenset({"kube-system"})
TERMINATED_PHASES = frozenset({"Failed", "Succeeded"})
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
DEFAULT_REVISION = "latest"


@dataclass(frozen=True, slots=True, eq=False)
class PodTranslation:
    """What one Pod contributes to the output."""

    uid: str  # the Workload resource name
    # The Address, serialized (the message itself is not kept: see controller.translate.serialized).
    # None: the pod is not a workload (yet).
    serialized_address: bytes | None
    services: frozenset[ResourceKey]  # the Services it backs (it is one of their endpoints)
    # The per-service-account waypoint serving it (waypoints rule 2), for its Services' binding.
    per_sa_waypoint: WaypointRef | None
    diagnostics: tuple[Diagnostic, ...]


def workload_uid(cluster_id: str, pod: Pod) -> str:
    return f"{cluster_id}//Pod/{pod.namespace}/{pod.name}"


def _warning(pod: Pod, field: str, message: str) -> Diagnostic:
    return Diagnostic(Severity.WARNING, message, origin=pod.origin, key=pod.key, field=field)


def _first_label(labels: Mapping[str, str], keys: tuple[str, ...], default: str) -> str:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return default


def not_a_workload(uid: str, diagnostics: tuple[Diagnostic, ...] = ()) -> PodTranslation:
    return PodTranslation(uid, None, frozenset(), None, diagnostics)


def translate_pod(pod: Pod, ctx: TranslationContext) -> PodTranslation:
    mesh = ctx.mesh
    uid = workload_uid(mesh.cluster_id, pod)
    if pod.phase in TERMINATED_PHASES or pod.spec.host_network or not pod.ips:
        return not_a_workload(uid)
    diagnostics: list[Diagnostic] = []
    addresses: list[bytes] = []
    for i, ip in enumerate(pod.ips):
        packed = ip_bytes(ip)
        if packed is None:
            diagnostics.append(
                _warning(pod, f"status.podIPs[{i}]", f"{ip!r} is not an IP address; it is not sent")
            )
        else:
            addresses.append(packed)
    if not addresses:
        return not_a_workload(uid, tuple(diagnostics))

    namespace = pod.namespace
    labels = pod.meta.labels
    annotations = pod.meta.annotations
    waypoints = ctx.waypoints
    native_tunnel = waypoints.is_waypoint_pod(pod)

    tunnel = workload_pb2.NONE
    redirected = (
        not mesh.require_redirection_annotation
        or annotations.get(ANNOTATION_REDIRECTION) == REDIRECTION_ENABLED
    )
    if not native_tunnel and _enrolled(pod, ctx, diagnostics) and redirected:
        tunnel = workload_pb2.HBONE

    waypoint, per_sa_waypoint, waypoint_warning = waypoints.workload_binding(
        pod, ctx.namespace_waypoints.get(namespace)
    )
    if waypoint_warning is not None:
        diagnostics.append(waypoint_warning)

    backed: list[tuple[str, ResourceKey, bytes]] = []  # (resource name, key, serialized PortList)
    service_index = ctx.service_selectors.get(namespace)
    if service_index is not None:
        candidates = service_index.matching(labels)
        if candidates:
            named_ports = container_ports_by_name(pod)
            backed = [
                (info.resource_name, info.service.key, info.port_list_for(named_ports)) for info in candidates
            ]
            backed.sort(key=lambda entry: entry[0])

    policies: set[str] = (
        set(ctx.root_policy_selectors.matching(labels)) if ctx.root_policy_selectors else set()
    )
    policy_index = ctx.policy_selectors.get(namespace)
    if policy_index is not None:
        policies.update(policy_index.matching(labels))
    converted, pa_warning = ctx.peer_authentication.policy_for(pod)
    if converted is not None:
        policies.add(converted)
    if pa_warning is not None:
        diagnostics.append(pa_warning)

    workload_name = pod.owner_deployment or pod.name
    result = workload_pb2.Address()
    w = result.workload
    w.uid = uid
    w.name = pod.name
    w.namespace = namespace
    w.addresses.extend(addresses)
    w.network = mesh.network
    w.tunnel_protocol = tunnel
    if mesh.trust_domain != DEFAULT_TRUST_DOMAIN:
        w.trust_domain = mesh.trust_domain
    if pod.spec.service_account != "default":
        w.service_account = pod.spec.service_account
    if waypoint is not None:
        w.waypoint.MergeFromString(waypoint)
    w.node = pod.spec.node_name
    w.canonical_name = _first_label(labels, _CANONICAL_NAME_LABELS, workload_name)
    w.canonical_revision = _first_label(labels, _CANONICAL_REVISION_LABELS, DEFAULT_REVISION)
    w.workload_type = workload_pb2.DEPLOYMENT if pod.owner_deployment else workload_pb2.POD
    w.workload_name = workload_name
    w.native_tunnel = native_tunnel
    for resource_name, _, port_list in backed:
        w.services[resource_name].MergeFromString(port_list)
    w.authorization_policies.extend(sorted(policies))
    w.status = workload_pb2.HEALTHY if pod.ready else workload_pb2.UNHEALTHY
    w.cluster_id = mesh.cluster_id
    w.capacity = 1
    return PodTranslation(
        uid=uid,
        serialized_address=serialize(result),
        services=ctx.shared_service_set(frozenset(key for _, key, _ in backed)),
        per_sa_waypoint=per_sa_waypoint,
        diagnostics=tuple(diagnostics),
    )


def _enrolled(pod: Pod, ctx: TranslationContext, diagnostics: list[Diagnostic]) -> bool:
    if pod.namespace in EXCLUDED_NAMESPACES or ANNOTATION_SIDECAR_STATUS in pod.meta.annotations:
        return False
    mode = pod.meta.labels.get(LABEL_DATAPLANE_MODE)
    if mode == DATAPLANE_MODE_AMBIENT:
        return True
    if mode == DATAPLANE_MODE_NONE:
        return False
    if mode is not None:
        diagnostics.append(
            _warning(
                pod,
                f"metadata.labels[{LABEL_DATAPLANE_MODE}]",
                f"unknown dataplane mode {mode!r} (expected ambient or none); the namespace's label decides",
            )
        )
    namespace_labels = ctx.namespace_labels.get(pod.namespace)
    return (
        namespace_labels is not None and namespace_labels.get(LABEL_DATAPLANE_MODE) == DATAPLANE_MODE_AMBIENT
    )
