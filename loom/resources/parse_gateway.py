"""Parsers for gateway.networking.k8s.io (v1 and v1beta1): Gateway (waypoints) and HTTPRoute.

The checks follow the Gateway API CRD schema and its CEL rules, so a route accepted here is one the API
server would have admitted: path values are absolute and free of `//`, `/./`, `/../`, encoded slashes
and fragments (the waypoint routes and authorizes on the same path, so ambiguity here is a bypass
risk), regular expressions compile, filters carry the config their type names and appear at most once,
weights and ports are in range, and durations use the Gateway API format (`1h2m`, `500ms`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from loom.resources.model import (
    ANNOTATION_FOR_SERVICE_ACCOUNT,
    LABEL_WAYPOINT_FOR,
    WAYPOINT_GATEWAY_CLASS,
    BackendRef,
    Gateway,
    GatewayListener,
    HTTPPathMatch,
    HTTPRoute,
    HTTPRouteFilter,
    HTTPRouteMatch,
    HTTPRouteRule,
    HTTPValueMatch,
    ObjectMeta,
    Origin,
    ParentRef,
)
from loom.resources.parse_common import (
    Problems,
    check_fields,
    check_name,
    dns_subdomain_problem,
    get_enum,
    get_int,
    get_mapping,
    get_port,
    get_str,
    get_strs,
    is_int,
    is_list,
    items_of,
    join,
    one_of,
    quote,
    type_name,
)

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
HBONE_PROTOCOL = "HBONE"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_MATCH_TYPES = ("Exact", "RegularExpression")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
MAX_WEIGHT = 1_000_000
FILTER_CONFIG_KEYS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
}
FILTER_TYPES = tuple(FILTER_CONFIG_KEYS)
# Filters the API allows at most once per rule.
SINGLE_USE_FILTERS = frozenset(
    {"RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite"}
)
REDIRECT_SCHEMES = ("http", "https")
REDIRECT_STATUS_CODES = (301, 302, 303, 307, 308)
PATH_MODIFIER_TYPES = ("ReplaceFullPath", "ReplacePrefixMatch")

GATEWAY_SPEC_FIELDS = frozenset(
    {"gatewayClassName", "listeners", "addresses", "infrastructure", "backendTLS", "allowedListeners", "tls"}
)
LISTENER_FIELDS = frozenset({"name", "hostname", "port", "protocol", "tls", "allowedRoutes"})
HTTPROUTE_SPEC_FIELDS = frozenset({"parentRefs", "hostnames", "rules", "useDefaultGateways"})
PARENT_REF_FIELDS = frozenset({"group", "kind", "namespace", "name", "sectionName", "port"})
RULE_FIELDS = frozenset(
    {"name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"}
)
MATCH_FIELDS = frozenset({"path", "headers", "queryParams", "method"})
PATH_MATCH_FIELDS = frozenset({"type", "value"})
VALUE_MATCH_FIELDS = frozenset({"name", "value", "type"})
BACKEND_REF_FIELDS = frozenset({"group", "kind", "name", "namespace", "port", "weight", "filters"})
TIMEOUT_FIELDS = frozenset({"request", "backendRequest"})
RETRY_FIELDS = frozenset({"attempts", "backoff", "codes"})
FILTER_FIELDS = frozenset({"type", *FILTER_CONFIG_KEYS.values()})
HEADER_MODIFIER_FIELDS = frozenset({"set", "add", "remove"})
REDIRECT_FIELDS = frozenset({"scheme", "hostname", "path", "port", "statusCode"})
REWRITE_FIELDS = frozenset({"hostname", "path"})
PATH_MODIFIER_FIELDS = frozenset({"type", "replaceFullPath", "replacePrefixMatch"})
MIRROR_FIELDS = frozenset({"backendRef", "percent", "fraction"})
OBJECT_REF_FIELDS = frozenset({"group", "kind", "name", "namespace", "port"})

_DURATION = re.compile(r"(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}\Z")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+\Z")
_HOSTNAME = re.compile(r"(?:\*\.)?[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*\Z")
_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+\Z")
_LISTENER_PROTOCOL = re.compile(
    r"[a-zA-Z0-9](?:[-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?\Z"
    r"|[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]+\Z"
)


def parse_duration(value: str) -> float | None:
    """A Gateway API duration ("10s", "500ms", "1h2m") in seconds, or None if malformed."""
    if not _DURATION.match(value):
        return None
    return sum(int(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))


def read_duration(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> float | None:
    value = get_str(p, m, key, path)
    if not value:
        return None
    seconds = parse_duration(value)
    if seconds is None:
        p.error(join(path, key), f"invalid duration {quote(value)}: expected e.g. 10s, 500ms or 1h2m")
    return seconds


def path_value_problem(value: str) -> str | None:
    """Why an Exact or PathPrefix value is not acceptable, per the Gateway API validation rules."""
    if not value.startswith("/"):
        return f"{quote(value)}: must be an absolute path starting with '/'"
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in value:
            return f"{quote(value)}: must not contain {quote(bad)}"
    if value.endswith(("/..", "/.")):
        return f"{quote(value)}: must not end with '/.' or '/..'"
    if not _PATH_CHARS.match(value):
        return f"{quote(value)}: contains characters that are not allowed in a path"
    return None


def regex_problem(value: str) -> str | None:
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"invalid regular expression {quote(value)}: {exc}"
    return None


# ---------------------------------------------------------------------------------------------------
# Gateway


def parse_gateway(p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None) -> Gateway:
    waypoint_for = meta.labels.get(LABEL_WAYPOINT_FOR)
    if waypoint_for is not None and waypoint_for not in WAYPOINT_FOR_VALUES:
        p.error(
            f"metadata.labels.{LABEL_WAYPOINT_FOR}",
            f"must be one of {one_of(WAYPOINT_FOR_VALUES)}, got {quote(waypoint_for)}",
        )
    for_account = meta.annotations.get(ANNOTATION_FOR_SERVICE_ACCOUNT)
    if for_account is not None:
        # It names the identity the waypoint serves: it must be a plain service account name.
        problem = dns_subdomain_problem(for_account)
        if problem is not None:
            p.error(f"metadata.annotations.{ANNOTATION_FOR_SERVICE_ACCOUNT}", problem)
    spec = get_mapping(p, doc, "spec", "")
    if spec is None:
        if doc.get("spec") is None:
            p.error("spec", "required field is missing")
        return Gateway(meta=meta, origin=origin, raw=doc)
    check_fields(p, spec, GATEWAY_SPEC_FIELDS, "spec")
    gateway_class = get_str(p, spec, "gatewayClassName", "spec", required=True)
    if gateway_class:
        check_name(p, gateway_class, "spec.gatewayClassName", "subdomain")
    listeners: list[GatewayListener] = []
    names: set[str] = set()
    entries = items_of(p, spec, "listeners", "spec")
    if not entries and spec.get("listeners") is None:
        p.error("spec.listeners", "required field is missing")
    elif not entries and is_list(spec.get("listeners")):
        p.error("spec.listeners", "must hold at least one listener")
    for listener_path, listener in entries:
        check_fields(p, listener, LISTENER_FIELDS, listener_path)
        name = get_str(p, listener, "name", listener_path, required=True)
        if name:
            check_name(p, name, join(listener_path, "name"), "subdomain")
            if name in names:
                p.error(join(listener_path, "name"), f"duplicate listener name {quote(name)}")
            names.add(name)
        port = get_port(p, listener, "port", listener_path, required=True)
        protocol = get_str(p, listener, "protocol", listener_path, required=True)
        if protocol and not _LISTENER_PROTOCOL.match(protocol):
            p.error(join(listener_path, "protocol"), f"invalid protocol {quote(protocol)}")
        listeners.append(GatewayListener(name=name, port=port, protocol=protocol))
    if (
        gateway_class == WAYPOINT_GATEWAY_CLASS
        and entries
        and not any(listener.protocol == HBONE_PROTOCOL for listener in listeners)
    ):
        p.warning(
            "spec.listeners",
            f"a waypoint (gatewayClassName {WAYPOINT_GATEWAY_CLASS}) needs a listener with protocol "
            f"{HBONE_PROTOCOL}; none found, so no traffic can reach it",
        )
    return Gateway(meta=meta, origin=origin, raw=doc, gateway_class=gateway_class, listeners=tuple(listeners))


# ---------------------------------------------------------------------------------------------------
# HTTPRoute


def read_parent_ref(p: Problems, ref: Mapping[Any, Any], path: str) -> ParentRef:
    check_fields(p, ref, PARENT_REF_FIELDS, path)
    kind = get_str(p, ref, "kind", path) or "Gateway"
    # There is no Service kind in the Gateway API group; a Service parent (a waypoint route, as in
    # Istio's own samples) that leaves the group out means the core group.
    default_group = "" if kind == "Service" else GATEWAY_API_GROUP
    group = get_str(p, ref, "group", path, default_group)
    name = get_str(p, ref, "name", path, required=True)
    namespace = get_str(p, ref, "namespace", path)
    if namespace:
        check_name(p, namespace, join(path, "namespace"), "label")
    section = get_str(p, ref, "sectionName", path)
    return ParentRef(
        name=name,
        kind=kind,
        group=group,
        namespace=namespace,
        port=get_port(p, ref, "port", path),
        section_name=section,
    )


def read_value_matches(
    p: Problems, match: Mapping[Any, Any], key: str, path: str, *, case_insensitive: bool
) -> tuple[HTTPValueMatch, ...]:
    result: list[HTTPValueMatch] = []
    seen: set[str] = set()
    for item_path, item in items_of(p, match, key, path):
        check_fields(p, item, VALUE_MATCH_FIELDS, item_path)
        name = get_str(p, item, "name", item_path, required=True)
        if name and not _HEADER_NAME.match(name):
            p.error(join(item_path, "name"), f"invalid name {quote(name)}")
        identity = name.lower() if case_insensitive else name
        if name and identity in seen:
            p.error(join(item_path, "name"), f"{quote(name)} is matched twice in one match")
        seen.add(identity)
        value = get_str(p, item, "value", item_path, required=True)
        match_type = get_enum(p, item, "type", item_path, VALUE_MATCH_TYPES, "Exact")
        if match_type == "RegularExpression" and value:
            problem = regex_problem(value)
            if problem is not None:
                p.error(join(item_path, "value"), problem)
        result.append(HTTPValueMatch(name=name, value=value, type=match_type))
    return tuple(result)


def read_match(p: Problems, match: Mapping[Any, Any], path: str) -> HTTPRouteMatch:
    check_fields(p, match, MATCH_FIELDS, path)
    path_match: HTTPPathMatch | None = None
    path_spec = get_mapping(p, match, "path", path)
    if path_spec is not None:
        here = join(path, "path")
        check_fields(p, path_spec, PATH_MATCH_FIELDS, here)
        path_type = get_enum(p, path_spec, "type", here, PATH_TYPES, "PathPrefix")
        value = get_str(p, path_spec, "value", here, "/")
        problem = regex_problem(value) if path_type == "RegularExpression" else path_value_problem(value)
        if problem is not None:
            p.error(join(here, "value"), problem)
        path_match = HTTPPathMatch(type=path_type, value=value)
    return HTTPRouteMatch(
        path=path_match,
        headers=read_value_matches(p, match, "headers", path, case_insensitive=True),
        query_params=read_value_matches(p, match, "queryParams", path, case_insensitive=False),
        method=get_enum(p, match, "method", path, METHODS, ""),
    )


def read_header_modifier(p: Problems, config: Mapping[Any, Any], path: str) -> None:
    check_fields(p, config, HEADER_MODIFIER_FIELDS, path)
    for key in ("set", "add"):
        seen: set[str] = set()
        for item_path, item in items_of(p, config, key, path):
            check_fields(p, item, frozenset({"name", "value"}), item_path)
            name = get_str(p, item, "name", item_path, required=True)
            if name and not _HEADER_NAME.match(name):
                p.error(join(item_path, "name"), f"invalid header name {quote(name)}")
            if name and name.lower() in seen:
                p.error(join(item_path, "name"), f"header {quote(name)} is listed twice")
            seen.add(name.lower())
            get_str(p, item, "value", item_path, required=True)
    for i, name in enumerate(get_strs(p, config, "remove", path)):
        if not _HEADER_NAME.match(name):
            p.error(f"{join(path, 'remove')}[{i}]", f"invalid header name {quote(name)}")


def read_path_modifier(p: Problems, config: Mapping[Any, Any], path: str) -> str:
    """Validates a redirect/rewrite `path` and returns its type ("" when absent)."""
    modifier = get_mapping(p, config, "path", path)
    if modifier is None:
        return ""
    here = join(path, "path")
    check_fields(p, modifier, PATH_MODIFIER_FIELDS, here)
    kind = get_enum(p, modifier, "type", here, PATH_MODIFIER_TYPES, "", required=True)
    if kind:
        value_key = "replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch"
        value = get_str(p, modifier, value_key, here)
        if modifier.get(value_key) is None:
            p.error(join(here, value_key), f"required for type {kind}")
        elif value and not value.startswith("/"):
            p.error(join(here, value_key), f"{quote(value)}: must start with '/'")
        other = "replacePrefixMatch" if kind == "ReplaceFullPath" else "replaceFullPath"
        if modifier.get(other) is not None:
            p.error(join(here, other), f"must not be set for type {kind}")
    return kind


def read_hostname_field(p: Problems, config: Mapping[Any, Any], path: str) -> None:
    hostname = get_str(p, config, "hostname", path)
    if hostname and (len(hostname) > 253 or hostname.startswith("*") or not _HOSTNAME.match(hostname)):
        p.error(join(path, "hostname"), f"invalid hostname {quote(hostname)}")


def read_object_ref(p: Problems, ref: Mapping[Any, Any], path: str, *, default_kind: str) -> None:
    check_fields(p, ref, OBJECT_REF_FIELDS, path)
    get_str(p, ref, "group", path)
    kind = get_str(p, ref, "kind", path, default_kind, required=not default_kind)
    get_str(p, ref, "name", path, required=True)
    get_str(p, ref, "namespace", path)
    get_port(p, ref, "port", path)
    if kind == "Service" and ref.get("port") is None:
        p.error(join(path, "port"), "required when referring to a Service")


def read_filter_config(p: Problems, filter_type: str, config: Mapping[Any, Any], path: str) -> str:
    """Validates one filter's config; returns the path modifier type of a redirect/rewrite."""
    if filter_type in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        read_header_modifier(p, config, path)
    elif filter_type == "RequestRedirect":
        check_fields(p, config, REDIRECT_FIELDS, path)
        get_enum(p, config, "scheme", path, REDIRECT_SCHEMES, "")
        read_hostname_field(p, config, path)
        get_port(p, config, "port", path)
        code = config.get("statusCode")
        if code is not None and (not is_int(code) or code not in REDIRECT_STATUS_CODES):
            shown = code if is_int(code) else f"{type_name(code)} {code!r}"
            p.error(
                join(path, "statusCode"),
                f"must be one of {', '.join(map(str, REDIRECT_STATUS_CODES))}, got {shown}",
            )
        return read_path_modifier(p, config, path)
    elif filter_type == "URLRewrite":
        check_fields(p, config, REWRITE_FIELDS, path)
        read_hostname_field(p, config, path)
        return read_path_modifier(p, config, path)
    elif filter_type == "RequestMirror":
        check_fields(p, config, MIRROR_FIELDS, path)
        backend = get_mapping(p, config, "backendRef", path)
        if backend is None:
            if config.get("backendRef") is None:
                p.error(join(path, "backendRef"), "required field is missing")
        else:
            read_object_ref(p, backend, join(path, "backendRef"), default_kind="Service")
        get_int(p, config, "percent", path, 0, 0, 100)
        fraction = get_mapping(p, config, "fraction", path)
        if fraction is not None:
            here = join(path, "fraction")
            check_fields(p, fraction, frozenset({"numerator", "denominator"}), here)
            numerator = get_int(p, fraction, "numerator", here, 0, 0, required=True)
            denominator = get_int(p, fraction, "denominator", here, 100, 1)
            if numerator > denominator:
                p.error(here, "numerator must not be greater than denominator")
        if config.get("percent") is not None and fraction is not None:
            p.error(path, "only one of percent and fraction may be set")
    elif filter_type == "ExtensionRef":
        check_fields(p, config, frozenset({"group", "kind", "name"}), path)
        if config.get("group") is None:
            p.error(join(path, "group"), "required field is missing")
        get_str(p, config, "group", path)
        get_str(p, config, "kind", path, required=True)
        get_str(p, config, "name", path, required=True)
    return ""


