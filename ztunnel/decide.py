"""Where a connection goes, and whether it is admitted: the node proxy's pure decisions.

Nothing here does I/O or reads a clock; randomness comes in as an argument. The data path calls these
functions, then acts on the frozen plan they return (dial, tunnel, refuse, log). Every rule is
table-tested in tests/unit/ztunnel/.

Outbound (`outbound`), for a connection captured in a source pod towards `original_dst` (Istio's
ztunnel `build_request`, with loom's fail-closed choices):

1. A ztunnel port (15001, 15006, 15008, 15080, and the admin/metrics/readiness ports 15000, 15020,
   15021) on loopback, on the unspecified address, or on the source pod's own address: REFUSE.
   Tunnelling a connection back into ztunnel's own listeners would loop or reach its admin surface.
2. A Service VIP (the source's namespace wins when several services share the VIP):
   a. the Service has a waypoint and the source is not that waypoint: HBONE to a healthy waypoint pod
      on its HBONE port, with `:authority` = the original VIP:port, so the waypoint sees what the client
      asked for;
   b. otherwise pick an endpoint that serves the port: healthy (unless the service's health policy is
      ALLOW_ALL), on the source's network, best-ranked by the service's routing preference, then at
      random weighted by `capacity`. The service port maps to the endpoint's target port. No such
      endpoint: REFUSE ("no healthy upstream"), unless the service's load-balancing mode is
      PASSTHROUGH, which sends the connection to the original destination as is;
   c. the chosen endpoint has a waypoint of its own (the per-service-account model) and the source is
      not that waypoint: HBONE to the waypoint, `:authority` = the original VIP:port;
   d. the endpoint is in the mesh (captured, or speaks HBONE natively): HBONE to pod:15008 with
      `:authority` = pod:target port; else plain TCP to pod:target port (PASSTHROUGH).
3. A workload's address: its waypoint unless the source is that waypoint (HBONE_WAYPOINT,
   `:authority` = the address dialled), else HBONE to pod:15008 for a mesh workload, else PASSTHROUGH.
   An address listed by several workloads is refused: one of them is stale, and tunnelling to the
   wrong one would expect (or grant) the wrong identity.
4. An address the proxy has a rejected (invalid) resource for: REFUSE. Anything else is outside the
   mesh: PASSTHROUGH.

Fail closed on waypoints: a bound waypoint that does not resolve, or has no healthy pod, refuses the
connection ("waypoint <name> unavailable"). Traffic never goes around a waypoint, since that would
skip its L7 policy. "The source is that waypoint" (Istio's `check_from_waypoint`) means the source
runs as one of the waypoint's pods' identity *and* has one of that pod's addresses.

Expected peer identities: for a direct tunnel, the destination workload's identity plus the Service's
`subject_alt_names` when it was addressed through a VIP; through a waypoint, the chosen waypoint pod's
identity plus its own Service's `subject_alt_names`.

Inbound (`inbound`), for an HBONE CONNECT arriving at a local pod's :15008: the `:authority` must be
ip:port with a port in 1..65535 (else 400), the IP one of the pod's own addresses (else 400
"hbone_ip_mismatch"), the port not a ztunnel port (else 400); then L4 authorization with the peer's
mTLS identity (deny: 401); then 200 with the application address. `inbound_plaintext` does the same
for plaintext captured on :15006, with no identity, so a STRICT PeerAuthentication (a DENY of
anything without a principal) refuses it. An unknown local workload answers 503: the proxy cannot
decide yet.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from loom.api import workload_pb2
from loom.hbone.headers import format_address
from loom.identity import Identity, IdentityError
from loom.policy.rbac import Connection, Decision
from ztunnel.state import (
    HBONE_PORT,
    IPAddress,
    ProxyState,
    Service,
    WaypointBackends,
    WaypointUnavailable,
    Workload,
    packed_ip,
    same_family_ip,
    service_key,
    speaks_hbone,
    workload_identity,
)

# Ports ztunnel listens on inside a pod (Istio's illegal_ports), and its admin, metrics and readiness
# ports. Nothing may be tunnelled to them: on the way out that would loop back into ztunnel, on the
# way in it would let a remote peer reach ztunnel's own surfaces.
INPOD_PORTS = frozenset({15001, 15006, 15008, 15080})
ADMIN_PORTS = frozenset({15000, 15020, 15021})
ZTUNNEL_PORTS = INPOD_PORTS | ADMIN_PORTS
MAX_PORT = 65535
# Longest `:authority` we parse: "[" + 45-char IPv6 text + "]:" + 5 digits, with slack.
MAX_AUTHORITY_LENGTH = 64

Address = tuple[IPAddress, int]


class OutboundKind(StrEnum):
    HBONE_DIRECT = "hbone_direct"  # HBONE to the destination pod's :15008
    HBONE_WAYPOINT = "hbone_waypoint"  # HBONE to a waypoint pod, authority = the original destination
    PASSTHROUGH = "passthrough"  # plain TCP: the destination is outside the mesh
    REFUSE = "refuse"  # close the connection; `reason` says why


@dataclass(frozen=True, slots=True)
class OutboundPlan:
    """What to do with one outbound connection."""

    kind: OutboundKind
    # The destination as the application dialled it (SO_ORIGINAL_DST), for logs.
    original_destination: Address
    # Where to connect: the HBONE peer (pod or waypoint IP, HBONE port), or for PASSTHROUGH the
    # address to dial in plain TCP (the original destination, or the selected endpoint's
    # pod:target port when a service was addressed). None for REFUSE.
    next_hop: Address | None = None
    # The HBONE `:authority` ("ip:port"): direct, the selected pod's address and target port; via a
    # waypoint, the original destination as dialled. Empty when there is no tunnel.
    authority: str = ""
    # Identities the HBONE peer's certificate may carry (its URI SAN must be one of them). Empty when
    # there is no tunnel.
    expected_identities: tuple[Identity, ...] = ()
    # The destination workload (the selected endpoint or the addressed pod), for telemetry.
    destination_workload: Workload | None = None
    # The Service addressed by VIP, for telemetry (destination_service labels).
    destination_service: Service | None = None
    # The waypoint pod the connection goes through (HBONE_WAYPOINT only).
    waypoint: Workload | None = None
    # Why the connection is refused (REFUSE only).
    reason: str = ""


class InboundReason(StrEnum):
    """Short, bounded reasons (access log `reason`, metric labels)."""

    ALLOWED = "allowed"
    INVALID_AUTHORITY = "invalid_authority"
    HBONE_IP_MISMATCH = "hbone_ip_mismatch"
    ZTUNNEL_PORT = "ztunnel_port"
    NO_IDENTITY = "no_identity"
    POLICY_DENIED = "policy_denied"
    UNKNOWN_WORKLOAD = "unknown_workload"


@dataclass(frozen=True, slots=True)
class InboundPlan:
    """Whether to admit one inbound connection, and where it goes."""

    # HBONE response status: 200 admitted; 400 malformed or misdirected request; 401 refused by
    # policy; 503 the destination workload is not known (yet).
    status: int
    reason: InboundReason
    # Human-readable explanation for the access log ("" when admitted with nothing to add).
    detail: str = ""
    # Where to deliver the stream: the local pod's ip:port (200 only).
    app_address: Address | None = None
    # The L4 authorization decision, when policy was evaluated.
    decision: Decision | None = None
    # The port the connection arrived on (15008 for HBONE, 15006 for plaintext), for the access log.
    listener_port: int = 0

    @property
    def admitted(self) -> bool:
        return self.status == 200


# ---------------------------------------------------------------------------------------------------
# outbound


def _ip(value: IPAddress | str) -> IPAddress:
    """An address with IPv4-mapped IPv6 folded to IPv4 (lookups and comparisons use that form)."""
    return ipaddress.ip_address(packed_ip(value))


def _refuse(original: Address, reason: str) -> OutboundPlan:
    return OutboundPlan(OutboundKind.REFUSE, original, reason=reason)


def _is_own_address(source: Workload, ip: IPAddress) -> bool:
    packed = ip.packed
    return any(packed_ip(raw) == packed for raw in source.addresses)


def _identities(first: Identity, subject_alt_names: Iterable[str]) -> tuple[Identity, ...]:
    """`first` plus every SAN that is a well-formed SPIFFE ID (others could never match a peer)."""
    result = [first]
    for san in subject_alt_names:
        try:
            identity = Identity.parse(san)
        except IdentityError:
            continue
        if identity not in result:
            result.append(identity)
    return tuple(result)


def _weighted_choice(rng: random.Random, workloads: Sequence[Workload]) -> int:
    """Index of a workload picked at random weighted by capacity (0, the proto default, counts as 1)."""
    if len(workloads) == 1:
        return 0
    weights = [w.capacity or 1 for w in workloads]
    return rng.choices(range(len(workloads)), weights=weights)[0]


def is_from_waypoint(source: Workload, backends: WaypointBackends) -> bool:
    """The source is one of the waypoint's pods: same identity and one of that pod's addresses."""
    source_identity = workload_identity(source)
    source_ips = {packed_ip(raw) for raw in source.addresses}
    for pod in backends.workloads:
        if workload_identity(pod) == source_identity and any(
            packed_ip(raw) in source_ips for raw in pod.addresses
        ):
            return True
    return False


def _via_waypoint(
    original: Address,
    source: Workload,
    backends: WaypointBackends,
    rng: random.Random,
    *,
    destination_workload: Workload | None,
    destination_service: Service | None,
) -> OutboundPlan:
    network = source.network
    candidates: list[tuple[Workload, IPAddress]] = []
    for pod in backends.workloads:
        if pod.status != workload_pb2.HEALTHY or pod.network != network:
            continue
        ip = same_family_ip(pod, original[0])
        if ip is not None:
            candidates.append((pod, ip))
    if not candidates:
        return _refuse(original, f"waypoint {backends.name} unavailable: no healthy endpoint")
    pod, ip = candidates[_weighted_choice(rng, [c[0] for c in candidates])]
    sans = backends.service.subject_alt_names if backends.service is not None else ()
    return OutboundPlan(
        OutboundKind.HBONE_WAYPOINT,
        original,
        next_hop=(ip, backends.port),
        authority=format_address(*original),
        expected_identities=_identities(workload_identity(pod), sans),
        destination_workload=destination_workload,
        destination_service=destination_service,
        waypoint=pod,
    )


def _waypoint_plan(
    state: ProxyState,
    original: Address,
    source: Workload,
    gateway: workload_pb2.GatewayAddress,
    rng: random.Random,
    *,
    destination_workload: Workload | None,
    destination_service: Service | None,
) -> OutboundPlan | None:
    """The plan through the waypoint `gateway`; None when the source is that waypoint (go direct)."""
    try:
        backends = state.resolve_waypoint(gateway, source.network)
    except WaypointUnavailable as e:
        return _refuse(original, str(e))
    if is_from_waypoint(source, backends):
        return None
    return _via_waypoint(
        original,
        source,
        backends,
        rng,
        destination_workload=destination_workload,
        destination_service=destination_service,
    )


def _target_port(ports: workload_pb2.PortList, service_port: workload_pb2.Port) -> int | None:
    """The port a workload serves `service_port` on; None when it does not serve it.

    The workload's own entry wins (it has named container ports resolved); without one, the service's
    numeric target port applies; a service port whose target is a name this pod does not have is
    simply absent from the pod's entry, and the pod is skipped."""
    for port in ports.ports:
        if port.service_port == service_port.service_port:
            return port.target_port or service_port.target_port or service_port.service_port
    return service_port.target_port or None


