"""Which route a request takes: attachment, match types and Gateway API precedence."""

from __future__ import annotations

import random

import pytest

from loom.resources.model import HTTPRoute, HTTPRouteMatch, ParentRef
from tests.unit.waypoint_routing.builders import (
    gateway_parent,
    http_route,
    index,
    match,
    request,
    rule,
    service_parent,
    svc,
    to,
)
from waypoint.model import DirectResponse, Forward, RequestView, RouteAction, ServiceRef, WeightedBackend
from waypoint.routing import RouteTable

WEB = svc("web")
BACKEND_NAMES = (
    "exact",
    "api",
    "api-v2",
    "api-post",
    "api-canary",
    "api-canary-alice",
    "api-debug",
    "shop-regex",
    "shop-special",
    "tie-b",
    "tie-c",
    "first-rule",
    "second-rule",
    "versioned",
    "multi",
    "by-host",
    "consumer",
    "producer",
    "gateway",
)
SERVICES = index(WEB, svc("web", 8080), *(svc(name) for name in BACKEND_NAMES))


def backend_of(action: RouteAction) -> str:
    """The chosen backend's name, or "<status>" for a direct answer."""
    if isinstance(action, DirectResponse):
        return str(action.status)
    assert isinstance(action, Forward), action
    assert len(action.backends) == 1
    return action.backends[0].service.name


def build(routes: list[HTTPRoute], *, waypoint: tuple[str, str] | None = None) -> RouteTable:
    table = RouteTable.build(routes, SERVICES, waypoint=waypoint, rng=random.Random(1))
    assert table.diagnostics == (), [str(d) for d in table.diagnostics]
    return table


PRECEDENCE_ROUTES = [
    # Listed out of precedence order on purpose: the table must sort them.
    http_route("c", [rule(match("/tie"), backends=to("tie-c"))]),
    http_route(
        "a",
        [
            rule(match("/api"), backends=to("api")),
            rule(match("/shop/.*", kind="RegularExpression"), backends=to("shop-regex")),
            rule(match("/api", headers={"X-Canary": "true"}), backends=to("api-canary")),
            rule(match("/api", query={"debug": "1"}), backends=to("api-debug")),
            rule(match("/api", method="POST"), backends=to("api-post")),
            rule(match("/login", kind="Exact"), backends=to("exact")),
            rule(match("/api/v2/"), backends=to("api-v2")),
            rule(match("/shop/special"), backends=to("shop-special")),
            rule(
                match("/api", headers={"x-canary": "true", "x-user": "alice"}),
                backends=to("api-canary-alice"),
            ),
            rule(match("/same"), backends=to("first-rule")),
            rule(match("/same"), backends=to("second-rule")),
            rule(match("/versions", header_regex={"x-version": "v[0-9]+"}), backends=to("versioned")),
            rule(match("/multi", headers={"x-multi": "a,b"}), backends=to("multi")),
            rule(match("/by-host", headers={"Host": "web.default:9080"}), backends=to("by-host")),
        ],
    ),
    http_route("b", [rule(match("/tie"), backends=to("tie-b"))]),
]


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        pytest.param(request("/login"), "exact", id="exact path"),
        pytest.param(request("/login/more"), "404", id="exact path does not match below it"),
        pytest.param(request("/api"), "api", id="prefix matches itself"),
        pytest.param(request("/api/"), "api", id="prefix matches with trailing slash"),
        pytest.param(request("/api/users"), "api", id="prefix matches below it"),
        pytest.param(request("/apiary"), "404", id="prefix matches whole segments only"),
        pytest.param(request("/api/v2"), "api-v2", id="trailing slash of the prefix is ignored"),
        pytest.param(request("/api/v2/x"), "api-v2", id="longest prefix wins"),
        pytest.param(request("/api/v2/x", method="POST"), "api-v2", id="longer prefix beats method"),
        pytest.param(request("/api/x", method="POST"), "api-post", id="method beats headers"),
        pytest.param(
            request("/api/x", method="POST", headers=[("x-canary", "true"), ("x-user", "alice")]),
            "api-post",
            id="method beats two headers",
        ),
        pytest.param(request("/api/x", headers=[("x-canary", "true")]), "api-canary", id="header match"),
        pytest.param(request("/api/x", headers=[("x-canary", "TRUE")]), "api", id="header values are exact"),
        pytest.param(
            request("/api/x", headers=[("x-canary", "true"), ("x-user", "alice")]),
            "api-canary-alice",
            id="more header matches win",
        ),
        pytest.param(request("/api/x", query="debug=1"), "api-debug", id="query match"),
        pytest.param(request("/api/x", query="a=2&debug=1&debug=2"), "api-debug", id="first query value"),
        pytest.param(request("/api/x", query="debug=2&debug=1"), "api", id="only the first value counts"),
        pytest.param(
            request("/api/x", query="debug=1", headers=[("x-canary", "true")]),
            "api-canary",
            id="headers beat query parameters",
        ),
        pytest.param(request("/shop/other"), "shop-regex", id="regex full match"),
        pytest.param(request("/shop/special/1"), "shop-special", id="prefix beats regex"),
        pytest.param(request("/shopping"), "404", id="regex must match the whole path"),
        pytest.param(request("/tie"), "tie-b", id="tie goes to the route first by namespace/name"),
        pytest.param(request("/same"), "first-rule", id="tie within a route goes to the first rule"),
        pytest.param(request("/versions", headers=[("x-version", "v12")]), "versioned", id="header regex"),
        pytest.param(request("/versions", headers=[("x-version", "v12b")]), "404", id="header regex full"),
        pytest.param(request("/versions"), "404", id="absent header never matches"),
        pytest.param(
            request("/multi", headers=[("x-multi", "a"), ("x-multi", "b")]),
            "multi",
            id="repeated headers are joined with commas",
        ),
        pytest.param(
            request("/by-host", authority="web.default:9080"), "by-host", id="host header is the authority"
        ),
        pytest.param(request("/nothing"), "404", id="routes attached but none matches"),
    ],
)
def test_precedence(req: RequestView, expected: str) -> None:
    table = build(PRECEDENCE_ROUTES)
    assert backend_of(table.route(req)) == expected


