"""A reference L7 evaluator for principals, methods and paths, written from Istio's AuthorizationPolicy
specification. It reads the model objects directly and shares no code with waypoint.authz (no compiled
closures, no regular expressions); the property test checks that the two agree.

Specification, as the Istio API documents it (and as waypoint.authz documents its choices):

* Every policy here targets the waypoint. Decision: any matching DENY denies; with no ALLOW policy the
  request is allowed; otherwise it is allowed only if some ALLOW policy matches. AUDIT policies never
  decide; the matching ones are reported. Dry-run policies never decide; the matching ones are reported.
* A policy matches if any rule matches; no rules (absent or empty) matches nothing. A rule matches if
  any `from` source matches (none: any), any `to` operation matches (none: any) and every `when`
  condition matches. Fields of one source/operation are ANDed, values ORed, a not-field matches when
  none of its values match. An absent attribute (no peer identity) matches no value.
* Values: "*" any non-empty value, "*x" suffix, "x*" prefix, otherwise exact. Principals are compared
  without "spiffe://". With a single trust domain "cluster.local" there is nothing to expand.
* Paths containing {*} or {**} are templates: {*} is one or more characters of a single segment, {**}
  any run of characters including "/", literal text matches itself. (The generated request paths use
  only characters every template character class accepts.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loom.resources.model import (
    AuthorizationPolicy,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
)


@dataclass(frozen=True)
class RefRequest:
    principal: str | None  # "<td>/ns/<ns>/sa/<sa>", None without identity
    method: str
    path: str  # normalized, no query


@dataclass(frozen=True)
class RefDecision:
    allowed: bool
    audited: frozenset[str]
    dry_run_matches: frozenset[str]


def value_matches(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _template_tokens(template: str) -> list[str]:
    """Split into literal text and the operators "{*}" / "{**}"."""
    tokens: list[str] = []
    literal = ""
    i = 0
    while i < len(template):
        if template.startswith("{**}", i):
            tokens.extend([literal, "{**}"] if literal else ["{**}"])
            literal, i = "", i + 4
        elif template.startswith("{*}", i):
            tokens.extend([literal, "{*}"] if literal else ["{*}"])
            literal, i = "", i + 3
        else:
            literal += template[i]
            i += 1
    if literal:
        tokens.append(literal)
    return tokens


def template_matches(template: str, path: str) -> bool:
    tokens = _template_tokens(template)

    def match(t: int, p: int) -> bool:
        if t == len(tokens):
            return p == len(path)
        token = tokens[t]
        if token == "{*}":
            end = p
            while end < len(path) and path[end] != "/":
                end += 1
                if match(t + 1, end):
                    return True
            return False
        if token == "{**}":
            return any(match(t + 1, end) for end in range(p, len(path) + 1))
        return path.startswith(token, p) and match(t + 1, p + len(token))

    return match(0, 0)


def path_matches(pattern: str, path: str) -> bool:
    if "{*}" in pattern or "{**}" in pattern:
        return template_matches(pattern, path)
    return value_matches(pattern, path)


def _principal_value(pattern: str) -> str:
    return pattern.removeprefix("spiffe://")


def _field(values: Sequence[str], test: object, negated: bool) -> bool:
    if not values:
        return True
    assert callable(test)
    hits = [bool(test(v)) for v in values]
    return not any(hits) if negated else any(hits)


def _source(s: PolicySource, r: RefRequest) -> bool:
    def principal(v: str) -> bool:
        return value_matches(_principal_value(v), r.principal)

    return _field(s.principals, principal, False) and _field(s.not_principals, principal, True)


def _operation(o: PolicyOperation, r: RefRequest) -> bool:
    def method(v: str) -> bool:
        return value_matches(v, r.method)

    def path(v: str) -> bool:
        return path_matches(v, r.path)

    return (
        _field(o.methods, method, False)
        and _field(o.not_methods, method, True)
        and _field(o.paths, path, False)
        and _field(o.not_paths, path, True)
    )


def _condition(c: PolicyCondition, r: RefRequest) -> bool:
    assert c.key == "source.principal"

    def principal(v: str) -> bool:
        return value_matches(_principal_value(v), r.principal)

    return _field(c.values, principal, False) and _field(c.not_values, principal, True)


def _rule(rule: PolicyRule, r: RefRequest) -> bool:
    return (
        (not rule.sources or any(_source(s, r) for s in rule.sources))
        and (not rule.operations or any(_operation(o, r) for o in rule.operations))
        and all(_condition(c, r) for c in rule.conditions)
    )


def policy_matches(policy: AuthorizationPolicy, r: RefRequest) -> bool:
    return any(_rule(rule, r) for rule in policy.rules or ())


def reference_decide(policies: Sequence[AuthorizationPolicy], r: RefRequest) -> RefDecision:
    key = {id(p): f"{p.namespace}/{p.name}" for p in policies}
    enforced = [p for p in policies if not p.dry_run]
    denied = any(p.action == "DENY" and policy_matches(p, r) for p in enforced)
    allows = [p for p in enforced if p.action == "ALLOW"]
    allowed = not denied and (not allows or any(policy_matches(p, r) for p in allows))
    return RefDecision(
        allowed=allowed,
        audited=frozenset(key[id(p)] for p in enforced if p.action == "AUDIT" and policy_matches(p, r)),
        dry_run_matches=frozenset(key[id(p)] for p in policies if p.dry_run and policy_matches(p, r)),
    )
