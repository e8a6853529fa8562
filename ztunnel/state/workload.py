"""Reading the workload API protos: addresses, identities, ports, and validation of what arrives.

The proxy keeps the `istio.workload` protos it receives as they are (upb messages are compact C
structures, far leaner than a parallel set of Python objects at 10k workloads) and treats them as
read-only. This module holds the small pure helpers every reader needs, and `validate_address`, which
decides whether a received resource is usable at all.

Addresses are compared in packed form (`bytes` of 4 or 16), with IPv4-mapped IPv6 (``::ffff:a.b.c.d``,
what a dual-stack socket reports for an IPv4 peer) folded to the 4-byte IPv4 form, so a lookup or a
policy check cannot be sidestepped by the mapping.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from loom.api import workload_pb2
from loom.hbone.headers import IPAddress as IPAddress  # re-exported to ztunnel
from loom.identity import DEFAULT_TRUST_DOMAIN, Identity

Workload = workload_pb2.Workload
Service = workload_pb2.Service

MAX_PORT = 65535
# Kubernetes' default service account: the workload API elides it (Workload.service_account == "").
DEFAULT_SERVICE_ACCOUNT = "default"
# Istio's default HBONE port; GatewayAddress.hbone_mtls_port 0 means this.
HBONE_PORT = 15008

_KNOWN_TUNNEL_PROTOCOLS = frozenset(workload_pb2.TunnelProtocol.values())
_KNOWN_STATUSES = frozenset(workload_pb2.WorkloadStatus.values())
_KNOWN_LB_MODES = frozenset(workload_pb2.LoadBalancing.Mode.values())
_KNOWN_HEALTH_POLICIES = frozenset(workload_pb2.LoadBalancing.HealthPolicy.values())
_KNOWN_SCOPES = frozenset(workload_pb2.LoadBalancing.Scope.values())


class AddressError(ValueError):
    """A received Address resource this proxy cannot use; `path` names the offending field."""

    def __init__(self, name: str, path: str, reason: str) -> None:
        self.name = name
        self.path = path
        self.reason = reason
        super().__init__(f"address {name}: {path}: {reason}" if path else f"address {name}: {reason}")


def packed_ip(ip: IPAddress | str | bytes) -> bytes:
    """The lookup key of an address: 4 or 16 bytes, IPv4-mapped IPv6 folded to IPv4.

    Raises ValueError for anything that is not an IP address."""
    if isinstance(ip, bytes):
        if len(ip) not in (4, 16):
            raise ValueError(f"an address must be 4 or 16 bytes, got {len(ip)}")
        if len(ip) == 16 and ip[:12] == b"\x00" * 10 + b"\xff\xff":
            return ip[12:]
        return ip
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.packed
    return address.packed


def ip_from_packed(raw: bytes) -> IPAddress:
    return ipaddress.ip_address(packed_ip(raw))


def workload_ips(workload: Workload) -> tuple[IPAddress, ...]:
    return tuple(ip_from_packed(raw) for raw in workload.addresses)


def workload_identity(workload: Workload) -> Identity:
    """The SPIFFE identity a workload runs as (the proto elides the defaults)."""
    return Identity(
        workload.trust_domain or DEFAULT_TRUST_DOMAIN,
        workload.namespace,
        workload.service_account or DEFAULT_SERVICE_ACCOUNT,
    )


def speaks_hbone(workload: Workload) -> bool:
    """Reachable over HBONE: captured by a node proxy, or terminating HBONE itself (a waypoint)."""
    return workload.tunnel_protocol == workload_pb2.HBONE or workload.native_tunnel


def service_key(service: Service) -> str:
    """The resource name of a Service: "<namespace>/<hostname>"."""
    return f"{service.namespace}/{service.hostname}"


def same_family_ip(workload: Workload, like: IPAddress) -> IPAddress | None:
    """The workload's first address of the same IP family as `like`, else its first address."""
    ips = workload_ips(workload)
    for ip in ips:
        if ip.version == like.version:
            return ip
    return ips[0] if ips else None


# ---------------------------------------------------------------------------------------------------
# validation


def _check_packed(name: str, path: str, raw: bytes) -> None:
    if len(raw) not in (4, 16):
        raise AddressError(name, path, f"an IP address must be 4 or 16 bytes, got {len(raw)}")


def _check_port(name: str, path: str, port: int, *, allow_zero: bool) -> None:
    if port > MAX_PORT or (port == 0 and not allow_zero):
        raise AddressError(name, path, f"port {port} is not in 1..{MAX_PORT}")


