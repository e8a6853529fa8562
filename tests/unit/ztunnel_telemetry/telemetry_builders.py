"""Small valid workload API protos and helpers for the telemetry, connections and admin tests."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from loom.api import authorization_pb2, workload_pb2
from ztunnel.state import ProxyState

CLUSTER = "Kubernetes"
FIXED_CREATED = 1714816745.028709  # 2024-05-04T09:59:05.028709Z


def uid(name: str, namespace: str = "default") -> str:
    return f"{CLUSTER}//Pod/{namespace}/{name}"


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def hostname(name: str, namespace: str = "default") -> str:
    return f"{name}.{namespace}.svc.cluster.local"


def service_key(name: str, namespace: str = "default") -> str:
    return f"{namespace}/{hostname(name, namespace)}"


def waypoint_ref(name: str, namespace: str = "default", port: int = 15008) -> workload_pb2.GatewayAddress:
    return workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(namespace=namespace, hostname=hostname(name, namespace)),
        hbone_mtls_port=port,
    )


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
    canonical: tuple[str, str] = ("", ""),
    workload_name: str = "",
    policies: Iterable[str] = (),
) -> workload_pb2.Address:
    """A pod's Workload; `services` maps a service name (namespace default) or key to (port, target)s."""
    address = workload_pb2.Address()
    w = address.workload
    w.uid = uid(name, namespace)
    w.name = name
    w.namespace = namespace
    w.addresses.extend(packed(ip) for ip in ips)
    w.tunnel_protocol = workload_pb2.HBONE if hbone else workload_pb2.NONE
    w.native_tunnel = native_tunnel
    w.service_account = service_account
    w.node = node
    w.status = workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY
    w.cluster_id = CLUSTER
    w.workload_name = workload_name or name
    w.canonical_name, w.canonical_revision = canonical
    if waypoint is not None:
        w.waypoint.CopyFrom(waypoint)
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
) -> workload_pb2.Address:
    address = workload_pb2.Address()
    s = address.service
    s.name = name
    s.namespace = namespace
    s.hostname = hostname(name, namespace)
    for vip in vips:
        s.addresses.add(network="", address=packed(vip))
    s.ports.extend(workload_pb2.Port(service_port=p, target_port=t) for p, t in ports)
    if waypoint is not None:
        s.waypoint.CopyFrom(waypoint)
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
    assert state.apply_addresses(by_name(*addresses)) == {}
    apply_policies(state, *policies)
    return state


def apply_policies(state: ProxyState, *policies: authorization_pb2.Authorization) -> None:
    if policies:
        assert state.apply_authorizations({f"{p.namespace}/{p.name}": p for p in policies}) == {}


def deny_from_namespace(name: str, namespace: str, source_namespace: str) -> authorization_pb2.Authorization:
    """A namespace-wide DENY of every connection from `source_namespace`."""
    policy = authorization_pb2.Authorization(
        name=name, namespace=namespace, scope=authorization_pb2.NAMESPACE, action=authorization_pb2.DENY
    )
    match = policy.groups.add().rules.add().matches.add()
    match.namespaces.add(exact=source_namespace)
    return policy


def strict_mtls(namespace: str) -> authorization_pb2.Authorization:
    """What a STRICT PeerAuthentication becomes: DENY anything without a principal."""
    policy = authorization_pb2.Authorization(
        name="istio_converted_static_strict",
        namespace=namespace,
        scope=authorization_pb2.NAMESPACE,
        action=authorization_pb2.DENY,
    )
    match = policy.groups.add().rules.add().matches.add()
    match.not_principals.add(presence={})
    return policy


class RecordCollector(logging.Handler):
    """Keeps every record it sees (the test formats them itself, with a fixed time)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def collect(logger_name: str, level: int = logging.DEBUG) -> Iterator[RecordCollector]:
    """Collect the records of one logger (and its children), restoring its level afterwards."""
    target = logging.getLogger(logger_name)
    collector = RecordCollector()
    old_level = target.level
    target.addHandler(collector)
    target.setLevel(level)
    try:
        yield collector
    finally:
        target.removeHandler(collector)
        target.setLevel(old_level)


def fixed_time(record: logging.LogRecord) -> logging.LogRecord:
    record.created = FIXED_CREATED
    return record
