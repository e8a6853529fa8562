"""The waypoint's request telemetry: Istio's HTTP metrics, Envoy's default access log line, trace headers.

Theory of operation
-------------------
Metrics. `WaypointMetrics` owns, on a registry passed in (several waypoints can share a process, as the
in-process tests do), the series an Istio waypoint exports (reference §7.2):

* ``istio_requests_total`` (counter), ``istio_request_duration_milliseconds``, ``istio_request_bytes``
  and ``istio_response_bytes`` (histograms, with Envoy's default buckets, which Istio's stats filter
  uses), all labelled with `LABEL_NAMES`: Istio's standard labels with ``reporter="waypoint"``;
* ``loom_waypoint_refused_total{reason}``: requests and connections the waypoint refused before they
  could become a request record (smuggling, header limits, HTTP/2 floods, ...), one counter per reason,
  so a test can assert that something was refused *because of* X (hardening checklist §5.2).

The proxy calls `record` once per request, after the response ended (or failed), with the workload
details it holds for both ends: `SourceInfo` for the client (from the waypoint's workload state, looked
up by the client's address or identity), and the `Endpoint` the balancer picked for the destination
(or an explicit `DestinationInfo`). The labels are pure functions of those values (`request_labels`).

Label values stay bounded, since each distinct set is a series kept forever: ``response_code`` is the
status as a string only for 100-599 (anything else, e.g. no response at all, is "unknown"),
``grpc_response_status`` is "0".."16" or "unknown" for gRPC requests and "" for others,
``response_flags`` only holds Envoy's short flags (anything else becomes "unknown"), refusal reasons
outside `RefusalReason` are limited in number (`MAX_EXTRA_REASONS`, then "other"). Empty values are
"unknown", as in Istio. The series are counted in plain integers per label set (a request costs one
dict lookup and a few additions) and handed to Prometheus by a collector when scraped.

Access log. `format_access_log(entry)` renders one `AccessLogEntry` in Istio's default TEXT format (the
Envoy format string in reference §7.3), field for field. Absent values print as "-". Values are
sanitized so that one request is always one line that splits the same way: control characters become
``\\xNN``; inside quoted fields ``"`` and ``\\`` are escaped; in unquoted fields whitespace becomes "_"
(as Envoy does for response code details). `AccessLog` writes lines to a stream and never lets a
failing sink fail a request.

Trace headers. `request_id_for` keeps a usable ``x-request-id`` and otherwise generates a UUID4;
`traceparent_for` implements a W3C Trace Context intermediary: a valid ``traceparent`` keeps its trace
id and flags and gets a new span (parent) id, as a proxy creating its own span does; a missing or
invalid one (wrong shape, upper-case hex, all-zero ids, version ff, present twice) starts a new trace
(version 00, sampled), and its ``tracestate`` must be dropped, since the spec ties it to the
traceparent it came with. Both are pure functions of the client's values and an injectable random
source; `waypoint.proxy.headers.prepare_request_headers` puts their results in the request.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import enum
import itertools
import logging
import random
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Self, TextIO

import prometheus_client
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from loom.api import workload_pb2
from loom.hbone.headers import format_address
from loom.hbone.headers import parse_traceparent as parse_w3c_traceparent
from loom.identity import Identity
from waypoint.model import Endpoint, RequestView, ServiceRef

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
REPORTER = "waypoint"
MUTUAL_TLS = "mutual_tls"
DEFAULT_CLUSTER_ID = "Kubernetes"  # Istio's default cluster id (MeshConfig.cluster_id)

# Istio's standard labels, source side then destination side, then the request's outcome.
SOURCE_LABELS = (
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
)
DESTINATION_LABELS = (
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
)
LABEL_NAMES = (
    "reporter",
    *SOURCE_LABELS,
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    *DESTINATION_LABELS,
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

# Envoy's default histogram buckets; Istio's stats filter keeps them for all three histograms.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
MAX_EXTRA_REASONS = 64  # the proxy names its refusals finely (te_and_cl, bad_path, rapid_reset, ...)

# Labels on pods that name the canonical service and revision, most specific first (Istio's rules).
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
APP_LABELS = ("app", "app.kubernetes.io/name")
VERSION_LABELS = ("version", "app.kubernetes.io/version")
DEFAULT_CANONICAL_REVISION = "latest"


class ResponseFlag(enum.StrEnum):
    """Envoy's short response flags (the ``response_flags`` label and %RESPONSE_FLAGS%). Several may
    apply to one request; they are then joined with commas, e.g. "UT,URX"."""

    NONE = "-"
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE_FOUND = "NR"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    NO_CLUSTER_FOUND = "NC"
    DURATION_TIMEOUT = "DT"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    FAILED_LOCAL_HEALTH_CHECK = "LH"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    LOCAL_RESET = "LR"
    UPSTREAM_REMOTE_RESET = "UR"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    DELAY_INJECTED = "DI"
    FAULT_INJECTED = "FI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED_EXTERNAL_SERVICE = "UAEX"
    RATE_LIMIT_SERVICE_ERROR = "RLSE"
    INVALID_ENVOY_REQUEST_HEADERS = "IH"
    STREAM_IDLE_TIMEOUT = "SI"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    UPSTREAM_MAX_STREAM_DURATION_REACHED = "UMSDR"
    OVERLOAD_MANAGER = "OM"
    DNS_RESOLUTION_FAILED = "DF"
    DROP_OVERLOAD = "DO"


_KNOWN_FLAGS = frozenset(flag.value for flag in ResponseFlag if flag is not ResponseFlag.NONE)


class RefusalReason(enum.StrEnum):
    """Why the waypoint refused a request or connection (``loom_waypoint_refused_total{reason}``)."""

    BAD_REQUEST = "bad_request"  # malformed HTTP/1.1 that is not a smuggling attempt
    REQUEST_SMUGGLING = "request_smuggling"  # TE+CL, bad chunking, conflicting Content-Length
    HEADER_COUNT = "header_count"  # too many header fields
    HEADER_SIZE = "header_size"  # a header block (decoded) or one field over the byte limit
    HPACK = "hpack"  # HPACK decoding failed or the decoded size was abusive
    H2_FLOOD = "h2_flood"  # PING / SETTINGS / PRIORITY / empty DATA flood
    CONTINUATION_FLOOD = "continuation_flood"
    RAPID_RESET = "rapid_reset"  # too many streams reset by the client before a response
    H2_PROTOCOL = "h2_protocol"  # invalid pseudo-headers, connection-specific headers, CR/LF/NUL
    PATH_REJECTED = "path_rejected"  # a path that cannot be normalized safely
    BODY_TOO_LARGE = "body_too_large"
    BAD_CONNECT = "bad_connect"  # an HBONE CONNECT the waypoint does not accept (authority, method)
    EARLY_DATA = "early_data"  # tunnel payload before the CONNECT was answered
    CONNECTION_LIMIT = "connection_limit"
    OTHER = "other"  # a reason not named here, once MAX_EXTRA_REASONS others were seen


_REFUSAL_REASONS = frozenset(reason.value for reason in RefusalReason)
_REASON_SLUG = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")


# ---------------------------------------------------------------------------------------------------
# Workload details of both ends


def _first_label(labels: Mapping[str, str], names: Sequence[str]) -> str:
    return next((labels[name] for name in names if labels.get(name)), "")


def _or_unknown(value: str) -> str:
    return value or UNKNOWN


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """One end of a request as Istio's labels describe it; "" means unknown (exported as "unknown")."""

    workload: str = ""  # the workload's name (the Deployment's, else the pod's)
    namespace: str = ""
    principal: str = ""  # SPIFFE ID, "spiffe://<trust domain>/ns/<ns>/sa/<sa>"
    app: str = ""
    version: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    cluster: str = ""
    # label_values(), made once: an info lives in the waypoint's cache and labels every request.
    _labels: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = (
            self.workload,
            self.canonical_service,
            self.canonical_revision,
            self.namespace,
            self.principal,
            self.app,
            self.version,
            self.cluster,
        )
        object.__setattr__(self, "_labels", tuple(map(_or_unknown, labels)))

    @classmethod
    def from_workload(cls, workload: workload_pb2.Workload, identity: Identity | None = None) -> Self:
        """From a Workload of the waypoint's state (the controller already resolved its canonical
        names); `identity` overrides the one the Workload names (e.g. the verified mTLS identity)."""
        principal = str(identity) if identity is not None else ""
        if not principal and workload.trust_domain and workload.namespace and workload.service_account:
            principal = str(Identity(workload.trust_domain, workload.namespace, workload.service_account))
        return cls(
            workload=workload.workload_name or workload.name,
            namespace=workload.namespace,
            principal=principal,
            app=workload.canonical_name,
            version=workload.canonical_revision,
            canonical_service=workload.canonical_name,
            canonical_revision=workload.canonical_revision,
            cluster=workload.cluster_id,
        )

    @classmethod
    def from_labels(
        cls,
        workload: str,
        namespace: str,
        identity: Identity | None,
        labels: Mapping[str, str],
        cluster: str = "",
    ) -> Self:
        """From a pod's labels, by Istio's canonical service rules: the canonical name comes from
        service.istio.io/canonical-name, app.kubernetes.io/name or app, else the workload name; the
        revision from service.istio.io/canonical-revision, app.kubernetes.io/version or version,
        else "latest"."""
        canonical_service = _first_label(labels, CANONICAL_NAME_LABELS) or workload
        return cls(
            workload=workload,
            namespace=namespace or (identity.namespace if identity is not None else ""),
            principal=str(identity) if identity is not None else "",
            app=_first_label(labels, APP_LABELS),
            version=_first_label(labels, VERSION_LABELS),
            canonical_service=canonical_service,
            canonical_revision=(
                _first_label(labels, CANONICAL_REVISION_LABELS)
                or (DEFAULT_CANONICAL_REVISION if canonical_service else "")
            ),
            cluster=cluster,
        )

    def label_values(self) -> tuple[str, ...]:
        """The values of SOURCE_LABELS / DESTINATION_LABELS (same order), unknowns filled in."""
        return self._labels


