"""`loomctl apply -f`, `delete -f` and `label` against a lab store: kubectl's output lines, errors that
name file, document, object and field, and exit status 1 for anything refused."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from loom.cli import config_cmds
from loom.lab.store import StoredKey, lab_store
from tests.samples import samples_dir

BOOKINFO_LINES = [
    "service/details created",
    "serviceaccount/bookinfo-details created",
    "deployment.apps/details-v1 created",
    "service/ratings created",
    "serviceaccount/bookinfo-ratings created",
    "deployment.apps/ratings-v1 created",
    "service/reviews created",
    "serviceaccount/bookinfo-reviews created",
    "deployment.apps/reviews-v1 created",
    "deployment.apps/reviews-v2 created",
    "deployment.apps/reviews-v3 created",
    "service/productpage created",
    "serviceaccount/bookinfo-productpage created",
    "deployment.apps/productpage-v1 created",
]


def loomctl(lab: Path, *argv: str) -> int:
    """Run one command the way loomctl's main does once it registers these commands."""
    parser = argparse.ArgumentParser(prog="loomctl")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    config_cmds.register(commands)
    args = parser.parse_args([*argv, "--lab-dir", str(lab)])
    code: int = args.run(args)
    return code


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    path = tmp_path / "lab"
    path.mkdir()
    return path


def bookinfo() -> str:
    return str(samples_dir() / "istio" / "bookinfo.yaml")


def test_apply_then_reapply(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(lab, "apply", "-f", bookinfo()) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == BOOKINFO_LINES and err == ""
    assert loomctl(lab, "apply", "-f", bookinfo()) == 0
    assert capsys.readouterr().out.splitlines() == [
        line.replace("created", "unchanged") for line in BOOKINFO_LINES
    ]
    assert (lab / "config" / "deployment" / "default" / "reviews-v1.yaml").is_file()


def test_apply_refuses_invalid_objects_and_stores_the_rest(
    lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: good}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: lab}\n"
        "spec: {action: DENY, rules: [{from: [{source: {namespaces: 7}}]}]}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr}\n"
    )
    assert loomctl(lab, "apply", "-f", str(config)) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "serviceaccount/good created",
        "destinationrule.networking.istio.io/dr created",
    ]
    assert err.splitlines() == [
        f"Warning: {config} doc 3 DestinationRule dr: "
        "networking.istio.io/v1 DestinationRule is not a kind loom reads; stored as given, loom ignores it",
        f"Error: {config} doc 2 AuthorizationPolicy lab/bad: spec.rules[0].from[0].source.namespaces: "
        "expected a list of strings, got int",
    ]
    assert lab_store(lab).get(StoredKey("ServiceAccount", "default", "good")) is not None


def test_apply_from_stdin(
    lab: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"))
    assert loomctl(lab, "apply", "-f", "-") == 0
    assert capsys.readouterr().out == "namespace/shop created\n"


def test_delete(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loomctl(lab, "apply", "-f", bookinfo())
    capsys.readouterr()
    assert loomctl(lab, "delete", "-f", bookinfo()) == 0
    assert capsys.readouterr().out.splitlines() == [
        line.replace("created", "deleted") for line in BOOKINFO_LINES
    ]
    assert loomctl(lab, "delete", "-f", bookinfo()) == 1
    out, err = capsys.readouterr()
    assert (
        out == "" and err.splitlines()[0] == f"Error: {bookinfo()} doc 1 Service default/details: not found"
    )
    assert loomctl(lab, "delete", "-f", bookinfo(), "--ignore-not-found") == 0
    assert capsys.readouterr() == ("", "")


def test_label_namespace_kubectl_style(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(lab, "label", "namespace", "default", "istio.io/dataplane-mode=none") == 0
    assert capsys.readouterr().out.splitlines() == ["namespace/default created", "namespace/default labeled"]

    assert loomctl(lab, "label", "ns", "default", "istio.io/dataplane-mode=ambient") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        'Error: namespace/default: label "istio.io/dataplane-mode" already has a value (none), '
        "and --overwrite is false\n"
    )
    assert loomctl(lab, "label", "ns/default", "istio.io/dataplane-mode=ambient", "--overwrite") == 0
    assert capsys.readouterr().out == "namespace/default labeled\n"
    assert loomctl(lab, "label", "ns", "default", "istio.io/dataplane-mode=ambient") == 0
    assert capsys.readouterr().out == "namespace/default not labeled\n"

    assert loomctl(lab, "label", "ns", "default", "istio.io/dataplane-mode-", "nothing-") == 0
    out, err = capsys.readouterr()
    assert out == "namespace/default labeled\n"
    assert err == 'Warning: namespace/default: label "nothing" not found\n'
    assert lab_store(lab).get(StoredKey("Namespace", "", "default")) == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "default"},
    }


def test_label_namespaced_objects(lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loomctl(lab, "apply", "-f", bookinfo())
    capsys.readouterr()
    assert loomctl(lab, "label", "deploy", "reviews-v1", "istio.io/use-waypoint=waypoint") == 0
    assert capsys.readouterr().out == "deployment.apps/reviews-v1 labeled\n"
    manifest = lab_store(lab).get(StoredKey("Deployment", "default", "reviews-v1"))
    assert manifest is not None
    assert manifest["metadata"]["labels"]["istio.io/use-waypoint"] == "waypoint"
    assert "istio.io/use-waypoint" not in manifest["spec"]["template"]["metadata"]["labels"]

    assert loomctl(lab, "label", "svc", "reviews", "team=books", "-n", "default") == 0
    assert loomctl(lab, "label", "sa", "bookinfo-reviews", "team=books") == 0
    assert capsys.readouterr().out == "service/reviews labeled\nserviceaccount/bookinfo-reviews labeled\n"

    assert loomctl(lab, "label", "pod", "reviews", "team=books", "-n", "elsewhere") == 1
    assert capsys.readouterr().err == "Error: pod/reviews in namespace elsewhere not found\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["configmap", "x", "a=b"], 'cannot label "configmap": KIND must be one of', id="kind"),
        pytest.param(["ns"], "missing the NAME of the ns to label", id="no name"),
        pytest.param(["ns", "default"], "at least one label update is required", id="no update"),
        pytest.param(
            ["ns", "default", "a"], 'invalid label update "a": expected key=value or key-', id="update"
        ),
        pytest.param(["ns", "default", "a=b", "a-"], 'label "a" is changed more than once', id="twice"),
        pytest.param(["ns", "default", "a=b c"], 'metadata.labels.a: invalid label value "b c"', id="value"),
    ],
)
def test_label_usage_errors(
    lab: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert loomctl(lab, "label", *argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("Error: ") and message in err
    assert not (lab / "config" / "namespace").exists()


def test_no_lab_directory_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-lab"
    assert loomctl(missing, "apply", "-f", bookinfo()) == 1
    assert capsys.readouterr().err.startswith(f"Error: there is no lab at {missing}: ")
    assert not missing.exists()
