"""`make demo` runs `loomctl demo`; it must pass on the embedded default and fail loudly otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.cli.main import main
from tests.samples import samples_dir


def test_demo_passes_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--samples", str(samples_dir())]) == 0
    out = capsys.readouterr().out
    assert "✘" not in out
    assert out.rstrip().endswith("✔ every check held")
    # Evidence a person reads: the workload table before and after enrolment, and the refusal.
    assert "PROTOCOL" in out and "HBONE" in out and "request authentication failure" in out


def test_demo_without_samples_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--samples", str(tmp_path)]) == 1
    assert f"the Istio samples are not at {tmp_path}" in capsys.readouterr().err