@dataclass(frozen=True, slots=True)
class SourceInfo(WorkloadInfo):
    """The client of a request (its workload, from the waypoint's workload state)."""


@dataclass(frozen=True, slots=True)
class DestinationInfo(WorkloadInfo):
    """The backend pod that served a request."""

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, cluster: str = "") -> DestinationInfo:
        return cls.from_labels(
            endpoint.workload, endpoint.namespace, endpoint.identity, endpoint.labels, cluster
        )


# ---------------------------------------------------------------------------------------------------
# Label values


def response_code_label(code: int) -> str:
    """The status as text for a real HTTP status (100-599), else "unknown" (no response was sent)."""
    return str(code) if 100 <= code <= 599 else UNKNOWN


# gRPC's documented mapping of an HTTP status to a gRPC status when a response carries no grpc-status;
# every other status, 200 included (a gRPC response without grpc-status is broken), maps to UNKNOWN.
_HTTP_TO_GRPC = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}
_GRPC_UNKNOWN_STATUS = "2"
_GRPC_STATUS = re.compile(r"(?:[0-9]|1[0-6])\Z")


def grpc_status_label(grpc: bool, grpc_status: str | None, response_code: int) -> str:
    """``grpc_response_status``: "" for a request that is not gRPC; the grpc-status (0-16) for one that
    is; without one, the status gRPC derives from the HTTP status; "unknown" when there is neither a
    valid grpc-status nor an HTTP response."""
    if not grpc:
        return ""
    if grpc_status is not None:
        status = grpc_status.strip()
        return status if _GRPC_STATUS.match(status) else UNKNOWN
    if 100 <= response_code <= 599:
        return _HTTP_TO_GRPC.get(response_code, _GRPC_UNKNOWN_STATUS)
    return UNKNOWN


