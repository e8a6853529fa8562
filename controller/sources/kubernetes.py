"""Configuration from the Kubernetes API: list+watch of every kind loom reads, and the few writes loom makes.

Theory of operation
-------------------
One informer task per watched resource runs the classic reflector loop:

    LIST (paginated)  ->  replace that resource's part of the cache, diffing old against new
    WATCH from the list's resourceVersion, allowWatchBookmarks, server-side timeoutSeconds
        ADDED / MODIFIED  -> parse and upsert      (no-op when the resourceVersion is already cached)
        DELETED           -> remove                 (no-op for an unknown object)
        BOOKMARK          -> only advance the resourceVersion
        stream ends       -> server-side timeout: WATCH again from the last resourceVersion seen
        stream breaks     -> WATCH again from the last resourceVersion seen, after a short backoff
        ERROR 410 / 410   -> the resourceVersion is too old: LIST again and diff (synthesises deletes)
    LIST/WATCH request fails -> capped exponential backoff (100 ms .. 10 s), then LIST again
    LIST answers 404  -> the CRD is not installed: a warning diagnostic, the kind is empty, and the
                         informer LISTs again every `missing_retry` seconds; other kinds are unaffected

A resource may carry a field selector (`ApiResource.field_selector`, sent as `fieldSelector` on its LIST
and WATCH): the API server then lists only the matching objects, and on the watch an object that stops
matching arrives as DELETED and one that starts matching as ADDED, so the informer loop above needs no
change. The node agent uses this to follow only the pods of its own node (`pods_on_node`), as Istio's
node agent does: without it every node would list and watch every pod of the cluster. A source watches
each kind at most once, because the snapshot keys objects by kind, namespace and name, and two selections
of one kind would overwrite and delete each other's objects there.

Handlers are idempotent because a relist and an old watch can overlap. The cache keeps the last good
state through any outage: an unreachable API server never empties the snapshot (emptying it would drop
every AuthorizationPolicy, i.e. fail open).

The parsed objects and per-object diagnostics live in `ObjectCache`, a synchronous structure with no
I/O (unit-testable on its own). A notifier task turns cache changes into `on_change` calls: nothing until
every kind has been listed once (or found missing), then one call per burst of changes, coalesced by a
short trailing debounce so that a relist of 10,000 pods produces one snapshot, not 10,000.

HTTP goes through kubernetes_asyncio's `ApiClient.call_api` with `_preload_content=False`: its
configuration loaders (kubeconfig, in-cluster with token rotation) and its auth and TLS handling are
used, but objects stay plain JSON dicts (API camelCase form, exactly what `parse_object` reads) instead
of typed models, which are slow at scale. Watch lines are read from the raw response, so a watch
`ERROR` event is seen as data rather than as an exception raised from inside a library iterator.

Writes (`patch_annotations`, `patch_status`, `create_or_update`, `delete_object`, `token_review`) are
the ones Istio makes too: the ambient redirection annotation on pods, status conditions on Gateways and
AuthorizationPolicies, the waypoint's ServiceAccount/Deployment/Service, the istio-ca-root-cert
ConfigMap in every namespace, and TokenReview for node authentication at the CA.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from controller.sources.base import ChangeCallback
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.loader import ObjectInvalid, UnsupportedKind, parse_object
from loom.resources.model import ConfigSnapshot, Origin, Resource, ResourceKey
from loom.resources.parse_common import dns_subdomain_problem

log = logging.getLogger(__name__)

ORIGIN: Final = Origin("kubernetes")
MERGE_PATCH: Final = "application/merge-patch+json"
# A watch line larger than this is refused (etcd's own object limit is 1.5 MiB; lists are paginated).
MAX_WATCH_LINE: Final = 8 * 1024 * 1024
# Bound on list pages for one LIST, so a server that keeps returning `continue` cannot loop us forever.
MAX_LIST_PAGES: Final = 100_000
# Conflicts tolerated by create_or_update before giving up (another writer keeps changing the object).
MAX_WRITE_CONFLICTS: Final = 5


# ---------------------------------------------------------------------------------------------------
# what is watched and written


def field_selector_problem(selector: str) -> str | None:
    """What is syntactically wrong with a field selector, or None. The API server decides which fields
    a kind can be selected by; this only catches terms that no server would understand (no operator, no
    field name), so such a mistake fails at construction instead of as a LIST retried forever."""
    for term in split_selector_terms(selector):
        if not term:
            continue  # the API server skips empty terms too (e.g. a trailing comma)
        if "=" not in term:
            return f"term {term!r} has no operator (=, == or !=)"
        if not term.split("=", 1)[0].removesuffix("!").strip():
            return f"term {term!r} names no field"
    return None


def split_selector_terms(selector: str) -> list[str]:
    """Split at the commas that separate terms (a value may contain an escaped `\\,`)."""
    terms, start, escaped = [], 0, False
    for index, char in enumerate(selector):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return terms


@dataclass(frozen=True, slots=True)
class ApiResource:
    """One REST resource of the Kubernetes API, optionally narrowed by a field selector.

    `field_selector` (e.g. `spec.nodeName=node-1`) is sent as `fieldSelector` on LIST and WATCH of the
    resource; "" selects every object. It takes part in equality and hashing, so `PODS` and a
    node-scoped pods resource are different informers; writes never use it.
    """

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    custom: bool = False  # defined by a CRD, which may not be installed
    field_selector: str = ""

    def __post_init__(self) -> None:
        problem = field_selector_problem(self.field_selector)
        if problem is not None:
            raise ValueError(
                f"{self.qualified_name}: invalid field selector {self.field_selector!r}: {problem}"
            )

    def with_field_selector(self, selector: str) -> ApiResource:
        """This resource narrowed to the objects `selector` matches (replacing any previous selector)."""
        return dataclasses.replace(self, field_selector=selector)

    @property
    def selection_query(self) -> list[tuple[str, str]]:
        """The query parameters of LIST and WATCH that narrow the collection to this resource's objects."""
        return [("fieldSelector", self.field_selector)] if self.field_selector else []

    @property
    def description(self) -> str:
        """For logs and diagnostics: the qualified name and, if any, the field selector."""
        if self.field_selector:
            return f"{self.qualified_name} ({self.field_selector})"
        return self.qualified_name

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_name(self) -> str:
        """`plural.group`, also the name of the CRD that defines a custom resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def collection_path(self, namespace: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace and self.namespaced:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def object_path(self, namespace: str, name: str, subresource: str = "") -> str:
        path = f"{self.collection_path(namespace)}/{name}"
        return f"{path}/{subresource}" if subresource else path


NAMESPACES: Final = ApiResource("", "v1", "namespaces", "Namespace", namespaced=False)
PODS: Final = ApiResource("", "v1", "pods", "Pod")
SERVICES: Final = ApiResource("", "v1", "services", "Service")
SERVICE_ACCOUNTS: Final = ApiResource("", "v1", "serviceaccounts", "ServiceAccount")
DEPLOYMENTS: Final = ApiResource("apps", "v1", "deployments", "Deployment")
CONFIG_MAPS: Final = ApiResource("", "v1", "configmaps", "ConfigMap")
AUTHORIZATION_POLICIES: Final = ApiResource(
    "security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", custom=True
)
PEER_AUTHENTICATIONS: Final = ApiResource(
    "security.istio.io", "v1", "peerauthentications", "PeerAuthentication", custom=True
)
GATEWAYS: Final = ApiResource("gateway.networking.k8s.io", "v1", "gateways", "Gateway", custom=True)
HTTP_ROUTES: Final = ApiResource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", custom=True)


def pods_on_node(node: str) -> ApiResource:
    """The pods scheduled on `node` (`fieldSelector=spec.nodeName=<node>`), as a node agent watches them.

    An empty `node` returns `PODS`, the cluster-wide watch: an agent that does not know its node name
    must see every pod. A node name that is not a DNS subdomain (what Kubernetes requires of Node names)
    is refused with ValueError rather than being pasted into the selector, where characters such as
    `,` or `=` would change what the selector means.
    """
    if not node:
        return PODS
    problem = dns_subdomain_problem(node)
    if problem is not None:
        raise ValueError(f"node name: {problem}")
    return PODS.with_field_selector(f"spec.nodeName={node}")


# What the controller watches. Deployments are not watched: the controller sees pods directly.
WATCHED_RESOURCES: Final[tuple[ApiResource, ...]] = (
    NAMESPACES,
    PODS,
    SERVICES,
    SERVICE_ACCOUNTS,
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
    GATEWAYS,
    HTTP_ROUTES,
)
# What loom may write: the waypoint reconciler creates Deployments, and the root certificate publisher
# (controller/rootcert.py) the istio-ca-root-cert ConfigMaps.
WRITABLE_RESOURCES: Final[tuple[ApiResource, ...]] = (*WATCHED_RESOURCES, DEPLOYMENTS, CONFIG_MAPS)
_BY_KIND: Final[Mapping[str, ApiResource]] = {r.kind: r for r in WRITABLE_RESOURCES}
_BY_API: Final[Mapping[tuple[str, str], ApiResource]] = {
    (r.api_version, r.kind): r for r in WRITABLE_RESOURCES
}


@dataclass(frozen=True, slots=True)
class KubernetesSourceSettings:
    """Timing of the informers. The defaults suit a production cluster; tests shrink them."""

    # Server-side watch timeout: the API server ends each watch after this long and the informer
    # re-watches from its last resourceVersion. Five minutes is what client-go uses at minimum; it also
    # bounds how long a silently dead connection can go unnoticed (see `watch_read_grace`).
    watch_timeout: float = 300.0
    # Extra time the client waits beyond `watch_timeout` for data before it declares the connection dead.
    watch_read_grace: float = 30.0
    # Timeout of each non-watch request (one list page, one write). Pages are small, so 30 s is ample.
    request_timeout: float = 30.0
    # How often a kind whose CRD is not installed is listed again. CRDs are installed rarely; 30 s keeps
    # the load negligible while a freshly installed Gateway API still shows up within a minute.
    missing_retry: float = 30.0
    # Backoff after a failed request: starts small so a blip costs little, caps so an outage does not
    # turn into a request storm against a recovering API server. Full jitter spreads controllers out.
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    # Trailing debounce of notifications: 20 ms merges an event burst into one snapshot while adding
    # no noticeable delay; `max_delay` guarantees progress under a continuous stream of events.
    debounce: float = 0.02
    max_delay: float = 1.0
    # LIST page size: 500 is client-go's default; it keeps single responses small for 10,000+ pods.
    page_size: int = 500

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r} must be > 0"
            for name in (
                "watch_timeout",
                "request_timeout",
                "missing_retry",
                "backoff_initial",
                "backoff_max",
                "max_delay",
                "page_size",
            )
            if not getattr(self, name) > 0
        ]
        if self.debounce < 0 or self.watch_read_grace < 0:
            problems.append("debounce and watch_read_grace must be >= 0")
        if problems:
            raise ValueError("invalid KubernetesSourceSettings: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# errors


class KubernetesError(Exception):
    """Base of everything this module raises to callers of its write methods."""


class KubernetesApiError(KubernetesError):
    """The API server answered with an error status."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str) -> None:
        status_text = f"{status} {reason}" if reason else str(status)
        super().__init__(
            f"{method} {path}: {status_text}: {message}" if message else f"{method} {path}: {status_text}"
        )
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason  # the Status object's reason (NotFound, Conflict, Expired, ...), or ""
        self.message = message

    @classmethod
    def from_body(cls, method: str, path: str, status: int, body: bytes) -> KubernetesApiError:
        """Build from a response body, which is a `Status` object when the server is a real API server
        but may be plain text (a 404 for an unknown API group) or anything from a proxy in between."""
        reason, message = "", body[:300].decode("utf-8", "replace").strip()
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict) and decoded.get("kind") == "Status":
            reason = str(decoded.get("reason", ""))
            message = str(decoded.get("message", ""))
        return cls(method, path, status, reason, message)


