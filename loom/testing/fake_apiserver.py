"""A stand-in Kubernetes API server for tests, speaking the real HTTP protocol on loopback.

Theory of operation
-------------------
Clients (kubernetes_asyncio, or loom's own `KubernetesSource`) talk to it exactly as they talk to a
kube-apiserver: the same URL layout (`/api/v1/...`, `/apis/<group>/<version>/...`), the same JSON bodies
(`<Kind>List` with `metadata.resourceVersion`, `Status` objects for errors) and the same watch stream
(newline-delimited JSON events over chunked transfer encoding). Nothing is mocked at the Python level, so
a client that works here exercises its real HTTP, JSON, retry and resume code.

State is one store per resource plus a single, global, monotonically increasing resourceVersion (like
etcd's revision). Every mutation -- through HTTP or through the test controls below -- bumps the
revision by exactly one and appends one event to a bounded history. A watch from revision R replays the
history after R and then follows live events; if R is older than the history window (after `compact()`
or once the window has overflowed) the stream carries a single `ERROR` event with a 410 `Status` and
ends, which is what forces a well-behaved client to relist. A watch without a revision (or "0") starts
with synthetic `ADDED` events for the current objects, like the real server's "any" semantics.

Behaviour that mirrors the real server and that clients commonly get wrong:
  * list items of built-in kinds (core, apps) carry no `kind`/`apiVersion`; custom resources do;
  * a watch request may say `watch=True` (kubernetes_asyncio) or `watch=true`: Go's ParseBool accepts both;
  * a resource whose CRD is not installed answers a plain-text `404 page not found`, not JSON;
  * `BOOKMARK` events carry only `metadata.resourceVersion`;
  * writes that change nothing do not bump the revision (so they produce no watch event);
  * updates of the main resource ignore `status`, and the `/status` subresource changes only `status`.

Field selectors (`fieldSelector` on LIST and WATCH) work as on the real server: comma-separated terms
`field=value`, `field==value` or `field!=value` (values may escape `\\`, `,` and `=` with a backslash),
all of which must hold. Each kind accepts the fields the real server accepts for it (pods: `spec.nodeName`,
`status.phase`, `metadata.name`, ... see `_SELECTABLE_FIELDS`; kinds without a table only `metadata.name`
and `metadata.namespace`); any other field is a 400 `BadRequest` with the real server's message, e.g.
`field label not supported: spec.foo`. Values are read from the stored object as it is (the fake applies
no defaulting, so a pod stored without `status.phase` has phase ""). On a watch, an update that makes an
object stop matching is sent as DELETED (the previous content at the new resourceVersion) and one that
makes it start matching as ADDED, exactly like the real server's watch cache; replays from the history
are filtered the same way.

Test controls: `add`/`update`/`apply`/`delete`/`get`, `compact()`, `send_bookmark()`,
`fail_next(resource, status)`, `drop_watches()` (abrupt close, no terminating chunk), `install`/`uninstall`
of CRD-backed resources, a TokenReview token table (`tokens`), and a request log (`requests`) with
`wait_until`/`wait_for_request` for bounded waiting in tests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from controller.sources.kubernetes import split_selector_terms

DEFAULT_AUDIENCE: Final = "https://kubernetes.default.svc.cluster.local"
MERGE_PATCH: Final = "application/merge-patch+json"
# How many events the server remembers for resuming watches (the real server keeps a few minutes' worth).
DEFAULT_HISTORY_SIZE: Final = 10_000
# Paginated list snapshots kept for `continue` tokens; older tokens answer 410 like an expired continue.
_MAX_LIST_SNAPSHOTS: Final = 32
# wait_until re-checks its predicate at least this often (seconds).
_POLL_INTERVAL: Final = 0.01

_REASONS: Final[Mapping[int, str]] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True, slots=True)
class FakeResource:
    """One REST resource the fake serves."""

    group: str  # "" for the core group
    version: str
    plural: str  # the URL segment, e.g. "pods"
    kind: str
    namespaced: bool = True
    has_status: bool = True  # whether a /status subresource exists
    custom: bool = False  # served from a CRD: can be uninstalled, list items carry kind/apiVersion

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_name(self) -> str:
        """`plural.group`, the name of the CRD (or just the plural for the core group)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