def response_flags_label(flags: str) -> str:
    """Envoy's flags ("-", "UH", "UT,URX"); anything else is "unknown" (keeps the label bounded)."""
    text = flags.strip()
    if not text or text == ResponseFlag.NONE:
        return ResponseFlag.NONE.value
    parts = text.split(",")
    return text if all(part in _KNOWN_FLAGS for part in parts) else UNKNOWN


def request_labels(
    request: RequestView,
    response_code: int,
    *,
    source: SourceInfo | None,
    destination: DestinationInfo | None,
    service: ServiceRef | None = None,
    grpc_status: str | None = None,
    response_flags: str = ResponseFlag.NONE,
) -> tuple[str, ...]:
    """The values of LABEL_NAMES for one request (pure). Without `source`, the client is described by
    its mTLS identity alone; without `destination`, only the Service is known. `service` is the Service
    the request was sent to (a route's backend), by default the one the client addressed."""
    identity = request.source.identity
    if source is None:
        source = SourceInfo(
            namespace=identity.namespace if identity is not None else "",
            principal=str(identity) if identity is not None else "",
        )
    elif not source.principal and identity is not None:
        source = replace(source, principal=str(identity))
    target = service if service is not None else request.service
    return (
        REPORTER,
        *source.label_values(),
        _or_unknown(target.hostname),
        _or_unknown(target.namespace),
        _or_unknown(target.name),
        *(destination or DestinationInfo()).label_values(),
        "grpc" if request.grpc else "http",
        response_code_label(response_code),
        grpc_status_label(request.grpc, grpc_status, response_code),
        response_flags_label(response_flags),
        MUTUAL_TLS,
    )


