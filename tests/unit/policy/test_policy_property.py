"""Hardening checklist item 13: the compiled L4 policy agrees with a reference evaluator written from
the AuthorizationPolicy specification, for generated policies and connections.

The path under test is the real one: model objects -> `translate` (scope, selection, compilation,
fail-closed handling of L7 and invalid values) -> `applicable_policies` on the translated Workload ->
`compile_authorization` -> `decide`; and the same through `PolicyEvaluator`. The reference
(`reference_evaluator.py`) reads the model objects directly.

The value pools are chosen so matches are frequent and the classic mistakes show: wildcard principals
("*/ns/x/sa/y", "cluster.local/ns/x/*"), names with dots against names where the dot is another
character (my.sa / myXsa, a regex-based matcher confuses them), "ns/sa" against "sa" service accounts,
IPv6 and IPv4-mapped addresses, host bits in CIDRs, and invalid values next to valid ones.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controller.translate import MeshConfig, translate
from loom.identity import Identity
from loom.policy.rbac import Connection, PolicyEvaluator, applicable_policies, compile_authorization, decide
from loom.resources.diagnostics import Severity
from loom.resources.model import (
    AuthorizationPolicy,
    ConfigSnapshot,
    LabelSelector,
    Namespace,
    ObjectMeta,
    Pod,
    PodTemplate,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)

from .reference_evaluator import PeerIdentity, RefConnection, reference_decide

ROOT = "istio-system"
POD_NAMESPACE = "x"
MESH = MeshConfig(root_namespace=ROOT)
TARGET = Pod(
    meta=ObjectMeta(name="target", namespace=POD_NAMESPACE, labels={"app": "a", "version": "v1"}),
    spec=PodTemplate(service_account="target-sa"),
    ips=("10.0.0.9",),
)
NAMESPACES = [Namespace(meta=ObjectMeta(name=n, namespace="")) for n in (POD_NAMESPACE, ROOT, "other")]

IDENTITIES = [
    None,
    PeerIdentity("cluster.local", "x", "y"),
    PeerIdentity("cluster.local", "my.ns", "my.sa"),
    PeerIdentity("cluster.local", "myXns", "myXsa"),
    PeerIdentity("cluster.local", "my.ns", "myXsa"),
    PeerIdentity("cluster.local", "x", "my.sa"),
    PeerIdentity("other.domain", "x", "y"),
    PeerIdentity("cluster.local", "default", "default"),
]
PRINCIPALS = [
    f"{i.trust_domain}/ns/{i.namespace}/sa/{i.service_account}" for i in IDENTITIES if i is not None
] + ["cluster.local/ns/istio-system/sa/ztunnel"]
NAMESPACE_VALUES = ["x", "my.ns", "myXns", "default", "other", "istio-system"]
SERVICE_ACCOUNT_VALUES = [
    "y",
    "my.sa",
    "myXsa",
    "default",
    "x/y",
    "my.ns/my.sa",
    "myXns/myXsa",
    "x/my.sa",
    "default/default",
    "a/b/c",  # invalid
    "/y",  # invalid
]
IP_BLOCKS = [
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.1.0/24",
    "10.0.0.1",
    "10.0.0.9",
    "10.0.0.1/8",  # host bits set
    "192.168.0.0/16",
    "0.0.0.0/0",
    "fd00::/16",
    "fd00:1::/32",
    "fd00::1",
    "::/0",
    "::ffff:10.0.0.0/104",  # IPv4-mapped form of 10.0.0.0/8
    "10.0.0.300",  # invalid
    "10.0.0.0/33",  # invalid
    "garbage",  # invalid
    "fe80::1%eth0",  # invalid (zone)
]
PORT_VALUES = ["80", "8080", "9080", "443", "0", "70000", "http"]  # the last three are invalid
SOURCE_IPS = ["10.0.0.1", "10.0.1.5", "10.1.0.1", "192.168.1.1", "fd00::1", "fd00:1::5", "::ffff:10.0.0.7"]
DESTINATION_IPS = ["10.0.0.9", "fd00::9", "::ffff:10.0.0.9"]
PORTS = [80, 8080, 9080, 443]
L7_WHEN_KEYS = ["request.headers[x-user]", "request.auth.claims[iss]", "remote.ip", "connection.sni"]


@st.composite
def wildcarded(draw: st.DrawFn, concrete: list[str], *, principal: bool = False) -> str:
    """A value from `concrete`, used exactly or turned into a prefix, suffix or presence pattern."""
    value = draw(st.sampled_from(concrete))
    mode = draw(
        st.sampled_from(
            ["exact", "exact", "exact", "prefix", "suffix", "presence"] + (["spiffe"] if principal else [])
        )
    )
    cut = draw(st.integers(0, len(value)))
    if mode == "prefix":
        return value[:cut] + "*"
    if mode == "suffix":
        return "*" + value[cut:]
    if mode == "presence":
        return "*"
    if mode == "spiffe":
        return "spiffe://" + value
    return value


def values(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(strategy, min_size=1, max_size=2).map(tuple)


principals = wildcarded(PRINCIPALS, principal=True)
namespaces = wildcarded(NAMESPACE_VALUES)
service_accounts = st.sampled_from(SERVICE_ACCOUNT_VALUES)
ip_blocks = st.sampled_from(IP_BLOCKS)
ports = st.sampled_from(PORT_VALUES)
l7_values = values(st.sampled_from(["GET", "/a", "example.com", "iss/sub", "1.2.3.4"]))

# Field -> values; L7 fields are listed once against several L4 ones, so they are sprinkled in.
_SOURCE_FIELDS: dict[str, st.SearchStrategy[tuple[str, ...]]] = {
    "principals": values(principals),
    "not_principals": values(principals),
    "namespaces": values(namespaces),
    "not_namespaces": values(namespaces),
    "service_accounts": values(service_accounts),
    "not_service_accounts": values(service_accounts),
    "ip_blocks": values(ip_blocks),
    "not_ip_blocks": values(ip_blocks),
}
_SOURCE_L7_FIELDS = [
    "request_principals",
    "not_request_principals",
    "remote_ip_blocks",
    "not_remote_ip_blocks",
]
_OPERATION_L7_FIELDS = ["hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"]


@st.composite
def sparse(
    draw: st.DrawFn,
    cls: type[Any],
    l4: dict[str, st.SearchStrategy[tuple[str, ...]]],
    l7: list[str],
) -> Any:
    """An instance of `cls` with zero to two fields set, like the policies people write; about one
    field in eight is an L7 one."""
    names = draw(st.lists(st.sampled_from(list(l4) * 7 + l7), min_size=1, max_size=2, unique=True))
    return cls(**{name: draw(l4[name]) if name in l4 else draw(l7_values) for name in names})


sources = sparse(PolicySource, _SOURCE_FIELDS, _SOURCE_L7_FIELDS)
operations = sparse(
    PolicyOperation, {"ports": values(ports), "not_ports": values(ports)}, _OPERATION_L7_FIELDS
)
_CONDITION_VALUES: dict[str, st.SearchStrategy[str]] = {
    "source.ip": ip_blocks,
    "destination.ip": ip_blocks,
    "source.namespace": namespaces,
    "source.principal": principals,
    "source.serviceAccount": service_accounts,
    "destination.port": ports,
}


@st.composite
def conditions(draw: st.DrawFn) -> PolicyCondition:
    key = draw(st.sampled_from(list(_CONDITION_VALUES) * 7 + L7_WHEN_KEYS))
    pool = _CONDITION_VALUES.get(key, st.just("a"))
    # values in two conditions of three, notValues in one of three, occasionally neither (invalid).
    has_values, has_not_values = draw(
        st.sampled_from([(True, False), (True, True), (False, True)] * 5 + [(False, False)])
    )
    return PolicyCondition(
        key=key,
        values=draw(values(pool)) if has_values else (),
        not_values=draw(values(pool)) if has_not_values else (),
    )


@st.composite
def rules(draw: st.DrawFn) -> PolicyRule:
    """A rule with at least one clause most of the time (a rule with none matches everything)."""
    clauses = draw(st.sampled_from(["from", "to", "when", "from+to", "from+when", "from+to+when"] * 6 + [""]))
    return PolicyRule(
        sources=tuple(draw(st.lists(sources, min_size=1, max_size=2))) if "from" in clauses else (),
        operations=(draw(operations),) if "to" in clauses else (),
        conditions=(draw(conditions()),) if "when" in clauses else (),
    )


@st.composite
def policy_drafts(draw: st.DrawFn) -> dict[str, Any]:
    target_refs: tuple[PolicyTargetRef, ...] = draw(
        st.sampled_from([(), (), (), (), (PolicyTargetRef(kind="Service", name="svc"),)])
    )
    selector = None
    if not target_refs:
        selector = draw(st.sampled_from([None, None, {"app": "a"}, {"version": "v1"}, {"app": "b"}, {}]))
    return {
        "namespace": draw(st.sampled_from([POD_NAMESPACE, POD_NAMESPACE, POD_NAMESPACE, ROOT, "other"])),
        "selector": None if selector is None else LabelSelector(match_labels=selector),
        "target_refs": target_refs,
        "action": draw(st.sampled_from(["ALLOW"] * 4 + ["DENY"] * 4 + ["AUDIT", "CUSTOM"])),
        "dry_run": draw(st.sampled_from([False, False, False, True])),
        # Mostly one to three rules; sometimes none at all (absent or empty).
        "rules": draw(st.lists(rules(), min_size=1, max_size=3).map(tuple))
        if draw(st.integers(0, 7))
        else draw(st.sampled_from([None, ()])),
    }


def build_policy(index: int, draft: dict[str, Any]) -> AuthorizationPolicy:
    annotations = {"istio.io/dry-run": "true"} if draft["dry_run"] else {}
    return AuthorizationPolicy(
        meta=ObjectMeta(name=f"p{index}", namespace=draft["namespace"], annotations=annotations),
        selector=draft["selector"],
        target_refs=draft["target_refs"],
        action=draft["action"],
        rules=draft["rules"],
    )


connections = st.builds(
    RefConnection,
    identity=st.sampled_from(IDENTITIES),
    source_ip=st.sampled_from(SOURCE_IPS),
    destination_ip=st.sampled_from(DESTINATION_IPS),
    destination_port=st.sampled_from(PORTS),
)


def to_connection(ref: RefConnection) -> Connection:
    identity = None
    if ref.identity is not None:
        identity = Identity(ref.identity.trust_domain, ref.identity.namespace, ref.identity.service_account)
    return Connection(
        identity,
        ipaddress.ip_address(ref.source_ip),
        ipaddress.ip_address(ref.destination_ip),
        ref.destination_port,
    )


def draft(action: str, *sources: PolicySource, namespace: str = POD_NAMESPACE) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "selector": None,
        "target_refs": (),
        "action": action,
        "dry_run": False,
        "rules": (PolicyRule(sources=sources),),
    }


def from_each(*identities: PeerIdentity | None) -> list[RefConnection]:
    return [RefConnection(i, "10.0.0.1", "10.0.0.9", 80) for i in identities]


LOOKALIKES = from_each(
    PeerIdentity("cluster.local", "my.ns", "my.sa"),
    PeerIdentity("cluster.local", "myXns", "myXsa"),
    PeerIdentity("cluster.local", "my.ns", "myXsa"),
    PeerIdentity("cluster.local", "x", "y"),
    PeerIdentity("other.domain", "x", "y"),
    None,
)


# The cases hardening checklist item 13 names, always run first.
@example(
    drafts=[draft("ALLOW", PolicySource(principals=("cluster.local/ns/my.ns/sa/my.sa",)))], refs=LOOKALIKES
)
@example(drafts=[draft("ALLOW", PolicySource(namespaces=("my.ns",)))], refs=LOOKALIKES)
@example(
    drafts=[draft("ALLOW", PolicySource(service_accounts=("my.sa",)), namespace="my.ns")], refs=LOOKALIKES
)
@example(drafts=[draft("ALLOW", PolicySource(service_accounts=("my.ns/my.sa",)))], refs=LOOKALIKES)
@example(drafts=[draft("DENY", PolicySource(principals=("*/ns/x/sa/y",)))], refs=LOOKALIKES)
@example(drafts=[draft("DENY", PolicySource(not_principals=("*",)))], refs=LOOKALIKES)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drafts=st.lists(policy_drafts(), min_size=1, max_size=4),
    refs=st.lists(connections, min_size=8, max_size=16),
)
def test_compiled_policy_agrees_with_reference_evaluator(
    drafts: list[dict[str, Any]], refs: list[RefConnection]
) -> None:
    policies = [build_policy(i, d) for i, d in enumerate(drafts)]
    translation = translate(ConfigSnapshot.of([*NAMESPACES, TARGET, *policies]), MESH)
    assert not [d for d in translation.diagnostics if d.severity is Severity.ERROR]
    workload = translation.addresses[f"{MESH.cluster_id}//Pod/{POD_NAMESPACE}/target"].workload
    compiled = [compile_authorization(a) for a in applicable_policies(workload, translation.authorizations)]
    evaluator = PolicyEvaluator()
    for key, authorization in translation.authorizations.items():
        assert evaluator.upsert(authorization, key) is None
    for ref in refs:
        expected = reference_decide(policies, TARGET, ref, ROOT)
        conn = to_connection(ref)
        for decision in (decide(compiled, conn), evaluator.decide(workload, conn)):
            assert decision.allowed == expected.allowed, (ref, decision, expected)
            assert frozenset(decision.dry_run_matches) == expected.dry_run_matches, (ref, decision, expected)
            assert decision.dry_run_allowed == expected.dry_run_allowed, (ref, decision, expected)