DEFAULT_RESOURCES: Final[tuple[FakeResource, ...]] = (
    FakeResource("", "v1", "namespaces", "Namespace", namespaced=False),
    FakeResource("", "v1", "pods", "Pod"),
    FakeResource("", "v1", "services", "Service"),
    FakeResource("", "v1", "serviceaccounts", "ServiceAccount", has_status=False),
    FakeResource("apps", "v1", "deployments", "Deployment"),
    FakeResource("", "v1", "configmaps", "ConfigMap", has_status=False),
    FakeResource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", custom=True),
    FakeResource("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", custom=True),
    FakeResource("gateway.networking.k8s.io", "v1", "gateways", "Gateway", custom=True),
    FakeResource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", custom=True),
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server received it, for assertions."""

    method: str
    path: str
    query: Mapping[str, str]
    content_type: str = ""

    @property
    def is_watch(self) -> bool:
        return self.method == "GET" and _parse_bool(self.query.get("watch", "false")) is True

    @property
    def is_list(self) -> bool:
        """A GET of a collection without watch (the caller must know the path is a collection)."""
        return self.method == "GET" and not self.is_watch


@dataclass(frozen=True, slots=True)
class FakeToken:
    """What a bearer token stands for in TokenReview answers."""

    username: str  # e.g. system:serviceaccount:<namespace>:<name>
    audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,)
    pod_name: str = ""  # bound-token claims; empty for tokens not bound to a pod
    pod_uid: str = ""
    node_name: str = ""
    uid: str = ""


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def _parse_bool(text: str) -> bool | None:
    """Go's strconv.ParseBool, which the API server uses for query flags; None when not a boolean."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _status(
    code: int, message: str, reason: str = "", details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


class _ApiError(Exception):
    """Raised inside request handling; becomes a `Status` response."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _HistoryEvent:
    revision: int
    resource: FakeResource
    namespace: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: Mapping[str, Any]
    # The object before a MODIFIED event: a field-selected watch needs it to tell an object that starts
    # or stops matching (sent as ADDED / DELETED) from one that keeps matching (MODIFIED).
    previous: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class _Target:
    """What a URL addresses."""

    resource: FakeResource
    namespace: str | None  # None = all namespaces (or a cluster-scoped resource)
    name: str | None  # None = the collection
    subresource: str = ""


class _Signal:
    """Sentinels put into a watch's queue besides events."""

    BOOKMARK: Final = "bookmark"
    DROP: Final = "drop"  # close the connection abruptly
    END: Final = "end"  # end the stream cleanly (server stopping)


@dataclass(eq=False, slots=True)
class _OpenWatch:
    resource: FakeResource
    namespace: str | None
    bookmarks: bool
    selector: _FieldSelector | None = None  # None: every object
    queue: asyncio.Queue[Mapping[str, Any] | str] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    """An in-process Kubernetes API server on 127.0.0.1 with an ephemeral port.

    Use as `async with FakeApiServer() as api:` and point the client at `api.url`.
    """

    def __init__(
        self,
        *,
        resources: Iterable[FakeResource] = DEFAULT_RESOURCES,
        not_installed: Iterable[str] = (),
        history_size: int = DEFAULT_HISTORY_SIZE,
        bookmark_interval: float | None = None,
        bearer_token: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`not_installed`: plurals or kinds of custom resources whose CRD is absent until `install()`.
        `bookmark_interval`: send BOOKMARKs this often on watches that allow them (None: only on demand).
        `bearer_token`: when set, every request must carry `Authorization: Bearer <token>`."""
        self._resources = tuple(resources)
        self._by_path = {(r.group, r.version, r.plural): r for r in self._resources}
        self._stores: dict[FakeResource, dict[tuple[str, str], dict[str, Any]]] = {
            r: {} for r in self._resources
        }
        self._not_installed: set[FakeResource] = set()
        for name in not_installed:
            self._not_installed.add(self._resolve(name))
        self._history: deque[_HistoryEvent] = deque(maxlen=max(1, history_size))
        self._revision = 1
        # Every event with a revision greater than this is still in the history.
        self._compacted_revision = self._revision
        self._bookmark_interval = bookmark_interval
        self._bearer_token = bearer_token
        self._host = host
        self._watches: list[_OpenWatch] = []
        self._failures: dict[tuple[FakeResource, str], deque[int]] = {}
        self._list_snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        self.requests: list[RecordedRequest] = []
        self.tokens: dict[str, FakeToken] = {}

    # ------------------------------------------------------------------------------------------------
    # lifecycle

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(_Signal.END)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FakeApiServer is not started; use `async with FakeApiServer()` or start()")
        return f"http://{self._host}:{self._port}"

    @property
    def resource_version(self) -> int:
        """The current global revision."""
        return self._revision

    # ------------------------------------------------------------------------------------------------
    # test controls: objects

    def add(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object (as POST would); raises KeyError if it exists and ValueError if it is not
        a valid object (no name, or no namespace for a namespaced kind). Returns the stored copy."""
        resource = self._resource_of_manifest(obj)
        namespace = str(obj.get("metadata", {}).get("namespace", "")) if resource.namespaced else ""
        try:
            return copy.deepcopy(self._create(resource, namespace, obj))
        except _ApiError as err:
            raise ValueError(err.message) from None

    def update(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace an existing object, status included, whatever resourceVersion `obj` carries (a test
        control is never in conflict); raises KeyError if it does not exist."""
        resource = self._resource_of_manifest(obj)
        meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
        obj = {**obj, "metadata": meta}
        namespace = str(meta.get("namespace", "")) if resource.namespaced else ""
        key = (namespace, str(meta.get("name", "")))
        current = self._stores[resource].get(key)
        if current is None:
            raise KeyError(f"{resource.kind} {namespace}/{key[1]} does not exist")
        new = self._prepare_update(resource, current, obj, keep_status=False)
        return copy.deepcopy(self._commit(resource, key, current, new))

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace."""
        resource = self._resource_of_manifest(obj)
        meta = obj.get("metadata", {})
        namespace = str(meta.get("namespace", "")) if resource.namespaced else ""
        if (namespace, str(meta.get("name", ""))) in self._stores[resource]:
            return self.update(obj)
        return self.add(obj)

    def delete(self, kind_or_resource: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete an object; raises KeyError if it does not exist. Returns the deleted object."""
        resource = self._resolve(kind_or_resource)
        return copy.deepcopy(self._delete(resource, namespace if resource.namespaced else "", name))

    def get(self, kind_or_resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        resource = self._resolve(kind_or_resource)
        obj = self._stores[resource].get((namespace if resource.namespaced else "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind_or_resource: str) -> list[dict[str, Any]]:
        resource = self._resolve(kind_or_resource)
        store = self._stores[resource]
        return [copy.deepcopy(store[k]) for k in sorted(store)]

    # ------------------------------------------------------------------------------------------------
    # test controls: faults

    def compact(self) -> None:
        """Forget the event history: the next watch from any older revision gets 410 Gone, and
        outstanding `continue` tokens expire."""
        self._history.clear()
        self._compacted_revision = self._revision
        self._list_snapshots.clear()

    def send_bookmark(self) -> int:
        """Send a BOOKMARK at the current revision on every open watch that allows bookmarks.
        Returns that revision."""
        for watch in self._watches:
            if watch.bookmarks:
                watch.queue.put_nowait(_Signal.BOOKMARK)
        return self._revision

    def fail_next(self, kind_or_resource: str, status: int, *, verb: str = "list", count: int = 1) -> None:
        """Make the next `count` requests of `verb` (list, watch, get, create, update, patch, delete)
        on a resource answer `status` with a `Status` body."""
        if verb not in ("list", "watch", "get", "create", "update", "patch", "delete"):
            raise ValueError(f"unknown verb {verb!r}")
        queue = self._failures.setdefault((self._resolve(kind_or_resource), verb), deque())
        queue.extend([status] * count)

    def drop_watches(self) -> int:
        """Close every open watch connection abruptly (no terminating chunk). Returns how many."""
        for watch in self._watches:
            watch.queue.put_nowait(_Signal.DROP)
        return len(self._watches)

    def uninstall(self, kind_or_resource: str) -> None:
        """Remove a custom resource's CRD: its objects are gone and its URLs answer 404."""
        resource = self._resolve(kind_or_resource)
        if not resource.custom:
            raise ValueError(f"{resource.kind} is a built-in resource and cannot be uninstalled")
        self._not_installed.add(resource)
        self._stores[resource].clear()
        for watch in self._watches:
            if watch.resource == resource:
                watch.queue.put_nowait(_Signal.END)

    def install(self, kind_or_resource: str) -> None:
        self._not_installed.discard(self._resolve(kind_or_resource))

    # ------------------------------------------------------------------------------------------------
    # test controls: observation

    def open_watches(self, kind_or_resource: str | None = None) -> int:
        if kind_or_resource is None:
            return len(self._watches)
        resource = self._resolve(kind_or_resource)
        return sum(1 for w in self._watches if w.resource == resource)

    def requests_for(self, kind_or_resource: str, *, watch: bool | None = None) -> list[RecordedRequest]:
        """Recorded collection requests (list or watch) for one resource, oldest first."""
        resource = self._resolve(kind_or_resource)
        suffix = f"/{resource.plural}"
        prefix = "/api/" if not resource.group else f"/apis/{resource.group}/"
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and r.path.startswith(prefix)
            and r.path.endswith(suffix)
            and (watch is None or r.is_watch == watch)
        ]

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (bounded) until `predicate()` holds. It is re-checked on every request and every watch
        opening or closing, and every 10 ms for conditions on state outside the server."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {within} s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, min(remaining, _POLL_INTERVAL))
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool], within: float = 5.0, *, after: int = 0
    ) -> RecordedRequest:
        """The first recorded request at index >= `after` matching `predicate`, waiting if needed."""
        found: list[RecordedRequest] = []

        def check() -> bool:
            for request in self.requests[after:]:
                if predicate(request):
                    found.append(request)
                    return True
            return False

        await self.wait_until(check, within)
        return found[0]

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------------------------------------
    # store

    def _resolve(self, kind_or_resource: str) -> FakeResource:
        for resource in self._resources:
            if kind_or_resource in (resource.kind, resource.plural, resource.qualified_name):
                return resource
        raise KeyError(f"unknown resource {kind_or_resource!r}")

    def _resource_of_manifest(self, obj: Mapping[str, Any]) -> FakeResource:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        for resource in self._resources:
            if resource.kind == kind and resource.api_version == api_version:
                return resource
        raise KeyError(f"no resource serves apiVersion={api_version!r} kind={kind!r}")

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision

    def _record_event(
        self,
        resource: FakeResource,
        namespace: str,
        event_type: str,
        obj: dict[str, Any],
        previous: Mapping[str, Any] | None = None,
    ) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted_revision = self._history[0].revision
        frozen = copy.deepcopy(obj)
        frozen_previous = copy.deepcopy(dict(previous)) if previous is not None else None
        event = _HistoryEvent(self._revision, resource, namespace, event_type, frozen, frozen_previous)
        self._history.append(event)
        for watch in self._watches:
            if watch.resource == resource and watch.namespace in (None, namespace):
                selected = _selected_event(event, watch.selector)
                if selected is not None:
                    watch.queue.put_nowait(selected)

    def _create(self, resource: FakeResource, namespace: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(manifest))
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _ApiError(400, "metadata must be an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise _ApiError(
                422, f'{resource.kind} "" is invalid: metadata.name: Required value: name is required'
            )
        if resource.namespaced:
            if not namespace:
                raise _ApiError(400, "a namespaced object needs metadata.namespace")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        key = (namespace, name)
        store = self._stores[resource]
        if key in store:
            raise KeyError(f"{resource.kind} {namespace}/{name} already exists")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["generation"] = 1
        meta["resourceVersion"] = str(self._next_revision())
        store[key] = obj
        self._record_event(resource, namespace, "ADDED", obj)
        return obj

    def _prepare_update(
        self,
        resource: FakeResource,
        current: Mapping[str, Any],
        desired: Mapping[str, Any],
        *,
        keep_status: bool,
    ) -> dict[str, Any]:
        """The object that replacing `current` by `desired` stores (before the revision bump)."""
        new = copy.deepcopy(dict(desired))
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _ApiError(400, "metadata must be an object")
        old_meta = current["metadata"]
        requested_rv = meta.get("resourceVersion")
        if requested_rv not in (None, "", old_meta["resourceVersion"]):
            raise _ApiError(
                409,
                f'Operation cannot be fulfilled on {resource.qualified_name} "{old_meta["name"]}": '
                "the object has been modified; please apply your changes to the latest version and try again",
                "Conflict",
            )
        for immutable in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion"):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
            else:
                meta.pop(immutable, None)
        if keep_status and resource.has_status:
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        if _spec_of(new) != _spec_of(current):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        return new

    def _commit(
        self, resource: FakeResource, key: tuple[str, str], current: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        if new == current:
            return current  # a no-op write does not bump the revision, so watchers see nothing
        new["metadata"]["resourceVersion"] = str(self._next_revision())
        self._stores[resource][key] = new
        self._record_event(resource, key[0], "MODIFIED", new, previous=current)
        return new

    def _delete(self, resource: FakeResource, namespace: str, name: str) -> dict[str, Any]:
        store = self._stores[resource]
        obj = store.pop((namespace, name), None)
        if obj is None:
            raise KeyError(f"{resource.kind} {namespace}/{name} does not exist")
        obj["metadata"]["resourceVersion"] = str(self._next_revision())
        self._record_event(resource, namespace, "DELETED", obj)
        return obj

    # ------------------------------------------------------------------------------------------------
    # HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items()}
        self.requests.append(
            RecordedRequest(request.method, request.path, query, request.headers.get("Content-Type", ""))
        )
        self._wake()
        try:
            expected_auth = f"Bearer {self._bearer_token}"
            if self._bearer_token is not None and request.headers.get("Authorization", "") != expected_auth:
                raise _ApiError(401, "Unauthorized")
            if request.path == "/apis/authentication.k8s.io/v1/tokenreviews":
                return await self._token_review(request)
            target = self._parse_path(request.path)
            if target is None:
                return web.Response(status=404, text="404 page not found\n", content_type="text/plain")
            return await self._dispatch(request, target, query)
        except _ApiError as err:
            return web.json_response(_status(err.code, err.message, err.reason), status=err.code)

    def _parse_path(self, path: str) -> _Target | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] != "status":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        resource = self._by_path.get((group, version, rest[0]))
        if resource is None or resource in self._not_installed:
            return None
        if namespace is not None and not resource.namespaced:
            return None
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else ""
        if subresource not in ("", "status") or (subresource == "status" and not resource.has_status):
            return None
        return _Target(resource, namespace, name, subresource)

    async def _dispatch(
        self, request: web.Request, target: _Target, query: Mapping[str, str]
    ) -> web.StreamResponse:
        method, resource = request.method, target.resource
        is_watch = (
            method == "GET" and target.name is None and _parse_bool(query.get("watch", "false")) is True
        )
        if target.name is None:
            verb = {"GET": "watch" if is_watch else "list", "POST": "create"}.get(method)
        else:
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None:
            raise _ApiError(405, f"method {method} is not allowed on {request.path}")
        failures = self._failures.get((resource, verb))
        if failures:
            code = failures.popleft()
            raise _ApiError(code, f"injected failure {code} for {verb} {resource.qualified_name}")
        if verb == "watch":
            return await self._serve_watch(request, target, query)
        if verb == "list":
            return web.json_response(self._serve_list(target, query))
        namespace = target.namespace or ""
        if verb == "create":
            body = await _json_body(request)
            meta = body.get("metadata")
            if (
                isinstance(meta, dict)
                and resource.namespaced
                and meta.get("namespace") not in (None, namespace)
            ):
                raise _ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            if body.get("kind") not in (None, resource.kind) or body.get("apiVersion") not in (
                None,
                resource.api_version,
            ):
                raise _ApiError(400, f"expected {resource.api_version} {resource.kind} at {request.path}")
            try:
                created = self._create(resource, namespace, body)
            except KeyError:
                name = (meta or {}).get("name", "")
                raise _ApiError(
                    409, f'{resource.qualified_name} "{name}" already exists', "AlreadyExists"
                ) from None
            return web.json_response(created, status=201)
        assert target.name is not None
        key = (namespace, target.name)
        current = self._stores[resource].get(key)
        if current is None:
            raise _ApiError(404, f'{resource.qualified_name} "{target.name}" not found')
        if verb == "get":
            return web.json_response(current)
        if verb == "delete":
            return web.json_response(self._delete(resource, namespace, target.name))
        body = await _json_body(request)
        if verb == "patch":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type != MERGE_PATCH:
                raise _ApiError(
                    415,
                    f"the body of the request was in an unknown format ({content_type}); this server accepts "
                    f"{MERGE_PATCH}",
                )
            body = json_merge_patch(current, body)
        if target.subresource == "status":
            new = copy.deepcopy(current)
            if "status" in body:
                new["status"] = body["status"]
            else:
                new.pop("status", None)
            requested_rv = body.get("metadata", {}).get("resourceVersion")
            if requested_rv not in (None, "", current["metadata"]["resourceVersion"]):
                raise _ApiError(
                    409, f'Operation cannot be fulfilled on {resource.qualified_name} "{target.name}"'
                )
        else:
            meta = body.get("metadata", {})
            if isinstance(meta, dict) and meta.get("name") not in (None, target.name):
                raise _ApiError(400, "the name of the object does not match the name on the URL")
            new = self._prepare_update(resource, current, body, keep_status=True)
        return web.json_response(self._commit(resource, key, current, new))

    def _serve_list(self, target: _Target, query: Mapping[str, str]) -> dict[str, Any]:
        resource = target.resource
        selector = _parse_field_selector(resource, query.get("fieldSelector", ""))
        continue_token = query.get("continue", "")
        try:
            limit = int(query.get("limit", "0") or "0")
        except ValueError:
            raise _ApiError(400, f"limit={query['limit']!r} is not an integer") from None
        if continue_token:
            snapshot = self._list_snapshots.get(continue_token)
            if snapshot is None:
                raise _ApiError(
                    410,
                    "The provided continue parameter is too old to display a consistent list result. You can "
                    "start a new list without the continue parameter.",
                )
            revision, items = snapshot
            del self._list_snapshots[continue_token]
        else:
            store = self._stores[resource]
            revision = self._revision
            items = [
                _list_item(resource, store[k])
                for k in sorted(store)
                if (target.namespace is None or k[0] == target.namespace)
                and (selector is None or selector.matches(resource, store[k]))
            ]
        metadata: dict[str, Any] = {"resourceVersion": str(revision)}
        if limit > 0 and len(items) > limit:
            items, rest = items[:limit], items[limit:]
            token = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            while len(self._list_snapshots) >= _MAX_LIST_SNAPSHOTS:
                del self._list_snapshots[next(iter(self._list_snapshots))]
            self._list_snapshots[token] = (revision, rest)
            metadata["continue"] = token
            metadata["remainingItemCount"] = len(rest)
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": metadata,
            "items": items,
        }

    async def _serve_watch(
        self, request: web.Request, target: _Target, query: Mapping[str, str]
    ) -> web.StreamResponse:
        resource = target.resource
        selector = _parse_field_selector(resource, query.get("fieldSelector", ""))
        bookmarks = _parse_bool(query.get("allowWatchBookmarks", "false")) is True
        timeout: float | None = None
        if "timeoutSeconds" in query:
            try:
                timeout = float(query["timeoutSeconds"])
            except ValueError:
                raise _ApiError(400, f"timeoutSeconds={query['timeoutSeconds']!r} is not a number") from None
        requested = query.get("resourceVersion", "")
        initial: list[Mapping[str, Any]] = []
        expired = False
        # Compute the replay and register for live events without awaiting in between, so that no
        # mutation can fall into a gap between the two.
        if requested in ("", "0"):
            store = self._stores[resource]
            initial = [
                {"type": "ADDED", "object": store[k]}
                for k in sorted(store)
                if (target.namespace is None or k[0] == target.namespace)
                and (selector is None or selector.matches(resource, store[k]))
            ]
        else:
            try:
                since = int(requested)
            except ValueError:
                raise _ApiError(400, f"resourceVersion={requested!r} is not valid") from None
            if since < self._compacted_revision:
                expired = True
                initial = [
                    {
                        "type": "ERROR",
                        "object": _status(
                            410, f"too old resource version: {since} ({self._compacted_revision})"
                        ),
                    }
                ]
            else:
                replay = (
                    _selected_event(e, selector)
                    for e in self._history
                    if e.revision > since
                    and e.resource == resource
                    and (target.namespace is None or e.namespace == target.namespace)
                )
                initial = [event for event in replay if event is not None]
        watch = _OpenWatch(resource, target.namespace, bookmarks, selector)
        if not expired:
            self._watches.append(watch)
            self._wake()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for event in initial:
                await response.write(_encode(event))
            if expired:
                await response.write_eof()
                return response
            await self._follow(request, response, watch, timeout)
        except ConnectionError:
            pass  # the client went away; nothing to clean up beyond unregistering
        finally:
            if watch in self._watches:
                self._watches.remove(watch)
                self._wake()
        return response

    async def _follow(
        self,
        request: web.Request,
        response: web.StreamResponse,
        watch: _OpenWatch,
        stream_timeout: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + stream_timeout if stream_timeout is not None else None
        next_bookmark = (
            loop.time() + self._bookmark_interval if watch.bookmarks and self._bookmark_interval else None
        )
        for _ in itertools.count():
            now = loop.time()
            waits = [t - now for t in (deadline, next_bookmark) if t is not None]
            try:
                item = await asyncio.wait_for(watch.queue.get(), max(0.0, min(waits)) if waits else None)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    await response.write_eof()
                    return
                item = _Signal.BOOKMARK
                next_bookmark = loop.time() + (self._bookmark_interval or 0.0)
            if item == _Signal.END:
                await response.write_eof()
                return
            if item == _Signal.DROP:
                if watch in self._watches:
                    self._watches.remove(watch)
                    self._wake()
                transport = request.transport
                if transport is not None:
                    transport.abort()
                raise ConnectionResetError("watch dropped by test control")
            if item == _Signal.BOOKMARK:
                item = {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": watch.resource.kind,
                        "apiVersion": watch.resource.api_version,
                        "metadata": {"resourceVersion": str(self._revision)},
                    },
                }
            assert not isinstance(item, str)
            await response.write(_encode(item))

    async def _token_review(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            raise _ApiError(405, "tokenreviews only support create")
        body = await _json_body(request)
        spec = body.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("token"), str) or not spec["token"]:
            raise _ApiError(422, "TokenReview.authentication.k8s.io is invalid: spec.token: Required value")
        requested = spec.get("audiences") or [DEFAULT_AUDIENCE]
        if not isinstance(requested, list) or not all(isinstance(a, str) for a in requested):
            raise _ApiError(400, "spec.audiences must be a list of strings")
        entry = self.tokens.get(spec["token"])
        status: dict[str, Any]
        if entry is None:
            status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        else:
            matched = [a for a in requested if a in entry.audiences]
            if not matched:
                status = {
                    "user": {},
                    "error": f"[invalid bearer token, token audiences {list(entry.audiences)} is invalid for "
                    f"the target audiences {requested}]",
                }
            else:
                status = {"authenticated": True, "user": _token_user(entry), "audiences": matched}
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(answer, status=201)


