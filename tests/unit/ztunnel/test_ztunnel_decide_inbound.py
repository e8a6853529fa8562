"""Inbound admission (ztunnel.decide.inbound / inbound_plaintext) as tables, plus the authority parser."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from google.protobuf import empty_pb2

from loom.api import authorization_pb2 as pb
from loom.identity import Identity
from loom.policy.rbac import DecisionReason
from loom.testing.workload_api import state_with, uid, workload
from ztunnel.decide import AuthorityError, InboundReason, inbound, inbound_plaintext, parse_authority
from ztunnel.state import ProxyState, Workload

CLIENT = Identity("cluster.local", "default", "client")
OTHER = Identity("cluster.local", "other", "intruder")


def allow_principal(name: str, namespace: str, principal: str) -> pb.Authorization:
    match = pb.Match(principals=[pb.StringMatch(exact=principal)])
    return pb.Authorization(
        name=name,
        namespace=namespace,
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.ALLOW,
        groups=[pb.Group(rules=[pb.Rules(matches=[match])])],
    )


def strict(namespace: str) -> pb.Authorization:
    """What PeerAuthentication STRICT becomes: DENY anything without a principal."""
    match = pb.Match(not_principals=[pb.StringMatch(presence=empty_pb2.Empty())])
    return pb.Authorization(
        name="istio_converted_static_strict",
        namespace=namespace,
        scope=pb.NAMESPACE,
        action=pb.DENY,
        groups=[pb.Group(rules=[pb.Rules(matches=[match])])],
    )


def world() -> ProxyState:
    return state_with(
        workload("open", "10.0.1.1", "fd00::1"),
        workload("guarded", "10.0.2.1", namespace="secure", policies=["secure/allow-client"]),
        workload("strict", "10.0.3.1", namespace="locked"),
        policies=[
            allow_principal("allow-client", "secure", "cluster.local/ns/default/sa/client"),
            strict("locked"),
        ],
    )


STATE = world()


def local(name: str, namespace: str = "default") -> Workload:
    found = STATE.workload(uid(name, namespace))
    assert found is not None
    return found


@dataclass(frozen=True)
class Case:
    id: str
    workload: tuple[str, str] | None
    authority: str
    identity: Identity | None
    status: int
    reason: InboundReason
    app: tuple[str, int] | None = None
    detail: str = ""


CASES = [
    Case(
        "allowed with no policy",
        ("open", "default"),
        "10.0.1.1:8080",
        CLIENT,
        200,
        InboundReason.ALLOWED,
        app=("10.0.1.1", 8080),
    ),
    Case(
        "ipv6 authority",
        ("open", "default"),
        "[fd00::1]:8080",
        CLIENT,
        200,
        InboundReason.ALLOWED,
        app=("fd00::1", 8080),
    ),
    Case(
        "ipv4-mapped authority is the ipv4 address",
        ("open", "default"),
        "[::ffff:10.0.1.1]:80",
        CLIENT,
        200,
        InboundReason.ALLOWED,
        app=("10.0.1.1", 80),
    ),
    Case(
        "authority of another pod",
        ("open", "default"),
        "10.0.2.1:8080",
        CLIENT,
        400,
        InboundReason.HBONE_IP_MISMATCH,
        detail="is not an address of default/open",
    ),
    Case("port 0", ("open", "default"), "10.0.1.1:0", CLIENT, 400, InboundReason.INVALID_AUTHORITY),
    Case("port 65536", ("open", "default"), "10.0.1.1:65536", CLIENT, 400, InboundReason.INVALID_AUTHORITY),
    Case(
        "hostname authority",
        ("open", "default"),
        "open.default.svc:8080",
        CLIENT,
        400,
        InboundReason.INVALID_AUTHORITY,
    ),
    Case("missing port", ("open", "default"), "10.0.1.1", CLIENT, 400, InboundReason.INVALID_AUTHORITY),
    Case("empty authority", ("open", "default"), "", CLIENT, 400, InboundReason.INVALID_AUTHORITY),
    Case("ipv6 zone", ("open", "default"), "[fe80::1%eth0]:80", CLIENT, 400, InboundReason.INVALID_AUTHORITY),
    Case(
        "target is ztunnel's hbone port",
        ("open", "default"),
        "10.0.1.1:15008",
        CLIENT,
        400,
        InboundReason.ZTUNNEL_PORT,
    ),
    Case(
        "target is ztunnel's outbound port",
        ("open", "default"),
        "10.0.1.1:15001",
        CLIENT,
        400,
        InboundReason.ZTUNNEL_PORT,
    ),
    Case(
        "allowed principal",
        ("guarded", "secure"),
        "10.0.2.1:80",
        CLIENT,
        200,
        InboundReason.ALLOWED,
        app=("10.0.2.1", 80),
    ),
    Case(
        "other principal denied",
        ("guarded", "secure"),
        "10.0.2.1:80",
        OTHER,
        401,
        InboundReason.POLICY_DENIED,
        detail=DecisionReason.NOT_ALLOWED.value,
    ),
    Case(
        "strict allows mtls",
        ("strict", "locked"),
        "10.0.3.1:80",
        OTHER,
        200,
        InboundReason.ALLOWED,
        app=("10.0.3.1", 80),
    ),
    Case(
        "no peer identity refused", ("open", "default"), "10.0.1.1:80", None, 401, InboundReason.NO_IDENTITY
    ),
    Case(
        "unknown local workload unavailable", None, "10.0.1.1:80", CLIENT, 503, InboundReason.UNKNOWN_WORKLOAD
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_inbound(case: Case) -> None:
    target = local(*case.workload) if case.workload else None
    plan = inbound(STATE, target, case.authority, case.identity, "10.0.9.9", 15008)
    assert (plan.status, plan.reason) == (case.status, case.reason), plan.detail
    assert plan.admitted is (case.status == 200)
    assert plan.listener_port == 15008
    if case.app is not None:
        assert plan.app_address == (ipaddress.ip_address(case.app[0]), case.app[1])
    else:
        assert plan.app_address is None
    assert case.detail in plan.detail
    if case.reason in (InboundReason.ALLOWED, InboundReason.POLICY_DENIED):
        assert plan.decision is not None and plan.decision.allowed is (case.status == 200)


@pytest.mark.parametrize(
    ("target", "dst", "port", "status", "reason"),
    [
        pytest.param(
            ("open", "default"), "10.0.1.1", 8080, 200, InboundReason.ALLOWED, id="plaintext allowed"
        ),
        pytest.param(
            ("strict", "locked"), "10.0.3.1", 80, 401, InboundReason.POLICY_DENIED, id="strict denies"
        ),
        pytest.param(
            ("guarded", "secure"),
            "10.0.2.1",
            80,
            401,
            InboundReason.POLICY_DENIED,
            id="principal allow policy denies plaintext",
        ),
        pytest.param(
            ("open", "default"),
            "10.0.2.1",
            80,
            400,
            InboundReason.HBONE_IP_MISMATCH,
            id="destination not the pod",
        ),
        pytest.param(
            ("open", "default"), "10.0.1.1", 15006, 400, InboundReason.ZTUNNEL_PORT, id="ztunnel port refused"
        ),
        pytest.param(
            ("open", "default"), "10.0.1.1", 0, 400, InboundReason.INVALID_AUTHORITY, id="port zero"
        ),
        pytest.param(None, "10.0.1.1", 80, 503, InboundReason.UNKNOWN_WORKLOAD, id="unknown workload"),
    ],
)
def test_inbound_plaintext(
    target: tuple[str, str] | None, dst: str, port: int, status: int, reason: InboundReason
) -> None:
    plan = inbound_plaintext(STATE, local(*target) if target else None, "192.0.2.1", dst, port)
    assert (plan.status, plan.reason) == (status, reason), plan.detail
    assert plan.listener_port == 15006
    if status == 200:
        assert plan.app_address == (ipaddress.ip_address(dst), port)


def test_policy_sees_source_ip_and_destination_port() -> None:
    match = pb.Match(
        source_ips=[pb.Address(address=ipaddress.ip_address("10.9.0.0").packed, length=16)],
        destination_ports=[8080],
    )
    only_from_range = pb.Authorization(
        name="range",
        namespace="default",
        scope=pb.NAMESPACE,
        action=pb.ALLOW,
        groups=[pb.Group(rules=[pb.Rules(matches=[match])])],
    )
    state = state_with(workload("app", "10.0.1.1"), policies=[only_from_range])
    app = state.workload(uid("app"))
    assert inbound(state, app, "10.0.1.1:8080", CLIENT, "10.9.1.1").status == 200
    assert inbound(state, app, "10.0.1.1:8080", CLIENT, "10.8.1.1").status == 401
    assert inbound(state, app, "10.0.1.1:9090", CLIENT, "10.9.1.1").status == 401
    assert inbound(state, app, "10.0.1.1:8080", CLIENT, "::ffff:10.9.1.1").status == 200


@pytest.mark.parametrize(
    "text",
    [
        ":80",
        "1.2.3.4:",
        "1.2.3.4:+80",
        "1.2.3.4:8O",
        "1.2.3.4:٣",
        "[::1]",
        "[::1]80",
        "::1:80",
        "1.2.3.4:000080",
        "user@1.2.3.4:80",
        "1.2.3.4:80/x",
        "[1.2.3.4]:80",
        "x" * 100,
    ],
)
def test_parse_authority_rejects(text: str) -> None:
    with pytest.raises(AuthorityError):
        parse_authority(text)


def test_parse_authority_accepts() -> None:
    assert parse_authority("1.2.3.4:80") == (ipaddress.ip_address("1.2.3.4"), 80)
    assert parse_authority("[fd00::a]:65535") == (ipaddress.ip_address("fd00::a"), 65535)
    assert parse_authority("1.2.3.4:0080") == (ipaddress.ip_address("1.2.3.4"), 80)
