"""Request-target normalization: the one path that authorization matches and the backend receives.

Theory of operation
-------------------
Path-based policy is only as strong as the agreement between the path the policy engine looks at and
the path the application acts on. Every classic bypass (CVE-2019-9901, CVE-2021-31920, CVE-2021-39156,
CVE-2020-8595) is a request whose path the proxy read one way and the backend another: `//admin`,
`/a/../admin`, `/%2e%2e/admin`, `/admin%2F`, `\\admin`, `/admin;x`, overlong UTF-8 (`%c0%ae` for `.`).

So the waypoint normalizes each request target exactly once (`normalize_path`) and then uses the result
for everything: policy matching, routing, and the request line it sends upstream. What it cannot turn
into one unambiguous path it refuses with a `PathError` (the proxy answers 400, or 414 for length)
instead of guessing. In order:

1. The target must be visible ASCII (RFC 3986 has no other characters): control characters, NUL,
   space, DEL and non-ASCII are refused, as is a backslash anywhere (some servers treat it as `/`, so
   `\\admin` would be `/admin` to them) and a fragment (`#` never belongs in a request target).
2. Forms (RFC 9112 §3.2): origin-form `/path?query`; absolute-form `http(s)://authority/path?query`,
   reduced to its path and query (the authority is returned for the proxy to compare with Host); `*`
   only for OPTIONS. Anything else (authority-form, relative paths, other schemes) is refused.
3. The query is split off at the first `?` and kept as sent; only the path is normalized.
4. The path may hold only RFC 3986 path characters. `;` is refused: Istio/Envoy leave path
   parameters alone, but Tomcat and Spring strip `;x` before routing, so `/admin;x` would reach their
   `/admin` past a policy on `/admin`. Refusing is the only choice under which policy and backend agree.
5. Percent-decoding, once (never twice: `%252e` stays `%252e`). Unreserved characters (ALPHA DIGIT
   `-._~`) are decoded, since RFC 3986 §6.2.2.2 says their encoded and plain forms are the same
   URI; every other escape stays encoded, with its hex digits upper-cased. Refused: an encoded `/` or
   `\\` (`%2F`, `%5C`: Envoy's `path_with_escaped_slashes_action` offers KEEP, REJECT, UNESCAPE and
   redirect; loom chooses REJECT, because keeping them lets a backend that decodes see a different
   path and unescaping changes the segment structure the client asked for), an encoded NUL or control
   character, a malformed escape, and escapes that are not valid UTF-8: overlong forms like `%c0%ae`
   are how lenient decoders turn bytes into `.` or `/`, and loom does not try to tell those apart from
   other invalid sequences.
6. Runs of `/` are merged into one (Istio's MERGE_SLASHES), then `.` and `..` segments are removed as
   RFC 3986 §5.2.4 describes, never climbing above the root. A trailing slash is kept (`/a/` and `/a`
   are different resources to many servers), and a final `.` or `..` leaves one: `/a/b/..` is `/a/`.

Paths are case-sensitive (RFC 3986 §6.2.2.1 only folds the scheme and host): `/ADMIN` stays `/ADMIN`
and a policy on `/admin` does not cover it. Backends that route case-insensitively need policies that
list both spellings (or a DENY on a prefix both share).

The result is idempotent: normalizing a normalized path gives it back unchanged, and it never contains
`//`, `/./` or `/../`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

__all__ = [
    "MAX_TARGET_LENGTH",
    "NormalizedPath",
    "PathError",
    "normalize_path",
]

# Longer targets are refused with 414. Far above what real clients send (browsers stop near 8 KiB for
# the whole URL), and it bounds the work done per request before anything else looks at it.
MAX_TARGET_LENGTH = 16 * 1024

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; plus the "/" separator. ";" is a
# sub-delim but refused separately (see the module docstring), so it is not listed here.
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,=:@/%")
_HEX = frozenset(string.hexdigits)
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SLASH_RUNS = re.compile(r"/{2,}")
# A maximal run of consecutive escapes: the bytes of one multi-byte UTF-8 character are always adjacent.
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-F]{2})+")


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    """A request target after normalization. `path` is what policy matches and the backend receives."""

    path: str  # starts with "/" (or is "*" for OPTIONS *); no query, no "//", "/./" or "/../"
    query: str  # without the "?"; "" when absent. Passed through as sent (after the checks of step 1)
    raw: str  # the request target exactly as received
    # The authority of an absolute-form target (lower-cased), "" for origin-form. RFC 9112 §3.2.2: a
    # server must then ignore Host; the proxy should refuse a request whose Host disagrees.
    authority: str = ""
    changed: bool = False  # whether `path` differs from the path part of `raw` (for logs and metrics)

    @property
    def target(self) -> str:
        """The origin-form request target to send upstream: the normalized path plus the query."""
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(frozen=True, slots=True)
class PathError:
    """A request target that cannot be normalized unambiguously; the proxy answers `status`."""

    reason: str  # lower-case, names the offending part, e.g. "encoded '/' (%2F) in the path"
    status: int = 400

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


def normalize_path(raw_target: str, *, method: str = "") -> NormalizedPath | PathError:
    """Normalize an HTTP request target (the request-line target, or HTTP/2 `:path`).

    `method` is only consulted for the asterisk-form, which RFC 9112 allows for OPTIONS alone.
    """
    if len(raw_target) > MAX_TARGET_LENGTH:
        return PathError(f"request target longer than {MAX_TARGET_LENGTH} characters", 414)
    if not raw_target:
        return PathError("empty request target")
    problem = _character_problem(raw_target)
    if problem is not None:
        return PathError(problem)
    if raw_target == "*":
        if method == "OPTIONS":
            return NormalizedPath(path="*", query="", raw=raw_target)
        return PathError(f"the asterisk-form target '*' is only allowed with OPTIONS, not {method or 'this'}")

    authority = ""
    if raw_target.startswith("/"):
        rest = raw_target
    else:
        absolute = _split_absolute_form(raw_target)
        if isinstance(absolute, PathError):
            return absolute
        authority, rest = absolute

    raw_path, _, query = rest.partition("?")
    if not raw_path:
        raw_path = "/"  # "http://host" and "http://host?q" address the root
    for ch in raw_path:
        if ch == ";":
            return PathError(
                "';' (path parameter) in the path: some backends strip parameters before routing, so "
                "the path they act on would differ from the one authorization checked"
            )
        if ch not in _PATH_CHARS:
            return PathError(f"character {ch!r} is not allowed in a path (RFC 3986)")

    decoded = _decode_unreserved(raw_path)
    if isinstance(decoded, PathError):
        return decoded
    path = _remove_dot_segments(_SLASH_RUNS.sub("/", decoded))
    return NormalizedPath(
        path=path, query=query, raw=raw_target, authority=authority, changed=path != raw_path
    )


def _character_problem(target: str) -> str | None:
    if target.isascii() and target.isprintable() and " " not in target and "\\" not in target:
        if "#" in target:
            return "a fragment ('#') is not allowed in a request target"
        return None  # the common case: one pass in C over the whole target
    for i, ch in enumerate(target):
        code = ord(ch)
        if code == 0:
            return f"NUL character at offset {i}"
        if code < 0x20 or code == 0x7F:
            return f"control character 0x{code:02x} at offset {i}"
        if ch == " ":
            return f"space at offset {i}"
        if code > 0x7E:
            return f"non-ASCII character {ch!r} at offset {i} (must be percent-encoded)"
        if ch == "\\":
            return f"backslash at offset {i}: some servers treat it as '/'"
    return "a fragment ('#') is not allowed in a request target" if "#" in target else None


def _split_absolute_form(target: str) -> tuple[str, str] | PathError:
    """(authority, path-and-query) of an absolute-form target, or why it is not acceptable."""
    scheme_match = _ABSOLUTE_FORM.match(target)
    if scheme_match is None:
        return PathError(
            f"request target {target[:64]!r} is neither origin-form ('/path') nor absolute-form "
            "('http://host/path')"
        )
    scheme = scheme_match.group(1).lower()
    if scheme not in ("http", "https"):
        return PathError(f"unsupported scheme {scheme!r} in an absolute-form request target")
    after = target[scheme_match.end() :]
    end = len(after)
    for separator in "/?":
        found = after.find(separator)
        if found != -1:
            end = min(end, found)
    authority, rest = after[:end], after[end:]
    if not authority:
        return PathError("absolute-form request target without a host")
    if "@" in authority:
        return PathError("user information ('@') in the request target's authority is not allowed")
    return authority.lower(), rest


def _decode_unreserved(path: str) -> str | PathError:
    """Decode escapes of unreserved characters; keep the rest encoded (upper-case hex) or refuse them."""
    if "%" not in path:
        return path
    out: list[str] = []
    i = 0
    length = len(path)
    while i < length:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        hex_digits = path[i + 1 : i + 3]
        if len(hex_digits) != 2 or not all(c in _HEX for c in hex_digits):
            return PathError(f"malformed percent-encoding {path[i : i + 3]!r} at offset {i} of the path")
        value = int(hex_digits, 16)
        if value == 0x2F:
            return PathError(f"encoded '/' (%{hex_digits}) in the path is refused (escaped slashes: REJECT)")
        if value == 0x5C:
            return PathError(f"encoded '\\' (%{hex_digits}) in the path is refused (escaped slashes: REJECT)")
        if value == 0:
            return PathError("encoded NUL (%00) in the path")
        if value < 0x20 or value == 0x7F:
            return PathError(f"encoded control character (%{hex_digits}) in the path")
        decoded = chr(value)
        out.append(decoded if decoded in _UNRESERVED else f"%{value:02X}")
        i += 3
    result = "".join(out)
    for run in _ESCAPE_RUN.findall(result):
        raw_bytes = bytes(int(run[j + 1 : j + 3], 16) for j in range(0, len(run), 3))
        try:
            raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return PathError(
                f"percent-encoded bytes {run} are not valid UTF-8 (overlong forms such as %C0%AE decode "
                "to '.' in lenient servers)"
            )
    return result


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path without empty segments (runs of '/' are already merged)."""
    if "." not in path:
        return path
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    result = "/" + "/".join(kept)
    # "/a/." and "/a/b/.." name a directory: the result keeps the trailing slash.
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result
