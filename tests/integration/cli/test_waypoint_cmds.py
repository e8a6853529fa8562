"""`loomctl waypoint generate|apply|list|status|delete` against a lab store in a temporary directory:
istioctl's output, the per-service-account Gateway the loader reads and the controller binds, namespace
enrolment with its conflicts, the state the controller reports, and errors that say what was wrong."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.translate import MeshConfig, Translation
from controller.translate.translator import translate
from loom.api import workload_pb2
from loom.cli import waypoint
from loom.lab.store import LabStore, StoredKey, lab_store
from loom.resources.loader import load_text
from loom.resources.model import Gateway

MESH = MeshConfig()


def loomctl(lab: Path | None, *argv: str) -> int:
    """Run one command the way loomctl's main does once it registers `waypoint`."""
    parser = argparse.ArgumentParser(prog="loomctl")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    waypoint.register(commands)
    words = [*argv, "--lab-dir", str(lab)] if lab is not None else list(argv)
    args = parser.parse_args(words)
    code: int = args.run(args)
    return code


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    path = tmp_path / "lab"
    path.mkdir()
    return path


@pytest.fixture
def store(lab: Path) -> LabStore:
    return lab_store(lab)


def out_lines(capsys: pytest.CaptureFixture[str]) -> tuple[list[str], str]:
    out, err = capsys.readouterr()
    return out.splitlines(), err


def namespace(store: LabStore, name: str, labels: dict[str, str]) -> None:
    store.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def report(store: LabStore, ns: str, name: str, conditions: list[dict[str, str]]) -> None:
    """What the controller's waypoint reconciler does: write the Gateway's status conditions."""

    def set_status(manifest: dict[str, Any]) -> None:
        manifest["status"] = {"conditions": conditions}

    assert store.update(StoredKey("Gateway", ns, name), set_status) is not None


