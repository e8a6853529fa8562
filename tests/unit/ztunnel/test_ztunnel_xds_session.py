"""The sans-IO delta xDS session: opening requests, per-resource NACKs, held versions, readiness."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf import any_pb2
from google.protobuf.message import Message

from loom.api import authorization_pb2 as pb
from loom.api import discovery_pb2
from loom.identity import Identity
from loom.policy.rbac import Connection, DecisionReason
from loom.testing.workload_api import by_name, service, service_key, uid, workload
from ztunnel.state import ProxyState
from ztunnel.xds.session import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    MAX_ERROR_DETAIL_CHARS,
    NACK_CODE,
    NodeInfo,
    XdsSession,
)

ADDR, AUTHZ = ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL


def packed_any(message: Message | bytes, type_url: str) -> any_pb2.Any:
    value = message if isinstance(message, bytes) else message.SerializeToString()
    return any_pb2.Any(type_url=type_url, value=value)


def response(
    type_url: str,
    resources: Mapping[str, tuple[str, Message | bytes]] | None = None,
    removed: Sequence[str] = (),
    nonce: str = "n1",
    any_type: str | None = None,
) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url,
        nonce=nonce,
        resources=[
            discovery_pb2.Resource(
                name=name, version=version, resource=packed_any(body, any_type or type_url)
            )
            for name, (version, body) in (resources or {}).items()
        ],
        removed_resources=removed,
    )


def addresses(
    version: str = "v1", extra: Mapping[str, tuple[str, Message | bytes]] | None = None
) -> dict[str, tuple[str, Message | bytes]]:
    result: dict[str, tuple[str, Message | bytes]] = {
        name: (version, a)
        for name, a in by_name(
            workload("a", "10.0.0.1", policies=["default/allow"]),
            workload("b", "10.0.0.2"),
            service("s", "10.96.0.1"),
        ).items()
    }
    result.update(extra or {})
    return result


def session() -> tuple[XdsSession, ProxyState]:
    state = ProxyState("node-a")
    return XdsSession(state, NodeInfo("node-a", "ztunnel-x", "istio-system", "10.1.0.5")), state


def allow(name: str = "allow", action: int = pb.ALLOW) -> pb.Authorization:
    match = pb.Match(principals=[pb.StringMatch(exact="cluster.local/ns/default/sa/client")])
    return pb.Authorization(
        name=name,
        namespace="default",
        scope=pb.WORKLOAD_SELECTOR,
        action=action,  # type: ignore[arg-type]
        groups=[pb.Group(rules=[pb.Rules(matches=[match])])],
    )


def test_opening_requests_authorization_first_with_the_node() -> None:
    s, _ = session()
    first, second = s.connect()
    assert [first.type_url, second.type_url] == [AUTHZ, ADDR]
    assert first.node.id == "ztunnel~10.1.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    assert first.node.metadata.fields["NODE_NAME"].string_value == "node-a"
    assert not second.HasField("node")
    for request in (first, second):
        assert list(request.resource_names_subscribe) == []  # wildcard
        assert dict(request.initial_resource_versions) == {}
        assert request.response_nonce == ""


def test_ack_apply_and_readiness() -> None:
    s, state = session()
    out = s.on_response(response(AUTHZ, {"default/allow": ("p1", allow())}, nonce="a1"))
    assert out.first and not out.nacked and out.applied == 1
    assert out.reply.type_url == AUTHZ and out.reply.response_nonce == "a1"
    assert not out.reply.HasField("error_detail")
    assert not s.ready
    out = s.on_response(response(ADDR, addresses(), nonce="w1"))
    assert out.first and out.applied == 3 and not out.nacked
    assert s.ready
    assert state.workload(uid("a")) is not None and state.service(service_key("s")) is not None
    assert s.held(ADDR) == {uid("a"): "v1", uid("b"): "v1", service_key("s"): "v1"}
    assert s.held(AUTHZ) == {"default/allow": "p1"}
    later = s.on_response(response(ADDR, {}, removed=[uid("b")], nonce="w2"))
    assert not later.first and later.removed == 1
    assert state.workload(uid("b")) is None and uid("b") not in s.held(ADDR)


def test_empty_first_response_counts_for_readiness() -> None:
    s, _ = session()
    s.on_response(response(AUTHZ))
    s.on_response(response(ADDR))
    assert s.ready


def test_reconnect_announces_held_versions() -> None:
    s, _ = session()
    s.on_response(response(AUTHZ, {"default/allow": ("p1", allow())}))
    s.on_response(response(ADDR, addresses("v7")))
    authz, addr = s.connect()
    assert dict(authz.initial_resource_versions) == {"default/allow": "p1"}
    assert dict(addr.initial_resource_versions) == {uid("a"): "v7", uid("b"): "v7", service_key("s"): "v7"}
    assert authz.HasField("node")


def test_bad_addresses_are_nacked_by_name_and_the_rest_applied() -> None:
    s, state = session()
    bad = workload("bad", "10.0.0.9")
    bad.workload.addresses.append(b"\x01\x02")
    out = s.on_response(
        response(
            ADDR,
            addresses(
                extra={
                    uid("bad"): ("v1", bad),
                    uid("garbage"): ("v1", b"\xff\xff\xff"),
                    "": ("v1", workload("anon", "10.0.0.8")),
                }
            ),
            nonce="w1",
        )
    )
    assert out.nacked
    assert set(out.rejected) == {uid("bad"), uid("garbage"), "(resource #5)"}
    assert out.applied == 3
    detail = out.reply.error_detail
    assert detail.code == NACK_CODE
    assert "rejected 3 resource(s)" in detail.message
    assert f"{uid('bad')}: address {uid('bad')}: workload.addresses[1]" in detail.message
    assert f"{uid('garbage')}: cannot be decoded" in detail.message
    assert out.reply.response_nonce == "w1"
    assert state.workload(uid("a")) is not None
    assert uid("bad") not in s.held(ADDR) and uid("garbage") not in s.held(ADDR)
    assert state.broken_at("10.0.0.9") is not None


def test_resource_of_the_wrong_type_is_rejected() -> None:
    s, state = session()
    out = s.on_response(
        response(
            ADDR, {uid("a"): ("v1", workload("a", "10.0.0.1"))}, any_type="type.googleapis.com/other.Thing"
        )
    )
    assert "carries type.googleapis.com/other.Thing" in out.rejected[uid("a")]
    assert state.workload(uid("a")) is None


def test_rejected_update_keeps_the_old_held_version() -> None:
    s, _ = session()
    s.on_response(response(ADDR, {uid("a"): ("v1", workload("a", "10.0.0.1"))}))
    broken = workload("a", "10.0.0.1")
    broken.workload.status = 9  # type: ignore[assignment]
    out = s.on_response(response(ADDR, {uid("a"): ("v2", broken)}))
    assert uid("a") in out.rejected
    assert s.held(ADDR) == {uid("a"): "v1"}  # after a reconnect the controller offers v2 again


def test_authorization_with_unknown_enum_is_nacked_and_denies() -> None:
    s, state = session()
    s.on_response(response(ADDR, addresses()))
    out = s.on_response(
        response(AUTHZ, {"default/allow": ("p1", allow(action=7)), "default/other": ("p1", allow("other"))})
    )
    assert list(out.rejected) == ["default/allow"]
    assert "unknown action 7" in out.reply.error_detail.message
    assert out.applied == 1
    # The rejected policy is held (the state enforces it as deny) and the good one applies.
    assert s.held(AUTHZ) == {"default/allow": "p1", "default/other": "p1"}
    a = state.workload(uid("a"))
    assert a is not None
    decision = state.authorize(
        a, Connection.of(Identity("cluster.local", "default", "client"), "10.9.0.1", "10.0.0.1", 80)
    )
    assert not decision.allowed and decision.reason is DecisionReason.INVALID_POLICY


def test_undecodable_authorization_denies_everything() -> None:
    s, state = session()
    s.on_response(response(ADDR, addresses()))
    out = s.on_response(response(AUTHZ, {"default/garbled": ("p1", b"\x0a\xff")}))
    assert "cannot be decoded" in out.rejected["default/garbled"]
    b = state.workload(uid("b"))
    assert b is not None
    conn = Connection.of(None, "10.9.0.1", "10.0.0.2", 80)
    assert not state.authorize(b, conn).allowed
    s.on_response(response(AUTHZ, {}, removed=["default/garbled"]))
    assert state.authorize(b, conn).allowed
    assert s.held(AUTHZ) == {}


def test_unsubscribed_type_is_nacked() -> None:
    s, _ = session()
    out = s.on_response(response("type.googleapis.com/istio.workload.Workload", {"x": ("1", b"")}))
    assert out.rejected == {"x": "type 'type.googleapis.com/istio.workload.Workload' is not subscribed"}
    assert out.reply.error_detail.code == NACK_CODE
    assert not s.ready


def test_nack_message_is_bounded() -> None:
    s, _ = session()
    many = {f"default/p{i:04}": ("1", allow(f"p{i:04}", action=9)) for i in range(500)}
    out = s.on_response(response(AUTHZ, many))
    assert len(out.rejected) == 500
    assert len(out.reply.error_detail.message) <= MAX_ERROR_DETAIL_CHARS
    assert out.reply.error_detail.message.startswith("rejected 500 resource(s)")
