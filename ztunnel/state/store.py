"""`ProxyState`: the node proxy's view of the workload API, written by xDS, read by the data path.

Theory of operation
-------------------
The xDS client hands over one response at a time (`apply_addresses`, `apply_authorizations`). Each
call applies every resource of the response, updates the indexes, and only then notifies the
watchers once with a `StateChange` naming what moved. Readers run on the same event loop, so a
reader never sees half a response: the change is atomic per xDS response, as in ztunnel.

Indexes (all plain dicts, so every lookup on the data path is O(1) and does no I/O):

* workloads by uid (the resource name) and by (network, address); an address normally maps to one
  workload, and `workloads_at` returns all of them so a caller can refuse an ambiguous destination
  (a reused pod IP whose previous owner is still listed must never be granted the old identity);
* services by "<namespace>/<hostname>" and by (network, VIP);
* endpoints: service key -> the uids of the workloads whose `services` map lists it (healthy or not;
  the caller filters), kept up to date as workloads come and go, even before the service arrives;
* this node's workloads (`Workload.node` == the node name): what the identity manager prefetches;
* L4 policies in a `PolicyEvaluator`.

Bad resources (fail closed, hardening checklist item 20): a resource that does not validate is
rejected by name (the xDS client NACKs it). If a previous good version exists it stays in force, which
is xDS's "last good configuration" rule; if not, its well-formed addresses are recorded as *broken* so
that the outbound decision refuses traffic to them instead of treating them as out-of-mesh
destinations and sending plaintext. An Authorization that does not compile is kept as a BrokenPolicy
(the workloads it applies to deny). An Authorization whose bytes cannot even be decoded has unknown
scope, so it is treated as applying everywhere: every connection to every local workload is denied
until a decodable version replaces it or it is removed.

Memory: the protos are kept as received (upb messages), never copied into parallel Python objects;
the indexes hold only keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from loom.api import authorization_pb2, workload_pb2
from loom.policy.rbac import Connection, Decision, DecisionReason, PolicyEvaluator
from ztunnel.state.workload import (
    HBONE_PORT,
    AddressError,
    IPAddress,
    Service,
    Workload,
    ip_from_packed,
    packed_ip,
    salvage_addresses,
    service_key,
    validate_address,
)

logger = logging.getLogger("ztunnel.state")

_IpKey = tuple[str, bytes]  # (network, packed address)


@dataclass(frozen=True, slots=True)
class StateChange:
    """What one applied xDS response changed (added, updated or removed), by resource name."""

    workloads: frozenset[str] = frozenset()  # uids
    services: frozenset[str] = frozenset()  # "<namespace>/<hostname>"
    policies: frozenset[str] = frozenset()  # "<namespace>/<name>"
    # uids of this node's workloads among `workloads` (local before or after the change).
    local_workloads: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.workloads or self.services or self.policies)


@dataclass(frozen=True, slots=True)
class BrokenAddress:
    """An Address resource that was rejected and had no previous good version."""

    name: str
    error: str
    addresses: tuple[_IpKey, ...]  # its well-formed (network, address) pairs; traffic to them is refused


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload behind a service, with the ports it serves for that service."""

    workload: Workload
    ports: workload_pb2.PortList  # the workload's `services` entry for the service


