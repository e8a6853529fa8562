"""Counters of the HBONE server and client, each protective limit with its own `reason` label.

Every counter is kept in a plain `collections.Counter` (what tests and the admin endpoint read) and,
when a prometheus registry is given, mirrored into prometheus counters. One stats object is meant to be
shared by all servers (or pools) of a process, since prometheus refuses duplicate metric names per
registry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge


class HboneStats:
    """Counters for one side (`role` = "server" or "client") of HBONE."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None) -> None:
        self.role = role
        # Connections refused before or during TLS (connection_limit, handshake_failed, ...).
        self.connections_refused: Counter[str] = Counter()
        # Established connections closed, by reason (rapid_reset, control_frame_flood, idle_timeout...).
        self.connections_closed: Counter[str] = Counter()
        # Streams answered without a tunnel: 400 reasons, refused_stream, early_data_overflow...
        self.requests_rejected: Counter[str] = Counter()
        # Responses by status (server: sent, client: received).
        self.responses: Counter[int] = Counter()
        # Client: TCP+TLS dials, and their failures by reason.
        self.dials = 0
        self.dial_failures: Counter[str] = Counter()
        self.connections_opened = 0
        self._prom: dict[str, PromCounter] = {}
        self._registry = registry
        if registry is not None:
            prefix = f"loom_hbone_{role}"
            self._prom = {
                "refused": PromCounter(
                    f"{prefix}_connections_refused",
                    "HBONE connections refused before or during the TLS handshake, by reason",
                    ["reason"],
                    registry=registry,
                ),
                "closed": PromCounter(
                    f"{prefix}_connections_closed",
                    "HBONE connections closed, by reason",
                    ["reason"],
                    registry=registry,
                ),
                "rejected": PromCounter(
                    f"{prefix}_requests_rejected",
                    "HBONE CONNECT streams not tunnelled, by reason",
                    ["reason"],
                    registry=registry,
                ),
                "responses": PromCounter(
                    f"{prefix}_responses",
                    "HBONE CONNECT responses, by status",
                    ["status"],
                    registry=registry,
                ),
                "opened": PromCounter(
                    f"{prefix}_connections_opened",
                    "HBONE connections established (TLS and identity checks passed)",
                    registry=registry,
                ),
                "dial_failures": PromCounter(
                    f"{prefix}_dial_failures",
                    "HBONE dials that failed, by reason",
                    ["reason"],
                    registry=registry,
                ),
            }

    def add_gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a gauge computed on scrape (no-op without a registry)."""
        if self._registry is not None:
            gauge = PromGauge(f"loom_hbone_{self.role}_{name}", documentation, registry=self._registry)
            gauge.set_function(read)

    def connection_refused(self, reason: str) -> None:
        self.connections_refused[reason] += 1
        if self._prom:
            self._prom["refused"].labels(reason=reason).inc()

    def connection_closed(self, reason: str) -> None:
        self.connections_closed[reason] += 1
        if self._prom:
            self._prom["closed"].labels(reason=reason).inc()

    def request_rejected(self, reason: str) -> None:
        self.requests_rejected[reason] += 1
        if self._prom:
            self._prom["rejected"].labels(reason=reason).inc()

    def response(self, status: int) -> None:
        self.responses[status] += 1
        if self._prom:
            self._prom["responses"].labels(status=str(status)).inc()

    def connection_opened(self) -> None:
        self.connections_opened += 1
        if self._prom:
            self._prom["opened"].inc()

    def dial(self) -> None:
        self.dials += 1

    def dial_failed(self, reason: str) -> None:
        self.dial_failures[reason] += 1
        if self._prom:
            self._prom["dial_failures"].labels(reason=reason).inc()
