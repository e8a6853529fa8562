"""deploy/Containerfile, read as the builder reads it: its commands are the project's entry points, it
copies every package the wheel is built from, its shell steps parse, and the manifests run what it builds.

No image is built here (no container engine in the test environment); what a build would check itself
(the entry points on PATH, the CNI bundle answering VERSION) is in its RUN steps."""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
from dataclasses import dataclass

import pytest
from manifest_index import (
    CONTAINERFILE,
    KUBERNETES,
    REPO,
    console_scripts,
    container,
    containers,
    find,
    flag_values,
    installed,
    pod_spec,
    project_version,
    pyproject,
)


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    arguments: str


def instructions() -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (the builder's view)."""
    found: list[Instruction] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction is dropped by the builder too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        found.append(Instruction(keyword.upper(), arguments.strip()))
    assert not pending, "the Containerfile ends inside a continued instruction"
    return found


def args() -> dict[str, str]:
    values = {}
    for instruction in instructions():
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            values[name] = shlex.split(value)[0] if value else ""
    return values


def runs() -> list[str]:
    return [i.arguments for i in instructions() if i.keyword == "RUN"]


KEYWORDS = {"FROM", "ARG", "LABEL", "RUN", "ENV", "COPY", "USER", "WORKDIR", "CMD", "ENTRYPOINT", "EXPOSE"}


def test_syntax_directive_base_image_and_instructions() -> None:
    assert CONTAINERFILE.read_text().splitlines()[0] == "# syntax=docker/dockerfile:1"
    # A forgotten backslash would start a line with `&&`: every instruction must be a real one.
    assert {i.keyword for i in instructions()} <= KEYWORDS
    (base,) = [i.arguments for i in instructions() if i.keyword == "FROM"]
    assert base == "docker.io/library/python:3.11-slim"
    minimum = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert base.rsplit(":", 1)[1].startswith(minimum)


def test_the_image_provides_exactly_the_console_scripts_and_the_project_version() -> None:
    values = args()
    assert set(values["LOOM_COMMANDS"].split()) == console_scripts()
    assert values["VERSION"] == project_version()
    assert any("for command in ${LOOM_COMMANDS}" in run and "command -v" in run for run in runs())
    (default,) = [i.arguments for i in instructions() if i.keyword == "CMD"]
    assert shlex.split(default.strip("[]").replace(",", " "))[0] in console_scripts()


def test_runtime_packages_and_project_install_without_test_extras() -> None:
    apt = next(run for run in runs() if "apt-get install" in run)
    words = shlex.split(apt)
    assert {"iproute2", "iptables", "nftables", "--no-install-recommends"} <= set(words)
    assert "rm -rf /var/lib/apt/lists/*" in apt
    pip = next(run for run in runs() if "pip install" in run)
    target = shlex.split(pip.split("pip install", 1)[1])[0]
    assert target == "/src", "the project from the build context, no extras (no [test]), not editable"


def test_every_package_the_wheel_is_built_from_is_copied() -> None:
    copies = [shlex.split(i.arguments) for i in instructions() if i.keyword == "COPY"]
    copied: dict[str, str] = {}
    for words in copies:
        sources, destination = words[:-1], words[-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"
            copied[source.rstrip("/")] = destination
    patterns = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(
        p.name
        for p in REPO.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns)
    )
    assert packages, "setuptools finds no package"
    for package in packages:
        assert copied.get(package) == f"/src/{package}", f"package {package} is not copied to /src"
    assert copied["pyproject.toml"] == copied["README.md"] == "/src/"
    assert copied["deploy/tools"] == "/opt/loom/lib/deploy/tools/"


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_every_run_step_is_valid_shell() -> None:
    for run in runs():
        result = subprocess.run(
            ["sh", "-n", "-c", run], capture_output=True, text=True, timeout=10, check=False
        )
        assert result.returncode == 0, f"{run!r}: {result.stderr}"


def test_the_agent_installs_the_bundle_the_image_builds() -> None:
    build = next(run for run in runs() if "deploy.tools.build_cni_bundle" in run)
    (output,) = flag_values(shlex.split(build.split("deploy.tools.build_cni_bundle", 1)[1]), "--output")
    agent = find(installed(), "DaemonSet", "loom-cni-agent")
    assert flag_values(container(agent, "install-cni")["args"], "--bundle") == [output]


def test_every_container_says_which_user_it_runs_as() -> None:
    """The image's default user is unprivileged; nothing may depend on it by accident: each container
    names its user, and only those that need root get it."""
    (user,) = [i.arguments for i in instructions() if i.keyword == "USER"]
    assert user.split(":")[0] != "0" and user.split(":")[0].isdigit()
    for directory in (KUBERNETES, KUBERNETES / "uninstall"):
        for doc in installed(directory):
            if doc.obj["kind"] not in ("Deployment", "DaemonSet"):
                continue
            pod_user = pod_spec(doc.obj).get("securityContext", {}).get("runAsUser")
            for c in containers(doc.obj):
                effective = c.get("securityContext", {}).get("runAsUser", pod_user)
                assert effective is not None, f"{doc} {c['name']} relies on the image's user"
                if effective == 0:
                    assert c["securityContext"]["runAsNonRoot"] is False, f"{doc} {c['name']}"
