"""Runtime L4 authorization: compiled Authorization resources and the per-connection decision.

Theory of operation
-------------------
The controller sends `istio.security.Authorization` resources (one per AuthorizationPolicy, plus the
policies converted from PeerAuthentication). A node proxy compiles each one exactly once, when it
arrives, into a `CompiledPolicy`: string patterns become a set plus prefix/suffix tuples, CIDRs become
integer (network, mask) pairs, ports become frozensets, and the nesting becomes tuples of closures.
Deciding a connection then parses nothing; it builds one `_View` of the connection and calls closures.

Structure and matching (the same as Istio's ztunnel):

* a policy matches when ANY group matches; a policy with no groups never matches;
* a group matches when ALL its rules (the from / to / when clauses of one AuthorizationPolicy rule)
  match; a group with no rules matches;
* a rule matches when ANY of its Match entries matches; a rule with no entries counts as a match; an
  entry with no field set is skipped, so a rule made only of empty entries never matches;
* inside a Match every field kind it sets must match (ANDed), the values of one kind are ORed, and a
  `not_*` list matches when none of its values match.

Connections without a peer identity (plaintext arriving on 15006) have no source principal, namespace
or service account. A positive principal / namespace / service-account list never matches an absent
value, and a `not_*` list always does. That is ztunnel's behaviour for principals and service accounts.
For namespaces ztunnel compares the empty string instead; the two differ only for patterns Istio never
produces (an exact, prefix or suffix match on ""), and loom's choice is the one that cannot let
plaintext satisfy a namespace pattern.

Principal patterns are compared without the ``spiffe://`` scheme. A pattern that still carries it (an
exact or prefix match written as ``spiffe://td/ns/...``) has it removed at compile time instead of
silently never matching.

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``, what a dual-stack socket reports for IPv4 peers) are
matched as the IPv4 address, on both the connection and the policy side, so a block like 10.0.0.0/8
cannot be bypassed through the mapping.

The decision (`decide`), ztunnel's order:

1. dry-run policies never decide; the ones that match are listed in `Decision.dry_run_matches`, and
   `Decision.dry_run_allowed` says what the decision would have been with them enforced;
2. any matching DENY -> deny;
3. no ALLOW policy -> allow;
4. any matching ALLOW -> allow;
5. otherwise deny.

Fail closed: `compile_authorization` raises `PolicyCompileError` for anything it cannot enforce exactly:
an unknown enum value or an unknown field (a newer controller may have added a constraint this proxy
would silently ignore), a StringMatch with no pattern, an address that is not 4 or 16 bytes, a prefix
length longer than the address, a port above 65535. ztunnel drops such values one by one, which can
turn a narrow rule into a wide one; loom refuses the whole policy. `PolicyEvaluator` keeps a refused
policy as a `BrokenPolicy`, and every connection to a workload it applies to is denied until a good
version arrives; so is every connection to a workload that lists a policy the proxy has not received.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import Protocol, TypeVar

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from loom.api import authorization_pb2, workload_pb2
from loom.identity import SPIFFE_SCHEME, Identity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_PORT = 65535


class PolicyScope(IntEnum):
    """Which workloads an Authorization applies to (values of istio.security.Scope)."""

    GLOBAL = authorization_pb2.GLOBAL
    NAMESPACE = authorization_pb2.NAMESPACE
    WORKLOAD_SELECTOR = authorization_pb2.WORKLOAD_SELECTOR


class PolicyAction(IntEnum):
    """Values of istio.security.Action."""

    ALLOW = authorization_pb2.ALLOW
    DENY = authorization_pb2.DENY


_KNOWN_SCOPES = frozenset(int(s) for s in PolicyScope)
_KNOWN_ACTIONS = frozenset(int(a) for a in PolicyAction)


class PolicyCompileError(ValueError):
    """An Authorization resource this proxy cannot enforce exactly. The workloads it applies to deny."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        self.key = key
        self.path = path
        self.reason = reason
        where = f"{key}: {path}" if path else key
        super().__init__(f"authorization {where}: {reason}")