def test_no_route_attached_forwards_to_the_addressed_service() -> None:
    table = build([http_route("other", [rule(backends=to("api"))], parents=[service_parent("api")])])
    assert table.route(request("/anything")) == Forward(backends=(WeightedBackend(WEB, 1),), route="")


def test_rule_without_matches_matches_everything_and_names_the_route() -> None:
    table = build([http_route("catch-all", [rule(backends=to("api"))])])
    action = table.route(request("/x/y", method="DELETE"))
    assert isinstance(action, Forward)
    assert action.route == "default/catch-all"
    assert backend_of(action) == "api"


def test_route_without_rules_sends_everything_to_the_parent_service() -> None:
    table = build([http_route("bare", [])])
    action = table.route(request("/x"))
    assert isinstance(action, Forward) and action.route == "default/bare"
    assert action.backends[0].service == WEB


def test_match_without_path_is_prefix_slash() -> None:
    table = build([http_route("m", [rule(HTTPRouteMatch(method="PUT"), backends=to("api"))])])
    assert backend_of(table.route(request("/deep/path", method="PUT"))) == "api"
    assert backend_of(table.route(request("/deep/path"))) == "404"


@pytest.mark.parametrize(
    ("parent", "service", "expected"),
    [
        pytest.param(service_parent(port=9080), WEB, "api", id="port narrows: same port"),
        pytest.param(service_parent(port=9080), svc("web", 8080), "web", id="port narrows: other port"),
        pytest.param(service_parent(), svc("web", 8080), "api", id="no port: every port"),
        pytest.param(service_parent(namespace="default"), WEB, "api", id="explicit same namespace"),
        pytest.param(service_parent(namespace="other"), WEB, "web", id="a Service of another namespace"),
        pytest.param(
            ParentRef(name="web", kind="Service", group="core"), WEB, "api", id="group core is the core group"
        ),
    ],
)
def test_service_attachment(parent: ParentRef, service: ServiceRef, expected: str) -> None:
    table = build([http_route("r", [rule(backends=to("api"))], parents=[parent])])
    assert backend_of(table.route(request(service=service))) == expected


