"""WaypointMetrics: Istio's HTTP series and labels as Prometheus scrapes them, bounded label values,
workload details from state or pod labels, and the refusal counter."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from loom.api import workload_pb2
from waypoint.model import AppProtocol
from waypoint.telemetry import (
    DEFAULT_BUCKETS,
    LABEL_NAMES,
    MAX_EXTRA_REASONS,
    DestinationInfo,
    RefusalReason,
    SourceInfo,
    WaypointMetrics,
    grpc_status_label,
    request_labels,
    response_code_label,
    response_flags_label,
)

from .builders import CLIENT, SERVER, endpoint, request, service_ref

ISTIO_STANDARD_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
}

SLEEP = SourceInfo(
    workload="sleep",
    namespace="default",
    principal=str(CLIENT),
    app="sleep",
    version="v1",
    canonical_service="sleep",
    canonical_revision="v1",
    cluster="Kubernetes",
)


def scrape(registry: CollectorRegistry) -> dict[str, list[Sample]]:
    """Samples by sample name, parsed back from the text exposition as Prometheus would read it."""
    text = prometheus_client.generate_latest(registry).decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def family_types(registry: CollectorRegistry) -> dict[str, str]:
    text = prometheus_client.generate_latest(registry).decode()
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_one_request_exports_istio_series_with_the_standard_labels() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    metrics.record(
        request(),
        200,
        0.0123,
        17,
        295,
        endpoint=endpoint(),
        source_workload=SLEEP,
        grpc_status=None,
        response_flags="-",
    )
    assert family_types(registry) == {
        "istio_requests": "counter",
        "istio_request_duration_milliseconds": "histogram",
        "istio_request_bytes": "histogram",
        "istio_response_bytes": "histogram",
        "loom_waypoint_refused": "counter",
    }
    samples = scrape(registry)
    [total] = samples["istio_requests_total"]
    assert set(total.labels) == ISTIO_STANDARD_LABELS
    assert total.value == 1
    assert total.labels == {
        "reporter": "waypoint",
        "source_workload": "sleep",
        "source_canonical_service": "sleep",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "source_app": "sleep",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_service": "reviews.bookinfo.svc.cluster.local",
        "destination_service_namespace": "bookinfo",
        "destination_service_name": "reviews",
        "destination_workload": "reviews-v2",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    [duration_sum] = samples["istio_request_duration_milliseconds_sum"]
    assert duration_sum.value == pytest.approx(12.3)
    [request_sum] = samples["istio_request_bytes_sum"]
    [response_sum] = samples["istio_response_bytes_sum"]
    assert (request_sum.value, response_sum.value) == (17, 295)
    assert all(set(s.labels) == ISTIO_STANDARD_LABELS for s in samples["istio_response_bytes_count"])
    assert "istio_requests_created" not in samples  # Istio exports no *_created series


def test_histograms_use_envoys_default_buckets() -> None:
    registry = CollectorRegistry()
    WaypointMetrics(registry).record(
        request(), 200, 0.003, 0, 0, endpoint=None, source_workload=None, grpc_status=None, response_flags="-"
    )
    samples = scrape(registry)
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        bounds = [float(s.labels["le"]) for s in samples[f"{name}_bucket"]]
        assert bounds == [*DEFAULT_BUCKETS, float("inf")], name
    buckets = {s.labels["le"]: s.value for s in samples["istio_request_duration_milliseconds_bucket"]}
    assert (buckets["1.0"], buckets["5.0"]) == (0, 1)  # 3 ms


def test_histograms_bucket_as_prometheus_client_does() -> None:
    """Values on a bound, between bounds, beyond the last bound and fractional ones land in the same
    cumulative buckets, sums and counts as prometheus_client's own Histogram puts them."""
    sizes = [0, 1, 1.5, 5, 10, 99, 100, 101, 1024, 3600000, 3600001, 10**9]
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    reference_registry = CollectorRegistry()
    reference = prometheus_client.Histogram(
        "istio_response_bytes", "reference", buckets=DEFAULT_BUCKETS, registry=reference_registry
    )
    for size in sizes:
        metrics.record(
            request(), 200, 0.001, 0, int(size), endpoint=None, source_workload=None, grpc_status=None,
            response_flags="-",
        )  # fmt: skip
        reference.observe(int(size))
    ours, theirs = scrape(registry), scrape(reference_registry)
    for suffix in ("_bucket", "_count", "_sum"):
        name = "istio_response_bytes" + suffix
        assert [(s.labels.get("le"), s.value) for s in ours[name]] == [
            (s.labels.get("le"), s.value) for s in theirs[name]
        ], name


