"""ProxyState: per-response application, indexes, watchers, and fail-closed handling of bad resources."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from loom.api import authorization_pb2 as pb
from loom.api import workload_pb2
from loom.identity import Identity
from loom.policy.rbac import Connection, DecisionReason
from loom.testing.workload_api import (
    by_name,
    hostname,
    packed,
    service,
    service_key,
    uid,
    waypoint_ref,
    workload,
)
from ztunnel.state import (
    AddressError,
    ProxyState,
    StateChange,
    WaypointUnavailable,
    validate_address,
    workload_identity,
)

CLIENT = Identity("cluster.local", "default", "client")


def conn(dst: str = "10.0.0.1", port: int = 80) -> Connection:
    return Connection.of(CLIENT, "10.9.9.9", dst, port)


def recorder(state: ProxyState) -> list[StateChange]:
    changes: list[StateChange] = []
    state.watch(changes.append)
    return changes


def test_lookups_after_apply() -> None:
    state = ProxyState("node-a")
    a = workload("a", "10.0.0.1", "fd00::1", services={"web": [(80, 8080)]})
    b = workload("b", "10.0.0.2", node="node-b", services={"web": [(80, 8080)]})
    web = service("web", "10.96.0.1")
    assert state.apply_addresses(by_name(a, b, web)) == {}
    assert state.workload(uid("a")) is a.workload
    assert state.workload_by_ip("10.0.0.1") is a.workload
    assert state.workload_by_ip("fd00::1") is a.workload
    assert state.workload_by_ip("::ffff:10.0.0.2") is b.workload
    assert state.workload_by_ip(ipaddress.ip_address("10.0.0.2")) is b.workload
    assert state.workload_by_ip("10.0.0.1", network="elsewhere") is None
    assert state.service(service_key("web")) is web.service
    assert state.service_by_vip("10.96.0.1") is web.service
    assert [e.workload.name for e in state.endpoints(service_key("web"))] == ["a", "b"]
    assert [p.target_port for p in state.endpoints(service_key("web"))[0].ports.ports] == [8080]
    assert [w.name for w in state.local_workloads()] == ["a"]
    assert workload_identity(a.workload) == Identity("cluster.local", "default", "default")


def test_endpoints_are_indexed_before_the_service_arrives() -> None:
    state = ProxyState("node-a")
    state.apply_addresses(by_name(workload("a", "10.0.0.1", services={"late": [(80, 80)]})))
    assert [e.workload.name for e in state.endpoints(service_key("late"))] == ["a"]
    assert state.service(service_key("late")) is None


def test_update_moves_indexes() -> None:
    state = ProxyState("node-a")
    state.apply_addresses(by_name(workload("a", "10.0.0.1", services={"web": [(80, 80)]})))
    moved = workload("a", "10.0.0.9", node="node-b", services={"api": [(80, 80)]})
    state.apply_addresses(by_name(moved))
    assert state.workload_by_ip("10.0.0.1") is None
    assert state.workload_by_ip("10.0.0.9") is moved.workload
    assert state.endpoints(service_key("web")) == ()
    assert [e.workload.name for e in state.endpoints(service_key("api"))] == ["a"]
    assert state.local_workloads() == ()


def test_removal_clears_every_index() -> None:
    state = ProxyState("node-a")
    addresses = by_name(workload("a", "10.0.0.1", services={"web": [(80, 80)]}), service("web", "10.96.0.1"))
    state.apply_addresses(addresses)
    state.apply_addresses({}, removals=[*addresses, "never-seen"])
    assert state.workload(uid("a")) is None
    assert state.workload_by_ip("10.0.0.1") is None
    assert state.service_by_vip("10.96.0.1") is None
    assert state.endpoints(service_key("web")) == ()
    assert state.local_workloads() == ()


def test_reused_ip_is_ambiguous_until_the_old_owner_leaves() -> None:
    state = ProxyState("node-a")
    old = workload("old", "10.0.0.1", service_account="old")
    new = workload("new", "10.0.0.1", service_account="new")
    state.apply_addresses(by_name(old))
    state.apply_addresses(by_name(new))
    assert {w.name for w in state.workloads_at("10.0.0.1")} == {"old", "new"}
    assert state.workload_by_ip("10.0.0.1") is None  # never guess which identity owns it
    state.apply_addresses({}, removals=[uid("old")])
    assert state.workload_by_ip("10.0.0.1") is new.workload


def test_watchers_run_once_per_response_after_it_is_applied() -> None:
    state = ProxyState("node-a")
    seen: list[tuple[StateChange, int]] = []

    def watcher(change: StateChange) -> None:
        # The whole response is visible when the watcher runs.
        seen.append((change, len(list(state.workloads()))))

    state.watch(watcher)
    state.apply_addresses(
        by_name(
            workload("a", "10.0.0.1"), workload("b", "10.0.0.2", node="node-b"), service("s", "10.96.0.1")
        )
    )
    assert len(seen) == 1
    change, visible = seen[0]
    assert visible == 2
    assert change.workloads == {uid("a"), uid("b")}
    assert change.services == {service_key("s")}
    assert change.local_workloads == {uid("a")}
    state.apply_addresses({})  # an empty response changes nothing: no notification
    assert len(seen) == 1
    state.apply_addresses({}, removals=[uid("a")])
    assert seen[-1][0].local_workloads == {uid("a")}
    assert state.generation == 2


def test_failing_watcher_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    state = ProxyState()

    def broken(change: StateChange) -> None:
        raise RuntimeError("boom")

    state.watch(broken)
    changes = recorder(state)
    with caplog.at_level(logging.ERROR, logger="ztunnel.state"):
        state.apply_addresses(by_name(workload("a", "10.0.0.1")))
    assert len(changes) == 1
    assert "state watcher failed" in caplog.text


def test_unwatch() -> None:
    state = ProxyState()
    changes: list[StateChange] = []
    unwatch = state.watch(changes.append)
    unwatch()
    unwatch()  # idempotent
    state.apply_addresses(by_name(workload("a", "10.0.0.1")))
    assert changes == []


def broken_workload(name: str, ip: str) -> workload_pb2.Address:
    address = workload(name, ip)
    address.workload.tunnel_protocol = 7  # type: ignore[assignment]
    return address


def test_rejected_new_resource_blocks_its_addresses() -> None:
    state = ProxyState("node-a")
    bad = broken_workload("bad", "10.0.0.1")
    good = workload("good", "10.0.0.2")
    rejected = state.apply_addresses(by_name(bad, good))
    assert list(rejected) == [uid("bad")]
    assert "workload.tunnel_protocol: unknown value 7" in rejected[uid("bad")]
    assert state.workload(uid("good")) is good.workload  # the rest of the response is applied
    assert state.workload(uid("bad")) is None
    marker = state.broken_at("10.0.0.1")
    assert marker is not None and marker.name == uid("bad")
    assert uid("bad") in state.rejected
    # A good version replaces the marker.
    fixed = workload("bad", "10.0.0.1")
    assert state.apply_addresses(by_name(fixed)) == {}
    assert state.broken_at("10.0.0.1") is None
    assert state.workload_by_ip("10.0.0.1") is fixed.workload
    assert uid("bad") not in state.rejected


def test_rejected_update_keeps_the_last_good_version() -> None:
    state = ProxyState("node-a")
    good = workload("a", "10.0.0.1")
    state.apply_addresses(by_name(good))
    state.apply_addresses(by_name(broken_workload("a", "10.0.0.5")))
    assert state.workload(uid("a")) is good.workload
    assert state.broken_at("10.0.0.5") is None
    assert uid("a") in state.rejected
    state.apply_addresses({}, removals=[uid("a")])
    assert uid("a") not in state.rejected and state.workload(uid("a")) is None


def test_removal_clears_a_broken_marker() -> None:
    state = ProxyState()
    state.apply_addresses(by_name(broken_workload("bad", "10.0.0.1")))
    state.apply_addresses({}, removals=[uid("bad")])
    assert state.broken_at("10.0.0.1") is None
    assert state.rejected == {}


def _mutate(address: workload_pb2.Address, field: str) -> workload_pb2.Address:
    w = address.workload if address.WhichOneof("type") == "workload" else address.service
    if field == "short-address":
        w.addresses.append(b"\x01\x02\x03")  # type: ignore[arg-type]
    elif field == "service-port-zero":
        address.service.ports.add(service_port=0, target_port=80)
    elif field == "target-port-huge":
        address.service.ports.add(service_port=80, target_port=70000)
    elif field == "lb-mode":
        address.service.load_balancing.mode = 9  # type: ignore[assignment]
    elif field == "bad-waypoint":
        address.workload.waypoint.hbone_mtls_port = 15008
    elif field == "waypoint-no-hostname":
        address.workload.waypoint.hostname.namespace = "default"
    elif field == "service-key":
        address.workload.services["no-slash"].ports.add(service_port=80)
    elif field == "slash-in-sa":
        address.workload.service_account = "a/b"
    elif field == "no-namespace":
        address.workload.namespace = ""
    elif field == "status":
        address.workload.status = 5  # type: ignore[assignment]
    return address


@pytest.mark.parametrize(
    ("address", "name", "path"),
    [
        pytest.param(workload("a", "10.0.0.1"), "wrong", "workload.uid", id="uid differs from the name"),
        pytest.param(service("s", "10.96.0.1"), "default/other", "service", id="service key differs"),
        pytest.param(workload_pb2.Address(), "x", "", id="empty address"),
        pytest.param(
            _mutate(workload("a", "10.0.0.1"), "short-address"),
            uid("a"),
            "workload.addresses[1]",
            id="three-byte address",
        ),
        pytest.param(
            _mutate(service("s"), "service-port-zero"),
            service_key("s"),
            "service.ports[1].service_port",
            id="service port zero",
        ),
        pytest.param(
            _mutate(service("s"), "target-port-huge"),
            service_key("s"),
            "service.ports[1].target_port",
            id="target port too large",
        ),
        pytest.param(
            _mutate(service("s"), "lb-mode"),
            service_key("s"),
            "service.load_balancing.mode",
            id="unknown load balancing mode",
        ),
        pytest.param(
            _mutate(workload("a"), "bad-waypoint"),
            uid("a"),
            "workload.waypoint",
            id="waypoint with neither hostname nor address",
        ),
        pytest.param(
            _mutate(workload("a"), "waypoint-no-hostname"),
            uid("a"),
            "workload.waypoint.hostname",
            id="waypoint hostname without a name",
        ),
        pytest.param(
            _mutate(workload("a"), "service-key"),
            uid("a"),
            "workload.services[no-slash]",
            id="services key without namespace",
        ),
        pytest.param(
            _mutate(workload("a"), "slash-in-sa"),
            uid("a"),
            "workload.service_account",
            id="service account with a slash",
        ),
        pytest.param(
            _mutate(workload("a"), "no-namespace"), uid("a"), "workload.namespace", id="no namespace"
        ),
        pytest.param(_mutate(workload("a"), "status"), uid("a"), "workload.status", id="unknown status"),
    ],
)
def test_validation_names_the_field(address: workload_pb2.Address, name: str, path: str) -> None:
    with pytest.raises(AddressError) as e:
        validate_address(name, address)
    assert e.value.path == path
    assert e.value.name == name


def allow_only(principal: str, name: str = "allow", namespace: str = "default") -> pb.Authorization:
    return pb.Authorization(
        name=name,
        namespace=namespace,
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.ALLOW,
        groups=[pb.Group(rules=[pb.Rules(matches=[pb.Match(principals=[pb.StringMatch(exact=principal)])])])],
    )


def test_policy_upsert_remove_and_notification() -> None:
    state = ProxyState("node-a")
    changes = recorder(state)
    state.apply_addresses(by_name(workload("a", "10.0.0.1", policies=["default/allow"])))
    app = state.workload(uid("a"))
    assert app is not None
    # Listed but not received yet: deny.
    assert state.authorize(app, conn()).reason is DecisionReason.MISSING_POLICY
    assert (
        state.apply_authorizations({"default/allow": allow_only("cluster.local/ns/default/sa/client")}) == {}
    )
    assert changes[-1].policies == {"default/allow"}
    assert state.authorize(app, conn()).allowed
    assert list(state.authorizations) == ["default/allow"]  # kept as received, for the config dump
    state.apply_authorizations({}, removals=["default/allow"])
    assert not state.authorize(app, conn()).allowed
    assert dict(state.authorizations) == {}


def test_policy_that_does_not_compile_denies_its_workloads() -> None:
    state = ProxyState("node-a")
    state.apply_addresses(
        by_name(workload("a", "10.0.0.1", policies=["default/allow"]), workload("b", "10.0.0.2"))
    )
    bad = allow_only("cluster.local/ns/default/sa/client")
    bad.action = 5  # type: ignore[assignment]
    rejected = state.apply_authorizations({"default/allow": bad})
    assert list(rejected) == ["default/allow"]
    assert "unknown action 5" in rejected["default/allow"]
    a, b = state.workload(uid("a")), state.workload(uid("b"))
    assert a is not None and b is not None
    assert state.authorize(a, conn()).reason is DecisionReason.INVALID_POLICY
    assert state.authorize(b, conn("10.0.0.2")).allowed  # a selector policy: only the listing workload
    assert (
        state.apply_authorizations({"default/allow": allow_only("cluster.local/ns/default/sa/client")}) == {}
    )
    assert state.authorize(a, conn()).allowed
    assert "default/allow" not in state.rejected


def test_undecodable_policy_denies_everything_until_replaced() -> None:
    state = ProxyState("node-a")
    state.apply_addresses(by_name(workload("a", "10.0.0.1"), workload("b", "10.0.0.2", namespace="other")))
    a, b = state.workload(uid("a")), state.workload(uid("b", "other"))
    assert a is not None and b is not None
    rejected = state.apply_authorizations({}, undecodable={"default/garbled": "Error parsing message"})
    assert "cannot be decoded" in rejected["default/garbled"]
    for target, dst in ((a, "10.0.0.1"), (b, "10.0.0.2")):
        decision = state.authorize(target, conn(dst))
        assert not decision.allowed and decision.policy == "default/garbled"
    state.apply_authorizations(
        {"default/garbled": allow_only("cluster.local/ns/default/sa/client", "garbled")}
    )
    assert state.authorize(b, conn("10.0.0.2")).allowed
    assert state.authorize(a, conn()).allowed  # a selector policy a does not list


def test_resolve_waypoint_by_hostname_and_address() -> None:
    state = ProxyState()
    state.apply_addresses(
        by_name(
            workload("wp-1", "10.0.9.1", hbone=False, native_tunnel=True, services={"wp": [(15008, 15008)]}),
            service("wp", "10.96.0.100", ports=[(15008, 15008)]),
            workload("pod-wp", "10.0.9.5", hbone=False, native_tunnel=True),
        )
    )
    by_host = state.resolve_waypoint(waypoint_ref("wp", port=0))
    assert by_host.name == service_key("wp") and by_host.port == 15008
    assert [w.name for w in by_host.workloads] == ["wp-1"]
    by_vip = state.resolve_waypoint(
        workload_pb2.GatewayAddress(
            address=workload_pb2.NetworkAddress(address=packed("10.96.0.100")), hbone_mtls_port=15009
        )
    )
    assert by_vip.service is not None and by_vip.port == 15009
    by_pod = state.resolve_waypoint(
        workload_pb2.GatewayAddress(address=workload_pb2.NetworkAddress(address=packed("10.0.9.5")))
    )
    assert by_pod.service is None and [w.name for w in by_pod.workloads] == ["pod-wp"]
    with pytest.raises(WaypointUnavailable, match=f"waypoint default/{hostname('nope')} unavailable"):
        state.resolve_waypoint(waypoint_ref("nope"))
    with pytest.raises(WaypointUnavailable, match="no service or workload"):
        state.resolve_waypoint(
            workload_pb2.GatewayAddress(address=workload_pb2.NetworkAddress(address=packed("10.1.1.1")))
        )
    with pytest.raises(WaypointUnavailable, match="neither a hostname nor an address"):
        state.resolve_waypoint(workload_pb2.GatewayAddress())


def test_ten_thousand_workloads_apply_and_remove() -> None:
    state = ProxyState("node-a")
    addresses = by_name(
        *(
            workload(
                f"p{i}",
                f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
                services={"big": [(80, 8080)]},
                node="node-a" if i % 100 == 0 else "node-b",
            )
            for i in range(10_000)
        ),
        service("big", "10.96.0.1"),
    )
    assert state.apply_addresses(addresses) == {}
    assert len(state.endpoints(service_key("big"))) == 10_000
    assert len(state.local_workloads()) == 100
    assert state.workload_by_ip("10.0.39.15") is not None
    state.apply_addresses({}, removals=list(addresses))
    assert list(state.workloads()) == [] and list(state.services()) == []
    assert state.endpoints(service_key("big")) == ()
    assert state.workload_by_ip("10.0.39.15") is None