def _token_user(entry: FakeToken) -> dict[str, Any]:
    user: dict[str, Any] = {
        "username": entry.username,
        "uid": entry.uid or str(uuid.uuid5(uuid.NAMESPACE_OID, entry.username)),
    }
    groups = ["system:authenticated"]
    parts = entry.username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{parts[2]}", "system:authenticated"]
    user["groups"] = groups
    extra: dict[str, list[str]] = {}
    if entry.pod_name:
        extra["authentication.kubernetes.io/pod-name"] = [entry.pod_name]
    if entry.pod_uid:
        extra["authentication.kubernetes.io/pod-uid"] = [entry.pod_uid]
    if entry.node_name:
        extra["authentication.kubernetes.io/node-name"] = [entry.node_name]
    if extra:
        extra["authentication.kubernetes.io/credential-id"] = [
            f"JTI={uuid.uuid5(uuid.NAMESPACE_OID, entry.username)}"
        ]
        user["extra"] = extra
    return user


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that counts for metadata.generation: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _list_item(resource: FakeResource, obj: Mapping[str, Any]) -> dict[str, Any]:
    item = copy.deepcopy(dict(obj))
    if not resource.custom:
        # Typed lists of built-in kinds omit these on items; clients must not rely on them.
        item.pop("kind", None)
        item.pop("apiVersion", None)
    return item


