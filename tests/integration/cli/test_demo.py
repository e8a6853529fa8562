"""`loomctl demo`: the control-plane walk-through (no root) passes, and the lab demo says clearly what
it lacks when it cannot run. The lab demo itself runs in tests/namespaced/test_demo_lab.py and in CI
through `make demo`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loom.cli import demo
from loom.cli.main import main
from tests.samples import samples_dir


def test_control_plane_demo_passes_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--control-plane", "--samples", str(samples_dir())]) == 0
    out = capsys.readouterr().out
    assert "✘" not in out
    assert out.rstrip().endswith("✔ every check held")
    # Evidence a person reads: the workload table before and after enrolment, and the refusal.
    assert "PROTOCOL" in out and "HBONE" in out and "request authentication failure" in out


def test_control_plane_demo_without_samples_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--control-plane", "--samples", str(tmp_path)]) == 1
    assert f"the Istio samples are not at {tmp_path}" in capsys.readouterr().err


def test_lab_demo_names_everything_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    real_which = shutil.which
    monkeypatch.setattr(demo.shutil, "which", lambda tool: None if tool == "tcpdump" else real_which(tool))
    assert main(["demo", "--samples", str(tmp_path), "--lab-dir", str(tmp_path / "lab")]) == 2
    err = capsys.readouterr().err
    assert "loomctl demo cannot run here:" in err
    assert "it needs root" in err
    assert "`tcpdump` is not installed" in err
    assert f"the Istio samples are not at {tmp_path}" in err
    assert not (tmp_path / "lab").exists()  # nothing was started