class KubernetesUnreachable(KubernetesError):
    """The request did not get an answer (connection refused or reset, timeout, broken stream)."""


class _Gone(Exception):
    """The resourceVersion (or list continuation) is too old: relist."""


class _StreamBroken(Exception):
    """An established watch stream failed mid-way: re-watch from the last resourceVersion."""


# ---------------------------------------------------------------------------------------------------
# the cache (no I/O)


@dataclass(slots=True)
class _Entry:
    resource_version: str
    key: ResourceKey


def _metadata(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = raw.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def normalise_api_object(resource: ApiResource, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The object as `parse_object` expects it: `kind`/`apiVersion` filled in (list items of built-in
    kinds omit them), and `metadata.managedFields` dropped (often half the bytes, never read by loom)."""
    obj = dict(raw)
    obj["kind"] = resource.kind
    obj["apiVersion"] = resource.api_version
    meta = obj.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        obj["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return obj


def parse_api_object(
    resource: ApiResource, raw: Mapping[str, Any]
) -> tuple[Resource | None, tuple[Diagnostic, ...]]:
    """Parse one API object; an invalid object yields error diagnostics instead of an object."""
    meta = _metadata(raw)
    key = ResourceKey(
        resource.kind,
        str(meta.get("namespace", "")) if resource.namespaced else "",
        str(meta.get("name", "")),
    )
    try:
        return parse_object(normalise_api_object(resource, raw), ORIGIN), ()
    except ObjectInvalid as invalid:
        # A rejected AuthorizationPolicy still counts, as a fail-closed stand-in (see the loader).
        return invalid.stand_in, tuple(
            Diagnostic(Severity.ERROR, e.message, ORIGIN, key, e.field) for e in invalid.errors
        )
    except UnsupportedKind as skipped:  # e.g. an API version the loader does not read
        return None, (Diagnostic(Severity.WARNING, skipped.message, ORIGIN, key),)
    except Exception as err:  # one object must never stop the watch, whatever is wrong with it
        log.exception("parsing %s failed unexpectedly", key)
        return None, (Diagnostic(Severity.ERROR, f"could not be read: {err}", ORIGIN, key),)


class ObjectCache:
    """The informers' shared state: per resource the resourceVersion of every object seen, the parsed
    objects by key, and the diagnostics of objects that could not be used.

    Every mutator returns whether the visible state (objects or diagnostics) changed, and is idempotent:
    applying the same event twice, deleting an unknown object, or relisting an unchanged resource
    changes nothing.
    """

    def __init__(self) -> None:
        self._entries: dict[ApiResource, dict[tuple[str, str], _Entry]] = {}
        self.objects: dict[ResourceKey, Resource] = {}
        self.object_diagnostics: dict[ResourceKey, tuple[Diagnostic, ...]] = {}
        self.parse_count = 0  # objects parsed so far; lets tests see that no-op events cost no parse

    def resource_version_of(self, resource: ApiResource, namespace: str, name: str) -> str | None:
        entry = self._entries.get(resource, {}).get((namespace, name))
        return entry.resource_version if entry is not None else None

    def count(self, resource: ApiResource) -> int:
        return len(self._entries.get(resource, {}))

    def upsert(self, resource: ApiResource, raw: Mapping[str, Any]) -> bool:
        namespace, name = self.identity(resource, raw)
        if not name:
            log.warning("ignoring a %s without metadata.name from the API server", resource.kind)
            return False
        resource_version = str(_metadata(raw).get("resourceVersion", ""))
        entries = self._entries.setdefault(resource, {})
        old = entries.get((namespace, name))
        if old is not None and resource_version and old.resource_version == resource_version:
            return False
        self.parse_count += 1
        obj, diagnostics = parse_api_object(resource, raw)
        key = obj.key if obj is not None else ResourceKey(resource.kind, namespace, name)
        changed = False
        if old is not None and old.key != key:
            changed |= self._forget(old.key)
        entries[(namespace, name)] = _Entry(resource_version, key)
        if obj is None:
            changed |= self.objects.pop(key, None) is not None
        elif self.objects.get(key) != obj:
            self.objects[key] = obj
            changed = True
        if diagnostics:
            changed |= self.object_diagnostics.get(key) != diagnostics
            self.object_diagnostics[key] = diagnostics
        else:
            changed |= self.object_diagnostics.pop(key, None) is not None
        return changed

    def remove(self, resource: ApiResource, namespace: str, name: str) -> bool:
        entry = self._entries.get(resource, {}).pop((namespace if resource.namespaced else "", name), None)
        return entry is not None and self._forget(entry.key)

    @staticmethod
    def identity(resource: ApiResource, raw: Mapping[str, Any]) -> tuple[str, str]:
        """(namespace, name) of an API object; namespace "" for cluster-scoped kinds, name "" if absent."""
        meta = _metadata(raw)
        name = meta.get("name")
        namespace = meta.get("namespace") if resource.namespaced else ""
        return (namespace if isinstance(namespace, str) else "", name if isinstance(name, str) else "")

    def retain(self, resource: ApiResource, keep: set[tuple[str, str]]) -> bool:
        """Remove every object of `resource` whose identity is not in `keep`."""
        changed = False
        for namespace, name in [k for k in self._entries.get(resource, {}) if k not in keep]:
            changed |= self.remove(resource, namespace, name)
        return changed

    def replace_all(self, resource: ApiResource, items: Iterable[Mapping[str, Any]]) -> bool:
        """Make `items` the complete content of `resource`: upsert each, delete what is not among them."""
        seen: set[tuple[str, str]] = set()
        changed = False
        for raw in items:
            seen.add(self.identity(resource, raw))
            changed |= self.upsert(resource, raw)
        return self.retain(resource, seen) or changed

    def clear(self, resource: ApiResource) -> bool:
        return self.replace_all(resource, ())

    def _forget(self, key: ResourceKey) -> bool:
        removed = self.objects.pop(key, None) is not None
        return (self.object_diagnostics.pop(key, None) is not None) or removed


# ---------------------------------------------------------------------------------------------------
# the source


ApiClientFactory = Callable[[], Awaitable[k8s_client.ApiClient]]


class _Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._maximum, self._next * 2)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self._initial


@dataclass(slots=True)
class _InformerState:
    resource: ApiResource
    resource_version: str = ""
    listed: bool = False
    status: Diagnostic | None = None  # why the kind is not (fully) available, e.g. CRD missing


@dataclass(slots=True)
class WatchStats:
    """Counters for /metrics and tests."""

    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    request_failures: int = 0  # failed list/watch requests (each followed by a backoff)
    notifications: int = 0
    events: dict[str, int] = field(default_factory=dict)


class KubernetesSource:
    """List+watch of the Kubernetes API as a `ConfigSource`, plus the writes loom makes.

    Construct with one of the class methods (`from_url`, `from_kubeconfig`, `in_cluster`,
    `from_environment`) or with an async factory returning a `kubernetes_asyncio.client.ApiClient`; the
    factory is called inside the running event loop on first use. Close with `aclose()` or use
    `async with`.
    """

    def __init__(
        self,
        api_client_factory: ApiClientFactory,
        settings: KubernetesSourceSettings | None = None,
        *,
        resources: Sequence[ApiResource] = WATCHED_RESOURCES,
    ) -> None:
        self._factory = api_client_factory
        self._settings = settings or KubernetesSourceSettings()
        self._resources = tuple(resources)
        by_kind: dict[str, ApiResource] = {}
        for resource in self._resources:
            other = by_kind.get(resource.kind)
            if other is not None:
                # The snapshot keys objects by (kind, namespace, name): two informers of one kind would
                # overwrite each other's objects, and one's DELETED would remove what the other still has.
                raise ValueError(
                    f"{resource.kind} is watched twice ({other.description} and {resource.description}); "
                    "a KubernetesSource watches each kind at most once"
                )
            by_kind[resource.kind] = resource
        self._client: k8s_client.ApiClient | None = None
        self._client_lock: asyncio.Lock | None = None
        self.cache = ObjectCache()
        self.stats = WatchStats()
        self._states = {r: _InformerState(r) for r in self._resources}
        self._generation = 0  # bumped on every visible change
        self._dirty: asyncio.Event | None = None

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        token: str | None = None,
        settings: KubernetesSourceSettings | None = None,
        *,
        ca_file: str | None = None,
        verify_tls: bool = True,
        resources: Sequence[ApiResource] = WATCHED_RESOURCES,
    ) -> KubernetesSource:
        """Talk to the API server at `url` (e.g. a `FakeApiServer`, or `kubectl proxy`)."""

        async def factory() -> k8s_client.ApiClient:
            configuration = k8s_client.Configuration(host=url.rstrip("/"))
            if token:
                configuration.api_key = {"BearerToken": token}
                configuration.api_key_prefix = {"BearerToken": "Bearer"}
            configuration.ssl_ca_cert = ca_file
            configuration.verify_ssl = verify_tls
            return k8s_client.ApiClient(configuration)

        return cls(factory, settings, resources=resources)

    @classmethod
    def from_kubeconfig(
        cls,
        path: str | None = None,
        context: str | None = None,
        settings: KubernetesSourceSettings | None = None,
        resources: Sequence[ApiResource] = WATCHED_RESOURCES,
    ) -> KubernetesSource:
        """Use a kubeconfig file (default: $KUBECONFIG or ~/.kube/config) and context."""

        async def factory() -> k8s_client.ApiClient:
            configuration = k8s_client.Configuration()
            await k8s_config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration
            )
            return k8s_client.ApiClient(configuration)

        return cls(factory, settings, resources=resources)

    @classmethod
    def in_cluster(
        cls,
        settings: KubernetesSourceSettings | None = None,
        resources: Sequence[ApiResource] = WATCHED_RESOURCES,
    ) -> KubernetesSource:
        """Use the pod's service account (the token file is re-read as it rotates)."""

        async def factory() -> k8s_client.ApiClient:
            configuration = k8s_client.Configuration()
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return k8s_client.ApiClient(configuration)

        return cls(factory, settings, resources=resources)

    @classmethod
    def from_environment(
        cls,
        env: Mapping[str, str] | None = None,
        settings: KubernetesSourceSettings | None = None,
        resources: Sequence[ApiResource] = WATCHED_RESOURCES,
    ) -> KubernetesSource:
        """In-cluster configuration inside a pod (KUBERNETES_SERVICE_HOST is set), else kubeconfig."""
        env = os.environ if env is None else env
        if env.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster(settings, resources)
        return cls.from_kubeconfig(env.get("KUBECONFIG") or None, settings=settings, resources=resources)

    async def __aenter__(self) -> KubernetesSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def _api(self) -> k8s_client.ApiClient:
        if self._client_lock is None:
            self._client_lock = asyncio.Lock()
        async with self._client_lock:
            if self._client is None:
                self._client = await self._factory()
            return self._client

    # -- ConfigSource ---------------------------------------------------------------------------------

    async def run(self, on_change: ChangeCallback) -> None:
        """List and watch every resource until cancelled; see the module docstring."""
        self._dirty = asyncio.Event()
        await self._api()
        async with asyncio.TaskGroup() as tasks:
            for resource in self._resources:
                tasks.create_task(
                    self._informer(self._states[resource]), name=f"k8s-informer-{resource.plural}"
                )
            tasks.create_task(self._notifier(on_change), name="k8s-notifier")

    def snapshot(self) -> tuple[ConfigSnapshot, tuple[Diagnostic, ...]]:
        """The current state (also before the first notification)."""
        diagnostics: list[Diagnostic] = [s.status for s in self._states.values() if s.status is not None]
        for key in sorted(self.cache.object_diagnostics):
            diagnostics.extend(self.cache.object_diagnostics[key])
        return ConfigSnapshot(self.cache.objects), tuple(diagnostics)

    @property
    def ready(self) -> bool:
        """Every resource has been listed once or found missing."""
        return all(s.listed or s.status is not None for s in self._states.values())

    def _changed(self) -> None:
        self._generation += 1
        if self._dirty is not None:
            self._dirty.set()

    async def _notifier(self, on_change: ChangeCallback) -> None:
        assert self._dirty is not None
        loop = asyncio.get_running_loop()
        sent_generation = -1
        while True:
            await self._dirty.wait()
            burst_start = loop.time()
            # Trailing debounce: wait until the stream of changes pauses, but never longer than max_delay.
            while True:
                self._dirty.clear()
                await asyncio.sleep(self._settings.debounce)
                if not self._dirty.is_set() or loop.time() - burst_start >= self._settings.max_delay:
                    break
            self._dirty.clear()
            if not self.ready or self._generation == sent_generation:
                continue
            sent_generation = self._generation
            snapshot, diagnostics = self.snapshot()
            self.stats.notifications += 1
            try:
                on_change(snapshot, diagnostics)
            except Exception:  # a consumer bug must not stop the watch; the next change retries
                log.exception("the configuration change callback failed")

    # -- informers --------------------------------------------------------------------------------------

    async def _informer(self, state: _InformerState) -> None:
        settings = self._settings
        resource = state.resource
        backoff = _Backoff(settings.backoff_initial, settings.backoff_max)
        need_list = True
        gone_in_a_row = 0
        while True:
            try:
                if need_list:
                    await self._list(state)
                    need_list = False
                    backoff.reset()
                started = asyncio.get_running_loop().time()
                await self._watch(state)
                gone_in_a_row = 0
                # A server-side timeout: re-watch at once, unless the server ends watches immediately,
                # which would otherwise become a hot loop.
                if asyncio.get_running_loop().time() - started < settings.backoff_initial:
                    await asyncio.sleep(backoff.next_delay())
                else:
                    backoff.reset()
            except _Gone:
                self.stats.relists_after_gone += 1
                log.info(
                    "%s: resourceVersion %s is too old; relisting",
                    resource.description,
                    state.resource_version,
                )
                need_list = True
                gone_in_a_row += 1
                if gone_in_a_row > 1:
                    await asyncio.sleep(backoff.next_delay())
            except _StreamBroken as err:
                log.info(
                    "%s: watch stream broke (%s); watching again from %s",
                    resource.description,
                    err,
                    state.resource_version,
                )
                await asyncio.sleep(backoff.next_delay())
            except KubernetesApiError as err:
                need_list = True
                if err.status == 404 and resource.custom:
                    self._mark_missing(state)
                    await asyncio.sleep(settings.missing_retry)
                else:
                    hint = (
                        " (does loom's ClusterRole grant list and watch on it?)" if err.status == 403 else ""
                    )
                    log.warning("%s: %s%s; retrying", resource.description, err, hint)
                    await asyncio.sleep(backoff.next_delay())
            except KubernetesUnreachable as err:
                self.stats.request_failures += 1
                need_list = True
                log.warning("%s: API server unreachable (%s); retrying", resource.description, err)
                await asyncio.sleep(backoff.next_delay())

    def _mark_missing(self, state: _InformerState) -> None:
        """The CRD of a custom resource is not installed. Deleting a CRD deletes its objects, so the
        kind is empty; that is the truth, not an outage (which keeps the last state instead)."""
        resource = state.resource
        message = (
            f"the CustomResourceDefinition {resource.qualified_name} is not installed; {resource.kind} "
            f"objects are ignored until it is (checking again every {self._settings.missing_retry:g} s)"
        )
        diagnostic = Diagnostic(Severity.WARNING, message, ORIGIN)
        changed = self.cache.clear(resource)
        if state.status != diagnostic:
            log.warning("%s", message)
            state.status = diagnostic
            changed = True
        state.listed = False
        state.resource_version = ""
        if changed:
            self._changed()

    async def _list(self, state: _InformerState) -> None:
        """LIST every page and make the result the resource's content. Each page is parsed as it
        arrives, so parsing 10,000 pods is spread over the page round trips instead of blocking the
        event loop in one go; the objects that were not listed are removed at the end (the diff)."""
        resource = state.resource
        path = resource.collection_path()
        seen: set[tuple[str, str]] = set()
        changed = False
        resource_version = ""
        continue_token = ""
        for _page in range(MAX_LIST_PAGES):
            query = [("limit", str(self._settings.page_size)), *resource.selection_query]
            if continue_token:
                query.append(("continue", continue_token))
            body = await self._request_json("GET", path, query=query)
            meta = body.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            resource_version = resource_version or str(meta.get("resourceVersion", ""))
            page = body.get("items") or []
            if not isinstance(page, list):
                raise KubernetesApiError("GET", path, 200, "", "the list's items is not an array")
            for item in page:
                if isinstance(item, dict):
                    seen.add(self.cache.identity(resource, item))
                    changed |= self.cache.upsert(resource, item)
            continue_token = str(meta.get("continue") or "")
            if not continue_token:
                break
        else:
            raise KubernetesApiError(
                "GET", path, 200, "", f"the list did not end after {MAX_LIST_PAGES} pages"
            )
        self.stats.lists += 1
        changed |= self.cache.retain(resource, seen)
        state.resource_version = resource_version
        was_ready = self.ready
        if state.status is not None:
            log.info("%s is available now", resource.description)
            state.status = None
            changed = True
        state.listed = True
        if changed or self.ready != was_ready:
            self._changed()

    async def _watch(self, state: _InformerState) -> None:
        """One watch request; returns when the server ends the stream cleanly."""
        resource = state.resource
        settings = self._settings
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(max(1, round(settings.watch_timeout)))),
            *resource.selection_query,
        ]
        if state.resource_version:
            query.append(("resourceVersion", state.resource_version))
        timeout = aiohttp.ClientTimeout(
            sock_connect=settings.request_timeout,
            sock_read=settings.watch_timeout + settings.watch_read_grace,
        )
        response = await self._send("GET", resource.collection_path(), query=query, client_timeout=timeout)
        self.stats.watches += 1
        try:
            if response.status == 410:
                raise _Gone()
            if response.status != 200:
                raise KubernetesApiError.from_body(
                    "GET", resource.collection_path(), response.status, await response.read()
                )
            while True:
                try:
                    line = await response.content.readuntil(b"\n", max_size=MAX_WATCH_LINE)
                except LineTooLong:
                    raise _StreamBroken(f"a watch event exceeds {MAX_WATCH_LINE} bytes") from None
                except (aiohttp.ClientError, OSError, TimeoutError) as err:
                    raise _StreamBroken(str(err) or type(err).__name__) from None
                if not line:
                    return
                if line.strip():
                    self._apply_event(state, line)
        finally:
            response.release()

    def _apply_event(self, state: _InformerState, line: bytes) -> None:
        resource = state.resource
        try:
            event = json.loads(line)
        except ValueError:
            raise _StreamBroken(f"undecodable watch event {line[:80]!r}") from None
        event_type = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(event_type, str) or not isinstance(obj, dict):
            raise _StreamBroken(f"malformed watch event {line[:80]!r}")
        self.stats.events[event_type] = self.stats.events.get(event_type, 0) + 1
        if event_type == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise KubernetesApiError(
                "WATCH",
                resource.collection_path(),
                int(code) if isinstance(code, int) else 500,
                str(obj.get("reason", "")),
                str(obj.get("message", "")),
            )
        resource_version = str(_metadata(obj).get("resourceVersion", ""))
        changed = False
        if event_type in ("ADDED", "MODIFIED"):
            changed = self.cache.upsert(resource, obj)
        elif event_type == "DELETED":
            changed = self.cache.remove(resource, *self.cache.identity(resource, obj))
        elif event_type != "BOOKMARK":
            log.warning("%s: ignoring watch event of unknown type %r", resource.qualified_name, event_type)
        if resource_version:
            state.resource_version = resource_version
        if changed:
            self._changed()

    # -- HTTP -------------------------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """One request; the caller reads and releases the response."""
        api = await self._api()
        try:
            response: aiohttp.ClientResponse = await api.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=client_timeout
                or aiohttp.ClientTimeout(total=self._settings.request_timeout),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise KubernetesUnreachable(f"{method} {path}: {err or type(err).__name__}") from err
        return response

    async def _request_json(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        response = await self._send(method, path, query=query, body=body, content_type=content_type)
        try:
            data = await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise KubernetesUnreachable(f"{method} {path}: {err or type(err).__name__}") from err
        finally:
            response.release()
        if response.status == 410:
            raise _Gone()
        if not 200 <= response.status < 300:
            raise KubernetesApiError.from_body(method, path, response.status, data)
        try:
            decoded = json.loads(data)
        except ValueError:
            raise KubernetesApiError(method, path, response.status, "", "the response is not JSON") from None
        if not isinstance(decoded, dict):
            raise KubernetesApiError(method, path, response.status, "", "the response is not a JSON object")
        return decoded

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """`_request_json` for callers outside the informers, where 410 is just an API error."""
        try:
            return await self._request_json(method, path, **kwargs)
        except _Gone:
            raise KubernetesApiError(method, path, 410, "Gone", "the resource version is too old") from None

    # -- writes -----------------------------------------------------------------------------------------

    async def get_object(self, key: ResourceKey) -> dict[str, Any] | None:
        """The object as the API server has it now, or None if it does not exist."""
        resource = _writable(key.kind)
        try:
            return await self._call("GET", resource.object_path(key.namespace, key.name))
        except KubernetesApiError as err:
            if err.status == 404:
                return None
            raise

    async def patch_annotations(
        self, key: ResourceKey, annotations: Mapping[str, str | None]
    ) -> dict[str, Any]:
        """Set (or, for None, remove) annotations with a JSON merge patch. Returns the updated object."""
        resource = _writable(key.kind)
        patch = {"metadata": {"annotations": dict(annotations)}}
        return await self._call(
            "PATCH", resource.object_path(key.namespace, key.name), body=patch, content_type=MERGE_PATCH
        )

    async def patch_status(self, key: ResourceKey, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource. Lists (e.g. `conditions`) are replaced whole by a merge
        patch, so pass the complete list. Returns the updated object."""
        resource = _writable(key.kind)
        return await self._call(
            "PATCH",
            resource.object_path(key.namespace, key.name, "status"),
            body={"status": dict(status)},
            content_type=MERGE_PATCH,
        )

    async def create_or_update(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Create the object, or replace it if it exists and differs from `manifest`. Returns the
        object as stored. Conflicting concurrent writers are retried a few times."""
        api_version, kind = manifest.get("apiVersion"), manifest.get("kind")
        resource = _BY_API.get((str(api_version), str(kind)))
        if resource is None:
            raise ValueError(f"loom does not write apiVersion={api_version!r} kind={kind!r}")
        meta = _metadata(manifest)
        name, namespace = meta.get("name"), str(meta.get("namespace", "")) if resource.namespaced else ""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} manifest has no metadata.name")
        if resource.namespaced and not namespace:
            raise ValueError(f"{kind} {name}: metadata.namespace is required")
        path = resource.object_path(namespace, name)
        for _attempt in range(MAX_WRITE_CONFLICTS):
            try:
                return await self._call("POST", resource.collection_path(namespace), body=dict(manifest))
            except KubernetesApiError as err:
                if err.status != 409:
                    raise
            current = await self.get_object(ResourceKey(resource.kind, namespace, name))
            if current is None:
                continue  # deleted between our create and our read: create again
            if _contains(current, manifest):
                return current
            desired = copy.deepcopy(dict(manifest))
            desired["metadata"] = {
                **desired.get("metadata", {}),
                "resourceVersion": _metadata(current).get("resourceVersion"),
            }
            try:
                return await self._call("PUT", path, body=desired)
            except KubernetesApiError as err:
                if err.status not in (404, 409):
                    raise
        raise KubernetesApiError(
            "PUT", path, 409, "Conflict", f"still conflicting after {MAX_WRITE_CONFLICTS} attempts"
        )

    async def delete_object(self, key: ResourceKey) -> bool:
        """Delete an object; False if it did not exist."""
        resource = _writable(key.kind)
        try:
            await self._call("DELETE", resource.object_path(key.namespace, key.name))
        except KubernetesApiError as err:
            if err.status == 404:
                return False
            raise
        return True

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """Ask the API server who a bearer token belongs to. Returns the TokenReview `status`:
        `authenticated` (always present; False unless the server said True), `user.username` (e.g.
        `system:serviceaccount:<ns>:<sa>`), `user.extra` (bound pod name/uid), `audiences`, `error`."""
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        answer = await self._call("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=review)
        status = answer.get("status")
        status = dict(status) if isinstance(status, dict) else {}
        # Fail closed: anything but an explicit true means not authenticated.
        status["authenticated"] = status.get("authenticated") is True
        return status


def _writable(kind: str) -> ApiResource:
    resource = _BY_KIND.get(kind)
    if resource is None:
        raise ValueError(f"loom does not write {kind} objects (known: {', '.join(sorted(_BY_KIND))})")
    return resource


def _contains(actual: Any, wanted: Any) -> bool:
    """Whether every field of `wanted` is present with the same value in `actual` (lists compare whole)."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and _contains(actual[k], v) for k, v in wanted.items()
        )
    return bool(actual == wanted)
