"""The node proxy's L4 evaluator: matching semantics, decision order, fail-closed compilation, and the
policy store (hardening checklist item 20 for unparseable security resources)."""

from __future__ import annotations

import ipaddress
from typing import cast

import pytest
from google.protobuf import empty_pb2

from loom.api import authorization_pb2 as pb
from loom.api import workload_pb2
from loom.identity import Identity
from loom.policy.rbac import (
    BrokenPolicy,
    Connection,
    DecisionReason,
    PolicyAction,
    PolicyCompileError,
    PolicyEvaluator,
    PolicyScope,
    applicable_policies,
    compile_authorization,
    decide,
    missing_policies,
)

XY = Identity("cluster.local", "x", "y")


def exact(value: str) -> pb.StringMatch:
    return pb.StringMatch(exact=value)


def prefix(value: str) -> pb.StringMatch:
    return pb.StringMatch(prefix=value)


def suffix(value: str) -> pb.StringMatch:
    return pb.StringMatch(suffix=value)


PRESENCE = pb.StringMatch(presence=empty_pb2.Empty())


def cidr(text: str) -> pb.Address:
    network = ipaddress.ip_network(text, strict=False)
    return pb.Address(address=network.network_address.packed, length=network.prefixlen)


def policy(
    *groups: pb.Group,
    action: pb.Action = pb.ALLOW,
    name: str = "p",
    namespace: str = "x",
    scope: pb.Scope = pb.NAMESPACE,
    dry_run: bool = False,
) -> pb.Authorization:
    return pb.Authorization(
        name=name, namespace=namespace, scope=scope, action=action, groups=list(groups), dry_run=dry_run
    )


def group(*clauses: list[pb.Match]) -> pb.Group:
    return pb.Group(rules=[pb.Rules(matches=matches) for matches in clauses])


def conn(
    identity: Identity | None = XY, src: str = "10.0.0.1", dst: str = "10.0.0.9", port: int = 80
) -> Connection:
    return Connection(identity, ipaddress.ip_address(src), ipaddress.ip_address(dst), port)


def matches(authorization: pb.Authorization, connection: Connection) -> bool:
    return compile_authorization(authorization).matches(connection)


# --- structure ------------------------------------------------------------------------------------

STRUCTURE_CASES = [
    ("policy with no groups never matches", policy(), False),
    ("group with no rules matches everything", policy(pb.Group()), True),
    ("rule with no matches counts as a match", policy(group([])), True),
    ("rule made only of empty matches never matches", policy(group([pb.Match()])), False),
    (
        "empty match is skipped next to a matching one",
        policy(group([pb.Match(), pb.Match(destination_ports=[80])])),
        True,
    ),
    (
        "empty match is skipped next to a failing one",
        policy(group([pb.Match(), pb.Match(destination_ports=[81])])),
        False,
    ),
    (
        "matches of a rule are ORed",
        policy(group([pb.Match(destination_ports=[81]), pb.Match(destination_ports=[80])])),
        True,
    ),
    (
        "rules of a group are ANDed",
        policy(group([pb.Match(destination_ports=[80])], [pb.Match(destination_ports=[81])])),
        False,
    ),
    (
        "groups are ORed",
        policy(group([pb.Match(destination_ports=[81])]), group([pb.Match(destination_ports=[80])])),
        True,
    ),
    ("values of one field are ORed", policy(group([pb.Match(destination_ports=[79, 80])])), True),
    (
        "fields of one match are ANDed",
        policy(group([pb.Match(destination_ports=[80], namespaces=[exact("other")])])),
        False,
    ),
    ("not list matching a value fails", policy(group([pb.Match(not_destination_ports=[80, 81])])), False),
    ("not list matching no value passes", policy(group([pb.Match(not_destination_ports=[81, 82])])), True),
    (
        "positive and not lists of one field are ANDed",
        policy(group([pb.Match(destination_ports=[80], not_destination_ports=[80])])),
        False,
    ),
]


@pytest.mark.parametrize(
    ("authorization", "expected"), [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES]
)
def test_structure(authorization: pb.Authorization, expected: bool) -> None:
    assert matches(authorization, conn()) is expected


# --- attributes ------------------------------------------------------------------------------------


def one(match: pb.Match) -> pb.Authorization:
    return policy(group([match]))