@dataclass(frozen=True, slots=True)
class Connection:
    """What the destination node proxy knows about a connection when it authorizes it."""

    # The peer's verified SPIFFE identity (from the HBONE mTLS handshake); None for plaintext.
    source_identity: Identity | None
    # The client's address as the node proxy sees it.
    source_ip: IPAddress
    # The address and port the client dialled on the destination workload.
    destination_ip: IPAddress
    destination_port: int

    @classmethod
    def of(
        cls,
        source_identity: Identity | str | None,
        source_ip: IPAddress | str,
        destination_ip: IPAddress | str,
        destination_port: int,
    ) -> Connection:
        """Build from the forms a proxy has at hand: a SPIFFE URI string and textual addresses."""
        identity = Identity.parse(source_identity) if isinstance(source_identity, str) else source_identity
        return cls(
            identity, ipaddress.ip_address(source_ip), ipaddress.ip_address(destination_ip), destination_port
        )


class DecisionReason(StrEnum):
    NO_ALLOW_POLICY = "allowed: no allow policy applies"
    ALLOWED = "allowed by policy"
    DENIED = "denied by policy"
    NOT_ALLOWED = "denied: allow policies exist, but none allowed"
    INVALID_POLICY = "denied: an applicable policy could not be compiled"
    MISSING_POLICY = "denied: the workload lists a policy this proxy has not received"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of authorizing one connection, with what access logs and metrics need."""

    allowed: bool
    reason: DecisionReason
    # Key "<namespace>/<name>" of the policy that decided ("" when the decision follows from absence).
    policy: str = ""
    # Keys of the dry-run policies that matched, in evaluation order.
    dry_run_matches: tuple[str, ...] = ()
    # The decision had the dry-run policies been enforced too (equals `allowed` when there are none).
    dry_run_allowed: bool = False
    # The compile error, for INVALID_POLICY.
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.reason.value} {self.policy}" if self.policy else self.reason.value
        return f"{text}: {self.detail}" if self.detail else text


class _View:
    """The attributes of one connection, in the shapes the compiled matchers compare against."""

    __slots__ = ("dst", "namespace", "port", "principal", "service_account", "src")

    def __init__(self, conn: Connection) -> None:
        identity = conn.source_identity
        self.principal: str | None = None
        self.namespace: str | None = None
        self.service_account: tuple[str, str] | None = None
        if identity is not None:
            self.principal = identity.principal
            self.namespace = identity.namespace
            self.service_account = (identity.namespace, identity.service_account)
        self.src = _ip_key(conn.source_ip)
        self.dst = _ip_key(conn.destination_ip)
        self.port = conn.destination_port


def _ip_key(ip: IPAddress) -> tuple[int, int]:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return 4, int(mapped)
        return 6, int(ip)
    return 4, int(ip)


_Check = Callable[[_View], bool]
# The combinators below serve any compiled-check engine (also the waypoint's L7 one, whose view differs).
V = TypeVar("V")


def always(view: object) -> bool:
    return True


def never(view: object) -> bool:
    return False


@dataclass(frozen=True, slots=True, eq=False)
class CompiledPolicy:
    """One Authorization, ready to match connections."""

    key: str  # "<namespace>/<name>"
    name: str
    namespace: str
    scope: PolicyScope
    action: PolicyAction
    dry_run: bool
    groups: tuple[_Check, ...] = field(repr=False)

    def matches(self, conn: Connection) -> bool:
        return self._matches(_View(conn))

    def _matches(self, view: _View) -> bool:
        for group in self.groups:  # noqa: SIM110 -- per-connection path; a loop beats any(<genexpr>)
            if group(view):
                return True
        return False


@dataclass(frozen=True, slots=True)
class BrokenPolicy:
    """Stands in for an Authorization that failed to compile: it makes the workloads it covers deny."""

    key: str
    namespace: str
    scope: int  # the raw proto value; may be an unknown scope
    error: PolicyCompileError
    # A broken dry-run policy is reported (as a dry-run deny) but never decides: it was only ever
    # meant to be observed.
    dry_run: bool = False


# ---------------------------------------------------------------------------------------------------
# compilation


def _reject_unknown_fields(message: Message, key: str, path: str) -> None:
    if len(unknown_fields.UnknownFieldSet(message)):
        raise PolicyCompileError(
            key, path or "(top level)", "carries fields this proxy does not know; refusing to ignore them"
        )


@dataclass(frozen=True, slots=True)
class StringPatterns:
    """Istio's string match values: exact set, prefixes ("x*"), suffixes ("*x"), presence ("*").
    Shared with the waypoint's L7 engine (waypoint/authz.py), which reads them from manifests."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool

    @classmethod
    def parse(cls, values: Iterable[str]) -> StringPatterns:
        """From AuthorizationPolicy's string form ("*", "x*", "*x" or exact)."""
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        presence = False
        for value in values:
            if value == "*":
                presence = True
            elif value.startswith("*"):
                suffixes.append(value[1:])
            elif value.endswith("*"):
                prefixes.append(value[:-1])
            else:
                exact.add(value)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), presence)

    def matches(self, value: str) -> bool:
        return (
            value in self.exact
            or (self.presence and value != "")
            or value.startswith(self.prefixes)
            or value.endswith(self.suffixes)
        )