def test_label_names_are_the_istio_set_in_a_fixed_order() -> None:
    assert len(LABEL_NAMES) == len(set(LABEL_NAMES)) == len(ISTIO_STANDARD_LABELS)
    assert set(LABEL_NAMES) == ISTIO_STANDARD_LABELS


def test_unknown_client_and_no_endpoint() -> None:
    labels = dict(
        zip(
            LABEL_NAMES,
            request_labels(request(), 503, source=None, destination=None, response_flags="UH"),
            strict=True,
        )
    )
    # The mTLS identity still names the client's principal and namespace.
    assert labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert labels["source_workload_namespace"] == "default"
    for name in ("source_workload", "source_app", "source_version", "source_cluster"):
        assert labels[name] == "unknown"
    for name in ("destination_workload", "destination_principal", "destination_app", "destination_cluster"):
        assert labels[name] == "unknown"
    assert labels["destination_service_name"] == "reviews"
    assert (labels["response_code"], labels["response_flags"]) == ("503", "UH")


def test_no_identity_at_all_is_unknown() -> None:
    labels = dict(
        zip(
            LABEL_NAMES,
            request_labels(request(identity=None), 200, source=None, destination=None),
            strict=True,
        )
    )
    assert labels["source_principal"] == labels["source_workload_namespace"] == "unknown"


def test_source_without_principal_takes_the_mtls_identity() -> None:
    source = SourceInfo(workload="sleep", namespace="default")
    values = request_labels(request(), 200, source=source, destination=None)
    assert dict(zip(LABEL_NAMES, values, strict=True))["source_principal"] == str(CLIENT)


def test_route_backend_service_is_the_destination_service() -> None:
    backend = service_ref("reviews-canary")
    values = request_labels(request(), 200, source=None, destination=None, service=backend)
    labels = dict(zip(LABEL_NAMES, values, strict=True))
    assert labels["destination_service"] == "reviews-canary.bookinfo.svc.cluster.local"
    assert labels["destination_service_name"] == "reviews-canary"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (200, "200"),
        (101, "101"),
        (599, "599"),
        (0, "unknown"),
        (-1, "unknown"),
        (600, "unknown"),
        (99, "unknown"),
    ],
)
def test_response_code_label(code: int, expected: str) -> None:
    assert response_code_label(code) == expected


@pytest.mark.parametrize(
    ("grpc", "status", "code", "expected"),
    [
        (False, None, 200, ""),
        (False, "0", 200, ""),  # a grpc-status on a plain HTTP request is not a gRPC status
        (True, "0", 200, "0"),
        (True, "16", 200, "16"),
        (True, " 14 ", 200, "14"),
        (True, "17", 200, "unknown"),
        (True, "OK", 200, "unknown"),
        (True, "", 200, "unknown"),
        (True, None, 200, "2"),  # gRPC response without grpc-status: UNKNOWN
        (True, None, 503, "14"),  # UNAVAILABLE, gRPC's HTTP mapping
        (True, None, 403, "7"),
        (True, None, 404, "12"),
        (True, None, 418, "2"),
        (True, None, 0, "unknown"),  # no response at all
    ],
)
def test_grpc_status_label(grpc: bool, status: str | None, code: int, expected: str) -> None:
    assert grpc_status_label(grpc, status, code) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("-", "-"),
        ("", "-"),
        ("UH", "UH"),
        ("UT,URX", "UT,URX"),
        ("DPE", "DPE"),
        ("XYZ", "unknown"),
        ("UH,bad", "unknown"),
    ],
)
def test_response_flags_label(flags: str, expected: str) -> None:
    assert response_flags_label(flags) == expected


def test_grpc_request_labels() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    grpc_request = request(grpc=True, protocol="HTTP/2", service=service_ref(protocol=AppProtocol.GRPC))
    metrics.record(
        grpc_request,
        200,
        0.001,
        5,
        7,
        endpoint=endpoint(),
        source_workload=SLEEP,
        grpc_status="5",
        response_flags="-",
    )
    [total] = scrape(registry)["istio_requests_total"]
    assert (total.labels["request_protocol"], total.labels["grpc_response_status"]) == ("grpc", "5")


def test_same_labels_accumulate_and_different_codes_split() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    for code in (200, 200, 404, 200):
        metrics.record(
            request(),
            code,
            0.001,
            0,
            0,
            endpoint=endpoint(),
            source_workload=SLEEP,
            grpc_status=None,
            response_flags="-",
        )
    totals = {s.labels["response_code"]: s.value for s in scrape(registry)["istio_requests_total"]}
    assert totals == {"200": 3, "404": 1}


