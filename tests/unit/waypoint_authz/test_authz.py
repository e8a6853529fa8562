"""waypoint.authz.WaypointAuthorizer: which policies apply (targetRefs), every field and its not-form,
the decision order (CUSTOM -> DENY -> ALLOW, AUDIT, dry-run), fail-closed handling, TCP, and the
Istio sample l7-policy.yaml."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loom.identity import Identity
from loom.resources.diagnostics import Severity
from loom.resources.loader import load_paths
from loom.resources.model import (
    AuthorizationPolicy,
    LabelSelector,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)
from waypoint.authz import RBAC_DENIED_BODY, RBAC_DENIED_STATUS, WaypointAuthorizer
from waypoint.model import AppProtocol, Authorizer, Peer, ServiceRef
from waypoint.paths import PathError, normalize_path

from .builders import (
    GATEWAY_REF,
    PRODUCTPAGE,
    RATINGS,
    REVIEWS,
    WAYPOINT,
    policy,
    request,
    rule,
    service_ref,
)

SAMPLES = Path("/work/shared/samples/ambient")


def build(*policies: AuthorizationPolicy, **kwargs: Any) -> WaypointAuthorizer:
    return WaypointAuthorizer.build(policies, waypoint=WAYPOINT, **kwargs)


def test_denial_constants() -> None:
    assert RBAC_DENIED_BODY == "RBAC: access denied"
    assert RBAC_DENIED_STATUS == 403


def test_implements_the_authorizer_protocol() -> None:
    authorizer: Authorizer = build()
    decision = authorizer.check(request())
    assert decision.allowed
    assert decision.reason == "no ALLOW policy applies"


# ---------------------------------------------------------------------------------------------------
# fields: each case is one source / operation / condition in a single-rule policy. As an ALLOW the
# request is allowed exactly when the case matches; as a DENY it is denied exactly then.

OTHER_SA = Identity("cluster.local", "default", "reviews")
PP = "cluster.local/ns/default/sa/bookinfo-productpage"

SOURCE_CASES = [
    pytest.param(PolicySource(principals=(PP,)), {}, True, id="principals exact"),
    pytest.param(PolicySource(principals=(PP,)), {"identity": OTHER_SA}, False, id="principals exact other"),
    pytest.param(PolicySource(principals=("spiffe://" + PP,)), {}, True, id="principals with spiffe scheme"),
    pytest.param(PolicySource(principals=("cluster.local/ns/default/*",)), {}, True, id="principals prefix"),
    pytest.param(PolicySource(principals=("*/sa/bookinfo-productpage",)), {}, True, id="principals suffix"),
    pytest.param(PolicySource(principals=("*",)), {}, True, id="principals presence"),
    pytest.param(PolicySource(principals=("*",)), {"identity": None}, False, id="principals presence no id"),
    pytest.param(
        PolicySource(principals=("other.domain/ns/default/sa/bookinfo-productpage",)),
        {},
        False,
        id="principals other trust domain",
    ),
    pytest.param(
        PolicySource(principals=("cluster.local/ns/default/sa/bookinfo.productpage",)),
        {"identity": Identity("cluster.local", "default", "bookinfoXproductpage")},
        False,
        id="principals dot is not a wildcard",
    ),
    pytest.param(PolicySource(not_principals=(PP,)), {}, False, id="notPrincipals listed"),
    pytest.param(PolicySource(not_principals=(PP,)), {"identity": OTHER_SA}, True, id="notPrincipals other"),
    pytest.param(
        PolicySource(not_principals=(PP,)), {"identity": None}, True, id="notPrincipals no identity"
    ),
    pytest.param(PolicySource(namespaces=("default",)), {}, True, id="namespaces exact"),
    pytest.param(PolicySource(namespaces=("def*",)), {}, True, id="namespaces prefix"),
    pytest.param(PolicySource(namespaces=("*ult",)), {}, True, id="namespaces suffix"),
    pytest.param(PolicySource(namespaces=("other",)), {}, False, id="namespaces other"),
    pytest.param(
        PolicySource(namespaces=("default",)), {"identity": None}, False, id="namespaces no identity"
    ),
    pytest.param(PolicySource(not_namespaces=("default",)), {}, False, id="notNamespaces listed"),
    pytest.param(PolicySource(not_namespaces=("other",)), {}, True, id="notNamespaces other"),
    pytest.param(PolicySource(service_accounts=("bookinfo-productpage",)), {}, True, id="serviceAccounts sa"),
    pytest.param(
        PolicySource(service_accounts=("default/bookinfo-productpage",)), {}, True, id="serviceAccounts ns/sa"
    ),
    pytest.param(
        PolicySource(service_accounts=("other/bookinfo-productpage",)),
        {},
        False,
        id="serviceAccounts other ns",
    ),
    pytest.param(
        PolicySource(not_service_accounts=("bookinfo-productpage",)),
        {},
        False,
        id="notServiceAccounts listed",
    ),
    pytest.param(PolicySource(not_service_accounts=("reviews",)), {}, True, id="notServiceAccounts other"),
    pytest.param(PolicySource(ip_blocks=("10.1.0.0/16",)), {}, True, id="ipBlocks cidr"),
    pytest.param(PolicySource(ip_blocks=("10.1.0.5",)), {}, True, id="ipBlocks single address"),
    pytest.param(PolicySource(ip_blocks=("10.2.0.0/16",)), {}, False, id="ipBlocks other"),
    pytest.param(PolicySource(ip_blocks=("::ffff:10.1.0.0/112",)), {}, True, id="ipBlocks v4-mapped block"),
    pytest.param(
        PolicySource(ip_blocks=("10.1.0.0/16",)),
        {"source_address": "[::ffff:10.1.0.5]:4000"},
        True,
        id="ipBlocks v4-mapped peer",
    ),
    pytest.param(
        PolicySource(ip_blocks=("fd00::/8",)), {"source_address": "[fd00::5]:4000"}, True, id="ipBlocks ipv6"
    ),
    pytest.param(PolicySource(not_ip_blocks=("10.1.0.0/16",)), {}, False, id="notIpBlocks listed"),
    pytest.param(PolicySource(not_ip_blocks=("10.2.0.0/16",)), {}, True, id="notIpBlocks other"),
]

AUTHORITY = {"authority": "Reviews.Default.svc.cluster.local."}
OPERATION_CASES = [
    pytest.param(PolicyOperation(ports=("9080",)), {}, True, id="ports target port"),
    pytest.param(PolicyOperation(ports=("80",)), {}, False, id="ports service port is not used"),
    pytest.param(PolicyOperation(not_ports=("9080",)), {}, False, id="notPorts target port"),
    pytest.param(PolicyOperation(not_ports=("80",)), {}, True, id="notPorts service port"),
    pytest.param(PolicyOperation(methods=("GET",)), {}, True, id="methods exact"),
    pytest.param(PolicyOperation(methods=("get",)), {}, False, id="methods case-sensitive"),
    pytest.param(PolicyOperation(methods=("POST",)), {}, False, id="methods other"),
    pytest.param(PolicyOperation(methods=("G*",)), {}, True, id="methods prefix"),
    pytest.param(PolicyOperation(not_methods=("GET",)), {}, False, id="notMethods listed"),
    pytest.param(PolicyOperation(not_methods=("DELETE",)), {}, True, id="notMethods other"),
    pytest.param(
        PolicyOperation(hosts=("reviews.default.svc.cluster.local",)), {}, True, id="hosts port stripped"
    ),
    pytest.param(
        PolicyOperation(hosts=("REVIEWS.default.svc.cluster.local",)), {}, True, id="hosts pattern case"
    ),
    pytest.param(
        PolicyOperation(hosts=("reviews.default.svc.cluster.local",)),
        AUTHORITY,
        True,
        id="hosts case and dot",
    ),
    pytest.param(PolicyOperation(hosts=("*.svc.cluster.local",)), {}, True, id="hosts suffix"),
    pytest.param(PolicyOperation(hosts=("reviews.*",)), {}, True, id="hosts prefix"),
    pytest.param(PolicyOperation(hosts=("ratings.default.svc.cluster.local",)), {}, False, id="hosts other"),
    pytest.param(
        PolicyOperation(hosts=("reviews.default.svc.cluster.local:80",)),
        {},
        True,
        id="hosts pattern with port",
    ),
    pytest.param(
        PolicyOperation(hosts=("reviews.default.svc.cluster.local:8080",)), {}, False, id="hosts other port"
    ),
    pytest.param(
        PolicyOperation(hosts=("reviews.default.svc.cluster.local:*",)), {}, True, id="hosts any port"
    ),
    pytest.param(
        PolicyOperation(hosts=("reviews:*",)),
        {"authority": "reviews"},
        False,
        id="hosts any port needs a port",
    ),
    pytest.param(PolicyOperation(hosts=("[fd00::1]",)), {"authority": "[FD00::1]:80"}, True, id="hosts ipv6"),
    pytest.param(
        PolicyOperation(not_hosts=("reviews.default.svc.cluster.local",)), {}, False, id="notHosts listed"
    ),
    pytest.param(PolicyOperation(not_hosts=("ratings",)), {}, True, id="notHosts other"),
    pytest.param(PolicyOperation(paths=("/reviews/1",)), {"target": "/reviews/1"}, True, id="paths exact"),
    pytest.param(
        PolicyOperation(paths=("/reviews/1",)), {"target": "/reviews/1?x=y"}, True, id="paths no query"
    ),
    pytest.param(PolicyOperation(paths=("/reviews/1",)), {"target": "/Reviews/1"}, False, id="paths case"),
    pytest.param(PolicyOperation(paths=("/reviews/*",)), {"target": "/reviews/1"}, True, id="paths prefix"),
    pytest.param(
        PolicyOperation(paths=("/reviews/*",)), {"target": "/reviews"}, False, id="paths prefix short"
    ),
    pytest.param(PolicyOperation(paths=("*/edit",)), {"target": "/reviews/1/edit"}, True, id="paths suffix"),
    pytest.param(PolicyOperation(paths=("*",)), {"target": "/x"}, True, id="paths presence"),
    pytest.param(PolicyOperation(paths=("/reviews/{*}",)), {"target": "/reviews/1"}, True, id="template one"),
    pytest.param(
        PolicyOperation(paths=("/reviews/{*}",)), {"target": "/reviews/1/2"}, False, id="template one deep"
    ),
    pytest.param(
        PolicyOperation(paths=("/reviews/{*}",)), {"target": "/reviews/"}, False, id="template one empty"
    ),
    pytest.param(
        PolicyOperation(paths=("/reviews/{**}",)), {"target": "/reviews/1/2"}, True, id="template many"
    ),
    pytest.param(
        PolicyOperation(paths=("/reviews/{**}",)), {"target": "/reviews/"}, True, id="template many zero"
    ),
    pytest.param(
        PolicyOperation(paths=("/reviews/{**}",)), {"target": "/reviews"}, False, id="template many bare"
    ),
    pytest.param(
        PolicyOperation(paths=("/{*}/1/{**}",)), {"target": "/reviews/1/x/y"}, True, id="template mixed"
    ),
    pytest.param(
        PolicyOperation(paths=("/reviews/{*}/edit",)),
        {"target": "/reviews/1/edit"},
        True,
        id="template inner",
    ),
    pytest.param(
        PolicyOperation(paths=("/reviews/{*}/edit",)),
        {"target": "/reviews/1/view"},
        False,
        id="template literal",
    ),
    pytest.param(PolicyOperation(not_paths=("/admin",)), {"target": "/admin"}, False, id="notPaths listed"),
    pytest.param(
        PolicyOperation(not_paths=("/admin",)), {"target": "//admin"}, False, id="notPaths normalized"
    ),
    pytest.param(
        PolicyOperation(not_paths=("/admin*",)), {"target": "/a/../admin/x"}, False, id="notPaths prefix"
    ),
    pytest.param(PolicyOperation(not_paths=("/admin",)), {"target": "/public"}, True, id="notPaths other"),
]


def _when(key: str, values: tuple[str, ...] = (), not_values: tuple[str, ...] = ()) -> PolicyCondition:
    return PolicyCondition(key=key, values=values, not_values=not_values)


ALICE = {"headers": [("x-user", "alice")]}
CONDITION_CASES = [
    pytest.param(_when("request.headers[x-user]", ("alice",)), ALICE, True, id="header value"),
    pytest.param(_when("request.headers[x-user]", ("ali*",)), ALICE, True, id="header prefix"),
    pytest.param(_when("request.headers[x-user]", ("bob",)), ALICE, False, id="header other value"),
    pytest.param(_when("request.headers[x-user]", ("*",)), {}, False, id="header presence absent"),
    pytest.param(
        _when("request.headers[X-User]", ("alice",)), ALICE, True, id="header name case-insensitive"
    ),
    pytest.param(
        _when("request.headers[x-user]", ("alice",)),
        {"headers": [("x-user", " alice\t")]},
        True,
        id="header value whitespace",
    ),
    pytest.param(
        _when("request.headers[x-user]", not_values=("alice",)), ALICE, False, id="header notValues"
    ),
    pytest.param(
        _when("request.headers[x-user]", not_values=("bob",)), ALICE, True, id="header notValues other"
    ),
    pytest.param(
        _when("request.headers[x-user]", not_values=("bob",)), {}, True, id="header notValues absent"
    ),
    pytest.param(
        _when("request.headers[host]", ("reviews.default.svc.cluster.local:80",)), {}, True, id="header host"
    ),
    pytest.param(_when("source.ip", ("10.1.0.0/16",)), {}, True, id="source.ip"),
    pytest.param(_when("source.ip", not_values=("10.1.0.5",)), {}, False, id="source.ip notValues"),
    pytest.param(_when("source.namespace", ("default",)), {}, True, id="source.namespace"),
    pytest.param(_when("source.namespace", ("other",)), {}, False, id="source.namespace other"),
    pytest.param(_when("source.principal", (PP,)), {}, True, id="source.principal"),
    pytest.param(_when("source.principal", not_values=(PP,)), {}, False, id="source.principal notValues"),
    pytest.param(_when("source.serviceAccount", ("default/bookinfo-productpage",)), {}, True, id="source.sa"),
    pytest.param(_when("destination.ip", ("10.96.0.0/12",)), {}, True, id="destination.ip"),
    pytest.param(_when("destination.ip", ("10.0.0.0/16",)), {}, False, id="destination.ip other"),
    pytest.param(_when("destination.port", ("9080",)), {}, True, id="destination.port target port"),
    pytest.param(_when("destination.port", ("80",)), {}, False, id="destination.port service port"),
    pytest.param(_when("connection.sni", ("reviews",)), {}, False, id="connection.sni absent"),
    pytest.param(_when("connection.sni", not_values=("reviews",)), {}, True, id="connection.sni notValues"),
]


def _rule_for(element: PolicySource | PolicyOperation | PolicyCondition) -> PolicyRule:
    if isinstance(element, PolicySource):
        return rule(source=element)
    if isinstance(element, PolicyOperation):
        return rule(operation=element)
    return rule(when=[element])


@pytest.mark.parametrize(
    ("element", "request_args", "matches"), SOURCE_CASES + OPERATION_CASES + CONDITION_CASES
)
def test_field_as_allow(element: Any, request_args: dict[str, Any], matches: bool) -> None:
    authorizer = build(policy("allow-case", _rule_for(element)))
    assert not authorizer.diagnostics
    decision = authorizer.check(request(**request_args))
    assert decision.allowed is matches
    if matches:
        assert decision.policy == "default/allow-case"
        assert decision.reason == "allowed by ALLOW policy default/allow-case"
    else:
        assert decision.reason.startswith("no ALLOW policy matched")


@pytest.mark.parametrize(
    ("element", "request_args", "matches"), SOURCE_CASES + OPERATION_CASES + CONDITION_CASES
)
def test_field_as_deny(element: Any, request_args: dict[str, Any], matches: bool) -> None:
    decision = build(policy("deny-case", _rule_for(element), action="DENY")).check(request(**request_args))
    assert decision.allowed is not matches
    if matches:
        assert decision.policy == "default/deny-case"
        assert decision.reason == "denied by DENY policy default/deny-case"


def test_fields_of_one_source_are_anded_and_values_ored() -> None:
    source = PolicySource(principals=("cluster.local/ns/x/sa/y", PP), namespaces=("default",))
    assert build(policy("p", rule(source=source))).check(request()).allowed
    narrowed = PolicySource(principals=(PP,), namespaces=("other",))
    assert not build(policy("p", rule(source=narrowed))).check(request()).allowed


def test_sources_and_operations_are_ored_clauses_anded() -> None:
    r = rule(source=PolicySource(namespaces=("other",)), operation=PolicyOperation(methods=("GET",)))
    two_sources = PolicyRule(
        sources=(PolicySource(namespaces=("other",)), PolicySource(namespaces=("default",))),
        operations=(PolicyOperation(methods=("POST",)), PolicyOperation(methods=("GET",))),
    )
    authorizer = build(policy("p", r))
    assert not authorizer.check(request()).allowed  # the source does not match
    assert build(policy("p", two_sources)).check(request()).allowed
    assert not build(policy("p", two_sources)).check(request(method="DELETE")).allowed


def test_every_condition_must_match() -> None:
    r = rule(when=[_when("source.namespace", ("default",)), _when("request.headers[x-user]", ("alice",))])
    authorizer = build(policy("p", r))
    assert authorizer.check(request(headers=[("x-user", "alice")])).allowed
    assert not authorizer.check(request()).allowed


def test_condition_values_and_not_values_together() -> None:
    r = rule(when=[_when("source.ip", ("10.1.0.0/16",), ("10.1.0.5",))])
    authorizer = build(policy("p", r))
    assert not authorizer.check(request()).allowed
    assert authorizer.check(request(source_address="10.1.0.6:1")).allowed


# ---------------------------------------------------------------------------------------------------
# multi-valued headers (checklist item 12): DENY hits if any value matches; ALLOW needs every value


def test_duplicated_header_deny_hits_on_any_value() -> None:
    deny = policy("deny-mallory", rule(when=[_when("request.headers[x-user]", ("mallory",))]), action="DENY")
    decision = build(deny).check(request(headers=[("x-user", "alice"), ("x-user", "mallory")]))
    assert not decision.allowed
    assert decision.policy == "default/deny-mallory"


def test_duplicated_header_deny_not_values_hits_on_any_other_value() -> None:
    deny = policy(
        "only-alice", rule(when=[_when("request.headers[x-user]", not_values=("alice",))]), action="DENY"
    )
    authorizer = build(deny)
    assert authorizer.check(request(headers=[("x-user", "alice")])).allowed
    assert not authorizer.check(request(headers=[("x-user", "alice"), ("x-user", "mallory")])).allowed


def test_duplicated_header_allow_needs_every_value() -> None:
    allow = policy("alice", rule(when=[_when("request.headers[x-user]", ("alice",))]))
    authorizer = build(allow)
    assert authorizer.check(request(headers=[("x-user", "alice"), ("x-user", "alice")])).allowed
    assert not authorizer.check(request(headers=[("x-user", "alice"), ("x-user", "mallory")])).allowed


# ---------------------------------------------------------------------------------------------------
# trust domains


@pytest.mark.parametrize(
    ("pattern", "identity_td", "matches"),
    [
        pytest.param("example.org/ns/default/sa/app", "example.org", True, id="mesh trust domain"),
        pytest.param("cluster.local/ns/default/sa/app", "example.org", True, id="cluster.local means local"),
        pytest.param("old.org/ns/default/sa/app", "example.org", True, id="alias expands to mesh"),
        pytest.param("example.org/ns/default/sa/app", "old.org", True, id="mesh expands to alias"),
        pytest.param("cluster.local/ns/default/*", "old.org", True, id="prefix expanded"),
        pytest.param("other.org/ns/default/sa/app", "example.org", False, id="foreign trust domain"),
        pytest.param("example.org/ns/default/sa/app", "other.org", False, id="foreign peer"),
        pytest.param("*/ns/default/sa/app", "other.org", True, id="suffix ignores trust domain"),
    ],
)
def test_trust_domain_aliases(pattern: str, identity_td: str, matches: bool) -> None:
    authorizer = build(
        policy("p", rule(source=PolicySource(principals=(pattern,)))),
        trust_domain="example.org",
        trust_domain_aliases=("old.org",),
    )
    identity = Identity(identity_td, "default", "app")
    assert authorizer.check(request(identity=identity)).allowed is matches
    by_condition = build(
        policy("p", rule(when=[_when("source.principal", (pattern,))])),
        trust_domain="example.org",
        trust_domain_aliases=("old.org",),
    )
    assert by_condition.check(request(identity=identity)).allowed is matches


# ---------------------------------------------------------------------------------------------------
# decision order, AUDIT, dry-run, CUSTOM, invalid


def test_no_policy_allows() -> None:
    decision = build().check(request())
    assert decision.allowed and decision.policy == "" and decision.audited == ()


def test_deny_before_allow() -> None:
    allow_all = policy("allow-all", rule())
    deny_delete = policy("deny-delete", rule(operation=PolicyOperation(methods=("DELETE",))), action="DENY")
    authorizer = build(allow_all, deny_delete)
    denied = authorizer.check(request(method="DELETE"))
    assert not denied.allowed
    assert denied.policy == "default/deny-delete"
    assert denied.reason == "denied by DENY policy default/deny-delete"
    allowed = authorizer.check(request())
    assert allowed.allowed and allowed.policy == "default/allow-all"


def test_allow_policies_exist_but_none_matches() -> None:
    authorizer = build(
        policy("get-only", rule(operation=PolicyOperation(methods=("GET",)))),
        policy("head-only", rule(operation=PolicyOperation(methods=("HEAD",)))),
    )
    decision = authorizer.check(request(method="POST"))
    assert not decision.allowed
    assert decision.policy == ""
    assert decision.reason == "no ALLOW policy matched (checked default/get-only, default/head-only)"


def test_allow_without_rules_denies_everything_and_empty_rule_allows_everything() -> None:
    assert not build(policy("nothing", no_rules=True)).check(request()).allowed
    assert not build(policy("empty-list")).check(request()).allowed
    assert build(policy("everything", rule())).check(request()).allowed


def test_deny_without_rules_never_matches() -> None:
    assert build(policy("deny-nothing", action="DENY")).check(request()).allowed


def test_audit_is_recorded_and_never_decides() -> None:
    audit_admin = policy("audit-admin", rule(operation=PolicyOperation(paths=("/admin*",))), action="AUDIT")
    audit_all = policy("audit-all", rule(), action="AUDIT")
    deny_admin = policy("deny-admin", rule(operation=PolicyOperation(paths=("/admin",))), action="DENY")
    authorizer = build(audit_admin, audit_all, deny_admin)
    public = authorizer.check(request("/public"))
    assert public.allowed
    assert public.audited == ("default/audit-all",)
    admin = authorizer.check(request("/admin"))
    assert not admin.allowed  # denied requests are audited too
    assert admin.audited == ("default/audit-admin", "default/audit-all")
    assert build(audit_all).check(request()).allowed  # AUDIT alone is not an ALLOW policy


def test_dry_run_deny_is_reported_not_enforced() -> None:
    dry_deny = policy(
        "deny-admin", rule(operation=PolicyOperation(paths=("/admin",))), action="DENY", dry_run=True
    )
    authorizer = build(dry_deny)
    result = authorizer.evaluate(request("/admin"))
    assert result.decision.allowed
    assert result.dry_run_matches == ("default/deny-admin",)
    assert result.dry_run_allowed is False
    decision = authorizer.check(request("/admin"))
    assert decision.allowed
    assert "dry-run policies matched: default/deny-admin (would have been denied)" in decision.reason
    other = authorizer.evaluate(request("/public"))
    assert other.dry_run_matches == () and other.dry_run_allowed is True
    assert authorizer.check(request("/public")).reason == "no ALLOW policy applies"


def test_dry_run_allow_shadow_decision() -> None:
    dry_allow = policy("get-only", rule(operation=PolicyOperation(methods=("GET",))), dry_run=True)
    authorizer = build(dry_allow)
    post = authorizer.evaluate(request(method="POST"))
    assert post.decision.allowed  # a dry-run ALLOW is not an ALLOW policy for the real decision
    assert post.dry_run_matches == () and post.dry_run_allowed is False
    get = authorizer.evaluate(request())
    assert get.decision.allowed and get.dry_run_matches == ("default/get-only",) and get.dry_run_allowed
    # With an enforced ALLOW that does not match, a matching dry-run ALLOW would have allowed.
    enforced = build(dry_allow, policy("head-only", rule(operation=PolicyOperation(methods=("HEAD",)))))
    result = enforced.evaluate(request())
    assert not result.decision.allowed and result.dry_run_allowed


def test_custom_denies_what_it_would_send_to_the_external_authorizer() -> None:
    custom = policy(
        "ext-authz-admin",
        rule(operation=PolicyOperation(paths=("/admin*",))),
        action="CUSTOM",
        provider="my-ext-authz",
    )
    authorizer = build(custom, policy("allow-all", rule()))
    decision = authorizer.check(request("/admin/users"))
    assert not decision.allowed
    assert decision.policy == "default/ext-authz-admin"
    assert decision.reason.startswith("denied by CUSTOM policy default/ext-authz-admin")
    assert "my-ext-authz" in decision.reason
    assert authorizer.check(request("/public")).allowed
    [warning] = authorizer.diagnostics
    assert warning.severity is Severity.WARNING and warning.field == "spec.action"
    assert "CUSTOM" in warning.message


def test_custom_comes_before_deny() -> None:
    custom = policy("custom", rule(), action="CUSTOM", provider="p")
    deny = policy("aaa-deny", rule(), action="DENY")
    assert build(custom, deny).check(request()).policy == "default/custom"


def test_invalid_policy_denies_its_scope_only() -> None:
    broken = policy("broken", action="DENY", no_rules=True, invalid=True, targets=[service_ref("reviews")])
    authorizer = build(broken, policy("allow-all", rule()))
    decision = authorizer.check(request())
    assert not decision.allowed
    assert decision.policy == "default/broken"
    assert decision.reason.startswith("denied by invalid policy default/broken")
    assert authorizer.check(request(service=RATINGS)).allowed
    assert any("invalid policy" in d.message for d in authorizer.diagnostics)


def test_invalid_dry_run_policy_is_reported_not_enforced() -> None:
    broken = policy("broken", action="DENY", no_rules=True, invalid=True, dry_run=True)
    result = build(broken).evaluate(request())
    assert result.decision.allowed
    assert result.dry_run_matches == ("default/broken",) and not result.dry_run_allowed


def test_unknown_action_is_invalid() -> None:
    authorizer = build(policy("weird", rule(), action="LOG"))
    decision = authorizer.check(request())
    assert not decision.allowed and "unknown action 'LOG'" in decision.reason
    assert authorizer.diagnostics[0].field == "spec.action"


# ---------------------------------------------------------------------------------------------------
# fail closed: what the waypoint cannot evaluate

UNEVALUABLE = [
    pytest.param(
        rule(source=PolicySource(request_principals=("*",))), "requestPrincipals", id="requestPrincipals"
    ),
    pytest.param(
        rule(source=PolicySource(not_request_principals=("a/b",))),
        "notRequestPrincipals",
        id="notRequestPrincipals",
    ),
    pytest.param(
        rule(source=PolicySource(remote_ip_blocks=("1.2.3.4",))), "remoteIpBlocks", id="remoteIpBlocks"
    ),
    pytest.param(
        rule(source=PolicySource(not_remote_ip_blocks=("1.2.3.4",))),
        "notRemoteIpBlocks",
        id="notRemoteIpBlocks",
    ),
    pytest.param(
        rule(when=[_when("request.auth.claims[iss]", ("x",))]), "request.auth", id="request.auth.claims"
    ),
    pytest.param(
        rule(when=[_when("request.auth.principal", ("x",))]), "request.auth", id="request.auth.principal"
    ),
    pytest.param(rule(when=[_when("remote.ip", ("1.2.3.4",))]), "remote.ip", id="remote.ip"),
    pytest.param(
        rule(when=[_when("experimental.envoy.filters.a[b]", ("x",))]), "experimental", id="experimental"
    ),
    pytest.param(rule(when=[_when("no.such.key", ("x",))]), "unknown condition key", id="unknown key"),
    pytest.param(rule(when=[_when("source.ip")]), "neither values nor notValues", id="empty condition"),
    pytest.param(rule(source=PolicySource(ip_blocks=("not-an-ip",))), "not an IP", id="bad ipBlock"),
    pytest.param(
        rule(when=[_when("destination.ip", ("10.0.0.0/33",))]), "not an IP", id="bad destination.ip"
    ),
    pytest.param(rule(operation=PolicyOperation(ports=("http",))), "not a port", id="bad port"),
    pytest.param(rule(when=[_when("destination.port", ("0",))]), "not a port", id="port zero"),
    pytest.param(
        rule(source=PolicySource(service_accounts=("a/b/c",))), "service account", id="bad serviceAccount"
    ),
    pytest.param(
        rule(operation=PolicyOperation(paths=("/a/{**}/{*}",))), "last operator", id="template order"
    ),
    pytest.param(rule(operation=PolicyOperation(paths=("/a/{*}.txt",))), "whole {*}", id="template partial"),
    pytest.param(rule(operation=PolicyOperation(paths=("/a//{*}",))), "empty segment", id="template slashes"),
    pytest.param(rule(operation=PolicyOperation(paths=("a/{*}",))), "start with '/'", id="template relative"),
]


@pytest.mark.parametrize(("bad_rule", "message"), UNEVALUABLE)
def test_unevaluable_allow_rule_never_matches(bad_rule: PolicyRule, message: str) -> None:
    authorizer = build(policy("allow", bad_rule))
    assert not authorizer.check(request()).allowed
    [warning] = authorizer.diagnostics
    assert message in warning.message
    assert "never matches" in warning.message
    assert warning.field.startswith("spec.rules[0].")
    assert warning.key is not None and warning.key.name == "allow"


def test_unevaluable_field_sinks_the_whole_allow_rule() -> None:
    mixed = PolicyRule(
        sources=(PolicySource(request_principals=("*",)), PolicySource(namespaces=("default",)))
    )
    authorizer = build(policy("allow", mixed))
    assert not authorizer.check(request()).allowed
    good_rule = rule(source=PolicySource(namespaces=("default",)))
    assert build(policy("allow", mixed, good_rule)).check(request()).allowed  # other rules still count


@pytest.mark.parametrize(("bad_rule", "message"), UNEVALUABLE)
def test_unevaluable_field_counts_as_matched_in_deny(bad_rule: PolicyRule, message: str) -> None:
    # The unevaluable field is satisfied, the rest of the rule still applies: add a clause that only
    # some requests match and check that exactly those are denied.
    if bad_rule.operations:
        narrowed = replace(bad_rule, conditions=(_when("source.namespace", ("x",)),))
        denied, spared = request("/admin", identity=Identity("cluster.local", "x", "y")), request("/admin")
    else:
        narrowed = replace(bad_rule, operations=(PolicyOperation(paths=("/admin",)),))
        denied, spared = request("/admin"), request("/public")
    authorizer = build(policy("deny", narrowed, action="DENY"))
    decision = authorizer.check(denied)
    assert not decision.allowed and decision.policy == "default/deny"
    assert authorizer.check(spared).allowed
    [warning] = authorizer.diagnostics
    assert message in warning.message and "counts as matched" in warning.message


def test_unknown_request_values_fail_closed() -> None:
    allow_ip = build(policy("allow", rule(source=PolicySource(ip_blocks=("10.0.0.0/8",)))))
    assert not allow_ip.check(request(source_address="not-an-address")).allowed
    allow_not_ip = build(policy("allow", rule(source=PolicySource(not_ip_blocks=("192.168.0.0/16",)))))
    assert not allow_not_ip.check(request(source_address="not-an-address")).allowed
    deny_not_ip = build(
        policy("deny", rule(source=PolicySource(not_ip_blocks=("10.0.0.0/8",))), action="DENY")
    )
    assert not deny_not_ip.check(request(source_address="")).allowed
    deny_dst = build(policy("deny", rule(when=[_when("destination.ip", ("192.168.0.0/16",))]), action="DENY"))
    assert not deny_dst.check(request(destination_ip="")).allowed
    assert deny_dst.check(request()).allowed


def test_path_template_character_class_depends_on_the_action() -> None:
    # Envoy's {*} excludes '*'; a DENY matches it anyway, an ALLOW does not.
    deny = build(policy("deny", rule(operation=PolicyOperation(paths=("/files/{*}",))), action="DENY"))
    assert not deny.check(request("/files/a*b")).allowed
    allow = build(policy("allow", rule(operation=PolicyOperation(paths=("/files/{*}",)))))
    assert not allow.check(request("/files/a*b")).allowed
    assert allow.check(request("/files/ab")).allowed


# ---------------------------------------------------------------------------------------------------
# which policies apply


GATEWAY_CLASS_REF = PolicyTargetRef(
    kind="GatewayClass", name="istio-waypoint", group="gateway.networking.k8s.io"
)


@pytest.mark.parametrize(
    ("targets", "namespace", "reviews", "ratings"),
    [
        pytest.param([GATEWAY_REF], "default", True, True, id="this waypoint"),
        pytest.param([service_ref("reviews")], "default", True, False, id="Service reviews"),
        pytest.param(
            [PolicyTargetRef(kind="Service", name="reviews", group="core")],
            "default",
            True,
            False,
            id="core group",
        ),
        pytest.param(
            [service_ref("reviews"), service_ref("ratings")], "default", True, True, id="two Services"
        ),
        pytest.param([service_ref("reviews")], "other", False, False, id="Service of another namespace"),
        pytest.param(
            [PolicyTargetRef(kind="Gateway", name="other-waypoint", group="gateway.networking.k8s.io")],
            "default",
            False,
            False,
            id="another waypoint",
        ),
        pytest.param([GATEWAY_REF], "other", False, False, id="same name in another namespace"),
        pytest.param([GATEWAY_CLASS_REF], "istio-system", True, True, id="GatewayClass in root namespace"),
        pytest.param([GATEWAY_CLASS_REF], "default", False, False, id="GatewayClass elsewhere"),
        pytest.param(
            [PolicyTargetRef(kind="GatewayClass", name="istio", group="gateway.networking.k8s.io")],
            "istio-system",
            False,
            False,
            id="other GatewayClass",
        ),
        pytest.param([], "default", False, False, id="namespace-wide (ztunnel)"),
        pytest.param([], "istio-system", False, False, id="mesh-wide (ztunnel)"),
        pytest.param(
            [PolicyTargetRef(kind="Gateway", name="waypoint", group="")],
            "default",
            False,
            False,
            id="wrong group",
        ),
    ],
)
def test_scope(targets: list[PolicyTargetRef], namespace: str, reviews: bool, ratings: bool) -> None:
    deny_all = policy("deny-all", rule(), action="DENY", targets=targets, namespace=namespace)
    authorizer = build(deny_all)
    assert authorizer.check(request()).allowed is not reviews
    assert authorizer.check(request(service=RATINGS)).allowed is not ratings


def test_selector_policies_are_for_ztunnel() -> None:
    selected = policy(
        "deny-all", rule(), action="DENY", targets=[], selector=LabelSelector({"app": "reviews"})
    )
    authorizer = build(selected)
    assert authorizer.check(request()).allowed
    assert authorizer.gateway_policies == () and authorizer.service_policies == {}


def test_ignored_targets_are_reported() -> None:
    authorizer = build(
        policy(
            "se", rule(), action="DENY", targets=[PolicyTargetRef("ServiceEntry", "x", "networking.istio.io")]
        ),
        policy("gc", rule(), action="DENY", targets=[GATEWAY_CLASS_REF]),
        policy(
            "route",
            rule(),
            action="DENY",
            targets=[PolicyTargetRef("HTTPRoute", "r", "gateway.networking.k8s.io")],
        ),
        policy(
            "xns",
            rule(),
            action="DENY",
            targets=[PolicyTargetRef("Service", "reviews", "", namespace="other")],
        ),
    )
    assert authorizer.check(request()).allowed
    messages = {d.key.name if d.key else "": d.message for d in authorizer.diagnostics}
    assert "ServiceEntry" in messages["se"]
    assert "root namespace" in messages["gc"]
    assert "unsupported target" in messages["route"]
    assert "cross-namespace" in messages["xns"]
    assert all(d.field == "spec.targetRefs[0]" for d in authorizer.diagnostics)


def test_gateway_and_service_policies_combine() -> None:
    gateway_allow = policy("gw-allow-get", rule(operation=PolicyOperation(methods=("GET",))))
    service_allow = policy(
        "reviews-allow-post",
        rule(operation=PolicyOperation(methods=("POST",))),
        targets=[service_ref("reviews")],
    )
    authorizer = build(gateway_allow, service_allow)
    assert authorizer.check(request(method="POST")).allowed  # either ALLOW may match for reviews
    assert not authorizer.check(request(method="POST", service=RATINGS)).allowed
    assert authorizer.policies_for("default", "reviews") == (
        "default/gw-allow-get",
        "default/reviews-allow-post",
    )
    assert authorizer.policies_for("default", "ratings") == ("default/gw-allow-get",)
    assert authorizer.gateway_policies == ("default/gw-allow-get",)
    assert authorizer.service_policies == {
        ("default", "reviews"): ("default/gw-allow-get", "default/reviews-allow-post")
    }


# ---------------------------------------------------------------------------------------------------
# TCP services


TCP_SERVICE = ServiceRef("default", "db", "db.default.svc.cluster.local", 5432, 5432, AppProtocol.TCP)


def test_tcp_allow_rule_with_http_attributes_never_matches() -> None:
    http_rule = rule(
        source=PolicySource(namespaces=("default",)), operation=PolicyOperation(methods=("GET",))
    )
    l4_rule = rule(operation=PolicyOperation(ports=("5432",)))
    peer = Peer(PRODUCTPAGE, "10.1.0.5:1234")
    assert not build(policy("allow", http_rule)).check_connection(peer, TCP_SERVICE, "10.96.0.20").allowed
    decision = build(policy("allow", http_rule, l4_rule)).check_connection(peer, TCP_SERVICE, "10.96.0.20")
    assert decision.allowed and decision.policy == "default/allow"


def test_tcp_deny_ignores_http_attributes() -> None:
    deny = policy(
        "deny",
        rule(source=PolicySource(namespaces=("default",)), operation=PolicyOperation(paths=("/admin",))),
        action="DENY",
    )
    authorizer = build(deny)
    assert not authorizer.check_connection(Peer(PRODUCTPAGE, "10.1.0.5:1"), TCP_SERVICE).allowed
    other = Peer(Identity("cluster.local", "other", "x"), "10.1.0.5:1")
    assert authorizer.check_connection(other, TCP_SERVICE).allowed
    # Over HTTP the path still counts.
    assert authorizer.check(request("/public")).allowed


def test_tcp_sni_is_unknown() -> None:
    peer = Peer(PRODUCTPAGE, "10.1.0.5:1")
    deny = build(policy("deny", rule(when=[_when("connection.sni", ("db",))]), action="DENY"))
    assert not deny.check_connection(peer, TCP_SERVICE).allowed
    assert deny.check(request()).allowed
    allow = build(policy("allow", rule(when=[_when("connection.sni", not_values=("db",))])))
    assert not allow.check_connection(peer, TCP_SERVICE).allowed


# ---------------------------------------------------------------------------------------------------
# the Istio sample and the path-normalization matrix


def _sample_authorizer() -> WaypointAuthorizer:
    loaded = load_paths([SAMPLES / "l7-policy.yaml"])
    assert not loaded.errors
    policies = [o for o in loaded.objects if isinstance(o, AuthorizationPolicy)]
    assert [p.name for p in policies] == ["reviews-get-only"]
    authorizer = WaypointAuthorizer.build(policies, waypoint=WAYPOINT)
    assert not authorizer.diagnostics
    return authorizer


@pytest.mark.parametrize(
    ("target", "method", "identity", "service", "allowed"),
    [
        pytest.param("/reviews/0", "GET", PRODUCTPAGE, REVIEWS, True, id="GET from productpage"),
        pytest.param("/reviews/0?x=1", "GET", PRODUCTPAGE, REVIEWS, True, id="with query"),
        pytest.param("/reviews/0", "POST", PRODUCTPAGE, REVIEWS, False, id="POST"),
        pytest.param("/reviews/0", "DELETE", PRODUCTPAGE, REVIEWS, False, id="DELETE"),
        pytest.param(
            "/reviews/0",
            "GET",
            Identity("cluster.local", "default", "ratings"),
            REVIEWS,
            False,
            id="other SA",
        ),
        pytest.param(
            "/reviews/0",
            "GET",
            Identity("cluster.local", "other", "bookinfo-productpage"),
            REVIEWS,
            False,
            id="other ns",
        ),
        pytest.param("/reviews/0", "GET", None, REVIEWS, False, id="no identity"),
        pytest.param("/ratings/0", "GET", PRODUCTPAGE, REVIEWS, False, id="other path"),
        pytest.param("/reviews/../admin", "GET", PRODUCTPAGE, REVIEWS, False, id="dot-dot out of /reviews"),
        pytest.param("/reviews", "GET", PRODUCTPAGE, REVIEWS, False, id="prefix needs the slash"),
        pytest.param(
            "/ratings/0", "POST", Identity("cluster.local", "default", "x"), RATINGS, True, id="other Service"
        ),
    ],
)
def test_sample_l7_policy(
    target: str, method: str, identity: Identity | None, service: ServiceRef, allowed: bool
) -> None:
    """The sample's comment: "Enforced by the waypoint in front of the reviews service: GET only, from
    productpage." Other Services behind the same waypoint are not affected."""
    decision = _sample_authorizer().check(request(target, method=method, identity=identity, service=service))
    assert decision.allowed is allowed
    if service is REVIEWS and not allowed:
        assert decision.reason == "no ALLOW policy matched (checked default/reviews-get-only)"


