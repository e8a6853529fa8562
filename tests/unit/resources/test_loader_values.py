"""Parsed values of the features the samples do not exercise: defaults, API versions, aliases of
fields, conversions (ports, durations) and what is kept verbatim."""

from __future__ import annotations

import pytest

from loom.resources.loader import parse_object
from loom.resources.model import (
    AuthorizationPolicy,
    Deployment,
    Gateway,
    HTTPPathMatch,
    HTTPRoute,
    HTTPRouteMatch,
    HTTPValueMatch,
    LabelSelector,
    ParentRef,
    PeerAuthentication,
    Pod,
    PolicyCondition,
    PolicyOperation,
    PolicySource,
    PolicyTargetRef,
    Resource,
    Service,
)
from loom.resources.parse_gateway import parse_duration


def obj(api_version: str, kind: str, spec: object, **metadata: object) -> Resource:
    doc: dict[str, object] = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", **metadata},
    }
    if spec is not None:
        doc["spec"] = spec
    return parse_object(doc)


def policy(spec: object, version: str = "v1") -> AuthorizationPolicy:
    parsed = obj(f"security.istio.io/{version}", "AuthorizationPolicy", spec)
    assert isinstance(parsed, AuthorizationPolicy)
    return parsed


def route(spec: object) -> HTTPRoute:
    parsed = obj("gateway.networking.k8s.io/v1", "HTTPRoute", spec)
    assert isinstance(parsed, HTTPRoute)
    return parsed


def test_namespaced_kinds_default_to_the_default_namespace() -> None:
    parsed = parse_object({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}})
    assert parsed.namespace == "default"


def test_authorization_policy_rules_absent_empty_and_empty_rule() -> None:
    assert policy({}).rules is None
    assert policy(None).rules is None
    assert policy({"rules": None}).rules is None
    assert policy({"rules": []}).rules == ()
    allow_all = policy({"rules": [{}]})
    assert allow_all.rules is not None and len(allow_all.rules) == 1
    assert allow_all.rules[0].sources == () and allow_all.rules[0].operations == ()
    assert policy({"action": "DENY", "rules": [{}]}).action == "DENY"


def test_authorization_policy_v1beta1_and_every_source_and_operation_field() -> None:
    parsed = policy(
        {
            "action": "AUDIT",
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["cluster.local/ns/a/sa/*"],
                                "notPrincipals": ["*/sa/admin"],
                                "requestPrincipals": ["issuer/*"],
                                "notRequestPrincipals": ["*"],
                                "namespaces": ["prod-*"],
                                "notNamespaces": ["kube-system"],
                                "ipBlocks": ["10.0.0.0/8", "192.168.0.1"],
                                "notIpBlocks": ["fd00::/8"],
                                "remoteIpBlocks": ["1.2.3.4/32"],
                                "notRemoteIpBlocks": ["5.6.7.0/24"],
                            }
                        },
                        {"source": {"serviceAccounts": ["web", "other/api"], "notServiceAccounts": ["a/b"]}},
                    ],
                    "to": [
                        {
                            "operation": {
                                "hosts": ["reviews"],
                                "notHosts": ["*.internal"],
                                "ports": [9080, "9090"],
                                "notPorts": ["15020"],
                                "methods": ["GET"],
                                "notMethods": ["DELETE"],
                                "paths": ["/api/{*}/items", "/reviews/*"],
                                "notPaths": ["/admin/{**}"],
                            }
                        }
                    ],
                    "when": [{"key": "request.auth.claims[groups]", "values": ["dev"], "notValues": ["x"]}],
                }
            ],
        },
        version="v1beta1",
    )
    assert parsed.action == "AUDIT"
    assert parsed.rules is not None
    (rule,) = parsed.rules
    assert rule.sources == (
        PolicySource(
            principals=("cluster.local/ns/a/sa/*",),
            not_principals=("*/sa/admin",),
            request_principals=("issuer/*",),
            not_request_principals=("*",),
            namespaces=("prod-*",),
            not_namespaces=("kube-system",),
            ip_blocks=("10.0.0.0/8", "192.168.0.1"),
            not_ip_blocks=("fd00::/8",),
            remote_ip_blocks=("1.2.3.4/32",),
            not_remote_ip_blocks=("5.6.7.0/24",),
        ),
        PolicySource(service_accounts=("web", "other/api"), not_service_accounts=("a/b",)),
    )
    # Ports written as numbers are stored as the API's strings.
    assert rule.operations == (
        PolicyOperation(
            hosts=("reviews",),
            not_hosts=("*.internal",),
            ports=("9080", "9090"),
            not_ports=("15020",),
            methods=("GET",),
            not_methods=("DELETE",),
            paths=("/api/{*}/items", "/reviews/*"),
            not_paths=("/admin/{**}",),
        ),
    )
    assert rule.conditions == (PolicyCondition("request.auth.claims[groups]", ("dev",), ("x",)),)


