"""Small constructors for model objects, so tables read like the YAML they stand for."""

from __future__ import annotations

from collections.abc import Mapping

from controller.translate import MeshConfig, Translation, translate
from loom.api import authorization_pb2, workload_pb2
from loom.resources.diagnostics import Diagnostic
from loom.resources.model import (
    ANNOTATION_FOR_SERVICE_ACCOUNT,
    LABEL_DATAPLANE_MODE,
    LABEL_WAYPOINT_FOR,
    AuthorizationPolicy,
    ConfigSnapshot,
    Container,
    ContainerPort,
    Gateway,
    GatewayListener,
    LabelSelector,
    Namespace,
    ObjectMeta,
    Origin,
    PeerAuthentication,
    Pod,
    PodTemplate,
    PolicyRule,
    PolicyTargetRef,
    Resource,
    Service,
    ServicePort,
)

MESH = MeshConfig()
AMBIENT = {LABEL_DATAPLANE_MODE: "ambient"}


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Namespace:
    return Namespace(meta=ObjectMeta(name=name, namespace="", labels=dict(labels or {})))


def pod(
    name: str,
    ns: str = "default",
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    sa: str = "default",
    ips: tuple[str, ...] = ("10.0.0.1",),
    node: str = "node-1",
    phase: str = "Running",
    ready: bool = True,
    host_network: bool = False,
    owner: str = "",
    ports: Mapping[str, int] | None = None,
) -> Pod:
    container_ports = tuple(
        ContainerPort(number, name=port_name) for port_name, number in (ports or {}).items()
    )
    return Pod(
        meta=ObjectMeta(
            name=name, namespace=ns, labels=dict(labels or {}), annotations=dict(annotations or {})
        ),
        origin=Origin("pods.yaml", 1),
        spec=PodTemplate(
            service_account=sa,
            node_name=node,
            host_network=host_network,
            containers=(Container("app", ports=container_ports),),
        ),
        ips=ips,
        phase=phase,
        ready=ready,
        owner_deployment=owner,
    )


def service(
    name: str,
    ns: str = "default",
    *,
    selector: Mapping[str, str] | None = None,
    ports: tuple[ServicePort, ...] = (ServicePort(80),),
    cluster_ips: tuple[str, ...] = ("172.16.0.1",),
    headless: bool = False,
    labels: Mapping[str, str] | None = None,
) -> Service:
    return Service(
        meta=ObjectMeta(name=name, namespace=ns, labels=dict(labels or {})),
        origin=Origin("services.yaml", 1),
        selector=None if selector is None else dict(selector),
        ports=ports,
        cluster_ips=() if headless else cluster_ips,
        headless=headless,
    )


def waypoint(
    name: str = "waypoint",
    ns: str = "default",
    *,
    waypoint_for: str | None = None,
    for_sa: str = "",
    gateway_class: str = "istio-waypoint",
) -> Gateway:
    labels = {LABEL_WAYPOINT_FOR: waypoint_for} if waypoint_for is not None else {}
    annotations = {ANNOTATION_FOR_SERVICE_ACCOUNT: for_sa} if for_sa else {}
    return Gateway(
        meta=ObjectMeta(name=name, namespace=ns, labels=labels, annotations=annotations),
        origin=Origin("gateways.yaml", 1),
        gateway_class=gateway_class,
        listeners=(GatewayListener("mesh", 15008, "HBONE"),),
    )


def authz(
    name: str,
    ns: str = "default",
    *,
    action: str = "ALLOW",
    rules: tuple[PolicyRule, ...] | None = None,
    selector: Mapping[str, str] | None = None,
    target_refs: tuple[PolicyTargetRef, ...] = (),
    dry_run: bool = False,
) -> AuthorizationPolicy:
    annotations = {"istio.io/dry-run": "true"} if dry_run else {}
    return AuthorizationPolicy(
        meta=ObjectMeta(name=name, namespace=ns, annotations=annotations),
        origin=Origin("policies.yaml", 3),
        selector=None if selector is None else LabelSelector(match_labels=dict(selector)),
        target_refs=target_refs,
        action=action,
        rules=rules,
    )


def peer_auth(
    name: str,
    ns: str = "default",
    *,
    mode: str = "UNSET",
    selector: Mapping[str, str] | None = None,
    ports: Mapping[int, str] | None = None,
) -> PeerAuthentication:
    return PeerAuthentication(
        meta=ObjectMeta(name=name, namespace=ns),
        origin=Origin("peer-authentication.yaml", 1),
        selector=None if selector is None else LabelSelector(match_labels=dict(selector)),
        mode=mode,
        port_level_mtls=dict(ports or {}),
    )


def run(*objects: Resource, mesh: MeshConfig = MESH) -> Translation:
    return translate(ConfigSnapshot.of(list(objects)), mesh)


def workload_of(translation: Translation, name: str, ns: str = "default") -> workload_pb2.Workload:
    address = translation.addresses[f"{MESH.cluster_id}//Pod/{ns}/{name}"]
    assert address.WhichOneof("type") == "workload"
    return address.workload


def service_of(translation: Translation, name: str, ns: str = "default") -> workload_pb2.Service:
    address = translation.addresses[f"{ns}/{name}.{ns}.svc.cluster.local"]
    assert address.WhichOneof("type") == "service"
    return address.service


def waypoint_host(wp: workload_pb2.Workload | workload_pb2.Service) -> str | None:
    """The waypoint hostname bound to a Workload or Service, None when unbound."""
    if not wp.HasField("waypoint"):
        return None
    assert wp.waypoint.hbone_mtls_port == 15008
    return wp.waypoint.hostname.hostname


def policy_of(translation: Translation, key: str) -> authorization_pb2.Authorization:
    return translation.authorizations[key]


def warnings_for(translation: Translation, kind: str, name: str) -> list[Diagnostic]:
    return [
        d for d in translation.diagnostics if d.key is not None and d.key.kind == kind and d.key.name == name
    ]
