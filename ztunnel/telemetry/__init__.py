"""Telemetry of the node proxy: Istio's TCP metrics and one access log line per connection
(`metrics`), and ztunnel-style logging with per-scope levels changeable at runtime (`access_log`)."""

from ztunnel.telemetry.access_log import (
    Bare,
    LogControl,
    LogLevelError,
    configure_logging,
    log_early_deny,
)
from ztunnel.telemetry.metrics import (
    LABEL_NAMES,
    ConnectionFailure,
    ConnectionResult,
    ErrorClassifier,
    ProxyMetrics,
    ResponseFlag,
    SecurityPolicy,
    traffic_labels,
)

__all__ = [
    "LABEL_NAMES",
    "Bare",
    "ConnectionFailure",
    "ConnectionResult",
    "ErrorClassifier",
    "LogControl",
    "LogLevelError",
    "ProxyMetrics",
    "ResponseFlag",
    "SecurityPolicy",
    "configure_logging",
    "log_early_deny",
    "traffic_labels",
]
