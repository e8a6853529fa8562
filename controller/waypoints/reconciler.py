"""The waypoint reconciler: make the objects that run each waypoint match its Gateway, report status.

Theory of operation
-------------------
`WaypointReconciler.reconcile(snapshot)` is level-triggered: it looks only at the snapshot it is given
(and at what the `Applier` reads back), never at what changed, so any number of missed or coalesced
events converge on the next call. The controller calls it after every configuration change and, when
it asks for it (`ReconcileReport.retry_after`), again after a delay.

For every Gateway of class istio-waypoint, `desired.plan` gives the objects (or a rejection). Then:

1. Objects. Unless they are exactly what was last applied for this Gateway, each object is read back
   and written only if it is missing or differs (every field we set, compared; fields others set,
   such as the Service's clusterIP, are left alone). An object that exists without our labels is
   never touched: the Gateway's status says which one is in the way (fail closed: no adoption of a
   ServiceAccount someone else's pods may run as). In the lab the waypoint's credential file is
   written before its Deployment (pods read it at start).
2. Observation. Ready replicas (the `Applier`: the lab counts ready pods in the snapshot, Kubernetes
   reads the Deployment's status.readyReplicas) and the Service's cluster IPs (from the snapshot,
   else from the Service as written). Kubernetes' answer is reused while nothing the waypoint depends
   on changed in the snapshot, except on a resync: a waypoint that is not programmed (unready, or
   blocked by a conflict) is looked at again, objects included, every `resync_seconds` (the
   Deployment itself is not watched).
3. Status. Written only when the Gateway's current status differs from what it should say (ignoring
   lastTransitionTime), and not again while that write is on its way back through the watch.

Deletion: objects a Gateway no longer needs (its account was renamed) are deleted once their
replacements are written; objects of a Gateway that is gone, no longer a waypoint, or rejected are
deleted, as are objects in the snapshot carrying our labels for a Gateway that is not an accepted
waypoint (left over from before a restart). Only objects with our labels are ever deleted; on
Kubernetes the ownerReferences let the garbage collector do the same.

Failures: one waypoint failing (an API error, a conflict) is logged and reported on its Gateway; the
others proceed. Failed writes are retried with a capped exponential backoff (`retry_after`). The
reconciler never runs before the controller has its first snapshot, so an empty cache at start-up can
never look like "every Gateway was deleted".
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from controller.translate.waypoints import LABEL_GATEWAY_NAME
from controller.waypoints.desired import (
    DesiredWaypoint,
    Observation,
    Plan,
    Rejected,
    WaypointSettings,
    desired_conditions,
    gateway_status,
    is_managed,
    plan,
    status_current,
)
from loom.resources.model import (
    ConfigSnapshot,
    Deployment,
    Gateway,
    Pod,
    ResourceKey,
    Service,
    ServiceAccount,
)

logger = logging.getLogger("controller.waypoints")

# An unready waypoint is looked at again this often (Kubernetes: the Deployment is not watched).
DEFAULT_RESYNC_SECONDS: Final = 2.0
# Failed writes are retried after this, doubling up to the cap.
ERROR_BACKOFF: Final = (0.5, 30.0)
# Deletion order: the pods first, then what they use.
_DELETE_ORDER: Final = ("Deployment", "Service", "ServiceAccount")


class ApplyError(Exception):
    """Reading or writing an object failed (the API or the store); retried."""


class ObjectConflict(Exception):
    """An object the waypoint needs exists and is not managed by loom."""


class Applier(Protocol):
    """Where a waypoint's objects live: the Kubernetes API (kubernetes.py) or the lab store (store.py).
    Every method raises ApplyError when the backend fails."""

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The object as stored now, or None."""
        ...

    async def put(self, manifest: Mapping[str, Any], current: Mapping[str, Any] | None) -> Mapping[str, Any]:
        """Create `manifest`, or replace `current` by it (keeping fields others own); the stored object."""
        ...

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete the object; False if it did not exist."""
        ...

    async def ready_replicas(self, namespace: str, name: str, snapshot: ConfigSnapshot) -> int:
        """Ready replicas of Deployment `name`."""
        ...

    async def write_status(self, gateway: ResourceKey, status: Mapping[str, Any]) -> None:
        """Replace the Gateway's status."""
        ...


