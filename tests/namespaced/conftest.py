"""Root tests with network namespaces: skip logic and fixtures that always clean up.

Every test here is marked `root`. It is skipped only when the process is not root (never otherwise:
in CI these tests must run). Each test gets its own `NetnsLab` with a unique prefix; the fixture removes
everything the lab created, also when the test fails, and then checks that `ip netns list` shows
nothing with that prefix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.testing.netns import NetnsLab, cleanup_prefix
from tests.namespaced.harness import namespaces_with_prefix

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0 and os.environ.get("CI"):
        # CI runs as root; if it ever does not, these tests must fail loudly, not skip quietly.
        raise pytest.UsageError("the root tests in tests/namespaced must run in CI, but CI is not root")
    skip = pytest.mark.skip(reason="needs root (network namespaces, veth, iptables)")
    for item in items:
        if HERE not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.root)
        if os.geteuid() != 0:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    yield from _lab(NetnsLab())


@pytest.fixture
def dual_stack_lab() -> Iterator[NetnsLab]:
    """A lab whose nodes and pods have IPv6 addresses too (see loom.testing.netns)."""
    yield from _lab(NetnsLab(ipv6=True))


def _lab(netns_lab: NetnsLab) -> Iterator[NetnsLab]:
    try:
        yield netns_lab
    finally:
        try:
            netns_lab.close()
        finally:
            leftovers = cleanup_prefix(netns_lab.prefix)
        assert leftovers == [], f"lab.close() left namespaces behind: {leftovers}"
        assert namespaces_with_prefix(netns_lab.prefix) == []


@pytest.fixture
def zds_path() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="zds", dir="/tmp")
    try:
        yield os.path.join(directory, "ztunnel.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