def test_authorization_policy_targets_and_custom_provider() -> None:
    single = policy(
        {"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}}
    )
    assert single.target_refs == (PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io"),)
    many = policy(
        {
            "targetRefs": [
                {"kind": "Service", "group": "core", "name": "a"},
                {"kind": "ServiceEntry", "group": "networking.istio.io", "name": "b", "namespace": "ns"},
                {"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"},
            ]
        }
    )
    assert [(r.kind, r.group, r.name, r.namespace) for r in many.target_refs] == [
        ("Service", "", "a", ""),
        ("ServiceEntry", "networking.istio.io", "b", "ns"),
        ("GatewayClass", "gateway.networking.k8s.io", "istio-waypoint", ""),
    ]
    custom = policy(
        {
            "action": "CUSTOM",
            "provider": {"name": "ext-authz"},
            "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}],
        }
    )
    assert (custom.action, custom.provider) == ("CUSTOM", "ext-authz")
    dry = obj(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        {},
        annotations={"istio.io/dry-run": "true"},
    )
    assert isinstance(dry, AuthorizationPolicy) and dry.dry_run


def test_peer_authentication_port_level_modes() -> None:
    parsed = obj(
        "security.istio.io/v1",
        "PeerAuthentication",
        {
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {8080: {"mode": "DISABLE"}, "9090": {"mode": "STRICT"}, 15020: {}},
        },
    )
    assert isinstance(parsed, PeerAuthentication)
    assert parsed.selector == LabelSelector(match_labels={"app": "db"})
    assert parsed.mode == "PERMISSIVE"
    assert parsed.port_level_mtls == {8080: "DISABLE", 9090: "STRICT", 15020: "UNSET"}
    unset = obj("security.istio.io/v1", "PeerAuthentication", None)
    assert isinstance(unset, PeerAuthentication) and unset.mode == "UNSET" and unset.selector is None


def test_pod_spec_details() -> None:
    pod = obj(
        "v1",
        "Pod",
        {
            "serviceAccount": "legacy-sa",
            "hostNetwork": True,
            "containers": [
                {
                    "name": "a",
                    "ports": [{"containerPort": 53, "protocol": "UDP", "name": "dns"}],
                    "args": ["-v"],
                }
            ],
        },
    )
    assert isinstance(pod, Pod)
    assert pod.spec.service_account == "legacy-sa"  # the deprecated field is still read
    assert pod.spec.host_network
    port = pod.spec.containers[0].ports[0]
    assert (port.container_port, port.protocol, port.name) == (53, "UDP", "dns")
    assert pod.spec.containers[0].args == ("-v",)


def test_deployment_selector_expressions_and_defaults() -> None:
    dep = parse_object(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {
                    "matchLabels": {"app": "web"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["front", "edge"]},
                        {"key": "canary", "operator": "DoesNotExist"},
                    ],
                },
                "strategy": {"type": "RollingUpdate"},
                "template": {
                    "metadata": {"labels": {"app": "web", "tier": "edge"}},
                    "spec": {"containers": []},
                },
            },
        }
    )
    assert isinstance(dep, Deployment)
    assert dep.replicas == 1
    assert dep.selector.match_expressions == (
        ("tier", "In", ("front", "edge")),
        ("canary", "DoesNotExist", ()),
    )
    assert dep.template.service_account == "default"


