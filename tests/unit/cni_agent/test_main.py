"""loom-cni-agent configuration: arguments, environment and the manifest-backed pod directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni.agent.main import load_directory, parse_args

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: here, namespace: shop}
spec: {nodeName: n1, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: shop}
spec: {nodeName: n2, containers: [{name: app, image: x}]}
"""


def test_environment_supplies_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_CNI_AGENT_NODE", "n7")
    monkeypatch.setenv("LOOM_CNI_AGENT_ZDS_SOCKET", "/tmp/z.sock")
    args = parse_args([])
    assert (args.node, args.zds_socket) == ("n7", "/tmp/z.sock")
    assert parse_args(["--node", "n8"]).node == "n8"


def test_directory_holds_this_nodes_pods(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(MANIFEST)
    directory, errors = load_directory([tmp_path], "n1")
    assert errors == []
    assert directory.pod("shop", "here") is not None
    assert directory.pod("shop", "elsewhere") is None
    namespace = directory.namespace("shop")
    assert namespace is not None and namespace.meta.labels["istio.io/dataplane-mode"] == "ambient"


def test_bad_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {}\n")
    _, errors = load_directory([tmp_path], "n1")
    assert errors and any("name" in e for e in errors)