def _compile_strings(
    matches: Sequence[authorization_pb2.StringMatch], key: str, path: str, *, principal: bool
) -> StringPatterns:
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    presence = False
    for i, sm in enumerate(matches):
        here = f"{path}[{i}]"
        _reject_unknown_fields(sm, key, here)
        kind = sm.WhichOneof("match_type")
        if kind == "exact":
            exact.add(sm.exact.removeprefix(SPIFFE_SCHEME) if principal else sm.exact)
        elif kind == "prefix":
            prefixes.append(sm.prefix.removeprefix(SPIFFE_SCHEME) if principal else sm.prefix)
        elif kind == "suffix":
            suffixes.append(sm.suffix)
        elif kind == "presence":
            _reject_unknown_fields(sm.presence, key, f"{here}.presence")
            presence = True
        else:
            raise PolicyCompileError(
                key, here, "StringMatch sets no pattern (exact, prefix, suffix or presence)"
            )
    return StringPatterns(frozenset(exact), tuple(prefixes), tuple(suffixes), presence)


@dataclass(frozen=True, slots=True)
class _Cidrs:
    v4: tuple[tuple[int, int], ...]  # (network, mask)
    v6: tuple[tuple[int, int], ...]

    def contains(self, ip: tuple[int, int]) -> bool:
        version, value = ip
        for network, mask in self.v4 if version == 4 else self.v6:  # noqa: SIM110 -- hot path, as above
            if value & mask == network:
                return True
        return False


_V4_MAPPED_NETWORK = 0xFFFF << 32


def _compile_cidrs(addresses: Sequence[authorization_pb2.Address], key: str, path: str) -> _Cidrs:
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for i, address in enumerate(addresses):
        here = f"{path}[{i}]"
        _reject_unknown_fields(address, key, here)
        raw = address.address
        if len(raw) not in (4, 16):
            raise PolicyCompileError(key, here, f"address must be 4 or 16 bytes, got {len(raw)}")
        bits = len(raw) * 8
        length = address.length
        if length > bits:
            raise PolicyCompileError(
                key, here, f"prefix length {length} is longer than the {bits}-bit address"
            )
        value = int.from_bytes(raw, "big")
        if bits == 128 and length >= 96 and value >> 32 == 0xFFFF:
            # An IPv4-mapped block: connections from mapped addresses are matched as IPv4 (see above).
            bits, length, value = 32, length - 96, value & 0xFFFFFFFF
        mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
        (v4 if bits == 32 else v6).append((value & mask, mask))
    return _Cidrs(tuple(v4), tuple(v6))


def _compile_ports(ports: Sequence[int], key: str, path: str) -> frozenset[int]:
    for i, port in enumerate(ports):
        if port > MAX_PORT:
            raise PolicyCompileError(key, f"{path}[{i}]", f"port {port} is above {MAX_PORT}")
    return frozenset(ports)


def _compile_service_accounts(
    matches: Sequence[authorization_pb2.ServiceAccountMatch], key: str, path: str
) -> frozenset[tuple[str, str]]:
    for i, sa in enumerate(matches):
        _reject_unknown_fields(sa, key, f"{path}[{i}]")
    return frozenset((sa.namespace, sa.serviceAccount) for sa in matches)


_principal_of = operator.attrgetter("principal")
_namespace_of = operator.attrgetter("namespace")


def _string_check(patterns: StringPatterns, attribute: Callable[[_View], str | None], negate: bool) -> _Check:
    matches = patterns.matches
    if negate:

        def none_match(view: _View) -> bool:
            value = attribute(view)
            return value is None or not matches(value)

        return none_match

    def any_match(view: _View) -> bool:
        value = attribute(view)
        return value is not None and matches(value)

    return any_match


def _service_account_check(accounts: frozenset[tuple[str, str]], negate: bool) -> _Check:
    if negate:
        return lambda view: view.service_account is None or view.service_account not in accounts
    return lambda view: view.service_account is not None and view.service_account in accounts