# ---------------------------------------------------------------------------------------------------
# Metrics


class _Histogram:
    """One histogram series: observations per bucket (not cumulative; the last is +Inf) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A value on a bucket's bound belongs to that bucket (le: less than or equal).
        self.counts[bisect.bisect_left(DEFAULT_BUCKETS, value)] += 1
        self.total += value


class _Series:
    """The four request series of one label set."""

    __slots__ = ("duration", "request_bytes", "requests", "response_bytes")

    def __init__(self, buckets: int) -> None:
        self.requests = 0
        self.duration = _Histogram(buckets)
        self.request_bytes = _Histogram(buckets)
        self.response_bytes = _Histogram(buckets)


class _RequestCollector(Collector):
    """Exports the request series WaypointMetrics counts, as a Counter and Histograms would."""

    def __init__(self, metrics: WaypointMetrics) -> None:
        self._metrics = metrics
        # The "le" texts prometheus_client itself writes ("0.5", "1.0", ..., "+Inf").
        self._bounds = [floatToGoString(bound) for bound in DEFAULT_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]

    def _buckets(self, histogram: _Histogram) -> list[tuple[str, float]]:
        return list(zip(self._bounds, itertools.accumulate(histogram.counts), strict=True))

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "istio_requests", "Total number of requests handled by the waypoint", labels=LABEL_NAMES
        )
        histograms = [
            HistogramMetricFamily(name, text, labels=LABEL_NAMES)
            for name, text in (
                (
                    "istio_request_duration_milliseconds",
                    "Duration of requests, from the first byte received to the last byte sent, in "
                    "milliseconds",
                ),
                ("istio_request_bytes", "Size of HTTP request bodies, in bytes"),
                ("istio_response_bytes", "Size of HTTP response bodies, in bytes"),
            )
        ]
        duration, request_bytes, response_bytes = histograms
        for values, series in list(self._metrics.series.items()):  # a copy: a scrape may be threaded
            requests.add_metric(values, series.requests)
            for family, histogram in (
                (duration, series.duration),
                (request_bytes, series.request_bytes),
                (response_bytes, series.response_bytes),
            ):
                family.add_metric(values, self._buckets(histogram), histogram.total)
        yield requests
        yield from histograms


class WaypointMetrics:
    """The waypoint's request metrics and refusal counters (see the module docstring).

    `cluster_id` fills ``destination_cluster`` for endpoints (the waypoint only forwards within its own
    cluster) unless an explicit `DestinationInfo` says otherwise.

    The request series are counted here, in plain integers per label set, and exported by a collector
    on the registry at scrape time: prometheus_client's Counter and Histogram take a lock per
    increment (seven per request) and walk the buckets in Python, twice the cost of this bookkeeping,
    which only the event loop's thread does."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, cluster_id: str = DEFAULT_CLUSTER_ID
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.cluster_id = cluster_id
        self.series: dict[tuple[str, ...], _Series] = {}
        self._bucket_count = len(DEFAULT_BUCKETS) + 1
        self._reasons_lock = threading.Lock()
        self._extra_reasons: set[str] = set()
        self.registry.register(_RequestCollector(self))
        self.refusals = Counter(
            "loom_waypoint_refused",
            "Requests and connections the waypoint refused, by reason",
            ("reason",),
            registry=self.registry,
        )
        # Every named reason is exported from the start at 0, so a rate() over it works before the
        # first refusal and dashboards list what can be refused.
        for reason in RefusalReason:
            self.refusals.labels(reason.value)

    def record(
        self,
        request: RequestView,
        response_code: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        *,
        endpoint: Endpoint | None,
        source_workload: SourceInfo | None,
        grpc_status: str | None,
        response_flags: str,
        destination: DestinationInfo | None = None,
        service: ServiceRef | None = None,
    ) -> None:
        """Count one finished request. `endpoint` is the pod that answered (None when none did, e.g.
        denied, no route or no healthy endpoint); `destination` overrides what the endpoint tells;
        `service` is the Service actually used when a route sent the request elsewhere."""
        if destination is None and endpoint is not None:
            destination = DestinationInfo.from_endpoint(endpoint, self.cluster_id)
        values = request_labels(
            request,
            response_code,
            source=source_workload,
            destination=destination,
            service=service,
            grpc_status=grpc_status,
            response_flags=response_flags,
        )
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Series(self._bucket_count)
        series.requests += 1
        series.duration.observe(max(0.0, duration_s) * 1000.0)
        series.request_bytes.observe(max(0, request_bytes))
        series.response_bytes.observe(max(0, response_bytes))

    def refused(self, reason: RefusalReason | str) -> None:
        """Count one refusal. A reason outside RefusalReason must be a lower-case slug
        ([a-z][a-z0-9_]*, at most 40 characters); at most MAX_EXTRA_REASONS such reasons get their
        own series, later ones and malformed ones count as "other"."""
        self.refusals.labels(self._reason_label(reason)).inc()

    def _reason_label(self, reason: RefusalReason | str) -> str:
        text = str(reason)
        if text in _REFUSAL_REASONS:
            return text
        if not _REASON_SLUG.match(text):
            return RefusalReason.OTHER.value
        with self._reasons_lock:
            if text in self._extra_reasons:
                return text
            if len(self._extra_reasons) >= MAX_EXTRA_REASONS:
                return RefusalReason.OTHER.value
            self._extra_reasons.add(text)
            return text

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what /stats/prometheus serves)."""
        return prometheus_client.generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------------
# Access log


@dataclass(slots=True)
class AccessLogEntry:
    """One request, field for field as Istio's default access log format prints it. Strings that are
    "" and numbers that are None print as "-". (Not frozen: one is made per request, and a frozen
    dataclass of this many fields takes half as long again to construct.)"""

    start_time: float  # %START_TIME%: when the first byte of the request arrived, Unix seconds
    method: str  # %REQ(:METHOD)%
    path: str  # %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%: the path before any rewrite, with the query
    protocol: str  # %PROTOCOL%: "HTTP/1.1" or "HTTP/2"
    response_code: int  # %RESPONSE_CODE%: 0 when no response was sent
    response_flags: str = ResponseFlag.NONE.value  # %RESPONSE_FLAGS%
    response_code_details: str = ""  # %RESPONSE_CODE_DETAILS%: "via_upstream", "rbac_access_denied..."
    connection_termination_details: str = ""  # %CONNECTION_TERMINATION_DETAILS%
    upstream_transport_failure_reason: str = ""  # %UPSTREAM_TRANSPORT_FAILURE_REASON%
    bytes_received: int = 0  # %BYTES_RECEIVED%: request body bytes
    bytes_sent: int = 0  # %BYTES_SENT%: response body bytes
    duration_ms: int | None = None  # %DURATION%: start to last byte sent, whole milliseconds
    upstream_service_time_ms: int | None = None  # %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
    x_forwarded_for: str = ""  # %REQ(X-FORWARDED-FOR)%
    user_agent: str = ""  # %REQ(USER-AGENT)%
    request_id: str = ""  # %REQ(X-REQUEST-ID)%
    authority: str = ""  # %REQ(:AUTHORITY)%
    upstream_host: str = ""  # %UPSTREAM_HOST%: the endpoint's ip:port
    upstream_cluster: str = ""  # %UPSTREAM_CLUSTER_RAW%: "inbound-vip|<port>|http|<host>"
    upstream_local_address: str = ""  # %UPSTREAM_LOCAL_ADDRESS%
    downstream_local_address: str = ""  # %DOWNSTREAM_LOCAL_ADDRESS%: the address the client dialled
    downstream_remote_address: str = ""  # %DOWNSTREAM_REMOTE_ADDRESS%: the client's address
    requested_server_name: str = ""  # %REQUESTED_SERVER_NAME%: SNI; HBONE does not use it
    route_name: str = ""  # %ROUTE_NAME%

    @classmethod
    def for_request(
        cls,
        request: RequestView,
        start_time: float,
        response_code: int,
        *,
        response_flags: str = ResponseFlag.NONE.value,
        response_code_details: str = "",
        bytes_received: int = 0,
        bytes_sent: int = 0,
        duration_ms: int | None = None,
        upstream_service_time_ms: int | None = None,
        endpoint: Endpoint | None = None,
        service: ServiceRef | None = None,
        route_name: str = "",
        request_id: str | None = None,
        upstream_local_address: str = "",
        connection_termination_details: str = "",
        upstream_transport_failure_reason: str = "",
    ) -> AccessLogEntry:
        """An entry with the request's own fields filled in from `request` (headers, path, addresses)
        and the outcome from the arguments. `service` is the Service used (default: the addressed one);
        `request_id` overrides the x-request-id header (e.g. one `request_id_for` generated)."""
        target = service if service is not None else request.service
        path = request.path + (f"?{request.query}" if request.query else "")
        local = format_address(request.destination_ip, request.service.port) if request.destination_ip else ""
        # The logged headers in one pass (this runs for every request).
        forwarded_for: list[str] = []
        user_agent = header_request_id = None
        for name, value in request.headers:
            if name in _LOGGED_HEADERS:
                if name == "x-forwarded-for":
                    forwarded_for.append(value)
                elif name == "user-agent":
                    if user_agent is None:
                        user_agent = value
                elif header_request_id is None:  # x-request-id
                    header_request_id = value
        if request_id is None:
            request_id = header_request_id
        return cls(
            start_time=start_time,
            method=request.method,
            path=path,
            protocol=request.protocol,
            response_code=response_code,
            response_flags=response_flags,
            response_code_details=response_code_details,
            connection_termination_details=connection_termination_details,
            upstream_transport_failure_reason=upstream_transport_failure_reason,
            bytes_received=bytes_received,
            bytes_sent=bytes_sent,
            duration_ms=duration_ms,
            upstream_service_time_ms=upstream_service_time_ms,
            x_forwarded_for=",".join(forwarded_for),
            user_agent=user_agent or "",
            request_id=request_id or "",
            authority=request.authority,
            upstream_host=format_address(endpoint.ip, endpoint.port) if endpoint is not None else "",
            upstream_cluster=upstream_cluster_name(target),
            upstream_local_address=upstream_local_address,
            downstream_local_address=local,
            downstream_remote_address=request.source.address,
            route_name=route_name,
        )


_LOGGED_HEADERS = frozenset({"x-forwarded-for", "user-agent", "x-request-id"})


def upstream_cluster_name(service: ServiceRef) -> str:
    """Istio's waypoint cluster name for a Service: ``inbound-vip|<port>|http|<hostname>``."""
    return f"inbound-vip|{service.port}|http|{service.hostname}"


