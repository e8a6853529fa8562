"""Small constructors for routing and balancing tests: Services, requests, routes and endpoints."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loom.identity import Identity
from loom.resources.model import (
    BackendRef,
    ConfigSnapshot,
    HTTPPathMatch,
    HTTPRoute,
    HTTPRouteFilter,
    HTTPRouteMatch,
    HTTPRouteRule,
    HTTPValueMatch,
    ObjectMeta,
    ParentRef,
    Service,
)
from waypoint.model import AppProtocol, Endpoint, Peer, RequestView, ServiceRef

TRUST_DOMAIN = "cluster.local"


def svc(name: str, port: int = 9080, namespace: str = "default", target_port: int = 0) -> ServiceRef:
    return ServiceRef(
        namespace=namespace,
        name=name,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        port=port,
        target_port=target_port or port,
        protocol=AppProtocol.HTTP,
    )


def index(*services: ServiceRef) -> dict[tuple[str, str], list[ServiceRef]]:
    result: dict[tuple[str, str], list[ServiceRef]] = {}
    for service in services:
        result.setdefault((service.namespace, service.name), []).append(service)
    return result


def request(
    path: str = "/",
    *,
    service: ServiceRef | None = None,
    method: str = "GET",
    query: str = "",
    headers: Iterable[tuple[str, str]] = (),
    authority: str | None = None,
    client_namespace: str = "default",
) -> RequestView:
    target = service or svc("web")
    return RequestView(
        method=method,
        authority=f"{target.name}:{target.port}" if authority is None else authority,
        path=path,
        query=query,
        raw_path=path + (f"?{query}" if query else ""),
        headers=tuple(headers),
        protocol="HTTP/1.1",
        grpc=False,
        source=Peer(Identity(TRUST_DOMAIN, client_namespace, "client"), "10.0.0.9:40000"),
        service=target,
    )


def service_parent(name: str = "web", port: int = 0, namespace: str = "") -> ParentRef:
    return ParentRef(name=name, kind="Service", group="", namespace=namespace, port=port)


def gateway_parent(name: str = "waypoint", namespace: str = "", port: int = 0) -> ParentRef:
    return ParentRef(name=name, namespace=namespace, port=port)


def http_route(
    name: str,
    rules: Sequence[HTTPRouteRule],
    *,
    namespace: str = "default",
    parents: Sequence[ParentRef] | None = None,
    hostnames: Sequence[str] = (),
) -> HTTPRoute:
    return HTTPRoute(
        meta=ObjectMeta(name=name, namespace=namespace),
        parent_refs=tuple(parents if parents is not None else (service_parent(),)),
        hostnames=tuple(hostnames),
        rules=tuple(rules),
    )


def to(*names: str | tuple[str, int], port: int = 9080) -> tuple[BackendRef, ...]:
    """backendRefs: a name (weight 1) or (name, weight)."""
    refs = []
    for item in names:
        name, weight = (item, 1) if isinstance(item, str) else item
        refs.append(BackendRef(name=name, port=port, weight=weight))
    return tuple(refs)


def rule(
    *matches: HTTPRouteMatch,
    backends: Sequence[BackendRef] = (),
    filters: Sequence[HTTPRouteFilter] = (),
    timeout: float | None = None,
    backend_timeout: float | None = None,
    retry: Mapping[str, Any] | None = None,
) -> HTTPRouteRule:
    return HTTPRouteRule(
        matches=tuple(matches),
        backend_refs=tuple(backends),
        filters=tuple(filters),
        timeout_request=timeout,
        timeout_backend_request=backend_timeout,
        retry=dict(retry or {}),
    )


def match(
    path: str | None = None,
    *,
    kind: str = "PathPrefix",
    method: str = "",
    headers: Mapping[str, str] | None = None,
    header_regex: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> HTTPRouteMatch:
    values = [HTTPValueMatch(n, v) for n, v in (headers or {}).items()]
    values += [HTTPValueMatch(n, v, "RegularExpression") for n, v in (header_regex or {}).items()]
    return HTTPRouteMatch(
        path=HTTPPathMatch(kind, path) if path is not None else None,
        headers=tuple(values),
        query_params=tuple(HTTPValueMatch(n, v) for n, v in (query or {}).items()),
        method=method,
    )


def flt(kind: str, config_key: str, config: Mapping[str, Any]) -> HTTPRouteFilter:
    """A filter as the loader keeps it: the whole filter spec."""
    return HTTPRouteFilter(type=kind, config={"type": kind, config_key: dict(config)})


def refs_from_snapshot(snapshot: ConfigSnapshot) -> dict[tuple[str, str], list[ServiceRef]]:
    """ServiceRefs for every Service port of a snapshot (protocol from the port name, as Istio does)."""
    result: dict[tuple[str, str], list[ServiceRef]] = {}
    for service in snapshot.of_kind(Service):
        for port in service.ports:
            prefix = (port.app_protocol or port.name).split("-")[0].lower()
            protocol = AppProtocol(prefix) if prefix in {p.value for p in AppProtocol} else AppProtocol.TCP
            target = port.target_port if isinstance(port.target_port, int) and port.target_port else port.port
            ref = ServiceRef(
                namespace=service.namespace,
                name=service.name,
                hostname=f"{service.name}.{service.namespace}.svc.cluster.local",
                port=port.port,
                target_port=target,
                protocol=protocol,
            )
            result.setdefault((service.namespace, service.name), []).append(ref)
    return result


def endpoint(ip: str, port: int = 9080, namespace: str = "default", account: str = "web") -> Endpoint:
    return Endpoint(ip=ip, port=port, identity=Identity(TRUST_DOMAIN, namespace, account), workload=f"w-{ip}")