BYPASS_CORPUS = [
    "/admin",
    "//admin",
    "/./admin",
    "/a/../admin",
    "/%2e%2e/admin",
    "/%2E%2E/admin",
    "/x/.%2e/admin",
    "/x%2F..%2Fadmin",
    "/%5Cadmin",
    "\\admin",
    "/admin#x",
    "/admin?x",
    "/admin/",
    "/admin%00",
    "/admin;x",
    "/admin%2f",
    "/%c0%ae%c0%ae/admin",
    "/%61dmin",
    "http://reviews/admin",
]


@pytest.mark.parametrize("target", BYPASS_CORPUS)
def test_normalized_bypass_attempts_are_denied_or_refused(target: str) -> None:
    """Checklist item 11: DENY /admin plus ALLOW notPaths /admin*; every spelling is refused (400) or
    denied, and what authorization saw is what the backend receives."""
    authorizer = build(
        policy("deny-admin", rule(operation=PolicyOperation(paths=("/admin", "/admin/*"))), action="DENY"),
        policy("allow-not-admin", rule(operation=PolicyOperation(not_paths=("/admin*",)))),
    )
    normalized = normalize_path(target)
    if isinstance(normalized, PathError):
        assert normalized.status == 400
        return
    view = request(target)
    assert view.path == normalized.path  # the backend gets normalized.target
    decision = authorizer.check(view)
    assert not decision.allowed
    assert decision.policy == "default/deny-admin"


def test_case_is_significant() -> None:
    """Paths are case-sensitive: a DENY on /admin does not cover /ADMIN (list both for backends that
    fold case); the ALLOW notPaths policy does not cover it either, so it is allowed."""
    deny = build(policy("deny-admin", rule(operation=PolicyOperation(paths=("/admin",))), action="DENY"))
    assert deny.check(request("/ADMIN")).allowed
    both = build(
        policy("deny-admin", rule(operation=PolicyOperation(paths=("/admin", "/ADMIN"))), action="DENY")
    )
    assert not both.check(request("/ADMIN")).allowed
