r"""HTTPRoute routing for the waypoint: which backend (or which direct answer) each request gets.

Theory of operation
-------------------
`RouteTable.build` compiles the HTTPRoutes of a configuration snapshot once; `route` then answers each
request without touching the configuration again. Nothing here does I/O; randomness (the weighted
backend pick) comes from an injected `random.Random`, so tests are deterministic.

Attachment (Gateway API, GAMMA mesh mode). A route applies to a request only if it is attached to the
Service the client addressed (`request.service`):

* parentRef `kind: Service` (group "" or "core"), namespace = the ref's namespace or else the route's,
  optionally narrowed to one Service port; `hostnames` play no part (GAMMA). A route in the Service's
  own namespace is a *producer* route and applies to every client. A route in another namespace is a
  *consumer* route: it applies only to clients of its own namespace (taken from the client's verified
  mTLS identity), and for them it replaces the producer routes.
* parentRef `kind: Gateway` naming this waypoint: the route applies to the Services the waypoint
  serves that its `hostnames` select (the Service's FQDN, `name`, `name.namespace`,
  `name.namespace.svc`, or a `*.` wildcard; no hostnames select every Service). Service-attached
  routes are the more specific statement, so they win: waypoint-wide routes are consulted only for a
  Service that has no route of its own.
* parentRefs to other Gateways (ingress gateways) are not ours and are ignored silently; other parent
  kinds are reported.

If nothing is attached, the request goes to the addressed Service itself (`Forward`, route "").
If routes are attached but no match fits, the answer is 404: the routes define the Service's API.

Matching. Every (rule, match) pair of the attached routes is one candidate; a rule without matches has
the single match "PathPrefix /". Candidates are ordered by Gateway API precedence -- Exact path, then
the longest PathPrefix, then RegularExpression; then a method match; then the most header matches;
then the most query-parameter matches; ties go to the route that sorts first by namespace/name (we
have no creation timestamps), then rule order, then match order -- and the first that matches wins.
PathPrefix matches whole segments (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`); a trailing
`/` in the prefix is ignored. Header names compare case-insensitively; repeated request headers are
joined with "," (as Envoy does); query parameters compare by exact name and their first value.

Regular expressions run on Python's backtracking `re` engine, which has no timeout, so only a subset
with bounded matching time is accepted (`regex_support_problem`): no backreferences, lookarounds or
conditionals (they are not regular); no repetition of a sub-pattern that can match the same text in
more than one way (nested quantifiers, alternation, or a variable-width body without a delimiter
under a repeat: the classic exponential cases); and an estimate of the steps a failing match can
take must stay under about a million. The estimate multiplies the choices of the parts that can
hand characters to each other -- an unbounded repetition counts as 2^16 (inputs up to 64 KiB), `?`
as 2, `{m,n}` as n-m+1, `a|b|c` as 3 -- where no character between them pins the boundary. So
`[^/]+/[^/]+/[^/]+` (each `/` pins a boundary), `/api/.*/items/.*` (a final `.*` always finishes the
match) and `.*\.(css|js)` pass, while `.*a.*b`, `.*\d+x` (quadratic) and `a?a?a?...aaa`
(exponential) are refused.
A rejected match never matches and is reported; the rest of the route keeps working.

Actions. RequestRedirect becomes `Redirect` with an absolute Location; otherwise the rule forwards to
one backend chosen by weight (weight 0 is never chosen). An invalid backendRef (unknown Service or
port, a kind other than Service, or another namespace: cross-namespace references need a
ReferenceGrant, which loom does not model, so they are refused) keeps its share of the weight and
that share is answered 500, as the Gateway API requires; all weights 0 is also 500. A rule without
backendRefs forwards to the addressed Service (a filter-only or timeout-only mesh route). A filter
loom does not implement (RequestMirror, ExtensionRef, unknown types) must not be skipped silently, so
its rule answers 500. Header modifiers, URLRewrite (the final path is computed here), timeouts and
retries are copied into the `Forward`. `Forward.rewrite_path` never carries the query: the proxy
keeps the request's query string. A redirect's Location keeps it.

Diagnostics (`RouteTable.diagnostics`) are warnings naming the route, the field (e.g.
`spec.rules[0].matches[1].path.value`) and what happens instead: the route is used minus that part.

Retries: without a `retry` block there are none. With one, `attempts` (default 2, Istio's default),
`backoff` and `codes` (default 503, Istio's retriable status) map onto `RetryPolicy`; resets and
connect failures are retried too. A request whose method is not idempotent (RFC 9110: anything but
GET, HEAD, OPTIONS, TRACE, PUT, DELETE) keeps only connect-failure retries: the backend never saw it.
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qsl, quote

from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import HBONE_PORT, HTTPRoute, HTTPRouteMatch, HTTPRouteRule, HTTPValueMatch
from loom.resources.parse_gateway import GATEWAY_API_GROUP, parse_duration
from waypoint.model import (
    DirectResponse,
    Forward,
    HeaderEdits,
    Redirect,
    RequestView,
    RetryPolicy,
    RouteAction,
    ServiceRef,
    WeightedBackend,
)

if TYPE_CHECKING:
    import sre_constants as _sre_c
    import sre_parse as _sre_p
else:  # the same modules under their 3.11+ names (importing sre_* warns about deprecation)
    from re import _constants as _sre_c
    from re import _parser as _sre_p

ServiceResolver = Callable[[str, str, int], ServiceRef | None]
"""(namespace, name, port) -> the Service port as the waypoint knows it, None when unknown."""

ServiceIndex = Mapping[tuple[str, str], Sequence[ServiceRef]]
"""(namespace, name) -> one ServiceRef per Service port."""

CORE_GROUPS = ("", "core")
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DEFAULT_RETRY_ATTEMPTS = 2  # Istio's default when a retry block leaves attempts out
DEFAULT_RETRY_CODES = frozenset({503})  # Istio's default retriable status
DEFAULT_REDIRECT_STATUS = 302  # Gateway API default for RequestRedirect.statusCode
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
SCHEME_PORTS = {"http": 80, "https": 443}
MAX_REGEX_LENGTH = 1024  # the Gateway API's limit on a path match value
# Backtracking cost of a regex, in log2 of the steps a failing match may take (see regex_support_problem):
UNBOUNDED_BITS = 16  # an unbounded repetition over an input of up to 64 KiB
MAX_BACKTRACK_BITS = 20  # about a million steps: one unbounded repetition and a few small choices
MAX_CHOICES_PER_SEQUENCE = 64  # bounds the (quadratic) analysis itself
_GATEWAY_CACHE_LIMIT = 4096  # distinct Services looked up against waypoint-wide routes


# ---------------------------------------------------------------------------------------------------
# Regular expressions: the subset with bounded matching time


class _RegexUnsupported(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Chars:
    """An over-approximation of the characters something can consume: an explicit set when small and
    known, else a membership test. Used only to decide whether two repetitions can trade characters."""

    members: frozenset[str] | None
    contains: Callable[[str], bool]


_ANY_CHAR = _Chars(None, lambda c: True)
_NO_CHAR = _Chars(frozenset(), lambda c: False)
_MAX_EXPLICIT = 256
_CATEGORY_PATTERNS = {
    "CATEGORY_DIGIT": re.compile(r"\d"),
    "CATEGORY_NOT_DIGIT": re.compile(r"\D"),
    "CATEGORY_SPACE": re.compile(r"\s"),
    "CATEGORY_NOT_SPACE": re.compile(r"\S"),
    "CATEGORY_WORD": re.compile(r"\w"),
    "CATEGORY_NOT_WORD": re.compile(r"\W"),
}


def _overlap(a: _Chars, b: _Chars) -> bool:
    if a.members is not None:
        return any(b.contains(c) for c in a.members)
    if b.members is not None:
        return any(a.contains(c) for c in b.members)
    return True


def _union(a: _Chars, b: _Chars) -> _Chars:
    if a.members is not None and b.members is not None:
        both = a.members | b.members
        return _Chars(both, both.__contains__)
    return _Chars(None, lambda c: a.contains(c) or b.contains(c))


def _case_variants(c: str) -> set[str]:
    return {c, c.lower(), c.upper(), c.swapcase()} | ({c.casefold()} if len(c.casefold()) == 1 else set())


def _literal_chars(code: int, ignorecase: bool) -> _Chars:
    members = frozenset(_case_variants(chr(code)) if ignorecase else {chr(code)})
    return _Chars(members, members.__contains__)


def _class_chars(items: list[tuple[Any, Any]], ignorecase: bool) -> _Chars:
    negate = False
    literals: set[str] = set()
    ranges: list[tuple[int, int]] = []
    categories: list[re.Pattern[str] | None] = []
    for op, av in items:
        if op is _sre_c.NEGATE:
            negate = True
        elif op is _sre_c.LITERAL:
            literals.add(chr(av))
        elif op is _sre_c.RANGE:
            ranges.append((av[0], av[1]))
        elif op is _sre_c.CATEGORY:
            categories.append(_CATEGORY_PATTERNS.get(str(av)))
        else:
            categories.append(None)  # unknown member kind: assume it can match anything

    def base(c: str) -> bool:
        return (
            c in literals
            or any(lo <= ord(c) <= hi for lo, hi in ranges)
            or any(p is None or p.match(c) is not None for p in categories)
        )

    def contains(c: str) -> bool:
        hit = any(base(v) for v in _case_variants(c)) if ignorecase else base(c)
        # A negated class is over-approximated as "anything" only when case folding blurs it.
        return True if negate and ignorecase else (hit != negate)

    size = len(literals) + sum(hi - lo + 1 for lo, hi in ranges)
    if negate or categories or size > _MAX_EXPLICIT:
        return _Chars(None, contains)
    explicit = set(literals)
    for lo, hi in ranges:
        explicit.update(chr(i) for i in range(lo, hi + 1))
    if ignorecase:
        explicit = {v for c in explicit for v in _case_variants(c)}
    members = frozenset(explicit)
    return _Chars(members, members.__contains__)


@dataclass(frozen=True, slots=True)
class _Item:
    """One element of a sequence, as far as backtracking cost is concerned."""

    bits: float  # log2 of the ways it can match the same text (its own choices and those inside)
    min_width: int  # characters it must consume; > 0 makes it a possible separator
    chars: _Chars  # every character it can consume
    first: _Chars  # the characters it can start with
    atom: bool = False  # exactly one character (a literal, a class, `.`)
    any_star: bool = False  # `.*` / `.+`: at the very end of a pattern it can always finish the match


@dataclass(frozen=True, slots=True)
class _Summary:
    bits: float  # the costliest chain of choices that can trade characters
    chars: _Chars  # everything the sequence can consume
    first: _Chars  # what it can start with
    has_branch: bool  # an alternation somewhere inside


def _chain_bits(items: list[_Item]) -> float:
    """The costliest chain of items with choices in which each can consume what the next one starts
    with, and no mandatory item in between starts with something the earlier one cannot consume (that
    would pin where it ends). Costs along a chain add up: their choices multiply on a failing match."""
    best = [item.bits for item in items]
    if sum(1 for item in items if item.bits) > MAX_CHOICES_PER_SEQUENCE:
        raise _RegexUnsupported(f"more than {MAX_CHOICES_PER_SEQUENCE} optional or repeated parts in a row")
    for j, earlier in enumerate(items):
        if not earlier.bits:
            continue
        # best[j] is final here: every chain into j starts at an index below j.
        for i in range(j + 1, len(items)):
            later = items[i]
            overlaps = _overlap(earlier.chars, later.first)
            if later.bits and overlaps:
                best[i] = max(best[i], later.bits + best[j])
            if later.min_width > 0 and not overlaps:
                break
    return max(best, default=0.0)


def _flags_case(ignorecase: bool, add_flags: int, del_flags: int) -> bool:
    return (ignorecase or bool(add_flags & re.IGNORECASE)) and not del_flags & re.IGNORECASE


def _items(data: Iterable[tuple[Any, Any]], ignorecase: bool) -> tuple[list[_Item], bool]:
    """The items of a sequence (plain groups inlined, so chains see through them), and whether it
    holds an alternation. Raises _RegexUnsupported for what is refused."""
    items: list[_Item] = []
    has_branch = False
    for op, av in data:
        if op in (_sre_c.LITERAL, _sre_c.NOT_LITERAL, _sre_c.ANY, _sre_c.IN):
            chars = _atom_chars(op, av, ignorecase)
            items.append(_Item(0.0, 1, chars, chars, atom=True))
        elif op is _sre_c.AT:
            continue  # anchors and word boundaries consume nothing
        elif op is _sre_c.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            inner, inner_branch = _items(body.data, _flags_case(ignorecase, add_flags, del_flags))
            items.extend(inner)
            has_branch = has_branch or inner_branch
        elif op is _sre_c.ATOMIC_GROUP:
            summary = _summarize(av.data, ignorecase)
            has_branch = has_branch or summary.has_branch
            items.append(_Item(summary.bits, av.getwidth()[0], summary.chars, summary.first))
        elif op is _sre_c.BRANCH:
            has_branch = True
            alternatives = [_summarize(alt.data, ignorecase) for alt in av[1]]
            chars = first = _NO_CHAR
            for alternative in alternatives:
                chars = _union(chars, alternative.chars)
                first = _union(first, alternative.first)
            bits = math.log2(len(alternatives)) + max(a.bits for a in alternatives)
            widths = [alt.getwidth()[0] for alt in av[1]]
            ambiguous = 0 in widths or any(
                _overlap(a.first, b.first) for i, a in enumerate(alternatives) for b in alternatives[i + 1 :]
            )
            if ambiguous:
                # Alternatives that can match the same text (`|a`, `ab|ac`) are retried with the same
                # outcome downstream: the choice multiplies with every later one, whatever it consumes.
                chars = first = _ANY_CHAR
            items.append(_Item(bits, min(widths), chars, first))
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, _sre_c.POSSESSIVE_REPEAT):
            items.append(_repeat_item(av, ignorecase))
        elif op in (_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS):
            raise _RegexUnsupported("backreferences and conditional groups are not supported")
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            raise _RegexUnsupported("lookahead and lookbehind assertions are not supported")
        else:
            raise _RegexUnsupported(f"unsupported construct {op}")
    return items, has_branch


def _repeat_item(av: Any, ignorecase: bool) -> _Item:
    low, high, body = av
    body_items, body_branch = _items(body.data, ignorecase)
    inner = _summary_of(body_items, body_branch)
    body_low, body_high = body.getwidth()
    # Each iteration must be cut out of the input in exactly one way, or the ways multiply across
    # iterations. A delimiter the rest of the body cannot consume (`(/[a-z]+)*`, `([^/]+/)*`) does
    # that, unless the body is ambiguous on its own.
    ambiguous_body = body_branch or inner.bits > UNBOUNDED_BITS or not _delimited(body_items)
    if high > 1 and (body_low != body_high or body_branch) and ambiguous_body:
        raise _RegexUnsupported(
            "a repeated group that can match the same text in more than one way (nested quantifier, "
            "alternation or variable width without a delimiter) can backtrack exponentially"
        )
    if low == high:
        bits = inner.bits  # a fixed count (`[0-9]{3}`) is no choice
    elif high == _sre_c.MAXREPEAT:
        bits = max(UNBOUNDED_BITS, inner.bits)  # iterations are pinned (above): the count is the choice
    else:
        bits = math.log2(high - low + 1) + inner.bits
    any_star = high == _sre_c.MAXREPEAT and low <= 1 and [op for op, _ in body.data] == [_sre_c.ANY]
    if low != high and body_low == 0:
        # `(a*)?`: the body can match nothing in several ways; like an ambiguous alternation.
        return _Item(bits, 0, _ANY_CHAR, _ANY_CHAR)
    return _Item(bits, low * body_low, inner.chars, inner.first, any_star=any_star)


def _delimited(items: list[_Item]) -> bool:
    """Whether a repeated body starts or ends with one character the rest of it cannot consume."""
    if len(items) < 2:
        return False
    for marker, rest in ((items[0], items[1:]), (items[-1], items[:-1])):
        rest_chars = _NO_CHAR
        for item in rest:
            rest_chars = _union(rest_chars, item.chars)
        if marker.atom and not _overlap(marker.chars, rest_chars):
            return True
    return False


def _summarize(data: Iterable[tuple[Any, Any]], ignorecase: bool) -> _Summary:
    return _summary_of(*_items(data, ignorecase))


def _summary_of(items: list[_Item], has_branch: bool) -> _Summary:
    chars = first = _NO_CHAR
    leading = True
    for item in items:
        chars = _union(chars, item.chars)
        if leading:
            first = _union(first, item.first)
            leading = item.min_width == 0  # an item that may be empty lets the next one start
    return _Summary(_chain_bits(items), chars, first, has_branch)


def _atom_chars(op: Any, av: Any, ignorecase: bool) -> _Chars:
    if op is _sre_c.LITERAL:
        return _literal_chars(av, ignorecase)
    if op is _sre_c.IN:
        return _class_chars(av, ignorecase)
    if op is _sre_c.NOT_LITERAL:
        excluded = frozenset(_case_variants(chr(av)) if ignorecase else {chr(av)})
        return _Chars(None, lambda c: c not in excluded)
    return _ANY_CHAR


def regex_support_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be used as a match regex (full match, Python syntax), or None if it can.

    Besides syntax errors this refuses what could make matching time explode on the backtracking
    engine (see the module docstring)."""
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"regular expression longer than {MAX_REGEX_LENGTH} characters"
    try:
        re.compile(pattern)
        parsed = _sre_p.parse(pattern)
        items, has_branch = _items(parsed.data, bool(parsed.state.flags & re.IGNORECASE))
        # A final `.*` always finishes a full match (paths and header values hold no newline), so the
        # engine never backtracks into it: it costs nothing.
        while items and items[-1].any_star:
            items.pop()
        cost = _summary_of(items, has_branch).bits
    except (re.error, RecursionError, OverflowError) as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    except _RegexUnsupported as exc:
        return f"unsupported regular expression {pattern!r}: {exc}"
    if cost > MAX_BACKTRACK_BITS:
        return (
            f"unsupported regular expression {pattern!r}: optional, repeated or alternative parts that "
            f"can match the same characters follow each other; a failing match could take about "
            f"2^{cost:.0f} steps (at most 2^{MAX_BACKTRACK_BITS} are allowed)"
        )
    return None


