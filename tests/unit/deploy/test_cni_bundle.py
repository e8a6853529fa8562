"""The loom-cni bundle (deploy/tools/build_cni_bundle.py): the plugin and a private Python runtime that
run with nothing from the node but the kernel.

The bundle is built from the interpreter running the tests (as the image build does from its own) and
run under an empty environment through its own dynamic loader, talking to a real plugin-event server on
a unix socket: the whole path a container runtime takes on a node."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import marshal
import os
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cni.events import AgentReply, AgentRequest, Outcome, RequestKind, serve_plugin_events
from deploy.tools.build_cni_bundle import (
    DEFAULT_MODULE,
    MANIFEST,
    PACKAGE_ZIP,
    STDLIB_ZIP,
    Bundle,
    BundleError,
    build,
    parse_ldd,
    pyc_bytes,
    read_bundle,
    stdlib_sources,
    write_stdlib_zip,
)

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-7"}],
    "ips": [{"address": "10.244.1.7/24", "interface": 0}],
}


def test_ldd_output_is_read_into_libraries_missing_names_and_the_loader() -> None:
    output = """\tlinux-vdso.so.1 (0x00007ffd5b1e6000)
\tlibpython3.11.so.1.0 => /usr/local/lib/libpython3.11.so.1.0 (0x00007f0cad200000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0cad01e000)
\tlibtk8.6.so => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0cad888000)
"""
    report = parse_ldd(output)
    assert report.libraries == (
        ("libpython3.11.so.1.0", "/usr/local/lib/libpython3.11.so.1.0"),
        ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
    )
    assert report.missing == ("libtk8.6.so",)
    assert report.loader == "/lib64/ld-linux-x86-64.so.2"
    assert parse_ldd("\tstatically linked\n") == parse_ldd("")


def test_pyc_is_hash_based_unchecked_and_holds_the_module_code() -> None:
    source = b"ANSWER = 6 * 7\n"
    data = pyc_bytes(source, "answer.py")
    assert data[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(data[4:8], "little") == 0b01  # hash-based, not checked against a source
    assert data[8:16] == importlib.util.source_hash(source)
    namespace: dict[str, Any] = {}
    exec(marshal.loads(data[16:]), namespace)
    assert namespace["ANSWER"] == 42


def test_standard_library_leaves_out_tests_tools_and_installed_packages(tmp_path: Path) -> None:
    stdlib = tmp_path / "lib" / "python3.11"
    for name in (
        "os.py",
        "json/__init__.py",
        "json/decoder.py",
        "test/test_os.py",
        "idlelib/idle.py",
        "site-packages/requests/__init__.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "json/__pycache__/decoder.cpython-311.pyc",
        "broken.py",
    ):
        path = stdlib / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n" if name != "broken.py" else "def (:\n")
    names = [archive for _, archive in stdlib_sources(stdlib)]
    assert names == ["broken.pyc", "os.pyc", "json/__init__.pyc", "json/decoder.pyc"]
    target = tmp_path / "stdlib.zip"
    assert write_stdlib_zip(stdlib, target) == 3  # broken.py does not compile: left out
    with zipfile.ZipFile(target) as archive:
        assert sorted(archive.namelist()) == ["json/__init__.pyc", "json/decoder.pyc", "os.pyc"]
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}


def test_bundle_holds_the_plugin_modules_and_a_complete_runtime(cni_bundle: Bundle) -> None:
    root = cni_bundle.root
    assert cni_bundle.module == DEFAULT_MODULE and len(cni_bundle.id) == 16
    assert os.access(root / cni_bundle.loader, os.X_OK) and os.access(root / cni_bundle.python, os.X_OK)
    assert (root / f"{cni_bundle.python}._pth").read_text().split() == [
        f"lib/{STDLIB_ZIP}",
        f"lib/{PACKAGE_ZIP}",
        "lib/lib-dynload",
    ]
    with zipfile.ZipFile(root / "lib" / PACKAGE_ZIP) as archive:
        plugin_modules = set(archive.namelist())
    # What `import cni.plugin_main` loads, and nothing of the agent (which needs far more).
    assert {"cni/__init__.pyc", "cni/plugin_main.pyc", "cni/plugin.pyc", "cni/events.pyc"} <= plugin_modules
    assert not any(name.startswith("cni/agent") for name in plugin_modules)
    with zipfile.ZipFile(root / "lib" / STDLIB_ZIP) as archive:
        stdlib = set(archive.namelist())
    assert {"encodings/__init__.pyc", "json/__init__.pyc", "asyncio/__init__.pyc", "runpy.pyc"} <= stdlib
    assert not any(name.startswith(("test/", "site-packages/")) for name in stdlib)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["id"] == cni_bundle.id and manifest["loader"] == cni_bundle.loader


def test_bundle_manifest_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read the bundle manifest"):
        read_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text(
        json.dumps({"format": 1, "id": "x", "python": "../python3", "loader": "l"})
    )
    with pytest.raises(BundleError, match="python is missing or not a plain relative name"):
        read_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(BundleError, match="not a format-1"):
        read_bundle(tmp_path)


def test_build_never_replaces_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="already exists"):
        build(tmp_path)


@pytest.fixture
async def agent_socket() -> AsyncIterator[tuple[str, list[AgentRequest]]]:
    """A plugin-event server (the node agent's side of the protocol) that enrols every pod."""
    directory = tempfile.mkdtemp(prefix="ld", dir="/tmp")  # short: unix socket paths are limited
    path = os.path.join(directory, "plugin.sock")
    seen: list[AgentRequest] = []

    async def handle(request: AgentRequest) -> AgentReply:
        seen.append(request)
        return AgentReply(Outcome.ENROLLED if request.kind is RequestKind.ADD else Outcome.DONE)

    server = await serve_plugin_events(path, handle)
    try:
        yield path, seen
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)


