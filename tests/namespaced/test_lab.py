"""The lab end to end, as a user drives it: `loomctl lab up`, `apply`, `label`, `lab exec`, `lab down`.

One lab (own state directory and namespace prefix, so a user's lab is never touched) is built for the
module; the tests run in order against it, and the last one crashes it on purpose and checks that
`lab down` still leaves nothing behind. Root only."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loom.cli.main import main as loomctl
from loom.lab.cluster import Cluster, call_from_netns, http_get_in_netns
from loom.lab.network import list_namespaces
from loom.lab.processes import marked_pids

pytestmark = pytest.mark.root

NS = "demo"
WAIT = 30.0

CONFIG: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "echo", "namespace": NS}},
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "echo"}},
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {
                    "serviceAccountName": "echo",
                    "containers": [
                        {"name": "echo", "image": "x", "ports": [{"containerPort": 8080, "name": "http"}]}
                    ],
                },
            },
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    },
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "client", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "client"}},
            "template": {
                "metadata": {"labels": {"app": "client"}},
                "spec": {"containers": [{"name": "client", "image": "x"}]},
            },
        },
    },
]


def eventually(test: Callable[[], bool], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not test():
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab_dir = Path(f"/tmp/lt-lab-{secrets.token_hex(3)}")  # short: unix socket paths live in it
    config = tmp_path_factory.mktemp("labcfg") / "app.yaml"
    config.write_text(yaml.safe_dump_all(CONFIG, sort_keys=False))
    cluster = Cluster(lab_dir, prefix="lt" + secrets.token_hex(2))
    os.environ["LOOM_LAB_PREFIX"] = cluster.prefix  # for the loomctl commands the tests run
    try:
        cluster.up([config], 2, lambda line: None)
        yield cluster
    finally:
        os.environ.pop("LOOM_LAB_PREFIX", None)
        cluster.down(lambda line: None)
        shutil.rmtree(lab_dir, ignore_errors=True)
        assert list_namespaces(cluster.prefix + "-") == []


def ctl(cluster: Cluster, *argv: str) -> int:
    return loomctl([*argv, "--lab-dir", str(cluster.lab_dir)])


def pod(cluster: Cluster, app: str) -> Any:
    return next(r for k, r in sorted(cluster.require_state().pods.items()) if r.name.startswith(app + "-"))


def call(cluster: Cluster, source: str, url: str, count: int = 10) -> tuple[bool, list[dict[str, Any]]]:
    outcome = call_from_netns(pod(cluster, source).netns, url, count)
    return outcome.ok, outcome.answers


def redirection(cluster: Cluster) -> dict[str, str]:
    return {p.name: p.redirection for p in cluster.status().pods}


def mtls_connections(cluster: Cluster, node: str, destination_sa: str) -> float:
    net = cluster.node_net(cluster.require_state(), node)
    answer = http_get_in_netns(net.netns, str(net.wire_ip), 15020, "/metrics")
    assert answer is not None and answer[0] == 200
    total = 0.0
    for line in answer[1].decode().splitlines():
        if (
            line.startswith("istio_tcp_connections_opened_total{")
            and 'reporter="destination"' in line
            and 'connection_security_policy="mutual_tls"' in line
            and f'destination_principal="spiffe://cluster.local/ns/{NS}/sa/{destination_sa}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_pods_are_spread_over_nodes_and_reach_services_by_name(cluster: Cluster) -> None:
    status = cluster.status()
    assert status.up and status.controller_running
    assert [n.ztunnel_ready for n in status.nodes] == [True, True]
    echo_nodes = {p.node for p in status.pods if p.name.startswith("echo-")}
    assert len(status.pods) == 3 and all(p.running for p in status.pods)
    assert echo_nodes == {"node-1", "node-2"}
    assert all(p.redirection == "" for p in status.pods)  # the namespace is not enrolled
    seen: set[str] = set()
    for name in ("echo", f"echo.{NS}", f"echo.{NS}.svc.cluster.local"):
        ok, answers = call(cluster, "client", f"http://{name}/hello")
        assert ok and len(answers) == 10, name
        assert {a["namespace"] for a in answers} == {NS}
        seen |= {a["pod"] for a in answers}
    assert len(seen) == 2  # the Service VIP balances over both echo pods (on two nodes)


def test_lab_exec_runs_in_the_pod_namespace(cluster: Cluster) -> None:
    record = pod(cluster, "client")
    result = subprocess.run(
        [sys.executable, "-m", "loom.cli.main", "lab", "exec", f"{NS}/{record.name}", "--lab-dir",
         str(cluster.lab_dir), "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{record.ip}/32" in result.stdout


def test_enrol_and_unenrol_at_runtime_without_restarting_pods(cluster: Cluster) -> None:
    pids = {k: r.process.pid for k, r in cluster.require_state().pods.items() if r.process}
    assert ctl(cluster, "label", "namespace", NS, "istio.io/dataplane-mode=ambient") == 0
    eventually(lambda: set(redirection(cluster).values()) == {"enabled"}, "every pod captured")
    before = sum(mtls_connections(cluster, n, "echo") for n in ("node-1", "node-2"))
    ok, answers = call(cluster, "client", "http://echo/")
    assert ok and len(answers) == 10
    after = sum(mtls_connections(cluster, n, "echo") for n in ("node-1", "node-2"))
    assert after >= before + 10  # every call arrived over HBONE with mTLS at the echo pods' ztunnels
    assert ctl(cluster, "label", "namespace", NS, "istio.io/dataplane-mode-") == 0
    eventually(lambda: set(redirection(cluster).values()) == {""}, "every pod released")
    ok, answers = call(cluster, "client", "http://echo/")
    assert ok and len(answers) == 10
    assert sum(mtls_connections(cluster, n, "echo") for n in ("node-1", "node-2")) == after  # direct now
    assert {k: r.process.pid for k, r in cluster.require_state().pods.items() if r.process} == pids


def test_pods_added_and_deleted_while_traffic_flows(cluster: Cluster, tmp_path: Path) -> None:
    scaled = [dict(o) for o in CONFIG]
    scaled[2] = yaml.safe_load(yaml.safe_dump(CONFIG[2]))
    scaled[2]["spec"]["replicas"] = 3
    path = tmp_path / "scaled.yaml"
    path.write_text(yaml.safe_dump_all(scaled, sort_keys=False))
    client = subprocess.Popen(  # a bounded client loop running through both changes
        ["ip", "netns", "exec", pod(cluster, "client").netns, sys.executable, "-m", "loom.lab.workload",
         "call", "http://echo/", "--count", "300", "--timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert ctl(cluster, "apply", "-f", str(path)) == 0
        assert len([p for p in cluster.status().pods if p.name.startswith("echo-")]) == 3
        path.write_text(yaml.safe_dump_all(CONFIG, sort_keys=False))
        assert ctl(cluster, "apply", "-f", str(path)) == 0
        state = cluster.require_state()
        assert len([p for p in state.pods.values() if p.name.startswith("echo-")]) == 2
    finally:
        out, err = client.communicate(timeout=120)
    answers = [a for a in map(json.loads, out.splitlines()) if a.get("ok")]
    # Connections are new per call: none may fail, as every VIP rule change swaps atomically and a
    # deleted pod's endpoint leaves the VIP before the pod goes away.
    assert client.returncode == 0, err[-2000:]
    assert len(answers) == 300
    assert len(list_namespaces(cluster.prefix + "-")) == 1 + 1 + 2 + 3  # wire, cp, 2 nodes, 3 pods


def test_stopped_ztunnel_fails_closed_and_lab_up_recovers_it(cluster: Cluster) -> None:
    assert ctl(cluster, "label", "namespace", NS, "istio.io/dataplane-mode=ambient") == 0
    eventually(lambda: set(redirection(cluster).values()) == {"enabled"}, "every pod captured")
    client_node = pod(cluster, "client").node
    record = cluster.require_state().processes[f"ztunnel/{client_node}"]
    os.kill(record.pid, signal.SIGKILL)
    eventually(lambda: not cluster.status().nodes[int(client_node[-1]) - 1].ztunnel_running, "ztunnel gone")
    ok, answers = call(cluster, "client", "http://echo/", count=3)
    assert not ok and answers == []  # captured traffic has nowhere to go: it never leaves in plaintext
    cluster.up([], 2, lambda line: None)  # idempotent: restarts what is missing
    eventually(lambda: call(cluster, "client", "http://echo/", count=1)[0], "traffic recovers")
    ok, answers = call(cluster, "client", "http://echo/")
    assert ok and len(answers) == 10


def test_agent_restart_keeps_enrolled_traffic_flowing(cluster: Cluster) -> None:
    assert set(redirection(cluster).values()) == {"enabled"}  # still enrolled by the previous test
    client = subprocess.Popen(  # a bounded client loop through the agent's stop and restart
        ["ip", "netns", "exec", pod(cluster, "client").netns, sys.executable, "-m", "loom.lab.workload",
         "call", "http://echo/", "--count", "200", "--timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for node in ("node-1", "node-2"):
            os.kill(cluster.require_state().processes[f"agent/{node}"].pid, signal.SIGTERM)
        eventually(lambda: not any(n.agent_running for n in cluster.status().nodes), "agents stopped")
        cluster.up([], 2, lambda line: None)  # restarts the agents; they restore their captured pods
        assert all(n.agent_running and n.ztunnel_ready for n in cluster.status().nodes)
    finally:
        out, err = client.communicate(timeout=120)
    answers = [a for a in map(json.loads, out.splitlines()) if a.get("ok")]
    assert client.returncode == 0 and len(answers) == 200, err[-2000:]
    assert set(redirection(cluster).values()) == {"enabled"}
    before = sum(mtls_connections(cluster, n, "echo") for n in ("node-1", "node-2"))
    assert call(cluster, "client", "http://echo/")[0]
    assert sum(mtls_connections(cluster, n, "echo") for n in ("node-1", "node-2")) >= before + 10


def test_a_pod_can_run_a_command_instead_of_the_workload(cluster: Cluster, tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "shell", "namespace": NS, "annotations": {"lab.loom.io/command": "sleep 600"}},
        "spec": {"containers": [{"name": "shell", "image": "x"}]},
    }
    path = tmp_path / "shell.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert ctl(cluster, "apply", "-f", str(path)) == 0
    record = cluster.require_state().pods[f"{NS}/shell"]
    assert record.process is not None
    cmdline = Path(f"/proc/{record.process.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:3] == [b"/bin/sh", b"-c", b"sleep 600"]
    # The command runs inside the pod's network namespace (same namespace inode).
    assert (
        os.stat(f"/proc/{record.process.pid}/ns/net").st_ino
        == os.stat(f"/var/run/netns/{record.netns}").st_ino
    )
    eventually(lambda: redirection(cluster).get("shell") == "enabled", "the new pod captured at creation")
    assert ctl(cluster, "delete", "-f", str(path)) == 0
    assert f"{NS}/shell" not in cluster.require_state().pods


def test_the_lab_manager_acts_on_objects_written_behind_loomctl(cluster: Cluster) -> None:
    """What the controller's waypoint reconciler does: write a Deployment straight into the store."""
    deployment = yaml.safe_load(yaml.safe_dump(CONFIG[4]))
    deployment["metadata"]["name"] = "written"
    deployment["spec"]["selector"] = {"matchLabels": {"app": "written"}}
    deployment["spec"]["template"]["metadata"]["labels"] = {"app": "written"}
    key = cluster.store.put(deployment)
    eventually(lambda: any(p.name.startswith("written-") and p.running for p in cluster.status().pods), "pod")
    cluster.store.remove(key)
    eventually(lambda: not any(p.name.startswith("written-") for p in cluster.status().pods), "pod gone")