# ---------------------------------------------------------------------------------------------------
# Compiled matches


class _PathKind(enum.IntEnum):
    # The value is the precedence rank (lower wins).
    EXACT = 0
    PREFIX = 1
    REGEX = 2


@dataclass(frozen=True, slots=True)
class _ValueMatcher:
    name: str  # lower-case for headers, as written for query parameters
    exact: str
    regex: re.Pattern[str] | None

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return value == self.exact


class _RequestFacts:
    """Per-request lookups that more than one candidate may need, computed at most once."""

    __slots__ = ("_headers", "_query", "request")

    def __init__(self, request: RequestView) -> None:
        self.request = request
        self._query: dict[str, str] | None = None
        self._headers: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        if self._headers is None:
            joined: dict[str, list[str]] = {}
            for key, value in self.request.headers:
                joined.setdefault(key.lower(), []).append(value)
            self._headers = {k: ",".join(v) for k, v in joined.items()}
            if "host" not in self._headers and self.request.authority:
                self._headers["host"] = self.request.authority  # HTTP/2 carries Host as :authority
        return self._headers.get(name)

    def query(self, name: str) -> str | None:
        if self._query is None:
            first: dict[str, str] = {}
            for key, value in parse_qsl(self.request.query, keep_blank_values=True):
                first.setdefault(key, value)
            self._query = first
        return self._query.get(name)


