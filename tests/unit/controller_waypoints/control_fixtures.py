"""Manifest builders and snapshot helpers shared by the controller-waypoint unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from loom.resources.loader import load_text
from loom.resources.model import ConfigSnapshot, Gateway

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def meta(
    namespace: str,
    name: str,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        m["labels"] = dict(labels)
    if annotations:
        m["annotations"] = dict(annotations)
    return m


def namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name}
    if labels:
        m["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": m}


def gateway(
    namespace: str = "default",
    name: str = "waypoint",
    *,
    for_sa: str | None = None,
    waypoint_for: str | None = None,
    listeners: Sequence[Mapping[str, Any]] | None = None,
    gateway_class: str = "istio-waypoint",
    uid: str = "",
) -> dict[str, Any]:
    labels = {"istio.io/waypoint-for": waypoint_for} if waypoint_for else None
    annotations = {"istio.io/for-service-account": for_sa} if for_sa else None
    m = meta(namespace, name, labels, annotations)
    if uid:
        m["uid"] = uid
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": m,
        "spec": {
            "gatewayClassName": gateway_class,
            "listeners": list(listeners or [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]),
        },
    }


def service(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    selector: Mapping[str, str] | None = None,
    cluster_ip: str = "10.96.0.10",
    port: int = 9080,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(namespace, name, labels),
        "spec": {
            "selector": dict(selector if selector is not None else {"app": name}),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
        },
    }


def pod(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    service_account: str = "default",
    ip: str = "10.244.0.10",
    node: str = "node-a",
    phase: str = "Running",
    ready: bool = True,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta(namespace, name, labels),
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": node,
            "containers": [{"name": "app", "image": "example/app:1"}],
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def http_route(
    namespace: str, name: str, parents: Sequence[Mapping[str, Any]], backend: str
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta(namespace, name),
        "spec": {
            "parentRefs": [dict(p) for p in parents],
            "rules": [{"backendRefs": [{"name": backend, "port": 9080}]}],
        },
    }


def service_parent(name: str, namespace: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"group": "", "kind": "Service", "name": name, "port": 9080}
    if namespace:
        ref["namespace"] = namespace
    return ref


def gateway_parent(name: str) -> dict[str, Any]:
    return {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name}


def policy(
    namespace: str,
    name: str,
    targets: Sequence[Mapping[str, Any]] = (),
    *,
    action: str = "DENY",
    methods: Sequence[str] = ("DELETE",),
    selector: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": action, "rules": [{"to": [{"operation": {"methods": list(methods)}}]}]}
    if targets:
        spec["targetRefs"] = [dict(t) for t in targets]
    if selector:
        spec["selector"] = {"matchLabels": dict(selector)}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta(namespace, name),
        "spec": spec,
    }


def target(kind: str, name: str, group: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    default_group = "" if kind == "Service" else "gateway.networking.k8s.io"
    ref: dict[str, Any] = {"kind": kind, "name": name, "group": default_group if group is None else group}
    if namespace:
        ref["namespace"] = namespace
    return ref


def snapshot_of(*manifests: Mapping[str, Any]) -> ConfigSnapshot:
    """Parse manifests as the directory source would (invalid policies become fail-closed stand-ins)."""
    result = load_text(yaml.safe_dump_all([dict(m) for m in manifests], sort_keys=False), "test.yaml")
    return result.snapshot


def gateway_obj(manifest: Mapping[str, Any]) -> Gateway:
    gw = snapshot_of(manifest).of_kind(Gateway)
    assert len(gw) == 1
    return gw[0]