_last_second: list[tuple[int, str]] = [(-1, "")]  # (second, its formatted date and time): one per line


def format_start_time(timestamp: float) -> str:
    """Envoy's default %START_TIME%: UTC, milliseconds, e.g. ``2024-05-04T09:59:05.028Z``."""
    # Through whole microseconds first: 1606339578.409 is stored as ...578.40899999, and truncating
    # that to milliseconds directly would print .408.
    seconds, microseconds = divmod(round(timestamp * 1_000_000), 1_000_000)
    cached_second, prefix = _last_second[0]
    if cached_second != seconds:  # lines come in time order: strftime once a second, not per line
        prefix = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _last_second[0] = (seconds, prefix)
    return f"{prefix}{microseconds // 1000:03d}Z"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED_SPECIAL = re.compile(r'[\x00-\x1f\x7f"\\]')
_WHITESPACE = re.compile(r"\s+")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in '"\\':
        return "\\" + char
    return f"\\x{ord(char):02x}"


def _quoted(value: str) -> str:
    if not value:
        return '"-"'
    # The usual value has nothing to escape: isprintable() is False for every control character.
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return '"' + _QUOTED_SPECIAL.sub(_escape, value) + '"'


def _bare(value: str) -> str:
    if not value:
        return "-"
    # isprintable() is also False for every whitespace character but the space.
    if value.isprintable() and " " not in value:
        return value
    return _CONTROL.sub(_escape, _WHITESPACE.sub("_", value))


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_access_log(entry: AccessLogEntry) -> str:
    """One line (without the newline) in Istio's default TEXT access log format:

    ``[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
    "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
    %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
    %REQUESTED_SERVER_NAME% %ROUTE_NAME%``"""
    e = entry
    # The usual line has nothing to escape: one check over all the quoted values and one over all
    # the bare ones (isprintable() is False for every control character, and for every whitespace
    # character but the space), then only empty values become "-".
    quoted = (
        f"{e.method}{e.path}{e.protocol}{e.upstream_transport_failure_reason}{e.x_forwarded_for}"
        f"{e.user_agent}{e.request_id}{e.authority}{e.upstream_host}"
    )
    bare = (
        f"{e.response_flags}{e.response_code_details}{e.connection_termination_details}"
        f"{e.upstream_cluster}{e.upstream_local_address}{e.downstream_local_address}"
        f"{e.downstream_remote_address}{e.requested_server_name}{e.route_name}"
    )
    if not (
        quoted.isprintable()
        and '"' not in quoted
        and "\\" not in quoted
        and bare.isprintable()
        and " " not in bare
    ):
        return _format_escaped(e)
    duration = "-" if e.duration_ms is None else e.duration_ms
    service_time = "-" if e.upstream_service_time_ms is None else e.upstream_service_time_ms
    return (
        f'[{format_start_time(e.start_time)}] "{e.method or "-"} {e.path or "-"} {e.protocol or "-"}" '
        f"{e.response_code} {e.response_flags or '-'} {e.response_code_details or '-'} "
        f'{e.connection_termination_details or "-"} "{e.upstream_transport_failure_reason or "-"}" '
        f"{e.bytes_received} {e.bytes_sent} {duration} {service_time} "
        f'"{e.x_forwarded_for or "-"}" "{e.user_agent or "-"}" "{e.request_id or "-"}" '
        f'"{e.authority or "-"}" "{e.upstream_host or "-"}" {e.upstream_cluster or "-"} '
        f"{e.upstream_local_address or '-'} {e.downstream_local_address or '-'} "
        f"{e.downstream_remote_address or '-'} {e.requested_server_name or '-'} {e.route_name or '-'}"
    )