@dataclass(frozen=True, slots=True)
class _Match:
    path_kind: _PathKind
    path_value: str  # Exact: the path; PathPrefix: without trailing "/" ("" matches everything)
    path_regex: re.Pattern[str] | None
    method: str
    headers: tuple[_ValueMatcher, ...]
    query: tuple[_ValueMatcher, ...]

    @property
    def precedence(self) -> tuple[int, int, int, int, int]:
        length = len(self.path_value) if self.path_kind is _PathKind.PREFIX else 0
        return (self.path_kind.value, -length, 0 if self.method else 1, -len(self.headers), -len(self.query))

    def matches(self, facts: _RequestFacts) -> bool:
        request = facts.request
        path = request.path
        if self.path_kind is _PathKind.EXACT:
            if path != self.path_value:
                return False
        elif self.path_kind is _PathKind.PREFIX:
            prefix = self.path_value
            if prefix and path != prefix and not path.startswith(prefix + "/"):
                return False
        elif self.path_regex is None or self.path_regex.fullmatch(path) is None:
            return False
        if self.method and request.method != self.method:
            return False
        if not all(h.matches(facts.header(h.name)) for h in self.headers):
            return False
        return all(q.matches(facts.query(q.name)) for q in self.query)


# ---------------------------------------------------------------------------------------------------
# Compiled rule actions