def test_service_selector_absent_versus_empty_and_types() -> None:
    absent = obj("v1", "Service", {"ports": [{"port": 80}]})
    empty = obj("v1", "Service", {"selector": {}, "ports": [{"port": 80}], "type": "NodePort"})
    assert isinstance(absent, Service) and isinstance(empty, Service)
    assert absent.selector is None
    assert empty.selector == {} and empty.type == "NodePort"
    headless = obj("v1", "Service", {"clusterIP": "None"})
    assert isinstance(headless, Service) and headless.headless and headless.cluster_ips == ()


def test_gateway_v1beta1() -> None:
    gw = parse_object(
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "ns", "labels": {"istio.io/waypoint-for": "all"}},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE", "allowedRoutes": {}}],
            },
        }
    )
    assert isinstance(gw, Gateway) and gw.is_waypoint and gw.waypoint_for == "all"


def test_http_route_matches_filters_timeouts_and_retry() -> None:
    redirect = {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}
    modifier = {
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "add": [], "remove": ["x-b"]},
    }
    parsed = route(
        {
            "parentRefs": [{"name": "waypoint", "sectionName": "mesh", "namespace": "ns", "port": 15008}],
            "hostnames": ["reviews.ns.svc.cluster.local"],
            "rules": [
                {
                    "matches": [
                        {
                            "path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"},
                            "headers": [{"name": "x-user", "value": "jason"}],
                            "queryParams": [
                                {"name": "debug", "value": "^(1|true)$", "type": "RegularExpression"}
                            ],
                            "method": "POST",
                        },
                        {"path": {"value": "/exact"}},
                        {},
                    ],
                    "filters": [modifier],
                    "backendRefs": [
                        {"name": "reviews-v1", "port": 9080},
                        {"name": "other", "namespace": "ns2", "port": 80, "weight": 0, "filters": []},
                    ],
                    "timeouts": {"request": "1h2m", "backendRequest": "500ms"},
                    "retry": {"attempts": 3, "backoff": "100ms", "codes": [503]},
                },
                {"filters": [redirect]},
            ],
        }
    )
    assert parsed.parent_refs == (
        ParentRef(
            name="waypoint",
            kind="Gateway",
            group="gateway.networking.k8s.io",
            namespace="ns",
            port=15008,
            section_name="mesh",
        ),
    )
    first, second = parsed.rules
    assert first.matches == (
        HTTPRouteMatch(
            path=HTTPPathMatch("RegularExpression", "/v[0-9]+/.*"),
            headers=(HTTPValueMatch("x-user", "jason"),),
            query_params=(HTTPValueMatch("debug", "^(1|true)$", "RegularExpression"),),
            method="POST",
        ),
        HTTPRouteMatch(path=HTTPPathMatch("PathPrefix", "/exact")),
        HTTPRouteMatch(),
    )
    assert [(f.type, f.config) for f in first.filters] == [("RequestHeaderModifier", modifier)]
    assert [(b.name, b.namespace, b.weight) for b in first.backend_refs] == [
        ("reviews-v1", "", 1),
        ("other", "ns2", 0),
    ]
    assert first.timeout_request == 3720.0
    assert first.timeout_backend_request == 0.5
    assert first.retry == {"attempts": 3, "backoff": "100ms", "codes": [503]}
    assert [(f.type, f.config) for f in second.filters] == [("RequestRedirect", redirect)]
    assert second.timeout_request is None and second.retry == {}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1h2m", 3720.0),
        ("0s", 0.0),
        ("1h1m1s1ms", 3661.001),
        ("99999ms", 99.999),
    ],
)
def test_gateway_api_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "1d", "1.5s", "-1s", "100000s", "1h1m1s1ms1s", "10 s", "1S"])
def test_malformed_durations(text: str) -> None:
    assert parse_duration(text) is None