def _locality_rank(source: Workload, endpoint: Workload, preferences: Sequence[int]) -> int:
    """How many of the routing-preference scopes match, in order, until the first that does not."""
    rank = 0
    for scope in preferences:
        if scope == workload_pb2.LoadBalancing.REGION:
            same = source.locality.region == endpoint.locality.region
        elif scope == workload_pb2.LoadBalancing.ZONE:
            same = source.locality.zone == endpoint.locality.zone
        elif scope == workload_pb2.LoadBalancing.SUBZONE:
            same = source.locality.subzone == endpoint.locality.subzone
        elif scope == workload_pb2.LoadBalancing.NODE:
            same = source.node == endpoint.node
        elif scope == workload_pb2.LoadBalancing.CLUSTER:
            same = source.cluster_id == endpoint.cluster_id
        elif scope == workload_pb2.LoadBalancing.NETWORK:
            same = source.network == endpoint.network
        else:
            same = True  # UNSPECIFIED_SCOPE carries no preference
        if not same:
            break
        rank += 1
    return rank


def _to_service(
    state: ProxyState, original: Address, source: Workload, service: Service, rng: random.Random
) -> OutboundPlan:
    ip, port = original
    key = service_key(service)
    if service.HasField("waypoint"):
        plan = _waypoint_plan(
            state,
            original,
            source,
            service.waypoint,
            rng,
            destination_workload=None,
            destination_service=service,
        )
        if plan is not None:
            return plan

    service_port = next((p for p in service.ports if p.service_port == port), None)
    if service_port is None:
        return _refuse(original, f"service {key} has no port {port}")
    lb = service.load_balancing
    allow_unhealthy = lb.health_policy == workload_pb2.LoadBalancing.ALLOW_ALL
    endpoints = state.endpoints(key)
    candidates: list[tuple[Workload, IPAddress, int]] = []
    for endpoint in endpoints:
        workload = endpoint.workload
        if workload.network != source.network:
            continue  # another network needs an east-west gateway, which loom does not provide
        if workload.status != workload_pb2.HEALTHY and not allow_unhealthy:
            continue
        target = _target_port(endpoint.ports, service_port)
        endpoint_ip = same_family_ip(workload, ip)
        if target is None or endpoint_ip is None:
            continue
        candidates.append((workload, endpoint_ip, target))
    if not candidates:
        if lb.mode == workload_pb2.LoadBalancing.PASSTHROUGH:
            return OutboundPlan(
                OutboundKind.PASSTHROUGH, original, next_hop=original, destination_service=service
            )
        if endpoints:
            return _refuse(original, f"no healthy upstream for service {key} port {port}")
        return _refuse(original, f"no healthy upstream: service {key} has no endpoints")

    preferences = list(lb.routing_preference)
    if preferences:
        ranks = [_locality_rank(source, c[0], preferences) for c in candidates]
        if lb.mode == workload_pb2.LoadBalancing.STRICT:
            wanted = len(preferences)
            candidates = [c for c, r in zip(candidates, ranks, strict=True) if r == wanted]
            if not candidates:
                return _refuse(
                    original, f"no healthy upstream for service {key} port {port} in the required locality"
                )
        else:
            best = max(ranks)
            candidates = [c for c, r in zip(candidates, ranks, strict=True) if r == best]
    workload, endpoint_ip, target = candidates[_weighted_choice(rng, [c[0] for c in candidates])]
    return _to_endpoint(state, original, source, workload, (endpoint_ip, target), service, rng)


