"""L7 authorization in the waypoint: the AuthorizationPolicies that target it, compiled and evaluated
per HTTP request (and per TCP connection for services the waypoint treats as TCP).

Theory of operation
-------------------
`WaypointAuthorizer.build` runs whenever the policy set changes. It selects the policies that apply to
this waypoint, compiles every one exactly once into closures (string patterns become sets and
prefix/suffix tuples, CIDRs become networks, path templates become regular expressions), and groups
them per scope. `check` then parses no policy: it builds one `_View` of the request and calls closures.

Which policies apply (Istio ambient semantics, istio-ambient-facts §6.2):

* `targetRefs` naming this waypoint's Gateway (kind Gateway, group gateway.networking.k8s.io, same
  namespace): every request through the waypoint;
* `targetRefs` naming a Service (kind Service, group "" or "core", same namespace): requests addressed
  to that Service (`RequestView.service`);
* `targetRefs` naming the GatewayClass `istio-waypoint`, for a policy in the root namespace: every
  waypoint of the mesh (a GatewayClass target in any other namespace is ignored, as Istio does);
* policies with a `selector`, or with neither selector nor targetRefs (namespace- or mesh-wide), are
  for ztunnel. Istio's waypoints ignore them too (unless istiod runs with
  ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES, which loom does not offer): a namespace-wide
  "default deny" does not cover waypoint traffic; target the waypoint to get one.
* ServiceEntry targets are reported and ignored: loom has no ServiceEntry, so no request addresses one.

The decision (Istio's order CUSTOM -> DENY -> ALLOW):

1. CUSTOM policies: loom has no ext_authz client, so a CUSTOM policy fails closed: a request matching
   its rules (the requests Istio would send to the external authorizer) is denied, as if the
   authorizer had said no. Requests outside its rules are not affected, exactly as in Istio.
2. DENY policies, and invalid policies (`invalid=True`: the loader's stand-in for a manifest that
   failed validation), which deny every request in their scope: any match denies.
3. No ALLOW policy applies -> allow; some ALLOW policy matches -> allow; otherwise deny
   ("no ALLOW policy matched").
4. AUDIT policies never decide; the keys of those that match are returned in `AuthzDecision.audited`,
   for denied and allowed requests alike.
5. Dry-run policies (annotation istio.io/dry-run: "true") never decide either; the ones that match are
   reported (`AuthzResult.dry_run_matches`, and in the decision's reason), with what the decision
   would have been had they been enforced (`AuthzResult.dry_run_allowed`).

Matching (the API's rules): a policy matches when any rule matches; a policy without rules (absent or
empty) never matches, so an ALLOW without rules denies everything it targets. A rule matches when
any `from` source matches (none: any source), any `to` operation matches (none: any operation) and
every `when` condition matches. Fields set in one source/operation are ANDed; values of a field are
ORed; a not-field matches when none of its values match. String values use Istio's forms: `*` (any
non-empty value), `*suffix`, `prefix*`, otherwise exact -- the same as loom's L4 engine
(loom.policy.rbac).

Attributes and the choices loom makes for them:

* principals / source.principal: the peer's SPIFFE identity from the HBONE mTLS (the original client,
  not a proxy), compared without `spiffe://`. Trust-domain aware like Istio: a pattern whose trust
  domain is the mesh's, one of its aliases, or `cluster.local` (Istio's "local trust domain" pointer)
  is expanded to the mesh trust domain and every alias; `*...` patterns ignore the trust domain.
* namespaces, serviceAccounts (`ns/sa`, or `sa` in the policy's namespace): from the same identity. A
  request without identity has none of them: positive values never match, not-values always do.
* ipBlocks / source.ip: the address of the HBONE peer; destination.ip: the address the client dialled
  (`RequestView.destination_ip`). IPv4-mapped IPv6 addresses count as IPv4 on both sides.
* ports / destination.port: the Service's target port (the port on the workload), which is what
  Istio's API documents for `ports` ("workload/container ports, not Service ports").
* hosts: the request authority, case-insensitive, with the port and one trailing dot removed (so
  `SECRET.com`, `secret.com:443` and `secret.com.` are all `secret.com`). A host pattern that itself
  carries a port (`example.com:8080`, `example.com:*`) is compared with `host:port` instead.
* methods: case-sensitive (HTTP methods are). paths: the NORMALIZED path (waypoint.paths), without the
  query, case-sensitive. Path templates `{*}` (one segment) and `{**}` (any number of segments, the
  last operator) follow Envoy's URI-template matcher, whose character class excludes `*`; a DENY,
  CUSTOM or AUDIT policy matches any character except `/` instead, so it can only match more.
* request.headers[name]: names are case-insensitive, values have surrounding whitespace removed. A
  header sent several times is checked value by value (checklist item 12): a DENY/CUSTOM/AUDIT
  condition matches when any value matches, an ALLOW condition only when every value does. An absent
  header matches no value and every notValue. `host` and `:authority` give the authority as `hosts`
  sees it but with its port (lower-case, no trailing dot); `:method` the method; `:path` the
  normalized path with the query.
* connection.sni: the waypoint reads HTTP in plaintext inside the HBONE tunnel, so there is no SNI:
  values never match, notValues always do.

Fail closed, for what loom's waypoint cannot evaluate: requestPrincipals / notRequestPrincipals and
request.auth.* (need RequestAuthentication and JWT validation), remoteIpBlocks / notRemoteIpBlocks and
remote.ip (need X-Forwarded-For / PROXY protocol trust configuration), experimental.* keys, unknown
keys, and values that are not valid for their field (a bad CIDR, port or path template). In an ALLOW
policy, a rule using any of them never matches (as ztunnel does with L7 fields). In DENY, CUSTOM and
AUDIT policies the unevaluable field counts as matched and the rest of the rule still applies, so the
rule matches at least whenever Istio's would. Each is reported as a warning diagnostic when built.
An attribute whose request value is unknown (an unparseable peer address, no destination IP) is
handled the same way at evaluation time. An action outside ALLOW/DENY/AUDIT/CUSTOM makes the policy
invalid (deny all in scope).

TCP services (`check_connection`): only L4 attributes exist. As in Istio's TCP filter chains, an
ALLOW rule using any HTTP attribute never matches, and in other policies HTTP attributes count as
matched.

Denials are answered with `RBAC_DENIED_STATUS` and the body `RBAC_DENIED_BODY` (Envoy's text, which
clients and tests recognize).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from loom.identity import SPIFFE_SCHEME
from loom.policy.rbac import StringPatterns, all_of, always, any_of, never
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationPolicy,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)
from waypoint.model import AuthzDecision, Peer, RequestView, ServiceRef
from waypoint.paths import NormalizedPath, PathError, normalize_path

__all__ = [
    "RBAC_DENIED_BODY",
    "RBAC_DENIED_STATUS",
    "AuthzResult",
    "NormalizedPath",
    "PathError",
    "WaypointAuthorizer",
    "normalize_path",
]

RBAC_DENIED_STATUS = 403
RBAC_DENIED_BODY = "RBAC: access denied"

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
_CORE_GROUPS = ("", "core")
_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
# The trust domain Istio treats as "the local one, whatever it is called" in policies.
_LOCAL_TRUST_DOMAIN_POINTER = "cluster.local"
# Envoy URI-template literal characters (RFC 3986 pchar without "*"), for {*} and {**} in ALLOW rules.
_TEMPLATE_PCHAR = r"A-Za-z0-9\-._~%!$&'()+,;:@="
_TEMPLATE_LITERAL = re.compile(rf"[{_TEMPLATE_PCHAR}]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AuthzResult:
    """A decision plus what dry-run policies would have changed (the contract's AuthzDecision has no
    room for the latter; `WaypointAuthorizer.check` folds it into the reason)."""

    decision: AuthzDecision
    dry_run_matches: tuple[str, ...] = ()  # keys of the matching dry-run policies, in evaluation order
    dry_run_allowed: bool = True  # the decision with the dry-run policies enforced as well


# ---------------------------------------------------------------------------------------------------
# the request as the matchers see it


class _View:
    """The attributes of one request (or TCP connection), in the shapes the compiled matchers use."""

    __slots__ = (
        "_headers",
        "dst",
        "host",
        "host_port",
        "l7",
        "method",
        "namespace",
        "path",
        "port",
        "principal",
        "raw_headers",
        "service_account",
        "src",
        "target",
    )

    def __init__(
        self,
        *,
        l7: bool,
        source: Peer,
        service: ServiceRef,
        destination_ip: str,
        method: str = "",
        authority: str = "",
        path: str = "",
        query: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.l7 = l7
        identity = source.identity
        self.principal: str | None = identity.principal if identity is not None else None
        self.namespace: str | None = identity.namespace if identity is not None else None
        self.service_account: tuple[str, str] | None = (
            (identity.namespace, identity.service_account) if identity is not None else None
        )
        self.src = _parse_address(source.address)
        self.dst = _parse_address(destination_ip)
        self.port = service.target_port
        self.method = method
        host, port = _split_host_port(authority)
        self.host: str | None = host or None
        self.host_port: str | None = (f"{host}:{port}" if port else host) or None
        self.path = path
        self.target = f"{path}?{query}" if query else path
        self.raw_headers = headers
        self._headers: dict[str, list[str]] | None = None

    def header_values(self, name: str) -> list[str]:
        """Values of a request header (lower-case name), surrounding whitespace removed."""
        if name in (":authority", "host"):
            return [self.host_port] if self.host_port else []
        if name == ":method":
            return [self.method] if self.method else []
        if name == ":path":
            return [self.target] if self.target else []
        if self._headers is None:
            grouped: dict[str, list[str]] = {}
            for key, value in self.raw_headers:
                grouped.setdefault(key.lower(), []).append(value.strip(" \t"))
            self._headers = grouped
        return self._headers.get(name, [])


def _parse_address(text: str) -> IPAddress | None:
    """An IP from "ip", "ip:port" or "[ipv6]:port"; IPv4-mapped IPv6 becomes IPv4. None if unparseable."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return _parse_ip(text)


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress | None:
    """`_parse_address` without the port, cached: every request of a client parses the same address,
    and ipaddress's parser was a tenth of an authorization."""
    if "%" in text:
        return None  # a zone index does not name one address of the mesh
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_host_port(authority: str) -> tuple[str, str]:
    """(host, port) of an authority or host pattern: lower-case, one trailing dot removed, port "" if
    absent. IPv6 literals keep their brackets."""
    text = authority.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            return text, ""
        host, rest = text[: end + 1], text[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if host.endswith(".") and not host.endswith("*."):
        host = host[:-1]
    return host, port


# ---------------------------------------------------------------------------------------------------
# compiled matchers

_Check = Callable[[_View], bool]


class _Polarity(enum.Enum):
    """How a policy resolves what cannot be evaluated: so that the result is never more permissive."""

    ALLOW = "allow"  # ALLOW: unevaluable -> the rule does not match
    DENY = "deny"  # DENY, CUSTOM, AUDIT: unevaluable -> counts as matched


_patterns = StringPatterns.parse


def _string_check(
    test: Callable[[str], bool], attribute: Callable[[_View], str | None], negate: bool
) -> _Check:
    """A single-valued attribute that may be absent: absent matches no value and every not-value."""
    if negate:

        def none_match(view: _View) -> bool:
            value = attribute(view)
            return value is None or not test(value)

        return none_match

    def any_match(view: _View) -> bool:
        value = attribute(view)
        return value is not None and test(value)

    return any_match


def _principal_of(view: _View) -> str | None:
    return view.principal


def _namespace_of(view: _View) -> str | None:
    return view.namespace


def _method_of(view: _View) -> str | None:
    return view.method or None


def _path_of(view: _View) -> str | None:
    return view.path or None


def _host_of(view: _View) -> str | None:
    return view.host


def _host_port_of(view: _View) -> str | None:
    return view.host_port


def _src_of(view: _View) -> IPAddress | None:
    return view.src


def _dst_of(view: _View) -> IPAddress | None:
    return view.dst


def _parse_block(text: str) -> IPNetwork | None:
    if "%" in text:
        return None
    try:
        block = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    if isinstance(block, ipaddress.IPv6Network) and block.prefixlen >= 96:
        mapped = block.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{block.prefixlen - 96}", strict=False)
    return block


def _parse_port(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.isdecimal():
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None


@dataclass(frozen=True, slots=True)
class _PathMatcher:
    patterns: StringPatterns
    templates: tuple[re.Pattern[str], ...]

    def matches(self, path: str) -> bool:
        if self.patterns.matches(path):
            return True
        for template in self.templates:  # noqa: SIM110 -- per-request path, as above
            if template.fullmatch(path):
                return True
        return False


def _template_regex(template: str, polarity: _Polarity) -> re.Pattern[str] | str:
    """Compile a `{*}` / `{**}` path template; a string explains why it is not a valid template."""
    if not template.startswith("/"):
        return "a path template must start with '/'"
    if polarity is _Polarity.ALLOW:
        one_segment, any_segments = f"[{_TEMPLATE_PCHAR}]+", f"[{_TEMPLATE_PCHAR}/]*"
    else:
        one_segment, any_segments = "[^/]+", ".*"
    segments = template[1:].split("/")
    parts: list[str] = []
    after_text_glob = False
    for i, segment in enumerate(segments):
        if segment in ("{*}", "{**}"):
            if after_text_glob:
                return "{**} must be the last operator of a path template"
            after_text_glob = segment == "{**}"
            parts.append(one_segment if segment == "{*}" else any_segments)
        elif segment == "" and i == len(segments) - 1:
            parts.append("")  # a trailing slash
        elif segment == "":
            return "a path template must not contain an empty segment ('//')"
        elif not _TEMPLATE_LITERAL.fullmatch(segment):
            return (
                f"segment {segment!r}: '*', '{{' and '}}' may only appear as a whole {{*}} or {{**}} "
                "segment, and other characters must be RFC 3986 path characters"
            )
        else:
            parts.append(re.escape(segment))
    return re.compile("/" + "/".join(parts), re.DOTALL)


# ---------------------------------------------------------------------------------------------------
# compiling one policy


class _Kind(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"
    INVALID = "INVALID"  # matches every request in its scope and denies it


@dataclass(frozen=True, slots=True, eq=False)
class _CompiledPolicy:
    key: str  # "<namespace>/<name>"
    kind: _Kind
    dry_run: bool
    http_rules: tuple[_Check, ...] = field(repr=False)
    tcp_rules: tuple[_Check, ...] = field(repr=False)
    detail: str = ""  # why an INVALID policy is invalid; the provider of a CUSTOM one

    def matches(self, view: _View) -> bool:
        if self.kind is _Kind.INVALID:
            return True
        for rule in self.http_rules if view.l7 else self.tcp_rules:  # noqa: SIM110 -- per-request path
            if rule(view):
                return True
        return False


@dataclass(frozen=True, slots=True)
class _TrustDomains:
    names: tuple[str, ...]  # the mesh trust domain first, then its aliases

    def expand(self, pattern: str) -> list[str]:
        """A principal pattern as it must be compared: without spiffe://, across trust-domain aliases."""
        value = pattern.removeprefix(SPIFFE_SCHEME)
        if value.startswith("*"):
            return [value]  # the policy does not care about the trust domain
        trust_domain, slash, rest = value.partition("/")
        if not slash:
            return [value]
        if trust_domain == _LOCAL_TRUST_DOMAIN_POINTER or trust_domain in self.names:
            return [f"{name}/{rest}" for name in self.names]
        return [value]


class _RuleCompiler:
    """Compiles the rules of one policy, reporting what cannot be evaluated as warnings."""

    def __init__(
        self,
        policy: AuthorizationPolicy,
        polarity: _Polarity,
        trust_domains: _TrustDomains,
        diagnostics: list[Diagnostic],
    ) -> None:
        self.policy = policy
        self.polarity = polarity
        self.trust_domains = trust_domains
        self.diagnostics = diagnostics
        self.unevaluable = False  # in the rule being compiled
        self.uses_http = False  # in the rule being compiled

    # -- reporting

    def _warn(self, path: str, message: str) -> None:
        self.diagnostics.append(
            Diagnostic(Severity.WARNING, message, self.policy.origin, self.policy.key, path)
        )

    def _unevaluable(self, path: str, why: str) -> _Check:
        """A field loom cannot evaluate: the rule never matches (ALLOW) or the field is satisfied."""
        self.unevaluable = True
        if self.polarity is _Polarity.ALLOW:
            effect = "this rule never matches (the ALLOW policy fails closed)"
        else:
            effect = f"the field counts as matched (the {self.policy.action} policy fails closed)"
        self._warn(path, f"{why}; {effect}")
        return always

    def _http(self, check: _Check) -> _Check:
        """An HTTP-only attribute. Over TCP it is unknown: satisfied in DENY-like policies (ALLOW rules
        using one are left out of the TCP rule set altogether)."""
        self.uses_http = True
        if self.polarity is _Polarity.ALLOW:
            return check

        def http_or_satisfied(view: _View) -> bool:
            return not view.l7 or check(view)

        return http_or_satisfied

    def _unknown_is(self) -> bool:
        """What an attribute whose request value is unknown evaluates to."""
        return self.polarity is _Polarity.DENY

    # -- rules

    def compile_rule(self, rule: PolicyRule, path: str) -> tuple[_Check, bool]:
        """(the rule's check, whether it uses HTTP attributes)."""
        self.unevaluable = False
        self.uses_http = False
        sources = [self._source(s, f"{path}.from[{i}].source") for i, s in enumerate(rule.sources)]
        operations = [self._operation(o, f"{path}.to[{i}].operation") for i, o in enumerate(rule.operations)]
        conditions = [self._condition(c, f"{path}.when[{i}]") for i, c in enumerate(rule.conditions)]
        if self.unevaluable and self.polarity is _Polarity.ALLOW:
            return never, self.uses_http
        parts: list[_Check] = []
        if rule.sources:
            parts.append(any_of(sources))
        if rule.operations:
            parts.append(any_of(operations))
        parts.extend(conditions)
        return all_of(parts), self.uses_http

    def _source(self, source: PolicySource, path: str) -> _Check:
        checks: list[_Check] = []
        for values, negate in ((source.principals, False), (source.not_principals, True)):
            if values:
                checks.append(self._principal_check(values, negate))
        for values, negate in ((source.namespaces, False), (source.not_namespaces, True)):
            if values:
                checks.append(_string_check(_patterns(values).matches, _namespace_of, negate))
        for values, negate, name in (
            (source.service_accounts, False, "serviceAccounts"),
            (source.not_service_accounts, True, "notServiceAccounts"),
        ):
            if values:
                checks.append(self._service_account_check(values, negate, f"{path}.{name}"))
        for values, negate, name in (
            (source.ip_blocks, False, "ipBlocks"),
            (source.not_ip_blocks, True, "notIpBlocks"),
        ):
            if values:
                checks.append(self._ip_check(values, negate, _src_of, f"{path}.{name}"))
        for values, name in (
            (source.request_principals, "requestPrincipals"),
            (source.not_request_principals, "notRequestPrincipals"),
        ):
            if values:
                checks.append(
                    self._unevaluable(
                        f"{path}.{name}",
                        f"{name} needs JWT authentication, which loom's waypoint does not do",
                    )
                )
        for values, name in (
            (source.remote_ip_blocks, "remoteIpBlocks"),
            (source.not_remote_ip_blocks, "notRemoteIpBlocks"),
        ):
            if values:
                checks.append(
                    self._unevaluable(
                        f"{path}.{name}",
                        f"{name} needs trusted X-Forwarded-For or PROXY protocol configuration, which "
                        "loom's waypoint does not have",
                    )
                )
        return all_of(checks)

    def _operation(self, operation: PolicyOperation, path: str) -> _Check:
        checks: list[_Check] = []
        for values, negate, name in (
            (operation.ports, False, "ports"),
            (operation.not_ports, True, "notPorts"),
        ):
            if values:
                checks.append(self._port_check(values, negate, f"{path}.{name}"))
        for values, negate in ((operation.methods, False), (operation.not_methods, True)):
            if values:
                checks.append(self._http(_string_check(_patterns(values).matches, _method_of, negate)))
        for values, negate in ((operation.hosts, False), (operation.not_hosts, True)):
            if values:
                checks.append(self._http(self._host_check(values, negate)))
        for values, negate, name in (
            (operation.paths, False, "paths"),
            (operation.not_paths, True, "notPaths"),
        ):
            if values:
                checks.append(self._http(self._path_check(values, negate, f"{path}.{name}")))
        return all_of(checks)

    def _condition(self, condition: PolicyCondition, path: str) -> _Check:
        key = condition.key
        if not condition.values and not condition.not_values:
            return self._unevaluable(path, f"condition {key!r} sets neither values nor notValues")
        here_values, here_not = f"{path}.values", f"{path}.notValues"
        parts: list[_Check] = []
        if key.startswith("request.headers[") and key.endswith("]") and len(key) > len("request.headers[]"):
            name = key[len("request.headers[") : -1].strip().lower()
            return self._http(self._header_check(name, condition.values, condition.not_values))
        for values, negate, here in (
            (condition.values, False, here_values),
            (condition.not_values, True, here_not),
        ):
            if not values:
                continue
            if key == "source.principal":
                parts.append(self._principal_check(values, negate))
            elif key == "source.namespace":
                parts.append(_string_check(_patterns(values).matches, _namespace_of, negate))
            elif key == "source.serviceAccount":
                parts.append(self._service_account_check(values, negate, here))
            elif key == "source.ip":
                parts.append(self._ip_check(values, negate, _src_of, here))
            elif key == "destination.ip":
                parts.append(self._ip_check(values, negate, _dst_of, here))
            elif key == "destination.port":
                parts.append(self._port_check(values, negate, here))
            elif key == "connection.sni":
                parts.append(self._sni_check(negate))
            elif key == "remote.ip":
                return self._unevaluable(
                    f"{path}.key",
                    "remote.ip needs trusted X-Forwarded-For or PROXY protocol configuration, which loom's "
                    "waypoint does not have",
                )
            elif key.startswith("request.auth."):
                return self._unevaluable(
                    f"{path}.key", f"{key} needs JWT authentication, which loom's waypoint does not do"
                )
            elif key.startswith("experimental."):
                return self._unevaluable(f"{path}.key", f"experimental key {key!r} is not supported by loom")
            else:
                return self._unevaluable(f"{path}.key", f"unknown condition key {key!r}")
        return all_of(parts)

    # -- attribute matchers

    def _principal_check(self, values: Sequence[str], negate: bool) -> _Check:
        expanded = [p for value in values for p in self.trust_domains.expand(value)]
        return _string_check(_patterns(expanded).matches, _principal_of, negate)

    def _service_account_check(self, values: Sequence[str], negate: bool, path: str) -> _Check:
        accounts: set[tuple[str, str]] = set()
        for i, value in enumerate(values):
            namespace, slash, account = value.strip().rpartition("/")
            if not slash:
                namespace = self.policy.namespace
            if not namespace or not account or "/" in namespace:
                return self._unevaluable(
                    f"{path}[{i}]", f'{value!r} is not "<service account>" or "<namespace>/<service account>"'
                )
            accounts.add((namespace, account))
        frozen = frozenset(accounts)
        if negate:
            return lambda view: view.service_account is None or view.service_account not in frozen
        return lambda view: view.service_account is not None and view.service_account in frozen

    def _ip_check(
        self, values: Sequence[str], negate: bool, attribute: Callable[[_View], IPAddress | None], path: str
    ) -> _Check:
        blocks: list[IPNetwork] = []
        for i, value in enumerate(values):
            block = _parse_block(value)
            if block is None:
                return self._unevaluable(f"{path}[{i}]", f"{value!r} is not an IP address or CIDR block")
            blocks.append(block)
        frozen = tuple(blocks)
        unknown = self._unknown_is()

        def ip_check(view: _View) -> bool:
            address = attribute(view)
            if address is None:
                return unknown
            inside = False
            for block in frozen:
                if address in block:
                    inside = True
                    break
            return not inside if negate else inside

        return ip_check

    def _port_check(self, values: Sequence[str], negate: bool, path: str) -> _Check:
        ports: set[int] = set()
        for i, value in enumerate(values):
            port = _parse_port(value)
            if port is None:
                return self._unevaluable(
                    f"{path}[{i}]", f"{value!r} is not a port number between 1 and 65535"
                )
            ports.add(port)
        frozen = frozenset(ports)
        if negate:
            return lambda view: view.port not in frozen
        return lambda view: view.port in frozen

    def _host_check(self, values: Sequence[str], negate: bool) -> _Check:
        host_only: list[str] = []
        with_port: list[str] = []
        for value in values:
            host, port = _split_host_port(value)
            if port:
                with_port.append(f"{host}:{port}")
            else:
                host_only.append(host)
        host_patterns = _patterns(host_only)
        port_patterns = _patterns(with_port)
        checks: list[_Check] = []
        if host_only:
            checks.append(_string_check(host_patterns.matches, _host_of, False))
        if with_port:
            checks.append(_string_check(port_patterns.matches, _host_port_of, False))
        matched = any_of(checks)
        if negate:
            return lambda view: not matched(view)
        return matched

    def _path_check(self, values: Sequence[str], negate: bool, path: str) -> _Check:
        plain: list[str] = []
        templates: list[re.Pattern[str]] = []
        for i, value in enumerate(values):
            if "{*}" in value or "{**}" in value:
                compiled = _template_regex(value, self.polarity)
                if isinstance(compiled, str):
                    return self._unevaluable(f"{path}[{i}]", f"invalid path template {value!r}: {compiled}")
                templates.append(compiled)
            else:
                plain.append(value)
        matcher = _PathMatcher(_patterns(plain), tuple(templates))
        return _string_check(matcher.matches, _path_of, negate)

    def _sni_check(self, negate: bool) -> _Check:
        # HTTP arrives in plaintext inside the HBONE tunnel, so an HTTP request has no SNI (an absent
        # attribute). Over TCP the stream may be TLS the waypoint does not inspect: the value is unknown.
        unknown = self._unknown_is()
        return lambda view: negate if view.l7 else unknown

    def _header_check(self, name: str, values: Sequence[str], not_values: Sequence[str]) -> _Check:
        positive = _patterns(values) if values else None
        negative = _patterns(not_values) if not_values else None

        def value_matches(value: str) -> bool:
            if positive is not None and not positive.matches(value):
                return False
            return negative is None or not negative.matches(value)

        every_value = self.polarity is _Polarity.ALLOW

        def header_check(view: _View) -> bool:
            sent = view.header_values(name)
            if not sent:
                return positive is None  # absent: matches no value, every notValue
            if every_value:
                for value in sent:  # noqa: SIM110 -- per-request path
                    if not value_matches(value):
                        return False
                return True
            for value in sent:  # noqa: SIM110 -- per-request path
                if value_matches(value):
                    return True
            return False

        return header_check


def _compile_policy(
    policy: AuthorizationPolicy, trust_domains: _TrustDomains, diagnostics: list[Diagnostic]
) -> _CompiledPolicy:
    key = f"{policy.namespace}/{policy.name}"
    action = policy.action or "ALLOW"
    if policy.invalid or action not in _ACTIONS:
        detail = "it failed validation" if policy.invalid else f"unknown action {action!r}"
        diagnostics.append(
            Diagnostic(
                Severity.WARNING,
                f"invalid policy ({detail}): the waypoint denies every request it targets until it is fixed",
                policy.origin,
                policy.key,
                "" if policy.invalid else "spec.action",
            )
        )
        return _CompiledPolicy(key, _Kind.INVALID, policy.dry_run, (), (), detail)
    kind = _Kind(action)
    polarity = _Polarity.ALLOW if kind is _Kind.ALLOW else _Polarity.DENY
    if kind is _Kind.CUSTOM:
        diagnostics.append(
            Diagnostic(
                Severity.WARNING,
                f"CUSTOM (external authorization, provider {policy.provider!r}) is not supported by loom's "
                "waypoint: requests matching this policy's rules are denied",
                policy.origin,
                policy.key,
                "spec.action",
            )
        )
    compiler = _RuleCompiler(policy, polarity, trust_domains, diagnostics)
    http_rules: list[_Check] = []
    tcp_rules: list[_Check] = []
    for i, rule in enumerate(policy.rules or ()):
        check, uses_http = compiler.compile_rule(rule, f"spec.rules[{i}]")
        http_rules.append(check)
        if polarity is _Polarity.DENY or not uses_http:
            tcp_rules.append(check)
    return _CompiledPolicy(key, kind, policy.dry_run, tuple(http_rules), tuple(tcp_rules), policy.provider)


# ---------------------------------------------------------------------------------------------------
# scope and decision


@dataclass(frozen=True, slots=True)
class _PolicySet:
    """The policies that apply to one scope, split by the phase that evaluates them."""

    customs: tuple[_CompiledPolicy, ...] = ()
    denies: tuple[_CompiledPolicy, ...] = ()  # DENY and INVALID
    allows: tuple[_CompiledPolicy, ...] = ()
    audits: tuple[_CompiledPolicy, ...] = ()
    dry_runs: tuple[_CompiledPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[_CompiledPolicy]) -> _PolicySet:
        ordered = sorted({p.key: p for p in policies}.values(), key=lambda p: p.key)
        enforced = [p for p in ordered if not p.dry_run]
        return cls(
            customs=tuple(p for p in enforced if p.kind is _Kind.CUSTOM),
            denies=tuple(p for p in enforced if p.kind in (_Kind.DENY, _Kind.INVALID)),
            allows=tuple(p for p in enforced if p.kind is _Kind.ALLOW),
            audits=tuple(p for p in enforced if p.kind is _Kind.AUDIT),
            dry_runs=tuple(p for p in ordered if p.dry_run),
        )

    @property
    def empty(self) -> bool:
        return not (self.customs or self.denies or self.allows or self.audits or self.dry_runs)

    @property
    def keys(self) -> tuple[str, ...]:
        every = (*self.customs, *self.denies, *self.allows, *self.audits, *self.dry_runs)
        return tuple(sorted(p.key for p in every))


def _deny_reason(policy: _CompiledPolicy) -> str:
    if policy.kind is _Kind.CUSTOM:
        return (
            f"denied by CUSTOM policy {policy.key} (external authorization with provider "
            f"{policy.detail!r} is not supported; loom fails closed)"
        )
    if policy.kind is _Kind.INVALID:
        return f"denied by invalid policy {policy.key} ({policy.detail}; it denies everything it targets)"
    return f"denied by DENY policy {policy.key}"


# The answer wherever no policy applies (shared: the result is immutable).
_NO_POLICY = AuthzResult(AuthzDecision(True, "", "no ALLOW policy applies", ()), (), True)


def _decide(policies: _PolicySet, view: _View) -> AuthzResult:
    audited = tuple(p.key for p in policies.audits if p.matches(view))

    decision: AuthzDecision | None = None
    for policy in (*policies.customs, *policies.denies):
        if policy.matches(view):
            decision = AuthzDecision(False, policy.key, _deny_reason(policy), audited)
            break
    allowed_by = ""
    if decision is None:
        if not policies.allows:
            decision = AuthzDecision(True, "", "no ALLOW policy applies", audited)
        else:
            allowed_by = next((p.key for p in policies.allows if p.matches(view)), "")
            if allowed_by:
                decision = AuthzDecision(True, allowed_by, f"allowed by ALLOW policy {allowed_by}", audited)
            else:
                checked = ", ".join(p.key for p in policies.allows)
                decision = AuthzDecision(False, "", f"no ALLOW policy matched (checked {checked})", audited)

    if not policies.dry_runs:
        return AuthzResult(decision, (), decision.allowed)
    dry_matches: list[str] = []
    dry_deny = dry_allow_exists = dry_allow_matched = False
    for policy in policies.dry_runs:
        is_allow = policy.kind is _Kind.ALLOW
        dry_allow_exists |= is_allow
        if policy.matches(view):
            dry_matches.append(policy.key)
            dry_allow_matched |= is_allow
            dry_deny |= policy.kind in (_Kind.DENY, _Kind.CUSTOM, _Kind.INVALID)
    # The decision with the dry-run policies enforced as well.
    denied_by_enforced_deny = not decision.allowed and decision.policy != ""
    if dry_deny or denied_by_enforced_deny:
        shadow = False
    elif not policies.allows and not dry_allow_exists:
        shadow = True
    else:
        shadow = bool(allowed_by) or dry_allow_matched
    return AuthzResult(decision, tuple(dry_matches), shadow)


class WaypointAuthorizer:
    """The L7 authorizer of one waypoint (implements waypoint.model.Authorizer).

    Immutable once built; build a new one when the policy set changes and swap it in.
    """

    def __init__(
        self,
        waypoint: tuple[str, str],
        gateway_wide: _PolicySet,
        per_service: Mapping[tuple[str, str], _PolicySet],
        diagnostics: tuple[Diagnostic, ...],
    ) -> None:
        self.waypoint = waypoint
        self._gateway_wide = gateway_wide
        self._per_service = dict(per_service)
        self.diagnostics = diagnostics

    @classmethod
    def build(
        cls,
        policies: Sequence[AuthorizationPolicy],
        *,
        waypoint: tuple[str, str],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        trust_domain_aliases: Sequence[str] = (),
    ) -> WaypointAuthorizer:
        """Select and compile the policies for the waypoint Gateway `waypoint` = (namespace, name).

        `policies` may be every AuthorizationPolicy of the mesh; the ones that do not target this
        waypoint (or a Service) are skipped. Problems are in `diagnostics`, never raised.
        """
        waypoint_namespace, waypoint_name = waypoint
        names = tuple(dict.fromkeys((trust_domain, *trust_domain_aliases)))
        trust_domains = _TrustDomains(names)
        diagnostics: list[Diagnostic] = []
        gateway_wide: list[_CompiledPolicy] = []
        per_service: dict[tuple[str, str], list[_CompiledPolicy]] = {}
        for policy in policies:
            if not policy.target_refs:
                continue  # selector / namespace / mesh-wide: enforced by ztunnel, ignored by waypoints
            on_gateway = False
            services: list[tuple[str, str]] = []
            for i, ref in enumerate(policy.target_refs):
                target = _target_of(ref, policy, waypoint_namespace, waypoint_name, root_namespace)
                if isinstance(target, str):
                    diagnostics.append(
                        Diagnostic(
                            Severity.WARNING, target, policy.origin, policy.key, f"spec.targetRefs[{i}]"
                        )
                    )
                elif isinstance(target, tuple):
                    services.append(target)
                elif target:
                    on_gateway = True
            if not on_gateway and not services:
                continue
            compiled = _compile_policy(policy, trust_domains, diagnostics)
            if on_gateway:
                gateway_wide.append(compiled)  # covers its Service targets too
            else:
                for service in services:
                    per_service.setdefault(service, []).append(compiled)
        return cls(
            waypoint,
            _PolicySet.of(gateway_wide),
            {service: _PolicySet.of([*gateway_wide, *extra]) for service, extra in per_service.items()},
            tuple(diagnostics),
        )

    # -- deciding

    def check(self, request: RequestView) -> AuthzDecision:
        """Authorize one HTTP request (its `path` must be normalized). Dry-run matches are named in the
        reason; use `evaluate` for them as data."""
        result = self.evaluate(request)
        return _with_dry_run_note(result)

    def evaluate(self, request: RequestView) -> AuthzResult:
        policies = self._policies_for(request.service)
        if policies.empty:
            return _NO_POLICY  # nothing to match against: not even the request's view is needed
        view = _View(
            l7=True,
            source=request.source,
            service=request.service,
            destination_ip=request.destination_ip,
            method=request.method,
            authority=request.authority,
            path=request.path,
            query=request.query,
            headers=request.headers,
        )
        return _decide(policies, view)

    def check_connection(self, source: Peer, service: ServiceRef, destination_ip: str = "") -> AuthzDecision:
        """Authorize one connection to a Service the waypoint handles as TCP (L4 attributes only)."""
        return _with_dry_run_note(self.evaluate_connection(source, service, destination_ip))

    def evaluate_connection(self, source: Peer, service: ServiceRef, destination_ip: str = "") -> AuthzResult:
        view = _View(l7=False, source=source, service=service, destination_ip=destination_ip)
        return _decide(self._policies_for(service), view)

    # -- introspection (loomctl, config dumps, tests)

    def policies_for(self, namespace: str, name: str) -> tuple[str, ...]:
        """Keys of the policies that apply to requests for the Service namespace/name, sorted."""
        return self._per_service.get((namespace, name), self._gateway_wide).keys

    @property
    def gateway_policies(self) -> tuple[str, ...]:
        """Keys of the policies that apply to all of the waypoint's traffic."""
        return self._gateway_wide.keys

    @property
    def service_policies(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """Per targeted Service (namespace, name): the keys of the policies that apply to it."""
        return {service: policies.keys for service, policies in sorted(self._per_service.items())}

    def _policies_for(self, service: ServiceRef) -> _PolicySet:
        return self._per_service.get((service.namespace, service.name), self._gateway_wide)


def _target_of(
    ref: PolicyTargetRef,
    policy: AuthorizationPolicy,
    waypoint_namespace: str,
    waypoint_name: str,
    root_namespace: str,
) -> bool | tuple[str, str] | str:
    """What one targetRef selects for this waypoint: True (all of its traffic), a Service (namespace,
    name), False (nothing here), or a string: a warning explaining why the reference is ignored."""
    if ref.namespace and ref.namespace != policy.namespace:
        return (
            f"targetRef to {ref.kind} {ref.namespace}/{ref.name}: cross-namespace targets are not allowed; "
            "ignored"
        )
    if ref.kind == "Gateway" and ref.group == GATEWAY_API_GROUP:
        return policy.namespace == waypoint_namespace and ref.name == waypoint_name
    if ref.kind == "GatewayClass" and ref.group == GATEWAY_API_GROUP:
        if policy.namespace != root_namespace:
            return (
                f"a GatewayClass target only takes effect in the root namespace {root_namespace!r}; ignored"
            )
        return ref.name == WAYPOINT_GATEWAY_CLASS
    if ref.kind == "Service" and ref.group in _CORE_GROUPS:
        return (policy.namespace, ref.name)
    if ref.kind == "ServiceEntry":
        return "loom has no ServiceEntry, so no request through a waypoint addresses one; ignored"
    return f"unsupported target {ref.group or 'core'}/{ref.kind} {ref.name!r}; ignored"


def _with_dry_run_note(result: AuthzResult) -> AuthzDecision:
    if not result.dry_run_matches:
        return result.decision
    outcome = "allowed" if result.dry_run_allowed else "denied"
    note = f"; dry-run policies matched: {', '.join(result.dry_run_matches)} (would have been {outcome})"
    return replace(result.decision, reason=result.decision.reason + note)
