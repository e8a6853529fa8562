"""What the waypoint knows of the mesh, in the shapes its pure parts take (waypoint/model.py).

The waypoint receives the same Address resources as a node proxy (ztunnel's `ProxyState` indexes them)
plus its own WaypointConfig (`waypoint.xds.WaypointView`). This module answers, without I/O:

* `resolve(ip, port)`: the CONNECT target a client's ztunnel dialled -> the Service it addressed
  (a VIP:port of a Service bound to this waypoint), or a pod bound to it (`Workload.waypoint`, for
  waypoints of type workload/all), whose requests then go to that pod only. Anything the controller
  did not bind to this waypoint is refused, so a waypoint can never be used as an open relay.
* `service_ref(namespace, name, port)`: the resolver HTTPRoute backendRefs use (any Service of the mesh,
  as a route may send traffic to a Service not bound to this waypoint).
* `endpoints(ref)`: the healthy HBONE-capable pods behind a Service, as `model.Endpoint`s with their
  SPIFFE identity and the target port (a named target port is resolved per pod, as the workload API
  carries it per endpoint).

The protocol of a Service port comes from the workload API's app_protocol, which the controller derives
from the port's appProtocol or name prefix (http, http2, grpc); anything else is TCP (L4 only).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from loom.api import workload_pb2
from waypoint.model import AppProtocol, Endpoint, ServiceRef
from waypoint.proxy.interfaces import Destination
from waypoint.xds import WaypointView
from ztunnel.state.store import ProxyState
from ztunnel.state.workload import (
    Service,
    Workload,
    service_key,
    speaks_hbone,
    workload_identity,
    workload_ips,
)

_PROTOCOLS = {
    workload_pb2.AppProtocol.HTTP11: AppProtocol.HTTP,
    workload_pb2.AppProtocol.HTTP2: AppProtocol.HTTP2,
    workload_pb2.AppProtocol.GRPC: AppProtocol.GRPC,
}


def _ref(service: Service, port: int) -> ServiceRef | None:
    for entry in service.ports:
        if entry.service_port == port:
            return ServiceRef(
                namespace=service.namespace,
                name=service.name,
                hostname=service.hostname,
                port=port,
                target_port=entry.target_port,
                protocol=_PROTOCOLS.get(entry.app_protocol, AppProtocol.TCP),
            )
    return None


class WaypointState:
    """See the module docstring. `view` is None until the first WaypointConfig: then nothing is served."""

    def __init__(self, addresses: ProxyState) -> None:
        self.addresses = addresses
        self.view: WaypointView | None = None

    def _served(self, service: Service) -> bool:
        if self.view is None:
            return False
        return any(s.namespace == service.namespace and s.name == service.name for s in self.view.services)

    def resolve(self, ip: str, port: int) -> Destination | None:
        """Where a CONNECT to `ip`:`port` leads: a Service bound to this waypoint (its VIP), or a pod
        bound to it (traffic addressed to the pod, for waypoints of type workload/all), which then
        pins the endpoint. None for anything this waypoint does not guard."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for service in self.addresses.services_at(address):
            if self._served(service):
                ref = _ref(service, port)
                return Destination(ref) if ref is not None else None
        workload = self.addresses.workload_by_ip(address)
        if workload is None or not self._bound_workload(workload):
            return None
        return Destination(self._workload_service(workload, port), self._endpoint(workload, ip, port))

    def _waypoint_vips(self) -> set[bytes]:
        if self.view is None:
            return set()
        hostname = f"{self.view.name}.{self.view.namespace}.svc."
        return {
            vip.address
            for service in self.addresses.services()
            if service.namespace == self.view.namespace and service.hostname.startswith(hostname)
            for vip in service.addresses
        }

    def _bound_workload(self, workload: Workload) -> bool:
        """Whether the controller bound this pod to this waypoint (`Workload.waypoint`)."""
        if self.view is None or not workload.HasField("waypoint"):
            return False
        gateway = workload.waypoint
        if gateway.HasField("hostname"):
            return gateway.hostname.namespace == self.view.namespace and gateway.hostname.hostname.startswith(
                f"{self.view.name}.{self.view.namespace}.svc."
            )
        return gateway.address.address in self._waypoint_vips()

    def _workload_service(self, workload: Workload, port: int) -> ServiceRef:
        """The Service of this pod whose target port is `port` (routes and policies attach to
        Services); without one, the pod itself stands in as a TCP destination."""
        for key, ports in workload.services.items():
            service = self.addresses.service(key)
            if service is None:
                continue
            for entry in service.ports:
                target = next((p.target_port for p in ports.ports if p.service_port == entry.service_port), 0)
                if (target or entry.target_port) == port:
                    ref = _ref(service, entry.service_port)
                    if ref is not None:
                        return replace(ref, target_port=port)
        name = workload.workload_name or workload.name
        return ServiceRef(workload.namespace, name, name, port, port, AppProtocol.TCP)

    @staticmethod
    def _endpoint(workload: Workload, ip: str, port: int) -> Endpoint:
        return Endpoint(
            ip=ip,
            port=port,
            identity=workload_identity(workload),
            workload=workload.workload_name or workload.name,
            namespace=workload.namespace,
            node=workload.node,
        )

    def service_ref(self, namespace: str, name: str, port: int) -> ServiceRef | None:
        for service in self.addresses.services():
            if service.namespace == namespace and service.name == name:
                return _ref(service, port)
        return None

    def endpoints(self, ref: ServiceRef) -> list[Endpoint]:
        key = next(
            (
                service_key(s)
                for s in self.addresses.services()
                if s.namespace == ref.namespace and s.name == ref.name
            ),
            None,
        )
        if key is None:
            return []
        found: list[Endpoint] = []
        for endpoint in self.addresses.endpoints(key):
            workload = endpoint.workload
            if workload.status != workload_pb2.WorkloadStatus.HEALTHY or not speaks_hbone(workload):
                continue  # the waypoint reaches backends over HBONE only; unhealthy pods get no traffic
            target = next((p.target_port for p in endpoint.ports.ports if p.service_port == ref.port), 0)
            target = target or ref.target_port
            ips = workload_ips(workload)
            if not ips or not target:
                continue
            found.append(
                Endpoint(
                    ip=str(ips[0]),
                    port=target,
                    identity=workload_identity(workload),
                    workload=workload.workload_name or workload.name,
                    namespace=workload.namespace,
                    node=workload.node,
                )
            )
        return found
