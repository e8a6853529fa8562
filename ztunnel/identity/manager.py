"""The identity manager: a certificate for every identity this node's workloads run as.

Theory of operation
-------------------
One entry per identity, each driven by one worker task that decides, in a loop, when the next CSR is
due and then makes it:

* no certificate yet: now (prefetch, or a connection waiting for it);
* a valid certificate: at its refresh time (half-life, below), in the background;
* after a failure: at the retry time, exponential backoff from `initial_backoff` doubling to at most
  `max_backoff` (150 s, Istio's cap), each wait drawn from [d/2, d] so a CA outage does not end in a
  thundering herd.

A certificate stays in use until it expires even while renewals fail; at `not_after` it is dropped,
and from then on `fetch` fails (connections needing that identity fail closed) until a renewal
succeeds. Refresh time: Istio's half-life rule, not_before + (not_after - not_before) / 2, except that
it is never earlier than half of the lifetime remaining when the certificate arrived. The controller
back-dates not_before by a minute for clock skew, which for a very short-lived certificate would put
the half-life in the past and renew in a tight loop.

Priorities share 8 CSR slots (Istio's concurrency): a connection waiting for a certificate
(`fetch`, real time) goes before prefetches (warm-up) which go before rotations (background). A
`fetch` that finds a CSR for its identity in flight waits for that one; it is promoted to real-time
priority while queued. During a failure backoff, `fetch` may trigger an early attempt, but at most
once per `realtime_retry_interval` per identity; otherwise it fails at once with the last error, so
heavy traffic to an identity whose CA requests fail cannot hammer the CA, and a recovered CA is used
within a second.

Which identities (`track(state)`): the identities of the workloads on this node (`Workload.node` ==
the node name). Those captured with HBONE are prefetched as soon as they appear; an identity no local
workload runs as any more is forgotten (its certificate dropped); and `fetch` refuses an identity no
local workload runs as without asking the CA (which would refuse it anyway).

Every issued chain is checked by the source (`caclient.verify_issued`): a certificate whose SAN is
not exactly the requested identity is a failure like any other, retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from cryptography import x509

from loom.api import workload_pb2
from loom.identity import Identity, WorkloadCertificate
from ztunnel.identity.caclient import CertificateError, CertificateSource
from ztunnel.identity.clock import Clock, SystemClock
from ztunnel.state import ProxyState, StateChange, workload_identity

logger = logging.getLogger("ztunnel.identity")

# Istio's SecretManagerConfig defaults: 8 concurrent CSRs, backoff capped at 150 s.
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_BACKOFF = dt.timedelta(seconds=150)
# First retry after a failure; short, so a blip costs little, doubling quickly to the cap.
DEFAULT_INITIAL_BACKOFF = dt.timedelta(milliseconds=100)
# During a backoff, a waiting connection may trigger an early attempt this often per identity.
DEFAULT_REALTIME_RETRY_INTERVAL = dt.timedelta(seconds=1)


class Priority(IntEnum):
    """CSR urgency; lower goes first."""

    REALTIME = 0  # a connection waits for this certificate
    WARMUP = 1  # prefetch for a workload that appeared on this node
    BACKGROUND = 2  # rotation of a certificate still valid


class CertState(StrEnum):
    AVAILABLE = "Available"
    INITIALIZING = "Initializing"
    UNAVAILABLE = "Unavailable"


class CertificateUnavailable(CertificateError):
    """No valid certificate for an identity (none obtained yet, expired, or not this node's)."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """One certificate of a chain, as the admin dump shows it."""

    pem: str
    serial_number: str  # hex
    valid_from: dt.datetime
    expiration_time: dt.datetime

    @classmethod
    def from_pem(cls, pem: str) -> CertificateInfo:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        return cls(pem, format(cert.serial_number, "x"), cert.not_valid_before_utc, cert.not_valid_after_utc)

    def to_json(self) -> dict[str, str]:
        return {
            "pem": self.pem,
            "serialNumber": self.serial_number,
            "validFrom": _rfc3339(self.valid_from),
            "expirationTime": _rfc3339(self.expiration_time),
        }


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """One identity's certificate state, for `/config_dump` and `loomctl ztunnel-config certificates`."""

    identity: Identity
    state: CertState
    error: str  # the last failure ("" when the last attempt succeeded)
    cert_chain: tuple[CertificateInfo, ...]  # leaf first
    root_certs: tuple[CertificateInfo, ...]
    refresh_at: dt.datetime | None

    def to_json(self) -> dict[str, Any]:
        """Istio's ztunnel certificate dump shape."""
        state = self.state.value
        if self.state is CertState.UNAVAILABLE and self.error:
            state = f"{state}: {self.error}"
        return {
            "identity": str(self.identity),
            "state": state,
            "cert_chain": [c.to_json() for c in self.cert_chain],
            "root_certs": [c.to_json() for c in self.root_certs],
        }


class _PrioritySlots:
    """A semaphore whose waiters are served by priority (evaluated when a slot frees), then FIFO."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("concurrency must be at least 1")
        self._free = limit
        self._waiters: list[tuple[Callable[[], Priority], int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: Callable[[], Priority]) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = (priority, next(self._order), future)
            self._waiters.append(waiter)
            try:
                await future
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif future.done() and not future.cancelled():
                    self._release()  # granted just as we were cancelled: pass the slot on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        live = [w for w in self._waiters if not w[2].done()]
        self._waiters = live
        if not live:
            self._free += 1
            return
        best = min(live, key=lambda w: (w[0](), w[1]))
        self._waiters.remove(best)
        best[2].set_result(None)


@dataclass(eq=False)
class _Entry:
    identity: Identity
    priority: Priority  # urgency of the first fetch (warm-up or real time)
    cert: WorkloadCertificate | None = None
    refresh_at: dt.datetime | None = None
    failures: int = 0
    last_error: str = ""
    retry_at: dt.datetime | None = None
    last_attempt_end: dt.datetime | None = None
    fetching: bool = False
    waiters: list[asyncio.Future[WorkloadCertificate]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


CertificateWatcher = Callable[[WorkloadCertificate], None]


class CertificateManager:
    """Certificates for this node's workload identities (see the module docstring)."""

    def __init__(
        self,
        source: CertificateSource,
        *,
        clock: Clock | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        initial_backoff: dt.timedelta = DEFAULT_INITIAL_BACKOFF,
        max_backoff: dt.timedelta = DEFAULT_MAX_BACKOFF,
        realtime_retry_interval: dt.timedelta = DEFAULT_REALTIME_RETRY_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        if not dt.timedelta(0) < initial_backoff <= max_backoff:
            raise ValueError("backoff needs 0 < initial_backoff <= max_backoff")
        self._source = source
        self._clock = clock or SystemClock()
        self._slots = _PrioritySlots(concurrency)
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._realtime_retry_interval = realtime_retry_interval
        self._rng = rng or random.Random()
        self._entries: dict[Identity, _Entry] = {}
        self._state: ProxyState | None = None
        self._unwatch: Callable[[], None] | None = None
        self._allowed: frozenset[Identity] = frozenset()
        self._watchers: list[CertificateWatcher] = []
        self._closed = False
        self.requests = 0  # CSRs sent (for tests and metrics)

    # ------------------------------------------------------------------ public API

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        """A valid certificate for `identity`, waiting for a CSR if there is none (real time).

        Raises CertificateUnavailable when none can be had now (the caller fails the connection)."""
        if self._closed:
            raise CertificateUnavailable("the identity manager is closed")
        if self._state is not None and identity not in self._allowed:
            raise CertificateUnavailable(f"no workload on node {self._state.node_name!r} runs as {identity}")
        entry = self._entry(identity, Priority.REALTIME)
        now = self._clock.now()
        cert = entry.cert
        if cert is not None and not cert.expired(now):
            return cert
        if (
            entry.failures
            and not entry.fetching
            and entry.last_attempt_end is not None
            and now - entry.last_attempt_end < self._realtime_retry_interval
        ):
            raise CertificateUnavailable(f"no certificate for {identity}: {entry.last_error}")
        future: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        entry.waiters.append(future)
        entry.wake.set()
        try:
            return await future
        finally:
            if future in entry.waiters:
                entry.waiters.remove(future)

    def prefetch(self, identity: Identity) -> None:
        """Start fetching `identity` now (warm-up), unless it is already tracked."""
        if not self._closed:
            self._entry(identity, Priority.WARMUP)

    def forget(self, identity: Identity) -> None:
        """Drop `identity`: its certificate, its worker, and anyone waiting for it."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        if entry.task is not None:
            entry.task.cancel()
        _fail(entry.waiters, CertificateUnavailable(f"{identity} is no longer used on this node"))
        logger.info("certificate forgotten", extra={"fields": {"identity": str(identity)}})

    def track(self, state: ProxyState) -> None:
        """Follow `state`: prefetch the identities of this node's HBONE workloads, forget identities
        no local workload runs as, refuse `fetch` for those. Call it on the event loop."""
        if self._unwatch is not None:
            self._unwatch()
        self._state = state
        self._unwatch = state.watch(self._on_state_change)
        self._reconcile()

    def watch(self, watcher: CertificateWatcher) -> Callable[[], None]:
        """Call `watcher` with every newly obtained certificate (e.g. to rebuild TLS contexts)."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def certificate(self, identity: Identity) -> WorkloadCertificate | None:
        """The current valid certificate, if any (no waiting, no CSR)."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or entry.cert.expired(self._clock.now()):
            return None
        return entry.cert

    @property
    def identities(self) -> tuple[Identity, ...]:
        return tuple(sorted(self._entries))

    def snapshot(self) -> list[CertificateStatus]:
        """Every tracked identity's state, sorted by identity (for the admin config dump)."""
        now = self._clock.now()
        result = []
        for identity in sorted(self._entries):
            entry = self._entries[identity]
            cert = entry.cert if entry.cert is not None and not entry.cert.expired(now) else None
            if cert is not None:
                state = CertState.AVAILABLE
            elif entry.failures:
                state = CertState.UNAVAILABLE
            else:
                state = CertState.INITIALIZING
            chain = tuple(CertificateInfo.from_pem(p) for p in cert.chain_pem) if cert else ()
            roots = tuple(CertificateInfo.from_pem(p) for p in _split_pem(cert.roots_pem)) if cert else ()
            result.append(
                CertificateStatus(
                    identity, state, entry.last_error, chain, roots, entry.refresh_at if cert else None
                )
            )
        return result

    async def close(self) -> None:
        self._closed = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            if entry.task is not None:
                entry.task.cancel()
        for entry in entries:
            _fail(entry.waiters, CertificateUnavailable("the identity manager is closed"))
            if entry.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await entry.task

    # ------------------------------------------------------------------ tracking the state

    def _on_state_change(self, change: StateChange) -> None:
        if change.local_workloads:
            self._reconcile()

    def _reconcile(self) -> None:
        state = self._state
        if state is None or self._closed:
            return
        allowed: set[Identity] = set()
        warm: set[Identity] = set()
        for workload in state.local_workloads():
            identity = workload_identity(workload)
            allowed.add(identity)
            if workload.tunnel_protocol == workload_pb2.HBONE:
                warm.add(identity)
        self._allowed = frozenset(allowed)
        for identity in sorted(warm):
            self.prefetch(identity)
        for identity in [i for i in self._entries if i not in allowed]:
            self.forget(identity)

    # ------------------------------------------------------------------ the per-identity worker

    def _entry(self, identity: Identity, priority: Priority) -> _Entry:
        entry = self._entries.get(identity)
        if entry is None:
            entry = _Entry(identity, priority)
            self._entries[identity] = entry
            entry.task = asyncio.get_running_loop().create_task(
                self._run(entry), name=f"certificate {identity}"
            )
        return entry

    def _retry_delay(self, failures: int) -> dt.timedelta:
        ceiling = min(self._initial_backoff * (1 << min(failures - 1, 30)), self._max_backoff)
        return ceiling * (0.5 + self._rng.random() / 2)

    def _refresh_time(self, cert: WorkloadCertificate, received: dt.datetime) -> dt.datetime:
        return max(cert.refresh_at, received + (cert.not_after - received) / 2)

    async def _run(self, entry: _Entry) -> None:
        try:
            while True:
                # Every request made before this point is in entry.waiters, which is what counts.
                entry.wake.clear()
                now = self._clock.now()
                if entry.cert is not None and entry.cert.expired(now):
                    logger.warning(
                        "certificate expired; connections needing it fail until a renewal succeeds",
                        extra={"fields": {"identity": str(entry.identity), "error": entry.last_error}},
                    )
                    entry.cert = None
                    entry.refresh_at = None
                if entry.waiters:
                    due, priority = now, Priority.REALTIME
                elif entry.cert is not None:
                    due = entry.retry_at if entry.failures and entry.retry_at else entry.refresh_at or now
                    priority = Priority.BACKGROUND
                else:
                    due = entry.retry_at if entry.failures and entry.retry_at else now
                    priority = entry.priority
                if due > now:
                    wake_at = min(due, entry.cert.not_after) if entry.cert is not None else due
                    await self._sleep(entry, wake_at)
                    continue
                await self._attempt(entry, priority)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave waiters hanging forever
            logger.exception("certificate worker failed", extra={"fields": {"identity": str(entry.identity)}})
            _fail(entry.waiters, CertificateUnavailable(f"no certificate for {entry.identity}: {e}"))
            if self._entries.get(entry.identity) is entry:
                del self._entries[entry.identity]

    async def _sleep(self, entry: _Entry, until: dt.datetime) -> None:
        """Until `until`, or until a connection asks for this certificate."""
        sleeper = asyncio.ensure_future(self._clock.sleep_until(until))
        waker = asyncio.ensure_future(entry.wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            for task in (sleeper, waker):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _attempt(self, entry: _Entry, priority: Priority) -> None:
        identity = entry.identity

        def current_priority() -> Priority:
            return Priority.REALTIME if entry.waiters else priority

        entry.fetching = True
        try:
            async with self._slots.slot(current_priority):
                self.requests += 1
                cert = await self._source.fetch_certificate(identity)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            now = self._clock.now()
            entry.failures += 1
            entry.last_error = str(e) or type(e).__name__
            entry.retry_at = now + self._retry_delay(entry.failures)
            entry.last_attempt_end = now
            keeping = entry.cert is not None and not entry.cert.expired(now)
            logger.warning(
                "certificate request failed",
                extra={
                    "fields": {
                        "identity": str(identity),
                        "error": entry.last_error,
                        "failures": entry.failures,
                        "retry_at": entry.retry_at.isoformat(),
                        "keeping_valid_certificate": keeping,
                    }
                },
            )
            if keeping and entry.cert is not None:
                _resolve(entry.waiters, entry.cert)
            else:
                _fail(
                    entry.waiters,
                    CertificateUnavailable(f"no certificate for {identity}: {entry.last_error}"),
                )
            return
        finally:
            entry.fetching = False
        now = self._clock.now()
        entry.cert = cert
        entry.failures = 0
        entry.last_error = ""
        entry.retry_at = None
        entry.last_attempt_end = now
        entry.refresh_at = self._refresh_time(cert, now)
        logger.info(
            "certificate obtained",
            extra={
                "fields": {
                    "identity": str(identity),
                    "serial": format(cert.serial, "x"),
                    "not_after": cert.not_after.isoformat(),
                    "refresh_at": entry.refresh_at.isoformat(),
                    "priority": priority.name.lower(),
                }
            },
        )
        _resolve(entry.waiters, cert)
        for watcher in list(self._watchers):
            try:
                watcher(cert)
            except Exception:
                logger.exception("certificate watcher failed")


def _resolve(waiters: list[asyncio.Future[WorkloadCertificate]], cert: WorkloadCertificate) -> None:
    for future in waiters:
        if not future.done():
            future.set_result(cert)
    waiters.clear()


def _fail(waiters: list[asyncio.Future[WorkloadCertificate]], error: Exception) -> None:
    for future in waiters:
        if not future.done():
            future.set_exception(error)
    waiters.clear()


def _split_pem(bundle: str) -> Iterable[str]:
    marker = "-----END CERTIFICATE-----"
    for part in bundle.split(marker):
        if "-----BEGIN CERTIFICATE-----" in part:
            yield part[part.index("-----BEGIN CERTIFICATE-----") :] + marker + "\n"