def _encode(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError as err:
        raise _ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    return body


# ----------------------------------------------------------------------------------------------------
# field selectors

_FieldValue = Callable[[Mapping[str, Any]], str]


def _at(*path: str) -> _FieldValue:
    """The string at `path` in the object ("" when absent, as Go's zero value reads)."""

    def read(obj: Mapping[str, Any]) -> str:
        value: Any = obj
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, bool):
            return "true" if value else "false"
        return "" if value is None else str(value)

    return read


def _bool_at(*path: str) -> _FieldValue:
    """A boolean field formatted as the server does (strconv.FormatBool): absent is "false"."""
    read = _at(*path)
    return lambda obj: read(obj) or "false"


def _pod_ip(obj: Mapping[str, Any]) -> str:
    """The server selects `status.podIP` by the first of `status.podIPs`; the fake also reads objects
    that only set `status.podIP` (the real server keeps the two in step)."""
    status = obj.get("status")
    ips = status.get("podIPs") if isinstance(status, Mapping) else None
    if isinstance(ips, list) and ips and isinstance(ips[0], Mapping):
        return _at("ip")(ips[0])
    return _at("status", "podIP")(obj)


@dataclass(frozen=True, slots=True)
class _SelectableFields:
    """What a kind's field label conversion accepts on the real server, and how the fake reads each
    field's value from a stored object."""

    metadata: tuple[str, ...]  # which of metadata.name / metadata.namespace it accepts
    fields: Mapping[str, _FieldValue]  # kind-specific fields
    aliases: Mapping[str, str] = field(default_factory=dict)  # old field names still accepted
    # The server's words for a refused field; kinds with their own conversion say it this way.
    refusal: str = "field label not supported: {field}"

    def accepts(self, field_name: str) -> bool:
        return field_name in self.metadata or field_name in self.fields