class WaypointUnavailable(LookupError):
    """A waypoint reference that does not resolve to anything this proxy knows."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"waypoint {name} unavailable: {reason}")


@dataclass(frozen=True, slots=True)
class WaypointBackends:
    """What a waypoint reference (GatewayAddress) resolves to."""

    name: str  # for messages: "<namespace>/<hostname>" or the address
    service: Service | None  # the waypoint's Service, when referenced by hostname or VIP
    workloads: tuple[Workload, ...]  # its pods, healthy or not
    port: int  # the HBONE port to dial on them


Watcher = Callable[[StateChange], None]


class ProxyState:
    """The workload API as this node proxy knows it. Not thread-safe: one event loop owns it."""

    def __init__(self, node_name: str = "", *, evaluator: PolicyEvaluator | None = None) -> None:
        self._node_name = node_name
        self._workloads: dict[str, Workload] = {}
        self._workload_ips: dict[_IpKey, list[str]] = {}
        self._services: dict[str, Service] = {}
        self._service_vips: dict[_IpKey, list[str]] = {}
        self._endpoints: dict[str, dict[str, None]] = {}  # service key -> ordered set of uids
        self._local: dict[str, None] = {}
        self._broken: dict[str, BrokenAddress] = {}
        self._broken_ips: dict[_IpKey, list[str]] = {}
        self._rejected_addresses: dict[str, str] = {}
        self._evaluator = evaluator if evaluator is not None else PolicyEvaluator()
        self._rejected_policies: dict[str, str] = {}
        self._undecodable_policies: dict[str, str] = {}
        # The Authorization resources as received, for the admin config dump (policies are few).
        self._authorizations: dict[str, authorization_pb2.Authorization] = {}
        self._watchers: list[Watcher] = []
        self._generation = 0

    # ------------------------------------------------------------------ reads: workloads

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def generation(self) -> int:
        """Incremented by every applied response that changed something."""
        return self._generation

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workloads(self) -> Iterable[Workload]:
        return self._workloads.values()

    def workloads_at(self, ip: IPAddress | str | bytes, network: str = "") -> tuple[Workload, ...]:
        """Every workload listing this address (normally one; several means stale data)."""
        uids = self._workload_ips.get((network, packed_ip(ip)))
        if not uids:
            return ()
        return tuple(self._workloads[uid] for uid in uids)

    def workload_by_ip(self, ip: IPAddress | str | bytes, network: str = "") -> Workload | None:
        """The workload at this address; None when there is none or the address is ambiguous."""
        found = self.workloads_at(ip, network)
        return found[0] if len(found) == 1 else None

    def local_workloads(self) -> tuple[Workload, ...]:
        """This node's workloads (Workload.node == the node name)."""
        return tuple(self._workloads[uid] for uid in self._local)

    def is_local(self, workload: Workload) -> bool:
        return bool(self._node_name) and workload.node == self._node_name

    # ------------------------------------------------------------------ reads: services

    def service(self, key: str) -> Service | None:
        return self._services.get(key)

    def services(self) -> Iterable[Service]:
        return self._services.values()

    def services_at(self, ip: IPAddress | str | bytes, network: str = "") -> tuple[Service, ...]:
        keys = self._service_vips.get((network, packed_ip(ip)))
        if not keys:
            return ()
        return tuple(self._services[key] for key in keys)

    def service_by_vip(
        self, ip: IPAddress | str | bytes, network: str = "", prefer_namespace: str = ""
    ) -> Service | None:
        """The service with this VIP; when several share it, the one in `prefer_namespace` (Istio's
        rule: a client's own namespace wins), else the one with the smallest key."""
        found = self.services_at(ip, network)
        if not found:
            return None
        for service in found:
            if service.namespace == prefer_namespace:
                return service
        return min(found, key=service_key)

    def endpoints(self, key: str) -> tuple[Endpoint, ...]:
        """The workloads behind service `key` (healthy or not), in arrival order."""
        uids = self._endpoints.get(key)
        if not uids:
            return ()
        result = []
        for uid in uids:
            workload = self._workloads[uid]
            result.append(Endpoint(workload, workload.services[key]))
        return tuple(result)

    def resolve_waypoint(self, gateway: workload_pb2.GatewayAddress, network: str = "") -> WaypointBackends:
        """The pods of the waypoint `gateway` names. Raises WaypointUnavailable when it names nothing
        known (the caller must then refuse the connection, never route around the waypoint)."""
        port = gateway.hbone_mtls_port or HBONE_PORT
        kind = gateway.WhichOneof("destination")
        if kind == "hostname":
            key = f"{gateway.hostname.namespace}/{gateway.hostname.hostname}"
            service = self._services.get(key)
            if service is None:
                raise WaypointUnavailable(key, "no such service")
            return WaypointBackends(key, service, tuple(e.workload for e in self.endpoints(key)), port)
        if kind == "address":
            raw = gateway.address.address
            if len(raw) not in (4, 16):
                raise WaypointUnavailable(raw.hex() or "(empty)", "malformed address")
            lookup_network = gateway.address.network or network
            service = self.service_by_vip(raw, lookup_network)
            if service is not None:
                key = service_key(service)
                return WaypointBackends(key, service, tuple(e.workload for e in self.endpoints(key)), port)
            text = str(ip_from_packed(raw))
            found = self.workloads_at(raw, lookup_network)
            if len(found) == 1:
                return WaypointBackends(text, None, found, port)
            if found:
                raise WaypointUnavailable(text, "several workloads claim this address")
            raise WaypointUnavailable(text, "no service or workload has this address")
        raise WaypointUnavailable("(unset)", "the reference names neither a hostname nor an address")

    # ------------------------------------------------------------------ reads: broken resources, policy

    def broken_at(self, ip: IPAddress | str | bytes, network: str = "") -> BrokenAddress | None:
        """A rejected resource (with no good version) that claims this address."""
        names = self._broken_ips.get((network, packed_ip(ip)))
        return self._broken[names[0]] if names else None

    @property
    def rejected(self) -> Mapping[str, str]:
        """Every resource currently rejected, by name, with the reason (for the admin dump)."""
        return {**self._rejected_addresses, **self._rejected_policies}

    @property
    def authorizations(self) -> Mapping[str, authorization_pb2.Authorization]:
        """The Authorization resources as received (including ones that failed to compile), by name."""
        return MappingProxyType(self._authorizations)

    @property
    def policies(self) -> PolicyEvaluator:
        """The L4 policy store (read it; write through `apply_authorizations`)."""
        return self._evaluator

    def authorize(self, workload: Workload, conn: Connection) -> Decision:
        """L4 authorization of `conn` to `workload`: DENY, then ALLOW, failing closed."""
        if self._undecodable_policies:
            key, error = next(iter(self._undecodable_policies.items()))
            return Decision(False, DecisionReason.INVALID_POLICY, key, detail=error)
        return self._evaluator.decide(workload, conn)

    # ------------------------------------------------------------------ watchers

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher` after every applied response that changed something; returns an unwatch."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def _notify(self, change: StateChange) -> None:
        if not change:
            return
        self._generation += 1
        for watcher in list(self._watchers):
            try:
                watcher(change)
            except Exception:  # one broken watcher must not stop the others or the xDS stream
                logger.exception("state watcher failed", extra={"fields": {"watcher": repr(watcher)}})

    # ------------------------------------------------------------------ writes: addresses

    def apply_addresses(
        self, upserts: Mapping[str, workload_pb2.Address], removals: Iterable[str] = ()
    ) -> dict[str, str]:
        """Apply one response of Address resources; returns the rejected names with the reason."""
        rejected: dict[str, str] = {}
        workloads: set[str] = set()
        services: set[str] = set()
        local: set[str] = set()
        for name in removals:
            self._clear_broken(name)
            self._rejected_addresses.pop(name, None)
            self._remove_name(name, workloads, services, local)
        for name, address in upserts.items():
            try:
                validate_address(name, address)
            except AddressError as e:
                reason = str(e)
                rejected[name] = reason
                self._rejected_addresses[name] = reason
                if name not in self._workloads and name not in self._services:
                    self._clear_broken(name)
                    self._add_broken(BrokenAddress(name, reason, salvage_addresses(address)))
                logger.warning("address rejected", extra={"fields": {"name": name, "error": reason}})
                continue
            self._clear_broken(name)
            self._rejected_addresses.pop(name, None)
            self._remove_name(name, workloads, services, local)
            if address.WhichOneof("type") == "workload":
                self._add_workload(name, address.workload)
                workloads.add(name)
                if self.is_local(address.workload):
                    local.add(name)
            else:
                self._add_service(name, address.service)
                services.add(name)
        self._notify(StateChange(frozenset(workloads), frozenset(services), frozenset(), frozenset(local)))
        return rejected

    def _remove_name(self, name: str, workloads: set[str], services: set[str], local: set[str]) -> None:
        old_workload = self._workloads.pop(name, None)
        if old_workload is not None:
            workloads.add(name)
            if name in self._local:
                local.add(name)
                del self._local[name]
            for raw in old_workload.addresses:
                _index_remove(self._workload_ips, (old_workload.network, packed_ip(raw)), name)
            for key in old_workload.services:
                members = self._endpoints.get(key)
                if members is not None:
                    members.pop(name, None)
                    if not members:
                        del self._endpoints[key]
        old_service = self._services.pop(name, None)
        if old_service is not None:
            services.add(name)
            for address in old_service.addresses:
                _index_remove(self._service_vips, (address.network, packed_ip(address.address)), name)

    def _add_workload(self, uid: str, workload: Workload) -> None:
        self._workloads[uid] = workload
        for raw in workload.addresses:
            _index_add(self._workload_ips, (workload.network, packed_ip(raw)), uid)
        for key in workload.services:
            self._endpoints.setdefault(key, {})[uid] = None
        if self.is_local(workload):
            self._local[uid] = None

    def _add_service(self, key: str, service: Service) -> None:
        self._services[key] = service
        for address in service.addresses:
            _index_add(self._service_vips, (address.network, packed_ip(address.address)), key)

    def _add_broken(self, broken: BrokenAddress) -> None:
        self._broken[broken.name] = broken
        for ip_key in broken.addresses:
            _index_add(self._broken_ips, ip_key, broken.name)

    def _clear_broken(self, name: str) -> None:
        broken = self._broken.pop(name, None)
        if broken is not None:
            for ip_key in broken.addresses:
                _index_remove(self._broken_ips, ip_key, name)

    # ------------------------------------------------------------------ writes: policies

    def apply_authorizations(
        self,
        upserts: Mapping[str, authorization_pb2.Authorization],
        removals: Iterable[str] = (),
        undecodable: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Apply one response of Authorization resources; returns the rejected names with the reason.

        `undecodable` names resources whose bytes could not be decoded (with the reason); they deny
        every connection until replaced or removed (see the module docstring)."""
        rejected: dict[str, str] = {}
        changed: set[str] = set()
        for key in removals:
            self._evaluator.remove(key)
            self._authorizations.pop(key, None)
            self._undecodable_policies.pop(key, None)
            self._rejected_policies.pop(key, None)
            changed.add(key)
        for key, resource in upserts.items():
            self._undecodable_policies.pop(key, None)
            self._authorizations[key] = resource
            error = self._evaluator.upsert(resource, key)
            changed.add(key)
            if error is None:
                self._rejected_policies.pop(key, None)
            else:
                rejected[key] = str(error)
                self._rejected_policies[key] = str(error)
                logger.warning(
                    "authorization rejected; the workloads it applies to deny",
                    extra={"fields": {"name": key, "error": str(error)}},
                )
        for key, reason in (undecodable or {}).items():
            self._evaluator.remove(key)
            self._authorizations.pop(key, None)
            message = f"authorization {key}: cannot be decoded ({reason}); every local workload denies"
            self._undecodable_policies[key] = message
            self._rejected_policies[key] = message
            rejected[key] = message
            changed.add(key)
            logger.warning("authorization undecodable", extra={"fields": {"name": key, "error": reason}})
        self._notify(StateChange(policies=frozenset(changed)))
        return rejected


def _index_add(index: dict[_IpKey, list[str]], key: _IpKey, name: str) -> None:
    names = index.get(key)
    if names is None:
        index[key] = [name]
    elif name not in names:
        names.append(name)


def _index_remove(index: dict[_IpKey, list[str]], key: _IpKey, name: str) -> None:
    names = index.get(key)
    if names is None:
        return
    if name in names:
        names.remove(name)
    if not names:
        del index[key]
