"""What the waypoint knows of the mesh, in the shapes its pure parts take (waypoint/model.py).

The waypoint receives the same Address resources as a node proxy (ztunnel's `ProxyState` indexes them)
plus its own WaypointConfig (`waypoint.xds.WaypointView`). This module answers, without I/O:

* `resolve(ip, port)`: the CONNECT target a client's ztunnel dialled -> the Service it addressed
  (a VIP:port of a Service bound to this waypoint). Only Services the controller says are bound to this
  waypoint are served: anything else is refused, so a waypoint can never be used as an open relay into
  Services it does not guard.
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

from loom.api import workload_pb2
from waypoint.model import AppProtocol, Endpoint, ServiceRef
from waypoint.xds import WaypointView
from ztunnel.state.store import ProxyState
from ztunnel.state.workload import Service, service_key, speaks_hbone, workload_identity, workload_ips

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

    def resolve(self, ip: str, port: int) -> ServiceRef | None:
        """The Service bound to this waypoint that owns VIP `ip`, at its port `port`; None otherwise."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for service in self.addresses.services_at(address):
            if self._served(service):
                return _ref(service, port)
        return None

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
