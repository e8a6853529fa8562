"""Hardening checklist item 13 for the waypoint: the compiled L7 matcher (waypoint.authz) agrees with a
reference evaluator written from the specification (reference_evaluator.py), for generated policies
(principals, methods, paths with wildcards and {*}/{**} templates, not-forms, source.principal
conditions, ALLOW/DENY/AUDIT, dry-run) and requests whose paths go through normalize_path first.

The pools make matches frequent and include the classic mistakes: wildcard principals, a principal with
"spiffe://", names where "." is another character (my.sa / myXsa: a regex-based matcher confuses them),
method case, prefix and suffix paths that straddle a segment boundary, and dot segments in raw paths.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loom.identity import Identity
from loom.resources.model import (
    AuthorizationPolicy,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
)
from waypoint.authz import WaypointAuthorizer
from waypoint.paths import NormalizedPath, normalize_path

from .builders import WAYPOINT, policy, request
from .reference_evaluator import RefRequest, reference_decide, template_matches

IDENTITIES = [
    None,
    Identity("cluster.local", "default", "productpage"),
    Identity("cluster.local", "my.ns", "my.sa"),
    Identity("cluster.local", "myXns", "myXsa"),
    Identity("cluster.local", "default", "my.sa"),
    Identity("other.domain", "default", "productpage"),
]
PRINCIPAL_VALUES = [
    "cluster.local/ns/default/sa/productpage",
    "spiffe://cluster.local/ns/default/sa/productpage",
    "cluster.local/ns/my.ns/sa/my.sa",
    "cluster.local/ns/default/*",
    "*/sa/my.sa",
    "*/ns/default/sa/productpage",
    "*",
    "other.domain/ns/default/sa/productpage",
    "cluster.local/ns/myXns/*",
]
METHODS = ["GET", "POST", "DELETE", "get"]
METHOD_VALUES = ["GET", "POST", "get", "G*", "*ETE", "*"]
PATH_VALUES = [
    "/admin",
    "/admin*",
    "/admin/*",
    "*/edit",
    "*",
    "/",
    "/reviews/{*}",
    "/reviews/{**}",
    "/{*}/edit",
    "/{*}/1/{**}",
    "/api/{**}/",
    "/ADMIN",
    "/reviews/1",
]
RAW_SEGMENTS = ["admin", "ADMIN", "reviews", "1", "edit", "api", "v1", ".", "..", "%2e%2e", "", "x.y"]

principal_lists = st.lists(st.sampled_from(PRINCIPAL_VALUES), min_size=1, max_size=3)
sources = st.builds(
    PolicySource,
    principals=st.one_of(st.just(()), principal_lists.map(tuple)),
    not_principals=st.one_of(st.just(()), principal_lists.map(tuple)),
)
operations = st.builds(
    PolicyOperation,
    methods=st.one_of(
        st.just(()), st.lists(st.sampled_from(METHOD_VALUES), min_size=1, max_size=2).map(tuple)
    ),
    not_methods=st.one_of(
        st.just(()), st.lists(st.sampled_from(METHOD_VALUES), min_size=1, max_size=2).map(tuple)
    ),
    paths=st.one_of(st.just(()), st.lists(st.sampled_from(PATH_VALUES), min_size=1, max_size=3).map(tuple)),
    not_paths=st.one_of(
        st.just(()), st.lists(st.sampled_from(PATH_VALUES), min_size=1, max_size=2).map(tuple)
    ),
)
conditions = st.one_of(
    st.builds(PolicyCondition, key=st.just("source.principal"), values=principal_lists.map(tuple)),
    st.builds(PolicyCondition, key=st.just("source.principal"), not_values=principal_lists.map(tuple)),
)
rules = st.builds(
    PolicyRule,
    sources=st.lists(sources, max_size=2).map(tuple),
    operations=st.lists(operations, max_size=2).map(tuple),
    conditions=st.lists(conditions, max_size=1).map(tuple),
)


@st.composite
def policies(draw: st.DrawFn) -> list[AuthorizationPolicy]:
    count = draw(st.integers(min_value=0, max_value=4))
    result = []
    for i in range(count):
        no_rules = draw(st.booleans()) and draw(st.booleans())  # rarely: the "allow nothing" form
        result.append(
            policy(
                f"p{i}",
                *draw(st.lists(rules, max_size=3)),
                action=draw(st.sampled_from(["ALLOW", "ALLOW", "DENY", "AUDIT"])),
                no_rules=no_rules,
                dry_run=draw(st.integers(0, 4)) == 0,
            )
        )
    return result


raw_paths = st.lists(st.sampled_from(RAW_SEGMENTS), max_size=5).map(lambda segments: "/" + "/".join(segments))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.sampled_from(IDENTITIES), st.sampled_from(METHODS), raw_paths)
@example(
    [policy("p0", PolicyRule(operations=(PolicyOperation(paths=("/admin",)),)), action="DENY")],
    None,
    "GET",
    "/x/../admin",
)
def test_compiled_matcher_agrees_with_reference(
    generated: list[AuthorizationPolicy], identity: Identity | None, method: str, raw_path: str
) -> None:
    normalized = normalize_path(raw_path)
    assert isinstance(normalized, NormalizedPath)
    view = request(raw_path, method=method, identity=identity)
    authorizer = WaypointAuthorizer.build(generated, waypoint=WAYPOINT)
    assert not authorizer.diagnostics
    result = authorizer.evaluate(view)
    expected = reference_decide(
        generated, RefRequest(identity.principal if identity else None, method, normalized.path)
    )
    assert result.decision.allowed is expected.allowed
    assert frozenset(result.decision.audited) == expected.audited
    assert frozenset(result.dry_run_matches) == expected.dry_run_matches


def test_reference_template_matcher_follows_the_api_examples() -> None:
    # Examples from the AuthorizationPolicy API documentation (as Envoy's matcher implements them).
    assert template_matches("/foo/{*}", "/foo/bar")
    assert not template_matches("/foo/{*}", "/foo/bar/baz")
    assert template_matches("/foo/{*}/bar/{**}", "/foo/buzz/bar/")
    assert template_matches("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz")
    assert template_matches("/foo/{**}/", "/foo/bar/")
    assert not template_matches("/foo/{**}/", "/foo/bar")