# Kinds not listed use the server's default conversion (`_DEFAULT_FIELDS`).
_SELECTABLE_FIELDS: Final[Mapping[tuple[str, str], _SelectableFields]] = {
    ("", "Pod"): _SelectableFields(
        ("metadata.name", "metadata.namespace"),
        {
            "spec.nodeName": _at("spec", "nodeName"),
            "spec.restartPolicy": _at("spec", "restartPolicy"),
            "spec.schedulerName": _at("spec", "schedulerName"),
            "spec.serviceAccountName": _at("spec", "serviceAccountName"),
            "spec.hostNetwork": _bool_at("spec", "hostNetwork"),
            "status.phase": _at("status", "phase"),
            "status.podIP": _pod_ip,
            # Accepted by the server's conversion but missing from a pod's selectable field set, so it
            # reads as "" there: the same here.
            "status.podIPs": lambda obj: "",
            "status.nominatedNodeName": _at("status", "nominatedNodeName"),
        },
        {"spec.host": "spec.nodeName"},
    ),
    # Namespaces and Nodes are cluster-scoped: their conversions refuse metadata.namespace.
    ("", "Namespace"): _SelectableFields(("metadata.name",), {"status.phase": _at("status", "phase")}),
    ("", "Node"): _SelectableFields(
        ("metadata.name",), {"spec.unschedulable": _bool_at("spec", "unschedulable")}
    ),
    ("", "Secret"): _SelectableFields(("metadata.name", "metadata.namespace"), {"type": _at("type")}),
    ("", "Service"): _SelectableFields(
        ("metadata.name", "metadata.namespace"),
        {"spec.clusterIP": _at("spec", "clusterIP"), "spec.type": _at("spec", "type")},
    ),
}
_DEFAULT_FIELDS: Final = _SelectableFields(
    ("metadata.name", "metadata.namespace"),
    {},
    refusal='"{field}" is not a known field selector: only "metadata.name", "metadata.namespace"',
)