def _to_endpoint(
    state: ProxyState,
    original: Address,
    source: Workload,
    workload: Workload,
    endpoint: Address,
    service: Service | None,
    rng: random.Random,
) -> OutboundPlan:
    """The plan once the destination workload is known: through its waypoint (unless the source is
    that waypoint), else HBONE to it, else plain TCP. `endpoint` is its ip and target port; `service`
    is set when the client dialled a service VIP (its SANs are then accepted too)."""
    ip, port = endpoint
    if workload.HasField("waypoint"):
        plan = _waypoint_plan(
            state,
            original,
            source,
            workload.waypoint,
            rng,
            destination_workload=workload,
            destination_service=service,
        )
        if plan is not None:
            return plan
    if speaks_hbone(workload):
        sans = service.subject_alt_names if service is not None else ()
        return OutboundPlan(
            OutboundKind.HBONE_DIRECT,
            original,
            next_hop=(ip, HBONE_PORT),
            authority=format_address(ip, port),
            expected_identities=_identities(workload_identity(workload), sans),
            destination_workload=workload,
            destination_service=service,
        )
    return OutboundPlan(
        OutboundKind.PASSTHROUGH,
        original,
        next_hop=endpoint,
        destination_workload=workload,
        destination_service=service,
    )


def outbound(
    state: ProxyState, source: Workload, original_dst: tuple[IPAddress | str, int], rng: random.Random
) -> OutboundPlan:
    """Decide where a connection from `source` to `original_dst` goes (see the module docstring)."""
    ip, port = _ip(original_dst[0]), original_dst[1]
    original: Address = (ip, port)
    if not 0 < port <= MAX_PORT:
        return _refuse(original, f"destination port {port} is not in 1..{MAX_PORT}")
    if port in ZTUNNEL_PORTS and (ip.is_loopback or ip.is_unspecified or _is_own_address(source, ip)):
        return _refuse(original, f"self call: {format_address(ip, port)} is a ztunnel port")
    network = source.network
    service = state.service_by_vip(ip, network, prefer_namespace=source.namespace)
    if service is not None:
        return _to_service(state, original, source, service, rng)
    found = state.workloads_at(ip, network)
    if len(found) > 1:
        uids = ", ".join(sorted(w.uid for w in found))
        return _refuse(original, f"address {ip} is claimed by several workloads ({uids})")
    if found:
        return _to_endpoint(state, original, source, found[0], original, None, rng)
    broken = state.broken_at(ip, network)
    if broken is not None:
        return _refuse(original, f"destination {ip} has invalid configuration: {broken.error}")
    return OutboundPlan(OutboundKind.PASSTHROUGH, original, next_hop=original)


