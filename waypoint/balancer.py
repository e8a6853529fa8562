"""Which endpoint of a Service gets the next attempt: round-robin with passive outlier ejection.

Theory of operation
-------------------
The proxy supplies each Service port's endpoints with `update(service_key, endpoints)` whenever its
configuration changes, asks `pick(service, exclude)` before every attempt, and tells `report(endpoint,
success)` how the attempt went (a 5xx answer, a reset or a connect failure is a failure). Nothing here
does I/O: time comes from an injected clock and the only randomness (where each Service's rotation
starts) from an injected `random.Random`.

Balancing is round-robin over the endpoints sorted by address, skipping ejected endpoints and the
addresses in `exclude` (the ones this request already tried, so a retry goes elsewhere). Round-robin
was chosen over power-of-two-choices least-requests because least-requests is only as good as its
in-flight counts, and those need a matching "done" call on every exit path of the proxy
(cancellation, resets, timeouts, upgrades); one missed call leaks a count and silently starves an
endpoint forever. The waypoint reuses HBONE connections per endpoint, so an even spread of requests
is also an even spread of work for the uniform backends a Service usually has. Each Service's
rotation starts at a random position so that many waypoints do not all begin with the same pod.

Outlier ejection follows Envoy's consecutive-5xx detector: `consecutive_failures` failures in a row
(default 5; any success resets the count) eject the endpoint for `base_ejection_time` x the number of
times it has been ejected (30 s, 60 s, ...; at most `max_ejection_time`). After that time it is back
without a probe. Its ejection count decays by one for every `decay_interval` it then stays in,
so a pod that recovered is not punished for an old failure streak. Health is kept per endpoint
address (ip, port), which is what fails, whichever Service the request was for.

At most `max_ejection_percent` (default 50%) of the endpoints of any Service the endpoint belongs to
may be ejected at once, rounded down, so a one-pod Service never ejects its only pod: when most of a
Service fails the fault is unlikely to be in the pods, and ejecting them all would turn a partial
outage into a total one. For the same reason, if every endpoint not in `exclude` is ejected (possible
after the endpoint set shrinks), `pick` still returns one of them rather than nothing ("panic"
routing, as Envoy does below its healthy-panic threshold).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from waypoint.model import Endpoint, ServiceRef

ServiceKey = tuple[str, str, int]
"""(namespace, name, port): one Service port, the unit endpoints are supplied for."""

EndpointKey = tuple[str, int]  # (ip, port): what health is tracked for


def service_key(service: ServiceRef) -> ServiceKey:
    return (service.namespace, service.name, service.port)


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Envoy's outlier-detection knobs that loom implements (defaults as noted)."""

    consecutive_failures: int = 5  # Envoy consecutive_5xx default
    base_ejection_time: float = 30.0  # seconds; Envoy default
    max_ejection_time: float = 300.0  # seconds; Envoy default
    max_ejection_percent: int = 50  # of a Service's endpoints, rounded down
    decay_interval: float = 10.0  # seconds in service per step of ejection-count decay (Envoy interval)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if self.base_ejection_time <= 0 or self.max_ejection_time <= 0 or self.decay_interval <= 0:
            raise ValueError("ejection times and decay_interval must be positive")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be 0-100, got {self.max_ejection_percent}")


@dataclass(slots=True)
class _Health:
    consecutive_failures: int = 0
    ejections: int = 0  # drives the ejection time multiplier; decays while in service
    ejected_until: float | None = None
    in_service_since: float = 0.0  # when it was last un-ejected (for the decay)


@dataclass(slots=True)
class _Pool:
    endpoints: tuple[Endpoint, ...]
    cursor: int  # index of the next endpoint the rotation tries first


@dataclass(frozen=True, slots=True)
class EjectionEvent:
    """An ejection, for logs and metrics: which endpoint, until when (clock time), how many times."""

    ip: str
    port: int
    until: float
    ejections: int


@dataclass(slots=True)
class BalancerStats:
    ejections: int = 0  # endpoints ejected
    ejections_prevented: int = 0  # ejections refused by the max-ejection-percent cap
    panic_picks: int = 0  # picks that had to take an ejected endpoint
    recent: list[EjectionEvent] = field(default_factory=list)  # the last few ejections, newest last


_RECENT_EJECTIONS = 32


