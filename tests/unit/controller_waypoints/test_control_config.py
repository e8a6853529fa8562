"""WaypointConfig resources (controller/waypoints/xds.py): which Services, routes and policies each
waypoint gets, read back with the waypoint's own parser (waypoint/xds.py); and the translation keeps
traffic bound to a waypoint that is not ready or does not exist (fail closed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from control_fixtures import (
    AMBIENT,
    gateway,
    gateway_parent,
    http_route,
    namespace,
    pod,
    policy,
    service,
    service_parent,
    snapshot_of,
    target,
)

from controller.translate import MeshConfig, Translator, translate
from controller.waypoints.xds import WaypointConfigBuilder
from loom.api import waypoint_pb2
from loom.resources.model import ConfigSnapshot
from waypoint.xds import WaypointView

MESH = MeshConfig()
USE_WAYPOINT = {"istio.io/use-waypoint": "waypoint"}


def base() -> list[dict[str, Any]]:
    return [
        namespace("default", AMBIENT),
        namespace("istio-system"),
        namespace("other", AMBIENT),
        gateway("default", "waypoint"),
        gateway("default", "second"),
        service("default", "reviews", labels=USE_WAYPOINT, cluster_ip="10.96.0.11"),
        service("default", "ratings", cluster_ip="10.96.0.12"),
        service("default", "details", labels={"istio.io/use-waypoint": "second"}, cluster_ip="10.96.0.13"),
        pod("default", "reviews-1", labels={"app": "reviews"}, service_account="reviews", ip="10.244.0.11"),
        pod("default", "ratings-1", labels={"app": "ratings"}, service_account="ratings", ip="10.244.0.12"),
    ]


def build(
    snapshot: ConfigSnapshot, builder: WaypointConfigBuilder | None = None
) -> dict[str, waypoint_pb2.WaypointConfig]:
    builder = builder or WaypointConfigBuilder(MESH)
    blobs = builder.build(snapshot, translate(snapshot, MESH))
    return {name: waypoint_pb2.WaypointConfig.FromString(blob) for name, blob in blobs.items()}


def names(manifests: Any) -> list[str]:
    return [f"{m.namespace}/{m.name}" for m in manifests]


def test_each_waypoint_gets_its_identity_and_the_services_bound_to_it() -> None:
    configs = build(snapshot_of(*base()))
    assert sorted(configs) == ["default/second", "default/waypoint"]
    mine = configs["default/waypoint"]
    assert (mine.namespace, mine.name, mine.trust_domain, mine.service_account, mine.traffic_type) == (
        "default",
        "waypoint",
        "cluster.local",
        "waypoint",
        "service",
    )
    assert [(s.namespace, s.name, s.hostname) for s in mine.services] == [
        ("default", "reviews", "reviews.default.svc.cluster.local")
    ]
    assert [s.name for s in configs["default/second"].services] == ["details"]
    assert json.loads(mine.gateway.json)["metadata"]["name"] == "waypoint"


def test_per_service_account_waypoint_serves_services_of_its_account() -> None:
    objects = [
        namespace("default", AMBIENT),
        gateway("default", "bookinfo-reviews", for_sa="reviews"),
        service("default", "reviews", cluster_ip="10.96.0.11"),
        pod("default", "reviews-1", labels={"app": "reviews"}, service_account="reviews", ip="10.244.0.11"),
    ]
    [config] = build(snapshot_of(*objects)).values()
    assert config.service_account == "bookinfo-reviews-istio-waypoint"
    assert config.traffic_type == "all"
    assert [s.name for s in config.services] == ["reviews"]


def test_routes_attached_to_the_waypoint_or_its_services() -> None:
    routes = [
        http_route("default", "to-reviews", [service_parent("reviews")], "reviews"),
        http_route("default", "to-gateway", [gateway_parent("waypoint")], "reviews"),
        http_route("other", "consumer", [service_parent("reviews", "default")], "reviews"),
        http_route("default", "to-ratings", [service_parent("ratings")], "ratings"),  # not served
        http_route("default", "to-second", [gateway_parent("second")], "details"),
        http_route("other", "wrong-ns", [service_parent("reviews")], "reviews"),  # other/reviews
    ]
    configs = build(snapshot_of(*base(), *routes))
    assert names(configs["default/waypoint"].routes) == [
        "default/to-gateway",
        "default/to-reviews",
        "other/consumer",
    ]
    assert names(configs["default/second"].routes) == ["default/to-second"]


def test_policies_targeting_the_waypoint_its_class_or_its_services() -> None:
    policies = [
        policy("default", "on-gateway", [target("Gateway", "waypoint")]),
        policy("default", "on-reviews", [target("Service", "reviews")]),
        policy("default", "on-reviews-core", [target("Service", "reviews", group="core")]),
        policy("istio-system", "on-class", [target("GatewayClass", "istio-waypoint")]),
        policy("default", "class-outside-root", [target("GatewayClass", "istio-waypoint")]),
        policy("default", "on-ratings", [target("Service", "ratings")]),
        policy("default", "on-second", [target("Gateway", "second")]),
        policy("default", "cross-namespace", [target("Gateway", "waypoint", namespace="other")]),
        policy("other", "other-namespace", [target("Gateway", "waypoint")]),
        policy("default", "selector", selector={"app": "reviews"}),
        policy("default", "namespace-wide"),
    ]
    configs = build(snapshot_of(*base(), *policies))
    assert names(configs["default/waypoint"].policies) == [
        "default/on-gateway",
        "default/on-reviews",
        "default/on-reviews-core",
        "istio-system/on-class",
    ]
    assert names(configs["default/second"].policies) == ["default/on-second", "istio-system/on-class"]


def test_invalid_policy_travels_and_becomes_the_same_stand_in_at_the_waypoint() -> None:
    broken = policy("default", "broken", [target("Gateway", "waypoint")])
    broken["spec"]["rules"][0]["to"][0]["operation"]["methods"] = "GET"  # not a list
    snapshot = snapshot_of(*base(), broken)
    config = build(snapshot)["default/waypoint"]
    assert names(config.policies) == ["default/broken"]
    view = WaypointView.from_proto(config, "default", "waypoint")
    [stand_in] = view.policies
    assert stand_in.invalid and stand_in.action == "DENY"


def test_view_round_trip_with_the_waypoint_parser() -> None:
    objects = [
        *base(),
        http_route("default", "to-reviews", [service_parent("reviews")], "reviews"),
        policy("default", "on-gateway", [target("Gateway", "waypoint")], action="ALLOW", methods=["GET"]),
    ]
    config = build(snapshot_of(*objects))["default/waypoint"]
    view = WaypointView.from_proto(config, "default", "waypoint")
    assert str(view.identity) == "spiffe://cluster.local/ns/default/sa/waypoint"
    assert view.gateway is not None and view.gateway.is_waypoint
    [route] = view.routes
    assert route.parent_refs[0].kind == "Service" and route.rules[0].backend_refs[0].name == "reviews"
    [allow] = view.policies
    assert allow.action == "ALLOW" and allow.rules is not None
    assert allow.rules[0].operations[0].methods == ("GET",)


def test_manifests_drop_status_and_are_deterministic() -> None:
    gw = gateway("default", "waypoint")
    gw["status"] = {"conditions": [{"type": "Programmed", "status": "True"}]}
    gw["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    objects = [*base()[:3], gw, *base()[4:]]
    first = WaypointConfigBuilder(MESH).build(snapshot_of(*objects), translate(snapshot_of(*objects), MESH))
    again = WaypointConfigBuilder(MESH).build(snapshot_of(*objects), translate(snapshot_of(*objects), MESH))
    assert first == again
    document = json.loads(waypoint_pb2.WaypointConfig.FromString(first["default/waypoint"]).gateway.json)
    assert "status" not in document and "managedFields" not in document["metadata"]
    # A status write alone does not change what the waypoint gets (no push for it).
    gw["status"] = {"conditions": [{"type": "Programmed", "status": "False"}]}
    third = WaypointConfigBuilder(MESH).build(snapshot_of(*objects), translate(snapshot_of(*objects), MESH))
    assert third == first


def test_unchanged_addresses_are_not_decoded_again() -> None:
    translator = Translator(MESH)
    builder = WaypointConfigBuilder(MESH)
    snapshot = snapshot_of(*base())
    builder.build(snapshot, translator.update(snapshot))
    decoded = builder.decoded
    assert decoded == len(translator.translation.addresses)  # type: ignore[union-attr]
    # One more pod: the incremental translator keeps every other resource's bytes; only it is decoded.
    grown = snapshot_of(*base(), pod("default", "ratings-2", labels={"app": "ratings"}, ip="10.244.0.13"))
    builder.build(grown, translator.update(grown))
    assert builder.decoded - decoded <= 2  # the new workload (and ratings, if its bytes changed)


def test_no_waypoints_no_configs() -> None:
    snapshot = snapshot_of(namespace("default"), service("default", "reviews"))
    assert WaypointConfigBuilder(MESH).build(snapshot, translate(snapshot, MESH)) == {}


# ---------------------------------------------------------------------------------------------------
# fail closed: traffic stays bound to a waypoint that is not ready (or not there)


def service_waypoint(snapshot: ConfigSnapshot, name: str) -> str:
    address = translate(snapshot, MESH).addresses[f"default/{name}.default.svc.cluster.local"]
    return address.service.waypoint.hostname.hostname if address.service.HasField("waypoint") else ""


@pytest.mark.parametrize(
    "waypoint_objects",
    [
        pytest.param([], id="no waypoint pods at all"),
        pytest.param(
            [
                pod(
                    "default",
                    "waypoint-1",
                    labels={"gateway.networking.k8s.io/gateway-name": "waypoint"},
                    service_account="waypoint",
                    phase="Pending",
                    ready=False,
                )
            ],
            id="waypoint pod pending",
        ),
        pytest.param(
            [
                pod(
                    "default",
                    "waypoint-1",
                    labels={"gateway.networking.k8s.io/gateway-name": "waypoint"},
                    service_account="waypoint",
                    ready=False,
                )
            ],
            id="waypoint pod running, not ready",
        ),
    ],
)
def test_a_waypoint_that_is_not_ready_stays_bound(waypoint_objects: list[dict[str, Any]]) -> None:
    snapshot = snapshot_of(*base(), *waypoint_objects)
    assert service_waypoint(snapshot, "reviews") == "waypoint.default.svc.cluster.local"


def test_a_missing_waypoint_stays_bound() -> None:
    objects = [o for o in base() if not (o["kind"] == "Gateway" and o["metadata"]["name"] == "waypoint")]
    assert service_waypoint(snapshot_of(*objects), "reviews") == "waypoint.default.svc.cluster.local"
