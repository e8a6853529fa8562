"""loom-cni-agent configuration: arguments, environment, the snapshot-backed pod directory, start-up
errors and the prerequisite messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cni.agent.agent import SnapshotDirectory
from cni.agent.health import DEFAULT_HTTP_PORT
from cni.agent.main import config_from_args, config_problems, parse_args, parse_host_port, run
from cni.agent.prerequisites import KernelFeature, check_prerequisites, probe_features
from controller.sources.directory import DirectorySource

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
---
apiVersion: v1
kind: Pod
metadata: {name: unscheduled, namespace: shop}
spec: {containers: [{name: app, image: x}]}
"""


def test_environment_supplies_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_CNI_AGENT_NODE", "n7")
    monkeypatch.setenv("LOOM_CNI_AGENT_ZDS_SOCKET", "/tmp/z.sock")
    monkeypatch.setenv("LOOM_CNI_AGENT_HTTP_ADDR", "127.0.0.2:0")
    monkeypatch.setenv("LOOM_CNI_AGENT_ANNOTATE_STORE", "/tmp/store")
    args = parse_args([])
    assert (args.node, args.zds_socket, args.http_addr) == ("n7", "/tmp/z.sock", ("127.0.0.2", 0))
    assert args.annotate_store == Path("/tmp/store")
    assert parse_args(["--node", "n8"]).node == "n8"
    config = config_from_args(parse_args(["--http-addr", "[::1]:9", "--host-netns", "/run/netns/x"]))
    assert (config.http_host, config.http_port, config.host_netns) == ("::1", 9, "/run/netns/x")


def test_http_addr_default_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOM_CNI_AGENT_HTTP_ADDR", raising=False)
    assert parse_args([]).http_addr == ("127.0.0.1", DEFAULT_HTTP_PORT)
    assert parse_host_port(":0") == ("0.0.0.0", 0)
    for bad in ("localhost", "1.2.3.4:99999", "nohost:80", "1.2.3.4:"):
        with pytest.raises(Exception, match="is not"):
            parse_host_port(bad)


async def test_directory_holds_this_nodes_pods(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(MANIFEST)
    snapshot, diagnostics = await DirectorySource([tmp_path]).load_once()
    assert [d for d in diagnostics if d.is_error] == []
    directory = SnapshotDirectory(snapshot, "n1")
    assert directory.pod("shop", "here") is not None
    assert directory.pod("shop", "unscheduled") is not None  # a plugin ADD proves where it runs
    assert directory.pod("shop", "elsewhere") is None
    assert {p.meta.name for p in directory.pods()} == {"here", "unscheduled"}
    namespace = directory.namespace("shop")
    assert namespace is not None and namespace.meta.labels["istio.io/dataplane-mode"] == "ambient"
    assert {p.meta.name for p in SnapshotDirectory(snapshot).pods()} == {"here", "elsewhere", "unscheduled"}


async def test_missing_manifest_path_is_a_clear_start_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse_args(["--manifests", str(tmp_path / "nope"), "--state-file", str(tmp_path / "s.json")])
    assert await asyncio.wait_for(run(config_from_args(args)), 5) == 2
    assert "nope" in capsys.readouterr().err
    args = parse_args(["--host-netns", str(tmp_path / "no-netns")])
    assert config_problems(config_from_args(args)) == [f"--host-netns {tmp_path / 'no-netns'} does not exist"]
    assert config_problems(config_from_args(parse_args(["--host-netns", "/proc/self/ns/net"]))) == []


def test_prerequisite_messages_name_what_is_missing() -> None:
    not_root = check_prerequisites(("sh",), euid=1000)
    assert len(not_root) == 1 and "must run as root" in not_root[0]
    missing_tool = check_prerequisites(("no-such-tool-xyz",), euid=1000)
    assert "no-such-tool-xyz is not installed" in missing_tool[0]
    no_setns = check_prerequisites(
        ("sh",), euid=0, probe_setns=lambda: "setns is not permitted", probe_kernel=lambda: ["unused"]
    )
    assert no_setns == ["setns is not permitted"]
    kernel = check_prerequisites(("sh",), euid=0, probe_setns=lambda: None, probe_kernel=lambda: ["no nat"])
    assert kernel == ["no nat"]


def test_kernel_probe_skips_features_whose_table_is_missing() -> None:
    nat = KernelFeature("the iptables nat table", "capture", ("x",))
    owner = KernelFeature("the owner match", "probe SNAT", ("x",), requires=("the iptables nat table",))
    mangle = KernelFeature("the iptables mangle table", "marks", ("x",))
    probed: list[str] = []

    def run_probe(feature: KernelFeature) -> str | None:
        probed.append(feature.name)
        return "unable to initialize table 'nat'" if feature is nat else None

    problems = probe_features([nat, owner, mangle], run_probe)
    assert probed == ["the iptables nat table", "the iptables mangle table"]
    assert problems == [
        "the kernel lacks the iptables nat table, needed for capture: unable to initialize table 'nat'"
    ]