ATTRIBUTE_CASES = [
    ("principal exact", pb.Match(principals=[exact("cluster.local/ns/x/sa/y")]), conn(), True),
    (
        "principal exact is not a regex: my.sa vs myXsa",
        pb.Match(principals=[exact("cluster.local/ns/x/sa/my.sa")]),
        conn(Identity("cluster.local", "x", "myXsa")),
        False,
    ),
    (
        "principal exact with spiffe scheme is compared without it",
        pb.Match(principals=[exact("spiffe://cluster.local/ns/x/sa/y")]),
        conn(),
        True,
    ),
    ("principal prefix", pb.Match(principals=[prefix("cluster.local/ns/x/")]), conn(), True),
    (
        "principal prefix of another namespace",
        pb.Match(principals=[prefix("cluster.local/ns/xx/")]),
        conn(),
        False,
    ),
    (
        "principal suffix */ns/x/sa/y",
        pb.Match(principals=[suffix("/ns/x/sa/y")]),
        conn(Identity("other.td", "x", "y")),
        True,
    ),
    (
        "principal suffix does not match a longer name",
        pb.Match(principals=[suffix("/ns/x/sa/y")]),
        conn(Identity("cluster.local", "x", "yy")),
        False,
    ),
    ("principal presence", pb.Match(principals=[PRESENCE]), conn(), True),
    ("principal presence without identity", pb.Match(principals=[PRESENCE]), conn(None), False),
    (
        "principal exact without identity",
        pb.Match(principals=[exact("cluster.local/ns/x/sa/y")]),
        conn(None),
        False,
    ),
    (
        "not principal presence without identity (STRICT mTLS)",
        pb.Match(not_principals=[PRESENCE]),
        conn(None),
        True,
    ),
    ("not principal presence with identity", pb.Match(not_principals=[PRESENCE]), conn(), False),
    (
        "not principal exact without identity",
        pb.Match(not_principals=[exact("cluster.local/ns/x/sa/y")]),
        conn(None),
        True,
    ),
    ("namespace from the identity", pb.Match(namespaces=[exact("x")]), conn(), True),
    (
        "namespace with a dot is not a regex",
        pb.Match(namespaces=[exact("my.ns")]),
        conn(Identity("cluster.local", "myXns", "y")),
        False,
    ),
    (
        "namespace suffix",
        pb.Match(namespaces=[suffix(".ns")]),
        conn(Identity("cluster.local", "my.ns", "y")),
        True,
    ),
    ("namespace without identity", pb.Match(namespaces=[PRESENCE]), conn(None), False),
    ("namespace exact empty never matches plaintext", pb.Match(namespaces=[exact("")]), conn(None), False),
    ("not namespace without identity", pb.Match(not_namespaces=[exact("x")]), conn(None), True),
    ("not namespace matching", pb.Match(not_namespaces=[exact("x")]), conn(), False),
    (
        "service account",
        pb.Match(service_accounts=[pb.ServiceAccountMatch(namespace="x", serviceAccount="y")]),
        conn(),
        True,
    ),
    (
        "service account ignores the trust domain",
        pb.Match(service_accounts=[pb.ServiceAccountMatch(namespace="x", serviceAccount="y")]),
        conn(Identity("other.td", "x", "y")),
        True,
    ),
    (
        "service account of another namespace",
        pb.Match(service_accounts=[pb.ServiceAccountMatch(namespace="z", serviceAccount="y")]),
        conn(),
        False,
    ),
    (
        "service account without identity",
        pb.Match(service_accounts=[pb.ServiceAccountMatch(namespace="x", serviceAccount="y")]),
        conn(None),
        False,
    ),
    (
        "not service account without identity",
        pb.Match(not_service_accounts=[pb.ServiceAccountMatch(namespace="x", serviceAccount="y")]),
        conn(None),
        True,
    ),
    ("source ip in block", pb.Match(source_ips=[cidr("10.0.0.0/8")]), conn(), True),
    ("source ip out of block", pb.Match(source_ips=[cidr("10.0.1.0/24")]), conn(), False),
    ("source ip single address", pb.Match(source_ips=[cidr("10.0.0.1/32")]), conn(), True),
    ("source ipv6 in block", pb.Match(source_ips=[cidr("fd00::/16")]), conn(src="fd00::5"), True),
    (
        "ipv4 block never matches ipv6 source",
        pb.Match(source_ips=[cidr("0.0.0.0/0")]),
        conn(src="fd00::5"),
        False,
    ),
    (
        "ipv4-mapped source matches the ipv4 block",
        pb.Match(source_ips=[cidr("10.0.0.0/8")]),
        conn(src="::ffff:10.0.0.1"),
        True,
    ),
    (
        "ipv4-mapped block matches the ipv4 source",
        pb.Match(source_ips=[cidr("::ffff:10.0.0.0/104")]),
        conn(),
        True,
    ),
    (
        "not source ip for a mapped address",
        pb.Match(not_source_ips=[cidr("10.0.0.0/8")]),
        conn(src="::ffff:10.0.0.1"),
        False,
    ),
    ("destination ip", pb.Match(destination_ips=[cidr("10.0.0.9/32")]), conn(), True),
    ("not destination ip", pb.Match(not_destination_ips=[cidr("10.0.0.0/24")]), conn(), False),
    ("destination port", pb.Match(destination_ports=[80]), conn(), True),
    (
        "address with host bits set",
        pb.Match(source_ips=[pb.Address(address=bytes([10, 0, 0, 7]), length=8)]),
        conn(),
        True,
    ),
]