def _check_gateway(name: str, path: str, gateway: workload_pb2.GatewayAddress) -> None:
    kind = gateway.WhichOneof("destination")
    if kind == "hostname":
        if not gateway.hostname.hostname or not gateway.hostname.namespace:
            raise AddressError(name, f"{path}.hostname", "a waypoint hostname needs a namespace and a name")
    elif kind == "address":
        _check_packed(name, f"{path}.address.address", gateway.address.address)
    else:
        raise AddressError(name, path, "a gateway address must set a hostname or an address")
    _check_port(name, f"{path}.hbone_mtls_port", gateway.hbone_mtls_port, allow_zero=True)


def _check_identity_part(name: str, path: str, value: str, *, required: bool) -> None:
    if required and not value:
        raise AddressError(name, path, "is empty")
    if "/" in value:
        raise AddressError(name, path, f"{value!r} cannot be part of a SPIFFE ID (contains '/')")


def _check_workload(name: str, workload: Workload) -> None:
    if workload.uid != name:
        raise AddressError(name, "workload.uid", f"{workload.uid!r} differs from the resource name")
    _check_identity_part(name, "workload.namespace", workload.namespace, required=True)
    _check_identity_part(name, "workload.service_account", workload.service_account, required=False)
    _check_identity_part(name, "workload.trust_domain", workload.trust_domain, required=False)
    for i, raw in enumerate(workload.addresses):
        _check_packed(name, f"workload.addresses[{i}]", raw)
    if workload.tunnel_protocol not in _KNOWN_TUNNEL_PROTOCOLS:
        # A newer controller may ask for a tunnel this proxy cannot speak; guessing could send plaintext.
        raise AddressError(name, "workload.tunnel_protocol", f"unknown value {workload.tunnel_protocol}")
    if workload.status not in _KNOWN_STATUSES:
        raise AddressError(name, "workload.status", f"unknown value {workload.status}")
    if workload.HasField("waypoint"):
        _check_gateway(name, "workload.waypoint", workload.waypoint)
    for key, port_list in workload.services.items():
        namespace, slash, hostname = key.partition("/")
        if not slash or not namespace or not hostname:
            raise AddressError(name, f"workload.services[{key}]", "expected a key <namespace>/<hostname>")
        for i, port in enumerate(port_list.ports):
            here = f"workload.services[{key}].ports[{i}]"
            _check_port(name, f"{here}.service_port", port.service_port, allow_zero=False)
            _check_port(name, f"{here}.target_port", port.target_port, allow_zero=True)


def _check_service(name: str, service: Service) -> None:
    if service_key(service) != name:
        raise AddressError(
            name, "service", f"namespace/hostname {service_key(service)!r} differs from the resource name"
        )
    if not service.namespace or not service.hostname:
        raise AddressError(name, "service", "a service needs a namespace and a hostname")
    for i, address in enumerate(service.addresses):
        _check_packed(name, f"service.addresses[{i}].address", address.address)
    for i, port in enumerate(service.ports):
        _check_port(name, f"service.ports[{i}].service_port", port.service_port, allow_zero=False)
        _check_port(name, f"service.ports[{i}].target_port", port.target_port, allow_zero=True)
    if service.HasField("waypoint"):
        _check_gateway(name, "service.waypoint", service.waypoint)
    lb = service.load_balancing
    if lb.mode not in _KNOWN_LB_MODES:
        raise AddressError(name, "service.load_balancing.mode", f"unknown value {lb.mode}")
    if lb.health_policy not in _KNOWN_HEALTH_POLICIES:
        raise AddressError(name, "service.load_balancing.health_policy", f"unknown value {lb.health_policy}")
    for i, scope in enumerate(lb.routing_preference):
        if scope not in _KNOWN_SCOPES:
            raise AddressError(name, f"service.load_balancing.routing_preference[{i}]", f"unknown {scope}")


def validate_address(name: str, address: workload_pb2.Address) -> None:
    """Raise AddressError unless `address` is a Workload or Service this proxy can act on exactly.

    Unknown *fields* are accepted (they are additions a newer controller may send and that this proxy
    does not need); unknown *enum values* on fields that steer traffic are not, since acting on a
    guess could route around a waypoint or send plaintext."""
    kind = address.WhichOneof("type")
    if kind == "workload":
        _check_workload(name, address.workload)
    elif kind == "service":
        _check_service(name, address.service)
    else:
        raise AddressError(name, "", "sets neither a workload nor a service")


def salvage_addresses(address: workload_pb2.Address) -> tuple[tuple[str, bytes], ...]:
    """The well-formed (network, address) pairs of a resource that failed validation, so that traffic
    to them can be refused rather than sent around the mesh in plaintext."""
    kind = address.WhichOneof("type")
    pairs: Iterable[tuple[str, bytes]]
    if kind == "workload":
        network = address.workload.network
        pairs = ((network, raw) for raw in address.workload.addresses)
    elif kind == "service":
        pairs = ((a.network, a.address) for a in address.service.addresses)
    else:
        return ()
    return tuple((network, packed_ip(raw)) for network, raw in pairs if len(raw) in (4, 16))