@dataclass(frozen=True, slots=True)
class _FieldTerm:
    field: str
    value: str
    equal: bool  # False for `!=`


@dataclass(frozen=True, slots=True)
class _FieldSelector:
    """A parsed `fieldSelector`: every term must hold."""

    terms: tuple[_FieldTerm, ...]

    def matches(self, resource: FakeResource, obj: Mapping[str, Any]) -> bool:
        fields = _field_values(resource, obj)
        return all((fields.get(t.field, "") == t.value) == t.equal for t in self.terms)


def _field_values(resource: FakeResource, obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    values = {"metadata.name": str(meta.get("name", ""))}
    if resource.namespaced:
        values["metadata.namespace"] = str(meta.get("namespace", ""))
    for name, read in _selectable_fields(resource).fields.items():
        values[name] = read(obj)
    return values


def _selectable_fields(resource: FakeResource) -> _SelectableFields:
    return _SELECTABLE_FIELDS.get((resource.group, resource.kind), _DEFAULT_FIELDS)


def _parse_field_selector(resource: FakeResource, text: str) -> _FieldSelector | None:
    """Parse a `fieldSelector` the way the API server does; an unparsable selector or a field the kind
    cannot be selected by is a 400 with the server's message. None when there is nothing to select by."""
    terms: list[_FieldTerm] = []
    for part in sorted(split_selector_terms(text)):
        if not part:
            continue  # the server skips empty terms, e.g. after a trailing comma
        split = _split_term(part)
        if split is None:
            raise _ApiError(400, f"invalid selector: '{text}'; can't understand '{part}'")
        field_name, operator, raw_value = split
        terms.append(
            _FieldTerm(_convert_field_label(resource, field_name), _unescape(raw_value), operator != "!=")
        )
    return _FieldSelector(tuple(terms)) if terms else None


def _split_term(term: str) -> tuple[str, str, str] | None:
    """(field, operator, raw value) at the leftmost operator; `!=` and `==` win over `=` at one position."""
    for index in range(len(term)):
        for operator in ("!=", "==", "="):
            if term.startswith(operator, index):
                return term[:index], operator, term[index + len(operator) :]
    return None


def _unescape(value: str) -> str:
    """The value of a selector term with `\\\\`, `\\,` and `\\=` unescaped; any other escape, or an
    unescaped `,` or `=`, is a 400 (the server's messages)."""
    result: list[str] = []
    escaped = False
    for char in value:
        if escaped:
            if char not in "\\,=":
                raise _ApiError(400, f"invalid field selector: invalid escape sequence: \\{char}")
            result.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in ",=":
            raise _ApiError(400, f"invalid field selector: unescaped character in value: {char}")
        else:
            result.append(char)
    if escaped:
        raise _ApiError(400, "invalid field selector: invalid escape sequence: \\")
    return "".join(result)


def _convert_field_label(resource: FakeResource, field_name: str) -> str:
    """The field a selector term refers to, or a 400 for one the kind cannot be selected by."""
    selectable = _selectable_fields(resource)
    field_name = selectable.aliases.get(field_name, field_name)
    if not selectable.accepts(field_name):
        raise _ApiError(400, selectable.refusal.format(field=field_name))
    return field_name


def _selected_event(event: _HistoryEvent, selector: _FieldSelector | None) -> dict[str, Any] | None:
    """What a watch with `selector` receives for `event`, or None. An object that stops matching is a
    DELETED of its previous content at the event's resourceVersion, one that starts matching an ADDED."""
    if selector is None:
        return {"type": event.type, "object": event.obj}
    resource = event.resource
    if event.type == "DELETED":
        return {"type": "DELETED", "object": event.obj} if selector.matches(resource, event.obj) else None
    matches_now = selector.matches(resource, event.obj)
    matched_before = event.previous is not None and selector.matches(resource, event.previous)
    if matches_now:
        return {"type": "MODIFIED" if matched_before else "ADDED", "object": event.obj}
    if matched_before:
        assert event.previous is not None
        gone = copy.deepcopy(dict(event.previous))
        gone["metadata"]["resourceVersion"] = str(event.revision)
        return {"type": "DELETED", "object": gone}
    return None