def read_filters(
    p: Problems, rule: Mapping[Any, Any], path: str
) -> tuple[tuple[HTTPRouteFilter, ...], set[str]]:
    """The rule's filters, and the path modifier types their redirects/rewrites use."""
    filters: list[HTTPRouteFilter] = []
    modifiers: set[str] = set()
    seen: set[str] = set()
    for filter_path, spec in items_of(p, rule, "filters", path):
        check_fields(p, spec, FILTER_FIELDS, filter_path)
        filter_type = get_enum(p, spec, "type", filter_path, FILTER_TYPES, "", required=True)
        if not filter_type:
            continue
        if filter_type in SINGLE_USE_FILTERS and filter_type in seen:
            p.error(join(filter_path, "type"), f"a rule may hold at most one {filter_type} filter")
        seen.add(filter_type)
        config_key = FILTER_CONFIG_KEYS[filter_type]
        for other in FILTER_CONFIG_KEYS.values():
            if other != config_key and spec.get(other) is not None:
                p.error(join(filter_path, other), f"must not be set for a filter of type {filter_type}")
        config = get_mapping(p, spec, config_key, filter_path)
        if config is None:
            if spec.get(config_key) is None:
                p.error(join(filter_path, config_key), f"required for a filter of type {filter_type}")
            continue
        modifier = read_filter_config(p, filter_type, config, join(filter_path, config_key))
        if modifier:
            modifiers.add(modifier)
        filters.append(HTTPRouteFilter(type=filter_type, config=spec))
    if "RequestRedirect" in seen and "URLRewrite" in seen:
        p.error(join(path, "filters"), "RequestRedirect and URLRewrite cannot be used in the same rule")
    return tuple(filters), modifiers