def test_negative_inputs_are_clamped() -> None:
    registry = CollectorRegistry()
    WaypointMetrics(registry).record(
        request(),
        200,
        -1.0,
        -5,
        -5,
        endpoint=None,
        source_workload=None,
        grpc_status=None,
        response_flags="-",
    )
    samples = scrape(registry)
    assert samples["istio_request_duration_milliseconds_sum"][0].value == 0
    assert samples["istio_request_bytes_sum"][0].value == 0


def test_an_explicit_destination_wins_over_the_endpoint() -> None:
    registry = CollectorRegistry()
    remote = DestinationInfo(workload="reviews-v9", namespace="bookinfo", cluster="east")
    WaypointMetrics(registry).record(
        request(),
        200,
        0.001,
        0,
        0,
        endpoint=endpoint(),
        source_workload=SLEEP,
        grpc_status=None,
        response_flags="-",
        destination=remote,
    )
    [total] = scrape(registry)["istio_requests_total"]
    assert (total.labels["destination_workload"], total.labels["destination_cluster"]) == (
        "reviews-v9",
        "east",
    )
    assert total.labels["destination_principal"] == "unknown"


def test_two_waypoints_in_one_process_use_separate_registries() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    WaypointMetrics(first)
    WaypointMetrics(second)
    assert "istio_requests" in family_types(first) and "istio_requests" in family_types(second)
    assert isinstance(WaypointMetrics().registry, CollectorRegistry)


# --- workload details ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"app": "reviews", "version": "v2"}, ("reviews", "v2", "reviews", "v2")),
        (
            {
                "service.istio.io/canonical-name": "rev",
                "service.istio.io/canonical-revision": "r7",
                "app": "reviews",
            },
            ("rev", "r7", "reviews", ""),
        ),
        (
            {"app.kubernetes.io/name": "reviews", "app.kubernetes.io/version": "1.2"},
            ("reviews", "1.2", "reviews", "1.2"),
        ),
        ({}, ("reviews-v2", "latest", "", "")),  # Istio's fallbacks: workload name, "latest"
    ],
    ids=["app-version", "canonical-labels", "kubernetes-labels", "no-labels"],
)
def test_destination_from_endpoint_labels(
    labels: dict[str, str], expected: tuple[str, str, str, str]
) -> None:
    info = DestinationInfo.from_endpoint(endpoint(labels), cluster="Kubernetes")
    assert (info.canonical_service, info.canonical_revision, info.app, info.version) == expected
    assert info.principal == str(SERVER)
    assert (info.workload, info.namespace, info.cluster) == ("reviews-v2", "bookinfo", "Kubernetes")


def test_source_from_a_workload_of_the_state() -> None:
    workload = workload_pb2.Workload(
        uid="Kubernetes//Pod/default/sleep-abc",
        name="sleep-abc",
        namespace="default",
        trust_domain="cluster.local",
        service_account="sleep",
        workload_name="sleep",
        canonical_name="sleep",
        canonical_revision="v1",
        cluster_id="Kubernetes",
    )
    assert SourceInfo.from_workload(workload) == SLEEP
    other = SourceInfo.from_workload(workload, identity=SERVER)
    assert other.principal == str(SERVER)
    bare = SourceInfo.from_workload(workload_pb2.Workload(name="pod-x"))
    assert bare.label_values() == ("pod-x", *["unknown"] * 7)


# --- refusals ----------------------------------------------------------------------------------------


def refusals(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["reason"]: s.value for s in scrape(registry)["loom_waypoint_refused_total"]}


def test_refusal_reasons_start_at_zero_and_count() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    assert refusals(registry) == dict.fromkeys((r.value for r in RefusalReason), 0.0)
    metrics.refused(RefusalReason.RAPID_RESET)
    metrics.refused("rapid_reset")
    metrics.refused(RefusalReason.REQUEST_SMUGGLING)
    counted = refusals(registry)
    assert (counted["rapid_reset"], counted["request_smuggling"], counted["h2_flood"]) == (2, 1, 0)


def test_refusal_reasons_stay_bounded() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    metrics.refused("Not A Slug")
    metrics.refused("x" * 41)
    for index in range(MAX_EXTRA_REASONS + 5):
        metrics.refused(f"custom_{index}")
    metrics.refused("custom_0")  # an accepted extra reason keeps its series
    counted = refusals(registry)
    assert counted["other"] == 2 + 5
    assert counted["custom_0"] == 2
    assert len(counted) == len(RefusalReason) + MAX_EXTRA_REASONS


def test_exposition_is_the_registry_text() -> None:
    metrics = WaypointMetrics()
    assert b"# TYPE istio_requests_total counter" in metrics.exposition()
