"""A reference L4 authorization evaluator, written from Istio's AuthorizationPolicy specification.

It works on the model objects (what the user wrote), not on compiled protos, and shares no code with
the compiler (`controller.translate.policy`) or the evaluator (`loom.policy.rbac`); the property test
checks that translate -> rbac.decide agrees with it on every connection.

Specification, as the Istio API documents it:

* Applicability: a policy with targetRefs is for waypoints (never the node proxy). A policy without
  selector applies to every workload of its namespace, or of the mesh when it is in the root namespace.
  A selector policy applies to the workloads of its namespace whose labels match -- and, in the root
  namespace, to matching workloads of every namespace.
* Decision: CUSTOM, then DENY, then ALLOW. Any matching DENY denies; with no ALLOW policy the request is
  allowed; otherwise it is allowed only if some ALLOW policy matches. A dry-run policy is evaluated and
  reported but never changes the decision. AUDIT never affects the decision.
* A policy matches if any rule matches. A policy with no rules (absent or empty) matches nothing.
* A rule matches if all of: any of its `from` sources matches (no `from`: any source), any of its `to`
  operations matches (no `to`: any operation), and every `when` condition matches.
* A source/operation matches if every field it sets matches. A field matches if any of its values
  matches the attribute; a not-field matches if none of its values match it. A source with no field
  set matches any source.
* Attributes of an L4 connection: source.principal "<td>/ns/<ns>/sa/<sa>" and source.namespace from the
  peer certificate, absent for plaintext (an absent attribute matches no value, so a not-field is then
  satisfied); source.serviceAccount "<ns>/<sa>"; source.ip; destination.ip; destination.port.
* Values: "*" matches any present value, "*abc" a suffix, "abc*" a prefix, anything else exactly.
  Principals are written without "spiffe://" (a value carrying it is compared without it).
  serviceAccounts are "ns/sa" or "sa" (meaning the policy's namespace). ipBlocks are CIDRs or single
  addresses. Ports are decimal numbers 1-65535.

loom's fail-closed rules for what L4 cannot enforce (hardening checklist item 31), encoded here as the
specification of loom's node proxy:

* Unenforceable attributes: the L7 fields (hosts, methods, paths, requestPrincipals, remoteIpBlocks and
  their not-forms), `when` keys other than the six L4 ones, a value that is not a valid IP block / port /
  service account of the field's kind, and a condition with neither values nor notValues.
* In an ALLOW policy a rule with any unenforceable attribute never matches.
* In a DENY policy an unenforceable attribute counts as satisfied (it is removed: the rule denies more).
* AUDIT without targetRefs is not enforced at all; CUSTOM (or an unknown action) without targetRefs
  denies every connection it applies to.

IPv4-mapped IPv6 addresses are the IPv4 address they map (loom's documented choice).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from loom.resources.model import (
    AuthorizationPolicy,
    Pod,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
)

L4_KEYS = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
)


@dataclass(frozen=True)
class PeerIdentity:
    trust_domain: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class RefConnection:
    identity: PeerIdentity | None
    source_ip: str
    destination_ip: str
    destination_port: int


@dataclass(frozen=True)
class RefDecision:
    allowed: bool
    dry_run_matches: frozenset[str]
    # The decision had the dry-run policies been enforced as well.
    dry_run_allowed: bool


# --- value semantics --------------------------------------------------------------------------------


def _pattern_matches(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _principal_pattern(pattern: str) -> str:
    return pattern[len("spiffe://") :] if pattern.startswith("spiffe://") else pattern


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _block(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if "%" in text:
        return None
    try:
        block = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(block, ipaddress.IPv6Network) and block.prefixlen >= 96:
        mapped = block.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{block.prefixlen - 96}", strict=False)
    return block


def _port(text: str) -> int | None:
    if not text or not all("0" <= c <= "9" for c in text):
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None


def _service_account(text: str, policy_namespace: str) -> tuple[str, str] | None:
    if text.count("/") == 0:
        return (policy_namespace, text) if text else None
    if text.count("/") == 1:
        ns, sa = text.split("/")
        return (ns, sa) if ns and sa else None
    return None


class _Unenforceable(Exception):
    """An attribute the node proxy cannot evaluate (see the module docstring)."""


class _Attributes:
    """The attributes of one connection, per the specification."""

    def __init__(self, conn: RefConnection, policy_namespace: str) -> None:
        self.conn = conn
        self.policy_namespace = policy_namespace
        peer = conn.identity
        self.principal = (
            None if peer is None else f"{peer.trust_domain}/ns/{peer.namespace}/sa/{peer.service_account}"
        )
        self.namespace = None if peer is None else peer.namespace
        self.service_account = None if peer is None else (peer.namespace, peer.service_account)

    # Each `*_value_matches` says whether one written value matches; raises _Unenforceable for an
    # invalid value.
    def principal_matches(self, value: str) -> bool:
        return _pattern_matches(_principal_pattern(value), self.principal)

    def namespace_matches(self, value: str) -> bool:
        return _pattern_matches(value, self.namespace)

    def service_account_matches(self, value: str) -> bool:
        parsed = _service_account(value, self.policy_namespace)
        if parsed is None:
            raise _Unenforceable(value)
        return self.service_account == parsed

    def source_ip_matches(self, value: str) -> bool:
        block = _block(value)
        if block is None:
            raise _Unenforceable(value)
        return _address(self.conn.source_ip) in block

    def destination_ip_matches(self, value: str) -> bool:
        block = _block(value)
        if block is None:
            raise _Unenforceable(value)
        return _address(self.conn.destination_ip) in block

    def port_matches(self, value: str) -> bool:
        port = _port(value)
        if port is None:
            raise _Unenforceable(value)
        return self.conn.destination_port == port


# --- rule evaluation ---------------------------------------------------------------------------------


class _Evaluator:
    def __init__(self, attributes: _Attributes, deny: bool) -> None:
        self.attributes = attributes
        # In a DENY an unenforceable attribute is satisfied; in an ALLOW it makes the rule fail.
        self.deny = deny
        self.unenforceable_seen = False

    def _field(self, values: Sequence[str], test: Callable[[str], bool], negated: bool) -> bool:
        """A field (or not-field) with these values; an unset field (no values) matches."""
        if not values:
            return True
        try:
            hits = [test(v) for v in values]  # every value is checked, so an invalid one is noticed
        except _Unenforceable:
            self.unenforceable_seen = True
            return True
        return not any(hits) if negated else any(hits)

    def _l7(self, values: Sequence[str]) -> bool:
        if values:
            self.unenforceable_seen = True
        return True

    def source(self, s: PolicySource) -> bool:
        a = self.attributes
        results = [
            self._field(s.principals, a.principal_matches, False),
            self._field(s.not_principals, a.principal_matches, True),
            self._field(s.namespaces, a.namespace_matches, False),
            self._field(s.not_namespaces, a.namespace_matches, True),
            self._field(s.service_accounts, a.service_account_matches, False),
            self._field(s.not_service_accounts, a.service_account_matches, True),
            self._field(s.ip_blocks, a.source_ip_matches, False),
            self._field(s.not_ip_blocks, a.source_ip_matches, True),
            self._l7(s.request_principals),
            self._l7(s.not_request_principals),
            self._l7(s.remote_ip_blocks),
            self._l7(s.not_remote_ip_blocks),
        ]
        return all(results)

    def operation(self, o: PolicyOperation) -> bool:
        a = self.attributes
        results = [
            self._field(o.ports, a.port_matches, False),
            self._field(o.not_ports, a.port_matches, True),
            self._l7(o.hosts),
            self._l7(o.not_hosts),
            self._l7(o.methods),
            self._l7(o.not_methods),
            self._l7(o.paths),
            self._l7(o.not_paths),
        ]
        return all(results)

    def condition(self, c: PolicyCondition) -> bool:
        a = self.attributes
        tests = {
            "source.ip": a.source_ip_matches,
            "source.namespace": a.namespace_matches,
            "source.principal": a.principal_matches,
            "source.serviceAccount": a.service_account_matches,
            "destination.ip": a.destination_ip_matches,
            "destination.port": a.port_matches,
        }
        test = tests.get(c.key)
        if test is None or (not c.values and not c.not_values):
            self.unenforceable_seen = True
            return True
        return self._field(c.values, test, False) and self._field(c.not_values, test, True)

    def rule(self, rule: PolicyRule) -> bool:
        # Evaluate every part (no short-circuit) so unenforceable attributes are always noticed.
        sources = [self.source(s) for s in rule.sources]
        operations = [self.operation(o) for o in rule.operations]
        conditions = [self.condition(c) for c in rule.conditions]
        matched = (
            (not rule.sources or any(sources))
            and (not rule.operations or any(operations))
            and all(conditions)
        )
        if self.unenforceable_seen and not self.deny:
            return False
        return matched


def _policy_matches(policy: AuthorizationPolicy, conn: RefConnection, deny: bool) -> bool:
    for rule in policy.rules or ():
        evaluator = _Evaluator(_Attributes(conn, policy.namespace), deny)
        if evaluator.rule(rule):
            return True
    return False


def applies(policy: AuthorizationPolicy, pod: Pod, root_namespace: str) -> bool:
    if policy.target_refs:
        return False
    if policy.namespace not in (pod.namespace, root_namespace):
        return False
    if policy.selector is None:
        return True
    labels: Mapping[str, str] = pod.meta.labels
    return all(labels.get(k) == v for k, v in policy.selector.match_labels.items())


def reference_decide(
    policies: Iterable[AuthorizationPolicy], pod: Pod, conn: RefConnection, root_namespace: str
) -> RefDecision:
    # (action is DENY, matched, dry-run, key) for every policy the node proxy enforces on this pod.
    verdicts: list[tuple[bool, bool, bool, str]] = []
    for policy in policies:
        if not applies(policy, pod, root_namespace):
            continue
        action = policy.action or "ALLOW"
        if action == "AUDIT":
            continue
        if action in ("ALLOW", "DENY"):
            is_deny = action == "DENY"
            matched = _policy_matches(policy, conn, deny=is_deny)
        else:
            is_deny, matched = True, True  # CUSTOM / unknown: a DENY of everything in scope
        verdicts.append((is_deny, matched, policy.dry_run, f"{policy.namespace}/{policy.name}"))

    def outcome(considered: list[tuple[bool, bool, bool, str]]) -> bool:
        if any(is_deny and matched for is_deny, matched, _, _ in considered):
            return False
        allows = [matched for is_deny, matched, _, _ in considered if not is_deny]
        return not allows or any(allows)

    enforced = [v for v in verdicts if not v[2]]
    return RefDecision(
        allowed=outcome(enforced),
        dry_run_matches=frozenset(key for _, matched, dry_run, key in verdicts if dry_run and matched),
        dry_run_allowed=outcome(verdicts),
    )
