"""Regular-expression matches: the accepted subset, diagnostics for the rest, and properties.

The property tests are the point of the subset: a pattern the table accepts must match adversarial
input quickly, and no request, however odd, may make `route` raise.
"""

from __future__ import annotations

import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.resources.diagnostics import Severity
from loom.resources.model import HTTPPathMatch, HTTPRouteMatch, HTTPValueMatch
from tests.unit.waypoint_routing.builders import flt, http_route, index, match, request, rule, svc, to
from waypoint.model import DirectResponse, Forward, Redirect
from waypoint.routing import RouteTable, regex_support_problem

SERVICES = index(svc("web"), svc("v1"), svc("v2"))


@pytest.mark.parametrize(
    "pattern",
    [
        r"/api/v[0-9]+/.*",
        r".*foo.*",
        r"/users/[0-9]+",
        r"[^/]+/[^/]+/[^/]+/[^/]+",
        r"(?i)/[a-z]+/[a-z]+/[a-z]+",
        r"\d+\.\d+\.\d+\.\d+",
        r"(a|b)*c",
        r"(?:ab)*c",
        r"/(?:foo)?bar",
        r"[a-z]{1,63}(\.[a-z]{1,63})*",
        r"([^/]+/)*index\.html",
        r"(/[a-z0-9-]+)+/?",
        r"^/exact$",
        r"\bword\b.*",
        r"/(api|web)/.*",
        r"(?>a*)b",
        r"/api/.*/items/.*",
        r".*\.(css|js|png)",
        r"https?://.*",
        r"/v[0-9]+(\.[0-9]+)?/.*",
        r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}",
        r".*.*",
    ],
)
def test_accepted_patterns(pattern: str) -> None:
    assert regex_support_problem(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "backreferences"),
        (r"(?P<x>a)(?P=x)", "backreferences"),
        (r"(?P<x>a)?(?(x)b|c)", "conditional"),
        (r"(?=a).*", "lookahead"),
        (r"(?!a).*", "lookahead"),
        (r"(?<=a)b", "lookbehind"),
        (r"(?<!a)b", "lookbehind"),
        (r"(a+)+", "more than one way"),
        (r"(a*)*b", "more than one way"),
        (r"(a|aa)*", "more than one way"),
        (r"(x+x+)+y", "more than one way"),
        (r"(/[a-z/]+)*", "more than one way"),
        (r"(foo|bar)+", "more than one way"),
        (r"(a{1,2}){1,50}", "more than one way"),
        (r".*a.*b.*", "follow each other"),
        (r".*.*.*x", "follow each other"),
        (r"\d*\d*\d*", "follow each other"),
        (r"a{1,100}a{1,100}a{1,100}a{1,100}", "follow each other"),
        (r".*foo.*x", "2^32 steps"),
        (r".*\d+x", "2^32 steps"),
        ("a?" * 22 + "a" * 22, "2^22 steps"),
        (r"(?:aa|aa)(?:aa|aa)(?:aa|aa)(?:aa|aa)" * 6, "follow each other"),
        (r"(", "invalid regular expression"),
        (r"[z-a]", "invalid regular expression"),
        ("a" * 1025, "longer than 1024"),
    ],
)
def test_rejected_patterns(pattern: str, reason: str) -> None:
    problem = regex_support_problem(pattern)
    assert problem is not None and reason in problem


def test_unsupported_path_regex_is_reported_and_never_matches() -> None:
    route = http_route(
        "rx",
        [
            rule(match(r"/(a+)+", kind="RegularExpression"), match("/also"), backends=to("v1")),
            rule(match("/ok"), backends=to("v2")),
        ],
    )
    table = RouteTable.build([route], SERVICES, rng=random.Random(0))
    assert len(table.diagnostics) == 1
    diagnostic = table.diagnostics[0]
    assert diagnostic.severity is Severity.WARNING
    assert diagnostic.field == "spec.rules[0].matches[0].path.value"
    assert diagnostic.key is not None and diagnostic.key.name == "rx"
    assert "never matches" in diagnostic.message
    assert "HTTPRoute default/rx: spec.rules[0].matches[0].path.value" in str(diagnostic)
    assert isinstance(table.route(request("/aaaa")), DirectResponse)  # the bad match is dropped
    action = table.route(request("/also"))  # the rule's other match still works
    assert isinstance(action, Forward) and action.backends[0].service.name == "v1"


