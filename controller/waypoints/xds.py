"""The WaypointConfig resources: per waypoint, the L7 configuration it enforces (loom/api/waypoint.proto).

Theory of operation
-------------------
`WaypointConfigBuilder.build(snapshot, translation)` runs in the translation worker after every
translation and returns "<namespace>/<name>" -> the serialized WaypointConfig of every waypoint Gateway
(class istio-waypoint). The xDS server serves them under WAYPOINT_CONFIG_TYPE_URL, each only to the
waypoint it names (controller/xds/server.py `stream_scope`).

Which Services a waypoint serves is read from the translation itself, not recomputed: a Service is
served by waypoint W exactly when its Address carries `Service.waypoint` with W's hostname, which is
what every node proxy acts on. So the waypoint and the node proxies can never disagree about it
(the per-service-account and use-waypoint rules live in controller/translate/waypoints.py only).
Decoding every Address each time would cost ~10 µs per resource; the builder remembers each
Address's answer by the identity of its serialized bytes, which the incremental translator keeps for
everything it did not recompute, so a pod change costs a dict walk.

What a waypoint gets, besides its Gateway, identity and Services:

* HTTPRoutes with a parentRef naming its Gateway (kind Gateway, group gateway.networking.k8s.io,
  namespace the route's unless given), or a Service it serves (kind Service, group "" or core);
* AuthorizationPolicies with a targetRef naming, in the policy's own namespace (a targetRef's
  namespace, when given, must be it: Istio allows no cross-namespace targets), its Gateway or a
  Service it serves; and policies in the mesh root namespace targeting GatewayClass istio-waypoint
  (every waypoint). Invalid policies are in the snapshot as fail-closed stand-ins and are sent as
  their original manifests: the waypoint's parser builds the same stand-in.

Manifests are the objects' `raw` form as JSON, with `status` and `metadata.managedFields` removed
(what the waypoint does not read, and what changes when loom writes statuses) and keys sorted, so
equal objects give equal bytes and the xDS version only changes when something the waypoint reads
does. Services behind no waypoint and routes/policies attached to nothing served produce nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from controller.translate import MeshConfig, Translation
from controller.translate.serialized import serialize
from controller.waypoints.desired import waypoint_service_account
from controller.xds.resources import WAYPOINT_CONFIG_TYPE_URL
from loom.api import waypoint_pb2, workload_pb2
from loom.resources.model import (
    LABEL_WAYPOINT_FOR,
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationPolicy,
    ConfigSnapshot,
    Gateway,
    HTTPRoute,
    Resource,
)

__all__ = ["WAYPOINT_CONFIG_TYPE_URL", "WaypointConfigBuilder", "manifest_of", "waypoint_config"]

_GATEWAY_GROUP = "gateway.networking.k8s.io"
_CORE_GROUPS = frozenset({"", "core"})


@dataclass(frozen=True, slots=True)
class _Binding:
    """What one Address says about waypoints: the Service it is (if it is one) and its waypoint."""

    waypoint_host: str  # "<namespace>/<hostname>" of Service.waypoint, "" when none
    service: waypoint_pb2.ServedService | None


def _binding_of(serialized: bytes) -> _Binding:
    try:
        address = workload_pb2.Address.FromString(serialized)
    except DecodeError:  # the translation produced it; it decodes. Never let that take the build down.
        return _Binding("", None)
    if address.WhichOneof("type") != "service":
        return _Binding("", None)
    service = address.service
    hostname = service.waypoint.hostname if service.HasField("waypoint") else None
    host = f"{hostname.namespace}/{hostname.hostname}" if hostname is not None and hostname.hostname else ""
    return _Binding(
        host,
        waypoint_pb2.ServedService(namespace=service.namespace, name=service.name, hostname=service.hostname),
    )


def _clean(value: Any) -> Any:
    """JSON-safe copy (YAML can hold dates and other scalars; they travel as text)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def manifest_of(obj: Resource) -> waypoint_pb2.Manifest:
    """The object as the waypoint receives it (see the module docstring)."""
    raw = dict(obj.raw)
    raw.pop("status", None)
    meta = raw.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        raw["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    text = json.dumps(_clean(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return waypoint_pb2.Manifest(
        kind=obj.KIND,
        namespace=obj.namespace,
        name=obj.name,
        resource_version=obj.meta.resource_version,
        json=text.encode("utf-8"),
    )


def _traffic_type(gateway: Gateway) -> str:
    label = gateway.meta.labels.get(LABEL_WAYPOINT_FOR)
    if label is not None:
        return label
    return "all" if gateway.for_service_account else "service"


