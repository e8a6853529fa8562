"""What a matched rule does: filters, redirects, timeouts, retries and weighted backends."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from loom.resources.diagnostics import Severity
from loom.resources.loader import load_paths
from loom.resources.model import BackendRef, HTTPRoute, HTTPRouteFilter
from tests.samples import samples_dir
from tests.unit.waypoint_routing.builders import (
    flt,
    http_route,
    index,
    match,
    refs_from_snapshot,
    request,
    rule,
    svc,
    to,
)
from waypoint.model import (
    DirectResponse,
    Forward,
    HeaderEdits,
    Redirect,
    RetryPolicy,
    RouteAction,
    ServiceRef,
    WeightedBackend,
)
from waypoint.routing import RouteTable

WEB = svc("web")
V1, V2, V3 = svc("v1"), svc("v2"), svc("v3")
SERVICES = index(WEB, V1, V2, V3, svc("other", namespace="elsewhere"))
PICKS = 10_000
TOLERANCE = 0.015


def table_for(*routes: HTTPRoute, seed: int = 7) -> RouteTable:
    return RouteTable.build(list(routes), SERVICES, rng=random.Random(seed))


def forward(action: RouteAction) -> Forward:
    assert isinstance(action, Forward), action
    return action


def shares(table: RouteTable, picks: int = PICKS, **request_args: Any) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for _ in range(picks):
        action = table.route(request(**request_args))
        if isinstance(action, DirectResponse):
            counts[str(action.status)] += 1
        else:
            counts[forward(action).backends[0].service.name] += 1
    return {name: count / picks for name, count in counts.items()}


# -- header modifiers -------------------------------------------------------------------------------


def test_request_and_response_header_modifiers() -> None:
    edits = {
        "set": [{"name": "X-Set", "value": "1"}],
        "add": [{"name": "X-Add", "value": "2"}],
        "remove": ["X-Gone"],
    }
    route = http_route(
        "h",
        [
            rule(
                backends=to("v1"),
                filters=[
                    flt("RequestHeaderModifier", "requestHeaderModifier", edits),
                    flt(
                        "ResponseHeaderModifier",
                        "responseHeaderModifier",
                        {"add": [{"name": "X-R", "value": "r"}]},
                    ),
                ],
            )
        ],
    )
    action = forward(table_for(route).route(request()))
    assert action.request_headers == HeaderEdits(
        set=(("x-set", "1"),), add=(("x-add", "2"),), remove=("x-gone",)
    )
    assert action.response_headers == HeaderEdits(add=(("x-r", "r"),))


# -- URL rewrite --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [
        # The Gateway API's HTTPPathModifier table.
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/anything", "/", "/base", "/base/anything"),
    ],
)
def test_replace_prefix_match(path: str, prefix: str, replacement: str, expected: str) -> None:
    rewrite = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": replacement}}
    route = http_route(
        "rw", [rule(match(prefix), backends=to("v1"), filters=[flt("URLRewrite", "urlRewrite", rewrite)])]
    )
    assert forward(table_for(route).route(request(path))).rewrite_path == expected


def test_replace_full_path_and_hostname() -> None:
    rewrite = {
        "hostname": "internal.example",
        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/v2/all"},
    }
    route = http_route(
        "rw", [rule(match("/old"), backends=to("v1"), filters=[flt("URLRewrite", "urlRewrite", rewrite)])]
    )
    action = forward(table_for(route).route(request("/old/x", query="q=1")))
    assert action.rewrite_path == "/v2/all"
    assert action.rewrite_authority == "internal.example"


def test_no_rewrite_leaves_path_and_authority_alone() -> None:
    action = forward(table_for(http_route("plain", [rule(backends=to("v1"))])).route(request("/a")))
    assert action.rewrite_path is None and action.rewrite_authority is None


# -- redirects ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "req_args", "status", "location"),
    [
        pytest.param({}, {}, 302, "http://web:9080/old/page", id="defaults keep host and service port"),
        pytest.param({"scheme": "https"}, {}, 302, "https://web/old/page", id="scheme implies its port"),
        pytest.param({"scheme": "http"}, {}, 302, "http://web/old/page", id="http implies 80, omitted"),
        pytest.param({"hostname": "new.example"}, {}, 302, "http://new.example:9080/old/page", id="hostname"),
        pytest.param(
            {"port": 8443, "scheme": "https"}, {}, 302, "https://web:8443/old/page", id="explicit port"
        ),
        pytest.param({"port": 80}, {}, 302, "http://web/old/page", id="port 80 with http is omitted"),
        pytest.param({"statusCode": 301}, {}, 301, "http://web:9080/old/page", id="301"),
        pytest.param(
            {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}},
            {},
            302,
            "http://web:9080/new",
            id="full path",
        ),
        pytest.param(
            {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}},
            {},
            302,
            "http://web:9080/new/page",
            id="prefix replaced",
        ),
        pytest.param({}, {"query": "a=1&b=2"}, 302, "http://web:9080/old/page?a=1&b=2", id="query kept"),
        pytest.param(
            {}, {"authority": "[fd00::7]:9080"}, 302, "http://[fd00::7]:9080/old/page", id="ipv6 host"
        ),
        pytest.param(
            {}, {"authority": ""}, 302, "http://web.default.svc.cluster.local:9080/old/page", id="no host"
        ),
        pytest.param(
            {},
            {"authority": "evil\r\nSet-Cookie: x"},
            302,
            "http://web.default.svc.cluster.local:9080/old/page",
            id="unsafe host replaced by the service name",
        ),
        pytest.param(
            {}, {"authority": "Web.Default:9080"}, 302, "http://web.default:9080/old/page", id="lowercase"
        ),
        pytest.param(
            {},
            {"query": "x=a b\r\n"},
            302,
            "http://web:9080/old/page?x=a%20b%0D%0A",
            id="query percent-encoded",
        ),
    ],
)
def test_redirect_location(
    config: dict[str, Any], req_args: dict[str, Any], status: int, location: str
) -> None:
    route = http_route(
        "redir", [rule(match("/old"), filters=[flt("RequestRedirect", "requestRedirect", config)])]
    )
    action = table_for(route).route(request("/old/page", **req_args))
    assert action == Redirect(status, location, route="default/redir")


# -- timeouts and retries -------------------------------------------------------------------------


def test_timeouts() -> None:
    route = http_route("t", [rule(backends=to("v1"), timeout=10.0, backend_timeout=2.5)])
    action = forward(table_for(route).route(request()))
    assert action.timeout == 10.0
    assert action.retry == RetryPolicy(attempts=0, per_try_timeout=2.5)


def test_zero_timeouts_mean_none() -> None:
    action = forward(
        table_for(http_route("t", [rule(backends=to("v1"), timeout=0.0, backend_timeout=0.0)])).route(
            request()
        )
    )
    assert action.timeout is None and action.retry.per_try_timeout is None


@pytest.mark.parametrize(
    ("retry", "method", "expected"),
    [
        pytest.param({}, "GET", RetryPolicy(attempts=0), id="no retry block: no retries"),
        pytest.param(
            {"attempts": 3, "backoff": "100ms", "codes": [500, 503]},
            "GET",
            RetryPolicy(attempts=3, on_status=frozenset({500, 503}), backoff=0.1),
            id="full retry block",
        ),
        pytest.param(
            {"backoff": "1s"},
            "GET",
            RetryPolicy(attempts=2, on_status=frozenset({503}), backoff=1.0),
            id="defaults: 2 attempts on 503",
        ),
        pytest.param(
            {"attempts": 0}, "GET", RetryPolicy(attempts=0, on_status=frozenset({503})), id="attempts 0"
        ),
        pytest.param(
            {"attempts": 3, "codes": [502]},
            "POST",
            RetryPolicy(attempts=3, on_status=frozenset(), on_reset=False, on_connect_failure=True),
            id="non-idempotent: connect failures only",
        ),
        pytest.param(
            {"attempts": 3, "codes": [502]},
            "PUT",
            RetryPolicy(attempts=3, on_status=frozenset({502})),
            id="PUT is idempotent",
        ),
    ],
)
def test_retry_policy(retry: dict[str, Any], method: str, expected: RetryPolicy) -> None:
    table = table_for(http_route("r", [rule(backends=to("v1"), retry=retry)]))
    assert table.diagnostics == ()
    assert forward(table.route(request(method=method))).retry == expected


@pytest.mark.parametrize(
    ("retry", "field"),
    [
        ({"attempts": -1}, "spec.rules[0].retry.attempts"),
        ({"attempts": True}, "spec.rules[0].retry.attempts"),
        ({"backoff": "soon"}, "spec.rules[0].retry.backoff"),
        ({"codes": [200]}, "spec.rules[0].retry.codes"),
        ({"codes": "503"}, "spec.rules[0].retry.codes"),
    ],
)
def test_malformed_retry_is_reported(retry: dict[str, Any], field: str) -> None:
    table = table_for(http_route("r", [rule(backends=to("v1"), retry=retry)]))
    assert [d.field for d in table.diagnostics] == [field]
    assert isinstance(table.route(request()), Forward)  # the rule still routes, with safe defaults


# -- unsupported or malformed filters -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "key", "config", "field"),
    [
        (
            "RequestMirror",
            "requestMirror",
            {"backendRef": {"name": "v2", "port": 9080}},
            "spec.rules[0].filters[0]",
        ),
        (
            "ExtensionRef",
            "extensionRef",
            {"group": "x", "kind": "y", "name": "z"},
            "spec.rules[0].filters[0]",
        ),
        ("Bogus", "bogus", {}, "spec.rules[0].filters[0]"),
        ("URLRewrite", "urlRewrite", {"path": {"type": "Sideways"}}, "spec.rules[0].filters[0].path.type"),
        ("URLRewrite", "urlRewrite", {"path": {"type": "ReplaceFullPath"}}, "spec.rules[0].filters[0].path"),
        ("RequestRedirect", "requestRedirect", {"statusCode": 200}, "spec.rules[0].filters[0].statusCode"),
        ("RequestRedirect", "requestRedirect", {"statusCode": [301]}, "spec.rules[0].filters[0].statusCode"),
        ("RequestRedirect", "requestRedirect", {"scheme": "ftp"}, "spec.rules[0].filters[0].scheme"),
        ("RequestRedirect", "requestRedirect", {"hostname": "a b"}, "spec.rules[0].filters[0].hostname"),
        ("RequestRedirect", "requestRedirect", {"port": 70000}, "spec.rules[0].filters[0].port"),
        (
            "RequestHeaderModifier",
            "requestHeaderModifier",
            {"set": [{"value": "x"}]},
            "spec.rules[0].filters[0].set[0]",
        ),
        (
            "RequestHeaderModifier",
            "requestHeaderModifier",
            {"remove": "x"},
            "spec.rules[0].filters[0].remove",
        ),
    ],
)
def test_unusable_filter_makes_its_rule_answer_500(
    kind: str, key: str, config: dict[str, Any], field: str
) -> None:
    route = http_route(
        "f",
        [
            rule(match("/f"), backends=to("v1"), filters=[flt(kind, key, config)]),
            rule(match("/ok"), backends=to("v2")),
        ],
    )
    table = table_for(route)
    assert len(table.diagnostics) == 1
    diagnostic = table.diagnostics[0]
    assert diagnostic.field == field
    assert diagnostic.key is not None and (diagnostic.key.namespace, diagnostic.key.name) == ("default", "f")
    assert "500" in diagnostic.message
    assert table.route(request("/f")) == DirectResponse(500, route="default/f")
    assert forward(table.route(request("/ok"))).backends[0].service == V2  # other rules unaffected


def test_filter_config_that_is_not_a_mapping_is_reported() -> None:
    broken = HTTPRouteFilter(type="URLRewrite", config={"type": "URLRewrite", "urlRewrite": "nope"})
    table = table_for(http_route("f", [rule(backends=to("v1"), filters=[broken])]))
    assert [d.field for d in table.diagnostics] == ["spec.rules[0].filters[0].urlRewrite"]
    assert table.route(request()) == DirectResponse(500, route="default/f")


def test_prefix_rewrite_on_a_non_prefix_match_answers_500() -> None:
    rewrite = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/x"}}
    route = http_route(
        "rw",
        [
            rule(
                match("/exact", kind="Exact"),
                backends=to("v1"),
                filters=[flt("URLRewrite", "urlRewrite", rewrite)],
            )
        ],
    )
    table = table_for(route)
    assert [d.field for d in table.diagnostics] == ["spec.rules[0].filters"]
    assert table.route(request("/exact")) == DirectResponse(500, route="default/rw")


# -- backends -----------------------------------------------------------------------------------------


def test_weighted_split_90_10() -> None:
    table = table_for(http_route("split", [rule(backends=to(("v1", 90), ("v2", 10)))]))
    result = shares(table)
    assert set(result) == {"v1", "v2"}
    assert result["v1"] == pytest.approx(0.9, abs=TOLERANCE)
    assert result["v2"] == pytest.approx(0.1, abs=TOLERANCE)


def test_three_way_split_and_zero_weight_excluded() -> None:
    table = table_for(http_route("split", [rule(backends=to(("v1", 1), ("v2", 2), ("v3", 0)))]))
    result = shares(table)
    assert "v3" not in result
    assert result["v1"] == pytest.approx(1 / 3, abs=TOLERANCE)
    assert result["v2"] == pytest.approx(2 / 3, abs=TOLERANCE)


def test_the_same_seed_gives_the_same_picks() -> None:
    route = http_route("split", [rule(backends=to(("v1", 50), ("v2", 50)))])
    picks = [
        [forward(table_for(route, seed=3).route(request())).backends[0].service.name for _ in range(50)]
        for _ in range(2)
    ]
    assert picks[0] == picks[1]


def test_all_zero_weights_answer_500() -> None:
    table = table_for(http_route("zero", [rule(backends=to(("v1", 0), ("v2", 0)))]))
    assert table.diagnostics == ()
    assert table.route(request()) == DirectResponse(500, route="default/zero")


def test_chosen_backend_keeps_its_weight() -> None:
    action = forward(table_for(http_route("one", [rule(backends=to(("v1", 7)))])).route(request()))
    assert action.backends == (WeightedBackend(V1, 7),)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        pytest.param(BackendRef(name="missing", port=9080, weight=50), "not found", id="unknown service"),
        pytest.param(BackendRef(name="v2", port=1234, weight=50), "port 1234 not found", id="unknown port"),
        pytest.param(BackendRef(name="v2", port=0, weight=50), "needs a port", id="no port"),
        pytest.param(
            BackendRef(name="other", port=9080, weight=50, namespace="elsewhere"),
            "ReferenceGrant",
            id="cross-ns",
        ),
        pytest.param(
            BackendRef(name="v2", port=9080, weight=50, kind="ServiceEntry", group="networking.istio.io"),
            "not supported",
            id="other kind",
        ),
    ],
)
def test_invalid_backend_share_answers_500(ref: BackendRef, message: str) -> None:
    route = http_route("half", [rule(backends=(BackendRef(name="v1", port=9080, weight=50), ref))])
    table = table_for(route)
    assert len(table.diagnostics) == 1
    diagnostic = table.diagnostics[0]
    assert diagnostic.field == "spec.rules[0].backendRefs[1]"
    assert diagnostic.severity is Severity.WARNING
    assert message in diagnostic.message
    result = shares(table)
    assert set(result) == {"v1", "500"}
    assert result["500"] == pytest.approx(0.5, abs=TOLERANCE)


def test_only_invalid_backends_always_answer_500() -> None:
    table = table_for(http_route("bad", [rule(backends=to("missing"))]))
    assert len(table.diagnostics) == 1
    assert all(table.route(request()) == DirectResponse(500, route="default/bad") for _ in range(20))


def test_invalid_backend_with_zero_weight_takes_no_share() -> None:
    route = http_route(
        "r", [rule(backends=(BackendRef(name="v1", port=9080), BackendRef(name="gone", port=1, weight=0)))]
    )
    table = table_for(route)
    assert len(table.diagnostics) == 1
    assert shares(table, picks=200) == {"v1": 1.0}


def test_resolver_callable_instead_of_an_index() -> None:
    seen: list[tuple[str, str, int]] = []

    def resolve(namespace: str, name: str, port: int) -> ServiceRef | None:
        seen.append((namespace, name, port))
        return svc(name, port, namespace) if name == "v1" else None

    table = RouteTable.build([http_route("r", [rule(backends=to("v1"))])], resolve, rng=random.Random(0))
    assert seen == [("default", "v1", 9080)]
    assert forward(table.route(request())).backends[0].service == V1


def test_choose_picks_by_weight() -> None:
    rng = random.Random(5)
    fwd = Forward(backends=(WeightedBackend(V1, 3), WeightedBackend(V2, 1), WeightedBackend(V3, 0)))
    counts = Counter(RouteTable.choose(fwd, rng).service.name for _ in range(PICKS))
    assert "v3" not in counts
    assert counts["v1"] / PICKS == pytest.approx(0.75, abs=TOLERANCE)
    with pytest.raises(ValueError, match="positive weight"):
        RouteTable.choose(Forward(backends=(WeightedBackend(V1, 0),)), rng)


# -- the Istio sample ---------------------------------------------------------------------------------


def test_istio_reviews_90_10_sample() -> None:
    istio = samples_dir() / "istio"
    loaded = load_paths(
        [istio / "bookinfo.yaml", istio / "bookinfo-versions.yaml", istio / "route-reviews-90-10.yaml"]
    )
    assert loaded.errors == ()
    snapshot = loaded.snapshot
    routes = snapshot.of_kind(HTTPRoute)
    services = refs_from_snapshot(snapshot)
    table = RouteTable.build(routes, services, waypoint=("default", "waypoint"), rng=random.Random(2024))
    assert table.diagnostics == ()
    reviews = services[("default", "reviews")][0]
    result = shares(table, service=reviews, path="/reviews/0")
    assert set(result) == {"reviews-v1", "reviews-v2"}
    assert result["reviews-v1"] == pytest.approx(0.9, abs=TOLERANCE)
    assert result["reviews-v2"] == pytest.approx(0.1, abs=TOLERANCE)
    action = forward(table.route(request("/reviews/0", service=reviews)))
    assert action.route == "default/reviews"
    assert action.retry == RetryPolicy(attempts=0) and action.timeout is None
    # Other bookinfo Services have no route: they go to themselves.
    ratings = services[("default", "ratings")][0]
    assert table.route(request("/ratings/0", service=ratings)) == Forward(
        backends=(WeightedBackend(ratings, 1),)
    )
