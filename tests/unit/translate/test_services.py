"""Services -> Service resources: naming, VIPs, headless, ports and application protocols."""

from __future__ import annotations

import ipaddress

import pytest

from controller.translate import MeshConfig
from controller.translate.services import app_protocol
from loom.api import workload_pb2
from loom.resources.model import ServicePort

from .builders import run, service, service_of, warnings_for


def test_service_resource() -> None:
    translation = run(
        service(
            "reviews", ports=(ServicePort(9080, name="http", target_port=9081),), cluster_ips=("172.16.0.7",)
        ),
        mesh=MeshConfig(network="net-a"),
    )
    assert translation.addresses["default/reviews.default.svc.cluster.local"].service == workload_pb2.Service(
        name="reviews",
        namespace="default",
        hostname="reviews.default.svc.cluster.local",
        addresses=[workload_pb2.NetworkAddress(network="net-a", address=bytes([172, 16, 0, 7]))],
        ports=[workload_pb2.Port(service_port=9080, target_port=9081, app_protocol=workload_pb2.HTTP11)],
    )


def test_cluster_domain_names_the_host() -> None:
    translation = run(service("a", "ns1"), mesh=MeshConfig(cluster_domain="corp.example"))
    assert translation.addresses["ns1/a.ns1.svc.corp.example"].service.hostname == "a.ns1.svc.corp.example"


ADDRESS_CASES = [
    ("single stack", ("172.16.0.1",), ["172.16.0.1"]),
    ("dual stack", ("172.16.0.1", "fd00:10::1"), ["172.16.0.1", "fd00:10::1"]),
    ("no cluster IP yet is still sent", (), []),
]


@pytest.mark.parametrize(
    ("vips", "expected"), [c[1:] for c in ADDRESS_CASES], ids=[c[0] for c in ADDRESS_CASES]
)
def test_vips(vips: tuple[str, ...], expected: list[str]) -> None:
    svc = service_of(run(service("s", cluster_ips=vips)), "s")
    assert [a.address for a in svc.addresses] == [ipaddress.ip_address(v).packed for v in expected]


def test_headless_service_is_sent_without_addresses() -> None:
    svc = service_of(run(service("s", headless=True, selector={"app": "a"})), "s")
    assert list(svc.addresses) == [] and svc.hostname == "s.default.svc.cluster.local"


def test_invalid_vip_is_reported_and_skipped() -> None:
    translation = run(service("s", cluster_ips=("None-really", "172.16.0.9")))
    assert [a.address for a in service_of(translation, "s").addresses] == [bytes([172, 16, 0, 9])]
    [warning] = warnings_for(translation, "Service", "s")
    assert warning.field == "spec.clusterIPs[0]"


def test_service_ports() -> None:
    svc = service_of(
        run(
            service(
                "s",
                ports=(
                    ServicePort(80, name="http", target_port=8080),
                    ServicePort(81),
                    ServicePort(82, name="grpc-api", target_port="grpc"),
                    ServicePort(83, target_port="8083"),
                    ServicePort(53, name="dns", protocol="UDP"),
                ),
            )
        ),
        "s",
    )
    assert [(p.service_port, p.target_port, p.app_protocol) for p in svc.ports] == [
        (80, 8080, workload_pb2.HTTP11),
        (81, 81, workload_pb2.UNKNOWN),
        (82, 0, workload_pb2.GRPC),  # named: resolved per pod
        (83, 8083, workload_pb2.UNKNOWN),
    ]


APP_PROTOCOL_CASES = [
    ("http", "", workload_pb2.HTTP11),
    ("http-web", "", workload_pb2.HTTP11),
    ("HTTP2", "", workload_pb2.HTTP2),
    ("grpc", "", workload_pb2.GRPC),
    ("grpc-web", "", workload_pb2.HTTP11),
    ("tcp-db", "", workload_pb2.TCP),
    ("mysql", "", workload_pb2.TCP),
    ("tls", "", workload_pb2.TLS),
    ("https", "", workload_pb2.TLS),
    ("web", "", workload_pb2.UNKNOWN),
    ("httpx", "", workload_pb2.UNKNOWN),
    ("", "", workload_pb2.UNKNOWN),
    ("tcp", "http", workload_pb2.HTTP11),
    ("http", "grpc", workload_pb2.GRPC),
    ("", "kubernetes.io/h2c", workload_pb2.HTTP2),
    ("", "kubernetes.io/ws", workload_pb2.HTTP11),
    ("", "kubernetes.io/wss", workload_pb2.TLS),
    ("http", "custom.example/proto", workload_pb2.UNKNOWN),
]


@pytest.mark.parametrize(
    ("name", "app", "expected"),
    APP_PROTOCOL_CASES,
    ids=[f"name {n or '-'} appProtocol {a or '-'}" for n, a, _ in APP_PROTOCOL_CASES],
)
def test_app_protocol_selection(name: str, app: str, expected: int) -> None:
    assert app_protocol(ServicePort(80, name=name, app_protocol=app)) == expected
