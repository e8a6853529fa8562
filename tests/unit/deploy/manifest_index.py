"""Reading deploy/'s manifests for the tests: every YAML document, looked up by kind and name.

The manifests are plain dicts as `yaml.safe_load_all` returns them; the helpers here only navigate them
(pod specs, containers, volumes, env) and fail with a message naming what is missing, so a test reads as
the property it checks.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import yaml

import loom
from cni.agent import main as agent_main

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "Containerfile"
NAMESPACE = "istio-system"
# What stands in for fieldRef spec.nodeName when a test evaluates a container's environment.
NODE_NAME = "node-1"

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Document:
    path: Path
    number: int  # 1-based position in its file
    obj: Obj

    def __str__(self) -> str:
        meta = self.obj.get("metadata", {})
        return f"{self.path.relative_to(REPO)} doc {self.number} {self.obj.get('kind')} {meta.get('name')}"


def yaml_files(directory: Path = KUBERNETES) -> list[Path]:
    return sorted(p for p in directory.rglob("*.yaml") if p.is_file())


def documents(path: Path) -> list[Document]:
    with path.open() as handle:
        return [Document(path, i, d) for i, d in enumerate(yaml.safe_load_all(handle), 1) if d is not None]


def kustomization(directory: Path = KUBERNETES) -> Obj:
    value = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(value, dict)
    return value


def installed(directory: Path = KUBERNETES) -> list[Document]:
    """The documents `kubectl apply -k <directory>` applies, in the kustomization's order."""
    found: list[Document] = []
    for resource in kustomization(directory)["resources"]:
        found.extend(documents(directory / resource))
    return found


def find(docs: list[Document], kind: str, name: str) -> Obj:
    matches = [d.obj for d in docs if d.obj.get("kind") == kind and d.obj["metadata"].get("name") == name]
    assert len(matches) == 1, f"expected exactly one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: Obj) -> Obj:
    spec = workload["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def containers(workload: Obj, *, init: bool = True) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", []) if init else ()
    yield from spec["containers"]


def container(workload: Obj, name: str) -> Obj:
    matches = [c for c in containers(workload) if c["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']} has no single container {name}"
    return matches[0]


def env_of(c: Obj) -> dict[str, str]:
    """The container's environment as the kubelet would set it on node NODE_NAME."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        field = item["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == "spec.nodeName", f"{item['name']}: a test knows only spec.nodeName, not {field}"
        env[item["name"]] = NODE_NAME
    return env


def volume(workload: Obj, name: str) -> Obj:
    matches: list[Obj] = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']} has no single volume {name}"
    return matches[0]


def mount_of(workload: Obj, c: Obj, path: str) -> tuple[Obj, Obj, str]:
    """(volumeMount, volume, path inside the volume) of the mount holding `path` in container `c`."""
    target = PurePosixPath(path)
    best: tuple[Obj, PurePosixPath] | None = None
    for mount in c.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if (target == mount_path or mount_path in target.parents) and (
            best is None or len(mount_path.parts) > len(best[1].parts)
        ):
            best = (mount, mount_path)
    assert best is not None, f"container {c['name']} mounts nothing at {path}"
    mount, mount_path = best
    return mount, volume(workload, mount["name"]), str(target.relative_to(mount_path))


def ports_by_name(c: Obj) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in c.get("ports", []) if "name" in p}


def probe_port(c: Obj, probe: Obj) -> int:
    """The container port an httpGet probe targets (by name or number)."""
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    names = ports_by_name(c)
    assert port in names, f"probe port {port!r} is not a named port of {c['name']}"
    return names[port]


def flag_values(args: list[str], flag: str) -> list[str]:
    """Values of `--flag=value` and `--flag value` in an argument list."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def pyproject() -> Mapping[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def console_scripts() -> set[str]:
    return set(pyproject()["project"]["scripts"])


def project_version() -> str:
    """The package version: pyproject declares it dynamic, read from loom.__version__."""
    project = pyproject()
    assert "version" in project["project"].get("dynamic", ()), "pyproject should read the version"
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "loom.__version__"}
    return loom.__version__


class RecordingEnv(Mapping[str, str]):
    """A read-only environment that remembers every name looked up (present or not)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.entries = dict(values)
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.entries[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class _OsWithEnvironment:
    """The `os` module as `cni.agent.main` sees it in a test: its own `environ`, everything else real."""

    def __init__(self, environ: RecordingEnv) -> None:
        self.environ = environ

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@contextlib.contextmanager
def agent_environment(values: Mapping[str, str]) -> Iterator[RecordingEnv]:
    """The node agent's argument parser reads exactly `values` as its environment (lookups recorded);
    the process's real environment is left alone."""
    recording = RecordingEnv(values)
    with mock.patch.object(agent_main, "os", _OsWithEnvironment(recording)):
        yield recording
