"""The waypoint's xDS session and configuration state (waypoint/xds.py), sans-IO: what it subscribes
to and announces, how WaypointConfig and Address responses are applied, ACKed and NACKed (fail
closed: the last good configuration stays; removal leaves no configuration), and its settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import gateway, policy, target

from loom.api import discovery_pb2, waypoint_pb2, workload_pb2
from loom.resources.model import AuthorizationPolicy
from waypoint.xds import (
    WAYPOINT_CONFIG_TYPE_URL,
    SettingsError,
    WaypointConfigState,
    WaypointView,
    WaypointXdsSession,
    WaypointXdsSettings,
)
from ztunnel.state import ProxyState
from ztunnel.xds import ADDRESS_TYPE_URL

ENV = {
    "WAYPOINT_NAMESPACE": "default",
    "WAYPOINT_NAME": "waypoint",
    "SERVICE_ACCOUNT": "waypoint",
    "XDS_ADDRESS": "10.0.0.2:15012",
    "ROOT_CERT": "/lab/root-cert.pem",
    "WORKLOAD_TOKEN_FILE": "/lab/wp.token",
    "POD_NAME": "waypoint-abc-xyz",
    "INSTANCE_IP": "10.244.0.7",
}


def manifest(obj: dict[str, Any]) -> waypoint_pb2.Manifest:
    meta = obj["metadata"]
    return waypoint_pb2.Manifest(
        kind=obj["kind"], namespace=meta["namespace"], name=meta["name"], json=json.dumps(obj).encode()
    )


def config(name: str = "waypoint", **fields: Any) -> waypoint_pb2.WaypointConfig:
    values: dict[str, Any] = {
        "namespace": "default",
        "name": name,
        "trust_domain": "cluster.local",
        "service_account": name,
        "traffic_type": "service",
        "gateway": manifest(gateway("default", name)),
        "services": [
            waypoint_pb2.ServedService(
                namespace="default", name="reviews", hostname="reviews.default.svc.cluster.local"
            )
        ],
        "policies": [manifest(policy("default", "deny-delete", [target("Gateway", name)]))],
    }
    values.update(fields)
    return waypoint_pb2.WaypointConfig(**values)


def response(
    type_url: str,
    resources: dict[str, bytes],
    removed: tuple[str, ...] = (),
    nonce: str = "1",
    version: str = "v1",
) -> discovery_pb2.DeltaDiscoveryResponse:
    r = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce, removed_resources=removed)
    for name, value in resources.items():
        entry = r.resources.add(name=name, version=version)
        entry.resource.type_url = type_url
        entry.resource.value = value
    return r


@pytest.fixture
def settings() -> WaypointXdsSettings:
    return WaypointXdsSettings.from_env(ENV)


@pytest.fixture
def session(settings: WaypointXdsSettings) -> WaypointXdsSession:
    return WaypointXdsSession(ProxyState(), WaypointConfigState("default", "waypoint"), settings.node())


def test_settings_from_the_environment(settings: WaypointXdsSettings) -> None:
    assert settings.key == "default/waypoint"
    assert str(settings.identity) == "spiffe://cluster.local/ns/default/sa/waypoint"
    assert settings.ca_address == "10.0.0.2:15012"  # defaults to the xDS address
    assert settings.root_cert == Path("/lab/root-cert.pem")
    assert settings.token_file == Path("/lab/wp.token")
    fallback = WaypointXdsSettings.from_env({**ENV, "WAYPOINT_NAMESPACE": "", "POD_NAMESPACE": "bookinfo"})
    assert fallback.namespace == "bookinfo"


def test_bad_settings_are_all_reported() -> None:
    with pytest.raises(SettingsError) as error:
        WaypointXdsSettings.from_env(
            {"WAYPOINT_NAME": "9bad", "XDS_ADDRESS": "nowhere", "TRUST_DOMAIN": "Bad TD"}
        )
    text = "\n".join(error.value.problems)
    for variable in (
        "WAYPOINT_NAMESPACE",
        "WAYPOINT_NAME",
        "SERVICE_ACCOUNT",
        "XDS_ADDRESS",
        "TRUST_DOMAIN",
    ):
        assert variable in text
    assert len(error.value.problems) == 5


def test_connect_subscribes_config_first_and_announces_the_waypoint(session: WaypointXdsSession) -> None:
    requests = session.connect()
    assert [r.type_url for r in requests] == [WAYPOINT_CONFIG_TYPE_URL, ADDRESS_TYPE_URL]
    assert all(not r.resource_names_subscribe for r in requests)  # wildcard
    node = requests[0].node
    assert node.id == "waypoint~10.244.0.7~waypoint-abc-xyz.default~default.svc.cluster.local"
    metadata = {k: v.string_value for k, v in node.metadata.fields.items()}
    assert metadata["NAMESPACE"] == "default" and metadata["WAYPOINT_NAME"] == "waypoint"
    assert not requests[1].HasField("node")
    assert WAYPOINT_CONFIG_TYPE_URL == "type.googleapis.com/loom.waypoint.v1.WaypointConfig"


def test_config_is_applied_acked_and_announced_on_reconnect(session: WaypointXdsSession) -> None:
    seen: list[WaypointView | None] = []
    session.config.watch(seen.append)
    outcome = session.on_response(
        response(WAYPOINT_CONFIG_TYPE_URL, {"default/waypoint": config().SerializeToString()})
    )
    assert not outcome.nacked and outcome.applied == 1
    view = session.config.view
    assert view is not None and seen == [view]
    assert [s.name for s in view.services] == ["reviews"]
    [deny] = view.policies
    assert isinstance(deny, AuthorizationPolicy) and deny.action == "DENY"
    assert session.config.version == "v1"
    assert not session.ready  # Address not answered yet
    session.on_response(response(ADDRESS_TYPE_URL, {}))
    assert session.ready
    again = session.connect()
    assert dict(again[0].initial_resource_versions) == {"default/waypoint": "v1"}


@pytest.mark.parametrize(
    ("name", "body", "why"),
    [
        pytest.param(
            "default/other", config("other").SerializeToString(), "not this waypoint", id="another's"
        ),
        pytest.param(
            "default/waypoint", config(namespace="evil").SerializeToString(), "is for waypoint", id="inner"
        ),
        pytest.param(
            "default/waypoint", config(service_account="").SerializeToString(), "identity", id="no SA"
        ),
        pytest.param("default/waypoint", b"\xff\xff\xff", "decoded", id="garbage"),
        pytest.param(
            "default/waypoint",
            config(
                policies=[
                    waypoint_pb2.Manifest(
                        kind="AuthorizationPolicy", namespace="default", name="p", json=b"{"
                    )
                ]
            ).SerializeToString(),
            "not JSON",
            id="unreadable policy",
        ),
        pytest.param(
            "default/waypoint",
            config(routes=[manifest(policy("default", "p"))]).SerializeToString(),
            "expected a HTTPRoute",
            id="kind mismatch",
        ),
        pytest.param(
            "default/waypoint",
            config(
                policies=[
                    waypoint_pb2.Manifest(
                        kind="AuthorizationPolicy",
                        namespace="default",
                        name="other",
                        json=manifest(policy("default", "p")).json,
                    )
                ]
            ).SerializeToString(),
            "names default/p",
            id="envelope mismatch",
        ),
    ],
)
def test_bad_configs_are_nacked_and_the_last_good_one_stays(
    session: WaypointXdsSession, name: str, body: bytes, why: str
) -> None:
    session.on_response(
        response(WAYPOINT_CONFIG_TYPE_URL, {"default/waypoint": config().SerializeToString()})
    )
    good = session.config.view
    outcome = session.on_response(response(WAYPOINT_CONFIG_TYPE_URL, {name: body}, nonce="2", version="v2"))
    assert outcome.nacked
    assert why in outcome.rejected[name]
    assert outcome.reply.error_detail.code == 3
    assert session.config.view is good
    assert session.held(WAYPOINT_CONFIG_TYPE_URL) == {"default/waypoint": "v1"}


def test_a_config_rejected_first_leaves_no_configuration(session: WaypointXdsSession) -> None:
    outcome = session.on_response(response(WAYPOINT_CONFIG_TYPE_URL, {"default/waypoint": b"\xff"}))
    assert outcome.nacked and session.config.view is None


def test_invalid_policy_is_kept_as_a_deny_stand_in(session: WaypointXdsSession) -> None:
    broken = policy("default", "broken", [target("Gateway", "waypoint")], action="ALLOW")
    broken["spec"]["rules"] = "everything"
    outcome = session.on_response(
        response(
            WAYPOINT_CONFIG_TYPE_URL,
            {"default/waypoint": config(policies=[manifest(broken)]).SerializeToString()},
        )
    )
    assert not outcome.nacked
    assert session.config.view is not None
    [stand_in] = session.config.view.policies
    assert stand_in.invalid and stand_in.action == "DENY"


def test_removal_leaves_the_waypoint_without_configuration(session: WaypointXdsSession) -> None:
    seen: list[WaypointView | None] = []
    session.on_response(
        response(WAYPOINT_CONFIG_TYPE_URL, {"default/waypoint": config().SerializeToString()})
    )
    session.config.watch(seen.append)
    outcome = session.on_response(
        response(WAYPOINT_CONFIG_TYPE_URL, {}, removed=("default/waypoint",), nonce="2")
    )
    assert not outcome.nacked and outcome.removed == 1
    assert session.config.view is None and seen == [None]
    assert session.held(WAYPOINT_CONFIG_TYPE_URL) == {}


def test_addresses_go_to_the_proxy_state(session: WaypointXdsSession) -> None:
    address = workload_pb2.Address(
        service=workload_pb2.Service(
            name="reviews", namespace="default", hostname="reviews.default.svc.cluster.local"
        )
    )
    name = "default/reviews.default.svc.cluster.local"
    outcome = session.on_response(response(ADDRESS_TYPE_URL, {name: address.SerializeToString()}))
    assert not outcome.nacked
    assert session.held(ADDRESS_TYPE_URL) == {name: "v1"}


def test_types_it_did_not_subscribe_to_are_rejected(session: WaypointXdsSession) -> None:
    outcome = session.on_response(
        response("type.googleapis.com/istio.security.Authorization", {"default/p": b""})
    )
    assert outcome.nacked