def test_consumer_route_applies_only_to_its_namespace_and_overrides_the_producer() -> None:
    consumer = http_route(
        "mine",
        [rule(backends=to(("consumer", 1)))],
        namespace="client-ns",
        parents=[service_parent(namespace="default")],
    )
    producer = http_route("theirs", [rule(backends=to("producer"))])
    services = dict(SERVICES)
    services[("client-ns", "consumer")] = [svc("consumer", namespace="client-ns")]
    table = RouteTable.build([consumer, producer], services, rng=random.Random(1))
    assert table.diagnostics == ()
    from_client_ns = table.route(request(client_namespace="client-ns"))
    assert isinstance(from_client_ns, Forward) and from_client_ns.route == "client-ns/mine"
    assert from_client_ns.backends[0].service.namespace == "client-ns"
    assert backend_of(table.route(request(client_namespace="third"))) == "producer"
    assert backend_of(table.route(request(client_namespace="default"))) == "producer"


def test_gateway_attached_routes_select_services_by_hostname() -> None:
    routes = [
        http_route(
            "by-fqdn",
            [rule(backends=to("gateway"))],
            parents=[gateway_parent()],
            hostnames=["web.default.svc.cluster.local"],
        ),
        http_route("by-short", [rule(backends=to("api"))], parents=[gateway_parent()], hostnames=["api"]),
        http_route(
            "wild",
            [rule(backends=to("exact"))],
            parents=[gateway_parent()],
            hostnames=["*.default.svc.cluster.local"],
        ),
    ]
    table = build(routes, waypoint=("default", "waypoint"))
    assert backend_of(table.route(request(service=WEB))) == "gateway"  # exact hostname beats the wildcard
    assert backend_of(table.route(request(service=svc("api")))) == "api"
    assert backend_of(table.route(request(service=svc("shop-regex")))) == "exact"  # only the wildcard
    assert backend_of(table.route(request(service=svc("web", namespace="other")))) == "web"  # none
    # The same table answers again from its cache.
    assert backend_of(table.route(request(service=WEB))) == "gateway"


@pytest.mark.parametrize(
    "hostname",
    ["web", "web.default", "web.default.svc", "web.default.svc.cluster.local", "*.svc.cluster.local"],
)
def test_gateway_hostname_forms(hostname: str) -> None:
    route = http_route("r", [rule(backends=to("api"))], parents=[gateway_parent()], hostnames=[hostname])
    table = build([route], waypoint=("default", "waypoint"))
    assert backend_of(table.route(request(service=WEB))) == "api"


def test_gateway_route_without_hostnames_covers_every_service_but_service_routes_win() -> None:
    routes = [
        http_route("all", [rule(match("/only"), backends=to("gateway"))], parents=[gateway_parent()]),
        http_route("own", [rule(backends=to("producer"))], parents=[service_parent("api")]),
    ]
    table = build(routes, waypoint=("default", "waypoint"))
    assert backend_of(table.route(request("/only", service=WEB))) == "gateway"
    assert backend_of(table.route(request("/else", service=WEB))) == "404"  # attached, nothing matched
    assert backend_of(table.route(request("/only", service=svc("api")))) == "producer"


def test_routes_of_other_gateways_are_ignored() -> None:
    route = http_route("ingress", [rule(backends=to("api"))], parents=[gateway_parent("ingress-gw")])
    for waypoint in (None, ("default", "waypoint")):
        table = build([route], waypoint=waypoint)
        assert backend_of(table.route(request())) == "web"


def test_gateway_parent_in_another_namespace_is_matched_by_namespace() -> None:
    route = http_route(
        "r", [rule(backends=to("api"))], parents=[gateway_parent(namespace="mesh")], hostnames=["web"]
    )
    assert backend_of(build([route], waypoint=("mesh", "waypoint")).route(request())) == "api"
    assert backend_of(build([route], waypoint=("default", "waypoint")).route(request())) == "web"


def test_gateway_parent_with_the_hbone_port_attaches() -> None:
    route = http_route("r", [rule(backends=to("api"))], parents=[gateway_parent(port=15008)])
    assert backend_of(build([route], waypoint=("default", "waypoint")).route(request())) == "api"


def test_method_match_is_case_sensitive_on_the_request() -> None:
    table = build([http_route("r", [rule(match("/", method="GET"), backends=to("api"))])])
    assert backend_of(table.route(request(method="GET"))) == "api"
    assert backend_of(table.route(request(method="get"))) == "404"
