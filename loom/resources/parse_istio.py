"""Parsers for security.istio.io (v1 and v1beta1 share one shape): AuthorizationPolicy, PeerAuthentication.

The checks are the ones Istio's validation webhook applies, so a policy accepted here is one istiod
would accept too: selector and targetRef(s) are mutually exclusive, CUSTOM needs a provider, a DENY or
CUSTOM policy needs rules, sources and operations must not be empty, values must not be empty strings,
ports are numbers, IP blocks are addresses or CIDR ranges, `when` keys are known attributes, `*` in a
principal or namespace is only a whole value, prefix or suffix, and serviceAccounts cannot be mixed
with principals or namespaces in one source. Policy semantics (what ztunnel can enforce, fail-closed
handling of L7 fields) belong to translation, not here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from loom.resources.model import (
    AuthorizationPolicy,
    ObjectMeta,
    Origin,
    PeerAuthentication,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)
from loom.resources.parse_common import (
    Problems,
    check_fields,
    dns_label_problem,
    dns_subdomain_problem,
    get_enum,
    get_list,
    get_mapping,
    get_str,
    get_strs,
    int_keys,
    ip_or_cidr_problem,
    is_int,
    is_list,
    is_mapping,
    items_of,
    join,
    quote,
    read_label_selector,
    type_name,
)

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MTLS_MODES = ("UNSET", "PERMISSIVE", "STRICT", "DISABLE")

AUTHZ_SPEC_FIELDS = frozenset({"selector", "targetRef", "targetRefs", "action", "provider", "rules"})
TARGET_REF_FIELDS = frozenset({"group", "kind", "name", "namespace"})
PROVIDER_FIELDS = frozenset({"name"})
RULE_FIELDS = frozenset({"from", "to", "when"})
CONDITION_FIELDS = frozenset({"key", "values", "notValues"})

# (API field, model attribute) of rules[].from[].source and rules[].to[].operation.
SOURCE_FIELDS = (
    ("principals", "principals"),
    ("notPrincipals", "not_principals"),
    ("requestPrincipals", "request_principals"),
    ("notRequestPrincipals", "not_request_principals"),
    ("namespaces", "namespaces"),
    ("notNamespaces", "not_namespaces"),
    ("serviceAccounts", "service_accounts"),
    ("notServiceAccounts", "not_service_accounts"),
    ("ipBlocks", "ip_blocks"),
    ("notIpBlocks", "not_ip_blocks"),
    ("remoteIpBlocks", "remote_ip_blocks"),
    ("notRemoteIpBlocks", "not_remote_ip_blocks"),
)
OPERATION_FIELDS = (
    ("hosts", "hosts"),
    ("notHosts", "not_hosts"),
    ("ports", "ports"),
    ("notPorts", "not_ports"),
    ("methods", "methods"),
    ("notMethods", "not_methods"),
    ("paths", "paths"),
    ("notPaths", "not_paths"),
)
SOURCE_FIELD_NAMES = frozenset(f for f, _ in SOURCE_FIELDS)
OPERATION_FIELD_NAMES = frozenset(f for f, _ in OPERATION_FIELDS)
WILDCARD_FIELDS = frozenset(
    {
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
    }
)
IP_FIELDS = frozenset({"ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"})
SERVICE_ACCOUNT_FIELDS = frozenset({"serviceAccounts", "notServiceAccounts"})
# Source fields an external authorizer (CUSTOM) cannot match on, as Istio rejects them there.
CUSTOM_UNSUPPORTED_SOURCE = frozenset(
    {
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
        "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts",
    }
)  # fmt: skip

# Targets Istio accepts for targetRef(s): (group, kind); the core group may be written "" or "core".
ALLOWED_TARGETS = frozenset(
    {
        ("", "Service"),
        ("networking.istio.io", "ServiceEntry"),
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "GatewayClass"),
    }
)

# `when` keys: exact attributes, and attributes that take a [name] suffix.
CONDITION_KEYS = frozenset(
    {
        "source.ip", "source.namespace", "source.principal", "source.serviceAccount", "remote.ip",
        "destination.ip", "destination.port", "request.auth.principal", "request.auth.audiences",
        "request.auth.presenter", "connection.sni",
    }
)  # fmt: skip
CONDITION_MAP_KEYS = ("request.headers", "request.auth.claims")
CONDITION_EXPERIMENTAL = "experimental.envoy.filters."
CONDITION_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
CUSTOM_UNSUPPORTED_KEYS = frozenset({"source.namespace", "source.serviceAccount", "source.principal"})

# Path templates ({*} and {**}) Envoy cannot express: named variables, empty braces, bare * segments.
_UNSUPPORTED_PATH_TEMPLATE = re.compile(r"/\{\w+=\*\*?\}|\{\w*\}|/\*\*?|\*\*?/")
_MAP_KEY = re.compile(r"[^\[\]]+\[[^\[\]]+\]\Z")


def wildcard_problem(value: str) -> str | None:
    if "*" not in value or value == "*":
        return None
    if value.count("*") == 1 and (value[0] == "*" or value[-1] == "*"):
        return None
    return f"{quote(value)}: '*' is only allowed as the whole value, a prefix (*x) or a suffix (x*)"


def service_account_problem(value: str) -> str | None:
    namespace, slash, account = value.rpartition("/")
    if "/" in namespace or (slash and not namespace):
        return f'{quote(value)}: expected "<service account>" or "<namespace>/<service account>"'
    if slash and dns_label_problem(namespace) is not None:
        return f"{quote(value)}: invalid namespace {quote(namespace)}"
    if dns_subdomain_problem(account) is not None:
        return f"{quote(value)}: invalid service account name {quote(account)}"
    return None


def read_port_list(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> tuple[str, ...]:
    """Ports are strings in the API ("9080"), but users write numbers too; both are stored as strings."""
    value = m.get(key)
    if value is None:
        return ()
    here = join(path, key)
    if not is_list(value):
        p.error(here, f"expected a list of port numbers, got {type_name(value)}")
        return ()
    ports: list[str] = []
    for i, item in enumerate(value):
        number: int | None = None
        if is_int(item):
            number = item
        elif isinstance(item, str) and item.isascii() and item.isdecimal():
            number = int(item)
        if number is None or not 1 <= number <= 65535:
            shown = quote(item) if isinstance(item, str) else f"{type_name(item)} {item!r}"
            p.error(f"{here}[{i}]", f"must be a port number between 1 and 65535, got {shown}")
            continue
        ports.append(str(number))
    return tuple(ports)


def read_target_ref(p: Problems, ref: Mapping[Any, Any], path: str, namespace: str) -> PolicyTargetRef:
    check_fields(p, ref, TARGET_REF_FIELDS, path)
    kind = get_str(p, ref, "kind", path, required=True)
    name = get_str(p, ref, "name", path, required=True)
    group = get_str(p, ref, "group", path)
    if group == "core":
        group = ""
    ref_namespace = get_str(p, ref, "namespace", path)
    if ref_namespace and ref_namespace != namespace:
        p.error(join(path, "namespace"), "cross-namespace targets are not supported; omit the namespace")
    if kind and (group, kind) not in ALLOWED_TARGETS:
        p.error(
            path,
            f'unsupported target {quote(group + "/" + kind)}: expected kind Service (group ""), ServiceEntry '
            "(group networking.istio.io), or Gateway or GatewayClass (group gateway.networking.k8s.io)",
        )
    return PolicyTargetRef(kind=kind, name=name, group=group, namespace=ref_namespace)


def read_source(p: Problems, src: Mapping[Any, Any], path: str, action: str) -> PolicySource:
    check_fields(p, src, SOURCE_FIELD_NAMES, path)
    values: dict[str, tuple[str, ...]] = {}
    for field, attr in SOURCE_FIELDS:
        items = get_strs(p, src, field, path, non_empty_items=True)
        values[attr] = items
        if not items:
            continue
        here = join(path, field)
        for i, item in enumerate(items):
            if field in WILDCARD_FIELDS:
                problem = wildcard_problem(item)
            elif field in IP_FIELDS:
                problem = ip_or_cidr_problem(item)
            elif field in SERVICE_ACCOUNT_FIELDS:
                problem = service_account_problem(item)
            else:
                problem = None
            if problem is not None:
                p.error(f"{here}[{i}]", problem)
        if action == "CUSTOM" and field in CUSTOM_UNSUPPORTED_SOURCE:
            p.error(here, "not supported with action CUSTOM")
    source = PolicySource(**values)
    if not any(values.values()) and not any(src.get(f) for f in SOURCE_FIELD_NAMES):
        p.error(path, "source must not be empty")
    identity_fields = source.principals or source.not_principals or source.namespaces or source.not_namespaces
    if identity_fields and (source.service_accounts or source.not_service_accounts):
        p.error(path, "serviceAccounts cannot be combined with principals or namespaces in one source")
    return source


def read_operation(p: Problems, op: Mapping[Any, Any], path: str) -> PolicyOperation:
    check_fields(p, op, OPERATION_FIELD_NAMES, path)
    values: dict[str, tuple[str, ...]] = {}
    for field, attr in OPERATION_FIELDS:
        if field in ("ports", "notPorts"):
            values[attr] = read_port_list(p, op, field, path)
        else:
            values[attr] = get_strs(p, op, field, path, non_empty_items=True)
    for field in ("paths", "notPaths"):
        for i, value in enumerate(op.get(field) or ()):
            if (
                isinstance(value, str)
                and ("{*}" in value or "{**}" in value)
                and _UNSUPPORTED_PATH_TEMPLATE.search(value)
            ):
                p.error(f"{join(path, field)}[{i}]", f"{quote(value)}: invalid or unsupported path template")
    if not any(values.values()) and not any(op.get(f) for f in OPERATION_FIELD_NAMES):
        p.error(path, "operation must not be empty")
    return PolicyOperation(**values)


def condition_key_problem(key: str) -> str | None:
    if key in CONDITION_KEYS:
        return None
    for prefix in CONDITION_MAP_KEYS:
        if key.startswith(prefix + "["):
            return None if _MAP_KEY.match(key) else f"{quote(key)}: expected the form {prefix}[<name>]"
    if key.startswith(CONDITION_EXPERIMENTAL):
        return (
            None
            if _MAP_KEY.match(key)
            else f"{quote(key)}: expected the form {CONDITION_EXPERIMENTAL}<filter>[<key>]"
        )
    return f"unknown key {quote(key)}"


def read_condition(p: Problems, c: Mapping[Any, Any], path: str, action: str) -> PolicyCondition:
    check_fields(p, c, CONDITION_FIELDS, path)
    key = get_str(p, c, "key", path, required=True)
    values = get_strs(p, c, "values", path, non_empty_items=True)
    not_values = get_strs(p, c, "notValues", path, non_empty_items=True)
    if key:
        problem = condition_key_problem(key)
        if problem is not None:
            p.error(join(path, "key"), problem)
        elif action == "CUSTOM" and (key in CUSTOM_UNSUPPORTED_KEYS or key.startswith("request.auth.")):
            p.error(join(path, "key"), f"{quote(key)} is not supported with action CUSTOM")
        if not values and not not_values and not c.get("values") and not c.get("notValues"):
            p.error(path, "at least one of values or notValues must be set")
        for field, items in (("values", values), ("notValues", not_values)):
            for i, item in enumerate(items):
                if key in CONDITION_IP_KEYS:
                    value_problem = ip_or_cidr_problem(item)
                elif key == "destination.port":
                    ok = item.isascii() and item.isdecimal() and 1 <= int(item) <= 65535
                    value_problem = (
                        None if ok else f"must be a port number between 1 and 65535, got {quote(item)}"
                    )
                else:
                    value_problem = None
                if value_problem is not None:
                    p.error(f"{join(path, field)}[{i}]", value_problem)
    return PolicyCondition(key=key, values=values, not_values=not_values)


def _explicitly_empty(m: Mapping[Any, Any], key: str) -> bool:
    value = m.get(key)
    return is_list(value) and len(value) == 0


def read_rule(p: Problems, rule: Mapping[Any, Any], path: str, action: str) -> PolicyRule:
    check_fields(p, rule, RULE_FIELDS, path)
    sources: list[PolicySource] = []
    if _explicitly_empty(rule, "from"):
        p.error(join(path, "from"), "must not be empty (omit it to match any source)")
    for from_path, entry in items_of(p, rule, "from", path):
        check_fields(p, entry, frozenset({"source"}), from_path)
        src = get_mapping(p, entry, "source", from_path)
        if src is not None:
            sources.append(read_source(p, src, join(from_path, "source"), action))
        elif entry.get("source") is None:
            p.error(join(from_path, "source"), "required field is missing")
    operations: list[PolicyOperation] = []
    if _explicitly_empty(rule, "to"):
        p.error(join(path, "to"), "must not be empty (omit it to match any operation)")
    for to_path, entry in items_of(p, rule, "to", path):
        check_fields(p, entry, frozenset({"operation"}), to_path)
        op = get_mapping(p, entry, "operation", to_path)
        if op is not None:
            operations.append(read_operation(p, op, join(to_path, "operation")))
        elif entry.get("operation") is None:
            p.error(join(to_path, "operation"), "required field is missing")
    conditions = [read_condition(p, c, c_path, action) for c_path, c in items_of(p, rule, "when", path)]
    return PolicyRule(sources=tuple(sources), operations=tuple(operations), conditions=tuple(conditions))


def parse_authorization_policy(
    p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None
) -> AuthorizationPolicy:
    spec = get_mapping(p, doc, "spec", "")
    if spec is None:
        spec = {}  # `spec: {}` is Istio's "allow nothing" policy; an absent spec means the same
    check_fields(p, spec, AUTHZ_SPEC_FIELDS, "spec")
    selector = read_label_selector(p, spec, "selector", "spec", expressions=False)
    if selector is not None and selector.empty:
        p.warning("spec.selector", "has no matchLabels, so the policy applies to the whole namespace")
    target_refs: list[PolicyTargetRef] = []
    single = get_mapping(p, spec, "targetRef", "spec")
    if single is not None:
        target_refs.append(read_target_ref(p, single, "spec.targetRef", meta.namespace))
    many = items_of(p, spec, "targetRefs", "spec")
    target_refs.extend(read_target_ref(p, ref, ref_path, meta.namespace) for ref_path, ref in many)
    if single is not None and many:
        p.error("spec.targetRefs", "only one of targetRef and targetRefs may be set")
    if selector is not None and target_refs:
        p.error("spec.selector", "selector and targetRef/targetRefs are mutually exclusive")
    action = get_enum(p, spec, "action", "spec", ACTIONS, "ALLOW")
    provider_spec = get_mapping(p, spec, "provider", "spec")
    provider = ""
    if provider_spec is not None:
        check_fields(p, provider_spec, PROVIDER_FIELDS, "spec.provider")
        provider = get_str(p, provider_spec, "name", "spec.provider")
        if action != "CUSTOM":
            p.error("spec.provider", f"only allowed with action CUSTOM, not {action}")
    rules: tuple[PolicyRule, ...] | None = None
    if get_list(p, spec, "rules", "spec") is not None:
        rules = tuple(read_rule(p, r, r_path, action) for r_path, r in items_of(p, spec, "rules", "spec"))
    elif action in ("DENY", "CUSTOM") and spec.get("rules") is None:
        p.error(
            "spec.rules",
            f"required for action {action}: without rules the policy never matches "
            "(add an empty rule {} to match every request)",
        )
    if action == "CUSTOM" and not provider and rules is not None:
        p.error("spec.provider.name", "required for action CUSTOM")
    return AuthorizationPolicy(
        meta=meta,
        origin=origin,
        raw=doc,
        selector=selector,
        target_refs=tuple(target_refs),
        action=action,
        rules=rules,
        provider=provider,
    )


def parse_peer_authentication(
    p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None
) -> PeerAuthentication:
    spec = get_mapping(p, doc, "spec", "")
    if spec is None:
        spec = {}
    check_fields(p, spec, frozenset({"selector", "mtls", "portLevelMtls"}), "spec")
    selector = read_label_selector(p, spec, "selector", "spec", expressions=False)
    mode = "UNSET"
    mtls = get_mapping(p, spec, "mtls", "spec")
    if mtls is not None:
        check_fields(p, mtls, frozenset({"mode"}), "spec.mtls")
        mode = get_enum(p, mtls, "mode", "spec.mtls", MTLS_MODES, "UNSET")
    port_modes: dict[int, str] = {}
    port_level = get_mapping(p, spec, "portLevelMtls", "spec")
    if port_level is not None:
        if not port_level:
            p.error("spec.portLevelMtls", "must hold at least one port when set")
        if selector is None or selector.empty:
            p.error(
                "spec.portLevelMtls",
                "requires spec.selector with matchLabels (a namespace- or mesh-wide policy cannot set "
                "per-port modes)",
            )
        for port, port_path, value in int_keys(p, port_level, "spec.portLevelMtls", 1, 65535):
            if not is_mapping(value):
                p.error(port_path, f"expected a mapping, got {type_name(value)}")
                continue
            check_fields(p, value, frozenset({"mode"}), port_path)
            if port in port_modes:
                p.error(port_path, f"port {port} is listed twice")
            port_modes[port] = get_enum(p, value, "mode", port_path, MTLS_MODES, "UNSET")
    return PeerAuthentication(
        meta=meta,
        origin=origin,
        raw=doc,
        selector=selector,
        mode=mode,
        port_level_mtls=port_modes,
    )
