"""Everything translation derives from the objects other than Pods, computed once per such change.

A `TranslationContext` holds the Namespaces' labels, the waypoints, the Services (with their selector
index), the compiled AuthorizationPolicies (with their selector index) and the PeerAuthentication
index. Pods are then translated one by one against it (`workloads.translate_pod`), which is what makes
the incremental path cheap: when only Pods change the context is reused as is. The translated
policies are kept serialized, like every output (see `serialized`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.translate import MeshConfig
from controller.translate.peer_authentication import PeerAuthenticationIndex
from controller.translate.policy import translate_policy
from controller.translate.selectors import SelectorIndex
from controller.translate.serialized import SerializedMessages, serialize
from controller.translate.services import ServiceInfo
from controller.translate.waypoints import UseWaypoint, WaypointIndex, parse_use_waypoint
from loom.api import authorization_pb2
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import (
    AuthorizationPolicy,
    ConfigSnapshot,
    Gateway,
    LabelSelector,
    Namespace,
    PeerAuthentication,
    Resource,
    ResourceKey,
    Service,
)

# The kinds translation reads. A change to any other kind (Deployment, ServiceAccount, HTTPRoute)
# cannot change the output.
KINDS_READ = frozenset(
    {
        Namespace.KIND,
        "Pod",
        Service.KIND,
        AuthorizationPolicy.KIND,
        PeerAuthentication.KIND,
        Gateway.KIND,
    }
)


def internal_error(obj: Resource, error: Exception, consequence: str) -> Diagnostic:
    """A bug in translation met this object; it is reported rather than taking the controller down."""
    return Diagnostic(
        Severity.ERROR,
        f"internal error while translating this object ({type(error).__name__}: {error}); {consequence}",
        origin=obj.origin,
        key=obj.key,
    )


def _deny_all(policy: AuthorizationPolicy, root_namespace: str) -> authorization_pb2.Authorization:
    """What a policy that could not be translated becomes: a DENY of everything in its scope."""
    if policy.selector is not None:
        scope = authorization_pb2.WORKLOAD_SELECTOR
    elif policy.namespace == root_namespace:
        scope = authorization_pb2.GLOBAL
    else:
        scope = authorization_pb2.NAMESPACE
    return authorization_pb2.Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=scope,
        action=authorization_pb2.DENY,
        groups=[authorization_pb2.Group()],
    )


@dataclass(frozen=True, slots=True, eq=False)
class TranslationContext:
    mesh: MeshConfig
    namespace_labels: Mapping[str, Mapping[str, str]]
    namespace_waypoints: Mapping[str, UseWaypoint | None]
    waypoints: WaypointIndex
    services: Mapping[ResourceKey, ServiceInfo]
    # Per namespace: the Services whose selector can pick pods.
    service_selectors: Mapping[str, SelectorIndex[ServiceInfo]]
    # Per namespace: keys of the WORKLOAD_SELECTOR policies of that namespace (root namespace excluded).
    policy_selectors: Mapping[str, SelectorIndex[str]]
    # Keys of the WORKLOAD_SELECTOR policies of the root namespace: they select pods in every namespace.
    root_policy_selectors: SelectorIndex[str]
    peer_authentication: PeerAuthenticationIndex
    # Shared by every Translation made with this context (an update of pods only reuses it as is).
    authorizations: SerializedMessages[authorization_pb2.Authorization]
    diagnostics: tuple[Diagnostic, ...]
    # One shared frozenset per distinct set of Services pods back (see `shared_service_set`).
    _service_sets: dict[frozenset[ResourceKey], frozenset[ResourceKey]] = field(
        default_factory=dict, repr=False
    )

    def shared_service_set(self, keys: frozenset[ResourceKey]) -> frozenset[ResourceKey]:
        """`keys`, or an equal set met before. The pods of one app back the same Services, and a
        frozenset per pod would cost more memory than the rest of what is kept per pod."""
        return self._service_sets.setdefault(keys, keys)

    @classmethod
    def build(cls, snapshot: ConfigSnapshot, mesh: MeshConfig) -> TranslationContext:
        diagnostics: list[Diagnostic] = []

        waypoints = WaypointIndex(snapshot.of_kind(Gateway), mesh.cluster_domain)
        diagnostics.extend(waypoints.diagnostics)

        namespace_labels: dict[str, Mapping[str, str]] = {}
        namespace_waypoints: dict[str, UseWaypoint | None] = {}
        for namespace in snapshot.of_kind(Namespace):
            namespace_labels[namespace.name] = namespace.meta.labels
            choice = parse_use_waypoint(namespace.meta.labels, namespace.name)
            namespace_waypoints[namespace.name] = choice
            if choice is not None:
                warning = waypoints.missing_waypoint_warning(namespace, choice)
                if warning is not None:
                    diagnostics.append(warning)

        services: dict[ResourceKey, ServiceInfo] = {}
        service_selectors: dict[str, SelectorIndex[ServiceInfo]] = {}
        for service in snapshot.of_kind(Service):
            try:
                info = ServiceInfo.build(service, mesh.cluster_domain)
            except Exception as e:  # one bad object must not stop the translation of the others
                diagnostics.append(internal_error(service, e, "the Service is not sent"))
                continue
            services[service.key] = info
            if info.selector is not None:
                service_selectors.setdefault(service.namespace, SelectorIndex()).add(info.selector, info)

        authorizations: dict[str, bytes] = {}  # serialized Authorizations
        policy_selectors: dict[str, SelectorIndex[str]] = {}
        root_policy_selectors: SelectorIndex[str] = SelectorIndex()

        def select_with(policy: AuthorizationPolicy, selector: LabelSelector, key: str) -> None:
            if policy.namespace == mesh.root_namespace:
                root_policy_selectors.add(selector, key)
            else:
                policy_selectors.setdefault(policy.namespace, SelectorIndex()).add(selector, key)

        for policy in snapshot.of_kind(AuthorizationPolicy):
            try:
                translated = translate_policy(policy, mesh.root_namespace)
            except Exception as e:  # fail closed: an untranslatable policy denies its whole scope
                if policy.target_refs:
                    diagnostics.append(internal_error(policy, e, "it is not sent to node proxies"))
                    continue
                diagnostics.append(
                    internal_error(policy, e, "loom enforces it as a DENY of every connection in its scope")
                )
                key = f"{policy.namespace}/{policy.name}"
                authorizations[key] = serialize(_deny_all(policy, mesh.root_namespace))
                if policy.selector is not None:
                    select_with(policy, policy.selector, key)
                continue
            diagnostics.extend(translated.diagnostics)
            if translated.authorization is None:
                continue
            authorizations[translated.key] = serialize(translated.authorization)
            if translated.selector is not None:
                select_with(policy, translated.selector, translated.key)

        peer_authentication = PeerAuthenticationIndex(
            snapshot.of_kind(PeerAuthentication), mesh.root_namespace
        )
        diagnostics.extend(peer_authentication.diagnostics)
        authorizations.update(peer_authentication.authorizations)

        return cls(
            mesh=mesh,
            namespace_labels=namespace_labels,
            namespace_waypoints=namespace_waypoints,
            waypoints=waypoints,
            services=services,
            service_selectors=service_selectors,
            policy_selectors=policy_selectors,
            root_policy_selectors=root_policy_selectors,
            peer_authentication=peer_authentication,
            authorizations=SerializedMessages(authorization_pb2.Authorization, authorizations),
            diagnostics=tuple(diagnostics),
        )