def _route_attaches(route: HTTPRoute, gateway: Gateway, served: frozenset[tuple[str, str]]) -> bool:
    for ref in route.parent_refs:
        namespace = ref.namespace or route.namespace
        if ref.kind == "Gateway" and ref.group == _GATEWAY_GROUP:
            if (namespace, ref.name) == (gateway.namespace, gateway.name):
                return True
        elif ref.kind == "Service" and ref.group in _CORE_GROUPS and (namespace, ref.name) in served:
            return True
    return False


def _policy_attaches(
    policy: AuthorizationPolicy, gateway: Gateway, served: frozenset[tuple[str, str]], root_namespace: str
) -> bool:
    for ref in policy.target_refs:
        if ref.namespace and ref.namespace != policy.namespace:
            continue  # cross-namespace targets are not allowed; such a ref names nothing
        if ref.kind == "Gateway" and ref.group == _GATEWAY_GROUP:
            if (policy.namespace, ref.name) == (gateway.namespace, gateway.name):
                return True
        elif ref.kind == "GatewayClass" and ref.group == _GATEWAY_GROUP:
            if policy.namespace == root_namespace and ref.name == WAYPOINT_GATEWAY_CLASS:
                return True
        elif ref.kind == "Service" and ref.group in _CORE_GROUPS and (policy.namespace, ref.name) in served:
            return True
    return False


def waypoint_config(
    gateway: Gateway,
    services: Iterable[waypoint_pb2.ServedService],
    routes: Iterable[HTTPRoute],
    policies: Iterable[AuthorizationPolicy],
    mesh: MeshConfig,
) -> waypoint_pb2.WaypointConfig:
    """One waypoint's configuration from the candidates (pure; routes and policies are filtered)."""
    served_list = sorted(services, key=lambda s: (s.namespace, s.name))
    served = frozenset((s.namespace, s.name) for s in served_list)
    return waypoint_pb2.WaypointConfig(
        namespace=gateway.namespace,
        name=gateway.name,
        trust_domain=mesh.trust_domain,
        service_account=waypoint_service_account(gateway),
        traffic_type=_traffic_type(gateway),
        gateway=manifest_of(gateway),
        services=served_list,
        routes=[
            manifest_of(r) for r in sorted(routes, key=lambda r: r.key) if _route_attaches(r, gateway, served)
        ],
        policies=[
            manifest_of(p)
            for p in sorted(policies, key=lambda p: p.key)
            if _policy_attaches(p, gateway, served, mesh.root_namespace)
        ],
    )


class WaypointConfigBuilder:
    """Builds every waypoint's WaypointConfig after each translation (one thread at a time)."""

    def __init__(self, mesh: MeshConfig) -> None:
        self.mesh = mesh
        self._bindings: dict[str, tuple[bytes, _Binding]] = {}
        self.decoded = 0  # Addresses decoded so far (tests check that unchanged ones are not)

    def build(self, snapshot: ConfigSnapshot, translation: Translation) -> dict[str, bytes]:
        waypoints = [g for g in snapshot.of_kind(Gateway) if g.is_waypoint]
        if not waypoints:
            self._bindings.clear()
            return {}
        by_host: dict[str, list[waypoint_pb2.ServedService]] = {}
        for binding in self._service_bindings(translation):
            if binding.service is not None and binding.waypoint_host:
                by_host.setdefault(binding.waypoint_host, []).append(binding.service)
        routes = snapshot.of_kind(HTTPRoute)
        policies = [p for p in snapshot.of_kind(AuthorizationPolicy) if p.target_refs]
        configs: dict[str, bytes] = {}
        for gateway in waypoints:
            host = f"{gateway.namespace}/{gateway.name}.{gateway.namespace}.svc.{self.mesh.cluster_domain}"
            config = waypoint_config(gateway, by_host.get(host, ()), routes, policies, self.mesh)
            configs[f"{gateway.namespace}/{gateway.name}"] = serialize(config)
        return configs

    def _service_bindings(self, translation: Translation) -> list[_Binding]:
        blobs = translation.serialized_addresses.blobs
        previous = self._bindings
        current: dict[str, tuple[bytes, _Binding]] = {}
        for name, serialized in blobs.items():
            cached = previous.get(name)
            if cached is not None and cached[0] is serialized:
                current[name] = cached
            else:
                self.decoded += 1
                current[name] = (serialized, _binding_of(serialized))
        self._bindings = current
        return [binding for _, binding in current.values()]