def _format_escaped(entry: AccessLogEntry) -> str:
    """format_access_log value by value, escaping what needs it: quoted values get \\" \\\\ and \\xNN
    for control characters, bare values get _ for whitespace runs and \\xNN for control characters."""
    method, path, protocol = _quoted(entry.method), _quoted(entry.path), _quoted(entry.protocol)
    request_line = f"{method[1:-1]} {path[1:-1]} {protocol[1:-1]}"
    return (
        f'[{format_start_time(entry.start_time)}] "{request_line}" {entry.response_code} '
        f"{_bare(entry.response_flags)} {_bare(entry.response_code_details)} "
        f"{_bare(entry.connection_termination_details)} {_quoted(entry.upstream_transport_failure_reason)} "
        f"{entry.bytes_received} {entry.bytes_sent} "
        f"{_number(entry.duration_ms)} {_number(entry.upstream_service_time_ms)} "
        f"{_quoted(entry.x_forwarded_for)} {_quoted(entry.user_agent)} {_quoted(entry.request_id)} "
        f"{_quoted(entry.authority)} {_quoted(entry.upstream_host)} {_bare(entry.upstream_cluster)} "
        f"{_bare(entry.upstream_local_address)} {_bare(entry.downstream_local_address)} "
        f"{_bare(entry.downstream_remote_address)} {_bare(entry.requested_server_name)} "
        f"{_bare(entry.route_name)}"
    )


