"""waypoint_gateway: the manifest istioctl generates (plus loom's per-service-account annotation),
accepted by loom's loader without a warning, bad arguments refused by name; waypoint_state reads the
conditions the controller wrote, whatever their shape."""

from __future__ import annotations

from typing import Any

import pytest

from loom.resources.loader import check_object
from loom.resources.model import Gateway
from waypoint.gateway import (
    WaypointSpecError,
    is_waypoint_manifest,
    waypoint_gateway,
    waypoint_state,
)


def test_default_waypoint_is_istioctls() -> None:
    assert waypoint_gateway("default") == {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "default"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def test_per_service_account_waypoint_with_traffic_type_and_revision() -> None:
    manifest = waypoint_gateway(
        "bookinfo", "reviews-wp", service_account="bookinfo-reviews", for_="workload", revision="canary"
    )
    assert manifest["metadata"] == {
        "name": "reviews-wp",
        "namespace": "bookinfo",
        "labels": {"istio.io/waypoint-for": "workload", "istio.io/rev": "canary"},
        "annotations": {"istio.io/for-service-account": "bookinfo-reviews"},
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"service_account": "bookinfo-reviews"},
        {"for_": "all"},
        {"for_": "none", "revision": "1-24-0"},
        {"service_account": "sa.with.dots", "for_": "service"},
    ],
)
def test_the_loader_accepts_it_as_a_waypoint(kwargs: dict[str, Any]) -> None:
    manifest = waypoint_gateway("bookinfo", "wp", **kwargs)
    check = check_object(manifest)
    assert check.errors == () and check.warnings == ()
    assert isinstance(check.obj, Gateway) and check.obj.is_waypoint
    assert check.obj.for_service_account == kwargs.get("service_account", "")
    assert is_waypoint_manifest(manifest)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("Default",), {}, "namespace 'Default' is not valid"),
        (("default", "none"), {}, "waypoint name 'none' is reserved"),
        (("default", "1wp"), {}, "waypoint name '1wp' is not valid"),
        (("default", "w" * 64), {}, "is not valid"),
        (("default",), {"for_": "everything"}, "traffic type 'everything' is not one of service, workload"),
        (("default",), {"service_account": "Bad_SA"}, "service account 'Bad_SA' is not valid"),
        (("default",), {"revision": "-x"}, "revision '-x' is not a valid label value"),
    ],
)
def test_bad_arguments_are_named(args: tuple[str, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(WaypointSpecError, match=message):
        waypoint_gateway(*args, **kwargs)


def with_status(manifest: dict[str, Any], status: object) -> dict[str, Any]:
    return {**manifest, "status": status}


def test_state_of_a_programmed_waypoint() -> None:
    manifest = with_status(
        waypoint_gateway("default", service_account="reviews"),
        {
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok"},
                {"type": "Programmed", "status": "True", "reason": "Programmed", "message": "ready"},
            ]
        },
    )
    state = waypoint_state(manifest)
    assert state.programmed
    assert (state.namespace, state.name, state.revision) == ("default", "waypoint", "default")
    assert (state.traffic_type, state.service_account) == ("all", "reviews")
    accepted = state.condition("Accepted")
    assert accepted is not None and accepted.message == "ok"


@pytest.mark.parametrize(
    "status",
    [
        None,
        "garbage",
        {"conditions": "garbage"},
        {
            "conditions": [
                7,
                {"status": "True"},
                {"type": "Programmed", "status": "False", "reason": "NoPods"},
            ]
        },
        {"conditions": [{"type": "Programmed"}]},
    ],
    ids=["none", "string", "conditions-string", "mixed", "no-status-field"],
)
def test_malformed_or_pending_status_is_not_ready(status: object) -> None:
    state = waypoint_state(with_status(waypoint_gateway("default", for_="workload"), status))
    assert not state.programmed
    assert state.traffic_type == "workload"


def test_not_a_waypoint() -> None:
    other = waypoint_gateway("default")
    other["spec"] = {**other["spec"], "gatewayClassName": "istio"}
    assert not is_waypoint_manifest(other)
    assert not is_waypoint_manifest({**waypoint_gateway("default"), "apiVersion": "networking.istio.io/v1"})
    assert not is_waypoint_manifest({"kind": "Gateway", "spec": "x"})