@dataclass(frozen=True, slots=True)
class _PathModifier:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str

    def apply(self, path: str, match: _Match) -> str:
        if self.type == "ReplaceFullPath":
            return self.value
        # ReplacePrefixMatch: the matched prefix (segment-wise) is replaced; the rest is kept.
        rest = path[len(match.path_value) :]
        return (self.value.rstrip("/") + rest) or "/"


@dataclass(frozen=True, slots=True)
class _RedirectSpec:
    scheme: str  # "" = the request's
    hostname: str  # "" = the request's
    port: int  # 0 = derived (Gateway API rules)
    path: _PathModifier | None
    status: int


@dataclass(frozen=True, slots=True)
class _RuleAction:
    route: str  # "<namespace>/<name>"
    failure: bool = False  # the rule cannot be served as written: 500
    redirect: _RedirectSpec | None = None
    backends: tuple[WeightedBackend, ...] = ()  # valid, weight > 0
    invalid_weight: int = 0  # the share that answers 500
    to_parent: bool = False  # no backendRefs: forward to the addressed Service
    request_headers: HeaderEdits = field(default_factory=HeaderEdits)
    response_headers: HeaderEdits = field(default_factory=HeaderEdits)
    rewrite_hostname: str | None = None
    rewrite_path: _PathModifier | None = None
    timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def act(self, request: RequestView, match: _Match, rng: random.Random) -> RouteAction:
        if self.failure:
            return DirectResponse(500, route=self.route)
        if self.redirect is not None:
            return Redirect(self.redirect.status, _location(request, match, self.redirect), route=self.route)
        if self.to_parent:
            chosen = WeightedBackend(request.service, 1)
        else:
            picked = _pick(self.backends, self.invalid_weight, rng)
            if picked is None:
                return DirectResponse(500, route=self.route)
            chosen = picked
        retry = self.retry
        if retry.attempts and request.method not in IDEMPOTENT_METHODS:
            # The backend may have acted on it: only a failed connect (never sent) is safe to repeat.
            retry = replace(retry, on_status=frozenset(), on_reset=False)
        return Forward(
            backends=(chosen,),
            route=self.route,
            request_headers=self.request_headers,
            response_headers=self.response_headers,
            rewrite_path=self.rewrite_path.apply(request.path, match) if self.rewrite_path else None,
            rewrite_authority=self.rewrite_hostname,
            timeout=self.timeout,
            retry=retry,
        )


