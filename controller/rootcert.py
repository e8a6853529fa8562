"""The mesh root in every namespace: the ConfigMap `istio-ca-root-cert`, published as Istio's istiod does.

Theory of operation
-------------------
Proxies on Kubernetes read the root they trust from a ConfigMap volume: ztunnel (in istio-system) and
every waypoint (in its Gateway's namespace) mount `istio-ca-root-cert` at /var/run/secrets/istio and
read its key `root-cert.pem`. In Kubernetes mode the controller keeps that ConfigMap, in every namespace,
equal to its CA's trust bundle (`CertificateAuthority.trust_bundle_pem`, which holds several roots
during a root rotation).

Decisions are pure functions (no I/O):

* `target_namespaces`: every namespace but the ones Istio leaves out too (kube-public, kube-node-lease,
  local-path-storage: system namespaces where no proxy runs); kube-system is served, as by istiod,
  since ztunnel may be installed there.
* `desired_config_map`: the ConfigMap for one namespace.
* `classify`: what a stored ConfigMap is to us: MISSING, CURRENT, STALE (ours, another content) or
  FOREIGN (not ours).

Ownership. Ours carry `app.kubernetes.io/managed-by: loom-controller` (and Istio's `istio.io/config:
"true"`, so tools selecting Istio's ConfigMaps find ours). A ConfigMap of that name without our label
(created by hand, by Istio, by a chart) is never changed: a warning names the namespace and the two ways
out (delete it, or label it to hand it over), `loom_root_cert_configmaps{state="foreign"}` counts it,
and `RootCertPublisher.foreign` lists it. Between our read and our write someone could still create one
(milliseconds); the write would then replace it, which the API offers no way to rule out short of a
create-only call the source does not have.

I/O. `RootCertPublisher.publish(namespaces, resync=...)` is level-triggered: it looks at the namespaces
it is given and at what the API server answers, never at what changed. A namespace is looked at (GET,
then `create_or_update` if the ConfigMap is missing or stale) when it is new to the publisher, when the
root differs from what was last put there, after a failure, and on every resync; otherwise nothing is
sent, so the snapshots the controller gets for every pod change cost no request here. Up to
`MAX_IN_FLIGHT` namespaces are handled at once, so the first pass over a large cluster takes seconds.

ConfigMaps are not watched: the configuration source watches only the kinds the translation reads, and
listing every ConfigMap of a cluster to find one name would cost more than it saves. A deleted or
edited ConfigMap is therefore restored by the resync, which reads each namespace's ConfigMap once every
`resync_seconds` (default 60 s: one small GET per namespace per minute). A root that changes (a new
cacerts Secret, i.e. a controller restart) reaches every namespace at the first pass, which reads all.

Failures (an API error, the API server unreachable) are logged once per namespace and message, counted
in `loom_root_cert_configmaps{state="failed"}`, and retried with a capped exponential backoff; the
other namespaces proceed. A namespace being deleted refuses new content (403): that is not a failure,
it is skipped until the next resync, by when it is usually gone.

`RootCertPublisher.run(wake, namespaces)` is the controller's loop: a pass after every wake (the
controller sets it on every configuration snapshot; the first pass waits for the first snapshot, so an
empty cache at start-up is never taken for "no namespaces"), on the retry deadline after a failure,
and a full pass every `resync_seconds`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from controller.sources.kubernetes import KubernetesApiError, KubernetesError
from loom.resources.model import ConfigSnapshot, Namespace, ResourceKey

logger = logging.getLogger("controller.rootcert")

CONFIGMAP_NAME: Final = "istio-ca-root-cert"
CONFIGMAP_KIND: Final = "ConfigMap"
ROOT_CERT_KEY: Final = "root-cert.pem"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "loom-controller"
LABEL_ISTIO_CONFIG: Final = "istio.io/config"
# Istio's ignored namespaces minus kube-system (istiod publishes there: ztunnel may run in it).
IGNORED_NAMESPACES: Final = frozenset({"kube-public", "kube-node-lease", "local-path-storage"})
# One GET per namespace per period finds deleted or edited ConfigMaps; a minute keeps that load small
# (ConfigMaps are not watched, see the module docstring) while a restore is still prompt.
DEFAULT_RESYNC_SECONDS: Final = 60.0
# Failed namespaces are tried again after this, doubling up to the cap.
ERROR_BACKOFF: Final = (0.5, 30.0)
# A pass that raised (a bug: API failures are recorded, not raised) is tried again after this.
BUG_RETRY_SECONDS: Final = 5.0
# Namespaces handled concurrently: a first pass over 1,000 namespaces in seconds, and never a burst
# of hundreds of requests at the API server.
MAX_IN_FLIGHT: Final = 8
# The API server's refusal of new objects in a namespace that is being deleted (403 Forbidden).
_TERMINATING_MESSAGE: Final = "because it is being terminated"


# ---------------------------------------------------------------------------------------------------
# decisions (pure)


class Found(enum.Enum):
    """What the stored ConfigMap of a namespace is, compared with what it should be."""

    MISSING = "missing"
    CURRENT = "current"  # ours, holding the root
    STALE = "stale"  # ours, holding something else (an older root, an edit)
    FOREIGN = "foreign"  # not managed by loom: left alone


def target_namespaces(namespaces: Iterable[str]) -> tuple[str, ...]:
    """The namespaces that get the ConfigMap, sorted, each once."""
    return tuple(sorted({n for n in namespaces if n and n not in IGNORED_NAMESPACES}))


def namespace_names(snapshot: ConfigSnapshot) -> list[str]:
    """Every namespace of a configuration snapshot (Kubernetes: all of the cluster's)."""
    return [ns.name for ns in snapshot.of_kind(Namespace)]


def desired_config_map(namespace: str, root_pem: str) -> dict[str, Any]:
    """The ConfigMap `namespace` should have, in API form."""
    return {
        "apiVersion": "v1",
        "kind": CONFIGMAP_KIND,
        "metadata": {
            "name": CONFIGMAP_NAME,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_ISTIO_CONFIG: "true"},
        },
        "data": {ROOT_CERT_KEY: root_pem},
    }


