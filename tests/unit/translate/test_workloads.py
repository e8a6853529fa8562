"""Pods -> Workload resources: which pods, enrolment, identity, telemetry names, services backed."""

from __future__ import annotations

import ipaddress

import pytest

from controller.translate import MeshConfig
from loom.api import workload_pb2
from loom.resources.model import Pod, Resource, ServicePort

from .builders import AMBIENT, namespace, pod, run, service, warnings_for, waypoint, workload_of

UID = "Kubernetes//Pod/default/p"


# --- which pods are workloads ----------------------------------------------------------------------

PRESENCE_CASES = [
    ("running pod", pod("p"), True),
    ("pending pod with an address", pod("p", phase="Pending"), True),
    ("pod without address yet", pod("p", ips=()), False),
    ("failed pod", pod("p", phase="Failed"), False),
    ("succeeded pod", pod("p", phase="Succeeded"), False),
    ("host network pod", pod("p", host_network=True), False),
    ("pod whose only address is invalid", pod("p", ips=("10.0.0.300",)), False),
]


@pytest.mark.parametrize(
    ("p", "present"), [c[1:] for c in PRESENCE_CASES], ids=[c[0] for c in PRESENCE_CASES]
)
def test_which_pods_are_workloads(p: Pod, present: bool) -> None:
    assert (UID in run(namespace("default"), p).addresses) is present


def test_addresses_are_packed_and_invalid_ones_reported() -> None:
    translation = run(pod("p", ips=("10.0.0.1", "fd00::1", "bogus")))
    assert list(workload_of(translation, "p").addresses) == [
        ipaddress.ip_address("10.0.0.1").packed,
        ipaddress.ip_address("fd00::1").packed,
    ]
    [warning] = warnings_for(translation, "Pod", "p")
    assert warning.field == "status.podIPs[2]" and "'bogus'" in warning.message


# --- enrolment -------------------------------------------------------------------------------------

HBONE, NONE = workload_pb2.HBONE, workload_pb2.NONE
SIDECAR = {"sidecar.istio.io/status": "{}"}
ENROLMENT_CASES: list[tuple[str, tuple[Resource, ...], int]] = [
    ("ambient namespace enrols", (namespace("default", AMBIENT), pod("p")), HBONE),
    ("plain namespace does not", (namespace("default"), pod("p")), NONE),
    ("no Namespace object does not", (pod("p"),), NONE),
    ("pod label ambient in a plain namespace", (namespace("default"), pod("p", labels=AMBIENT)), HBONE),
    (
        "pod label none opts out of an ambient namespace",
        (namespace("default", AMBIENT), pod("p", labels={"istio.io/dataplane-mode": "none"})),
        NONE,
    ),
    (
        "sidecar pod in an ambient namespace",
        (namespace("default", AMBIENT), pod("p", annotations=SIDECAR)),
        NONE,
    ),
    (
        "sidecar pod labelled ambient",
        (namespace("default"), pod("p", labels=AMBIENT, annotations=SIDECAR)),
        NONE,
    ),
    (
        "kube-system is never enrolled",
        (namespace("kube-system", AMBIENT), pod("p", "kube-system", labels=AMBIENT)),
        NONE,
    ),
    (
        "unknown pod mode defers to the namespace",
        (namespace("default", AMBIENT), pod("p", labels={"istio.io/dataplane-mode": "sidecar"})),
        HBONE,
    ),
    (
        "waypoint pod in an ambient namespace is not captured",
        (
            namespace("default", AMBIENT),
            waypoint("waypoint"),
            pod("p", labels={"gateway.networking.k8s.io/gateway-name": "waypoint"}),
        ),
        NONE,
    ),
]


@pytest.mark.parametrize(
    ("objects", "tunnel"), [c[1:] for c in ENROLMENT_CASES], ids=[c[0] for c in ENROLMENT_CASES]
)
def test_enrolment(objects: tuple[Resource, ...], tunnel: int) -> None:
    translation = run(*objects)
    ns = next(o.namespace for o in objects if isinstance(o, Pod))
    assert workload_of(translation, "p", ns).tunnel_protocol == tunnel


