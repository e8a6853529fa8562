"""AuthorizationPolicy -> `Authorization` for the node proxies (L4), failing closed where Istio fails open.

What is sent: policies without targetRefs (those with targetRefs are for waypoints and never reach a
node proxy). Scope: with a selector, WORKLOAD_SELECTOR (the key "<ns>/<name>" is listed in
`Workload.authorization_policies` of every pod it selects: pods of its namespace, or of every namespace
when the policy is in the root namespace); without one, NAMESPACE, or GLOBAL in the root namespace.
`dry_run` comes from the istio.io/dry-run annotation.

Structure: one Group per rule; in it one Rules (clause) per `from` list, per `to` list and per `when`
condition, ANDed; inside a clause one Match per source / operation, ORed. Field mapping:

  from.source  principals / notPrincipals        -> principals / not_principals
               namespaces / notNamespaces        -> namespaces / not_namespaces
               serviceAccounts / notServiceAccts -> service_accounts ("sa" means the policy's namespace)
               ipBlocks / notIpBlocks            -> source_ips / not_source_ips
  to.operation ports / notPorts                  -> destination_ports / not_destination_ports
  when         source.ip, source.namespace, source.principal, source.serviceAccount, destination.ip,
               destination.port: values -> the positive field, notValues -> the not_ field

String values: "*" -> presence, "*x" -> suffix "x", "x*" -> prefix "x", otherwise exact; principals
lose a leading "spiffe://". An IP block without a prefix length is a single address (/32 or /128).

An empty source / operation (nothing set) matches everything, and so does a clause containing one;
such a clause is left out of the group (an empty Match entry would be *skipped* by the proxy, i.e.
match nothing). A rule with no from/to/when is a group with no clauses, which matches everything.

Unenforceable attributes -- L7 attributes (hosts, methods, paths and their not-forms, requestPrincipals,
remoteIpBlocks and their not-forms, `when` keys other than the six above) and values that are not
valid (an IP block or port that does not parse, a serviceAccount that is not "sa" or "ns/sa", a
condition with neither values nor notValues) -- are handled fail closed (hardening checklist item 31):

* ALLOW: the whole rule is dropped, so it allows nothing (with no rule left the policy allows nothing
  and the selected workloads deny whatever no other ALLOW allows).
* DENY: the attribute is removed and the rest of the rule is enforced. Removing a constraint only
  widens what the rule matches, so the DENY denies more than written, never less; a source, operation
  or condition left with nothing matches everything. (Istio lets such a DENY have no effect.)

Each case is a warning naming the attribute. Actions: ALLOW and DENY are compiled; AUDIT without
targetRefs is not sent (only waypoints audit) with a warning; CUSTOM without targetRefs -- and any
action loom does not know -- becomes a DENY matching everything in its scope, with a warning, because
an external authorizer cannot be consulted at L4 and skipping it would allow what it might deny.
A policy whose rules are absent or empty has no groups: an ALLOW that matches nothing (deny all), or
a DENY with no effect, as in Istio.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import empty_pb2

from loom.api import authorization_pb2
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import (
    AuthorizationPolicy,
    LabelSelector,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
)

SPIFFE_PREFIX = "spiffe://"
MAX_PORT = 65535

# Model attribute -> API field name, for the L7-only attributes of a source and an operation.
_SOURCE_L7 = (
    ("request_principals", "requestPrincipals"),
    ("not_request_principals", "notRequestPrincipals"),
    ("remote_ip_blocks", "remoteIpBlocks"),
    ("not_remote_ip_blocks", "notRemoteIpBlocks"),
)
_OPERATION_L7 = (
    ("hosts", "hosts"),
    ("not_hosts", "notHosts"),
    ("methods", "methods"),
    ("not_methods", "notMethods"),
    ("paths", "paths"),
    ("not_paths", "notPaths"),
)
L4_CONDITION_KEYS = frozenset(
    {
        "source.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "destination.ip",
        "destination.port",
    }
)
_WAYPOINT_ADVICE = "L7 rules belong on a waypoint: attach the policy to it with targetRefs"


@dataclass(frozen=True, slots=True)
class PolicyTranslation:
    """The node-proxy form of one AuthorizationPolicy."""

    key: str  # "<namespace>/<name>"
    authorization: authorization_pb2.Authorization | None  # None: not sent to node proxies
    selector: LabelSelector | None  # for WORKLOAD_SELECTOR scope: the pods that list the policy
    diagnostics: tuple[Diagnostic, ...]


@dataclass(frozen=True, slots=True)
class _Problem:
    """An attribute the node proxy cannot enforce as written."""

    field: str
    what: str
    l7: bool


def string_match(value: str, *, principal: bool = False) -> authorization_pb2.StringMatch:
    if principal:
        value = value.removeprefix(SPIFFE_PREFIX)
    if value == "*":
        return authorization_pb2.StringMatch(presence=empty_pb2.Empty())
    if value.startswith("*"):
        return authorization_pb2.StringMatch(suffix=value[1:])
    if value.endswith("*"):
        return authorization_pb2.StringMatch(prefix=value[:-1])
    return authorization_pb2.StringMatch(exact=value)


def parse_ip_block(value: str) -> authorization_pb2.Address | None:
    """A CIDR block ("10.0.0.0/8", host bits allowed) or a bare address; None if it is neither."""
    if "%" in value:  # a zone index has no meaning in a policy and would be silently dropped
        return None
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    return authorization_pb2.Address(address=network.network_address.packed, length=network.prefixlen)


def parse_port(value: str) -> int | None:
    if not (value.isascii() and value.isdigit()):
        return None
    port = int(value)
    return port if 0 < port <= MAX_PORT else None


def parse_service_account(value: str, policy_namespace: str) -> authorization_pb2.ServiceAccountMatch | None:
    parts = value.split("/")
    if len(parts) == 1 and parts[0]:
        return authorization_pb2.ServiceAccountMatch(namespace=policy_namespace, serviceAccount=parts[0])
    if len(parts) == 2 and parts[0] and parts[1]:
        return authorization_pb2.ServiceAccountMatch(namespace=parts[0], serviceAccount=parts[1])
    return None


class _RuleCompiler:
    """Compiles the rules of one policy, collecting what cannot be enforced."""

    def __init__(self, policy: AuthorizationPolicy) -> None:
        self.namespace = policy.namespace
        self.problems: list[_Problem] = []

    def _invalid(self, field: str, what: str) -> None:
        self.problems.append(_Problem(field, what, l7=False))

    def _parsed(self, values: Sequence[str], field: str, parse: Callable[[str], object], kind: str) -> bool:
        """Whether every value parses; records the first that does not."""
        for value in values:
            if parse(value) is None:
                self._invalid(field, f"{value!r} is not a valid {kind}")
                return False
        return True

    def _ip_blocks(self, values: Sequence[str], field: str) -> list[authorization_pb2.Address] | None:
        if not self._parsed(values, field, parse_ip_block, "IP address or CIDR block"):
            return None
        return [a for a in (parse_ip_block(v) for v in values) if a is not None]

    def _ports(self, values: Sequence[str], field: str) -> list[int] | None:
        if not self._parsed(values, field, parse_port, "port (1-65535)"):
            return None
        return [p for p in (parse_port(v) for v in values) if p is not None]

    def _service_accounts(
        self, values: Sequence[str], field: str
    ) -> list[authorization_pb2.ServiceAccountMatch] | None:
        def parse(value: str) -> authorization_pb2.ServiceAccountMatch | None:
            return parse_service_account(value, self.namespace)

        if not self._parsed(values, field, parse, 'service account ("sa" or "namespace/sa")'):
            return None
        return [a for a in (parse(v) for v in values) if a is not None]

    def source(self, source: PolicySource, path: str) -> authorization_pb2.Match | None:
        """The Match of one source; None when nothing enforceable constrains it (matches all)."""
        for attr, api_name in _SOURCE_L7:
            if getattr(source, attr):
                self.problems.append(
                    _Problem(f"{path}.{api_name}", f"{api_name} is an L7 attribute", l7=True)
                )
        m = authorization_pb2.Match()
        m.principals.extend(string_match(v, principal=True) for v in source.principals)
        m.not_principals.extend(string_match(v, principal=True) for v in source.not_principals)
        m.namespaces.extend(string_match(v) for v in source.namespaces)
        m.not_namespaces.extend(string_match(v) for v in source.not_namespaces)
        for values, target, api_name in (
            (source.service_accounts, m.service_accounts, "serviceAccounts"),
            (source.not_service_accounts, m.not_service_accounts, "notServiceAccounts"),
        ):
            if values:
                accounts = self._service_accounts(values, f"{path}.{api_name}")
                if accounts is not None:
                    target.extend(accounts)
        for values, cidrs, api_name in (
            (source.ip_blocks, m.source_ips, "ipBlocks"),
            (source.not_ip_blocks, m.not_source_ips, "notIpBlocks"),
        ):
            if values:
                blocks = self._ip_blocks(values, f"{path}.{api_name}")
                if blocks is not None:
                    cidrs.extend(blocks)
        return m if m.ByteSize() else None

    def operation(self, operation: PolicyOperation, path: str) -> authorization_pb2.Match | None:
        for attr, api_name in _OPERATION_L7:
            if getattr(operation, attr):
                self.problems.append(
                    _Problem(f"{path}.{api_name}", f"{api_name} is an L7 attribute", l7=True)
                )
        m = authorization_pb2.Match()
        if operation.ports:
            ports = self._ports(operation.ports, f"{path}.ports")
            if ports is not None:
                m.destination_ports.extend(ports)
        if operation.not_ports:
            ports = self._ports(operation.not_ports, f"{path}.notPorts")
            if ports is not None:
                m.not_destination_ports.extend(ports)
        return m if m.ByteSize() else None

    def condition(self, condition: PolicyCondition, path: str) -> authorization_pb2.Match | None:
        key = condition.key
        if key not in L4_CONDITION_KEYS:
            self.problems.append(_Problem(path, f"condition key {key!r} is an L7 attribute", l7=True))
            return None
        if not condition.values and not condition.not_values:
            self._invalid(path, f"condition {key!r} sets neither values nor notValues")
            return None
        m = authorization_pb2.Match()
        for values, negative, api_name in (
            (condition.values, False, "values"),
            (condition.not_values, True, "notValues"),
        ):
            if values:
                self._condition_values(m, key, values, negative, f"{path}.{api_name}")
        return m if m.ByteSize() else None

    def _condition_values(
        self, m: authorization_pb2.Match, key: str, values: Sequence[str], negative: bool, field: str
    ) -> None:
        prefix = "not_" if negative else ""
        if key in ("source.ip", "destination.ip"):
            blocks = self._ip_blocks(values, field)
            if blocks is not None:
                target = "source_ips" if key == "source.ip" else "destination_ips"
                getattr(m, prefix + target).extend(blocks)
        elif key == "destination.port":
            ports = self._ports(values, field)
            if ports is not None:
                getattr(m, prefix + "destination_ports").extend(ports)
        elif key == "source.serviceAccount":
            accounts = self._service_accounts(values, field)
            if accounts is not None:
                getattr(m, prefix + "service_accounts").extend(accounts)
        elif key == "source.principal":
            getattr(m, prefix + "principals").extend(string_match(v, principal=True) for v in values)
        else:  # source.namespace
            getattr(m, prefix + "namespaces").extend(string_match(v) for v in values)

    def clause(self, matches: Sequence[authorization_pb2.Match | None]) -> authorization_pb2.Rules | None:
        """An any-of clause; None (leave the clause out: it matches everything) when an entry is
        unconstrained."""
        if any(m is None for m in matches):
            return None
        return authorization_pb2.Rules(matches=[m for m in matches if m is not None])

    def rule(self, index: int, rule: PolicyRule) -> authorization_pb2.Group:
        """The group of one rule: its from, to and each when condition, ANDed."""
        path = f"spec.rules[{index}]"
        clauses: list[authorization_pb2.Rules] = []
        if rule.sources:
            clause = self.clause(
                [self.source(s, f"{path}.from[{j}].source") for j, s in enumerate(rule.sources)]
            )
            if clause is not None:
                clauses.append(clause)
        if rule.operations:
            clause = self.clause(
                [self.operation(o, f"{path}.to[{j}].operation") for j, o in enumerate(rule.operations)]
            )
            if clause is not None:
                clauses.append(clause)
        for k, condition in enumerate(rule.conditions):
            clause = self.clause([self.condition(condition, f"{path}.when[{k}]")])
            if clause is not None:
                clauses.append(clause)
        return authorization_pb2.Group(rules=clauses)


def _warning(policy: AuthorizationPolicy, field: str, message: str) -> Diagnostic:
    return Diagnostic(Severity.WARNING, message, origin=policy.origin, key=policy.key, field=field)


def _problem_warning(policy: AuthorizationPolicy, problem: _Problem, allow: bool) -> Diagnostic:
    cause = f"{problem.what}, which the node proxy cannot enforce" if problem.l7 else problem.what
    if allow:
        effect = "loom dropped this whole ALLOW rule (fail closed), so the rule allows nothing"
    else:
        effect = (
            "loom enforces this DENY rule at L4 without it (fail closed), so the rule denies more than "
            "written instead of having no effect"
        )
    advice = _WAYPOINT_ADVICE if problem.l7 else "fix the value"
    return _warning(policy, problem.field, f"{cause}; {effect}. {advice}")


def _scope(policy: AuthorizationPolicy, root_namespace: str) -> authorization_pb2.Scope:
    if policy.selector is not None:
        return authorization_pb2.WORKLOAD_SELECTOR
    return authorization_pb2.GLOBAL if policy.namespace == root_namespace else authorization_pb2.NAMESPACE


def translate_policy(policy: AuthorizationPolicy, root_namespace: str) -> PolicyTranslation:
    """Compile one AuthorizationPolicy for the node proxies (see the module docstring)."""
    key = f"{policy.namespace}/{policy.name}"
    if policy.target_refs:
        return PolicyTranslation(key, None, None, ())
    action = policy.action or "ALLOW"
    diagnostics: list[Diagnostic] = []
    selector = policy.selector
    resource = authorization_pb2.Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=_scope(policy, root_namespace),
        dry_run=policy.dry_run,
    )
    if policy.invalid:
        diagnostics.append(
            _warning(
                policy,
                "",
                "this policy is invalid (see its errors); until it is fixed loom enforces it at L4 as a "
                "DENY of every connection in its scope (fail closed)",
            )
        )
        resource.action = authorization_pb2.DENY
        resource.groups.add()  # a group with no clauses matches everything
        return PolicyTranslation(key, resource, selector, tuple(diagnostics))
    if action == "AUDIT":
        diagnostics.append(
            _warning(
                policy,
                "spec.action",
                "AUDIT is only enforced by waypoints: this policy has no targetRefs, so it is not sent to "
                "the node proxies. Attach it to a waypoint with targetRefs",
            )
        )
        return PolicyTranslation(key, None, None, tuple(diagnostics))
    if action not in ("ALLOW", "DENY"):
        what = (
            "CUSTOM (an external authorizer) cannot be consulted by the node proxy"
            if action == "CUSTOM"
            else f"unknown action {action!r}"
        )
        diagnostics.append(
            _warning(
                policy,
                "spec.action",
                f"{what}; loom enforces this policy at L4 as a DENY of every connection in its scope "
                "(fail closed). Attach CUSTOM policies to a waypoint with targetRefs",
            )
        )
        resource.action = authorization_pb2.DENY
        resource.groups.add()  # a group with no clauses matches everything
        return PolicyTranslation(key, resource, selector, tuple(diagnostics))

    allow = action == "ALLOW"
    resource.action = authorization_pb2.ALLOW if allow else authorization_pb2.DENY
    rules = policy.rules or ()
    for i, rule in enumerate(rules):
        compiler = _RuleCompiler(policy)
        group = compiler.rule(i, rule)
        diagnostics.extend(_problem_warning(policy, p, allow) for p in compiler.problems)
        if allow and compiler.problems:
            continue
        resource.groups.append(group)
    if allow and rules and not resource.groups:
        diagnostics.append(
            _warning(
                policy,
                "spec.rules",
                "no rule of this ALLOW policy can be enforced by the node proxy, so it allows nothing: "
                "the workloads it applies to accept only what other ALLOW policies allow",
            )
        )
    return PolicyTranslation(key, resource, selector, tuple(diagnostics))
