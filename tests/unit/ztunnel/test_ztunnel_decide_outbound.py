"""The outbound decision (ztunnel.decide.outbound) as a table over one small mesh.

The mesh (namespace default unless noted):

  client         10.0.1.1   sa client, captured
  server-1/-2    10.0.2.1/2 sa server, behind service "server" (VIP 10.96.0.1, 80 -> 8080)
  reviews-1      10.0.3.1   behind "reviews" (VIP 10.96.0.2, 9080), which is bound to waypoint "waypoint"
  waypoint-1     10.0.9.1   sa waypoint, the pod of waypoint "waypoint" (Service VIP 10.96.0.100)
  ratings-1      10.0.4.1   sa ratings, bound to the per-SA waypoint "ratings-wp" (pod 10.0.9.2),
                            behind "ratings" (VIP 10.96.0.3, 80 -> 9080)
  legacy-1       10.0.5.1   not captured, behind "legacy" (VIP 10.96.0.4)
  sick-1         10.0.6.1   unhealthy, behind "sick" (VIP 10.96.0.5); "empty" (VIP 10.96.0.6) has no pods
  "lost-wp"      VIP 10.96.0.7, bound to a waypoint that does not exist
  "down-wp"      VIP 10.96.0.8, bound to waypoint "down" whose only pod is unhealthy
  "pass"         VIP 10.96.0.9, load balancing mode PASSTHROUGH, only an unhealthy pod
  "named"        VIP 10.96.0.10, port 80 with a named target this pod does not have
  twin-a/twin-b  both claim 10.0.7.1 (stale data)
  10.0.8.1       claimed by a rejected (invalid) workload
"""

from __future__ import annotations

import collections
import ipaddress
import random
from dataclasses import dataclass

import pytest

from loom.api import workload_pb2
from loom.identity import Identity
from loom.testing.workload_api import service, service_key, state_with, uid, waypoint_ref, workload
from ztunnel.decide import OutboundKind, OutboundPlan, outbound
from ztunnel.state import ProxyState, Workload


def ident(sa: str, ns: str = "default") -> Identity:
    return Identity("cluster.local", ns, sa)


def mesh() -> ProxyState:
    state = state_with(
        workload("client", "10.0.1.1", service_account="client"),
        workload("server-1", "10.0.2.1", service_account="server", services={"server": [(80, 8080)]}),
        workload("server-2", "10.0.2.2", service_account="server", services={"server": [(80, 8080)]}),
        service("server", "10.96.0.1", subject_alt_names=["spiffe://cluster.local/ns/default/sa/alias"]),
        workload("reviews-1", "10.0.3.1", service_account="reviews", services={"reviews": [(9080, 9080)]}),
        service("reviews", "10.96.0.2", ports=[(9080, 9080)], waypoint=waypoint_ref("waypoint")),
        workload(
            "waypoint-1",
            "10.0.9.1",
            service_account="waypoint",
            hbone=False,
            native_tunnel=True,
            services={"waypoint": [(15008, 15008)]},
        ),
        service("waypoint", "10.96.0.100", ports=[(15008, 15008)]),
        workload(
            "ratings-1",
            "10.0.4.1",
            service_account="ratings",
            services={"ratings": [(80, 9080)]},
            waypoint=waypoint_ref("ratings-wp"),
            node="node-b",
        ),
        service("ratings", "10.96.0.3", ports=[(80, 9080)]),
        workload(
            "ratings-wp-1",
            "10.0.9.2",
            service_account="ratings-wp",
            hbone=False,
            native_tunnel=True,
            services={"ratings-wp": [(15008, 15008)]},
        ),
        service("ratings-wp", "10.96.0.101", ports=[(15008, 15008)]),
        workload("legacy-1", "10.0.5.1", hbone=False, services={"legacy": [(80, 8080)]}),
        service("legacy", "10.96.0.4"),
        workload("sick-1", "10.0.6.1", healthy=False, services={"sick": [(80, 8080)]}),
        service("sick", "10.96.0.5"),
        service("empty", "10.96.0.6"),
        service("lost-wp", "10.96.0.7", waypoint=waypoint_ref("nowhere")),
        workload("lost-1", "10.0.6.2", services={"lost-wp": [(80, 8080)]}),
        service("down-wp", "10.96.0.8", waypoint=waypoint_ref("down")),
        workload("down-1", "10.0.9.3", hbone=False, native_tunnel=True, healthy=False, services={"down": []}),
        service("down", "10.96.0.102", ports=[(15008, 15008)]),
        workload("pass-1", "10.0.6.3", healthy=False, services={"pass": [(80, 8080)]}),
        service(
            "pass",
            "10.96.0.9",
            load_balancing=workload_pb2.LoadBalancing(mode=workload_pb2.LoadBalancing.PASSTHROUGH),
        ),
        workload("named-1", "10.0.6.4", services={"named": []}),
        service("named", "10.96.0.10", ports=[(80, 0)]),
        workload("twin-a", "10.0.7.1"),
        workload("twin-b", "10.0.7.1"),
    )
    bad = workload("bad", "10.0.8.1")
    bad.workload.tunnel_protocol = 9  # type: ignore[assignment]  # an enum value this proxy does not know
    assert list(state.apply_addresses({bad.workload.uid: bad})) == [bad.workload.uid]
    return state


