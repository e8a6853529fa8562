"""What every per-pod proxy of one ztunnel shares: state, certificates, telemetry, limits.

One `ProxyContext` per process (or per in-process test node). The per-pod `WorkloadProxy` objects only
hold references to it, so a pod's proxy costs its listeners, its connection pool and its tasks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from loom.hbone import ClientLimits, ContextCache, HboneStats, ServerLimits
from loom.identity import Identity, WorkloadCertificate
from ztunnel.connections import ConnectionRegistry
from ztunnel.proxy.local import StateChanges
from ztunnel.state import ProxyState
from ztunnel.telemetry import ProxyMetrics

# How long a connection waits for its own pod's Workload to arrive over xDS before it is refused: the
# pod is handed over by the node agent as soon as its sandbox exists, usually before the controller
# has seen it Ready (Istio's ztunnel waits in the same way, bounded).
DEFAULT_WORKLOAD_WAIT = 5.0
# Open connections may finish for this long after their pod's proxy is drained (ztunnel's default
# connection termination deadline).
DEFAULT_DRAIN_DEADLINE = 5.0
# Per-copy-direction read size for plain TCP relays.
DEFAULT_RELAY_CHUNK = 64 * 1024


class CertificateSource(Protocol):
    """What the data path needs of `ztunnel.identity.CertificateManager`."""

    async def fetch(self, identity: Identity) -> WorkloadCertificate: ...


@dataclass(frozen=True, slots=True)
class ProxySettings:
    workload_wait: float = DEFAULT_WORKLOAD_WAIT
    drain_deadline: float = DEFAULT_DRAIN_DEADLINE
    relay_chunk: int = DEFAULT_RELAY_CHUNK
    cluster_id: str = "Kubernetes"
    client_limits: ClientLimits = field(default_factory=ClientLimits)
    server_limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        if self.workload_wait < 0 or self.drain_deadline < 0:
            raise ValueError("workload_wait and drain_deadline must not be negative")
        if self.relay_chunk <= 0:
            raise ValueError("relay_chunk must be positive")


class ProxyContext:
    """Shared by every pod proxy of one node proxy. Create it on the event loop that serves them."""

    def __init__(
        self,
        state: ProxyState,
        certificates: CertificateSource,
        metrics: ProxyMetrics,
        registry: ConnectionRegistry,
        settings: ProxySettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self.certificates = certificates
        self.metrics = metrics
        self.registry = registry
        self.settings = settings or ProxySettings()
        self.rng = rng or random.Random()
        self.changes = StateChanges(state)
        self.tls_contexts = ContextCache()
        self.client_stats = HboneStats("client")
        self.server_stats = HboneStats("server")
        # Re-check open inbound connections whenever policies or workloads change: a connection that
        # the current policy no longer allows is closed (late rejection).
        self._unwatch = state.watch(
            lambda change: self._recheck() if change.policies or change.workloads else None
        )

    def _recheck(self) -> None:
        self.registry.recheck(self.state)

    def close(self) -> None:
        self._unwatch()
        self.changes.close()
