"""The node agent's Prometheus metrics (own registry, served on /metrics by `cni.agent.health`).

* ``loom_cni_agent_pods{state="enrolled"|"pending"}`` (gauge): captured pods, acknowledged by ztunnel
  or still waiting for it;
* ``loom_cni_agent_events_total{kind, outcome}``: CNI plugin events (kind add/del/check/status/gc,
  outcome enrolled/not-enrolled/done/error);
* ``loom_cni_agent_reconciles_total{result}``: reconcile passes: ``ok``, ``pending`` (some pod waits for
  ztunnel) or ``error`` (a rule could not be written; retried);
* ``loom_cni_agent_ztunnel_connected`` (gauge): ztunnel connections that completed their snapshot
  (0: none; 2 during a ztunnel rolling update);
* ``loom_cni_agent_redirection_errors_total``: failed writes of the redirection annotation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

POD_STATES: Final = ("enrolled", "pending")
RECONCILE_RESULTS: Final = ("ok", "pending", "error")


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pods = Gauge(
            "loom_cni_agent_pods", "Pods captured by this node agent", ["state"], registry=self.registry
        )
        self.events = Counter(
            "loom_cni_agent_events",
            "CNI plugin events handled, by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.reconciles = Counter(
            "loom_cni_agent_reconciles", "Reconcile passes, by result", ["result"], registry=self.registry
        )
        self.ztunnel_connected = Gauge(
            "loom_cni_agent_ztunnel_connected",
            "ztunnel connections that completed their snapshot",
            registry=self.registry,
        )
        self.redirection_errors = Counter(
            "loom_cni_agent_redirection_errors",
            "Failed writes of the ambient.istio.io/redirection pod annotation",
            registry=self.registry,
        )
        # Present from the start (at 0), so a dashboard sees the series before the first pod.
        for state in POD_STATES:
            self.pods.labels(state=state).set(0)
        for result in RECONCILE_RESULTS:
            self.reconciles.labels(result=result)

    def set_pods(self, enrolled: int, pending: int) -> None:
        self.pods.labels(state="enrolled").set(enrolled)
        self.pods.labels(state="pending").set(pending)

    def follow_ztunnel_connections(self, count: Callable[[], int]) -> None:
        """Read the gauge from `count` at every scrape (always current, nothing to keep in sync)."""
        self.ztunnel_connected.set_function(lambda: float(count()))

    def event(self, kind: str, outcome: str) -> None:
        self.events.labels(kind=kind, outcome=outcome).inc()

    def reconciled(self, result: str) -> None:
        self.reconciles.labels(result=result).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