class Credentials(Protocol):
    """The lab's per-waypoint credential files (store.py); Kubernetes needs none."""

    async def write(self, namespace: str, name: str) -> None: ...

    async def remove(self, namespace: str, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    waypoints: int  # waypoint Gateways seen
    written: int  # objects created or replaced
    deleted: int
    statuses: int  # status writes
    errors: tuple[str, ...] = ()
    retry_after: float | None = None  # reconcile again after this many seconds even without a change


@dataclass(slots=True)
class _Observed:
    inputs: tuple[Any, ...]
    ready: int


@dataclass(slots=True)
class _Tally:
    written: int = 0
    deleted: int = 0
    statuses: int = 0
    errors: list[str] = field(default_factory=list)
    recheck: bool = False  # some waypoint is not programmed: look again after the resync period


def contains(actual: Any, wanted: Any) -> bool:
    """Every field of `wanted` is in `actual` with the same value: mappings key by key, lists entry by
    entry (same length). What we set is there, whatever defaults the API server filled in around it
    (Kubernetes adds fields to every container, for instance)."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and contains(actual[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return bool(actual == wanted)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _service_ips(manifest: Mapping[str, Any] | None) -> tuple[str, ...]:
    spec = manifest.get("spec") if manifest is not None else None
    if not isinstance(spec, Mapping):
        return ()
    ips = spec.get("clusterIPs")
    if isinstance(ips, list) and all(isinstance(ip, str) for ip in ips) and ips and ips[0] != "None":
        return tuple(ips)
    ip = spec.get("clusterIP")
    return (ip,) if isinstance(ip, str) and ip and ip != "None" else ()


def _pods_signature(snapshot: ConfigSnapshot, namespace: str, name: str) -> tuple[tuple[str, str, bool], ...]:
    return tuple(
        (pod.name, pod.phase, pod.ready)
        for pod in snapshot.of_kind(Pod)
        if pod.namespace == namespace and pod.meta.labels.get(LABEL_GATEWAY_NAME) == name
    )


def _missing_from(snapshot: ConfigSnapshot, desired: DesiredWaypoint) -> bool:
    """The account or the Service (both watched in every mode) is not in the snapshot: someone
    deleted it, or our write is not back yet (then the check finds it stored and writes nothing)."""
    namespace = desired.gateway.namespace
    return (
        snapshot.get_obj(ServiceAccount, namespace, desired.account_name) is None
        or snapshot.get_obj(Service, namespace, desired.gateway.name) is None
    )


def _owned_keys(desired: DesiredWaypoint) -> frozenset[tuple[str, str, str]]:
    return frozenset(
        (str(m["kind"]), str(m["metadata"]["namespace"]), str(m["metadata"]["name"]))
        for m in desired.manifests
    )


class WaypointReconciler:
    """Runs the waypoints of a configuration (see the module docstring). One caller at a time."""

    def __init__(
        self,
        settings: WaypointSettings,
        applier: Applier,
        *,
        credentials: Credentials | None = None,
        now: Callable[[], str] = utc_now,
        resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    ) -> None:
        if (settings.lab is None) != (credentials is None):
            raise ValueError("lab settings and credential files go together (the lab needs both)")
        self.settings = settings
        self._applier = applier
        self._credentials = credentials
        self._now = now
        self._resync = resync_seconds
        # Per Gateway: what was last applied completely, the objects it owns, what was observed, and
        # the status last written (until the snapshot shows it).
        self._applied: dict[ResourceKey, DesiredWaypoint] = {}
        self._owned: dict[ResourceKey, frozenset[tuple[str, str, str]]] = {}
        self._observed: dict[ResourceKey, _Observed] = {}
        self._status_sent: dict[ResourceKey, Any] = {}
        self._healthy: set[ResourceKey] = set()  # programmed at the last look
        self._failures = 0

    async def reconcile(self, snapshot: ConfigSnapshot, *, resync: bool = False) -> ReconcileReport:
        tally = _Tally()
        plans: dict[ResourceKey, tuple[Gateway, Plan]] = {}
        for gateway in snapshot.of_kind(Gateway):
            if gateway.is_waypoint:
                plans[gateway.key] = (gateway, plan(gateway, self.settings))
        accepted = {key for key, (_, p) in plans.items() if isinstance(p, DesiredWaypoint)}
        for key, (gateway, planned) in plans.items():
            try:
                seen = await self._run(gateway, planned, snapshot, resync, tally)
                await self._report(gateway, planned, seen, tally)
            except Exception as e:  # one waypoint must never stop the others
                logger.exception("waypoint reconcile failed", extra={"fields": {"gateway": str(key)}})
                tally.errors.append(f"{key}: {type(e).__name__}: {e}")
        await self._collect(snapshot, accepted, tally)
        return self._finish(len(plans), tally)

    # ------------------------------------------------------------------ one waypoint

    async def _run(
        self, gateway: Gateway, planned: Plan, snapshot: ConfigSnapshot, resync: bool, tally: _Tally
    ) -> Observation | None:
        key = gateway.key
        if isinstance(planned, Rejected):
            await self._remove(key, self._owned.pop(key, frozenset()), tally)
            self._applied.pop(key, None)
            self._observed.pop(key, None)
            self._healthy.discard(key)
            return None
        written_service: Mapping[str, Any] | None = None
        if (
            self._applied.get(key) != planned
            or _missing_from(snapshot, planned)
            or (resync and key not in self._healthy)
        ):
            try:
                written_service = await self._apply(gateway, planned, tally)
            except ObjectConflict as conflict:
                # Looked at again on resync: on Kubernetes a conflicting Deployment is not watched,
                # so its removal would otherwise go unnoticed.
                tally.recheck = True
                return Observation(conflict=str(conflict))
            except ApplyError as e:
                tally.errors.append(f"{key}: {e}")
                logger.warning(
                    "could not deploy waypoint", extra={"fields": {"gateway": str(key), "error": e}}
                )
                return Observation(error=str(e))
        service = snapshot.get_obj(Service, gateway.namespace, gateway.name)
        addresses = service.cluster_ips if service is not None else _service_ips(written_service)
        inputs = (planned, _pods_signature(snapshot, gateway.namespace, gateway.name), addresses)
        cached = self._observed.get(key)
        if cached is not None and cached.inputs == inputs and not resync and written_service is None:
            ready = cached.ready
        else:
            try:
                ready = await self._applier.ready_replicas(gateway.namespace, gateway.name, snapshot)
            except ApplyError as e:
                tally.errors.append(f"{key}: {e}")
                return Observation(error=str(e), addresses=addresses)
            self._observed[key] = _Observed(inputs, ready)
        seen = Observation(ready_replicas=ready, addresses=addresses)
        if ready < 1 or not addresses:
            tally.recheck = True
            self._healthy.discard(key)
        else:
            self._healthy.add(key)
        return seen

    async def _apply(
        self, gateway: Gateway, desired: DesiredWaypoint, tally: _Tally
    ) -> Mapping[str, Any] | None:
        """Write what differs; the Service as stored. Raises ObjectConflict or ApplyError."""
        key = gateway.key
        owned = _owned_keys(desired)
        previous = self._owned.get(key, frozenset())
        self._owned[key] = previous | owned  # until the new objects are written, both are ours
        service: Mapping[str, Any] | None = None
        for manifest in desired.manifests:
            kind, meta = str(manifest["kind"]), manifest["metadata"]
            if kind == "Deployment" and self._credentials is not None:
                await self._credentials.write(gateway.namespace, gateway.name)
            current = await self._applier.get(kind, meta["namespace"], meta["name"])
            if current is not None and not is_managed(current, gateway.name):
                raise ObjectConflict(
                    f"{kind} {meta['namespace']}/{meta['name']} exists and is not managed by loom; the "
                    "waypoint is not deployed until it is removed or the Gateway is renamed"
                )
            stored = current
            if current is None or not contains(current, manifest):
                stored = await self._applier.put(manifest, current)
                tally.written += 1
                logger.info(
                    "waypoint object written",
                    extra={
                        "fields": {
                            "gateway": str(key),
                            "object": f"{kind} {meta['namespace']}/{meta['name']}",
                        }
                    },
                )
            if kind == "Service":
                service = stored
        # Objects it had before but no longer needs (its account was renamed), once their
        # replacements exist: the running pods keep theirs until the new Deployment replaces them.
        await self._remove(key, previous - owned, tally)
        self._owned[key] = owned
        self._applied[key] = desired
        return service

    async def _report(self, gateway: Gateway, planned: Plan, seen: Observation | None, tally: _Tally) -> None:
        key = gateway.key
        if status_current(gateway, planned, seen):
            self._status_sent.pop(key, None)  # the snapshot shows it: a later difference is news
            return
        wanted = (desired_conditions(gateway, planned, seen), seen.addresses if seen else ())
        if self._status_sent.get(key) == wanted:
            return  # written already, on its way back through the watch
        try:
            await self._applier.write_status(key, gateway_status(gateway, planned, seen, self._now()))
        except ApplyError as e:
            tally.errors.append(f"{key}: status: {e}")
            return
        self._status_sent[key] = wanted
        tally.statuses += 1

    # ------------------------------------------------------------------ deletion

    async def _remove(
        self, gateway: ResourceKey, objects: frozenset[tuple[str, str, str]], tally: _Tally
    ) -> None:
        order = {kind: i for i, kind in enumerate(_DELETE_ORDER)}
        for kind, namespace, name in sorted(objects, key=lambda o: (order.get(o[0], len(order)), o)):
            try:
                current = await self._applier.get(kind, namespace, name)
                if current is None or not is_managed(current, gateway.name):
                    continue
                if await self._applier.delete(kind, namespace, name):
                    tally.deleted += 1
                    logger.info(
                        "waypoint object deleted",
                        extra={"fields": {"gateway": str(gateway), "object": f"{kind} {namespace}/{name}"}},
                    )
            except ApplyError as e:
                tally.errors.append(f"{gateway}: deleting {kind} {namespace}/{name}: {e}")

    async def _collect(self, snapshot: ConfigSnapshot, accepted: set[ResourceKey], tally: _Tally) -> None:
        """Delete what belongs to no accepted waypoint (see the module docstring)."""
        stale: dict[ResourceKey, set[tuple[str, str, str]]] = {}
        for key in [k for k in self._owned if k not in accepted]:
            stale.setdefault(key, set()).update(self._owned.pop(key))
            self._applied.pop(key, None)
            self._observed.pop(key, None)
            self._status_sent.pop(key, None)
            self._healthy.discard(key)
        for cls in (ServiceAccount, Service, Deployment):
            for obj in snapshot.of_kind(cls):
                labels = obj.meta.labels
                gateway_name = labels.get(LABEL_GATEWAY_NAME)
                if gateway_name is None or not is_managed(
                    {"metadata": {"labels": dict(labels)}}, gateway_name
                ):
                    continue
                key = ResourceKey(Gateway.KIND, obj.namespace, gateway_name)
                if key in accepted:
                    continue
                objects = stale.setdefault(key, set())
                objects.add((cls.KIND, obj.namespace, obj.name))
                # On Kubernetes the Deployment is not in the snapshot: it is named after the Gateway.
                objects.add(("Deployment", obj.namespace, gateway_name))
        for key, objects in sorted(stale.items()):
            await self._remove(key, frozenset(objects), tally)
            if self._credentials is not None:
                try:
                    await self._credentials.remove(key.namespace, key.name)
                except ApplyError as e:
                    tally.errors.append(f"{key}: credential: {e}")

    def _finish(self, waypoints: int, tally: _Tally) -> ReconcileReport:
        retry: float | None = None
        if tally.errors:
            self._failures += 1
            retry = min(ERROR_BACKOFF[0] * 2 ** (self._failures - 1), ERROR_BACKOFF[1])
        else:
            self._failures = 0
        if tally.recheck:
            retry = min(retry, self._resync) if retry is not None else self._resync
        return ReconcileReport(
            waypoints=waypoints,
            written=tally.written,
            deleted=tally.deleted,
            statuses=tally.statuses,
            errors=tuple(tally.errors),
            retry_after=retry,
        )