def test_unsupported_header_and_query_regex_are_reported() -> None:
    bad_header = HTTPRouteMatch(headers=(HTTPValueMatch("x-a", "(?=x)y", "RegularExpression"),))
    bad_type = HTTPRouteMatch(query_params=(HTTPValueMatch("q", "1", "Prefix"),))
    bad_path_type = HTTPRouteMatch(path=HTTPPathMatch("Suffix", "/x"))
    route = http_route("rx", [rule(bad_header, bad_type, bad_path_type, backends=to("v1"))])
    table = RouteTable.build([route], SERVICES, rng=random.Random(0))
    assert [d.field for d in table.diagnostics] == [
        "spec.rules[0].matches[0].headers[0].value",
        "spec.rules[0].matches[1].queryParams[0].type",
        "spec.rules[0].matches[2].path.type",
    ]
    # Routes are attached, but no usable match is left: nothing matches.
    assert table.route(request("/x", headers=[("x-a", "y")], query="q=1")) == DirectResponse(404)


# -- properties ---------------------------------------------------------------------------------------

_ATOMS = st.sampled_from(["a", "b", "/", ".", "[ab]", "[^/]", r"\d", "x"])
_QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "{1,3}", "{2}", "{0,40}", "*?"])


def _regex() -> st.SearchStrategy[str]:
    piece = st.builds(lambda atom, q: atom + q, _ATOMS, _QUANTIFIERS)
    sequence = st.lists(piece, min_size=1, max_size=12).map("".join)

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        group = st.builds(lambda body, q: f"(?:{body}){q}", inner, _QUANTIFIERS)
        alternation = st.builds(lambda a, b, q: f"(?:{a}|{b}){q}", inner, inner, _QUANTIFIERS)
        joined = st.lists(st.one_of(inner, group, alternation), min_size=1, max_size=4).map("".join)
        return st.one_of(group, alternation, joined)

    return st.recursive(sequence, extend, max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_regex(), seed=st.integers(0, 2**16))
def test_accepted_patterns_match_adversarial_input_quickly(pattern: str, seed: int) -> None:
    if regex_support_problem(pattern) is not None:
        return
    compiled = re.compile(pattern)
    rng = random.Random(seed)
    # Long runs of the pattern's own characters, ending in one it cannot match: the classic trigger.
    body = "".join(rng.choice("ab/x1") for _ in range(8)) * 1000
    for subject in (body + "!", "a" * 8000 + "!", "/a" * 4000 + "!"):
        started = time.perf_counter()
        compiled.fullmatch(subject)
        assert time.perf_counter() - started < 1.0, f"{pattern!r} took too long"


_TEXT = st.text(max_size=60)
_HEADER_NAMES = st.sampled_from(["x-canary", "host", "x-version", "cookie", "X-Canary", ""])


@settings(max_examples=300, deadline=None)
@given(
    path=_TEXT,
    method=st.sampled_from(["GET", "POST", "PATCH", "get", "", "BREW"]) | _TEXT,
    query=_TEXT,
    authority=_TEXT,
    headers=st.lists(st.tuples(_HEADER_NAMES | _TEXT, _TEXT), max_size=6),
)
def test_route_never_raises(
    path: str, method: str, query: str, authority: str, headers: list[tuple[str, str]]
) -> None:
    redirect = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}
    rewrite = {"hostname": "v1.example", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}
    route = http_route(
        "fuzz",
        [
            rule(match("/redirect"), filters=[flt("RequestRedirect", "requestRedirect", redirect)]),
            rule(match("/rewrite"), backends=to("v1"), filters=[flt("URLRewrite", "urlRewrite", rewrite)]),
            rule(match("/v", header_regex={"x-version": "v[0-9]+"}, query={"debug": "1"}), backends=to("v2")),
            rule(match(r"/r/[^/]+/.*", kind="RegularExpression"), backends=to(("v1", 1), ("missing", 1))),
            rule(
                match("/exact", kind="Exact", method="POST", headers={"x-canary": "true"}), backends=to("v1")
            ),
        ],
    )
    table = RouteTable.build([route], SERVICES, rng=random.Random(0))
    req = request(path, method=method, query=query, authority=authority, headers=headers)
    action = table.route(req)
    assert isinstance(action, Forward | Redirect | DirectResponse)
    if isinstance(action, Redirect):
        assert not any(c in action.location for c in "\r\n \t")
