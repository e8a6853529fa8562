"""The main job, `loomctl demo`, end to end in its own lab (own state directory and namespace prefix,
so a user's lab is never touched). Root only; CI also runs it as `make demo`."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from loom.cli.main import main
from loom.lab.network import list_namespaces
from tests.samples import samples_dir

pytestmark = pytest.mark.root


def test_demo_holds_every_check_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = "lt" + secrets.token_hex(2)
    lab_dir = Path(f"/tmp/lt-demo-{secrets.token_hex(3)}")
    monkeypatch.setenv("LOOM_LAB_PREFIX", prefix)
    try:
        code = main(["demo", "--samples", str(samples_dir()), "--lab-dir", str(lab_dir)])
    finally:
        main(["lab", "down", "--lab-dir", str(lab_dir)])  # whatever the demo did, nothing stays
    out = capsys.readouterr().out
    assert code == 0, out
    assert "✘" not in out and "✔ every check held" in out
    # The evidence a person reads: plaintext before, HBONE and mTLS metrics after, the denial.
    assert "GET /reviews/0 HTTP/1.1" in out
    assert ".15008" in out
    assert 'connection_security_policy="mutual_tls"' in out
    assert "ratings (sa bookinfo-ratings) -> reviews is denied" in out
    assert '"DELETE /reviews/0 HTTP/1.1" 403' in out  # the waypoint's access log line for the L7 denial
    assert list_namespaces(prefix + "-") == []
    assert not lab_dir.exists()
