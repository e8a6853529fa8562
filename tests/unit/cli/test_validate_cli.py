"""`loomctl validate`: every error and warning, named by file, document, object and field; exit 1 on error."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.cli.main import main
from tests.samples import samples_dir

BROKEN = """\
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: default}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: 7}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - to:
    - operation: {methods: ["GET"]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: default}
"""


def test_samples_are_clean(capsys: pytest.CaptureFixture[str]) -> None:
    root = samples_dir()
    assert main(["validate", "-f", str(root / "istio"), "-f", str(root / "ambient")]) == 0
    assert capsys.readouterr().out == "✔ No validation issues found.\n"


def test_errors_and_warnings_are_named_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text(BROKEN)
    assert main(["validate", "-f", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "Error: policy.yaml doc 2 AuthorizationPolicy default/deny-legacy: "
        "spec.rules[0].from[0].source.namespaces: expected a list of strings, got int"
    )
    warnings = [line for line in lines if line.startswith("Warning: ")]
    # The unknown kind is skipped, the invalid DENY is enforced fail-closed, the L7 ALLOW rule is dropped.
    assert any("doc 4 VirtualService default/vs" in w and "skipped" in w for w in warnings)
    assert any("deny-legacy" in w and "fail closed" in w for w in warnings)
    assert any("get-only: spec.rules[0].to[0].operation.methods" in w for w in warnings)
    assert lines[-1] == f"1 error(s), {len(warnings)} warning(s)"


def test_warnings_alone_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "vs.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n"
    )
    assert main(["validate", "-f", str(tmp_path / "vs.yaml")]) == 0
    assert "0 error(s), 1 warning(s)" in capsys.readouterr().out


def test_missing_path_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
