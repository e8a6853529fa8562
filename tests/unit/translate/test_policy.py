"""AuthorizationPolicy compilation for node proxies: field mapping, scopes, and the fail-closed handling
of what L4 cannot enforce (hardening checklist item 31)."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import empty_pb2

from controller.translate import Translation
from controller.translate.policy import PolicyTranslation, translate_policy
from loom.api import authorization_pb2 as pb
from loom.identity import Identity
from loom.policy.rbac import Connection, applicable_policies, decide
from loom.resources.diagnostics import Severity
from loom.resources.model import (
    AuthorizationPolicy,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)

from .builders import authz, namespace, pod, run, workload_of

PRESENCE = pb.StringMatch(presence=empty_pb2.Empty())


def addr(text: str) -> pb.Address:
    network = ipaddress.ip_network(text, strict=False)
    return pb.Address(address=network.network_address.packed, length=network.prefixlen)


def compiled(*rules: PolicyRule, action: str = "ALLOW") -> pb.Authorization:
    translation = run(authz("p", action=action, rules=rules))
    return translation.authorizations["default/p"]


def one_match(**fields: object) -> list[pb.Group]:
    return [pb.Group(rules=[pb.Rules(matches=[pb.Match(**fields)])])]  # type: ignore[arg-type]


# --- field mapping ---------------------------------------------------------------------------------

MAPPING_CASES: list[tuple[str, PolicyRule, list[pb.Group]]] = [
    (
        "principal exact",
        PolicyRule(sources=(PolicySource(principals=("cluster.local/ns/x/sa/y",)),)),
        one_match(principals=[pb.StringMatch(exact="cluster.local/ns/x/sa/y")]),
    ),
    (
        "principal loses spiffe://",
        PolicyRule(sources=(PolicySource(principals=("spiffe://cluster.local/ns/x/sa/y",)),)),
        one_match(principals=[pb.StringMatch(exact="cluster.local/ns/x/sa/y")]),
    ),
    (
        "principal * is presence",
        PolicyRule(sources=(PolicySource(principals=("*",)),)),
        one_match(principals=[PRESENCE]),
    ),
    (
        "principal */ns/x/sa/y is a suffix",
        PolicyRule(sources=(PolicySource(principals=("*/ns/x/sa/y",)),)),
        one_match(principals=[pb.StringMatch(suffix="/ns/x/sa/y")]),
    ),
    (
        "principal prefix",
        PolicyRule(sources=(PolicySource(principals=("cluster.local/ns/x/*",)),)),
        one_match(principals=[pb.StringMatch(prefix="cluster.local/ns/x/")]),
    ),
    (
        "*x* is a suffix match on x*",
        PolicyRule(sources=(PolicySource(namespaces=("*x*",)),)),
        one_match(namespaces=[pb.StringMatch(suffix="x*")]),
    ),
    (
        "not principals",
        PolicyRule(sources=(PolicySource(not_principals=("*",)),)),
        one_match(not_principals=[PRESENCE]),
    ),
    (
        "namespaces with dots stay exact",
        PolicyRule(sources=(PolicySource(namespaces=("my.ns",), not_namespaces=("kube-*",)),)),
        one_match(
            namespaces=[pb.StringMatch(exact="my.ns")], not_namespaces=[pb.StringMatch(prefix="kube-")]
        ),
    ),
    (
        "service account without namespace means the policy's",
        PolicyRule(sources=(PolicySource(service_accounts=("reviews", "other/ratings")),)),
        one_match(
            service_accounts=[
                pb.ServiceAccountMatch(namespace="default", serviceAccount="reviews"),
                pb.ServiceAccountMatch(namespace="other", serviceAccount="ratings"),
            ]
        ),
    ),
    (
        "not service accounts",
        PolicyRule(sources=(PolicySource(not_service_accounts=("x/y",)),)),
        one_match(not_service_accounts=[pb.ServiceAccountMatch(namespace="x", serviceAccount="y")]),
    ),
    (
        "ip blocks: CIDR, bare address, host bits, IPv6",
        PolicyRule(
            sources=(
                PolicySource(ip_blocks=("10.0.0.0/8", "10.1.2.3", "10.1.2.3/16", "fd00::/8", "fd00::1")),
            )
        ),
        one_match(
            source_ips=[
                addr("10.0.0.0/8"),
                addr("10.1.2.3/32"),
                addr("10.1.0.0/16"),
                addr("fd00::/8"),
                addr("fd00::1/128"),
            ]
        ),
    ),
    (
        "not ip blocks",
        PolicyRule(sources=(PolicySource(not_ip_blocks=("192.168.0.0/16",)),)),
        one_match(not_source_ips=[addr("192.168.0.0/16")]),
    ),
    (
        "ports and not ports",
        PolicyRule(operations=(PolicyOperation(ports=("9080", "80"), not_ports=("81",)),)),
        one_match(destination_ports=[9080, 80], not_destination_ports=[81]),
    ),
    (
        "when source.ip",
        PolicyRule(
            conditions=(PolicyCondition("source.ip", values=("10.0.0.0/8",), not_values=("10.0.0.1",)),)
        ),
        one_match(source_ips=[addr("10.0.0.0/8")], not_source_ips=[addr("10.0.0.1/32")]),
    ),
    (
        "when source.namespace",
        PolicyRule(conditions=(PolicyCondition("source.namespace", values=("a",), not_values=("b*",)),)),
        one_match(namespaces=[pb.StringMatch(exact="a")], not_namespaces=[pb.StringMatch(prefix="b")]),
    ),
    (
        "when source.principal",
        PolicyRule(conditions=(PolicyCondition("source.principal", values=("spiffe://td/ns/a/sa/b",)),)),
        one_match(principals=[pb.StringMatch(exact="td/ns/a/sa/b")]),
    ),
    (
        "when source.serviceAccount",
        PolicyRule(conditions=(PolicyCondition("source.serviceAccount", not_values=("sa",)),)),
        one_match(not_service_accounts=[pb.ServiceAccountMatch(namespace="default", serviceAccount="sa")]),
    ),
    (
        "when destination.ip",
        PolicyRule(conditions=(PolicyCondition("destination.ip", values=("10.0.0.9",)),)),
        one_match(destination_ips=[addr("10.0.0.9/32")]),
    ),
    (
        "when destination.port",
        PolicyRule(conditions=(PolicyCondition("destination.port", values=("80",), not_values=("81",)),)),
        one_match(destination_ports=[80], not_destination_ports=[81]),
    ),
    (
        "sources are ORed in one clause",
        PolicyRule(sources=(PolicySource(namespaces=("a",)), PolicySource(namespaces=("b",)))),
        [
            pb.Group(
                rules=[
                    pb.Rules(
                        matches=[
                            pb.Match(namespaces=[pb.StringMatch(exact="a")]),
                            pb.Match(namespaces=[pb.StringMatch(exact="b")]),
                        ]
                    )
                ]
            )
        ],
    ),
    (
        "from, to and each when are ANDed clauses",
        PolicyRule(
            sources=(PolicySource(namespaces=("a",)),),
            operations=(PolicyOperation(ports=("80",)),),
            conditions=(
                PolicyCondition("destination.ip", values=("10.0.0.9",)),
                PolicyCondition("source.ip", values=("10.0.0.1",)),
            ),
        ),
        [
            pb.Group(
                rules=[
                    pb.Rules(matches=[pb.Match(namespaces=[pb.StringMatch(exact="a")])]),
                    pb.Rules(matches=[pb.Match(destination_ports=[80])]),
                    pb.Rules(matches=[pb.Match(destination_ips=[addr("10.0.0.9/32")])]),
                    pb.Rules(matches=[pb.Match(source_ips=[addr("10.0.0.1/32")])]),
                ]
            )
        ],
    ),
    ("rule with no from, to or when matches everything", PolicyRule(), [pb.Group()]),
    (
        "an empty source makes the from clause match everything",
        PolicyRule(
            sources=(PolicySource(namespaces=("a",)), PolicySource()),
            operations=(PolicyOperation(ports=("80",)),),
        ),
        one_match(destination_ports=[80]),
    ),
]


@pytest.mark.parametrize(
    ("rule", "groups"), [c[1:] for c in MAPPING_CASES], ids=[c[0] for c in MAPPING_CASES]
)
def test_field_mapping(rule: PolicyRule, groups: list[pb.Group]) -> None:
    assert list(compiled(rule).groups) == groups


def test_policy_identity_and_dry_run() -> None:
    translation = run(authz("p", action="DENY", rules=(PolicyRule(),), dry_run=True))
    assert translation.authorizations["default/p"] == pb.Authorization(
        name="p", namespace="default", scope=pb.NAMESPACE, action=pb.DENY, groups=[pb.Group()], dry_run=True
    )


@pytest.mark.parametrize(
    ("action", "rules"),
    [("ALLOW", None), ("ALLOW", ()), ("DENY", None), ("DENY", ())],
    ids=["allow without rules", "allow with empty rules", "deny without rules", "deny with empty rules"],
)
def test_policies_without_rules_have_no_groups(action: str, rules: tuple[PolicyRule, ...] | None) -> None:
    assert list(run(authz("p", action=action, rules=rules)).authorizations["default/p"].groups) == []


# --- scope and selection ---------------------------------------------------------------------------

ROOT = "istio-system"


def scope_world(*policies: AuthorizationPolicy) -> Translation:
    return run(
        namespace("default"),
        namespace("other"),
        namespace(ROOT),
        pod("a", labels={"app": "a"}),
        pod("b", labels={"app": "b"}, ips=("10.0.0.2",)),
        pod("other-a", "other", labels={"app": "a"}, ips=("10.0.0.3",)),
        *policies,
    )


def listed(translation: Translation, name: str, ns: str = "default") -> list[str]:
    return list(workload_of(translation, name, ns).authorization_policies)


def test_selector_policy_is_listed_on_selected_pods_of_its_namespace() -> None:
    translation = scope_world(authz("sel", selector={"app": "a"}, rules=(PolicyRule(),)))
    assert translation.authorizations["default/sel"].scope == pb.WORKLOAD_SELECTOR
    assert listed(translation, "a") == ["default/sel"]
    assert listed(translation, "b") == []
    assert listed(translation, "other-a", "other") == []


def test_root_namespace_selector_policy_selects_in_every_namespace() -> None:
    translation = scope_world(authz("sel", ROOT, selector={"app": "a"}, rules=(PolicyRule(),)))
    assert translation.authorizations[f"{ROOT}/sel"].scope == pb.WORKLOAD_SELECTOR
    assert listed(translation, "a") == [f"{ROOT}/sel"]
    assert listed(translation, "other-a", "other") == [f"{ROOT}/sel"]
    assert listed(translation, "b") == []


@pytest.mark.parametrize(
    ("ns", "scope"),
    [("default", pb.NAMESPACE), (ROOT, pb.GLOBAL)],
    ids=["namespace scope", "root namespace is global"],
)
def test_policies_without_selector(ns: str, scope: int) -> None:
    translation = scope_world(authz("all", ns, rules=(PolicyRule(),)))
    assert translation.authorizations[f"{ns}/all"].scope == scope
    assert listed(translation, "a") == []  # applied by scope, not listed


def test_listed_keys_are_sorted_and_combined() -> None:
    translation = scope_world(
        authz("z", selector={"app": "a"}, rules=(PolicyRule(),)),
        authz("m", ROOT, selector={"app": "a"}, rules=(PolicyRule(),)),
        authz("b", selector={}, rules=(PolicyRule(),)),
    )
    assert listed(translation, "a") == ["default/b", "default/z", f"{ROOT}/m"]
    assert listed(translation, "b") == ["default/b"]


def test_target_ref_policies_are_for_waypoints_only() -> None:
    translation = scope_world(
        authz(
            "wp",
            target_refs=(PolicyTargetRef(kind="Service", name="reviews"),),
            rules=(PolicyRule(operations=(PolicyOperation(methods=("GET",)),)),),
        )
    )
    assert "default/wp" not in translation.authorizations
    assert not translation.diagnostics


# --- fail closed (hardening checklist item 31) -------------------------------------------------------

PLAIN = Connection(None, ipaddress.ip_address("10.9.9.9"), ipaddress.ip_address("10.0.0.1"), 80)
FROM_A = Connection(
    Identity("cluster.local", "a", "sa"),
    ipaddress.ip_address("10.9.9.9"),
    ipaddress.ip_address("10.0.0.1"),
    80,
)
FROM_B = Connection(
    Identity("cluster.local", "b", "sa"),
    ipaddress.ip_address("10.9.9.9"),
    ipaddress.ip_address("10.0.0.1"),
    9090,
)


def allowed(translation: Translation, conn: Connection) -> bool:
    workload = workload_of(translation, "target")
    return decide(applicable_policies(workload, translation.authorizations), conn).allowed


def with_target(*policies: AuthorizationPolicy) -> Translation:
    return run(namespace("default"), pod("target", labels={"app": "t"}), *policies)


L7_SOURCE = PolicySource(request_principals=("issuer/subject",))
GET_ONLY = PolicyOperation(methods=("GET",))

# (id, policy, expected decisions for FROM_A, FROM_B, PLAIN, warning field paths)
FAIL_CLOSED_CASES: list[tuple[str, AuthorizationPolicy, tuple[bool, bool, bool], list[str]]] = [
    (
        "ALLOW with an L7 rule allows nothing",
        authz("p", rules=(PolicyRule(sources=(PolicySource(namespaces=("a",)),), operations=(GET_ONLY,)),)),
        (False, False, False),
        ["spec.rules[0].to[0].operation.methods", "spec.rules"],
    ),
    (
        "ALLOW keeps its L4 rules and drops the L7 one",
        authz(
            "p",
            rules=(
                PolicyRule(sources=(PolicySource(namespaces=("a",)),), operations=(GET_ONLY,)),
                PolicyRule(sources=(PolicySource(namespaces=("b",)),)),
            ),
        ),
        (False, True, False),
        ["spec.rules[0].to[0].operation.methods"],
    ),
    (
        "ALLOW with requestPrincipals",
        authz("p", rules=(PolicyRule(sources=(L7_SOURCE,)),)),
        (False, False, False),
        ["spec.rules[0].from[0].source.requestPrincipals", "spec.rules"],
    ),
    (
        "ALLOW with remoteIpBlocks",
        authz("p", rules=(PolicyRule(sources=(PolicySource(remote_ip_blocks=("10.0.0.0/8",)),)),)),
        (False, False, False),
        ["spec.rules[0].from[0].source.remoteIpBlocks", "spec.rules"],
    ),
    (
        "ALLOW with an L7 when key",
        authz(
            "p", rules=(PolicyRule(conditions=(PolicyCondition("request.headers[x-user]", values=("me",)),)),)
        ),
        (False, False, False),
        ["spec.rules[0].when[0]", "spec.rules"],
    ),
    (
        "DENY with L7 parts keeps its L4 parts",
        authz(
            "p",
            action="DENY",
            rules=(
                PolicyRule(
                    sources=(PolicySource(namespaces=("a",)),),
                    operations=(PolicyOperation(ports=("80",), paths=("/admin",)),),
                ),
            ),
        ),
        (False, True, True),
        ["spec.rules[0].to[0].operation.paths"],
    ),
    (
        "DENY whose operation is only L7 denies every operation of its sources",
        authz(
            "p",
            action="DENY",
            rules=(PolicyRule(sources=(PolicySource(namespaces=("a",)),), operations=(GET_ONLY,)),),
        ),
        (False, True, True),
        ["spec.rules[0].to[0].operation.methods"],
    ),
    (
        "DENY with only L7 attributes denies everything instead of nothing",
        authz("p", action="DENY", rules=(PolicyRule(sources=(L7_SOURCE,), operations=(GET_ONLY,)),)),
        (False, False, False),
        ["spec.rules[0].from[0].source.requestPrincipals", "spec.rules[0].to[0].operation.methods"],
    ),
    (
        "DENY with an L7 not-form denies more",
        authz(
            "p", action="DENY", rules=(PolicyRule(operations=(PolicyOperation(not_paths=("/healthz",)),)),)
        ),
        (False, False, False),
        ["spec.rules[0].to[0].operation.notPaths"],
    ),
    (
        "DENY with an L7 when key",
        authz(
            "p",
            action="DENY",
            rules=(
                PolicyRule(
                    sources=(PolicySource(namespaces=("b",)),),
                    conditions=(PolicyCondition("request.auth.claims[iss]", values=("x",)),),
                ),
            ),
        ),
        (True, False, True),
        ["spec.rules[0].when[0]"],
    ),
    (
        "ALLOW with an invalid IP block",
        authz("p", rules=(PolicyRule(sources=(PolicySource(ip_blocks=("10.0.0.300/8",)),)),)),
        (False, False, False),
        ["spec.rules[0].from[0].source.ipBlocks", "spec.rules"],
    ),
    (
        "DENY with an invalid port drops only that attribute",
        authz(
            "p",
            action="DENY",
            rules=(
                PolicyRule(
                    sources=(PolicySource(namespaces=("a",)),), operations=(PolicyOperation(ports=("http",)),)
                ),
            ),
        ),
        (False, True, True),
        ["spec.rules[0].to[0].operation.ports"],
    ),
    (
        "ALLOW with an invalid service account",
        authz("p", rules=(PolicyRule(sources=(PolicySource(service_accounts=("a/b/c",)),)),)),
        (False, False, False),
        ["spec.rules[0].from[0].source.serviceAccounts", "spec.rules"],
    ),
    (
        "ALLOW with a condition without values",
        authz("p", rules=(PolicyRule(conditions=(PolicyCondition("destination.port"),)),)),
        (False, False, False),
        ["spec.rules[0].when[0]", "spec.rules"],
    ),
    (
        "CUSTOM denies everything in scope",
        authz("p", action="CUSTOM", rules=(PolicyRule(operations=(PolicyOperation(paths=("/x",)),)),)),
        (False, False, False),
        ["spec.action"],
    ),
    (
        "unknown action denies everything in scope",
        authz("p", action="LOG", rules=(PolicyRule(),)),
        (False, False, False),
        ["spec.action"],
    ),
    (
        "AUDIT is not enforced by node proxies",
        authz("p", action="AUDIT", rules=(PolicyRule(operations=(GET_ONLY,)),)),
        (True, True, True),
        ["spec.action"],
    ),
]


@pytest.mark.parametrize(
    ("policy", "decisions", "fields"),
    [c[1:] for c in FAIL_CLOSED_CASES],
    ids=[c[0] for c in FAIL_CLOSED_CASES],
)
def test_fail_closed(
    policy: AuthorizationPolicy, decisions: tuple[bool, bool, bool], fields: list[str]
) -> None:
    translation = with_target(policy)
    assert (
        allowed(translation, FROM_A),
        allowed(translation, FROM_B),
        allowed(translation, PLAIN),
    ) == decisions
    assert [d.field for d in translation.diagnostics] == fields
    for d in translation.diagnostics:
        assert d.severity is Severity.WARNING
        assert d.key == policy.key and d.origin == policy.origin


def test_l7_warning_says_what_loom_did_and_where_l7_belongs() -> None:
    allow = with_target(authz("p", rules=(PolicyRule(operations=(GET_ONLY,)),)))
    deny = with_target(authz("p", action="DENY", rules=(PolicyRule(operations=(GET_ONLY,)),)))
    assert str(allow.diagnostics[0]) == (
        "policies.yaml doc 3 AuthorizationPolicy default/p: spec.rules[0].to[0].operation.methods: "
        "methods is an L7 attribute, which the node proxy cannot enforce; loom dropped this whole ALLOW "
        "rule (fail closed), so the rule allows nothing. L7 rules belong on a waypoint: attach the policy "
        "to it with targetRefs"
    )
    assert "enforces this DENY rule at L4 without it" in deny.diagnostics[0].message
    assert "targetRefs" in deny.diagnostics[0].message


def test_custom_and_audit_are_not_compiled_when_attached_to_a_waypoint() -> None:
    refs = (PolicyTargetRef(kind="Gateway", group="gateway.networking.k8s.io", name="waypoint"),)
    translation = with_target(
        authz("c", action="CUSTOM", target_refs=refs), authz("a", action="AUDIT", target_refs=refs)
    )
    assert dict(translation.authorizations) == {} and not translation.diagnostics


def test_an_internal_error_in_one_policy_denies_its_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    def flaky(policy: AuthorizationPolicy, root: str) -> PolicyTranslation:
        if policy.name == "bad":
            raise RuntimeError("boom")
        return translate_policy(policy, root)

    monkeypatch.setattr("controller.translate.context.translate_policy", flaky)
    translation = with_target(authz("bad", rules=(PolicyRule(),)), authz("good", rules=(PolicyRule(),)))
    assert translation.authorizations["default/bad"].action == pb.DENY
    assert not allowed(translation, FROM_A)
    [error] = [d for d in translation.diagnostics if d.is_error]
    assert "RuntimeError: boom" in error.message and error.key is not None and error.key.name == "bad"