def test_unknown_dataplane_mode_is_reported() -> None:
    translation = run(namespace("default"), pod("p", labels={"istio.io/dataplane-mode": "sidecar"}))
    [warning] = warnings_for(translation, "Pod", "p")
    assert warning.field == "metadata.labels[istio.io/dataplane-mode]" and "'sidecar'" in warning.message


REDIRECTION_CASES = [
    ("enrolled and redirected", True, "enabled", HBONE),
    ("enrolled, capture pending", True, "pending", NONE),
    ("enrolled, no annotation yet", True, None, NONE),
    ("not enrolled, annotation present", False, "enabled", NONE),
]


@pytest.mark.parametrize(
    ("enrolled", "annotation", "tunnel"),
    [c[1:] for c in REDIRECTION_CASES],
    ids=[c[0] for c in REDIRECTION_CASES],
)
def test_require_redirection_annotation(enrolled: bool, annotation: str | None, tunnel: int) -> None:
    annotations = {"ambient.istio.io/redirection": annotation} if annotation else {}
    objects = (namespace("default", AMBIENT if enrolled else {}), pod("p", annotations=annotations))
    strict = MeshConfig(require_redirection_annotation=True)
    assert workload_of(run(*objects, mesh=strict), "p").tunnel_protocol == tunnel
    # Off by default: enrolment alone decides.
    assert workload_of(run(*objects), "p").tunnel_protocol == (HBONE if enrolled else NONE)


# --- identity and other fields ---------------------------------------------------------------------


def test_workload_fields() -> None:
    translation = run(
        namespace("default", AMBIENT),
        pod("p", sa="reviews", node="node-7", ready=False, owner="reviews-v1", ips=("10.0.0.5",)),
        mesh=MeshConfig(cluster_id="c1", network="net-a"),
    )
    w = translation.addresses["c1//Pod/default/p"].workload
    expected = workload_pb2.Workload(
        uid="c1//Pod/default/p",
        name="p",
        namespace="default",
        addresses=[bytes([10, 0, 0, 5])],
        network="net-a",
        tunnel_protocol=workload_pb2.HBONE,
        service_account="reviews",
        node="node-7",
        canonical_name="reviews-v1",
        canonical_revision="latest",
        workload_type=workload_pb2.DEPLOYMENT,
        workload_name="reviews-v1",
        status=workload_pb2.UNHEALTHY,
        cluster_id="c1",
        capacity=1,
    )
    assert w == expected


@pytest.mark.parametrize(
    ("sa", "mesh", "trust_domain", "service_account"),
    [
        ("default", MeshConfig(), "", ""),
        ("reviews", MeshConfig(), "", "reviews"),
        ("default", MeshConfig(trust_domain="example.org"), "example.org", ""),
    ],
    ids=["defaults are elided", "service account kept", "non-default trust domain kept"],
)
def test_identity_parts(sa: str, mesh: MeshConfig, trust_domain: str, service_account: str) -> None:
    w = workload_of(run(pod("p", sa=sa), mesh=mesh), "p")
    assert (w.trust_domain, w.service_account) == (trust_domain, service_account)


CANONICAL_CASES = [
    (
        "canonical labels win",
        {
            "service.istio.io/canonical-name": "cn",
            "app.kubernetes.io/name": "kn",
            "app": "a",
            "service.istio.io/canonical-revision": "cr",
            "app.kubernetes.io/version": "kv",
            "version": "v",
        },
        "",
        ("cn", "cr"),
    ),
    (
        "kubernetes recommended labels next",
        {"app.kubernetes.io/name": "kn", "app": "a", "app.kubernetes.io/version": "kv", "version": "v"},
        "",
        ("kn", "kv"),
    ),
    ("app and version", {"app": "a", "version": "v"}, "", ("a", "v")),
    ("deployment name and latest", {}, "dep", ("dep", "latest")),
    ("pod name and latest", {}, "", ("p", "latest")),
]


