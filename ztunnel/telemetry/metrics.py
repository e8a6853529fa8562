"""Istio's TCP metrics and exactly one access log line per proxied connection.

Theory of operation
-------------------
`ProxyMetrics` owns the series on a registry passed in, so several proxies can run in one process (as
the in-process tests do); a registry takes one ProxyMetrics, since each name registers once. The series
carry Istio ztunnel's names and labels (reference §7.1):

* ``istio_tcp_connections_opened_total``, ``istio_tcp_connections_closed_total``,
  ``istio_tcp_sent_bytes_total``, ``istio_tcp_received_bytes_total`` (stable),
  ``istio_tcp_connections_failed_total`` (unstable in ztunnel): all with `LABEL_NAMES`;
* ``istio_build{component="ztunnel",tag}`` = 1.

No ``*_created`` series are exported, to match Istio's exposition exactly.

For every connection the proxy creates a `ConnectionResult` (``metrics.connection(...)``) and uses it
as a context manager (``with`` or ``async with``) around the connection's whole life:

* entering records ``opened``;
* bytes are counted live with `add_sent` / `add_received`, or once at the end with `record_bytes`
  (totals; only the part not yet counted is added). "Sent" is what the connection's initiator sent
  towards the destination, "received" what came back to it, on both the outbound and the inbound side
  (ztunnel's convention: an outbound curl shows a small bytes_sent and a larger bytes_recv). Bytes are
  counted under the labels the connection opened with (``response_flags="-"``), as ztunnel's live
  counters are;
* leaving records ``closed`` with the final ``response_flags``, ``failed`` when the connection ended in
  an error, and writes ONE access log line, whatever the exit: normal, exception, or cancellation.

The outcome is the first of: an explicit `fail(error, flag)`; the reason a closer gave (`closing`, e.g.
a late policy rejection, which cancels the connection's task); the exception the block ended with,
classified into a response flag by an `ErrorClassifier`. A cancelled connection with no recorded
reason ends with error "connection cancelled". The result never swallows the exception.

Label values are computed once per connection, and label sets are cached by (direction, source uid,
destination uid, service, identities, mTLS): a cache entry is used only if it was computed from the very
same workload and service objects (a `ProxyState` update replaces the protos, which invalidates it).
The cache is bounded (FIFO eviction), so workload churn cannot grow it without limit.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import h2.exceptions
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge

from loom import __version__
from loom.api import workload_pb2
from loom.hbone.errors import (
    AlpnMismatch,
    HboneConnectTimeout,
    HboneProtocolViolation,
    HboneRejected,
    IdentityMismatch,
    PeerCertificateError,
    TrustDomainMismatch,
)
from loom.hbone.headers import format_address
from loom.identity import Identity
from ztunnel.connections import CloseReason, Direction, IPAddress
from ztunnel.identity.caclient import CertificateError
from ztunnel.telemetry.access_log import Bare, access_logger, duration_text, log_early_deny

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

UNKNOWN = "unknown"
# Istio's CommonTrafficLabels, in Istio's order.
LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
_FLAG_INDEX = LABEL_NAMES.index("response_flags")
DEFAULT_LABEL_CACHE_SIZE = 4096


class ResponseFlag(StrEnum):
    """The ``response_flags`` label: why a connection failed ("-" when it did not)."""

    NONE = "-"
    DENY = "DENY"  # refused by authorization policy (also a late rejection)
    CONNECT = "CONNECT"  # the upstream could not be reached, or refused the tunnel
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    IDENTITY_ERROR = "IDENTITY_ERROR"  # no certificate for the source, or the peer's identity was wrong
    NETWORK_POLICY = "NETWORK_POLICY"  # HBONE port unreachable: probably a NetworkPolicy


class SecurityPolicy(StrEnum):
    """The ``connection_security_policy`` label."""

    MUTUAL_TLS = "mutual_tls"
    UNKNOWN = "unknown"


class ConnectionFailure(Exception):
    """An outcome with a known response flag; raise it (or pass it to `fail`) to end a connection."""

    def __init__(self, flag: ResponseFlag, message: str) -> None:
        super().__init__(message)
        self.response_flag = flag


# What a closer's reason means for the connection's record.
CLOSE_OUTCOMES: dict[CloseReason, tuple[ResponseFlag, str]] = {
    CloseReason.LATE_REJECTION: (ResponseFlag.DENY, "late rejection: connection closed due to policy change"),
    CloseReason.DRAIN_TIMEOUT: (ResponseFlag.NONE, "connection closed at the drain deadline"),
    CloseReason.WORKLOAD_REMOVED: (ResponseFlag.NONE, "connection closed: the workload was removed"),
}

FlagRule = ResponseFlag | Callable[[BaseException], ResponseFlag]


def _rejected_flag(error: BaseException) -> ResponseFlag:
    return (
        ResponseFlag.DENY
        if isinstance(error, HboneRejected) and error.policy_denied
        else ResponseFlag.CONNECT
    )


# Most specific first: HboneConnectTimeout is also a TimeoutError (OSError), ssl.SSLError an OSError.
DEFAULT_FLAG_RULES: tuple[tuple[type[BaseException], FlagRule], ...] = (
    (HboneRejected, _rejected_flag),
    (HboneConnectTimeout, ResponseFlag.NETWORK_POLICY),
    (IdentityMismatch, ResponseFlag.IDENTITY_ERROR),
    (TrustDomainMismatch, ResponseFlag.IDENTITY_ERROR),
    (PeerCertificateError, ResponseFlag.IDENTITY_ERROR),
    (CertificateError, ResponseFlag.IDENTITY_ERROR),
    (AlpnMismatch, ResponseFlag.TLS_FAILURE),
    (ssl.SSLError, ResponseFlag.TLS_FAILURE),
    (HboneProtocolViolation, ResponseFlag.H2_HANDSHAKE_FAILURE),
    (h2.exceptions.ProtocolError, ResponseFlag.H2_HANDSHAKE_FAILURE),
    (OSError, ResponseFlag.CONNECT),
)


class ErrorClassifier:
    """Maps an exception to a response flag: its own ``response_flag`` attribute if it carries one,
    else the first matching (type, flag-or-function) rule: `extra` rules before the defaults."""

    def __init__(self, extra: Iterable[tuple[type[BaseException], FlagRule]] = ()) -> None:
        self._rules = (*tuple(extra), *DEFAULT_FLAG_RULES)

    def __call__(self, error: BaseException) -> ResponseFlag:
        own = getattr(error, "response_flag", None)
        if isinstance(own, ResponseFlag):
            return own
        for kind, rule in self._rules:
            if isinstance(error, kind):
                return rule if isinstance(rule, ResponseFlag) else rule(error)
        return ResponseFlag.NONE


AddressLike = str | tuple[IPAddress | str, int]


def address_text(value: AddressLike) -> str:
    """ "ip:port" from a (ip, port) pair or a string already in that form."""
    if isinstance(value, str):
        return value
    ip, port = value
    return format_address(ip, port)


def _or_unknown(value: str) -> str:
    return value or UNKNOWN


def _workload_labels(workload: workload_pb2.Workload | None, identity: Identity | None) -> tuple[str, ...]:
    """workload, canonical_service, canonical_revision, workload_namespace, principal, app, version,
    cluster; for either side."""
    principal = str(identity) if identity is not None else UNKNOWN
    if workload is None:
        return (UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, principal, UNKNOWN, UNKNOWN, UNKNOWN)
    canonical_name = _or_unknown(workload.canonical_name)
    canonical_revision = _or_unknown(workload.canonical_revision)
    return (
        _or_unknown(workload.workload_name or workload.name),
        canonical_name,
        canonical_revision,
        _or_unknown(workload.namespace),
        principal,
        canonical_name,
        canonical_revision,
        _or_unknown(workload.cluster_id),
    )


def traffic_labels(
    direction: Direction,
    source: workload_pb2.Workload | None,
    destination: workload_pb2.Workload | None,
    service: workload_pb2.Service | None,
    source_identity: Identity | None,
    destination_identity: Identity | None,
    mtls: bool,
    flag: ResponseFlag = ResponseFlag.NONE,
) -> tuple[str, ...]:
    """The values of `LABEL_NAMES` for one connection (pure; unknown values are "unknown")."""
    reporter = "source" if direction is Direction.OUTBOUND else "destination"
    src = _workload_labels(source, source_identity)
    dst = _workload_labels(destination, destination_identity)
    if service is not None:
        svc = (_or_unknown(service.hostname), _or_unknown(service.namespace), _or_unknown(service.name))
    else:
        svc = (UNKNOWN, UNKNOWN, UNKNOWN)
    security = SecurityPolicy.MUTUAL_TLS if mtls else SecurityPolicy.UNKNOWN
    return (reporter, *src, *svc, *dst, "tcp", flag.value, security.value)


class _Series:
    """The counter children of one label set, created on first use."""

    __slots__ = ("_by_flag", "_metrics", "base", "opened", "received", "sent")

    def __init__(self, metrics: ProxyMetrics, base: tuple[str, ...]) -> None:
        self._metrics = metrics
        self.base = base
        self.opened = metrics.opened.labels(*base)
        self.sent = metrics.sent_bytes.labels(*base)
        self.received = metrics.received_bytes.labels(*base)
        self._by_flag: dict[ResponseFlag, tuple[Counter, Counter]] = {}

    def closed_and_failed(self, flag: ResponseFlag) -> tuple[Counter, Counter]:
        children = self._by_flag.get(flag)
        if children is None:
            values = list(self.base)
            values[_FLAG_INDEX] = flag.value
            children = (self._metrics.closed.labels(*values), self._metrics.failed.labels(*values))
            self._by_flag[flag] = children
        return children


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    source: workload_pb2.Workload | None
    destination: workload_pb2.Workload | None
    service: workload_pb2.Service | None
    series: _Series


_CacheKey = tuple[Direction, str, str, str, Identity | None, Identity | None, bool]


class ProxyMetrics:
    """The node proxy's connection metrics and access log (see the module docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        tag: str | None = None,
        classifier: ErrorClassifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        access_log: logging.Logger | None = None,
        label_cache_size: int = DEFAULT_LABEL_CACHE_SIZE,
    ) -> None:
        if label_cache_size < 1:
            raise ValueError("label_cache_size must be at least 1")
        self.registry = registry
        self.classifier = classifier or ErrorClassifier()
        self.clock = clock
        self.access_log = access_log or access_logger
        self._cache: dict[_CacheKey, _CacheEntry] = {}
        self._cache_size = label_cache_size
        self.opened = Counter(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            LABEL_NAMES,
            registry=registry,
        )
        self.closed = Counter(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            LABEL_NAMES,
            registry=registry,
        )
        self.sent_bytes = Counter(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            LABEL_NAMES,
            registry=registry,
        )
        self.received_bytes = Counter(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            LABEL_NAMES,
            registry=registry,
        )
        self.failed = Counter(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            LABEL_NAMES,
            registry=registry,
        )
        self.build = Gauge(
            "istio_build", "Istio component build info", ["component", "tag"], registry=registry
        )
        self.build.labels("ztunnel", tag if tag is not None else __version__).set(1)

    def connection(
        self,
        direction: Direction,
        *,
        src_addr: AddressLike,
        dst_addr: AddressLike,
        source: workload_pb2.Workload | None = None,
        destination: workload_pb2.Workload | None = None,
        service: workload_pb2.Service | None = None,
        source_identity: Identity | None = None,
        destination_identity: Identity | None = None,
        hbone_addr: str = "",
        mtls: bool = False,
    ) -> ConnectionResult:
        """A result for one connection; use it as a context manager around the connection's life.

        `src_addr` is the client's address; `dst_addr` the next hop (e.g. the peer's :15008, or the
        application's address inbound); `hbone_addr` the tunnel's inner authority; `mtls` whether the
        connection is carried over mutual TLS (connection_security_policy="mutual_tls")."""
        series = self._series(
            direction, source, destination, service, source_identity, destination_identity, mtls
        )
        return ConnectionResult(
            self,
            series,
            direction,
            address_text(src_addr),
            address_text(dst_addr),
            hbone_addr,
            source,
            destination,
            service,
            source_identity,
            destination_identity,
        )

    def log_early_deny(
        self, direction: Direction, src_addr: AddressLike, dst_addr: AddressLike, error: BaseException | str
    ) -> None:
        """The access line for a connection refused before a result exists (addresses and error only)."""
        log_early_deny(
            address_text(src_addr), address_text(dst_addr), direction.value, error, self.access_log
        )

    def _series(
        self,
        direction: Direction,
        source: workload_pb2.Workload | None,
        destination: workload_pb2.Workload | None,
        service: workload_pb2.Service | None,
        source_identity: Identity | None,
        destination_identity: Identity | None,
        mtls: bool,
    ) -> _Series:
        key: _CacheKey = (
            direction,
            source.uid if source is not None else "",
            destination.uid if destination is not None else "",
            f"{service.namespace}/{service.hostname}" if service is not None else "",
            source_identity,
            destination_identity,
            mtls,
        )
        entry = self._cache.get(key)
        if (
            entry is not None
            and entry.source is source
            and entry.destination is destination
            and entry.service is service
        ):
            return entry.series
        base = traffic_labels(
            direction, source, destination, service, source_identity, destination_identity, mtls
        )
        series = _Series(self, base)
        if entry is None and len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = _CacheEntry(source, destination, service, series)
        return series