def _cidr_check(cidrs: _Cidrs, source: bool, negate: bool) -> _Check:
    contains = cidrs.contains
    if source:
        if negate:
            return lambda view: not contains(view.src)
        return lambda view: contains(view.src)
    if negate:
        return lambda view: not contains(view.dst)
    return lambda view: contains(view.dst)


def _port_check(ports: frozenset[int], negate: bool) -> _Check:
    if negate:
        return lambda view: view.port not in ports
    return lambda view: view.port in ports


def all_of(checks: Sequence[Callable[[V], bool]]) -> Callable[[V], bool]:
    """A check true when every one of `checks` is (true for none given)."""
    if not checks:
        return always
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def all_match(view: V) -> bool:
        for check in frozen:  # noqa: SIM110 -- hot path: a loop beats all(<genexpr>)
            if not check(view):
                return False
        return True

    return all_match


def any_of(checks: Sequence[Callable[[V], bool]]) -> Callable[[V], bool]:
    """A check true when one of `checks` is (false for none given)."""
    if not checks:
        return never
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def any_match(view: V) -> bool:
        for check in frozen:  # noqa: SIM110 -- hot path, as above
            if check(view):
                return True
        return False

    return any_match


def _compile_match(m: authorization_pb2.Match, key: str, path: str) -> _Check | None:
    """One Match entry; None when it sets no field (such an entry is skipped)."""
    _reject_unknown_fields(m, key, path)
    checks: list[_Check] = []
    # Cheapest comparisons first; the result does not depend on the order.
    if m.destination_ports:
        ports = _compile_ports(m.destination_ports, key, f"{path}.destination_ports")
        checks.append(_port_check(ports, False))
    if m.not_destination_ports:
        ports = _compile_ports(m.not_destination_ports, key, f"{path}.not_destination_ports")
        checks.append(_port_check(ports, True))
    for attr, source in (("source_ips", True), ("destination_ips", False)):
        positive = getattr(m, attr)
        if positive:
            checks.append(_cidr_check(_compile_cidrs(positive, key, f"{path}.{attr}"), source, False))
        negative = getattr(m, f"not_{attr}")
        if negative:
            checks.append(_cidr_check(_compile_cidrs(negative, key, f"{path}.not_{attr}"), source, True))
    if m.service_accounts:
        accounts = _compile_service_accounts(m.service_accounts, key, f"{path}.service_accounts")
        checks.append(_service_account_check(accounts, False))
    if m.not_service_accounts:
        accounts = _compile_service_accounts(m.not_service_accounts, key, f"{path}.not_service_accounts")
        checks.append(_service_account_check(accounts, True))
    if m.principals:
        patterns = _compile_strings(m.principals, key, f"{path}.principals", principal=True)
        checks.append(_string_check(patterns, _principal_of, False))
    if m.not_principals:
        patterns = _compile_strings(m.not_principals, key, f"{path}.not_principals", principal=True)
        checks.append(_string_check(patterns, _principal_of, True))
    if m.namespaces:
        patterns = _compile_strings(m.namespaces, key, f"{path}.namespaces", principal=False)
        checks.append(_string_check(patterns, _namespace_of, False))
    if m.not_namespaces:
        patterns = _compile_strings(m.not_namespaces, key, f"{path}.not_namespaces", principal=False)
        checks.append(_string_check(patterns, _namespace_of, True))
    if not checks:
        return None
    return all_of(checks)


def _compile_rule(rule: authorization_pb2.Rules, key: str, path: str) -> _Check:
    _reject_unknown_fields(rule, key, path)
    if not rule.matches:
        return always  # a rule with no entries counts as a match
    entries = [_compile_match(m, key, f"{path}.matches[{i}]") for i, m in enumerate(rule.matches)]
    # Empty entries are skipped; if nothing else is left the rule cannot match.
    return any_of([e for e in entries if e is not None])


def _compile_group(group: authorization_pb2.Group, key: str, path: str) -> _Check:
    _reject_unknown_fields(group, key, path)
    return all_of([_compile_rule(r, key, f"{path}.rules[{i}]") for i, r in enumerate(group.rules)])


def policy_key(resource: authorization_pb2.Authorization) -> str:
    return f"{resource.namespace}/{resource.name}"


