"""Builders of small, valid Kubernetes/Istio manifests (plain dicts in API form) for tests.

Each returns what `kubectl get -o json` would show for a freshly created object, minus server-set
fields, so it can be written to a YAML file, added to a `FakeApiServer`, or parsed directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _meta(
    name: str, namespace: str | None, labels: Mapping[str, str] | None, annotations: Mapping[str, str] | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, labels, None)}


def service_account(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, namespace, None, None)}


def pod(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    service_account: str = "default",
    node: str = "node-1",
    ip: str = "10.244.0.10",
    secondary_ips: Sequence[str] = (),
    port: int = 8080,
) -> dict[str, Any]:
    """A running, ready Pod; `secondary_ips` follow `ip` in status.podIPs (dual stack)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(name, namespace, labels, annotations),
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": node,
            "containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": port}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": address} for address in (ip, *secondary_ips)],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def service(
    namespace: str,
    name: str,
    *,
    selector: Mapping[str, str] | None = None,
    port: int = 80,
    cluster_ip: str = "10.96.0.10",
    secondary_cluster_ips: Sequence[str] = (),
) -> dict[str, Any]:
    """A ClusterIP Service; `secondary_cluster_ips` follow `cluster_ip` in spec.clusterIPs."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, None, None),
        "spec": {
            "selector": dict(selector if selector is not None else {"app": name}),
            "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}],
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip, *secondary_cluster_ips],
            "type": "ClusterIP",
        },
    }


def deployment(
    namespace: str, name: str, *, replicas: int = 1, service_account: str = "default"
) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, labels, None),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": service_account,
                    "containers": [{"name": "app", "image": "example/app:1"}],
                },
            },
        },
    }


def authorization_policy(
    namespace: str,
    name: str,
    *,
    action: str = "ALLOW",
    principals: Sequence[str] = ("cluster.local/ns/default/sa/client",),
    match_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "action": action,
        "rules": [{"from": [{"source": {"principals": list(principals)}}]}],
    }
    if match_labels:
        spec["selector"] = {"matchLabels": dict(match_labels)}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _meta(name, namespace, None, None),
        "spec": spec,
    }


def peer_authentication(namespace: str, name: str = "default", *, mode: str = "STRICT") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": _meta(name, namespace, None, None),
        "spec": {"mtls": {"mode": mode}},
    }


def waypoint_gateway(namespace: str, name: str = "waypoint") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": _meta(name, namespace, {"istio.io/waypoint-for": "service"}, None),
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def http_route(namespace: str, name: str, *, service: str, backend: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(name, namespace, None, None),
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": service, "port": port}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": backend, "port": port}],
                }
            ],
        },
    }