MESH = mesh()


def source(name: str) -> Workload:
    found = MESH.workload(uid(name))
    assert found is not None, name
    return found


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    dst: str
    port: int
    kind: OutboundKind
    next_hop: tuple[str, int] | None = None
    authority: str = ""
    identities: tuple[Identity, ...] = ()
    destination: str = ""  # workload name expected as destination_workload
    waypoint: str = ""  # waypoint pod name
    reason: str = ""  # substring of the refusal reason


CASES = [
    # --- refusals of ztunnel's own ports
    Case("loopback to 15008 refused", "client", "127.0.0.1", 15008, OutboundKind.REFUSE, reason="self call"),
    Case("loopback to 15001 refused", "client", "127.0.0.1", 15001, OutboundKind.REFUSE, reason="self call"),
    Case(
        "loopback to admin 15000 refused",
        "client",
        "127.0.0.1",
        15000,
        OutboundKind.REFUSE,
        reason="self call",
    ),
    Case("unspecified address to 15008 refused", "client", "0.0.0.0", 15008, OutboundKind.REFUSE),
    Case("own pod ip to 15006 refused", "client", "10.0.1.1", 15006, OutboundKind.REFUSE, reason="self call"),
    Case("own pod ip to 15020 refused", "client", "10.0.1.1", 15020, OutboundKind.REFUSE, reason="self call"),
    Case("ipv4-mapped loopback to 15008 refused", "client", "::ffff:127.0.0.1", 15008, OutboundKind.REFUSE),
    Case(
        "loopback to an app port passes through",
        "client",
        "127.0.0.1",
        8080,
        OutboundKind.PASSTHROUGH,
        next_hop=("127.0.0.1", 8080),
    ),
    Case(
        "another pod's 15008 is tunnelled (its ztunnel refuses it)",
        "client",
        "10.0.2.1",
        15008,
        OutboundKind.HBONE_DIRECT,
        next_hop=("10.0.2.1", 15008),
        authority="10.0.2.1:15008",
        identities=(ident("server"),),
        destination="server-1",
    ),
    # --- pods addressed directly
    Case(
        "mesh pod direct",
        "client",
        "10.0.2.1",
        8080,
        OutboundKind.HBONE_DIRECT,
        next_hop=("10.0.2.1", 15008),
        authority="10.0.2.1:8080",
        identities=(ident("server"),),
        destination="server-1",
    ),
    Case(
        "ipv4-mapped pod address is the pod",
        "client",
        "::ffff:10.0.2.2",
        8080,
        OutboundKind.HBONE_DIRECT,
        next_hop=("10.0.2.2", 15008),
        authority="10.0.2.2:8080",
        identities=(ident("server"),),
        destination="server-2",
    ),
    Case(
        "passthrough to non-mesh pod",
        "client",
        "10.0.5.1",
        8080,
        OutboundKind.PASSTHROUGH,
        next_hop=("10.0.5.1", 8080),
        destination="legacy-1",
    ),
    Case(
        "unknown address passes through",
        "client",
        "192.0.2.7",
        443,
        OutboundKind.PASSTHROUGH,
        next_hop=("192.0.2.7", 443),
    ),
    Case(
        "pod with a workload waypoint goes via the waypoint",
        "client",
        "10.0.4.1",
        9080,
        OutboundKind.HBONE_WAYPOINT,
        next_hop=("10.0.9.2", 15008),
        authority="10.0.4.1:9080",
        identities=(ident("ratings-wp"),),
        destination="ratings-1",
        waypoint="ratings-wp-1",
    ),
    Case(
        "from the waypoint itself goes direct",
        "ratings-wp-1",
        "10.0.4.1",
        9080,
        OutboundKind.HBONE_DIRECT,
        next_hop=("10.0.4.1", 15008),
        authority="10.0.4.1:9080",
        identities=(ident("ratings"),),
        destination="ratings-1",
    ),
    Case(
        "address claimed by two workloads refused",
        "client",
        "10.0.7.1",
        80,
        OutboundKind.REFUSE,
        reason="several workloads",
    ),
    Case(
        "address of a rejected workload refused",
        "client",
        "10.0.8.1",
        80,
        OutboundKind.REFUSE,
        reason="invalid configuration",
    ),
    # --- services
    Case(
        "service vip to a healthy mesh endpoint",
        "client",
        "10.96.0.1",
        80,
        OutboundKind.HBONE_DIRECT,
        identities=(ident("server"), ident("alias")),
    ),
    Case(
        "to service with waypoint referenced by vip",
        "client",
        "10.96.0.2",
        9080,
        OutboundKind.HBONE_WAYPOINT,
        next_hop=("10.0.9.1", 15008),
        authority="10.96.0.2:9080",
        identities=(ident("waypoint"),),
        waypoint="waypoint-1",
    ),
    Case(
        "from the waypoint to its service goes direct",
        "waypoint-1",
        "10.96.0.2",
        9080,
        OutboundKind.HBONE_DIRECT,
        next_hop=("10.0.3.1", 15008),
        authority="10.0.3.1:9080",
        identities=(ident("reviews"),),
        destination="reviews-1",
    ),
    Case(
        "per-SA waypoint on endpoint",
        "client",
        "10.96.0.3",
        80,
        OutboundKind.HBONE_WAYPOINT,
        next_hop=("10.0.9.2", 15008),
        authority="10.96.0.3:80",
        identities=(ident("ratings-wp"),),
        destination="ratings-1",
        waypoint="ratings-wp-1",
    ),
    Case(
        "per-SA waypoint itself to the service goes direct with the target port",
        "ratings-wp-1",
        "10.96.0.3",
        80,
        OutboundKind.HBONE_DIRECT,
        next_hop=("10.0.4.1", 15008),
        authority="10.0.4.1:9080",
        identities=(ident("ratings"),),
        destination="ratings-1",
    ),
    Case(
        "service of non-mesh pods passes through to the target port",
        "client",
        "10.96.0.4",
        80,
        OutboundKind.PASSTHROUGH,
        next_hop=("10.0.5.1", 8080),
        destination="legacy-1",
    ),
    Case(
        "unhealthy only -> refused",
        "client",
        "10.96.0.5",
        80,
        OutboundKind.REFUSE,
        reason="no healthy upstream",
    ),
    Case(
        "service without endpoints refused",
        "client",
        "10.96.0.6",
        80,
        OutboundKind.REFUSE,
        reason="no endpoints",
    ),
    Case(
        "service port not defined refused",
        "client",
        "10.96.0.1",
        81,
        OutboundKind.REFUSE,
        reason="no port 81",
    ),
    Case(
        "missing waypoint fails closed",
        "client",
        "10.96.0.7",
        80,
        OutboundKind.REFUSE,
        reason=f"waypoint {service_key('nowhere')} unavailable",
    ),
    Case(
        "waypoint without healthy pod fails closed",
        "client",
        "10.96.0.8",
        80,
        OutboundKind.REFUSE,
        reason=f"waypoint {service_key('down')} unavailable: no healthy endpoint",
    ),
    Case(
        "lb mode passthrough with no healthy endpoint passes through",
        "client",
        "10.96.0.9",
        80,
        OutboundKind.PASSTHROUGH,
        next_hop=("10.96.0.9", 80),
    ),
    Case(
        "endpoint without the named target port is skipped",
        "client",
        "10.96.0.10",
        80,
        OutboundKind.REFUSE,
        reason="no healthy upstream",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_outbound(case: Case) -> None:
    plan = outbound(MESH, source(case.source), (case.dst, case.port), random.Random(7))
    assert plan.kind is case.kind, plan.reason
    assert plan.original_destination == (ipaddress.ip_address(case.dst.removeprefix("::ffff:")), case.port)
    if case.next_hop is not None:
        assert plan.next_hop == (ipaddress.ip_address(case.next_hop[0]), case.next_hop[1])
    if case.authority:
        assert plan.authority == case.authority
    if case.identities:
        assert plan.expected_identities == case.identities
    if case.destination:
        assert plan.destination_workload is not None
        assert plan.destination_workload.name == case.destination
    if case.waypoint:
        assert plan.waypoint is not None
        assert plan.waypoint.name == case.waypoint
    if case.kind is OutboundKind.REFUSE:
        assert case.reason in plan.reason
        assert plan.next_hop is None
    else:
        assert plan.reason == ""
        assert plan.next_hop is not None
    if case.kind in (OutboundKind.PASSTHROUGH, OutboundKind.REFUSE):
        assert plan.authority == "" and plan.expected_identities == ()


def test_service_plan_carries_service_and_selected_endpoint() -> None:
    plan = outbound(MESH, source("client"), ("10.96.0.1", 80), random.Random(1))
    assert plan.destination_service is not None and plan.destination_service.name == "server"
    assert plan.destination_workload is not None
    chosen = plan.destination_workload
    assert plan.next_hop is not None
    assert plan.authority == f"{plan.next_hop[0]}:8080"
    assert str(plan.next_hop[0]) in ("10.0.2.1", "10.0.2.2")
    assert chosen.name == {"10.0.2.1": "server-1", "10.0.2.2": "server-2"}[str(plan.next_hop[0])]


def test_plan_is_frozen() -> None:
    plan = outbound(MESH, source("client"), ("10.0.2.1", 8080), random.Random(1))
    with pytest.raises(AttributeError):
        plan.kind = OutboundKind.REFUSE  # type: ignore[misc]


def picks(
    state: ProxyState, src: Workload, dst: tuple[str, int], n: int, seed: int
) -> collections.Counter[str]:
    rng = random.Random(seed)
    counter: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        plan: OutboundPlan = outbound(state, src, dst, rng)
        assert plan.destination_workload is not None, plan.reason
        counter[plan.destination_workload.name] += 1
    return counter


def test_weighted_selection_follows_capacity() -> None:
    state = state_with(
        workload("client", "10.0.1.1"),
        workload("a", "10.0.2.1", capacity=1, services={"web": [(80, 8080)]}),
        workload("b", "10.0.2.2", capacity=2, services={"web": [(80, 8080)]}),
        workload("c", "10.0.2.3", capacity=0, services={"web": [(80, 8080)]}),  # unset: weight 1
        workload("down", "10.0.2.4", healthy=False, capacity=50, services={"web": [(80, 8080)]}),
        service("web", "10.96.1.1"),
    )
    counts = picks(state, state.workload(uid("client")), ("10.96.1.1", 80), 4000, seed=42)  # type: ignore[arg-type]
    assert set(counts) == {"a", "b", "c"}  # never the unhealthy one
    assert abs(counts["a"] / 4000 - 0.25) < 0.04
    assert abs(counts["b"] / 4000 - 0.50) < 0.04
    assert abs(counts["c"] / 4000 - 0.25) < 0.04
    # Same seed, same sequence: the decision is a pure function of its inputs.
    assert counts == picks(state, state.workload(uid("client")), ("10.96.1.1", 80), 4000, seed=42)  # type: ignore[arg-type]


def lb(mode: int, *scopes: int) -> workload_pb2.LoadBalancing:
    return workload_pb2.LoadBalancing(mode=mode, routing_preference=scopes)  # type: ignore[arg-type]


LB = workload_pb2.LoadBalancing


@pytest.mark.parametrize(
    ("balancing", "expected"),
    [
        pytest.param(None, {"same-zone", "same-region", "far"}, id="no preference uses every endpoint"),
        pytest.param(lb(LB.FAILOVER, LB.REGION, LB.ZONE), {"same-zone"}, id="failover prefers the best rank"),
        pytest.param(
            lb(LB.STRICT, LB.REGION), {"same-zone", "same-region"}, id="strict region keeps the region"
        ),
        pytest.param(
            lb(LB.STRICT, LB.REGION, LB.ZONE, LB.SUBZONE), set(), id="strict with no full match refuses"
        ),
        pytest.param(lb(LB.FAILOVER, LB.NODE), {"same-zone"}, id="node preference"),
    ],
)
def test_routing_preference(balancing: workload_pb2.LoadBalancing | None, expected: set[str]) -> None:
    state = state_with(
        workload("client", "10.0.1.1", locality=("eu", "eu-1", "rack-1")),
        workload("same-zone", "10.0.2.1", locality=("eu", "eu-1", "rack-2"), services={"web": [(80, 80)]}),
        workload(
            "same-region",
            "10.0.2.2",
            locality=("eu", "eu-2", ""),
            node="node-b",
            services={"web": [(80, 80)]},
        ),
        workload("far", "10.0.2.3", locality=("us", "us-1", ""), node="node-c", services={"web": [(80, 80)]}),
        service("web", "10.96.1.1", ports=[(80, 80)], load_balancing=balancing),
    )
    client = state.workload(uid("client"))
    assert client is not None
    if not expected:
        plan = outbound(state, client, ("10.96.1.1", 80), random.Random(3))
        assert plan.kind is OutboundKind.REFUSE and "required locality" in plan.reason
        return
    assert set(picks(state, client, ("10.96.1.1", 80), 300, seed=5)) == expected


def test_vip_collision_prefers_the_source_namespace() -> None:
    state = state_with(
        workload("client", "10.0.1.1", namespace="team"),
        workload("mine", "10.0.2.1", namespace="team", services={service_key("web", "team"): [(80, 80)]}),
        workload("theirs", "10.0.2.2", services={"web": [(80, 80)]}),
        service("web", "10.96.1.1", ports=[(80, 80)]),
        service("web", "10.96.1.1", namespace="team", ports=[(80, 80)]),
    )
    client = state.workload(uid("client", "team"))
    assert client is not None
    plan = outbound(state, client, ("10.96.1.1", 80), random.Random(0))
    assert plan.destination_workload is not None and plan.destination_workload.name == "mine"


def test_endpoint_on_another_network_is_unreachable() -> None:
    state = state_with(
        workload("client", "10.0.1.1"),
        workload("remote", "10.0.2.1", network="other", services={"web": [(80, 80)]}),
        service("web", "10.96.1.1", ports=[(80, 80)]),
    )
    client = state.workload(uid("client"))
    assert client is not None
    plan = outbound(state, client, ("10.96.1.1", 80), random.Random(0))
    assert plan.kind is OutboundKind.REFUSE and "no healthy upstream" in plan.reason


def test_waypoint_referenced_by_address() -> None:
    gateway = workload_pb2.GatewayAddress(
        address=workload_pb2.NetworkAddress(address=ipaddress.ip_address("10.0.9.1").packed),
        hbone_mtls_port=15008,
    )
    state = state_with(
        workload("client", "10.0.1.1"),
        workload("wp", "10.0.9.1", service_account="wp", hbone=False, native_tunnel=True),
        workload("app", "10.0.2.1", service_account="app", waypoint=gateway),
    )
    client = state.workload(uid("client"))
    assert client is not None
    plan = outbound(state, client, ("10.0.2.1", 80), random.Random(0))
    assert plan.kind is OutboundKind.HBONE_WAYPOINT
    assert plan.next_hop == (ipaddress.ip_address("10.0.9.1"), 15008)
    assert plan.expected_identities == (ident("wp"),)
    assert plan.authority == "10.0.2.1:80"


def test_same_identity_on_another_address_is_not_the_waypoint() -> None:
    """check_from_waypoint needs both the identity and an address of the waypoint pod."""
    state = state_with(
        workload("impostor", "10.0.1.9", service_account="ratings-wp"),
        workload(
            "ratings-wp-1",
            "10.0.9.2",
            service_account="ratings-wp",
            hbone=False,
            native_tunnel=True,
            services={"ratings-wp": [(15008, 15008)]},
        ),
        service("ratings-wp", "10.96.0.101", ports=[(15008, 15008)]),
        workload("ratings-1", "10.0.4.1", service_account="ratings", waypoint=waypoint_ref("ratings-wp")),
    )
    impostor = state.workload(uid("impostor"))
    assert impostor is not None
    plan = outbound(state, impostor, ("10.0.4.1", 9080), random.Random(0))
    assert plan.kind is OutboundKind.HBONE_WAYPOINT


def test_ipv6_authority_is_bracketed() -> None:
    state = state_with(workload("client", "fd00::1"), workload("server", "fd00::2"))
    client = state.workload(uid("client"))
    assert client is not None
    plan = outbound(state, client, ("fd00::2", 8080), random.Random(0))
    assert plan.kind is OutboundKind.HBONE_DIRECT
    assert plan.authority == "[fd00::2]:8080"
    assert plan.next_hop == (ipaddress.ip_address("fd00::2"), 15008)