def compile_authorization(
    resource: authorization_pb2.Authorization, key: str | None = None
) -> CompiledPolicy:
    """Compile one Authorization; raises PolicyCompileError (naming the field) if it cannot be enforced.

    `key` is the resource name it arrived under; by default "<namespace>/<name>".
    """
    key = key if key is not None else policy_key(resource)
    _reject_unknown_fields(resource, key, "")
    if resource.scope not in _KNOWN_SCOPES:
        raise PolicyCompileError(key, "scope", f"unknown scope {int(resource.scope)}")
    if resource.action not in _KNOWN_ACTIONS:
        raise PolicyCompileError(key, "action", f"unknown action {int(resource.action)}")
    groups = tuple(_compile_group(g, key, f"groups[{i}]") for i, g in enumerate(resource.groups))
    return CompiledPolicy(
        key=key,
        name=resource.name,
        namespace=resource.namespace,
        scope=PolicyScope(resource.scope),
        action=PolicyAction(resource.action),
        dry_run=resource.dry_run,
        groups=groups,
    )


# ---------------------------------------------------------------------------------------------------
# deciding


PolicyLike = CompiledPolicy | BrokenPolicy | authorization_pb2.Authorization


def decide(policies: Iterable[PolicyLike], conn: Connection) -> Decision:
    """Authorize `conn` against the policies that apply to its destination workload.

    Protos are compiled on the way (callers on a hot path pass CompiledPolicy objects). Any policy
    that cannot be compiled denies the connection.
    """
    compiled: list[CompiledPolicy] = []
    broken_dry_runs: list[str] = []
    for policy in policies:
        if isinstance(policy, authorization_pb2.Authorization):
            try:
                policy = compile_authorization(policy)
            except PolicyCompileError as e:
                policy = BrokenPolicy(e.key, policy.namespace, int(policy.scope), e, dry_run=policy.dry_run)
        if isinstance(policy, BrokenPolicy):
            if policy.dry_run:
                broken_dry_runs.append(policy.key)
                continue
            return Decision(False, DecisionReason.INVALID_POLICY, policy.key, detail=str(policy.error))
        compiled.append(policy)
    decision = _decide_compiled(compiled, _View(conn))
    if broken_dry_runs:
        # Enforced, a policy that cannot be compiled would deny: that is what dry-run reports.
        decision = replace(
            decision,
            dry_run_matches=(*decision.dry_run_matches, *broken_dry_runs),
            dry_run_allowed=False,
        )
    return decision


def _decide_compiled(policies: Sequence[CompiledPolicy], view: _View) -> Decision:
    denied_by = ""
    allow_policies: list[CompiledPolicy] = []
    dry_run_matches: list[str] = []
    dry_run_deny = False
    dry_run_allow_exists = False
    dry_run_allow_matched = False
    for policy in policies:
        if policy.dry_run:
            is_allow = policy.action is PolicyAction.ALLOW
            dry_run_allow_exists |= is_allow
            if policy._matches(view):
                dry_run_matches.append(policy.key)
                dry_run_allow_matched |= is_allow
                dry_run_deny |= not is_allow
        elif policy.action is PolicyAction.DENY:
            if not denied_by and policy._matches(view):
                denied_by = policy.key
        else:
            allow_policies.append(policy)
    dry = tuple(dry_run_matches)

    if denied_by:
        return Decision(False, DecisionReason.DENIED, denied_by, dry, dry_run_allowed=False)
    allowed_by = ""
    for policy in allow_policies:
        if policy._matches(view):
            allowed_by = policy.key
            break

    # What the result would be with the dry-run policies enforced as well.
    if dry_run_deny:
        shadow = False
    elif not allow_policies and not dry_run_allow_exists:
        shadow = True
    else:
        shadow = bool(allowed_by) or dry_run_allow_matched

    if not allow_policies:
        return Decision(True, DecisionReason.NO_ALLOW_POLICY, "", dry, dry_run_allowed=shadow)
    if allowed_by:
        return Decision(True, DecisionReason.ALLOWED, allowed_by, dry, dry_run_allowed=shadow)
    return Decision(False, DecisionReason.NOT_ALLOWED, "", dry, dry_run_allowed=shadow)


# ---------------------------------------------------------------------------------------------------
# which policies apply to a workload


class ScopedPolicy(Protocol):
    """What applicability needs of a policy: an Authorization proto, CompiledPolicy or BrokenPolicy."""

    @property
    def namespace(self) -> str: ...

    @property
    def scope(self) -> int: ...


