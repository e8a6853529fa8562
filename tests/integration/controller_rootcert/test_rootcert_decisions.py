"""The root certificate publisher's pure decisions: the namespaces, the ConfigMap, what a stored one is."""

from __future__ import annotations

from typing import Any

import pytest
from rootcert_harness import ROOT_A, ROOT_B

from controller.rootcert import (
    CONFIGMAP_NAME,
    IGNORED_NAMESPACES,
    LABEL_ISTIO_CONFIG,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    ROOT_CERT_KEY,
    Found,
    RootCertPublisher,
    classify,
    desired_config_map,
    namespace_names,
    target_namespaces,
)
from loom.resources.model import ConfigSnapshot, Namespace, ObjectMeta, Service


def stored(labels: dict[str, str] | None, data: dict[str, str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": CONFIGMAP_NAME, "namespace": "shop", "resourceVersion": "7"}
    if labels is not None:
        meta["labels"] = labels
    found: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    if data is not None:
        found["data"] = data
    return found


OURS = {LABEL_MANAGED_BY: MANAGED_BY}


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        pytest.param(None, Found.MISSING, id="no ConfigMap"),
        pytest.param(stored(OURS, {ROOT_CERT_KEY: ROOT_A}), Found.CURRENT, id="ours with the root"),
        pytest.param(
            stored({**OURS, "team": "x"}, {ROOT_CERT_KEY: ROOT_A, "extra.pem": "x"}),
            Found.CURRENT,
            id="ours with keys and labels others added",
        ),
        pytest.param(stored(OURS, {ROOT_CERT_KEY: ROOT_B}), Found.STALE, id="ours with another root"),
        pytest.param(stored(OURS, {ROOT_CERT_KEY: ROOT_A + ROOT_B}), Found.STALE, id="ours with a bundle"),
        pytest.param(stored(OURS, None), Found.STALE, id="ours without data"),
        pytest.param(stored(OURS, {"ca.crt": ROOT_A}), Found.STALE, id="ours under another key"),
        pytest.param(stored(None, {ROOT_CERT_KEY: ROOT_A}), Found.FOREIGN, id="hand-made with the root"),
        pytest.param(
            stored({LABEL_ISTIO_CONFIG: "true"}, {ROOT_CERT_KEY: ROOT_B}), Found.FOREIGN, id="istiod"
        ),
        pytest.param(
            stored({LABEL_MANAGED_BY: "Helm"}, {ROOT_CERT_KEY: ROOT_A}), Found.FOREIGN, id="another manager"
        ),
        pytest.param(
            {"metadata": {"name": CONFIGMAP_NAME, "labels": ["not", "a", "map"]}},
            Found.FOREIGN,
            id="malformed labels",
        ),
    ],
)
def test_classify(current: dict[str, Any] | None, expected: Found) -> None:
    assert classify(current, ROOT_A) is expected


def test_desired_config_map_holds_the_root_under_istios_name_and_key_with_our_label() -> None:
    manifest = desired_config_map("shop", ROOT_A)
    assert manifest == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "istio-ca-root-cert",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/managed-by": "loom-controller", "istio.io/config": "true"},
        },
        "data": {"root-cert.pem": ROOT_A},
    }
    assert classify(manifest, ROOT_A) is Found.CURRENT  # what we write is what we accept as current


@pytest.mark.parametrize(
    ("namespaces", "expected"),
    [
        pytest.param([], (), id="none"),
        pytest.param(["shop", "default", "shop"], ("default", "shop"), id="sorted, each once"),
        pytest.param(
            ["kube-system", "kube-public", "kube-node-lease", "local-path-storage", "istio-system"],
            ("istio-system", "kube-system"),
            id="Istio's ignored namespaces except kube-system",
        ),
        pytest.param(["", "default"], ("default",), id="no empty name"),
    ],
)
def test_target_namespaces(namespaces: list[str], expected: tuple[str, ...]) -> None:
    assert target_namespaces(namespaces) == expected
    assert not set(expected) & IGNORED_NAMESPACES


def test_namespace_names_are_the_snapshots_namespaces_only() -> None:
    snapshot = ConfigSnapshot(
        {
            obj.key: obj
            for obj in (
                Namespace(ObjectMeta("default", "")),
                Namespace(ObjectMeta("shop", "")),
                Service(ObjectMeta("web", "other")),
            )
        }
    )
    assert sorted(namespace_names(snapshot)) == ["default", "shop"]


class _Nowhere:
    """A writer for tests that must not reach it."""

    async def get_object(self, key: Any) -> dict[str, Any] | None:
        raise AssertionError(f"unexpected read of {key}")

    async def create_or_update(self, manifest: Any) -> dict[str, Any]:
        raise AssertionError(f"unexpected write of {manifest}")


def test_resync_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="resync_seconds"):
        RootCertPublisher(_Nowhere(), lambda: ROOT_A, resync_seconds=0)


async def test_nothing_to_publish_touches_nothing() -> None:
    publisher = RootCertPublisher(_Nowhere(), lambda: ROOT_A)
    report = await publisher.publish(["kube-public", "kube-node-lease"], resync=True)
    assert (report.namespaces, report.checked, report.written, report.retry_after) == (0, 0, (), None)
