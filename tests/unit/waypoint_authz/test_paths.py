"""waypoint.paths.normalize_path: the classic path-confusion corpus (hardening checklist item 11), the
target forms, and properties (idempotent; no "//", "/./" or "/../" ever left in the output)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from waypoint.paths import MAX_TARGET_LENGTH, NormalizedPath, PathError, normalize_path

# (request target, normalized path, query)
ACCEPTED = [
    pytest.param("/", "/", "", id="root"),
    pytest.param("/admin", "/admin", "", id="plain"),
    pytest.param("//admin", "/admin", "", id="double slash"),
    pytest.param("///admin///x", "/admin/x", "", id="slash runs merged"),
    pytest.param("/./admin", "/admin", "", id="dot segment"),
    pytest.param("/a/../admin", "/admin", "", id="dot-dot segment"),
    pytest.param("/a/b/../../admin", "/admin", "", id="two dot-dots"),
    pytest.param("/../../admin", "/admin", "", id="dot-dot never above root"),
    pytest.param("/%2e%2e/admin", "/admin", "", id="encoded dot-dot"),
    pytest.param("/%2E./admin", "/admin", "", id="mixed encoded dot-dot"),
    pytest.param("/x/.%2e/admin", "/admin", "", id="dot plus encoded dot"),
    pytest.param("/%2e/admin", "/admin", "", id="encoded dot"),
    pytest.param("/a//../admin", "/admin", "", id="slashes merged before dot removal"),
    pytest.param("/%61dmin", "/admin", "", id="encoded unreserved letter decoded"),
    pytest.param("/%7euser/%2D_", "/~user/-_", "", id="unreserved punctuation decoded"),
    pytest.param("/admin/", "/admin/", "", id="trailing slash kept"),
    pytest.param("/a/b/..", "/a/", "", id="final dot-dot names a directory"),
    pytest.param("/a/.", "/a/", "", id="final dot names a directory"),
    pytest.param("/..", "/", "", id="dot-dot at root"),
    pytest.param("/...", "/...", "", id="three dots is a name"),
    pytest.param("/.admin", "/.admin", "", id="dot-prefixed name"),
    pytest.param("/ADMIN", "/ADMIN", "", id="case preserved: paths are case-sensitive"),
    pytest.param("/admin?x", "/admin", "x", id="query split off"),
    pytest.param("/admin?a=1&b=/../c", "/admin", "a=1&b=/../c", id="query not normalized"),
    pytest.param("/a/../admin?", "/admin", "", id="empty query"),
    pytest.param("/a%20b", "/a%20b", "", id="reserved escape kept"),
    pytest.param("/a%3fb", "/a%3Fb", "", id="escape hex upper-cased"),
    pytest.param("/%252e%252e/admin", "/%252e%252e/admin", "", id="decoded once only"),
    pytest.param("/caf%C3%A9", "/caf%C3%A9", "", id="valid UTF-8 escapes kept"),
    pytest.param("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", "", id="all pchar punctuation"),
    pytest.param("http://reviews:9080/a/../b?q=1", "/b", "q=1", id="absolute-form reduced"),
    pytest.param("HTTPS://Reviews", "/", "", id="absolute-form without path"),
    pytest.param("http://reviews?x", "/", "x", id="absolute-form query only"),
]


@pytest.mark.parametrize(("target", "path", "query"), ACCEPTED)
def test_accepted_targets(target: str, path: str, query: str) -> None:
    result = normalize_path(target)
    assert isinstance(result, NormalizedPath), result
    assert (result.path, result.query, result.raw) == (path, query, target)
    assert result.target == (f"{path}?{query}" if query else path)


# (request target, a fragment of the reason)
REFUSED = [
    pytest.param("/admin%2f", "encoded '/'", id="encoded slash lower"),
    pytest.param("/x%2F..%2Fadmin", "encoded '/'", id="encoded slash traversal"),
    pytest.param("/%5Cadmin", "encoded '\\'", id="encoded backslash"),
    pytest.param("/%5cadmin", "encoded '\\'", id="encoded backslash lower"),
    pytest.param("\\admin", "backslash", id="backslash"),
    pytest.param("/a\\..\\admin", "backslash", id="backslash traversal"),
    pytest.param("/admin?x=\\", "backslash", id="backslash in query"),
    pytest.param("/admin#x", "fragment", id="fragment"),
    pytest.param("/admin;x", "';'", id="path parameter"),
    pytest.param("/admin;jsessionid=1/", "';'", id="matrix parameter"),
    pytest.param("/admin%00", "NUL", id="encoded NUL"),
    pytest.param("/admin\x00", "NUL", id="raw NUL"),
    pytest.param("/admin%0d%0aX: y", "space", id="space after encoded CRLF"),
    pytest.param("/admin%0a", "control", id="encoded LF"),
    pytest.param("/admin%7F", "control", id="encoded DEL"),
    pytest.param("/ad\tmin", "control", id="raw tab"),
    pytest.param("/ad\x7fmin", "control", id="raw DEL"),
    pytest.param("/ad min", "space", id="raw space"),
    pytest.param("/caf\u00e9", "non-ASCII", id="raw non-ASCII"),
    pytest.param("/%c0%ae%c0%ae/admin", "not valid UTF-8", id="overlong UTF-8 dot"),
    pytest.param("/%c0%af", "not valid UTF-8", id="overlong UTF-8 slash"),
    pytest.param("/%e0%80%ae", "not valid UTF-8", id="three-byte overlong dot"),
    pytest.param("/%ff", "not valid UTF-8", id="invalid byte"),
    pytest.param("/%C3", "not valid UTF-8", id="truncated sequence"),
    pytest.param("/%zz", "malformed", id="bad hex"),
    pytest.param("/%4", "malformed", id="short escape"),
    pytest.param("/a%", "malformed", id="percent at end"),
    pytest.param("/a|b", "not allowed in a path", id="pipe"),
    pytest.param("/a{b}", "not allowed in a path", id="braces"),
    pytest.param('/a"b', "not allowed in a path", id="quote"),
    pytest.param("admin", "neither origin-form", id="relative"),
    pytest.param("reviews:9080", "neither origin-form", id="authority-form"),
    pytest.param("ftp://host/admin", "unsupported scheme", id="other scheme"),
    pytest.param("http:///admin", "without a host", id="absolute-form without host"),
    pytest.param("http://user@host/admin", "user information", id="userinfo"),
    pytest.param("", "empty", id="empty"),
    pytest.param("*", "only allowed with OPTIONS", id="asterisk without OPTIONS"),
]


@pytest.mark.parametrize(("target", "reason"), REFUSED)
def test_refused_targets(target: str, reason: str) -> None:
    result = normalize_path(target)
    assert isinstance(result, PathError), result
    assert result.status == 400
    assert reason in result.reason


def test_asterisk_form_is_accepted_for_options_only() -> None:
    result = normalize_path("*", method="OPTIONS")
    assert isinstance(result, NormalizedPath)
    assert result.path == "*"
    refused = normalize_path("*", method="GET")
    assert isinstance(refused, PathError)
    assert "not GET" in refused.reason


def test_overlong_target_is_414() -> None:
    result = normalize_path("/" + "a" * MAX_TARGET_LENGTH)
    assert isinstance(result, PathError)
    assert result.status == 414
    assert isinstance(normalize_path("/" + "a" * (MAX_TARGET_LENGTH - 1)), NormalizedPath)


def test_absolute_form_reports_the_authority_lower_cased() -> None:
    result = normalize_path("http://Reviews.Default:9080/x")
    assert isinstance(result, NormalizedPath)
    assert result.authority == "reviews.default:9080"
    origin = normalize_path("/x")
    assert isinstance(origin, NormalizedPath)
    assert origin.authority == ""


@pytest.mark.parametrize(
    ("target", "changed"),
    [("/a/b", False), ("/a/b?x=//", False), ("//a", True), ("/a/./b", True), ("/%61", True), ("/a%3f", True)],
)
def test_changed_flag(target: str, changed: bool) -> None:
    result = normalize_path(target)
    assert isinstance(result, NormalizedPath)
    assert result.changed is changed


# Segments chosen to exercise every step: dots (plain, encoded, mixed), empty segments (slash runs),
# encoded unreserved and reserved characters, and case.
_SEGMENTS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        ".%2e",
        "...",
        "a",
        "B",
        "admin",
        "%41",
        "%7e",
        "%20",
        "%c3%a9",
        "x.y",
        "~",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_SEGMENTS, max_size=10), st.booleans(), st.sampled_from(["", "?q=1", "?a=/../b"]))
@example(["", "admin"], False, "")
@example([".."], True, "")
def test_normalization_properties(segments: list[str], trailing_slash: bool, query: str) -> None:
    target = "/" + "/".join(segments) + ("/" if trailing_slash else "") + query
    result = normalize_path(target)
    assert isinstance(result, NormalizedPath), result
    path = result.path
    assert path.startswith("/")
    assert "//" not in path
    assert "/./" not in path and "/../" not in path
    assert not path.endswith(("/.", "/.."))
    assert result.query == query.removeprefix("?")
    again = normalize_path(path)
    assert isinstance(again, NormalizedPath)
    assert again.path == path, "normalization must be idempotent"
    assert not again.changed


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=40))
def test_arbitrary_ascii_never_raises_and_results_are_fixed_points(tail: str) -> None:
    result = normalize_path("/" + tail)
    if isinstance(result, PathError):
        assert result.reason and result.status in (400, 414)
        return
    again = normalize_path(result.target)
    assert isinstance(again, NormalizedPath)
    assert (again.path, again.query) == (result.path, result.query)