def is_ours(config_map: Mapping[str, Any]) -> bool:
    meta = config_map.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return isinstance(labels, Mapping) and labels.get(LABEL_MANAGED_BY) == MANAGED_BY


def classify(current: Mapping[str, Any] | None, root_pem: str) -> Found:
    """Compare the stored ConfigMap (None: there is none) with the one holding `root_pem`. Keys others
    added to our ConfigMap do not make it stale: proxies read only `root-cert.pem`."""
    if current is None:
        return Found.MISSING
    if not is_ours(current):
        return Found.FOREIGN
    data = current.get("data")
    if isinstance(data, Mapping) and data.get(ROOT_CERT_KEY) == root_pem:
        return Found.CURRENT
    return Found.STALE


# ---------------------------------------------------------------------------------------------------
# I/O


class ConfigMapWriter(Protocol):
    """The writes of `KubernetesSource` the publisher uses (controller/sources/kubernetes.py). Both raise
    `KubernetesError` when the API server refuses or cannot be reached."""

    async def get_object(self, key: ResourceKey) -> dict[str, Any] | None: ...

    async def create_or_update(self, manifest: Mapping[str, Any]) -> dict[str, Any]: ...


class RootCertMetrics:
    """`loom_root_cert_configmaps{state}` and `loom_root_cert_writes_total`, in the controller's registry."""

    STATES: Final = ("published", "foreign", "failed")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry(auto_describe=True)
        self.configmaps = Gauge(
            "loom_root_cert_configmaps",
            "istio-ca-root-cert ConfigMaps by state: published (holds the mesh root), foreign (not "
            "managed by loom, left alone), failed (could not be read or written)",
            ["state"],
            registry=registry,
        )
        self.writes = Counter(
            "loom_root_cert_writes", "istio-ca-root-cert ConfigMaps created or replaced", registry=registry
        )
        for state in self.STATES:
            self.configmaps.labels(state=state).set(0)