class AccessLog:
    """Writes access log lines to a stream (stdout by default, as Envoy's /dev/stdout). A failing
    stream is reported once and then skipped: telemetry never fails a request.

    On an event loop the lines are batched: the first line of a batch schedules one write (and flush)
    of the whole batch `flush_interval` seconds later, as Envoy flushes its access log files on an
    interval; at 1,000 requests/s that is 10 system calls a second instead of 1,000. Outside a loop,
    or with `flush_interval` 0, each line is written at once. The owner calls flush() when it stops."""

    def __init__(
        self, stream: TextIO | None = None, *, enabled: bool = True, flush_interval: float = 0.1
    ) -> None:
        self._stream = stream
        self.enabled = enabled
        self.flush_interval = flush_interval
        self._failed = False
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    def write(self, entry: AccessLogEntry) -> None:
        if not self.enabled:
            return
        line = format_access_log(entry) + "\n"
        with self._lock:
            self._pending.append(line)
            if self._flush_handle is not None:
                return
            if self.flush_interval > 0:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None:
                    self._flush_handle = loop.call_later(self.flush_interval, self.flush)
                    return
        self.flush()

    def flush(self) -> None:
        """Write what is pending now."""
        with self._lock:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            lines, self._pending = self._pending, []
            if not lines:
                return
            stream = self._stream if self._stream is not None else sys.stdout
            try:
                stream.write("".join(lines))
                stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed
                if not self._failed:
                    self._failed = True
                    log.warning("access log: cannot write (%s); further failures are not reported", exc)


# ---------------------------------------------------------------------------------------------------
# Trace headers

