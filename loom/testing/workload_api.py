"""Builders of workload API resources for tests (small, valid protos), and a ProxyState holding them.

Shared by the node proxy's state, decision and telemetry tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from loom.api import authorization_pb2, workload_pb2
from ztunnel.state import ProxyState

CLUSTER = "Kubernetes"


def uid(name: str, namespace: str = "default") -> str:
    return f"{CLUSTER}//Pod/{namespace}/{name}"


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def waypoint_ref(name: str, namespace: str = "default", port: int = 15008) -> workload_pb2.GatewayAddress:
    return workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(namespace=namespace, hostname=hostname(name, namespace)),
        hbone_mtls_port=port,
    )


def hostname(name: str, namespace: str = "default") -> str:
    return f"{name}.{namespace}.svc.cluster.local"


def service_key(name: str, namespace: str = "default") -> str:
    return f"{namespace}/{hostname(name, namespace)}"


def workload(
    name: str,
    *ips: str,
    namespace: str = "default",
    service_account: str = "",
    node: str = "node-a",
    hbone: bool = True,
    native_tunnel: bool = False,
    services: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    waypoint: workload_pb2.GatewayAddress | None = None,
    healthy: bool = True,
    capacity: int = 1,
    network: str = "",
    locality: tuple[str, str, str] | None = None,
    policies: Iterable[str] = (),
    trust_domain: str = "",
    canonical: tuple[str, str] = ("", ""),
    workload_name: str = "",
) -> workload_pb2.Address:
    """A pod's Workload; `services` maps a service *name* (namespace default) or key to (port, target)s."""
    address = workload_pb2.Address()
    w = address.workload
    w.uid = uid(name, namespace)
    w.name = name
    w.namespace = namespace
    w.addresses.extend(packed(ip) for ip in ips)
    w.network = network
    w.tunnel_protocol = workload_pb2.HBONE if hbone else workload_pb2.NONE
    w.native_tunnel = native_tunnel
    w.service_account = service_account
    w.trust_domain = trust_domain
    w.node = node
    w.status = workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY
    w.capacity = capacity
    w.cluster_id = CLUSTER
    w.workload_name = workload_name or name
    w.canonical_name, w.canonical_revision = canonical
    if waypoint is not None:
        w.waypoint.CopyFrom(waypoint)
    if locality is not None:
        w.locality.region, w.locality.zone, w.locality.subzone = locality
    for svc, ports in (services or {}).items():
        key = svc if "/" in svc else service_key(svc)
        w.services[key].ports.extend(workload_pb2.Port(service_port=p, target_port=t) for p, t in ports)
    w.authorization_policies.extend(policies)
    return address


def service(
    name: str,
    *vips: str,
    namespace: str = "default",
    ports: Sequence[tuple[int, int]] = ((80, 8080),),
    waypoint: workload_pb2.GatewayAddress | None = None,
    subject_alt_names: Sequence[str] = (),
    load_balancing: workload_pb2.LoadBalancing | None = None,
    network: str = "",
) -> workload_pb2.Address:
    address = workload_pb2.Address()
    s = address.service
    s.name = name
    s.namespace = namespace
    s.hostname = hostname(name, namespace)
    for vip in vips:
        s.addresses.add(network=network, address=packed(vip))
    s.ports.extend(workload_pb2.Port(service_port=p, target_port=t) for p, t in ports)
    s.subject_alt_names.extend(subject_alt_names)
    if waypoint is not None:
        s.waypoint.CopyFrom(waypoint)
    if load_balancing is not None:
        s.load_balancing.CopyFrom(load_balancing)
    return address


def name_of(address: workload_pb2.Address) -> str:
    if address.WhichOneof("type") == "workload":
        return address.workload.uid
    return f"{address.service.namespace}/{address.service.hostname}"


def by_name(*addresses: workload_pb2.Address) -> dict[str, workload_pb2.Address]:
    return {name_of(a): a for a in addresses}


def state_with(
    *addresses: workload_pb2.Address,
    policies: Iterable[authorization_pb2.Authorization] = (),
    node: str = "node-a",
) -> ProxyState:
    state = ProxyState(node)
    rejected = state.apply_addresses(by_name(*addresses))
    assert rejected == {}, rejected
    apply_policies(state, *policies)
    return state


def apply_policies(state: ProxyState, *policies: authorization_pb2.Authorization) -> None:
    if policies:
        assert state.apply_authorizations({f"{p.namespace}/{p.name}": p for p in policies}) == {}