@pytest.mark.parametrize(
    ("labels", "owner", "expected"), [c[1:] for c in CANONICAL_CASES], ids=[c[0] for c in CANONICAL_CASES]
)
def test_canonical_name_and_revision(labels: dict[str, str], owner: str, expected: tuple[str, str]) -> None:
    w = workload_of(run(pod("p", labels=labels, owner=owner)), "p")
    assert (w.canonical_name, w.canonical_revision) == expected


def test_workload_type_and_name() -> None:
    translation = run(pod("p", owner="dep"), pod("q", ips=("10.0.0.2",)))
    assert (workload_of(translation, "p").workload_type, workload_of(translation, "p").workload_name) == (
        workload_pb2.DEPLOYMENT,
        "dep",
    )
    assert (workload_of(translation, "q").workload_type, workload_of(translation, "q").workload_name) == (
        workload_pb2.POD,
        "q",
    )


# --- services backed -------------------------------------------------------------------------------

HOST = "default/svc.default.svc.cluster.local"


def port(
    service_port: int, target_port: int, protocol: workload_pb2.AppProtocol = workload_pb2.UNKNOWN
) -> workload_pb2.Port:
    return workload_pb2.Port(service_port=service_port, target_port=target_port, app_protocol=protocol)


BACKING_CASES: list[tuple[str, tuple[Resource, ...], list[workload_pb2.Port] | None]] = [
    (
        "numeric target port",
        (service("svc", selector={"app": "a"}, ports=(ServicePort(80, target_port=8080),)),),
        [port(80, 8080)],
    ),
    (
        "unset target port is the service port",
        (service("svc", selector={"app": "a"}, ports=(ServicePort(80),)),),
        [port(80, 80)],
    ),
    (
        "named target port resolved against the pod",
        (service("svc", selector={"app": "a"}, ports=(ServicePort(80, name="http", target_port="web"),)),),
        [port(80, 9080, workload_pb2.HTTP11)],
    ),
    (
        "named target port the pod lacks is left out",
        (
            service(
                "svc",
                selector={"app": "a"},
                ports=(ServicePort(80, target_port="missing"), ServicePort(81, target_port=81)),
            ),
        ),
        [port(81, 81)],
    ),
    (
        "only TCP ports",
        (service("svc", selector={"app": "a"}, ports=(ServicePort(53, protocol="UDP"), ServicePort(54))),),
        [port(54, 54)],
    ),
    ("selector must match all labels", (service("svc", selector={"app": "a", "tier": "x"}),), None),
    ("service without selector", (service("svc", selector=None),), None),
    ("empty selector selects nothing", (service("svc", selector={}),), None),
    ("service in another namespace", (service("svc", "other", selector={"app": "a"}),), None),
]


@pytest.mark.parametrize(
    ("objects", "ports"), [c[1:] for c in BACKING_CASES], ids=[c[0] for c in BACKING_CASES]
)
def test_services_backed(objects: tuple[Resource, ...], ports: list[workload_pb2.Port] | None) -> None:
    translation = run(pod("p", labels={"app": "a"}, ports={"web": 9080}), *objects)
    services = workload_of(translation, "p").services
    if ports is None:
        assert HOST not in services
    else:
        assert list(services[HOST].ports) == ports


def test_pods_sharing_container_ports_get_equal_port_lists() -> None:
    svc = service("svc", selector={"app": "a"}, ports=(ServicePort(80, target_port="web"),))
    a = pod("a", labels={"app": "a"}, ports={"web": 9080})
    b = pod("b", labels={"app": "a"}, ports={"web": 9080}, ips=("10.0.0.2",))
    c = pod("c", labels={"app": "a"}, ports={"web": 7070}, ips=("10.0.0.3",))
    translation = run(svc, a, b, c)
    assert workload_of(translation, "a").services[HOST] == workload_of(translation, "b").services[HOST]
    assert list(workload_of(translation, "c").services[HOST].ports) == [port(80, 7070)]