@pytest.mark.parametrize(
    ("match", "connection", "expected"), [c[1:] for c in ATTRIBUTE_CASES], ids=[c[0] for c in ATTRIBUTE_CASES]
)
def test_attributes(match: pb.Match, connection: Connection, expected: bool) -> None:
    assert matches(one(match), connection) is expected


# --- decision order --------------------------------------------------------------------------------

ANY = pb.Group()  # matches everything
NOTHING = group([pb.Match(destination_ports=[1])])


DECISION_CASES = [
    ("no policy allows", [], True, DecisionReason.NO_ALLOW_POLICY, ""),
    (
        "non-matching deny and no allow allows",
        [policy(NOTHING, action=pb.DENY)],
        True,
        DecisionReason.NO_ALLOW_POLICY,
        "",
    ),
    ("matching deny denies", [policy(ANY, action=pb.DENY, name="d")], False, DecisionReason.DENIED, "x/d"),
    ("matching allow allows", [policy(ANY, name="a")], True, DecisionReason.ALLOWED, "x/a"),
    ("allow policies that do not match deny", [policy(NOTHING)], False, DecisionReason.NOT_ALLOWED, ""),
    ("allow with no groups denies", [policy()], False, DecisionReason.NOT_ALLOWED, ""),
    (
        "deny wins over allow",
        [policy(ANY, name="a"), policy(ANY, action=pb.DENY, name="d")],
        False,
        DecisionReason.DENIED,
        "x/d",
    ),
    (
        "any matching allow is enough",
        [policy(NOTHING, name="a"), policy(ANY, name="b")],
        True,
        DecisionReason.ALLOWED,
        "x/b",
    ),
    (
        "dry-run deny does not deny",
        [policy(ANY, action=pb.DENY, dry_run=True)],
        True,
        DecisionReason.NO_ALLOW_POLICY,
        "",
    ),
    (
        "dry-run allow is not an allow policy",
        [policy(NOTHING, dry_run=True)],
        True,
        DecisionReason.NO_ALLOW_POLICY,
        "",
    ),
]


@pytest.mark.parametrize(
    ("policies", "allowed", "reason", "deciding"),
    [c[1:] for c in DECISION_CASES],
    ids=[c[0] for c in DECISION_CASES],
)
def test_decision_order(
    policies: list[pb.Authorization], allowed: bool, reason: DecisionReason, deciding: str
) -> None:
    decision = decide(policies, conn())
    assert (decision.allowed, decision.reason, decision.policy) == (allowed, reason, deciding)


def test_dry_run_matches_are_reported_with_the_shadow_decision() -> None:
    policies = [
        policy(ANY, name="enforced-allow"),
        policy(ANY, action=pb.DENY, name="trial-deny", dry_run=True),
        policy(NOTHING, action=pb.DENY, name="trial-miss", dry_run=True),
    ]
    decision = decide(policies, conn())
    assert decision.allowed
    assert decision.dry_run_matches == ("x/trial-deny",)
    assert decision.dry_run_allowed is False


def test_dry_run_allow_would_deny_what_it_does_not_match() -> None:
    decision = decide([policy(NOTHING, name="trial", dry_run=True)], conn())
    assert decision.allowed and decision.dry_run_matches == () and decision.dry_run_allowed is False


def test_decision_renders_reason_and_policy() -> None:
    assert str(decide([policy(ANY, action=pb.DENY, name="d")], conn())) == "denied by policy x/d"


# --- fail-closed compilation -----------------------------------------------------------------------


