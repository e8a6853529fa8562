"""The lab store: kubectl apply/delete/label semantics, admission by the loader, files the controller
reads unchanged, and no lost update with several writing processes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from controller.sources.directory import DirectorySource
from loom.lab.store import (
    Action,
    LabelConflict,
    LabStore,
    NotFound,
    StoredKey,
    StoreError,
    default_lab_dir,
    lab_store,
    merge_applied,
    qualified_kind,
)
from loom.resources.loader import load_paths
from loom.resources.model import ResourceKey
from loom.testing import manifests as m
from tests.samples import REPO_ROOT, samples_dir


def bookinfo() -> Path:
    return samples_dir() / "istio" / "bookinfo.yaml"


def bookinfo_documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(bookinfo().read_text()) if d is not None]


@pytest.fixture
def store(tmp_path: Path) -> LabStore:
    return LabStore(tmp_path / "config")


def ns(name: str) -> StoredKey:
    return StoredKey("Namespace", "", name)


def write(path: Path, *documents: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False))
    return path


WIDGET: dict[str, Any] = {
    "apiVersion": "example.com/v1",
    "kind": "Widget",
    "metadata": {"name": "w", "namespace": "lab"},
}


# ---------------------------------------------------------------------------------------------------
# Bookinfo: everything stored, the snapshot is the loader's reading of the same file


def test_bookinfo_is_stored_object_for_object(store: LabStore) -> None:
    report = store.apply_paths([bookinfo()])
    expected = load_paths([bookinfo()])
    assert report.ok and report.warnings == ()
    assert [o.key for o in report.outcomes] == [StoredKey.of(o.key) for o in expected.objects]
    assert {o.action for o in report.outcomes} == {Action.CREATED}
    assert report.lines[:3] == (
        "service/details created",
        "serviceaccount/bookinfo-details created",
        "deployment.apps/details-v1 created",
    )
    assert "deployment.apps/reviews-v3 created" in report.lines

    snapshot = store.snapshot()
    assert set(snapshot) == set(expected.snapshot)
    for resource_key, obj in expected.snapshot.items():
        assert snapshot[resource_key] == obj, resource_key
    assert store.load().diagnostics == ()

    # Stored as given, plus the namespace an API server fills in; one file per object where promised.
    for document in bookinfo_documents():
        key = StoredKey(document["kind"], "default", document["metadata"]["name"])
        document["metadata"]["namespace"] = "default"
        assert store.get(key) == document
        path = store.root / key.kind.lower() / "default" / f"{key.name}.yaml"
        assert store.path_of(key) == path and path.is_file()
        assert len([d for d in yaml.safe_load_all(path.read_text()) if d is not None]) == 1


def test_reapplying_changes_nothing(store: LabStore) -> None:
    store.apply_paths([bookinfo()])
    inodes = {p: p.stat().st_ino for p in store.root.rglob("*.yaml")}
    report = store.apply_paths([bookinfo()])
    assert report.ok and {o.action for o in report.outcomes} == {Action.UNCHANGED}
    assert len(report.outcomes) == 14
    assert {p: p.stat().st_ino for p in store.root.rglob("*.yaml")} == inodes  # nothing rewritten


async def test_the_controller_reads_the_store_and_none_of_its_hidden_files(store: LabStore) -> None:
    store.apply_paths([bookinfo()])
    store.label(ns("default"), {"istio.io/dataplane-mode": "ambient"})
    hidden = [p.name for p in store.root.rglob(".*")]
    assert ".lock" in hidden and ".reviews-v1.last-applied.yaml" in hidden
    snapshot, diagnostics = await DirectorySource([store.root]).load_once()
    assert diagnostics == ()
    assert set(snapshot) == {k.resource_key for k in store.list_keys()} == set(store.snapshot())
    assert ResourceKey("Namespace", "", "default") in snapshot


# ---------------------------------------------------------------------------------------------------
# apply: the three-way merge


@pytest.mark.parametrize(
    ("live", "last_applied", "config", "merged"),
    [
        pytest.param(
            {"a": 1, "b": 2}, {"a": 1}, {"a": 1}, {"a": 1, "b": 2}, id="fields set by others survive"
        ),
        pytest.param(
            {"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1}, {"a": 1}, id="field dropped from config goes"
        ),
        pytest.param({"a": 1, "b": 2}, None, {"a": 3}, {"a": 3, "b": 2}, id="never applied deletes nothing"),
        pytest.param(
            {"spec": {"x": 1, "clusterIP": "10.96.0.5"}},
            {"spec": {"x": 1}},
            {"spec": {"x": 2}},
            {"spec": {"x": 2, "clusterIP": "10.96.0.5"}},
            id="mappings merge recursively",
        ),
        pytest.param(
            {"m": {"labels": {"x": "1", "y": "2", "z": "3"}}},
            {"m": {"labels": {"x": "1", "y": "2"}}},
            {"m": {"labels": {"x": "1"}}},
            {"m": {"labels": {"x": "1", "z": "3"}}},
            id="nested field dropped from config goes, nested field of others stays",
        ),
        pytest.param(
            {"l": [1, 2], "k": 0}, {"l": [1, 2]}, {"l": [3]}, {"l": [3], "k": 0}, id="lists replaced"
        ),
        pytest.param({"a": 1, "b": 2}, None, {"a": None}, {"b": 2}, id="null deletes"),
        pytest.param({"a": {"b": 1}}, {"a": {"b": 1}}, {"a": 5}, {"a": 5}, id="mapping replaced by scalar"),
        pytest.param({"a": 5}, {"a": 5}, {"a": {"b": 1}}, {"a": {"b": 1}}, id="scalar replaced by mapping"),
        pytest.param({}, None, {"a": {"b": None, "c": 1}}, {"a": {"b": None, "c": 1}}, id="created as given"),
    ],
)
def test_merge_applied(
    live: dict[str, Any], last_applied: dict[str, Any] | None, config: dict[str, Any], merged: dict[str, Any]
) -> None:
    frozen = repr((live, last_applied, config))
    assert merge_applied(live, last_applied, config) == merged
    assert repr((live, last_applied, config)) == frozen  # inputs untouched


def test_apply_keeps_what_the_lab_and_agents_wrote_and_drops_what_the_user_removed(
    store: LabStore, tmp_path: Path
) -> None:
    store.apply_paths([bookinfo()])
    service = StoredKey("Service", "default", "reviews")
    deployment = StoredKey("Deployment", "default", "reviews-v1")
    store.update(service, lambda s: s["spec"].update(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10"]))
    store.annotate(deployment, {"ambient.istio.io/redirection": "enabled"})
    store.label(deployment, {"team": "books"})

    report = store.apply_paths([bookinfo()])
    assert {o.action for o in report.outcomes} == {Action.UNCHANGED}
    stored_service = store.get(service)
    assert stored_service is not None and stored_service["spec"]["clusterIP"] == "10.96.0.10"
    stored_deployment = store.get(deployment)
    assert stored_deployment is not None
    assert stored_deployment["metadata"]["annotations"] == {"ambient.istio.io/redirection": "enabled"}
    assert stored_deployment["metadata"]["labels"]["team"] == "books"

    # The user drops the "service" label from the Service: apply removes it, keeps the clusterIP.
    documents = [d for d in bookinfo_documents() if d["metadata"]["name"] == "reviews"]
    del documents[0]["metadata"]["labels"]["service"]
    report = store.apply_paths([write(tmp_path / "reviews.yaml", documents[0])])
    assert report.lines == ("service/reviews configured",)
    after = store.get(service)
    assert after is not None
    assert after["metadata"]["labels"] == {"app": "reviews"}
    assert after["spec"]["clusterIP"] == "10.96.0.10"
    assert store.last_applied(service) == {
        **documents[0],
        "metadata": {**documents[0]["metadata"], "namespace": "default"},
    }


# ---------------------------------------------------------------------------------------------------
# apply: admission


MIXED = """\
apiVersion: v1
kind: ServiceAccount
metadata: {name: good, namespace: lab}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: lab}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: 7}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: lab}
spec: {hosts: [reviews]}
---
apiVersion: example.com/v1
kind: Widget
metadata: {namespace: lab}
---
apiVersion: security.istio.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: old, namespace: lab}
---
apiVersion: v1
kind: pod
metadata: {name: lowercase, namespace: lab}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: lab}
spec:
  selector: {app: reviews}
  ports: [{port: 9080}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: after-error
"""


def test_invalid_objects_are_refused_with_the_loaders_words_and_the_rest_is_stored(
    store: LabStore, tmp_path: Path
) -> None:
    source = tmp_path / "mixed.yaml"
    source.write_text(MIXED)
    report = store.apply_paths([source])
    assert report.lines == (
        "serviceaccount/good created",
        "virtualservice.networking.istio.io/reviews created",
        "service/reviews created",
    )
    errors = [str(e) for e in report.errors]
    assert errors[0] == (
        f"{source} doc 2 AuthorizationPolicy lab/deny-legacy: spec.rules[0].from[0].source.namespaces: "
        "expected a list of strings, got int"
    )
    assert errors[1] == f"{source} doc 4: metadata.name: required field is missing"
    assert errors[2].startswith(f"{source} doc 5 AuthorizationPolicy lab/old: apiVersion: ")
    assert "not an API version loom reads; refused" in errors[2]
    assert errors[3] == (
        f'{source} doc 6 pod lab/lowercase: kind: unknown kind "pod": '
        "kinds are case-sensitive (did you mean Pod?)"
    )
    assert errors[4].startswith(f"{source}: line ")  # the syntax error ends the file after doc 7
    assert len(errors) == 5
    assert [str(w) for w in report.warnings] == [
        f"{source} doc 3 VirtualService lab/reviews: "
        "networking.istio.io/v1 VirtualService is not a kind loom reads; stored as given, loom ignores it"
    ]
    assert store.list_keys() == [
        StoredKey("Service", "lab", "reviews"),
        StoredKey("ServiceAccount", "lab", "good"),
        StoredKey("VirtualService.networking.istio.io", "lab", "reviews"),
    ]
    assert store.get(StoredKey("VirtualService.networking.istio.io", "lab", "reviews")) == {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "lab"},
        "spec": {"hosts": ["reviews"]},
    }
    # The controller sees the known kinds and skips the VirtualService with a warning, nothing else.
    loaded = store.load()
    assert set(loaded.snapshot) == {
        ResourceKey("Service", "lab", "reviews"),
        ResourceKey("ServiceAccount", "lab", "good"),
    }
    assert [d.is_error for d in loaded.diagnostics] == [False]


def test_list_documents_and_json_files(store: LabStore, tmp_path: Path) -> None:
    listed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            m.service_account("lab", "one"),
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "Bad"}},
        ],
    }
    (tmp_path / "list.json").write_text(json.dumps(listed))
    (tmp_path / "dup.json").write_text('{"apiVersion": "v1", "apiVersion": "v1"}')
    (tmp_path / "notes.txt").write_text("not config")
    report = store.apply_paths([tmp_path])
    assert report.lines == ("serviceaccount/one created",)
    assert [str(e) for e in report.errors] == [
        f"{tmp_path / 'dup.json'}: duplicate key 'apiVersion'",
        f"{tmp_path / 'list.json'} doc 1 ServiceAccount default/Bad: items[1].metadata.name: "
        "invalid name \"Bad\": must be at most 253 characters of lowercase letters, digits, '-' and '.', "
        "starting and ending with a letter or digit",
    ]
    missing = store.apply_paths([tmp_path / "absent.yaml"])
    assert [str(e) for e in missing.errors] == [f"{tmp_path / 'absent.yaml'}: no such file or directory"]


def test_kinds_of_other_groups_never_share_a_file(store: LabStore, tmp_path: Path) -> None:
    istio_gateway = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "default"},
        "spec": {"selector": {"istio": "ingressgateway"}},
    }
    waypoints = samples_dir() / "ambient" / "waypoint-reviews-sa.yaml"
    report = store.apply_paths([waypoints, write(tmp_path / "istio-gw.yaml", istio_gateway)])
    assert report.lines == (
        "gateway.gateway.networking.k8s.io/bookinfo-reviews created",
        "gateway.gateway.networking.k8s.io/waypoint created",
        "gateway.networking.istio.io/waypoint created",
    )
    assert store.get(StoredKey("Gateway.networking.istio.io", "default", "waypoint")) == istio_gateway
    gateway_api = store.get(StoredKey("Gateway", "default", "waypoint"))
    assert gateway_api is not None and gateway_api["apiVersion"] == "gateway.networking.k8s.io/v1"
    # A kind differing only in case from a stored unknown kind would share its directory: refused.
    store.put(WIDGET)
    with pytest.raises(StoreError, match="differing only in letter case"):
        store.put({**WIDGET, "kind": "WIDGET"})
    assert store.get(StoredKey("WIDGET.example.com", "lab", "w")) is None


def test_unknown_kinds_keep_their_namespace_as_written(store: LabStore) -> None:
    cluster_wide = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert store.put(cluster_wide) == StoredKey("Widget.example.com", "", "w")
    assert store.put(WIDGET) == StoredKey("Widget.example.com", "lab", "w")
    assert store.list_keys(kind="Widget.example.com") == [
        StoredKey("Widget.example.com", "", "w"),
        StoredKey("Widget.example.com", "lab", "w"),
    ]
    assert store.list(kind="Widget.example.com", namespace="") == [cluster_wide]


@pytest.mark.parametrize(
    ("kind", "api_version", "qualified"),
    [
        ("Deployment", "apps/v1", "Deployment"),
        ("Gateway", "gateway.networking.k8s.io/v1beta1", "Gateway"),
        ("Gateway", "networking.istio.io/v1", "Gateway.networking.istio.io"),
        ("ConfigMap", "v1", "ConfigMap"),
        ("StatefulSet", "apps/v1", "StatefulSet.apps"),
    ],
)
def test_qualified_kind(kind: str, api_version: str, qualified: str) -> None:
    assert qualified_kind(kind, api_version) == qualified


# ---------------------------------------------------------------------------------------------------
# delete


def test_delete_removes_files_and_directories_and_reports_missing_objects(store: LabStore) -> None:
    store.apply_paths([bookinfo()])
    report = store.delete_paths([bookinfo()])
    assert report.ok and len(report.outcomes) == 14
    assert report.lines[0] == "service/details deleted"
    assert store.list() == []
    assert sorted(p.name for p in store.root.iterdir()) == [".lock"]  # empty directories removed too

    again = store.delete_paths([bookinfo()])
    assert again.outcomes == () and len(again.errors) == 14
    assert str(again.errors[0]).endswith("doc 1 Service default/details: not found")
    assert store.delete_paths([bookinfo()], ignore_not_found=True).diagnostics == ()


def test_an_object_that_fails_validation_can_still_be_deleted(store: LabStore, tmp_path: Path) -> None:
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "lab"}, "spec": {}}
    store.put(good)
    broken = {**good, "spec": {"ports": [{"port": 70000}]}}
    assert store.apply_paths([write(tmp_path / "b.yaml", broken)]).errors
    assert store.get(StoredKey("Service", "lab", "s")) == good
    assert store.delete_paths([tmp_path / "b.yaml"]).lines == ("service/s deleted",)


def test_deleting_a_namespace_deletes_what_is_in_it(store: LabStore) -> None:
    store.put(m.namespace("shop"))
    store.put(m.service_account("shop", "cart"))
    store.put({**WIDGET, "metadata": {"name": "w", "namespace": "shop"}})
    store.put(m.service_account("other", "stays"))
    assert store.remove(ns("shop")) is True
    assert store.list_keys() == [StoredKey("ServiceAccount", "other", "stays")]
    assert store.remove(ns("shop")) is False
    protected = samples_dir() / "ambient" / "namespace.yaml"  # the default namespace, enrolled
    store.apply_paths([protected])
    refused = store.delete_paths([protected])
    assert [str(e) for e in refused.errors] == [
        f"{protected} doc 1 Namespace default: this namespace may not be deleted"
    ]
    with pytest.raises(StoreError, match="may not be deleted"):
        store.remove(ns("default"))
    assert store.get(ns("default")) is not None


# ---------------------------------------------------------------------------------------------------
# label and annotate


def test_label_creates_a_missing_namespace(store: LabStore) -> None:
    outcome = store.change_labels(ns("bookinfo"), {"istio.io/dataplane-mode": "ambient"})
    assert outcome.created and outcome.changed and outcome.missing == ()
    assert store.get(ns("bookinfo")) == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "bookinfo", "labels": {"istio.io/dataplane-mode": "ambient"}},
    }
    with pytest.raises(NotFound):
        store.label(ns("elsewhere"), {"a": "b"}, create_namespace=False)
    with pytest.raises(NotFound):
        store.label(StoredKey("Pod", "default", "absent"), {"a": "b"})


def test_label_without_overwrite_keeps_kubectl_rules(store: LabStore) -> None:
    store.put(m.namespace("default", {"istio.io/dataplane-mode": "none", "keep": "me"}))
    with pytest.raises(LabelConflict, match='already has the value "none"'):
        store.change_labels(
            ns("default"), {"other": "x", "istio.io/dataplane-mode": "ambient"}, overwrite=False
        )
    assert store.get(ns("default")) == m.namespace(
        "default", {"istio.io/dataplane-mode": "none", "keep": "me"}
    )

    same = store.change_labels(ns("default"), {"istio.io/dataplane-mode": "none"}, overwrite=False)
    assert not same.changed and not same.created
    changed = store.change_labels(ns("default"), {"istio.io/dataplane-mode": "ambient"}, overwrite=True)
    assert changed.changed and changed.manifest["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    removed = store.change_labels(
        ns("default"), {"keep": None, "absent": None, "istio.io/dataplane-mode": None}
    )
    assert removed.missing == ("absent",)
    assert "labels" not in removed.manifest["metadata"]  # an empty map is omitted, as the API server does


def test_label_on_a_deployment_changes_only_the_deployment(store: LabStore) -> None:
    store.apply_paths([bookinfo()])
    key = StoredKey("Deployment", "default", "reviews-v2")
    before = store.get(key)
    manifest = store.label(key, {"istio.io/use-waypoint": "waypoint"})
    assert manifest["metadata"]["labels"]["istio.io/use-waypoint"] == "waypoint"
    assert before is not None and manifest["spec"] == before["spec"]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        pytest.param({"bad key!": "x"}, "metadata.labels.bad key!: invalid key", id="key"),
        pytest.param(
            {"ok": "not a value!"}, 'metadata.labels.ok: invalid label value "not a value!"', id="value"
        ),
        pytest.param({"ok": "x" * 64}, "metadata.labels.ok: invalid label value", id="value too long"),
    ],
)
def test_invalid_labels_are_refused(store: LabStore, changes: dict[str, str | None], problem: str) -> None:
    with pytest.raises(StoreError, match=re.escape(problem)):
        store.label(ns("default"), changes)
    assert store.get(ns("default")) is None


def test_annotate(store: LabStore) -> None:
    key = StoredKey("Pod", "default", "p")
    assert store.annotate(key, {"a": "1"}) is None
    store.put(m.pod("default", "p", annotations={"old": "x"}))
    manifest = store.annotate(key, {"ambient.istio.io/redirection": "enabled", "old": None})
    assert manifest is not None and manifest["metadata"]["annotations"] == {
        "ambient.istio.io/redirection": "enabled"
    }
    assert store.snapshot()[key.resource_key].meta.annotations == {"ambient.istio.io/redirection": "enabled"}
    with pytest.raises(StoreError, match=r"metadata\.annotations\.no spaces: invalid key"):
        store.annotate(key, {"no spaces": "x"})


# ---------------------------------------------------------------------------------------------------
# single objects, keys and paths


def test_put_refuses_invalid_objects_naming_the_field(store: LabStore) -> None:
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"ports": [{"port": 70000}]},
    }
    with pytest.raises(
        StoreError, match=r"Service default/s: spec\.ports\[0\]\.port: must be between 1 and 65535"
    ):
        store.put(bad)
    assert store.list_keys() == []


def test_update_may_not_move_the_object(store: LabStore) -> None:
    key = store.put(m.service_account("lab", "sa"))
    with pytest.raises(StoreError, match="may not move"):
        store.update(key, lambda sa: sa["metadata"].update(name="other"))
    assert store.get(key) == m.service_account("lab", "sa")
    assert store.update(StoredKey("ServiceAccount", "lab", "absent"), lambda sa: None) is None


@pytest.mark.parametrize(
    "key",
    [
        StoredKey("Pod", "default", "../../etc/passwd"),
        StoredKey("Pod", "../x", "p"),
        StoredKey("../Pod", "default", "p"),
        StoredKey("Pod", "default", ".hidden"),
        StoredKey("Pod", "default", ""),
    ],
    ids=str,
)
def test_keys_cannot_point_outside_the_store(store: LabStore, key: StoredKey) -> None:
    with pytest.raises(StoreError, match="invalid"):
        store.path_of(key)
    with pytest.raises(StoreError, match="invalid"):
        store.remove(key)


def test_list_filters(store: LabStore) -> None:
    store.apply_paths([bookinfo()])
    store.put(m.service_account("other", "sa"))
    assert [s["metadata"]["name"] for s in store.list(kind="Service")] == [
        "details",
        "productpage",
        "ratings",
        "reviews",
    ]
    assert [s["metadata"]["namespace"] for s in store.list(namespace="other")] == ["other"]
    assert store.list(kind="Namespace") == []
    with pytest.raises(StoreError):
        store.list(kind="../x")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Path("/var/run/loom-lab")),
        ({"LOOM_LAB_DIR": ""}, Path("/var/run/loom-lab")),
        ({"LOOM_LAB_DIR": "/x"}, Path("/x")),
    ],
)
def test_default_lab_dir(env: dict[str, str], expected: Path) -> None:
    assert default_lab_dir(env) == expected
    assert lab_store(expected).root == expected / "config"


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@example(spec={"yes": "no", "n": "0755", "t": "2020-01-01", "~": "=", "<<": "null"}, annotation="\x85")  # NEL
@given(spec=_JSON, annotation=st.text(st.characters(codec="utf-8"), max_size=30))
def test_stored_values_read_back_exactly(spec: Any, annotation: str) -> None:
    # Strings that look like other YAML types ("yes", "0755", "2020-01-01", "~") must stay strings.
    with tempfile.TemporaryDirectory() as directory:
        store = LabStore(Path(directory))
        manifest = {
            **WIDGET,
            "metadata": {**WIDGET["metadata"], "annotations": {"a": annotation}},
            "spec": spec,
        }
        key = store.put(manifest)
        assert store.get(key) == manifest


# ---------------------------------------------------------------------------------------------------
# Concurrency


def test_a_held_lock_is_waited_for_boundedly_and_reads_need_none(store: LabStore) -> None:
    key = store.put(m.namespace("lab"))
    patient = LabStore(store.root, lock_timeout=0.2)
    fd = os.open(store.root / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match=r"\.lock: still locked by another process after 0.2 s"):
            patient.label(key, {"a": "b"})
        assert patient.get(key) == m.namespace("lab")
    finally:
        os.close(fd)
    assert patient.label(key, {"a": "b"})["metadata"]["labels"] == {"a": "b"}


def test_threads_lose_no_update(store: LabStore) -> None:
    def writer(tag: str) -> None:
        for i in range(25):
            store.label(ns("shared"), {f"{tag}-{i}": "x"})

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    manifest = store.get(ns("shared"))
    assert manifest is not None and len(manifest["metadata"]["labels"]) == 100


_WRITER = """
import pathlib, sys, time
from loom.lab.store import LabStore, StoredKey
root, tag, count, go = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
deadline = time.monotonic() + 30
while not go.exists():  # start together so that the writers overlap
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.002)
store = LabStore(root)
for i in range(count):
    store.label(StoredKey("Namespace", "", "shared"), {f"{tag}-{i}": str(i)})
    meta = {"name": f"{tag}-{i}", "namespace": "lab"}
    store.put({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
"""


def test_processes_lose_no_update(store: LabStore, tmp_path: Path) -> None:
    go = tmp_path / "go"
    count = 40
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(store.root), tag, str(count), str(go)],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    go.touch()
    try:
        for writer in writers:
            _, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    manifest = store.get(ns("shared"))
    assert manifest is not None
    assert manifest["metadata"]["labels"] == {f"{t}-{i}": str(i) for t in ("a", "b") for i in range(count)}
    assert len(store.list_keys(kind="ServiceAccount")) == 2 * count
    assert not [p for p in store.root.rglob("*.tmp")]  # no temporary file left behind