class EndpointBalancer:
    """A `waypoint.model.EndpointPicker`. Not thread-safe: use it from the proxy's event loop."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        policy: OutlierPolicy | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self.policy = policy or OutlierPolicy()
        self._pools: dict[ServiceKey, _Pool] = {}
        self._members: dict[EndpointKey, set[ServiceKey]] = {}  # endpoint -> Services it backs
        self._health: dict[EndpointKey, _Health] = {}
        self.stats = BalancerStats()

    # -- configuration ---------------------------------------------------------------------------

    def update(self, key: ServiceKey, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoints of one Service port; an empty set forgets the Service. Health of an
        endpoint that still backs some Service is kept, so a config push does not un-eject it."""
        unique: dict[EndpointKey, Endpoint] = {}
        for endpoint in endpoints:
            unique.setdefault((endpoint.ip, endpoint.port), endpoint)
        ordered = tuple(unique[k] for k in sorted(unique))
        old = self._pools.get(key)
        for endpoint_key in _keys(old.endpoints if old else ()):
            if endpoint_key in unique:
                continue
            members = self._members.get(endpoint_key)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._members[endpoint_key]
                    self._health.pop(endpoint_key, None)
        if not ordered:
            self._pools.pop(key, None)
            return
        cursor = old.cursor % len(ordered) if old else self._rng.randrange(len(ordered))
        self._pools[key] = _Pool(ordered, cursor)
        for endpoint_key in unique:
            self._members.setdefault(endpoint_key, set()).add(key)

    def endpoints(self, key: ServiceKey) -> tuple[Endpoint, ...]:
        pool = self._pools.get(key)
        return pool.endpoints if pool else ()

    # -- EndpointPicker --------------------------------------------------------------------------

    def pick(self, service: ServiceRef, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        pool = self._pools.get(service_key(service))
        if pool is None:
            return None
        now = self._clock()
        count = len(pool.endpoints)
        fallback: int | None = None
        for step in range(count):
            index = (pool.cursor + step) % count
            endpoint = pool.endpoints[index]
            if endpoint.ip in exclude:
                continue
            if self._ejected((endpoint.ip, endpoint.port), now):
                if fallback is None:
                    fallback = index
                continue
            pool.cursor = index + 1
            return endpoint
        if fallback is None:
            return None
        self.stats.panic_picks += 1
        pool.cursor = fallback + 1
        return pool.endpoints[fallback]

    def report(self, endpoint: Endpoint, success: bool) -> None:
        key = (endpoint.ip, endpoint.port)
        if key not in self._members:
            return  # no longer configured: nothing to protect, and no state to grow
        now = self._clock()
        health = self._health.setdefault(key, _Health(in_service_since=now))
        if self._ejected(key, now):
            return  # outcomes of attempts started before the ejection do not extend it
        if success:
            health.consecutive_failures = 0
            return
        health.consecutive_failures += 1
        if health.consecutive_failures < self.policy.consecutive_failures:
            return
        if not self._within_cap(key, now):
            # The streak stays counted, so the next failure tries again once the cap allows it.
            self.stats.ejections_prevented += 1
            return
        policy = self.policy
        decayed = int((now - health.in_service_since) // policy.decay_interval)
        health.ejections = max(0, health.ejections - decayed) + 1
        duration = min(
            policy.base_ejection_time * health.ejections,
            max(policy.base_ejection_time, policy.max_ejection_time),
        )
        health.ejected_until = now + duration
        health.consecutive_failures = 0
        self.stats.ejections += 1
        self.stats.recent.append(EjectionEvent(endpoint.ip, endpoint.port, now + duration, health.ejections))
        del self.stats.recent[:-_RECENT_EJECTIONS]

    # -- inspection ------------------------------------------------------------------------------

    def is_ejected(self, endpoint: Endpoint) -> bool:
        return self._ejected((endpoint.ip, endpoint.port), self._clock())

    # -- internals -------------------------------------------------------------------------------

    def _ejected(self, key: EndpointKey, now: float) -> bool:
        health = self._health.get(key)
        if health is None or health.ejected_until is None:
            return False
        if now < health.ejected_until:
            return True
        # Back in service: the decay of its ejection count runs from the end of the ejection.
        health.in_service_since = health.ejected_until
        health.ejected_until = None
        return False

    def _within_cap(self, key: EndpointKey, now: float) -> bool:
        """Whether ejecting `key` keeps every Service it backs within max_ejection_percent."""
        for service in self._members.get(key, ()):
            endpoints = self._pools[service].endpoints
            cap = math.floor(len(endpoints) * self.policy.max_ejection_percent / 100)
            ejected = sum(1 for k in _keys(endpoints) if self._ejected(k, now))
            if ejected + 1 > cap:
                return False
        return True


def _keys(endpoints: Sequence[Endpoint]) -> list[EndpointKey]:
    return [(e.ip, e.port) for e in endpoints]
