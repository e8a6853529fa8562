"""Fixtures shared by the deploy tests: one loom-cni bundle, built once per session (about 2 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.tools.build_cni_bundle import Bundle, build


@pytest.fixture(scope="session")
def cni_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The bundle built from the interpreter running the tests, as the image build makes it from its own."""
    return build(tmp_path_factory.mktemp("cni-bundle") / "bundle")


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path]:
    """A node's CNI bin and configuration directories, empty."""
    bin_dir, net_dir = tmp_path / "opt-cni-bin", tmp_path / "etc-cni-net.d"
    bin_dir.mkdir()
    net_dir.mkdir()
    return bin_dir, net_dir