def test_ztunnel_config_reads_a_lab_node(cluster: Cluster) -> None:
    env = {**os.environ, "LOOM_LAB_DIR": str(cluster.lab_dir), "LOOM_LAB_PREFIX": cluster.prefix}
    result = subprocess.run(
        [sys.executable, "-m", "loom.cli.main", "ztunnel-config", "workloads", "--node", "node-1"],
        capture_output=True, text=True, timeout=30, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    meshed = {row[1] for row in rows if row[0] == NS and "HBONE" in row}
    assert {p.name for p in cluster.status().pods} <= meshed  # every lab pod, enrolled, as this node sees it


def test_down_after_a_crash_leaves_nothing_behind(cluster: Cluster) -> None:
    root_rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    state = cluster.require_state()
    for pid in marked_pids(str(cluster.lab_dir)):
        os.kill(pid, signal.SIGKILL)
    cluster.state_path.unlink()  # the crash also lost the state file
    cluster.down(lambda line: None)
    assert list_namespaces(cluster.prefix + "-") == []
    assert marked_pids(str(cluster.lab_dir)) == []
    assert not cluster.lab_dir.exists()
    assert not any(Path("/etc/netns").glob(cluster.prefix + "-*"))
    assert subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout.count(
        "LOOM"
    ) == root_rules.count("LOOM")
    assert state.nodes == ["node-1", "node-2"]
    cluster.down(lambda line: None)  # idempotent