@dataclass(frozen=True, slots=True)
class PublishReport:
    """The outcome of one pass."""

    namespaces: int  # namespaces that should have the ConfigMap
    checked: int  # namespaces whose ConfigMap was read in this pass
    written: tuple[str, ...]  # namespaces whose ConfigMap was created or replaced
    foreign: tuple[str, ...]  # namespaces holding a ConfigMap not managed by loom (all, not only this pass)
    failed: tuple[str, ...]  # namespaces whose ConfigMap could not be read or written in this pass
    retry_after: float | None  # pass again after this many seconds, even without a change


class _Outcome(enum.Enum):
    CURRENT = "current"
    WRITTEN = "written"
    FOREIGN = "foreign"
    TERMINATING = "terminating"


@dataclass(frozen=True, slots=True)
class _Result:
    namespace: str
    outcome: _Outcome | None  # None: failed
    found: Found | None = None  # what was stored before a write
    error: str = ""


class RootCertPublisher:
    """Keeps `istio-ca-root-cert` in every namespace (see the module docstring). One caller at a time."""

    def __init__(
        self,
        writer: ConfigMapWriter,
        root_pem: Callable[[], str],
        *,
        registry: CollectorRegistry | None = None,
        resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    ) -> None:
        if resync_seconds <= 0:
            raise ValueError(f"resync_seconds={resync_seconds!r} must be > 0")
        self._writer = writer
        self._root_pem = root_pem
        self.metrics = RootCertMetrics(registry)
        self.resync_seconds = resync_seconds
        # Per namespace: the root known to be in its ConfigMap (written or read back), a ConfigMap in
        # the way (not ours), the last error, and namespaces refusing content while being deleted.
        self._published: dict[str, str] = {}
        self._foreign: set[str] = set()
        self._failed: dict[str, str] = {}
        self._terminating: set[str] = set()
        self._failures = 0  # consecutive passes with failures, for the backoff

    @property
    def published(self) -> dict[str, str]:
        """Namespace -> the root its ConfigMap holds, as far as the publisher knows."""
        return dict(self._published)

    @property
    def foreign(self) -> tuple[str, ...]:
        """Namespaces whose istio-ca-root-cert is not managed by loom (left alone)."""
        return tuple(sorted(self._foreign))

    async def publish(self, namespaces: Iterable[str], *, resync: bool = False) -> PublishReport:
        """One pass over `namespaces` (all of the cluster's; the ignored ones are skipped here)."""
        root = self._root_pem()
        targets = target_namespaces(namespaces)
        self._forget_except(set(targets))
        if resync:
            self._terminating.clear()
        todo = [
            ns
            for ns in targets
            if resync
            or (ns not in self._foreign and ns not in self._terminating and self._published.get(ns) != root)
        ]
        results = await self._sync_all(todo, root)
        written: list[str] = []
        failed: list[str] = []
        for result in results:
            self._record(result, root)
            if result.outcome is _Outcome.WRITTEN:
                written.append(result.namespace)
            elif result.outcome is None:
                failed.append(result.namespace)
        if written:
            self.metrics.writes.inc(len(written))
            logger.info(
                "root certificate published",
                extra={"fields": {"configmaps": len(written), "namespaces": len(targets)}},
            )
        self._update_gauges()
        retry: float | None = None
        if failed:
            self._failures += 1
            retry = min(ERROR_BACKOFF[0] * 2 ** (self._failures - 1), ERROR_BACKOFF[1])
        else:
            self._failures = 0
        return PublishReport(
            namespaces=len(targets),
            checked=len(todo),
            written=tuple(written),
            foreign=self.foreign,
            failed=tuple(failed),
            retry_after=retry,
        )

    async def run(self, wake: asyncio.Event, namespaces: Callable[[], Iterable[str]]) -> None:
        """Publish until cancelled: after every wake, on the retry deadline, and a full pass (resync)
        every `resync_seconds`; nothing before the first wake."""
        loop = asyncio.get_running_loop()
        next_resync: float | None = None  # the first pass reads every namespace
        retry_at: float | None = None
        while True:
            deadlines = [t for t in (next_resync, retry_at) if t is not None]
            timeout = max(0.0, min(deadlines) - loop.time()) if deadlines else None
            try:
                async with asyncio.timeout(timeout):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            now = loop.time()
            resync = next_resync is None or now >= next_resync
            if resync:
                next_resync = now + self.resync_seconds
            try:
                report = await self.publish(namespaces(), resync=resync)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("publishing the root certificate failed; trying again")
                retry_at = loop.time() + BUG_RETRY_SECONDS
                continue
            retry_at = loop.time() + report.retry_after if report.retry_after is not None else None

    # ------------------------------------------------------------------ one namespace

    async def _sync_all(self, namespaces: list[str], root: str) -> list[_Result]:
        if not namespaces:
            return []
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def bounded(namespace: str) -> _Result:
            async with slots:
                return await self._sync(namespace, root)

        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(bounded(ns), name=f"root-cert-{ns}") for ns in namespaces]
        return [task.result() for task in running]

    async def _sync(self, namespace: str, root: str) -> _Result:
        key = ResourceKey(CONFIGMAP_KIND, namespace, CONFIGMAP_NAME)
        found: Found | None = None
        try:
            found = classify(await self._writer.get_object(key), root)
            if found is Found.FOREIGN:
                return _Result(namespace, _Outcome.FOREIGN, found)
            if found is Found.CURRENT:
                return _Result(namespace, _Outcome.CURRENT, found)
            await self._writer.create_or_update(desired_config_map(namespace, root))
        except KubernetesApiError as e:
            if e.status == 403 and _TERMINATING_MESSAGE in e.message:
                return _Result(namespace, _Outcome.TERMINATING, found)
            return _Result(namespace, None, found, str(e))
        except (KubernetesError, ValueError) as e:
            return _Result(namespace, None, found, str(e))
        return _Result(namespace, _Outcome.WRITTEN, found)

    def _record(self, result: _Result, root: str) -> None:
        """Bookkeeping and logs for one namespace's outcome (each condition logged once while it lasts)."""
        namespace, outcome = result.namespace, result.outcome
        fields: dict[str, Any] = {"namespace": namespace, "configmap": CONFIGMAP_NAME}
        if outcome is None:
            if self._failed.get(namespace) != result.error:
                logger.warning(
                    "could not publish the root certificate; retrying",
                    extra={"fields": {**fields, "error": result.error}},
                )
            self._failed[namespace] = result.error
            self._published.pop(namespace, None)
            return
        if self._failed.pop(namespace, None) is not None:
            logger.info("root certificate ConfigMap reachable again", extra={"fields": fields})
        if outcome is _Outcome.TERMINATING:
            self._terminating.add(namespace)
            self._published.pop(namespace, None)
            logger.info(
                "namespace is being deleted; root certificate not published", extra={"fields": fields}
            )
            return
        if outcome is _Outcome.FOREIGN:
            if namespace not in self._foreign:
                logger.warning(
                    f"a ConfigMap {CONFIGMAP_NAME} not managed by loom is in the way; it is left alone, so "
                    f"proxies in this namespace trust whatever it holds. Delete it to have loom publish the "
                    f"mesh root, or label it {LABEL_MANAGED_BY}={MANAGED_BY} to hand it over",
                    extra={"fields": fields},
                )
            self._foreign.add(namespace)
            self._published.pop(namespace, None)
            return
        if namespace in self._foreign:
            self._foreign.discard(namespace)
            logger.info("root certificate ConfigMap managed by loom now", extra={"fields": fields})
        if outcome is _Outcome.WRITTEN and self._published.get(namespace) == root:
            # It held the root already: someone deleted or changed it since.
            logger.warning(
                "root certificate ConfigMap was deleted or changed; restored",
                extra={"fields": {**fields, "found": result.found.value if result.found else ""}},
            )
        self._published[namespace] = root

    def _forget_except(self, namespaces: set[str]) -> None:
        """Drop what is known about namespaces that are gone (their ConfigMaps go with them)."""
        for known in (self._published, self._failed):
            for namespace in [n for n in known if n not in namespaces]:
                del known[namespace]
        self._foreign &= namespaces
        self._terminating &= namespaces

    def _update_gauges(self) -> None:
        gauge = self.metrics.configmaps
        gauge.labels(state="published").set(len(self._published))
        gauge.labels(state="foreign").set(len(self._foreign))
        gauge.labels(state="failed").set(len(self._failed))
