"""The informers' cache on its own (no I/O): idempotent handlers, relist diffs, diagnostics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

import controller.sources.kubernetes as kubernetes_source
from controller.sources.kubernetes import (
    AUTHORIZATION_POLICIES,
    DEPLOYMENTS,
    GATEWAYS,
    NAMESPACES,
    PODS,
    ApiResource,
    KubernetesApiError,
    KubernetesSourceSettings,
    ObjectCache,
    normalise_api_object,
)
from loom.resources.model import AuthorizationPolicy, ResourceKey
from loom.testing import manifests as m


def stored(manifest: Mapping[str, Any], rv: int) -> dict[str, Any]:
    """The manifest as the API server would return it at revision `rv`."""
    obj = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": str(rv), "uid": f"uid-{rv}"}}
    return obj


def as_list_item(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


POD_A = ResourceKey("Pod", "default", "a")


def test_upsert_is_idempotent_per_resource_version() -> None:
    cache = ObjectCache()
    assert cache.upsert(PODS, stored(m.pod("default", "a"), 5)) is True
    assert POD_A in cache.objects
    assert cache.upsert(PODS, stored(m.pod("default", "a"), 5)) is False
    assert cache.parse_count == 1  # the repeated event was not even parsed
    assert cache.upsert(PODS, stored(m.pod("default", "a", labels={"v": "2"}), 6)) is True
    assert cache.objects[POD_A].meta.labels == {"v": "2"}
    assert cache.resource_version_of(PODS, "default", "a") == "6"


def test_remove_is_idempotent() -> None:
    cache = ObjectCache()
    assert cache.remove(PODS, "default", "a") is False
    cache.upsert(PODS, stored(m.pod("default", "a"), 5))
    assert cache.remove(PODS, "default", "a") is True
    assert cache.remove(PODS, "default", "a") is False
    assert cache.objects == {}


def test_replace_all_diffs_against_the_cache() -> None:
    cache = ObjectCache()
    a, b = stored(m.pod("default", "a"), 5), stored(m.pod("default", "b"), 6)
    assert cache.replace_all(PODS, [as_list_item(a), as_list_item(b)]) is True
    parses = cache.parse_count
    assert cache.replace_all(PODS, [as_list_item(a), as_list_item(b)]) is False  # nothing new
    assert cache.parse_count == parses
    c = stored(m.pod("default", "c"), 9)
    assert cache.replace_all(PODS, [as_list_item(b), as_list_item(c)]) is True
    assert set(cache.objects) == {ResourceKey("Pod", "default", "b"), ResourceKey("Pod", "default", "c")}
    assert cache.count(PODS) == 2


def test_kinds_do_not_interfere() -> None:
    cache = ObjectCache()
    cache.upsert(NAMESPACES, stored(m.namespace("default"), 2))
    cache.upsert(PODS, stored(m.pod("default", "a"), 3))
    assert cache.clear(PODS) is True
    assert set(cache.objects) == {ResourceKey("Namespace", "", "default")}


def test_invalid_object_becomes_diagnostics_until_fixed_or_deleted() -> None:
    cache = ObjectCache()
    key = ResourceKey("AuthorizationPolicy", "default", "p")
    assert cache.upsert(
        AUTHORIZATION_POLICIES, stored(m.authorization_policy("default", "p", action="PERMIT"), 3)
    )
    stand_in = cache.objects[key]  # an invalid policy stands in as a deny-all (fail closed)
    assert isinstance(stand_in, AuthorizationPolicy) and stand_in.invalid and stand_in.action == "DENY"
    (diagnostic, *_) = cache.object_diagnostics[key]
    assert diagnostic.is_error and diagnostic.key == key and str(diagnostic.origin) == "kubernetes"
    # A valid version replaces the diagnostics with the object ...
    assert cache.upsert(AUTHORIZATION_POLICIES, stored(m.authorization_policy("default", "p"), 4))
    assert key in cache.objects and key not in cache.object_diagnostics
    # ... and deleting an invalid object removes its diagnostics.
    cache.upsert(AUTHORIZATION_POLICIES, stored(m.authorization_policy("default", "p", action="PERMIT"), 5))
    assert getattr(cache.objects[key], "invalid", False)
    assert cache.remove(AUTHORIZATION_POLICIES, "default", "p") is True
    assert cache.object_diagnostics == {}
    assert key not in cache.objects


def test_object_without_a_name_is_ignored() -> None:
    cache = ObjectCache()
    assert cache.upsert(PODS, {"metadata": {"namespace": "default"}}) is False
    assert cache.objects == {}


def test_a_parser_crash_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(doc: Mapping[str, Any], origin: object) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(kubernetes_source, "parse_object", explode)
    cache = ObjectCache()
    assert cache.upsert(GATEWAYS, stored(m.waypoint_gateway("d", "g"), 3)) is True
    (diagnostic,) = cache.object_diagnostics[ResourceKey("Gateway", "d", "g")]
    assert diagnostic.is_error and "boom" in diagnostic.message
    assert cache.objects == {}


def test_normalise_fills_kind_and_drops_managed_fields() -> None:
    raw = {"metadata": {"name": "a", "managedFields": [{"manager": "x"}]}, "spec": {}}
    obj = normalise_api_object(PODS, raw)
    assert obj["kind"] == "Pod" and obj["apiVersion"] == "v1"
    assert obj["metadata"] == {"name": "a"}
    assert raw["metadata"]["managedFields"]  # the input is not modified
    assert normalise_api_object(GATEWAYS, {"metadata": {}})["apiVersion"] == "gateway.networking.k8s.io/v1"


@pytest.mark.parametrize(
    ("resource", "namespace", "collection", "item"),
    [
        pytest.param(
            PODS, "default", "/api/v1/namespaces/default/pods", "/api/v1/namespaces/default/pods/x", id="core"
        ),
        pytest.param(PODS, "", "/api/v1/pods", None, id="core all namespaces"),
        pytest.param(NAMESPACES, "", "/api/v1/namespaces", "/api/v1/namespaces/x", id="cluster scoped"),
        pytest.param(
            DEPLOYMENTS,
            "ns",
            "/apis/apps/v1/namespaces/ns/deployments",
            "/apis/apps/v1/namespaces/ns/deployments/x",
            id="apps",
        ),
        pytest.param(
            GATEWAYS,
            "ns",
            "/apis/gateway.networking.k8s.io/v1/namespaces/ns/gateways",
            "/apis/gateway.networking.k8s.io/v1/namespaces/ns/gateways/x",
            id="custom resource",
        ),
    ],
)
def test_paths(resource: ApiResource, namespace: str, collection: str, item: str | None) -> None:
    assert resource.collection_path(namespace) == collection
    if item is not None:
        assert resource.object_path(namespace, "x") == item
        assert resource.object_path(namespace, "x", "status") == f"{item}/status"


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        pytest.param(
            b'{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound",'
            b'"message":"pods \\"x\\" not found","code":404}',
            "NotFound",
            'pods "x" not found',
            id="Status object",
        ),
        pytest.param(
            b"404 page not found\n", "", "404 page not found", id="plain text from an unknown API group"
        ),
        pytest.param(b"\xff\xfe<html>", "", "\ufffd\ufffd<html>", id="undecodable bytes from a proxy"),
    ],
)
def test_api_error_from_body(body: bytes, reason: str, message: str) -> None:
    err = KubernetesApiError.from_body("GET", "/api/v1/pods/x", 404, body)
    assert (err.status, err.reason, err.message) == (404, reason, message)
    assert str(err).startswith("GET /api/v1/pods/x: 404")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match=r"watch_timeout=0 must be > 0.*page_size=0 must be > 0"):
        KubernetesSourceSettings(watch_timeout=0, page_size=0)
    with pytest.raises(ValueError, match="debounce"):
        KubernetesSourceSettings(debounce=-1)