def _pick(
    backends: Sequence[WeightedBackend], invalid_weight: int, rng: random.Random
) -> WeightedBackend | None:
    """A backend by weight; None when the invalid share (or nothing at all) is drawn."""
    total = sum(b.weight for b in backends if b.weight > 0) + invalid_weight
    if total <= 0:
        return None
    point = rng.randrange(total)
    for backend in backends:
        if backend.weight <= 0:
            continue
        if point < backend.weight:
            return backend
        point -= backend.weight
    return None


_SAFE_HOST = re.compile(r"[A-Za-z0-9._-]+\Z|\[[0-9A-Fa-f:.]+\]\Z")


def _authority_host(authority: str) -> str:
    """The host part of a Host/:authority value, "" if it is not a plain name or IP literal."""
    host = authority.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower().rstrip(".")
    return host if _SAFE_HOST.match(host) else ""


def _location(request: RequestView, match: _Match, spec: _RedirectSpec) -> str:
    scheme = spec.scheme or "http"  # the waypoint receives plain HTTP inside the HBONE tunnel
    host = spec.hostname or _authority_host(request.authority) or request.service.hostname
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if spec.port:
        port = spec.port
    elif spec.scheme:
        port = SCHEME_PORTS.get(scheme, request.service.port)
    else:
        port = request.service.port  # the mesh's "listener port": the Service port addressed
    port_part = "" if SCHEME_PORTS.get(scheme) == port else f":{port}"
    path = spec.path.apply(request.path, match) if spec.path else request.path
    # Percent-encode anything outside URI characters: the Location must never carry CR, LF or spaces.
    location = f"{scheme}://{host}{port_part}{quote(path, safe='/%:@!$&()*+,;=-._~')}"
    if request.query:
        location += "?" + quote(request.query, safe="/%:@!$&()*+,;=-._~?")
    return location


# ---------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, slots=True)
class _Entry:
    order: tuple[Any, ...]  # precedence; lower sorts first
    port: int  # parentRef port, 0 = every port
    match: _Match
    action: _RuleAction


@dataclass(slots=True)
class _Bucket:
    """The entries of one tier (producer, or one consumer namespace) of one Service."""

    entries: list[_Entry] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)

    def serves(self, port: int) -> bool:
        return 0 in self.ports or port in self.ports


@dataclass(slots=True)
class _ServiceRoutes:
    producer: _Bucket = field(default_factory=_Bucket)
    consumers: dict[str, _Bucket] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _GatewayRoute:
    hostnames: tuple[str, ...]
    entries: tuple[tuple[_Match, _RuleAction, tuple[Any, ...]], ...]

    def specificity(self, service: ServiceRef) -> tuple[int, int] | None:
        """How specifically the route's hostnames select `service` (higher wins); None: not at all."""
        if not self.hostnames:
            return (0, 0)
        names = {
            service.name,
            f"{service.name}.{service.namespace}",
            f"{service.name}.{service.namespace}.svc",
            service.hostname.lower().rstrip("."),
        }
        fqdn = service.hostname.lower().rstrip(".")
        best: tuple[int, int] | None = None
        for hostname in self.hostnames:
            host = hostname.lower()
            if host in names:
                score = (2, len(host))
            elif host.startswith("*.") and fqdn.endswith(host[1:]) and len(fqdn) > len(host) - 1:
                score = (1, len(host))
            else:
                continue
            best = score if best is None or score > best else best
        return best