def unknown_scope(value: int) -> pb.Scope:
    """A scope number this proxy does not know (proto3 enums are open: it arrives as a bare int)."""
    return cast(pb.Scope, value)


def unknown_action(value: int) -> pb.Action:
    return cast(pb.Action, value)


def with_unknown_field(message: pb.Authorization) -> pb.Authorization:
    """The message as a newer controller might send it: with a field (number 99) this proxy lacks."""
    return pb.Authorization.FromString(message.SerializeToString() + bytes([0x98, 0x06, 0x01]))


def nested_unknown_field() -> pb.Authorization:
    match = pb.Match.FromString(
        pb.Match(destination_ports=[80]).SerializeToString() + bytes([0x98, 0x06, 0x01])
    )
    return policy(group([match]))


COMPILE_ERROR_CASES = [
    (
        "unknown scope",
        pb.Authorization(name="p", namespace="x", scope=unknown_scope(7)),
        "scope",
        "unknown scope 7",
    ),
    (
        "unknown action",
        pb.Authorization(name="p", namespace="x", action=unknown_action(5)),
        "action",
        "unknown action 5",
    ),
    (
        "unknown top-level field",
        with_unknown_field(policy(ANY)),
        "(top level)",
        "fields this proxy does not know",
    ),
    (
        "unknown field in a match",
        nested_unknown_field(),
        "groups[0].rules[0].matches[0]",
        "fields this proxy does not know",
    ),
    (
        "string match without pattern",
        one(pb.Match(principals=[pb.StringMatch()])),
        "groups[0].rules[0].matches[0].principals[0]",
        "sets no pattern",
    ),
    (
        "address of five bytes",
        one(pb.Match(source_ips=[pb.Address(address=b"\x01\x02\x03\x04\x05", length=8)])),
        "groups[0].rules[0].matches[0].source_ips[0]",
        "4 or 16 bytes",
    ),
    (
        "prefix longer than the address",
        one(pb.Match(destination_ips=[pb.Address(address=b"\x0a\x00\x00\x00", length=33)])),
        "groups[0].rules[0].matches[0].destination_ips[0]",
        "longer than the 32-bit address",
    ),
    (
        "port above 65535",
        one(pb.Match(not_destination_ports=[70000])),
        "groups[0].rules[0].matches[0].not_destination_ports[0]",
        "above 65535",
    ),
]


@pytest.mark.parametrize(
    ("authorization", "path", "reason"),
    [c[1:] for c in COMPILE_ERROR_CASES],
    ids=[c[0] for c in COMPILE_ERROR_CASES],
)
def test_unenforceable_resources_are_refused(authorization: pb.Authorization, path: str, reason: str) -> None:
    with pytest.raises(PolicyCompileError) as raised:
        compile_authorization(authorization)
    assert raised.value.key == "x/p"
    assert raised.value.path == path
    assert reason in str(raised.value)


def test_decide_denies_when_a_policy_cannot_be_compiled() -> None:
    decision = decide(
        [policy(ANY), pb.Authorization(name="bad", namespace="x", action=unknown_action(9))], conn()
    )
    assert not decision.allowed
    assert decision.reason is DecisionReason.INVALID_POLICY
    assert decision.policy == "x/bad"
    assert "unknown action 9" in decision.detail


def test_a_broken_dry_run_policy_is_reported_but_never_decides() -> None:
    broken = pb.Authorization(name="bad", namespace="x", action=unknown_action(9), dry_run=True)
    decision = decide([policy(ANY), broken], conn())
    assert decision.allowed  # a dry-run policy is only observed, even when it cannot be compiled
    assert decision.dry_run_matches == ("x/bad",)
    assert decision.dry_run_allowed is False  # enforced, it would deny
    evaluator = PolicyEvaluator()
    assert isinstance(evaluator.upsert(broken), PolicyCompileError)
    assert evaluator.decide(workload("x"), conn()).allowed


def test_compiled_policy_keeps_its_identity() -> None:
    compiled = compile_authorization(policy(ANY, name="n", scope=pb.GLOBAL, action=pb.DENY, dry_run=True))
    assert (compiled.key, compiled.scope, compiled.action, compiled.dry_run) == (
        "x/n",
        PolicyScope.GLOBAL,
        PolicyAction.DENY,
        True,
    )


