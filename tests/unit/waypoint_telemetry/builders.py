"""RequestView / Endpoint constructors for the telemetry tests, so tables read like requests."""

from __future__ import annotations

from collections.abc import Mapping

from loom.identity import Identity
from waypoint.model import AppProtocol, Endpoint, Peer, RequestView, ServiceRef

CLIENT = Identity("cluster.local", "default", "sleep")
SERVER = Identity("cluster.local", "bookinfo", "bookinfo-reviews")


def service_ref(
    name: str = "reviews",
    namespace: str = "bookinfo",
    port: int = 9080,
    protocol: AppProtocol = AppProtocol.HTTP,
) -> ServiceRef:
    return ServiceRef(
        namespace=namespace,
        name=name,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        port=port,
        target_port=port,
        protocol=protocol,
    )


def request(
    *,
    method: str = "GET",
    path: str = "/reviews/1",
    query: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    grpc: bool = False,
    identity: Identity | None = CLIENT,
    service: ServiceRef | None = None,
    protocol: str = "HTTP/1.1",
) -> RequestView:
    return RequestView(
        method=method,
        authority="reviews.bookinfo:9080",
        path=path,
        query=query,
        raw_path=path + (f"?{query}" if query else ""),
        headers=headers,
        protocol=protocol,
        grpc=grpc,
        source=Peer(identity, "10.244.1.7:41234"),
        service=service or service_ref(),
        destination_ip="10.96.0.20",
    )


def endpoint(
    labels: Mapping[str, str] | None = None, workload: str = "reviews-v2", namespace: str = "bookinfo"
) -> Endpoint:
    return Endpoint(
        ip="10.244.2.9",
        port=9080,
        identity=SERVER,
        workload=workload,
        namespace=namespace,
        node="node-2",
        labels=dict(labels if labels is not None else {"app": "reviews", "version": "v2"}),
    )