# ---------------------------------------------------------------------------------------------------
# inbound


class AuthorityError(ValueError):
    """An HBONE `:authority` that is not a literal ip:port."""


def parse_authority(authority: str) -> Address:
    """Parse an HBONE `:authority`: "a.b.c.d:port" or "[v6]:port", port in 1..65535, nothing else
    (no hostname, no IPv6 zone, no userinfo). Raises AuthorityError naming what is wrong."""
    if not authority:
        raise AuthorityError("empty authority")
    if len(authority) > MAX_AUTHORITY_LENGTH:
        raise AuthorityError(f"authority of {len(authority)} characters is too long")
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise AuthorityError(f"{authority!r}: expected [ipv6]:port")
        port_text = rest[1:]
        if "%" in host:
            raise AuthorityError(f"{authority!r}: an IPv6 zone is not allowed")
        try:
            ip: IPAddress = ipaddress.IPv6Address(host)
        except ValueError as e:
            raise AuthorityError(f"{authority!r}: {host!r} is not an IPv6 address") from e
    else:
        host, colon, port_text = authority.rpartition(":")
        if not colon or not host:
            raise AuthorityError(f"{authority!r}: expected ip:port")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError as e:
            raise AuthorityError(
                f"{authority!r}: {host!r} is not an IPv4 address (IPv6 needs brackets)"
            ) from e
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise AuthorityError(f"{authority!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 < port <= MAX_PORT:
        raise AuthorityError(f"{authority!r}: port {port} is not in 1..{MAX_PORT}")
    return _ip(ip), port


def _admit(
    state: ProxyState,
    local_workload: Workload,
    identity: Identity | None,
    src_ip: IPAddress | str,
    destination: Address,
    listener_port: int,
) -> InboundPlan:
    ip, port = destination
    if port in ZTUNNEL_PORTS:
        return InboundPlan(
            400,
            InboundReason.ZTUNNEL_PORT,
            f"target port {port} is a ztunnel port",
            listener_port=listener_port,
        )
    decision = state.authorize(local_workload, Connection(identity, _ip(src_ip), ip, port))
    if not decision.allowed:
        return InboundPlan(
            401, InboundReason.POLICY_DENIED, str(decision), decision=decision, listener_port=listener_port
        )
    return InboundPlan(
        200,
        InboundReason.ALLOWED,
        str(decision),
        app_address=destination,
        decision=decision,
        listener_port=listener_port,
    )


def _unknown(listener_port: int) -> InboundPlan:
    return InboundPlan(
        503,
        InboundReason.UNKNOWN_WORKLOAD,
        "the destination workload is not known to this proxy yet",
        listener_port=listener_port,
    )


def _mismatch(local_workload: Workload, ip: IPAddress, listener_port: int) -> InboundPlan:
    return InboundPlan(
        400,
        InboundReason.HBONE_IP_MISMATCH,
        f"{ip} is not an address of {local_workload.namespace}/{local_workload.name}",
        listener_port=listener_port,
    )


def inbound(
    state: ProxyState,
    local_workload: Workload | None,
    authority: str,
    peer_identity: Identity | None,
    src_ip: IPAddress | str,
    conn_port: int = HBONE_PORT,
) -> InboundPlan:
    """Admit (or not) an HBONE CONNECT to `local_workload` (see the module docstring).

    `peer_identity` is the identity from the client certificate; `src_ip` the client's address;
    `conn_port` the port the connection arrived on."""
    if local_workload is None:
        return _unknown(conn_port)
    try:
        ip, port = parse_authority(authority)
    except AuthorityError as e:
        return InboundPlan(400, InboundReason.INVALID_AUTHORITY, str(e), listener_port=conn_port)
    if not _is_own_address(local_workload, ip):
        return _mismatch(local_workload, ip, conn_port)
    if peer_identity is None:
        # HBONE requires a client certificate; a tunnel without one is never admitted.
        return InboundPlan(
            401, InboundReason.NO_IDENTITY, "the peer presented no identity", listener_port=conn_port
        )
    return _admit(state, local_workload, peer_identity, src_ip, (ip, port), conn_port)


def inbound_plaintext(
    state: ProxyState,
    local_workload: Workload | None,
    src_ip: IPAddress | str,
    dst_ip: IPAddress | str,
    dst_port: int,
    conn_port: int = 15006,
) -> InboundPlan:
    """Admit (or not) a plaintext connection captured on :15006, authorized with no identity."""
    if local_workload is None:
        return _unknown(conn_port)
    ip = _ip(dst_ip)
    if not 0 < dst_port <= MAX_PORT:
        return InboundPlan(
            400,
            InboundReason.INVALID_AUTHORITY,
            f"port {dst_port} is not in 1..{MAX_PORT}",
            listener_port=conn_port,
        )
    if not _is_own_address(local_workload, ip):
        return _mismatch(local_workload, ip, conn_port)
    return _admit(state, local_workload, None, src_ip, (ip, dst_port), conn_port)