class _Builder:
    """Compiles routes and collects diagnostics; `RouteTable.build` is its only user."""

    def __init__(self, resolver: ServiceResolver, waypoint: tuple[str, str] | None) -> None:
        self.resolve = resolver
        self.waypoint = waypoint
        self.diagnostics: list[Diagnostic] = []
        self.services: dict[tuple[str, str], _ServiceRoutes] = {}
        self.gateway_routes: list[_GatewayRoute] = []
        self._route: HTTPRoute | None = None

    def report(self, field_path: str, message: str) -> None:
        route = self._route
        # Warnings: the route is still used, minus the part named (which the message says how).
        self.diagnostics.append(
            Diagnostic(
                Severity.WARNING,
                message,
                origin=route.origin if route else None,
                key=route.key if route else None,
                field=field_path,
            )
        )

    def add_route(self, route: HTTPRoute) -> None:
        self._route = route
        service_parents: list[tuple[str, str, int]] = []
        gateway_parent = False
        for i, parent in enumerate(route.parent_refs):
            where = f"spec.parentRefs[{i}]"
            namespace = parent.namespace or route.namespace
            if parent.kind == "Service" and parent.group in CORE_GROUPS:
                if parent.section_name:
                    self.report(
                        f"{where}.sectionName",
                        "sectionName on a Service parent is not supported (name the Service port with "
                        "`port`); this parent is not used",
                    )
                    continue
                service_parents.append((namespace, parent.name, parent.port))
            elif parent.kind == "Gateway" and parent.group == GATEWAY_API_GROUP:
                # Port/sectionName pick a listener; the waypoint's single HBONE listener carries
                # every Service, so there is nothing to narrow.
                if self.waypoint == (namespace, parent.name):
                    if parent.port and parent.port != HBONE_PORT:
                        self.report(
                            f"{where}.port",
                            f"the waypoint listens on {HBONE_PORT} only; this parent is not used",
                        )
                        continue
                    gateway_parent = True
            else:
                self.report(
                    where,
                    f"parent kind {parent.kind!r} (group {parent.group!r}) is not supported by the "
                    "waypoint; this parent is not used",
                )
        if not service_parents and not gateway_parent:
            return  # not a route for this waypoint (e.g. an ingress gateway's)
        entries: list[tuple[_Match, _RuleAction, tuple[Any, ...]]] = []
        # A route without rules gets the API server's default: one rule, PathPrefix /, no backends.
        for rule_index, rule in enumerate(route.rules or (HTTPRouteRule(),)):
            entries.extend(self._compile_rule(route, rule_index, rule))
        for namespace, name, port in service_parents:
            routes = self.services.setdefault((namespace, name), _ServiceRoutes())
            if route.namespace == namespace:
                bucket = routes.producer
            else:
                bucket = routes.consumers.setdefault(route.namespace, _Bucket())
            bucket.ports.add(port)
            bucket.entries.extend(_Entry(order, port, m, a) for m, a, order in entries)
        if gateway_parent:
            self.gateway_routes.append(_GatewayRoute(route.hostnames, tuple(entries)))

    # -- rules -------------------------------------------------------------------------------------

    def _compile_rule(
        self, route: HTTPRoute, rule_index: int, rule: HTTPRouteRule
    ) -> list[tuple[_Match, _RuleAction, tuple[Any, ...]]]:
        where = f"spec.rules[{rule_index}]"
        action = self._compile_action(route, where, rule)
        matches = rule.matches or (HTTPRouteMatch(),)
        result: list[tuple[_Match, _RuleAction, tuple[Any, ...]]] = []
        for match_index, match in enumerate(matches):
            compiled = self._compile_match(f"{where}.matches[{match_index}]", match)
            if compiled is None:
                continue
            use = action
            prefix_rewrite = any(
                m is not None and m.type == "ReplacePrefixMatch"
                for m in (action.rewrite_path, action.redirect.path if action.redirect else None)
            )
            if prefix_rewrite and compiled.path_kind is not _PathKind.PREFIX:
                self.report(
                    f"{where}.filters",
                    "a ReplacePrefixMatch path modifier needs a PathPrefix match; this match answers 500",
                )
                use = _RuleAction(route=action.route, failure=True)
            order = (*compiled.precedence, route.namespace, route.name, rule_index, match_index)
            result.append((compiled, use, order))
        return result

    def _compile_value_matches(
        self, where: str, values: Sequence[HTTPValueMatch], *, headers: bool
    ) -> tuple[_ValueMatcher, ...] | None:
        result: list[_ValueMatcher] = []
        seen: set[str] = set()
        for i, value in enumerate(values):
            name = value.name.lower() if headers else value.name
            if name in seen:
                continue  # Gateway API: only the first entry for a name counts
            seen.add(name)
            regex: re.Pattern[str] | None = None
            if value.type == "RegularExpression":
                regex = self._compile_regex(f"{where}[{i}].value", value.value)
                if regex is None:
                    return None
            elif value.type != "Exact":
                self.report(
                    f"{where}[{i}].type", f"unsupported match type {value.type!r}; this match never matches"
                )
                return None
            result.append(_ValueMatcher(name, value.value, regex))
        return tuple(result)

    def _compile_regex(self, where: str, pattern: str) -> re.Pattern[str] | None:
        problem = regex_support_problem(pattern)
        if problem is not None:
            self.report(where, f"{problem}; this match never matches")
            return None
        return re.compile(pattern)

    def _compile_match(self, where: str, match: HTTPRouteMatch) -> _Match | None:
        path = match.path
        kind, value, regex = _PathKind.PREFIX, "", None
        if path is not None:
            if path.type == "Exact":
                kind, value = _PathKind.EXACT, path.value
            elif path.type == "PathPrefix":
                value = path.value.rstrip("/")
            elif path.type == "RegularExpression":
                kind = _PathKind.REGEX
                regex = self._compile_regex(f"{where}.path.value", path.value)
                if regex is None:
                    return None
            else:
                self.report(f"{where}.path.type", f"unsupported path match type {path.type!r}; never matches")
                return None
        headers = self._compile_value_matches(f"{where}.headers", match.headers, headers=True)
        query = self._compile_value_matches(f"{where}.queryParams", match.query_params, headers=False)
        if headers is None or query is None:
            return None
        return _Match(kind, value, regex, match.method.upper(), headers, query)

    def _compile_action(self, route: HTTPRoute, where: str, rule: HTTPRouteRule) -> _RuleAction:
        name = f"{route.namespace}/{route.name}"
        failed = False
        redirect: _RedirectSpec | None = None
        request_headers = response_headers = HeaderEdits()
        rewrite_hostname: str | None = None
        rewrite_path: _PathModifier | None = None
        for i, flt in enumerate(rule.filters):
            here = f"{where}.filters[{i}]"
            try:
                if flt.type == "RequestHeaderModifier":
                    request_headers = _header_edits(_config(flt.config, "requestHeaderModifier"))
                elif flt.type == "ResponseHeaderModifier":
                    response_headers = _header_edits(_config(flt.config, "responseHeaderModifier"))
                elif flt.type == "URLRewrite":
                    config = _config(flt.config, "urlRewrite")
                    rewrite_hostname = _opt_str(config, "hostname") or None
                    rewrite_path = _path_modifier(config)
                elif flt.type == "RequestRedirect":
                    redirect = _redirect_spec(_config(flt.config, "requestRedirect"))
                else:
                    self.report(
                        here,
                        f"filter type {flt.type!r} is not supported by the waypoint; requests matching "
                        "this rule answer 500 (a filter must never be skipped silently)",
                    )
                    failed = True
            except _FilterError as exc:
                self.report(f"{here}.{exc.field}" if exc.field else here, f"{exc}; this rule answers 500")
                failed = True
        if failed:
            return _RuleAction(route=name, failure=True)
        timeout = rule.timeout_request or None  # "0s" disables the timeout
        retry = self._retry_policy(where, rule)
        if redirect is not None:
            return _RuleAction(route=name, redirect=redirect)
        backends, invalid_weight = self._backends(route, where, rule)
        return _RuleAction(
            route=name,
            backends=backends,
            invalid_weight=invalid_weight,
            to_parent=not rule.backend_refs,
            request_headers=request_headers,
            response_headers=response_headers,
            rewrite_hostname=rewrite_hostname,
            rewrite_path=rewrite_path,
            timeout=timeout,
            retry=retry,
        )

    def _backends(
        self, route: HTTPRoute, where: str, rule: HTTPRouteRule
    ) -> tuple[tuple[WeightedBackend, ...], int]:
        valid: list[WeightedBackend] = []
        invalid_weight = 0
        for i, ref in enumerate(rule.backend_refs):
            here = f"{where}.backendRefs[{i}]"
            namespace = ref.namespace or route.namespace
            problem: str | None = None
            service: ServiceRef | None = None
            if ref.kind != "Service" or ref.group not in CORE_GROUPS:
                problem = f"backend kind {ref.kind!r} (group {ref.group!r}) is not supported"
            elif namespace != route.namespace:
                problem = (
                    f"backend in namespace {namespace!r}: cross-namespace references need a "
                    "ReferenceGrant, which loom does not support"
                )
            elif ref.port <= 0:
                problem = "a Service backend needs a port"
            else:
                service = self.resolve(namespace, ref.name, ref.port)
                if service is None:
                    problem = f"Service {namespace}/{ref.name} port {ref.port} not found"
            if problem is not None or service is None:
                if ref.weight > 0:
                    invalid_weight += ref.weight
                self.report(here, f"{problem}; its share of the traffic ({ref.weight}) answers 500")
                continue
            if ref.weight > 0:
                valid.append(WeightedBackend(service, ref.weight))
        return tuple(valid), invalid_weight

    def _retry_policy(self, where: str, rule: HTTPRouteRule) -> RetryPolicy:
        per_try = rule.timeout_backend_request or None
        spec = rule.retry
        if not spec:
            return RetryPolicy(attempts=0, per_try_timeout=per_try)
        here = f"{where}.retry"
        attempts = spec.get("attempts", DEFAULT_RETRY_ATTEMPTS)
        if not _is_int(attempts) or attempts < 0:
            self.report(f"{here}.attempts", f"expected a non-negative integer, got {attempts!r}; using 0")
            attempts = 0
        backoff = RetryPolicy().backoff
        raw_backoff = spec.get("backoff")
        if raw_backoff is not None:
            parsed = parse_duration(raw_backoff) if isinstance(raw_backoff, str) else None
            if parsed is None:
                self.report(f"{here}.backoff", f"invalid duration {raw_backoff!r}; using {backoff}s")
            else:
                backoff = parsed
        codes = DEFAULT_RETRY_CODES
        raw_codes = spec.get("codes")
        if raw_codes is not None:
            if isinstance(raw_codes, list) and all(_is_int(c) and 400 <= c <= 599 for c in raw_codes):
                codes = frozenset(raw_codes)
            else:
                self.report(f"{here}.codes", f"expected HTTP status codes 400-599, got {raw_codes!r}")
        return RetryPolicy(attempts=attempts, per_try_timeout=per_try, on_status=codes, backoff=backoff)


