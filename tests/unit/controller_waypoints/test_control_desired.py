"""The objects that run a waypoint and the status of its Gateway (controller/waypoints/desired.py): pure
tables, plus the contract with the rest of loom (the loader accepts every object, the lab's pods of the
Deployment are recognised as waypoint pods by the translation)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import gateway, gateway_obj, snapshot_of

from controller.translate import MeshConfig, translate
from controller.waypoints.desired import (
    COMMAND_ANNOTATION,
    LABEL_MANAGED,
    MANAGED_BY,
    DesiredWaypoint,
    LabSettings,
    Observation,
    Rejected,
    WaypointSettings,
    gateway_status,
    is_managed,
    lab_command,
    plan,
    status_current,
    waypoint_service_account,
)
from loom.api import workload_pb2
from loom.resources.loader import check_object, expand_deployment, parse_object
from loom.resources.model import Deployment, Gateway

K8S = WaypointSettings(xds_address="loom-controller.istio-system.svc:15012", image="reg/loom:1")
LAB = WaypointSettings(
    xds_address="10.0.0.2:15012",
    command=("/venv/bin/loom-waypoint",),
    lab=LabSettings(
        root_cert=Path("/lab/controller/root-cert.pem"), token_dir=Path("/lab/controller/tokens")
    ),
)
GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"


def accepted(gw: Gateway, settings: WaypointSettings = K8S) -> DesiredWaypoint:
    result = plan(gw, settings)
    assert isinstance(result, DesiredWaypoint), result
    return result


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---------------------------------------------------------------------------------------------------
# objects


@pytest.mark.parametrize(
    ("manifest", "account"),
    [
        pytest.param(gateway(name="waypoint"), "waypoint", id="current model: named after the Gateway"),
        pytest.param(
            gateway(name="bookinfo-reviews", for_sa="bookinfo-reviews"),
            "bookinfo-reviews-istio-waypoint",
            id="per-SA: never the account it serves",
        ),
        pytest.param(gateway(name="w2", for_sa="other"), "w2-istio-waypoint", id="per-SA, other name"),
    ],
)
def test_service_account_naming(manifest: dict[str, Any], account: str) -> None:
    gw = gateway_obj(manifest)
    assert waypoint_service_account(gw) == account
    desired = accepted(gw)
    assert desired.account_name == account
    assert desired.deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
    assert gw.for_service_account != account


def test_kubernetes_objects() -> None:
    gw = gateway_obj(gateway("bookinfo", "waypoint", uid="gw-uid-1"))
    desired = accepted(gw)
    owner = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": "waypoint",
        "controller": True,
        "uid": "gw-uid-1",
    }
    labels = {GATEWAY_LABEL: "waypoint", LABEL_MANAGED: MANAGED_BY}
    for manifest in desired.manifests:
        assert manifest["metadata"] == {
            "name": manifest["metadata"]["name"],
            "namespace": "bookinfo",
            "labels": labels,
            "ownerReferences": [owner],
        }
        assert is_managed(manifest, "waypoint") and not is_managed(manifest, "other")
    assert [m["kind"] for m in desired.manifests] == ["ServiceAccount", "Service", "Deployment"]

    assert desired.service["metadata"]["name"] == "waypoint"
    assert desired.service["spec"] == {
        "type": "ClusterIP",
        "selector": {GATEWAY_LABEL: "waypoint"},
        "ports": [
            {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "hbone"}
        ],
    }

    spec = desired.deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"] == {"matchLabels": {GATEWAY_LABEL: "waypoint"}}
    template = spec["template"]
    assert template["metadata"] == {
        "labels": {
            GATEWAY_LABEL: "waypoint",
            "istio.io/dataplane-mode": "none",
            "sidecar.istio.io/inject": "false",
            LABEL_MANAGED: MANAGED_BY,
        }
    }
    [container] = template["spec"]["containers"]
    assert container["image"] == "reg/loom:1"
    assert container["command"] == ["loom-waypoint"]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("hbone", 15008),
        ("metrics", 15020),
        ("status-port", 15021),
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    env = env_of(container)
    assert env["XDS_ADDRESS"] == "loom-controller.istio-system.svc:15012"
    assert env["ROOT_CERT"] == "/var/run/secrets/istio/root-cert.pem"
    assert env["WORKLOAD_TOKEN_FILE"] == "/var/run/secrets/tokens/istio-token"
    assert (env["WAYPOINT_NAMESPACE"], env["WAYPOINT_NAME"], env["SERVICE_ACCOUNT"]) == (
        "bookinfo",
        "waypoint",
        "waypoint",
    )
    assert env["INSTANCE_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca"
    assert volumes["istio-ca-root-cert"]["configMap"] == {"name": "istio-ca-root-cert"}
    assert COMMAND_ANNOTATION not in template["metadata"].get("annotations", {})


def test_lab_deployment_carries_its_settings_in_the_command_line() -> None:
    gw = gateway_obj(gateway("default", "waypoint"))
    desired = accepted(gw, LAB)
    template = desired.deployment["spec"]["template"]
    [container] = template["spec"]["containers"]
    assert "env" not in container and "volumes" not in template["spec"]
    words = shlex.split(template["metadata"]["annotations"][COMMAND_ANNOTATION])
    assert words[:2] == ["exec", "env"]
    assert words[-1] == "/venv/bin/loom-waypoint"
    env = dict(w.split("=", 1) for w in words[2:-1])
    assert env == {
        "XDS_ADDRESS": "10.0.0.2:15012",
        "ROOT_CERT": "/lab/controller/root-cert.pem",
        "WORKLOAD_TOKEN_FILE": "/lab/controller/tokens/default.waypoint.token",
        "WAYPOINT_NAMESPACE": "default",
        "WAYPOINT_NAME": "waypoint",
        "SERVICE_ACCOUNT": "waypoint",
        "TRUST_DOMAIN": "cluster.local",
        "CLUSTER_ID": "Kubernetes",
    }


def test_lab_command_quotes_every_word() -> None:
    line = lab_command({"A": "x y", "B": "$(rm -rf /)", "C": "it's"}, ["/opt/my dir/loom-waypoint", "--v"])
    assert shlex.split(line) == [
        "exec",
        "env",
        "A=x y",
        "B=$(rm -rf /)",
        "C=it's",
        "/opt/my dir/loom-waypoint",
        "--v",
    ]


@pytest.mark.parametrize("settings", [K8S, LAB], ids=["kubernetes", "lab"])
def test_every_object_is_valid_configuration(settings: WaypointSettings) -> None:
    desired = accepted(gateway_obj(gateway("default", "waypoint", for_sa="reviews")), settings)
    for manifest in desired.manifests:
        check = check_object(manifest)
        assert not check.errors, check.errors
        assert not check.warnings, check.warnings


def test_lab_pods_of_the_deployment_are_waypoint_pods_for_the_translation() -> None:
    gw_manifest = gateway("default", "waypoint")
    desired = accepted(gateway_obj(gw_manifest), LAB)
    deployment = parse_object(dict(desired.deployment))
    assert isinstance(deployment, Deployment)
    [pod] = expand_deployment(deployment)
    assert pod.meta.annotations[COMMAND_ANNOTATION].startswith("exec env ")
    assert pod.spec.service_account == "waypoint"
    assert pod.owner_deployment == "waypoint"
    scheduled = {
        **pod.raw,
        "spec": {**pod.raw["spec"], "nodeName": "node-a"},
        "status": {
            "phase": "Running",
            "podIP": "10.244.0.7",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    ns = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
    }
    translation = translate(snapshot_of(ns, gw_manifest, scheduled, dict(desired.service)), MeshConfig())
    [workload] = [a.workload for a in translation.addresses.values() if a.WhichOneof("type") == "workload"]
    assert workload.native_tunnel
    assert workload.tunnel_protocol == workload_pb2.NONE  # never captured
    assert not workload.HasField("waypoint")


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        pytest.param(gateway(name="my.waypoint"), "Invalid", id="not a DNS-1035 label (Service name)"),
        pytest.param(gateway(name="9lives"), "Invalid", id="starts with a digit"),
        pytest.param(
            gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]),
            "ListenersNotValid",
            id="no HBONE listener",
        ),
        pytest.param(
            gateway(listeners=[{"name": "mesh", "port": 15009, "protocol": "HBONE"}]),
            "ListenersNotValid",
            id="HBONE on another port",
        ),
    ],
)
def test_rejections(manifest: dict[str, Any], reason: str) -> None:
    result = plan(gateway_obj(manifest), K8S)
    assert isinstance(result, Rejected)
    assert result.reason == reason and result.message


def test_only_waypoints_are_planned() -> None:
    with pytest.raises(ValueError, match="not a waypoint"):
        plan(gateway_obj(gateway(gateway_class="istio")), K8S)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="command"):
        WaypointSettings(command=())
    with pytest.raises(ValueError, match="replicas"):
        WaypointSettings(replicas=0)


# ---------------------------------------------------------------------------------------------------
# status


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(
    ("seen", "programmed", "addresses"),
    [
        pytest.param(Observation(), ("False", "AddressNotAssigned"), [], id="nothing yet"),
        pytest.param(
            Observation(addresses=("10.96.0.9",)), ("False", "Pending"), ["10.96.0.9"], id="no ready pod"
        ),
        pytest.param(
            Observation(ready_replicas=1), ("False", "AddressNotAssigned"), [], id="ready, no address"
        ),
        pytest.param(
            Observation(ready_replicas=2, addresses=("10.96.0.9",)),
            ("True", "Programmed"),
            ["10.96.0.9"],
            id="programmed",
        ),
        pytest.param(
            Observation(ready_replicas=1, addresses=("10.96.0.9",), conflict="Service x exists"),
            ("False", "Invalid"),
            ["10.96.0.9"],
            id="conflict",
        ),
        pytest.param(Observation(error="API down"), ("False", "NoResources"), [], id="apply failed"),
    ],
)
def test_status_of_an_accepted_waypoint(
    seen: Observation, programmed: tuple[str, str], addresses: list[str]
) -> None:
    gw = gateway_obj(gateway())
    status = gateway_status(gw, plan(gw, K8S), seen, "2026-01-01T00:00:00Z")
    assert conditions(status) == {"Accepted": ("True", "Accepted"), "Programmed": programmed}
    assert [a["value"] for a in status["addresses"]] == addresses
    assert all(a["type"] == "IPAddress" for a in status["addresses"])
    if programmed[0] == "False":
        [message] = [c["message"] for c in status["conditions"] if c["type"] == "Programmed"]
        assert message


def test_status_of_a_rejected_waypoint() -> None:
    gw = gateway_obj(gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]))
    status = gateway_status(gw, plan(gw, K8S), None, "t0")
    assert conditions(status) == {
        "Accepted": ("False", "ListenersNotValid"),
        "Programmed": ("False", "Invalid"),
    }
    assert status["addresses"] == []


def with_status(manifest: dict[str, Any], status: dict[str, Any]) -> Gateway:
    return gateway_obj({**manifest, "status": status})


def test_status_round_trip_is_a_fixed_point_and_transition_times_move_only_on_change() -> None:
    manifest = gateway()
    gw = gateway_obj(manifest)
    planned = plan(gw, K8S)
    pending = Observation(addresses=("10.96.0.9",))
    assert not status_current(gw, planned, pending)
    first = gateway_status(gw, planned, pending, "t1")
    assert {c["lastTransitionTime"] for c in first["conditions"]} == {"t1"}

    written = with_status(manifest, first)
    assert status_current(written, planned, pending)  # reading our own write back: nothing to do

    ready = Observation(ready_replicas=1, addresses=("10.96.0.9",))
    assert not status_current(written, planned, ready)
    second = gateway_status(written, planned, ready, "t2")
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Accepted": "t1", "Programmed": "t2"}  # Accepted did not change


def test_status_keeps_conditions_of_others_and_other_fields() -> None:
    foreign = {"type": "example.com/Audited", "status": "True", "reason": "Audited", "message": ""}
    manifest = gateway()
    gw = with_status(manifest, {"conditions": [foreign], "listeners": [{"name": "mesh"}]})
    status = gateway_status(gw, plan(gw, K8S), Observation(), "t")
    assert foreign in status["conditions"]
    assert status["listeners"] == [{"name": "mesh"}]


def test_status_generation_is_observed() -> None:
    manifest = gateway()
    manifest["metadata"]["generation"] = 7
    gw = gateway_obj(manifest)
    status = gateway_status(gw, plan(gw, K8S), Observation(), "t")
    assert {c["observedGeneration"] for c in status["conditions"]} == {7}
    stale = with_status(
        manifest, {**status, "conditions": [{**c, "observedGeneration": 6} for c in status["conditions"]]}
    )
    assert not status_current(stale, plan(stale, K8S), Observation())
