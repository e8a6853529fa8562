"""Hardening: no input makes the loader raise anything but its own validation errors.

Garbage is generated two ways: fully arbitrary JSON-like values, and "near miss" manifests whose
apiVersion/kind are real and whose keys come from the field names the parsers read, so the generated
trees reach deep into every parser instead of failing at the first type check.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.resources import parse_core, parse_gateway, parse_istio
from loom.resources.loader import (
    ObjectInvalid,
    UnsupportedKind,
    ValidationError,
    check_object,
    load_text,
    parse_object,
)
from loom.resources.model import AuthorizationPolicy, Resource

FUZZ = settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

API_KINDS = [
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "Pod"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1beta1", "PeerAuthentication"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1beta1", "HTTPRoute"),
    ("v1", "List"),
    ("networking.istio.io/v1", "VirtualService"),
]


def _field_names() -> list[str]:
    names: set[str] = set()
    for module in (parse_core, parse_istio, parse_gateway):
        for value in vars(module).values():
            if isinstance(value, frozenset) and all(isinstance(v, str) for v in value):
                names |= value
    names |= {"metadata", "name", "namespace", "labels", "annotations", "ownerReferences", "status", "spec"}
    names |= {"podIP", "podIPs", "ip", "phase", "conditions", "type", "status", "items", "mode", "source"}
    names |= {"from", "to", "operation", "when", "key", "values", "matchLabels", "matchExpressions"}
    return sorted(names)


FIELD_NAMES = _field_names()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "",
            "*",
            "a*b",
            "ALLOW",
            "DENY",
            "CUSTOM",
            "Exact",
            "PathPrefix",
            "RegularExpression",
            "(",
            "/",
            "RequestHeaderModifier",
            "URLRewrite",
            "RequestRedirect",
            "ReplacePrefixMatch",
            "10s",
            "Service",
            "HBONE",
            "istio-waypoint",
            "10.0.0.1",
            "10.0.0.0/33",
            "9080",
            "Ready",
            "True",
            "In",
            "Exists",
            "ReplicaSet",
            "source.ip",
            "request.headers[x]",
            "None",
            "STRICT",
        ]
    )
)
json_like = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(FIELD_NAMES) | st.text(max_size=6) | st.integers(0, 70000), children, max_size=5
        )
    ),
    max_leaves=40,
)


@st.composite
def near_manifests(draw: st.DrawFn) -> dict[str, Any]:
    api_version, kind = draw(st.sampled_from(API_KINDS))
    doc: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    doc["metadata"] = draw(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["x", "web-1", "", "Bad_Name"]) | scalars},
            optional={"namespace": st.sampled_from(["default", "a/b"]) | scalars, "labels": json_like},
        )
        | json_like
    )
    for part in ("spec", "status", "items"):
        if draw(st.booleans()):
            doc[part] = draw(json_like)
    return doc


def assert_only_validation_errors(doc: object) -> None:
    check = check_object(doc)
    if check.errors or check.unsupported:
        # Rejected: nothing is used, except an AuthorizationPolicy's fail-closed stand-in.
        assert check.obj is None or (isinstance(check.obj, AuthorizationPolicy) and check.obj.invalid)
    else:
        assert check.obj is not None
    for problem in (*check.errors, *check.warnings):
        assert isinstance(problem.field, str) and problem.message
    try:
        parsed = parse_object(doc)  # type: ignore[arg-type]  # deliberately not always a mapping
    except (ObjectInvalid, UnsupportedKind) as exc:
        assert isinstance(exc, ValidationError) and str(exc)
    else:
        assert isinstance(parsed, Resource)


@FUZZ
@given(json_like)
def test_arbitrary_values_never_crash(doc: object) -> None:
    assert_only_validation_errors(doc)


@FUZZ
@given(near_manifests())
def test_near_miss_manifests_never_crash(doc: dict[str, Any]) -> None:
    assert_only_validation_errors(doc)


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes_the_loader(text: str) -> None:
    result = load_text(text, "fuzz.yaml")
    assert all(str(d) for d in result.diagnostics)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                "a:",
                " b",
                "- c",
                "[",
                "]",
                "{",
                "}",
                "&x",
                "*x",
                "<<:",
                "---",
                "\n",
                " ",
                "!!str",
                "'",
                '"',
                "? ",
                ": ",
            ]
        ),
        max_size=40,
    )
)
def test_yaml_like_token_soup_never_crashes_the_loader(tokens: list[str]) -> None:
    result = load_text("".join(tokens), "soup.yaml")
    assert all(str(d) for d in result.diagnostics)
