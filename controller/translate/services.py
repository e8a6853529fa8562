"""Services: the `Service` resource of the workload API, and the port lists pods carry for the
Services they back (`Workload.services`, which is how endpoints are expressed in Istio's model).

A Service is sent whether or not it has a ClusterIP yet (no addresses until one is allocated) and
whether or not it is headless (never any addresses). A pod backs a Service when the Service has a
non-empty selector that matches the pod's labels in the same namespace (an empty selector selects
nothing, as for Kubernetes endpoints).

Ports: only TCP ports are sent; UDP and SCTP traffic is not captured by the node proxy, and listing
such a port would tell it that TCP on that port is served. A numeric targetPort is sent as is (0 means
"same as port", as Kubernetes defaults it); a named targetPort is resolved per pod against the pod's
container ports, and a pod without a container port of that name does not serve that Service port
(the port is left out of that pod's list, as Kubernetes leaves the pod out of that port's endpoints).
The Service resource itself carries target_port 0 for named ports.

Application protocol, Istio's protocol selection: `appProtocol` when set, else the port name; the part
before the first "-" names the protocol, case-insensitively (`http`, `http-web` -> HTTP/1.1; `http2`,
and appProtocol `kubernetes.io/h2c` -> HTTP/2; `grpc` -> gRPC; `grpc-web` -> HTTP/1.1, on which it
rides; `tcp` and the opaque protocols `mongo`, `mysql`, `redis` -> TCP; `tls`, `https` and
`kubernetes.io/wss` -> TLS; `kubernetes.io/ws` -> HTTP/1.1); anything else is UNKNOWN.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from controller.translate.serialized import serialize
from loom.api import workload_pb2
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import LabelSelector, Pod, Service, ServicePort

_PORT_NAME_PROTOCOLS: Mapping[str, workload_pb2.AppProtocol] = {
    "http": workload_pb2.HTTP11,
    "http2": workload_pb2.HTTP2,
    "grpc": workload_pb2.GRPC,
    "tcp": workload_pb2.TCP,
    "mongo": workload_pb2.TCP,
    "mysql": workload_pb2.TCP,
    "redis": workload_pb2.TCP,
    "tls": workload_pb2.TLS,
    "https": workload_pb2.TLS,
}
_KUBERNETES_APP_PROTOCOLS: Mapping[str, workload_pb2.AppProtocol] = {
    "kubernetes.io/h2c": workload_pb2.HTTP2,
    "kubernetes.io/ws": workload_pb2.HTTP11,
    "kubernetes.io/wss": workload_pb2.TLS,
}


def app_protocol(port: ServicePort) -> workload_pb2.AppProtocol:
    """The AppProtocol of a Service port (workload_pb2 enum value)."""
    if port.app_protocol:
        special = _KUBERNETES_APP_PROTOCOLS.get(port.app_protocol.lower())
        if special is not None:
            return special
        name = port.app_protocol.lower()
    else:
        name = port.name.lower()
    if name.startswith("grpc-web"):
        return workload_pb2.HTTP11
    return _PORT_NAME_PROTOCOLS.get(name.partition("-")[0], workload_pb2.UNKNOWN)


def ip_bytes(text: str) -> bytes | None:
    """The 4- or 16-byte form of a textual IP address; None if it is not one."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return None


def _numeric_target(port: ServicePort) -> int | None:
    """The numeric target port (the service port when unset); None for a named target port."""
    target = port.target_port
    if isinstance(target, int):
        return target or port.port
    if not target:
        return port.port
    if target.isdigit():
        return int(target)
    return None


def container_ports_by_name(pod: Pod) -> dict[str, int]:
    ports: dict[str, int] = {}
    for container in pod.spec.containers:
        for port in container.ports:
            if port.name and port.protocol.upper() == "TCP":
                ports.setdefault(port.name, port.container_port)
    return ports


class PortSpec(NamedTuple):
    """One port as the workload API sends it (a `Port` message's fields, without keeping a message)."""

    service_port: int
    target_port: int  # 0 in Service.ports for a named target port
    app_protocol: workload_pb2.AppProtocol


