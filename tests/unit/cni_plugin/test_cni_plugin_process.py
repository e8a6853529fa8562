"""`loom-cni` run the way a container runtime runs it: `python -m cni.plugin_main` as a subprocess with
CNI_* variables and the network configuration on stdin, talking to a stand-in node agent over a unix
socket; plus `plugin_main.execute` with in-memory streams for the paths a subprocess cannot provoke."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import time
import tomllib
from typing import Any

import pytest
from cni_standin_agent import running_agent, short_socket_dir

from cni import plugin, plugin_main
from cni.events import AgentReply, Outcome, RequestKind

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/cni-77"}],
    "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
# One plugin process; generous against a loaded CI machine, far above the agent timeouts used here.
PROCESS_TIMEOUT = 30


def runtime_env(command: str, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "9d1e5a0b7c",
        "CNI_NETNS": "/var/run/netns/cni-77",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=productpage-v1-6b74;"
        "K8S_POD_INFRA_CONTAINER_ID=9d1e5a0b7c;K8S_POD_UID=42aa",
    }
    env.update(extra)
    return env


def config(socket_path: str, **extra: Any) -> bytes:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "loom-cni",
        "agentSocket": socket_path,
    }
    conf["prevResult"] = PREV_RESULT
    conf.update(extra)
    return json.dumps(conf).encode()


def run_plugin(env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cni.plugin_main"],
        input=stdin,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def test_version() -> None:
    done = run_plugin(
        {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "CNI_COMMAND": "VERSION"},
        b'{"cniVersion":"1.0.0"}',
    )
    assert done.returncode == 0
    assert json.loads(done.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": list(plugin.SUPPORTED_VERSIONS),
    }


def test_add_enrolled_pod_outputs_prev_result_and_logs_only_to_the_log_file() -> None:
    with running_agent(lambda request: AgentReply(Outcome.ENROLLED)) as agent:
        log_file = os.path.join(os.path.dirname(agent.socket_path), "cni.log")
        done = run_plugin(runtime_env("ADD"), config(agent.socket_path, logFile=log_file, logLevel="debug"))
        log_text = pathlib.Path(log_file).read_text()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == PREV_RESULT
    assert done.stderr == b""
    assert "default/productpage-v1-6b74" in log_text and "enrolled" in log_text
    [request] = agent.requests
    assert request.kind is RequestKind.ADD
    assert request.pod is not None and [str(ip) for ip in request.pod.ips] == ["10.244.0.5"]


def test_unusable_log_file_falls_back_to_stderr() -> None:
    with running_agent(lambda request: AgentReply(Outcome.NOT_ENROLLED)) as agent:
        done = run_plugin(
            runtime_env("ADD"), config(agent.socket_path, logFile="/proc/loom-cni-nope/cni.log")
        )
    assert done.returncode == 0
    assert json.loads(done.stdout) == PREV_RESULT
    assert b"cannot open logFile /proc/loom-cni-nope/cni.log" in done.stderr


def test_add_with_agent_down_is_error_11() -> None:
    with short_socket_dir() as directory:
        path = os.path.join(directory, "ev.sock")
        done = run_plugin(runtime_env("ADD"), config(path))
    assert done.returncode != 0
    error = json.loads(done.stdout)
    assert error["code"] == 11 and path in error["msg"] and error["cniVersion"] == "1.0.0"
    # Logs (warnings) go to stderr when there is no log file, never into the protocol stream.
    assert b"unavailable" in done.stderr


def test_add_with_hanging_agent_is_bounded() -> None:
    with running_agent(lambda request: "hang") as agent:
        started = time.monotonic()
        done = run_plugin(runtime_env("ADD"), config(agent.socket_path, agentTimeoutSeconds=0.5))
        elapsed = time.monotonic() - started
    assert json.loads(done.stdout)["code"] == 11
    assert done.returncode != 0
    assert elapsed < PROCESS_TIMEOUT / 2


def test_del_with_agent_down_succeeds_silently() -> None:
    with short_socket_dir() as directory:
        done = run_plugin(runtime_env("DEL"), config(os.path.join(directory, "ev.sock")))
    assert (done.returncode, done.stdout) == (0, b"")


def test_check_enrolled_pod() -> None:
    with running_agent(lambda request: AgentReply(Outcome.ENROLLED)) as agent:
        done = run_plugin(runtime_env("CHECK"), config(agent.socket_path))
    assert (done.returncode, done.stdout) == (0, b"")
    assert [r.kind for r in agent.requests] == [RequestKind.CHECK]


@pytest.mark.parametrize(
    ("env", "stdin", "code"),
    [
        pytest.param(runtime_env("ADD"), b"{", 6, id="undecodable config"),
        pytest.param(runtime_env("ADD", CNI_NETNS=""), config("/tmp/lc-none.sock"), 4, id="missing netns"),
        pytest.param(
            runtime_env("ADD"), config("/tmp/lc-none.sock", cniVersion="0.1.0"), 1, id="old version"
        ),
        pytest.param(runtime_env("ADD"), b" " * (plugin_main.MAX_STDIN_BYTES + 1), 5, id="oversized stdin"),
    ],
)
def test_errors_exit_non_zero_with_spec_json(env: dict[str, str], stdin: bytes, code: int) -> None:
    done = run_plugin(env, stdin)
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == code
    assert set(error) <= {"cniVersion", "code", "msg", "details"}


def test_unexpected_failure_is_still_a_cni_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(env: object, stdin: bytes) -> plugin.PluginOutput:
        raise RuntimeError("bug")

    monkeypatch.setattr(plugin, "run", broken)
    stdout = io.BytesIO()
    status = plugin_main.execute(runtime_env("ADD"), io.BytesIO(config("/tmp/lc-none.sock")), stdout)
    assert status == 1
    error = json.loads(stdout.getvalue())
    assert error["code"] == plugin.ErrorCode.INTERNAL and "RuntimeError: bug" in error["details"]
    assert error["cniVersion"] == "1.0.0"


def test_unreadable_stdin_is_io_error() -> None:
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    stdout = io.BytesIO()
    assert plugin_main.execute(runtime_env("ADD"), Broken(), stdout) == 1  # type: ignore[arg-type]
    assert json.loads(stdout.getvalue())["code"] == 5


def test_console_script_points_at_main() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["loom-cni"] == "cni.plugin_main:main"