class ConnectionResult:
    """The record of one proxied connection (see the module docstring). Not reusable."""

    __slots__ = (
        "_destination",
        "_destination_identity",
        "_direction",
        "_dst_addr",
        "_finished",
        "_hbone_addr",
        "_metrics",
        "_opened",
        "_outcome",
        "_received",
        "_sent",
        "_series",
        "_service",
        "_source",
        "_source_identity",
        "_src_addr",
        "_started",
    )

    def __init__(
        self,
        metrics: ProxyMetrics,
        series: _Series,
        direction: Direction,
        src_addr: str,
        dst_addr: str,
        hbone_addr: str,
        source: workload_pb2.Workload | None,
        destination: workload_pb2.Workload | None,
        service: workload_pb2.Service | None,
        source_identity: Identity | None,
        destination_identity: Identity | None,
    ) -> None:
        self._metrics = metrics
        self._series = series
        self._direction = direction
        self._src_addr = src_addr
        self._dst_addr = dst_addr
        self._hbone_addr = hbone_addr
        self._source = source
        self._destination = destination
        self._service = service
        self._source_identity = source_identity
        self._destination_identity = destination_identity
        self._sent = 0
        self._received = 0
        self._outcome: tuple[ResponseFlag, str] | None = None
        self._opened = False
        self._finished = False
        self._started = 0.0

    # ------------------------------------------------------------------ state

    @property
    def labels(self) -> dict[str, str]:
        """The label values this connection opened with (for tests and debugging)."""
        return dict(zip(LABEL_NAMES, self._series.base, strict=True))

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def outcome(self) -> tuple[ResponseFlag, str] | None:
        """(flag, error) recorded so far; None while the connection has not failed."""
        return self._outcome

    @property
    def finished(self) -> bool:
        return self._finished

    # ------------------------------------------------------------------ recording

    def open(self) -> None:
        """Record the connection as opened (entering the context manager does this); idempotent."""
        if self._opened:
            return
        self._opened = True
        self._started = self._metrics.clock()
        self._series.opened.inc()

    def add_sent(self, n: int) -> None:
        if n > 0:
            self._sent += n
            self._series.sent.inc(n)

    def add_received(self, n: int) -> None:
        if n > 0:
            self._received += n
            self._series.received.inc(n)

    def record_bytes(self, sent: int, received: int) -> None:
        """Totals for the whole connection; counts only what add_sent/add_received have not."""
        if sent < self._sent or received < self._received:
            raise ValueError(
                f"byte totals ({sent} sent, {received} received) are below what was already counted "
                f"({self._sent}, {self._received})"
            )
        self.add_sent(sent - self._sent)
        self.add_received(received - self._received)

    def fail(self, error: BaseException | str, flag: ResponseFlag | None = None) -> None:
        """Record why the connection failed (the first recorded outcome wins). Without `flag`, an
        exception is classified and a plain message gets "-"."""
        if self._outcome is not None:
            return
        if isinstance(error, BaseException):
            resolved = flag if flag is not None else self._metrics.classifier(error)
            message = str(error) or type(error).__name__
        else:
            resolved = flag if flag is not None else ResponseFlag.NONE
            message = error
        self._outcome = (resolved, message)

    def closing(self, reason: CloseReason) -> None:
        """Record that the proxy is closing this connection for `reason` (a closer calls this before
        cancelling the connection's task)."""
        if self._outcome is None:
            self._outcome = CLOSE_OUTCOMES[reason]

    def finish(self, error: BaseException | None = None) -> None:
        """Record the end: closed counter, failed counter, one access log line. Idempotent; leaving
        the context manager calls it with the exception the block ended with."""
        if self._finished:
            return
        self._finished = True
        self.open()
        if error is not None and self._outcome is None:
            if isinstance(error, asyncio.CancelledError):
                self._outcome = (ResponseFlag.NONE, "connection cancelled")
            else:
                self.fail(error)
        flag = self._outcome[0] if self._outcome is not None else ResponseFlag.NONE
        closed, failed = self._series.closed_and_failed(flag)
        closed.inc()
        if self._outcome is not None:
            failed.inc()
        self._log()

    def _log(self) -> None:
        log = self._metrics.access_log
        level = logging.INFO if self._outcome is None else logging.ERROR
        if not log.isEnabledFor(level):
            return
        fields: dict[str, object] = {"src.addr": Bare(self._src_addr)}
        source = self._source
        if source is not None:
            fields["src.workload"] = source.name
            fields["src.namespace"] = source.namespace
        if self._source_identity is not None:
            fields["src.identity"] = str(self._source_identity)
        fields["dst.addr"] = Bare(self._dst_addr)
        if self._hbone_addr:
            fields["dst.hbone_addr"] = self._hbone_addr
        if self._service is not None:
            fields["dst.service"] = self._service.hostname
        destination = self._destination
        if destination is not None:
            fields["dst.workload"] = destination.name
            fields["dst.namespace"] = destination.namespace
        if self._destination_identity is not None:
            fields["dst.identity"] = str(self._destination_identity)
        fields["direction"] = self._direction.value
        fields["bytes_sent"] = self._sent
        fields["bytes_recv"] = self._received
        fields["duration"] = duration_text(self._metrics.clock() - self._started)
        if self._outcome is None:
            log.info("connection complete", extra={"fields": fields})
        else:
            fields["error"] = self._outcome[1]
            log.error("connection failed", extra={"fields": fields})

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> ConnectionResult:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exc)

    async def __aenter__(self) -> ConnectionResult:
        self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exc)
