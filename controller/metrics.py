"""The controller's Prometheus metrics, in a registry of its own.

Each `ControllerMetrics` owns a `CollectorRegistry`, so several controllers can run in one process (the
in-process tests) without sharing counters, and `/metrics` shows only the controller's series. The
`_created` series are disabled to keep the exposition identical in shape to Istio's.

Label values are bounded: `type` is one of the served resource types, `reason` one of the fixed refusal
reasons in `controller.auth` / `controller.ca.service`, `severity` error|warning, `result` ok|error.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# From "one stream on loopback" (~1 ms) to "a very slow subscriber" (10 s).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Translation of a lab config is milliseconds; 10,000+ pods takes seconds.
_TRANSLATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def type_label(type_url: str) -> str:
    """type.googleapis.com/istio.workload.Address -> Address (short, bounded label value)."""
    return type_url.rsplit(".", 1)[-1]


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # xDS (Istio's equivalents: pilot_xds, pilot_xds_pushes, pilot_proxy_convergence_time,
        # pilot_total_xds_rejects).
        self.xds_connected = Gauge(
            "loom_xds_connected_proxies", "Node proxies with an open xDS stream", registry=r
        )
        self.xds_pushes = Counter(
            "loom_xds_pushes", "xDS responses written to node proxies", ["type"], registry=r
        )
        self.xds_push_latency = Histogram(
            "loom_xds_push_latency_seconds",
            "Time from a configuration publication to the response carrying it being written",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.xds_nacks = Counter(
            "loom_xds_nacks", "xDS responses rejected (NACKed) by node proxies", ["type"], registry=r
        )
        self.xds_resources = Gauge("loom_xds_resources", "Resources currently served", ["type"], registry=r)
        self.xds_streams_refused = Counter(
            "loom_xds_streams_refused", "xDS streams refused before anything was sent", ["reason"], registry=r
        )
        # CA (Istio's citadel_server_* equivalents).
        self.certificates_issued = Counter(
            "loom_ca_certificates_issued", "Workload certificates issued", registry=r
        )
        self.certificates_refused = Counter(
            "loom_ca_certificates_refused",
            "Certificate requests refused (all answered with the same opaque error)",
            ["reason"],
            registry=r,
        )
        # Configuration and translation.
        self.translations = Counter(
            "loom_controller_translations", "Configuration snapshots translated", ["result"], registry=r
        )
        self.translation_seconds = Histogram(
            "loom_controller_translation_seconds",
            "Time to translate one configuration snapshot",
            buckets=_TRANSLATION_BUCKETS,
            registry=r,
        )
        self.config_objects = Gauge(
            "loom_controller_config_objects", "Objects in the current configuration", registry=r
        )
        self.config_diagnostics = Gauge(
            "loom_controller_config_diagnostics",
            "Problems found in the current configuration",
            ["severity"],
            registry=r,
        )
        self.ready = Gauge("loom_controller_ready", "1 once the first configuration is served", registry=r)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