def test_connection_of_parses_text() -> None:
    c = Connection.of("spiffe://cluster.local/ns/x/sa/y", "10.0.0.1", "fd00::1", 80)
    assert c == Connection(XY, ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1"), 80)


# --- applicability and the store -------------------------------------------------------------------


def workload(namespace: str = "x", listed: tuple[str, ...] = ()) -> workload_pb2.Workload:
    return workload_pb2.Workload(name="w", namespace=namespace, authorization_policies=list(listed))


GLOBAL_DENY = policy(ANY, action=pb.DENY, name="global", namespace="istio-system", scope=pb.GLOBAL)
NS_X_DENY = policy(ANY, action=pb.DENY, name="ns", namespace="x", scope=pb.NAMESPACE)
SELECTED_DENY = policy(ANY, action=pb.DENY, name="sel", namespace="x", scope=pb.WORKLOAD_SELECTOR)
ALL = {"istio-system/global": GLOBAL_DENY, "x/ns": NS_X_DENY, "x/sel": SELECTED_DENY}

APPLICABILITY_CASES = [
    ("global applies everywhere", workload("z"), ["global"]),
    ("namespace scope applies in its namespace", workload("x"), ["global", "ns"]),
    ("selector scope applies only when listed", workload("x", ("x/sel",)), ["global", "ns", "sel"]),
    ("listed policies apply in other namespaces too", workload("z", ("x/sel",)), ["global", "sel"]),
    ("a policy listed and in scope appears once", workload("x", ("x/ns",)), ["global", "ns"]),
]


@pytest.mark.parametrize(
    ("wl", "expected"), [c[1:] for c in APPLICABILITY_CASES], ids=[c[0] for c in APPLICABILITY_CASES]
)
def test_applicable_policies(wl: workload_pb2.Workload, expected: list[str]) -> None:
    assert [p.name for p in applicable_policies(wl, ALL)] == expected
    evaluator = PolicyEvaluator()
    for key, authorization in ALL.items():
        evaluator.upsert(authorization, key)
    selected, missing = evaluator.policies_for(wl)
    assert sorted(p.key.split("/")[1] for p in selected) == sorted(expected)
    assert missing == ()


def test_missing_policies() -> None:
    assert missing_policies(workload("x", ("x/sel", "x/gone")), ALL) == ("x/gone",)


def test_evaluator_denies_a_workload_listing_a_policy_it_has_not_received() -> None:
    evaluator = PolicyEvaluator()
    decision = evaluator.decide(workload("x", ("x/not-yet",)), conn())
    assert not decision.allowed
    assert (decision.reason, decision.policy) == (DecisionReason.MISSING_POLICY, "x/not-yet")


def test_evaluator_keeps_a_broken_policy_and_denies_only_where_it_applies() -> None:
    evaluator = PolicyEvaluator()
    broken = policy(group([pb.Match(principals=[pb.StringMatch()])]), name="bad", scope=pb.WORKLOAD_SELECTOR)
    error = evaluator.upsert(broken)
    assert isinstance(error, PolicyCompileError)
    assert isinstance(evaluator.get("x/bad"), BrokenPolicy)
    assert not evaluator.decide(workload("x", ("x/bad",)), conn()).allowed
    assert evaluator.decide(workload("x"), conn()).allowed

    # A good version replaces it.
    assert evaluator.upsert(policy(ANY, name="bad", scope=pb.WORKLOAD_SELECTOR)) is None
    assert evaluator.decide(workload("x", ("x/bad",)), conn()).allowed


def test_broken_policy_with_unknown_scope_denies_its_namespace() -> None:
    evaluator = PolicyEvaluator()
    assert (
        evaluator.upsert(pb.Authorization(name="future", namespace="x", scope=unknown_scope(9))) is not None
    )
    assert not evaluator.decide(workload("x"), conn()).allowed
    assert evaluator.decide(workload("z"), conn()).allowed


def test_evaluator_remove_and_rescope() -> None:
    evaluator = PolicyEvaluator()
    evaluator.upsert(NS_X_DENY)
    assert "x/ns" in evaluator and len(evaluator) == 1
    assert not evaluator.decide(workload("x"), conn()).allowed
    # Re-scoped from namespace to workload selector: it stops applying to unlisted workloads.
    evaluator.upsert(policy(ANY, action=pb.DENY, name="ns", scope=pb.WORKLOAD_SELECTOR))
    assert evaluator.decide(workload("x"), conn()).allowed
    assert not evaluator.decide(workload("x", ("x/ns",)), conn()).allowed
    assert evaluator.remove("x/ns") and not evaluator.remove("x/ns")
    assert evaluator.decide(workload("x", ()), conn()).allowed