class _FilterError(ValueError):
    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(message)
        self.field = field_path


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config(filter_spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    config = filter_spec.get(key)
    if not isinstance(config, Mapping):
        raise _FilterError(key, f"expected a mapping, got {type(config).__name__}")
    return config


def _opt_str(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _FilterError(key, f"expected a string, got {type(value).__name__}")
    return value


def _header_edits(config: Mapping[str, Any]) -> HeaderEdits:
    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        items = config.get(key) or []
        if not isinstance(items, list):
            raise _FilterError(key, f"expected a list, got {type(items).__name__}")
        result: list[tuple[str, str]] = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise _FilterError(f"{key}[{i}]", "expected {name, value}")
            value = item.get("value", "")
            if not isinstance(value, str):
                raise _FilterError(f"{key}[{i}].value", f"expected a string, got {type(value).__name__}")
            result.append((cast(str, item["name"]).lower(), value))
        return tuple(result)

    remove = config.get("remove") or []
    if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
        raise _FilterError("remove", "expected a list of header names")
    return HeaderEdits(set=pairs("set"), add=pairs("add"), remove=tuple(n.lower() for n in remove))


def _path_modifier(config: Mapping[str, Any]) -> _PathModifier | None:
    spec = config.get("path")
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise _FilterError("path", f"expected a mapping, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "ReplaceFullPath":
        value = spec.get("replaceFullPath")
    elif kind == "ReplacePrefixMatch":
        value = spec.get("replacePrefixMatch")
    else:
        raise _FilterError("path.type", f"unsupported path modifier type {kind!r}")
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise _FilterError("path", f"{kind} needs a path starting with '/', got {value!r}")
    if kind == "ReplaceFullPath" and not value:
        raise _FilterError("path", "ReplaceFullPath needs a path starting with '/'")
    return _PathModifier(kind, value)


def _redirect_spec(config: Mapping[str, Any]) -> _RedirectSpec:
    scheme = _opt_str(config, "scheme")
    if scheme and scheme not in SCHEME_PORTS:
        raise _FilterError("scheme", f"unsupported scheme {scheme!r}")
    hostname = _opt_str(config, "hostname")
    if hostname and not _SAFE_HOST.match(hostname):
        raise _FilterError("hostname", f"invalid hostname {hostname!r}")
    port = config.get("port") or 0
    if not _is_int(port) or not 0 <= port <= 65535:
        raise _FilterError("port", f"invalid port {port!r}")
    status = config.get("statusCode") or DEFAULT_REDIRECT_STATUS
    if not _is_int(status) or status not in REDIRECT_STATUSES:
        raise _FilterError("statusCode", f"unsupported redirect status {status!r}")
    return _RedirectSpec(scheme, hostname.lower(), port, _path_modifier(config), status)


def _index_resolver(services: ServiceIndex) -> ServiceResolver:
    by_port = {(ns, name, ref.port): ref for (ns, name), refs in services.items() for ref in refs}

    def resolve(namespace: str, name: str, port: int) -> ServiceRef | None:
        return by_port.get((namespace, name, port))

    return resolve


# Default actions kept per Service (route-less traffic); past this many the cache starts over.
DEFAULT_FORWARD_CACHE: Final = 4096


class RouteTable:
    """The compiled HTTPRoutes of one configuration: a `waypoint.model.Router`.

    Immutable after `build` except for the injected random generator and a bounded cache of
    waypoint-wide route lists per Service. Rebuild it when the configuration changes."""

    def __init__(
        self,
        services: dict[tuple[str, str], _ServiceRoutes],
        gateway_routes: list[_GatewayRoute],
        diagnostics: tuple[Diagnostic, ...],
        rng: random.Random,
    ) -> None:
        self._services = services
        self._gateway_routes = gateway_routes
        self._gateway_cache: dict[tuple[str, str, int, str], tuple[_Entry, ...] | None] = {}
        self._default_forwards: dict[ServiceRef, Forward] = {}
        self._rng = rng
        self.diagnostics = diagnostics

    @classmethod
    def build(
        cls,
        routes: Sequence[HTTPRoute],
        services: ServiceIndex | ServiceResolver,
        *,
        waypoint: tuple[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> RouteTable:
        """Compile `routes`. `services` resolves backendRefs: a mapping (namespace, name) -> its
        ServiceRefs (one per port), or a callable (namespace, name, port) -> ServiceRef | None.
        `waypoint` is the (namespace, name) of this waypoint's Gateway, for routes attached to it.
        `rng` draws the weighted backend; seed it in tests."""
        resolver = services if callable(services) else _index_resolver(services)
        builder = _Builder(resolver, waypoint)
        for route in sorted(routes, key=lambda r: (r.namespace, r.name)):
            builder.add_route(route)
        for service_routes in builder.services.values():
            for bucket in (service_routes.producer, *service_routes.consumers.values()):
                bucket.entries.sort(key=lambda e: e.order)
        return cls(
            builder.services, builder.gateway_routes, tuple(builder.diagnostics), rng or random.Random()
        )

    def route(self, request: RequestView) -> RouteAction:
        entries = self._entries_for(request)
        if entries is None:
            # No route: the Service itself. The action is immutable, so one per Service serves all.
            default = self._default_forwards.get(request.service)
            if default is None:
                if len(self._default_forwards) >= DEFAULT_FORWARD_CACHE:
                    self._default_forwards.clear()
                default = Forward(backends=(WeightedBackend(request.service, 1),))
                self._default_forwards[request.service] = default
            return default
        facts = _RequestFacts(request)
        port = request.service.port
        for entry in entries:
            if entry.port in (0, port) and entry.match.matches(facts):
                return entry.action.act(request, entry.match, self._rng)
        return DirectResponse(404)

    @staticmethod
    def choose(forward: Forward, rng: random.Random) -> WeightedBackend:
        """One of `forward.backends` by weight (for callers that build a Forward with several)."""
        picked = _pick(forward.backends, 0, rng)
        if picked is None:
            raise ValueError("the Forward has no backend with a positive weight")
        return picked

    def _entries_for(self, request: RequestView) -> Sequence[_Entry] | None:
        """The candidates for this request in precedence order; None when no route is attached."""
        service = request.service
        routes = self._services.get((service.namespace, service.name))
        if routes is not None:
            client_namespace = request.source.namespace
            if client_namespace and client_namespace != service.namespace:
                consumer = routes.consumers.get(client_namespace)
                if consumer is not None and consumer.serves(service.port):
                    return consumer.entries
            if routes.producer.serves(service.port):
                return routes.producer.entries
        if not self._gateway_routes:
            return None
        key = (service.namespace, service.name, service.port, service.hostname)
        if key not in self._gateway_cache:
            if len(self._gateway_cache) >= _GATEWAY_CACHE_LIMIT:
                self._gateway_cache.clear()
            self._gateway_cache[key] = self._select_gateway_entries(service)
        return self._gateway_cache[key]

    def _select_gateway_entries(self, service: ServiceRef) -> tuple[_Entry, ...] | None:
        attached = False
        selected: list[_Entry] = []
        for gateway_route in self._gateway_routes:
            specificity = gateway_route.specificity(service)
            if specificity is None:
                continue
            attached = True
            # Gateway API: the most specific matching hostname first, then the usual precedence.
            rank = (-specificity[0], -specificity[1])
            selected.extend(_Entry((*rank, *order), 0, m, a) for m, a, order in gateway_route.entries)
        selected.sort(key=lambda e: e.order)
        return tuple(selected) if attached else None