P = TypeVar("P", bound=ScopedPolicy)


def _applies_by_scope(scope: int, policy_namespace: str, workload_namespace: str) -> bool:
    if scope == PolicyScope.GLOBAL:
        return True
    if scope == PolicyScope.WORKLOAD_SELECTOR:
        return False
    # NAMESPACE, and (fail closed) a scope this proxy does not know: the policy's own namespace.
    return policy_namespace == workload_namespace


def applicable_policies(workload: workload_pb2.Workload, all_policies_by_key: Mapping[str, P]) -> list[P]:
    """The policies that apply to `workload`: every GLOBAL policy, the NAMESPACE policies of its
    namespace, and the policies it lists in `authorization_policies` (in that order)."""
    listed = workload.authorization_policies
    listed_set = set(listed)
    result = [
        policy
        for key, policy in all_policies_by_key.items()
        if key not in listed_set and _applies_by_scope(policy.scope, policy.namespace, workload.namespace)
    ]
    seen: set[str] = set()
    for key in listed:
        policy = all_policies_by_key.get(key)
        if policy is not None and key not in seen:
            seen.add(key)
            result.append(policy)
    return result


def missing_policies(
    workload: workload_pb2.Workload, all_policies_by_key: Mapping[str, object]
) -> tuple[str, ...]:
    """Keys the workload lists that are not in `all_policies_by_key` (such a workload must deny)."""
    return tuple(key for key in workload.authorization_policies if key not in all_policies_by_key)


class PolicyEvaluator:
    """The Authorization resources a node proxy holds, compiled and indexed by scope.

    `upsert` and `remove` follow the xDS stream; `decide` authorizes one connection to one of the
    proxy's workloads. A resource that fails to compile is kept as a BrokenPolicy (and `upsert`
    returns the error so the xDS client can NACK it), which denies the workloads it applies to.
    """

    def __init__(self) -> None:
        self._policies: dict[str, CompiledPolicy | BrokenPolicy] = {}
        self._global: dict[str, CompiledPolicy | BrokenPolicy] = {}
        self._by_namespace: dict[str, dict[str, CompiledPolicy | BrokenPolicy]] = {}

    def __len__(self) -> int:
        return len(self._policies)

    def __contains__(self, key: object) -> bool:
        return key in self._policies

    def get(self, key: str) -> CompiledPolicy | BrokenPolicy | None:
        return self._policies.get(key)

    def upsert(
        self, resource: authorization_pb2.Authorization, key: str | None = None
    ) -> PolicyCompileError | None:
        key = key if key is not None else policy_key(resource)
        self.remove(key)
        policy: CompiledPolicy | BrokenPolicy
        error: PolicyCompileError | None = None
        try:
            policy = compile_authorization(resource, key)
        except PolicyCompileError as e:
            error = e
            policy = BrokenPolicy(key, resource.namespace, int(resource.scope), e, dry_run=resource.dry_run)
        self._policies[key] = policy
        if policy.scope == PolicyScope.GLOBAL:
            self._global[key] = policy
        elif policy.scope != PolicyScope.WORKLOAD_SELECTOR:
            self._by_namespace.setdefault(policy.namespace, {})[key] = policy
        return error

    def remove(self, key: str) -> bool:
        policy = self._policies.pop(key, None)
        if policy is None:
            return False
        self._global.pop(key, None)
        bucket = self._by_namespace.get(policy.namespace)
        if bucket is not None:
            bucket.pop(key, None)
            if not bucket:
                del self._by_namespace[policy.namespace]
        return True

    def policies_for(
        self, workload: workload_pb2.Workload
    ) -> tuple[list[CompiledPolicy | BrokenPolicy], tuple[str, ...]]:
        """(the policies that apply to the workload, the listed keys this proxy does not have)."""
        # A dict keeps evaluation order stable and lists a policy once even if it applies two ways.
        selected = dict(self._global)
        selected.update(self._by_namespace.get(workload.namespace, {}))
        missing: list[str] = []
        for key in workload.authorization_policies:
            policy = self._policies.get(key)
            if policy is None:
                missing.append(key)
            else:
                selected[key] = policy
        return list(selected.values()), tuple(missing)

    def decide(self, workload: workload_pb2.Workload, conn: Connection) -> Decision:
        policies, missing = self.policies_for(workload)
        if missing:
            return Decision(False, DecisionReason.MISSING_POLICY, missing[0])
        return decide(policies, conn)