async def run_bundle(bundle: Bundle, env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any]]:
    """Run the plugin from the bundle with exactly `env` (nothing inherited), as a runtime would."""
    process = await asyncio.create_subprocess_exec(
        *bundle.command(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), WAIT)
    assert process.returncode is not None
    try:
        return process.returncode, json.loads(stdout)
    except ValueError:
        raise AssertionError(f"stdout is not JSON: {stdout!r}; stderr: {stderr.decode()}") from None


def add_call(socket_path: str, namespace: str) -> tuple[dict[str, str], bytes]:
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee01",
        "CNI_NETNS": "/var/run/netns/cni-7",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-1;K8S_POD_UID=u-1",
        "CNI_PATH": "/opt/cni/bin",
    }
    config = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "loom-cni",
        "agentSocket": socket_path,
        "excludeNamespaces": ["kube-system"],
        "prevResult": PREV_RESULT,
    }
    return env, json.dumps(config).encode()


async def test_bundled_plugin_asks_the_agent_and_passes_the_previous_result_on(
    cni_bundle: Bundle, agent_socket: tuple[str, list[AgentRequest]]
) -> None:
    path, seen = agent_socket
    status, answer = await run_bundle(cni_bundle, *add_call(path, "shop"))
    assert status == 0 and answer["ips"] == PREV_RESULT["ips"]
    (request,) = seen
    assert request.kind is RequestKind.ADD and request.pod is not None
    assert (request.pod.namespace, request.pod.name, request.pod.netns) == (
        "shop",
        "web-1",
        "/var/run/netns/cni-7",
    )


async def test_bundled_plugin_fails_closed_without_an_agent(cni_bundle: Bundle, tmp_path: Path) -> None:
    status, answer = await run_bundle(cni_bundle, *add_call(str(tmp_path / "no-agent.sock"), "shop"))
    assert status == 1 and answer["code"] == 11  # "try again later": the kubelet retries the sandbox
    status, answer = await run_bundle(cni_bundle, *add_call(str(tmp_path / "no-agent.sock"), "kube-system"))
    assert status == 0 and answer["ips"] == PREV_RESULT["ips"]  # excluded: never waits on the agent
