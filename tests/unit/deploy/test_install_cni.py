"""install-cni (deploy/tools/install_cni.py): the plugin onto a node and into its CNI configuration list,
idempotent, repaired after the primary CNI rewrites its file, and removed again by uninstall.

A node is two temporary directories (bin and net.d); the bundle is a real one, so the wrapper written
into the bin directory is executed the way a container runtime executes a plugin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from manifest_index import REPO, find, installed

from deploy.tools.build_cni_bundle import Bundle
from deploy.tools.install_cni import (
    BUNDLES_DIR,
    PLUGIN_TYPE,
    WRAPPER_NAME,
    InstallError,
    Layout,
    chained,
    chained_file_name,
    check,
    config_file_names,
    install_pass,
    read_plugin_entry,
    unchained,
    uninstall_pass,
    watch,
)

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
ENTRY = {"type": PLUGIN_TYPE, "agentSocket": "/var/run/loom-cni/pluginevent.sock"}
CALICO = {
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "calico", "ipam": {"type": "calico-ipam"}},
        {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
    ],
}
KINDNET_SINGLE = {"cniVersion": "0.3.1", "name": "kindnet", "type": "ptp", "ipam": {"type": "host-local"}}


def write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    path.write_text(json.dumps(value))
    os.chmod(path, mode)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture
def plugin_config(tmp_path: Path) -> Path:
    path = tmp_path / "plugin.json"
    write_json(path, ENTRY)
    return path


# ---------------------------------------------------------------------------------------------------
# the configuration, pure


def test_chaining_appends_one_entry_after_the_existing_plugins() -> None:
    result = chained(CALICO, ENTRY)
    assert result["name"] == CALICO["name"] and result["cniVersion"] == CALICO["cniVersion"]
    assert result["plugins"] == [*CALICO["plugins"], ENTRY]
    again = chained(result, {**ENTRY, "logLevel": "debug"})
    assert again["plugins"] == [*CALICO["plugins"], {**ENTRY, "logLevel": "debug"}]
    assert unchained(again) == CALICO
    assert unchained(CALICO) == CALICO


def test_a_single_plugin_becomes_the_first_of_a_list() -> None:
    result = chained(KINDNET_SINGLE, ENTRY)
    assert result == {
        "cniVersion": "0.3.1",
        "name": "kindnet",
        "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}, ENTRY],
    }
    assert chained_file_name("10-kindnet.conf", KINDNET_SINGLE) == "10-kindnet.conflist"
    assert chained_file_name("10-calico.conflist", CALICO) == "10-calico.conflist"


def test_configurations_without_prev_result_cannot_be_chained() -> None:
    with pytest.raises(InstallError, match=r"cniVersion '0\.2\.0': chaining needs 0\.3\.0"):
        chained({**KINDNET_SINGLE, "cniVersion": "0.2.0"}, ENTRY)


def test_the_runtime_reads_the_lexically_first_config_file() -> None:
    names = [
        "99-last.conflist",
        "10-calico.conflist",
        "05-cilium.json",
        "README",
        ".loom-cni-1.tmp",
        "00.conf",
    ]
    assert config_file_names(names) == ["00.conf", "05-cilium.json", "10-calico.conflist", "99-last.conflist"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"type": "bridge"}', "\"type\" must be 'loom-cni'"),
        ('{"type": "loom-cni", "name": "n"}', "'name' belongs to the network configuration"),
    ],
)
def test_plugin_configuration_problems_are_named(text: str, problem: str) -> None:
    with pytest.raises(InstallError, match=problem):
        read_plugin_entry(text, "plugin.json")


def test_the_shipped_configmap_holds_a_valid_entry() -> None:
    text = find(installed(), "ConfigMap", "loom-cni-config")["data"]["plugin.json"]
    assert read_plugin_entry(text, "ConfigMap")["type"] == PLUGIN_TYPE


# ---------------------------------------------------------------------------------------------------
# a node


def test_install_chains_the_plugin_and_a_second_pass_changes_nothing(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    config = layout.net_dir / "10-calico.conflist"
    write_json(config, CALICO, mode=0o600)
    report = install_pass(cni_bundle.root, plugin_config, layout)
    assert report.changes
    assert read_json(config)["plugins"] == [*CALICO["plugins"], ENTRY]
    assert config.stat().st_mode & 0o777 == 0o600, "the primary CNI's file keeps its mode"
    assert os.access(layout.wrapper, os.X_OK)
    assert sorted(p.name for p in layout.bundles.iterdir()) == [cni_bundle.id]
    assert check(cni_bundle.root, plugin_config, layout) == []
    inode = config.stat().st_ino
    assert install_pass(cni_bundle.root, plugin_config, layout).changes == []
    assert config.stat().st_ino == inode, "an installed node is not rewritten"
    assert sorted(os.listdir(layout.net_dir)) == ["10-calico.conflist"], "no temporary file left behind"


def test_a_single_plugin_file_is_converted_and_the_original_removed(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    write_json(layout.net_dir / "10-kindnet.conf", KINDNET_SINGLE)
    install_pass(cni_bundle.root, plugin_config, layout)
    assert sorted(os.listdir(layout.net_dir)) == ["10-kindnet.conflist"]
    assert read_json(layout.net_dir / "10-kindnet.conflist") == chained(KINDNET_SINGLE, ENTRY)


def test_conversion_never_overwrites_a_file_the_runtime_does_not_use(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    write_json(layout.net_dir / "10-kindnet.conf", KINDNET_SINGLE)
    write_json(layout.net_dir / "10-kindnet.conflist", CALICO)
    with pytest.raises(InstallError, match=r"10-kindnet\.conflist exists already"):
        install_pass(cni_bundle.root, plugin_config, layout)
    assert read_json(layout.net_dir / "10-kindnet.conflist") == CALICO


def test_a_rewritten_primary_config_and_an_edited_entry_are_repaired(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    config = layout.net_dir / "10-calico.conflist"
    write_json(config, CALICO)
    install_pass(cni_bundle.root, plugin_config, layout)
    write_json(config, CALICO)  # the primary CNI restarted and wrote its own file again
    assert check(cni_bundle.root, plugin_config, layout) == [
        f"{config} does not end with the current {PLUGIN_TYPE} entry"
    ]
    install_pass(cni_bundle.root, plugin_config, layout)
    assert check(cni_bundle.root, plugin_config, layout) == []
    edited = {**ENTRY, "excludeNamespaces": ["kube-system", "istio-system"]}
    write_json(plugin_config, edited)
    install_pass(cni_bundle.root, plugin_config, layout)
    assert read_json(config)["plugins"] == [*CALICO["plugins"], edited]


def test_unreadable_candidates_are_skipped_and_a_missing_config_is_reported(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    with pytest.raises(InstallError, match="no CNI network configuration"):
        install_pass(cni_bundle.root, plugin_config, layout)
    assert any("no CNI network configuration" in p for p in check(cni_bundle.root, plugin_config, layout))
    (layout.net_dir / "00-broken.conf").write_text("{not json")
    write_json(layout.net_dir / "10-calico.conflist", CALICO)
    report = install_pass(cni_bundle.root, plugin_config, layout)
    assert any("00-broken.conf: skipped" in w for w in report.warnings)
    assert read_json(layout.net_dir / "10-calico.conflist")["plugins"][-1] == ENTRY


def test_other_bundle_versions_are_removed_after_the_switch(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    write_json(layout.net_dir / "10-calico.conflist", CALICO)
    old = layout.bundles / "0123456789abcdef"
    old.mkdir(parents=True)
    (old / "python3.11").write_text("an older bundle")
    install_pass(cni_bundle.root, plugin_config, layout)
    assert sorted(p.name for p in layout.bundles.iterdir()) == [cni_bundle.id]


def test_uninstall_takes_the_plugin_out_everywhere_and_is_idempotent(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    write_json(layout.net_dir / "10-calico.conflist", CALICO)
    install_pass(cni_bundle.root, plugin_config, layout)
    # A second file naming loom-cni (say, a copy the primary CNI made) is cleaned as well.
    write_json(layout.net_dir / "20-backup.conflist", chained(CALICO, ENTRY))
    report = uninstall_pass(layout)
    assert report.changes
    assert read_json(layout.net_dir / "10-calico.conflist") == CALICO
    assert read_json(layout.net_dir / "20-backup.conflist") == CALICO
    assert sorted(os.listdir(layout.bin_dir)) == []
    assert uninstall_pass(layout).changes == []


def test_the_installed_wrapper_is_what_a_runtime_executes(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path], tmp_path: Path
) -> None:
    """ADD through `<bin>/loom-cni` with the stdin libcni builds from the chained list and nothing else
    in the environment: an excluded namespace passes through, any other pod needs its agent."""
    layout = Layout(*node)
    write_json(layout.net_dir / "10-calico.conflist", CALICO)
    shipped = find(installed(), "ConfigMap", "loom-cni-config")["data"]["plugin.json"]
    plugin_config.write_text(shipped)
    install_pass(cni_bundle.root, plugin_config, layout)
    conflist = read_json(layout.net_dir / "10-calico.conflist")
    entry = conflist["plugins"][-1]
    prev = {"cniVersion": "0.3.1", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.1.2.3/24"}]}

    def add(namespace: str, plugin: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = {
            **plugin,
            "name": conflist["name"],
            "cniVersion": conflist["cniVersion"],
            "prevResult": prev,
        }
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "abc123",
            "CNI_NETNS": "/var/run/netns/cni-x",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=p;K8S_POD_UID=u",
            "CNI_PATH": str(layout.bin_dir),
        }
        result = subprocess.run(
            [str(layout.bin_dir / WRAPPER_NAME)],
            input=json.dumps(request).encode(),
            env=env,
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
        return result.returncode, json.loads(result.stdout)

    status, answer = add("istio-system", entry)
    assert status == 0 and answer["ips"] == prev["ips"]
    status, answer = add("default", {**entry, "agentSocket": str(tmp_path / "absent.sock")})
    assert status == 1 and answer["code"] == 11


def test_watch_waits_for_the_primary_cni_and_stops_on_request(
    cni_bundle: Bundle, plugin_config: Path, node: tuple[Path, Path]
) -> None:
    layout = Layout(*node)
    stop = threading.Event()
    worker = threading.Thread(target=watch, args=(cni_bundle.root, plugin_config, layout, 0.02, stop))
    worker.start()
    try:
        write_json(layout.net_dir / "10-calico.conflist", CALICO)  # a fresh node gets its primary CNI
        for _ in range(int(WAIT / 0.02)):
            if check(cni_bundle.root, plugin_config, layout) == []:
                break
            stop.wait(0.02)
        assert check(cni_bundle.root, plugin_config, layout) == []
    finally:
        stop.set()
        worker.join(WAIT)
    assert not worker.is_alive()


def run_tool(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.tools.install_cni", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_command_line_check_and_uninstall_wait(
    node: tuple[Path, Path], plugin_config: Path, cni_bundle: Bundle
) -> None:
    bin_dir, net_dir = node
    dirs = (f"--cni-bin-dir={bin_dir}", f"--cni-net-dir={net_dir}")
    checking = run_tool("check", *dirs, f"--bundle={cni_bundle.root}", f"--plugin-config={plugin_config}")
    _, errors = checking.communicate(timeout=WAIT)
    assert checking.returncode == 1 and f"{WRAPPER_NAME} is missing" in errors
    waiting = run_tool("uninstall", "--wait", *dirs)
    try:
        # It logs once it has looked at the node, then waits for SIGTERM like a DaemonSet's container.
        assert waiting.stderr is not None
        line = waiting.stderr.readline()
        assert "nothing to change: the node is already clean" in line
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(WAIT) == 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(WAIT)
        for stream in (waiting.stdout, waiting.stderr):
            if stream is not None:
                stream.close()
    assert BUNDLES_DIR not in os.listdir(bin_dir)