REQUEST_ID = "x-request-id"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_REQUEST_ID_LENGTH = 256
# A request id is passed through as given when it is printable ASCII without spaces (logs, headers).
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}\Z")
SAMPLED = 0x01


# The bits uuid.UUID(version=4) fixes: version 4 (bits 76-79) and the RFC 4122 variant (bits 62-63).
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def uuid4_text(bits: int) -> str:
    """str(uuid.UUID(int=bits, version=4)) for a 128-bit `bits`, without building the UUID object
    (a request id per request: the object and its methods were 1.5 % of the waypoint's CPU)."""
    digits = f"{(bits & _UUID4_CLEAR) | _UUID4_SET:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def new_request_id() -> str:
    # Request and trace ids identify, they protect nothing: the random module's generator (seeded
    # from the OS, reseeded after fork) instead of a getrandom() system call per id.
    return uuid4_text(random.getrandbits(128))


def request_id_for(client_value: str | None, new_id: Callable[[], str] = new_request_id) -> str:
    """The x-request-id to forward: the client's first one when usable (1-256 printable ASCII
    characters, no spaces, surrounding whitespace ignored), otherwise a new UUID4."""
    if client_value is not None:
        candidate = client_value.strip()
        if _REQUEST_ID.match(candidate):
            return candidate
    return new_id()


def format_traceparent(trace_id: str, parent_id: str, flags: int, version: int = 0) -> str:
    return f"{version:02x}-{trace_id}-{parent_id}-{flags:02x}"


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C traceparent: version-trace_id-parent_id-flags, lower-case hex."""

    trace_id: str  # 32 hex digits, not all zero
    parent_id: str  # 16 hex digits, not all zero: the span of whoever sent the request
    flags: int  # bit 0: sampled
    version: int = 0

    def __str__(self) -> str:
        return format_traceparent(self.trace_id, self.parent_id, self.flags, self.version)

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse_traceparent(value: str) -> TraceParent | None:
    """The traceparent, or None when it is not valid (loom.hbone.headers applies the spec's parsing
    rules: shape and case, version ff, all-zero ids, extra fields in version 00)."""
    parsed = parse_w3c_traceparent(value.strip(" \t"))
    if parsed is None:
        return None
    return TraceParent(f"{parsed.trace_id:032x}", f"{parsed.parent_id:016x}", parsed.flags, parsed.version)


def _random_hex(random_bytes: Callable[[int], bytes], size: int) -> str:
    # Bounded: an all-zero id is invalid, and 8 random bytes are all zero with probability 2^-64.
    for _ in range(8):
        value = random_bytes(size).hex()
        if value.strip("0"):
            return value
    raise RuntimeError("the random source returned only zero bytes")


def traceparent_for(
    client_values: Sequence[str], random_bytes: Callable[[int], bytes] = random.randbytes
) -> tuple[str, bool]:
    """(the traceparent to forward, whether it continues the client's trace). With exactly one valid
    traceparent from the client: the same trace id and flags under a new span id (this hop's span),
    as version 00; otherwise (none, two, or invalid) a new sampled trace, whose tracestate must not be
    forwarded (it described the trace that was discarded)."""
    # Two traceparent headers are ambiguous, which the spec treats as invalid.
    parent = parse_traceparent(client_values[0]) if len(client_values) == 1 else None
    span_id = _random_hex(random_bytes, 8)
    # Formatted directly: a TraceParent object per request would cost as much as the rest of this.
    if parent is None:
        return format_traceparent(_random_hex(random_bytes, 16), span_id, SAMPLED), False
    # Flags a later version defines are not ours to forward; version 00 defines only "sampled".
    flags = parent.flags if parent.version == 0 else parent.flags & SAMPLED
    return format_traceparent(parent.trace_id, span_id, flags), True


__all__ = [
    "DEFAULT_BUCKETS",
    "DESTINATION_LABELS",
    "LABEL_NAMES",
    "REPORTER",
    "SOURCE_LABELS",
    "UNKNOWN",
    "AccessLog",
    "AccessLogEntry",
    "DestinationInfo",
    "RefusalReason",
    "ResponseFlag",
    "SourceInfo",
    "TraceParent",
    "WaypointMetrics",
    "WorkloadInfo",
    "format_access_log",
    "format_start_time",
    "grpc_status_label",
    "new_request_id",
    "parse_traceparent",
    "request_id_for",
    "request_labels",
    "response_code_label",
    "response_flags_label",
    "traceparent_for",
    "upstream_cluster_name",
]