READY = [
    {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted"},
    {"type": "Programmed", "status": "True", "reason": "Programmed", "message": "Resource programmed"},
]


# --- generate -----------------------------------------------------------------------------------------


def test_generate_prints_a_gateway_the_loader_reads(capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(None, "waypoint", "generate", "-n", "bookinfo", "--for", "all") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert yaml.safe_load(out)["metadata"] == {
        "name": "waypoint",
        "namespace": "bookinfo",
        "labels": {"istio.io/waypoint-for": "all"},
    }
    result = load_text(out, "<stdout>")
    assert result.diagnostics == ()
    [gateway] = result.objects
    assert isinstance(gateway, Gateway) and gateway.is_waypoint and gateway.waypoint_for == "all"


def test_generate_refuses_a_reserved_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(None, "waypoint", "generate", "--name", "none") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "Error: waypoint name 'none' is reserved: istio.io/use-waypoint=none means 'no waypoint'\n"


# --- apply --------------------------------------------------------------------------------------------


def test_apply_writes_the_gateway_and_reapply_keeps_the_status(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loomctl(lab, "waypoint", "apply", "-n", "default") == 0
    assert out_lines(capsys) == (["✅ waypoint default/waypoint applied"], "")
    assert (lab / "config" / "gateway" / "default" / "waypoint.yaml").is_file()
    report(store, "default", "waypoint", READY)
    assert loomctl(lab, "waypoint", "apply", "-n", "default", "--for", "all") == 0
    assert out_lines(capsys) == (["✅ waypoint default/waypoint applied"], "")
    stored = store.get(StoredKey("Gateway", "default", "waypoint"))
    assert stored is not None
    assert stored["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}
    assert stored["status"] == {"conditions": READY}  # the controller's report survives a re-apply


def pod(name: str, sa: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "bookinfo", "labels": labels},
        "spec": {"serviceAccountName": sa, "nodeName": "node-1", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def service(name: str, selector: dict[str, str], ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"selector": selector, "ports": [{"port": 9080, "name": "http"}], "clusterIP": ip},
    }


def bound_waypoint(translation: Translation, key: str) -> str | None:
    address = translation.addresses[key]
    kind = address.WhichOneof("type")
    target: workload_pb2.Workload | workload_pb2.Service = (
        address.workload if kind == "workload" else address.service
    )
    return target.waypoint.hostname.hostname if target.HasField("waypoint") else None


def test_per_service_account_waypoint_binds_that_accounts_pods(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace(store, "bookinfo", {"istio.io/dataplane-mode": "ambient"})
    store.put(pod("reviews-v1", "bookinfo-reviews", "10.0.0.5", {"app": "reviews"}))
    store.put(pod("reviews-v2", "bookinfo-reviews", "10.0.0.6", {"app": "reviews"}))
    store.put(pod("ratings-v1", "bookinfo-ratings", "10.0.0.7", {"app": "ratings"}))
    store.put(service("reviews", {"app": "reviews"}, "10.96.0.20"))
    store.put(service("ratings", {"app": "ratings"}, "10.96.0.21"))
    argv = (
        "waypoint",
        "apply",
        "-n",
        "bookinfo",
        "--name",
        "reviews-wp",
        "--service-account",
        "bookinfo-reviews",
    )
    assert loomctl(lab, *argv) == 0
    assert out_lines(capsys) == (["✅ waypoint bookinfo/reviews-wp applied"], "")

    loaded = store.load()
    assert loaded.errors == ()
    [gateway] = [obj for obj in loaded.objects if isinstance(obj, Gateway)]
    assert gateway.is_waypoint and gateway.for_service_account == "bookinfo-reviews"

    translation = translate(loaded.snapshot, MESH)
    host = "reviews-wp.bookinfo.svc.cluster.local"
    pods = f"{MESH.cluster_id}//Pod/bookinfo/"
    assert bound_waypoint(translation, pods + "reviews-v1") == host
    assert bound_waypoint(translation, pods + "reviews-v2") == host
    assert bound_waypoint(translation, pods + "ratings-v1") is None
    assert bound_waypoint(translation, "bookinfo/reviews.bookinfo.svc.cluster.local") == host
    assert bound_waypoint(translation, "bookinfo/ratings.bookinfo.svc.cluster.local") is None


def test_apply_needs_an_existing_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-lab"
    assert loomctl(missing, "waypoint", "apply") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"Error: there is no lab at {missing}")
    assert not missing.exists()


def test_apply_refuses_bad_arguments_before_writing(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loomctl(lab, "waypoint", "apply", "--service-account", "Not_Valid") == 1
    assert out_lines(capsys) == (
        [],
        "Error: service account 'Not_Valid' is not valid: it must be lower-case "
        "letters, digits, '-' and '.', starting and ending with a letter or digit, at "
        "most 253 characters\n",
    )
    assert store.list(kind="Gateway") == []


# --- enrolment ----------------------------------------------------------------------------------------


def namespace_labels(store: LabStore, name: str) -> dict[str, str]:
    manifest = store.get(StoredKey("Namespace", "", name))
    assert manifest is not None
    labels: dict[str, str] = manifest["metadata"].get("labels", {})
    return labels


def test_enroll_namespace_in_ambient(lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]) -> None:
    namespace(store, "shop", {"istio.io/dataplane-mode": "ambient"})
    assert loomctl(lab, "waypoint", "apply", "-n", "shop", "--enroll-namespace") == 0
    assert out_lines(capsys) == (
        [
            "✅ waypoint shop/waypoint applied",
            '✅ namespace shop labeled with "istio.io/use-waypoint: waypoint"',
        ],
        "",
    )
    assert namespace_labels(store, "shop") == {
        "istio.io/dataplane-mode": "ambient",
        "istio.io/use-waypoint": "waypoint",
    }


def test_enroll_namespace_not_in_ambient_warns(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace(store, "shop", {})
    assert loomctl(lab, "waypoint", "apply", "-n", "shop", "--enroll-namespace") == 0
    out, err = out_lines(capsys)
    assert out[-1] == '✅ namespace shop labeled with "istio.io/use-waypoint: waypoint"'
    assert err == (
        "⚠️ Warning: namespace is not enrolled in ambient. Consider running "
        '"loomctl label namespace shop istio.io/dataplane-mode=ambient"\n'
    )


def test_enroll_namespace_using_another_waypoint_needs_overwrite(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace(store, "shop", {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "old"})
    assert loomctl(lab, "waypoint", "apply", "-n", "shop", "--name", "new", "--enroll-namespace") == 1
    out, err = out_lines(capsys)
    assert out == []
    assert err == (
        "Error: namespace shop already uses waypoint 'old' (istio.io/use-waypoint=old); it was not "
        "relabelled and nothing was applied: use --overwrite to replace it\n"
    )
    assert store.list(kind="Gateway") == []  # checked before anything was written
    argv = ("waypoint", "apply", "-n", "shop", "--name", "new", "--enroll-namespace", "--overwrite")
    assert loomctl(lab, *argv) == 0
    assert namespace_labels(store, "shop")["istio.io/use-waypoint"] == "new"


def test_enroll_namespace_with_a_service_account_is_refused(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("waypoint", "apply", "-n", "shop", "--service-account", "cart", "--enroll-namespace")
    assert loomctl(lab, *argv) == 1
    out, err = out_lines(capsys)
    assert out == [] and err.startswith(
        "Error: --enroll-namespace with --service-account would send every Service"
    )
    assert store.list() == []


# --- list and status ----------------------------------------------------------------------------------


def seed_waypoints(lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(lab, "waypoint", "apply", "-n", "default") == 0
    assert (
        loomctl(
            lab, "waypoint", "apply", "-n", "default", "--name", "reviews-wp", "--service-account", "reviews"
        )
        == 0
    )
    assert loomctl(lab, "waypoint", "apply", "-n", "shop", "--for", "workload", "-r", "canary") == 0
    # An ingress Gateway of another class is not a waypoint.
    store.put(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "ingress", "namespace": "default"},
            "spec": {
                "gatewayClassName": "istio",
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            },
        }
    )
    report(store, "default", "waypoint", READY)
    capsys.readouterr()


def test_list(lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(lab, "waypoint", "list") == 0
    assert out_lines(capsys) == (["No waypoints found."], "")
    seed_waypoints(lab, store, capsys)
    assert loomctl(lab, "waypoint", "list") == 0
    assert out_lines(capsys) == (
        [
            "NAME       REVISION TRAFFIC TYPE PROGRAMMED SERVICE ACCOUNT",
            "reviews-wp default  all          False      reviews",
            "waypoint   default  service      True       -",
        ],
        "",
    )
    assert loomctl(lab, "waypoint", "list", "-A") == 0
    assert out_lines(capsys) == (
        [
            "NAMESPACE NAME       REVISION TRAFFIC TYPE PROGRAMMED SERVICE ACCOUNT",
            "default   reviews-wp default  all          False      reviews",
            "default   waypoint   default  service      True       -",
            "shop      waypoint   canary   workload     False      -",
        ],
        "",
    )
    assert loomctl(lab, "waypoint", "list", "-n", "empty") == 0
    assert out_lines(capsys) == (["No waypoints found."], "")


def test_status_names_what_is_not_ready(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_waypoints(lab, store, capsys)
    report(
        store,
        "shop",
        "waypoint",
        [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted"},
            {"type": "Programmed", "status": "False", "reason": "NoHealthyPods", "message": "0/1 pods ready"},
        ],
    )
    assert loomctl(lab, "waypoint", "status") == 1
    pending = "Pending       the controller has not reported on this waypoint yet"
    assert out_lines(capsys) == (
        [
            "NAMESPACE NAME       STATUS  TYPE       REASON        MESSAGE",
            f"default   reviews-wp Unknown Accepted   {pending}",
            f"default   reviews-wp Unknown Programmed {pending}",
            "default   waypoint   True    Accepted   Accepted      Resource accepted",
            "default   waypoint   True    Programmed Programmed    Resource programmed",
            "shop      waypoint   True    Accepted   Accepted      Resource accepted",
            "shop      waypoint   False   Programmed NoHealthyPods 0/1 pods ready",
            "",
            "waypoint default/reviews-wp is not ready: Programmed not reported yet (the controller has not "
            "reported on this waypoint yet)",
            "waypoint shop/waypoint is not ready: Programmed=False (NoHealthyPods: 0/1 pods ready)",
        ],
        "",
    )
    assert loomctl(lab, "waypoint", "status", "-n", "default", "waypoint") == 0
    assert out_lines(capsys) == (
        [
            "NAME     STATUS TYPE       REASON     MESSAGE",
            "waypoint True   Accepted   Accepted   Resource accepted",
            "waypoint True   Programmed Programmed Resource programmed",
        ],
        "",
    )


def test_status_errors(lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(lab, "waypoint", "status") == 0
    assert out_lines(capsys) == (["No waypoints found."], "")
    assert loomctl(lab, "waypoint", "status", "waypoint") == 1
    assert out_lines(capsys) == (
        [],
        "Error: naming waypoints needs their namespace: add -n NAMESPACE (and no -A)\n",
    )
    assert loomctl(lab, "waypoint", "status", "-n", "default", "ghost") == 1
    assert out_lines(capsys) == ([], "Error: waypoint default/ghost not found\n")


def test_wait_gives_up_after_the_timeout_and_names_the_reason(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("waypoint", "apply", "-n", "default", "--wait", "--waypoint-timeout", "300ms")
    assert loomctl(lab, *argv) == 1
    out, err = out_lines(capsys)
    assert out == ["✅ waypoint default/waypoint applied"]
    assert err == (
        "Error: waypoint default/waypoint is not ready after 0.3s: Programmed not reported yet "
        "(the controller has not reported on this waypoint yet)\n"
    )
    assert loomctl(lab, "waypoint", "status", "-n", "default", "-w", "--waypoint-timeout", "0.2") == 1
    assert out_lines(capsys)[0][-1].startswith("waypoint default/waypoint is not ready")


def test_wait_returns_once_programmed(lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert loomctl(lab, "waypoint", "apply") == 0
    report(store, "default", "waypoint", READY)
    capsys.readouterr()
    assert loomctl(lab, "waypoint", "apply", "--wait", "--enroll-namespace") == 0
    out, err = out_lines(capsys)
    assert out == [
        "✅ waypoint default/waypoint applied",
        "✅ waypoint default/waypoint is ready!",
        '✅ namespace default labeled with "istio.io/use-waypoint: waypoint"',
    ]
    assert err.startswith("⚠️ Warning: namespace is not enrolled in ambient.")


def test_bad_wait_timeout_is_a_usage_error(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        loomctl(lab, "waypoint", "apply", "--wait", "--waypoint-timeout", "soon")
    assert exit_info.value.code == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


# --- delete -------------------------------------------------------------------------------------------


def test_delete(lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]) -> None:
    seed_waypoints(lab, store, capsys)
    assert loomctl(lab, "waypoint", "delete", "waypoint", "ghost", "ingress") == 1
    out, err = out_lines(capsys)
    assert out == ["waypoint default/waypoint deleted"]
    assert err == (
        "waypoint default/ghost not found\n"
        "Error: gateway default/ingress is not a waypoint (gatewayClassName 'istio'); not deleted\n"
    )
    assert store.get(StoredKey("Gateway", "default", "ingress")) is not None
    assert loomctl(lab, "waypoint", "delete", "--all", "-n", "shop") == 0
    assert out_lines(capsys) == (["waypoint shop/waypoint deleted"], "")
    assert loomctl(lab, "waypoint", "delete", "--all", "-n", "shop") == 0
    assert out_lines(capsys) == (["No waypoints found."], "")
    assert [w["metadata"]["name"] for w in store.list(kind="Gateway")] == ["ingress", "reviews-wp"]


def test_delete_warns_when_the_namespace_still_uses_it(
    lab: Path, store: LabStore, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace(store, "shop", {"istio.io/dataplane-mode": "ambient"})
    assert loomctl(lab, "waypoint", "apply", "-n", "shop", "--enroll-namespace") == 0
    capsys.readouterr()
    assert loomctl(lab, "waypoint", "delete", "-n", "shop", "waypoint") == 0
    out, err = out_lines(capsys)
    assert out == ["waypoint shop/waypoint deleted"]
    assert err == (
        "Warning: namespace shop still has istio.io/use-waypoint=waypoint: traffic bound to it fails until a "
        'waypoint of that name exists again; remove the label with "loomctl label namespace shop '
        'istio.io/use-waypoint-"\n'
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("waypoint", "delete"), "Error: give the NAMEs of the waypoints to delete, or --all (not both)\n"),
        (
            ("waypoint", "delete", "x", "--all"),
            "Error: give the NAMEs of the waypoints to delete, or --all (not both)\n",
        ),
        (("waypoint", "delete", "Bad_Name"), 'Error: waypoint default/Bad_Name: invalid name "Bad_Name"\n'),
    ],
)
def test_delete_usage_errors(
    lab: Path, argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loomctl(lab, *argv) == 1
    assert out_lines(capsys) == ([], message)