def read_backend_refs(p: Problems, rule: Mapping[Any, Any], path: str) -> tuple[BackendRef, ...]:
    refs: list[BackendRef] = []
    for ref_path, ref in items_of(p, rule, "backendRefs", path):
        check_fields(p, ref, BACKEND_REF_FIELDS, ref_path)
        kind = get_str(p, ref, "kind", ref_path) or "Service"
        group = get_str(p, ref, "group", ref_path)
        name = get_str(p, ref, "name", ref_path, required=True)
        namespace = get_str(p, ref, "namespace", ref_path)
        if namespace:
            check_name(p, namespace, join(ref_path, "namespace"), "label")
        port = get_port(p, ref, "port", ref_path)
        if kind == "Service" and group in ("", "core") and ref.get("port") is None:
            p.error(join(ref_path, "port"), "required when referring to a Service")
        refs.append(
            BackendRef(
                name=name,
                port=port,
                weight=get_int(p, ref, "weight", ref_path, 1, 0, MAX_WEIGHT),
                kind=kind,
                group=group,
                namespace=namespace,
            )
        )
    return tuple(refs)


def read_retry(p: Problems, rule: Mapping[Any, Any], path: str) -> dict[str, Any]:
    retry = get_mapping(p, rule, "retry", path)
    if retry is None:
        return {}
    here = join(path, "retry")
    check_fields(p, retry, RETRY_FIELDS, here)
    get_int(p, retry, "attempts", here, 0, 0)
    read_duration(p, retry, "backoff", here)
    codes = retry.get("codes")
    if codes is not None:
        if not is_list(codes):
            p.error(join(here, "codes"), f"expected a list of HTTP status codes, got {type_name(codes)}")
        else:
            for i, code in enumerate(codes):
                if not is_int(code) or not 400 <= code <= 599:
                    shown = code if is_int(code) else f"{type_name(code)} {code!r}"
                    p.error(
                        f"{join(here, 'codes')}[{i}]", f"must be an HTTP status code 400-599, got {shown}"
                    )
    return dict(retry)