def _serialized_port_list(ports: Iterable[PortSpec]) -> bytes:
    return serialize(
        workload_pb2.PortList(
            ports=[
                workload_pb2.Port(
                    service_port=p.service_port, target_port=p.target_port, app_protocol=p.app_protocol
                )
                for p in ports
            ]
        )
    )


@dataclass(frozen=True, slots=True, eq=False)
class ServiceInfo:
    """The pod-independent part of one Service's translation.

    It lives as long as the translation context, so it keeps no protobuf messages: port lists are kept
    serialized (a pod's Workload merges them in) and the Service's ports as plain tuples.
    """

    service: Service
    resource_name: str  # "<namespace>/<hostname>", also the key in Workload.services
    hostname: str
    selector: LabelSelector | None  # None: selects no pods
    tcp_ports: tuple[ServicePort, ...]
    ports: tuple[PortSpec, ...]  # Service.ports
    # Workload.services entry (a serialized PortList) shared by every pod when no target port is
    # named (None otherwise).
    shared_port_list: bytes | None
    vips: tuple[bytes, ...]
    diagnostics: tuple[Diagnostic, ...]
    # Per-pod port lists (serialized) by resolved target ports: pods of one Deployment share their
    # container ports.
    _port_lists: dict[tuple[int | None, ...], bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, service: Service, cluster_domain: str) -> ServiceInfo:
        hostname = f"{service.name}.{service.namespace}.svc.{cluster_domain}"
        tcp_ports = tuple(p for p in service.ports if p.protocol.upper() == "TCP")
        ports = tuple(PortSpec(p.port, _numeric_target(p) or 0, app_protocol(p)) for p in tcp_ports)
        shared = None
        if all(_numeric_target(p) is not None for p in tcp_ports):
            shared = _serialized_port_list(ports)
        vips: list[bytes] = []
        diagnostics: list[Diagnostic] = []
        if not service.headless:
            for i, vip in enumerate(service.cluster_ips):
                packed = ip_bytes(vip)
                if packed is None:
                    diagnostics.append(
                        Diagnostic(
                            Severity.WARNING,
                            f"{vip!r} is not an IP address; this address is not sent",
                            origin=service.origin,
                            key=service.key,
                            field=f"spec.clusterIPs[{i}]",
                        )
                    )
                else:
                    vips.append(packed)
        selector = LabelSelector(match_labels=service.selector) if service.selector else None
        return cls(
            service=service,
            resource_name=f"{service.namespace}/{hostname}",
            hostname=hostname,
            selector=selector,
            tcp_ports=tcp_ports,
            ports=ports,
            shared_port_list=shared,
            vips=tuple(vips),
            diagnostics=tuple(diagnostics),
        )

    def port_list_for(self, named_ports: Mapping[str, int]) -> bytes:
        """Workload.services entry (a serialized PortList) for a pod with these named container ports."""
        if self.shared_port_list is not None:
            return self.shared_port_list
        targets = tuple(
            spec.target_port or named_ports.get(str(port.target_port))
            for port, spec in zip(self.tcp_ports, self.ports, strict=True)
        )
        cached = self._port_lists.get(targets)
        if cached is not None:
            return cached
        port_list = _serialized_port_list(
            spec._replace(target_port=target)
            for spec, target in zip(self.ports, targets, strict=True)
            if target is not None  # None: this pod has no container port of that name
        )
        self._port_lists[targets] = port_list
        return port_list

    def address(self, network: str, waypoint: bytes | None) -> workload_pb2.Address:
        """The Service resource (a fresh proto, for the caller to serialize and drop); `waypoint` is a
        serialized GatewayAddress."""
        result = workload_pb2.Address()
        proto = result.service
        proto.name = self.service.name
        proto.namespace = self.service.namespace
        proto.hostname = self.hostname
        for vip in self.vips:
            proto.addresses.add(network=network, address=vip)
        for port in self.ports:
            proto.ports.add(
                service_port=port.service_port, target_port=port.target_port, app_protocol=port.app_protocol
            )
        if waypoint is not None:
            proto.waypoint.MergeFromString(waypoint)
        return result
