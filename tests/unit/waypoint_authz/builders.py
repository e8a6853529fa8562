"""Small builders for the waypoint authorization tests: policies, requests, the Services they address."""

from __future__ import annotations

from collections.abc import Sequence

from loom.identity import Identity
from loom.resources.model import (
    ANNOTATION_DRY_RUN,
    AuthorizationPolicy,
    LabelSelector,
    ObjectMeta,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)
from waypoint.model import AppProtocol, Peer, RequestView, ServiceRef
from waypoint.paths import NormalizedPath, normalize_path

WAYPOINT = ("default", "waypoint")
GATEWAY_REF = PolicyTargetRef(kind="Gateway", name="waypoint", group="gateway.networking.k8s.io")

# Service port 80 in front of target port 9080, so tests can tell which one policies see.
REVIEWS = ServiceRef("default", "reviews", "reviews.default.svc.cluster.local", 80, 9080, AppProtocol.HTTP)
RATINGS = ServiceRef("default", "ratings", "ratings.default.svc.cluster.local", 9080, 9080, AppProtocol.HTTP)
PRODUCTPAGE = Identity("cluster.local", "default", "bookinfo-productpage")


def service_ref(name: str) -> PolicyTargetRef:
    return PolicyTargetRef(kind="Service", name=name, group="")


def policy(
    name: str,
    *rules: PolicyRule,
    action: str = "ALLOW",
    namespace: str = "default",
    targets: Sequence[PolicyTargetRef] = (GATEWAY_REF,),
    no_rules: bool = False,
    dry_run: bool = False,
    invalid: bool = False,
    selector: LabelSelector | None = None,
    provider: str = "",
) -> AuthorizationPolicy:
    annotations = {ANNOTATION_DRY_RUN: "true"} if dry_run else {}
    return AuthorizationPolicy(
        meta=ObjectMeta(name=name, namespace=namespace, annotations=annotations),
        selector=selector,
        target_refs=tuple(targets),
        action=action,
        rules=None if no_rules else tuple(rules),
        provider=provider,
        invalid=invalid,
    )


def rule(
    *,
    source: PolicySource | None = None,
    operation: PolicyOperation | None = None,
    when: Sequence[PolicyCondition] = (),
) -> PolicyRule:
    return PolicyRule(
        sources=(source,) if source is not None else (),
        operations=(operation,) if operation is not None else (),
        conditions=tuple(when),
    )


def request(
    target: str = "/",
    *,
    method: str = "GET",
    authority: str = "reviews.default.svc.cluster.local:80",
    headers: Sequence[tuple[str, str]] = (),
    identity: Identity | None = PRODUCTPAGE,
    source_address: str = "10.1.0.5:43210",
    service: ServiceRef = REVIEWS,
    destination_ip: str = "10.96.0.10",
) -> RequestView:
    normalized = normalize_path(target, method=method)
    assert isinstance(normalized, NormalizedPath), normalized
    return RequestView(
        method=method,
        authority=authority,
        path=normalized.path,
        query=normalized.query,
        raw_path=target,
        headers=tuple(headers),
        protocol="HTTP/1.1",
        grpc=False,
        source=Peer(identity, source_address),
        service=service,
        destination_ip=destination_ip,
    )
