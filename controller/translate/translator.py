"""Full and incremental translation of a ConfigSnapshot.

`translate(snapshot, mesh)` builds the pod-independent `TranslationContext`, translates every Pod
against it, then every Service (a Service's per-service-account waypoint depends on the pods behind
it), and assembles the `Translation`.

`Translator` keeps what the previous call computed -- the context, each pod's result, which pods back
which Service, each Service's result -- and on `update(snapshot)`:

* nothing translation reads changed (only Deployments, ServiceAccounts or HTTPRoutes, or nothing):
  the previous Translation is returned as is;
* only Pods changed: those pods are translated again, and so are the Services whose per-service-account
  binding can depend on them (their pod set or the waypoint serving one of their pods changed). Every
  other resource in the output is the very `bytes` object of the previous Translation;
* anything else read changed (Namespace, Service, Gateway, AuthorizationPolicy, PeerAuthentication):
  full translation, since each of those can change any number of workloads.

Both paths give equal output, diagnostics included (ordered: pod-independent ones, then per Service,
then per Pod, each by key), which the property tests check.

Memory: every resource is built as a message, serialized at once and kept only as bytes (see
`serialized`); what the Translator keeps per pod and per Service holds those bytes, never messages.

Which keys changed: the caller may pass them (a watch event knows), otherwise they are computed with
`ConfigSnapshot.changed_keys`, which compares every object (about 10 ms for 11,000 objects, most of
an update; the controller should pass the keys it already knows).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from controller.translate import MeshConfig, Translation
from controller.translate.context import KINDS_READ, TranslationContext, internal_error
from controller.translate.serialized import SerializedMessages, serialize
from controller.translate.services import ServiceInfo
from controller.translate.workloads import PodTranslation, not_a_workload, translate_pod, workload_uid
from loom.api import workload_pb2
from loom.resources.diagnostics import Diagnostic
from loom.resources.model import ConfigSnapshot, Pod, ResourceKey


@dataclass(frozen=True, slots=True, eq=False)
class _ServiceResult:
    serialized_address: bytes
    # The binding the address was built with (the waypoint index's shared serialized GatewayAddress).
    waypoint: bytes | None
    diagnostics: tuple[Diagnostic, ...]


def _translate_pod_safely(pod: Pod, ctx: TranslationContext) -> PodTranslation:
    try:
        return translate_pod(pod, ctx)
    except Exception as e:  # one bad object must not stop the translation of the others
        uid = workload_uid(ctx.mesh.cluster_id, pod)
        return not_a_workload(uid, (internal_error(pod, e, "the Workload is not sent"),))


def _translate_service(
    info: ServiceInfo,
    ctx: TranslationContext,
    pods: Mapping[ResourceKey, PodTranslation],
    members: Mapping[ResourceKey, set[ResourceKey]],
    previous: _ServiceResult | None = None,
) -> _ServiceResult:
    service = info.service
    endpoint_waypoints = [pods[key].per_sa_waypoint for key in members.get(service.key, ())]
    waypoint, warnings = ctx.waypoints.service_binding(
        service, ctx.namespace_waypoints.get(service.namespace), endpoint_waypoints
    )
    diagnostics = info.diagnostics + warnings
    if previous is not None and previous.waypoint is waypoint and previous.diagnostics == diagnostics:
        return previous
    return _ServiceResult(serialize(info.address(ctx.mesh.network, waypoint)), waypoint, diagnostics)


def _by_key(diagnostics: Mapping[ResourceKey, tuple[Diagnostic, ...]]) -> tuple[Diagnostic, ...]:
    return tuple(d for key in sorted(diagnostics) for d in diagnostics[key])


class _State:
    """What one translation leaves for the next. Mutated only by Translator, never shared out (the
    `addresses` dict handed to a Translation is never modified afterwards: updates copy it)."""

    __slots__ = (
        "_pod_section",
        "_service_section",
        "addresses",
        "context",
        "members",
        "pod_diagnostics",
        "pods",
        "service_diagnostics",
        "services",
        "snapshot",
        "translation",
    )

    def __init__(
        self,
        snapshot: ConfigSnapshot,
        context: TranslationContext,
        pods: dict[ResourceKey, PodTranslation],
        members: dict[ResourceKey, set[ResourceKey]],
        services: dict[ResourceKey, _ServiceResult],
        addresses: dict[str, bytes],
    ) -> None:
        self.snapshot = snapshot
        self.context = context
        self.pods = pods
        self.members = members
        self.services = services
        # Only the objects that have diagnostics, so an update sorts few keys.
        self.pod_diagnostics = {key: p.diagnostics for key, p in pods.items() if p.diagnostics}
        self.service_diagnostics = {key: s.diagnostics for key, s in services.items() if s.diagnostics}
        self._pod_section: tuple[Diagnostic, ...] | None = None
        self._service_section: tuple[Diagnostic, ...] | None = None
        # Name -> serialized Address of the current translation (the dict its `addresses` wraps).
        self.addresses: dict[str, bytes] = addresses
        self.translation = self.assemble(addresses)

    def set_pod_diagnostics(self, key: ResourceKey, diagnostics: tuple[Diagnostic, ...]) -> None:
        if diagnostics or key in self.pod_diagnostics:
            self._pod_section = None
            if diagnostics:
                self.pod_diagnostics[key] = diagnostics
            else:
                del self.pod_diagnostics[key]

    def set_service(self, key: ResourceKey, result: _ServiceResult) -> None:
        previous = self.services[key]
        self.services[key] = result
        if result.diagnostics != previous.diagnostics:
            self._service_section = None
            if result.diagnostics:
                self.service_diagnostics[key] = result.diagnostics
            else:
                self.service_diagnostics.pop(key, None)

    def assemble(self, addresses: dict[str, bytes]) -> Translation:
        """The Translation: diagnostics of the context, then per Service, then per Pod, each by key.
        `addresses` (name -> serialized Address) is handed over: it must not be modified afterwards."""
        self.addresses = addresses
        if self._service_section is None:
            self._service_section = _by_key(self.service_diagnostics)
        if self._pod_section is None:
            self._pod_section = _by_key(self.pod_diagnostics)
        ctx = self.context
        return Translation(
            addresses=SerializedMessages(workload_pb2.Address, addresses),
            authorizations=ctx.authorizations,
            diagnostics=ctx.diagnostics + self._service_section + self._pod_section,
        )


def _full(snapshot: ConfigSnapshot, mesh: MeshConfig) -> _State:
    ctx = TranslationContext.build(snapshot, mesh)
    pods: dict[ResourceKey, PodTranslation] = {}
    members: dict[ResourceKey, set[ResourceKey]] = {}
    addresses: dict[str, bytes] = {}
    for pod in snapshot.of_kind(Pod):
        result = _translate_pod_safely(pod, ctx)
        key = pod.key
        pods[key] = result
        if result.serialized_address is not None:
            addresses[result.uid] = result.serialized_address
        for service_key in result.services:
            members.setdefault(service_key, set()).add(key)
    services: dict[ResourceKey, _ServiceResult] = {}
    for key, info in ctx.services.items():
        service = _translate_service(info, ctx, pods, members)
        services[key] = service
        addresses[info.resource_name] = service.serialized_address
    return _State(snapshot, ctx, pods, members, services, addresses)


def translate(snapshot: ConfigSnapshot, mesh: MeshConfig) -> Translation:
    """Translate a whole snapshot (pure and deterministic)."""
    return _full(snapshot, mesh).translation


class Translator:
    """Incremental translation across successive snapshots (see the module docstring)."""

    def __init__(self, mesh: MeshConfig) -> None:
        self.mesh = mesh
        self._state: _State | None = None

    @property
    def translation(self) -> Translation | None:
        """The result of the last update (None before the first)."""
        return self._state.translation if self._state is not None else None

    def update(self, snapshot: ConfigSnapshot, changed: Collection[ResourceKey] | None = None) -> Translation:
        """Translate `snapshot`, reusing the previous result where possible.

        `changed`: the keys added, removed or modified since the previous snapshot, if the caller
        knows them; computed otherwise.
        """
        state = self._state
        if state is None:
            self._state = _full(snapshot, self.mesh)
            return self._state.translation
        if changed is None:
            changed = snapshot.changed_keys(state.snapshot)
        relevant = [key for key in changed if key.kind in KINDS_READ]
        if not relevant:
            state.snapshot = snapshot
            return state.translation
        if any(key.kind != Pod.KIND for key in relevant):
            self._state = _full(snapshot, self.mesh)
            return self._state.translation
        self._update_pods(state, snapshot, relevant)
        return state.translation

    def _update_pods(self, state: _State, snapshot: ConfigSnapshot, keys: Iterable[ResourceKey]) -> None:
        ctx = state.context
        # Translate first: if anything raised past the per-pod guard, the state would still be intact.
        results: dict[ResourceKey, PodTranslation | None] = {}
        for key in keys:
            pod = snapshot.get_obj(Pod, key.namespace, key.name)
            results[key] = None if pod is None else _translate_pod_safely(pod, ctx)

        addresses = dict(state.addresses)
        affected_services: set[ResourceKey] = set()
        pods, members = state.pods, state.members
        for key, new in results.items():
            old = pods.pop(key, None)
            if old is not None and old.serialized_address is not None:
                del addresses[old.uid]
            if new is not None:
                pods[key] = new
                if new.serialized_address is not None:
                    addresses[new.uid] = new.serialized_address
            state.set_pod_diagnostics(key, new.diagnostics if new is not None else ())
            old_services = old.services if old is not None else frozenset()
            new_services = new.services if new is not None else frozenset()
            for service_key in old_services - new_services:
                bucket = members.get(service_key)
                if bucket is not None:
                    bucket.discard(key)
                    if not bucket:
                        del members[service_key]
            for service_key in new_services - old_services:
                members.setdefault(service_key, set()).add(key)
            old_waypoint = old.per_sa_waypoint if old is not None else None
            new_waypoint = new.per_sa_waypoint if new is not None else None
            if old_services != new_services or old_waypoint != new_waypoint:
                affected_services |= old_services | new_services

        for service_key in affected_services:
            info = ctx.services.get(service_key)
            if info is None or not ctx.waypoints.service_binding_depends_on_pods(info.service):
                continue
            previous = state.services[service_key]
            result = _translate_service(info, ctx, pods, members, previous)
            if result is not previous:
                state.set_service(service_key, result)
                addresses[info.resource_name] = result.serialized_address

        state.snapshot = snapshot
        state.translation = state.assemble(addresses)