def read_route_rule(p: Problems, rule: Mapping[Any, Any], path: str) -> HTTPRouteRule:
    check_fields(p, rule, RULE_FIELDS, path)
    matches = tuple(read_match(p, m, m_path) for m_path, m in items_of(p, rule, "matches", path))
    filters, modifiers = read_filters(p, rule, path)
    backend_refs = read_backend_refs(p, rule, path)
    if "ReplacePrefixMatch" in modifiers and not (
        len(matches) == 1 and matches[0].path is not None and matches[0].path.type == "PathPrefix"
    ):
        p.error(
            join(path, "filters"),
            "a ReplacePrefixMatch path modifier needs exactly one match, and it must be a PathPrefix match",
        )
    if backend_refs and any(f.type == "RequestRedirect" for f in filters):
        p.error(join(path, "backendRefs"), "must be empty when the rule has a RequestRedirect filter")
    timeout_request: float | None = None
    timeout_backend: float | None = None
    timeouts = get_mapping(p, rule, "timeouts", path)
    if timeouts is not None:
        here = join(path, "timeouts")
        check_fields(p, timeouts, TIMEOUT_FIELDS, here)
        timeout_request = read_duration(p, timeouts, "request", here)
        timeout_backend = read_duration(p, timeouts, "backendRequest", here)
        if timeout_request and timeout_backend is not None and timeout_backend > timeout_request:
            p.error(join(here, "backendRequest"), "must not be longer than the request timeout")
    return HTTPRouteRule(
        matches=matches,
        filters=filters,
        backend_refs=backend_refs,
        timeout_request=timeout_request,
        timeout_backend_request=timeout_backend,
        retry=read_retry(p, rule, path),
    )


def parse_http_route(
    p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None
) -> HTTPRoute:
    spec = get_mapping(p, doc, "spec", "")
    if spec is None:
        if doc.get("spec") is None:
            p.error("spec", "required field is missing")
        return HTTPRoute(meta=meta, origin=origin, raw=doc)
    check_fields(p, spec, HTTPROUTE_SPEC_FIELDS, "spec")
    parent_refs = tuple(
        read_parent_ref(p, r, r_path) for r_path, r in items_of(p, spec, "parentRefs", "spec")
    )
    hostnames = get_strs(p, spec, "hostnames", "spec")
    for i, hostname in enumerate(hostnames):
        if len(hostname) > 253 or not _HOSTNAME.match(hostname):
            p.error(f"spec.hostnames[{i}]", f"invalid hostname {quote(hostname)}")
    rules = tuple(read_route_rule(p, r, r_path) for r_path, r in items_of(p, spec, "rules", "spec"))
    return HTTPRoute(
        meta=meta,
        origin=origin,
        raw=doc,
        parent_refs=parent_refs,
        hostnames=hostnames,
        rules=rules,
    )
