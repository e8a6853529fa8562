"""Istio's TCP metrics and the one-line-per-connection access log: labels, response flags, and exactly
one record on normal exit, on an exception and on cancellation."""

from __future__ import annotations

import asyncio
import importlib.metadata
import ssl

import h2.exceptions
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from telemetry_builders import collect, fixed_time, service, state_with, workload

import loom
from loom.hbone.errors import HboneConnectTimeout, HboneRejected, IdentityMismatch, TrustDomainMismatch
from loom.identity import Identity
from ztunnel.connections import CloseReason, Direction
from ztunnel.identity import CertificateUnavailable
from ztunnel.telemetry.access_log import OFF, TextFormatter
from ztunnel.telemetry.metrics import (
    LABEL_NAMES,
    ConnectionFailure,
    ConnectionResult,
    ErrorClassifier,
    ProxyMetrics,
    ResponseFlag,
    traffic_labels,
)

pytestmark = pytest.mark.timeout(30)

CURL = Identity("cluster.local", "default", "curl")
PRODUCTPAGE = Identity("cluster.local", "default", "bookinfo-productpage")

STATE = state_with(
    workload(
        "curl-5b549b49b8-jd8rs",
        "10.244.1.12",
        service_account="curl",
        canonical=("curl", "v1"),
        workload_name="curl",
    ),
    workload(
        "productpage-v1-d5789fdfb-8x8kq",
        "10.244.1.10",
        service_account="bookinfo-productpage",
        canonical=("productpage", "v1"),
        workload_name="productpage-v1",
        services={"productpage": [(9080, 9080)]},
    ),
    service("productpage", "10.96.0.20", ports=[(9080, 9080)]),
)
SOURCE = STATE.workload("Kubernetes//Pod/default/curl-5b549b49b8-jd8rs")
DESTINATION = STATE.workload("Kubernetes//Pod/default/productpage-v1-d5789fdfb-8x8kq")
SERVICE = STATE.service("default/productpage.default.svc.cluster.local")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: FakeClock) -> ProxyMetrics:
    return ProxyMetrics(registry, tag="1.2.3", clock=clock)


def outbound(metrics: ProxyMetrics) -> ConnectionResult:
    return metrics.connection(
        Direction.OUTBOUND,
        src_addr=("10.244.1.12", 60059),
        dst_addr=("10.244.1.10", 15008),
        source=SOURCE,
        destination=DESTINATION,
        service=SERVICE,
        source_identity=CURL,
        destination_identity=PRODUCTPAGE,
        hbone_addr="10.244.1.10:9080",
        mtls=True,
    )


OUTBOUND_LABELS = {
    "reporter": "source",
    "source_workload": "curl",
    "source_canonical_service": "curl",
    "source_canonical_revision": "v1",
    "source_workload_namespace": "default",
    "source_principal": "spiffe://cluster.local/ns/default/sa/curl",
    "source_app": "curl",
    "source_version": "v1",
    "source_cluster": "Kubernetes",
    "destination_service": "productpage.default.svc.cluster.local",
    "destination_service_namespace": "default",
    "destination_service_name": "productpage",
    "destination_workload": "productpage-v1",
    "destination_canonical_service": "productpage",
    "destination_canonical_revision": "v1",
    "destination_workload_namespace": "default",
    "destination_principal": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    "destination_app": "productpage",
    "destination_version": "v1",
    "destination_cluster": "Kubernetes",
    "request_protocol": "tcp",
    "response_flags": "-",
    "connection_security_policy": "mutual_tls",
}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    full = {**OUTBOUND_LABELS, **labels}
    return registry.get_sample_value(name, full) or 0.0


def access_lines(records: list) -> list[str]:  # type: ignore[type-arg]
    return [TextFormatter().format(fixed_time(r)) for r in records]


# ------------------------------------------------------------------ labels


def test_outbound_labels_are_istios() -> None:
    labels = traffic_labels(Direction.OUTBOUND, SOURCE, DESTINATION, SERVICE, CURL, PRODUCTPAGE, True)
    assert dict(zip(LABEL_NAMES, labels, strict=True)) == OUTBOUND_LABELS


def test_inbound_plaintext_labels_fill_unknown() -> None:
    labels = traffic_labels(Direction.INBOUND, None, DESTINATION, None, None, PRODUCTPAGE, False)
    got = dict(zip(LABEL_NAMES, labels, strict=True))
    assert got["reporter"] == "destination"
    assert got["connection_security_policy"] == "unknown"
    for name in LABEL_NAMES:
        if name.startswith(("source_", "destination_service")):
            assert got[name] == "unknown", name
    assert got["destination_workload"] == "productpage-v1"
    assert got["destination_principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


def test_workload_without_canonical_labels_or_workload_name() -> None:
    bare = workload("raw", "10.0.0.9").workload
    bare.workload_name = ""
    labels = dict(
        zip(LABEL_NAMES, traffic_labels(Direction.INBOUND, bare, None, None, None, None, False), strict=True)
    )
    assert labels["source_workload"] == "raw"  # falls back to the pod name
    assert labels["source_canonical_service"] == labels["source_app"] == "unknown"
    assert labels["destination_workload"] == "unknown"


# ------------------------------------------------------------------ one record per connection


def test_normal_exit_records_one_line_and_the_counters(
    metrics: ProxyMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    with collect("access") as collected, outbound(metrics) as result:
        assert value(registry, "istio_tcp_connections_opened_total") == 1
        result.add_sent(50)
        result.add_received(100)
        result.record_bytes(80, 175)
        clock.now += 0.0013
    assert value(registry, "istio_tcp_connections_closed_total") == 1
    assert value(registry, "istio_tcp_connections_failed_total") == 0
    assert value(registry, "istio_tcp_sent_bytes_total") == 80
    assert value(registry, "istio_tcp_received_bytes_total") == 175
    assert access_lines(collected.records) == [
        "2024-05-04T09:59:05.028709Z\tinfo\taccess\tconnection complete\t"
        'src.addr=10.244.1.12:60059 src.workload="curl-5b549b49b8-jd8rs" src.namespace="default" '
        'src.identity="spiffe://cluster.local/ns/default/sa/curl" dst.addr=10.244.1.10:15008 '
        'dst.hbone_addr="10.244.1.10:9080" dst.service="productpage.default.svc.cluster.local" '
        'dst.workload="productpage-v1-d5789fdfb-8x8kq" dst.namespace="default" '
        'dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage" direction="outbound" '
        'bytes_sent=80 bytes_recv=175 duration="1ms"'
    ]
    result.finish()  # idempotent: no second line, no second close
    assert len(collected.records) == 1
    assert value(registry, "istio_tcp_connections_closed_total") == 1


def test_exception_exit_classifies_counts_logs_once_and_propagates(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    with collect("access") as collected, pytest.raises(ConnectionRefusedError), outbound(metrics) as result:
        raise ConnectionRefusedError("connection refused by 10.244.1.10:15008")
    assert result.outcome == (ResponseFlag.CONNECT, "connection refused by 10.244.1.10:15008")
    assert value(registry, "istio_tcp_connections_closed_total", response_flags="CONNECT") == 1
    assert value(registry, "istio_tcp_connections_failed_total", response_flags="CONNECT") == 1
    assert value(registry, "istio_tcp_connections_closed_total") == 0
    (line,) = access_lines(collected.records)
    assert line.startswith("2024-05-04T09:59:05.028709Z\terror\taccess\tconnection failed\tsrc.addr=")
    assert line.endswith(
        'bytes_sent=0 bytes_recv=0 duration="0ms" error="connection refused by 10.244.1.10:15008"'
    )


async def test_cancellation_records_one_line(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    started = asyncio.Event()
    result = outbound(metrics)

    async def copy() -> None:
        async with result:
            result.add_sent(10)
            started.set()
            await asyncio.Event().wait()

    with collect("access") as collected:
        task = asyncio.create_task(copy())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert result.outcome == (ResponseFlag.NONE, "connection cancelled")
    assert value(registry, "istio_tcp_connections_closed_total") == 1
    assert value(registry, "istio_tcp_connections_failed_total") == 1
    (line,) = access_lines(collected.records)
    assert line.endswith('bytes_sent=10 bytes_recv=0 duration="0ms" error="connection cancelled"')


async def test_late_rejection_is_recorded_as_deny(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    started = asyncio.Event()
    result = outbound(metrics)

    async def copy() -> None:
        async with result:
            started.set()
            await asyncio.Event().wait()

    with collect("access") as collected:
        task = asyncio.create_task(copy())
        await started.wait()
        result.closing(CloseReason.LATE_REJECTION)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert value(registry, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    (line,) = access_lines(collected.records)
    assert line.endswith('error="late rejection: connection closed due to policy change"')


def test_explicit_failure_wins_over_later_outcomes(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    with collect("access") as collected, pytest.raises(ConnectionResetError), outbound(metrics) as result:
        result.fail("policy rejection: denied by policy default/deny-all", ResponseFlag.DENY)
        result.closing(CloseReason.DRAIN_TIMEOUT)
        raise ConnectionResetError("reset")
    assert result.outcome == (ResponseFlag.DENY, "policy rejection: denied by policy default/deny-all")
    assert value(registry, "istio_tcp_connections_failed_total", response_flags="DENY") == 1
    assert access_lines(collected.records)[0].endswith(
        'error="policy rejection: denied by policy default/deny-all"'
    )


def test_closing_without_an_exception_still_records_the_reason(metrics: ProxyMetrics) -> None:
    with collect("access") as collected, outbound(metrics) as result:
        result.closing(CloseReason.DRAIN_TIMEOUT)
    assert result.outcome == (ResponseFlag.NONE, "connection closed at the drain deadline")
    assert "connection failed" in access_lines(collected.records)[0]


def test_unknown_fields_are_omitted_from_the_line(metrics: ProxyMetrics) -> None:
    result = metrics.connection(
        Direction.INBOUND,
        src_addr="10.244.2.7:40000",
        dst_addr=("10.244.1.10", 9080),
        destination=DESTINATION,
        destination_identity=PRODUCTPAGE,
    )
    with collect("access") as collected, result:
        pass
    assert access_lines(collected.records) == [
        "2024-05-04T09:59:05.028709Z\tinfo\taccess\tconnection complete\t"
        'src.addr=10.244.2.7:40000 dst.addr=10.244.1.10:9080 dst.workload="productpage-v1-d5789fdfb-8x8kq" '
        'dst.namespace="default" dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage" '
        'direction="inbound" bytes_sent=0 bytes_recv=0 duration="0ms"'
    ]


def test_ipv6_addresses_are_bracketed(metrics: ProxyMetrics) -> None:
    result = metrics.connection(Direction.OUTBOUND, src_addr=("fd00::1", 5000), dst_addr=("fd00::2", 15008))
    with collect("access") as collected, result:
        pass
    assert "src.addr=[fd00::1]:5000 dst.addr=[fd00::2]:15008 " in access_lines(collected.records)[0]


def test_metrics_are_recorded_when_the_access_log_is_off(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    with collect("access", OFF) as collected, outbound(metrics):
        pass
    assert collected.records == []
    assert value(registry, "istio_tcp_connections_closed_total") == 1


def test_record_bytes_refuses_totals_below_what_was_counted(metrics: ProxyMetrics) -> None:
    with collect("access"), outbound(metrics) as result:
        result.add_sent(10)
        with pytest.raises(ValueError, match=r"below what was already counted \(10, 0\)"):
            result.record_bytes(5, 0)
        result.add_sent(-3)  # ignored: counters never go down
        assert (result.bytes_sent, result.bytes_received) == (10, 0)


# ------------------------------------------------------------------ response flags


@pytest.mark.parametrize(
    ("error", "flag"),
    [
        pytest.param(HboneRejected(401, "10.0.0.1:80"), ResponseFlag.DENY, id="hbone 401 is a policy denial"),
        pytest.param(
            HboneRejected(503, "10.0.0.1:80"), ResponseFlag.CONNECT, id="hbone 503 is a connect failure"
        ),
        pytest.param(
            HboneConnectTimeout("10.0.0.1:15008", 5), ResponseFlag.NETWORK_POLICY, id="15008 timeout"
        ),
        pytest.param(
            IdentityMismatch(CURL, frozenset({PRODUCTPAGE})),
            ResponseFlag.IDENTITY_ERROR,
            id="wrong peer identity",
        ),
        pytest.param(
            TrustDomainMismatch(CURL, "other.local"), ResponseFlag.IDENTITY_ERROR, id="foreign trust domain"
        ),
        pytest.param(
            CertificateUnavailable("no certificate"), ResponseFlag.IDENTITY_ERROR, id="no own certificate"
        ),
        pytest.param(ssl.SSLError(1, "handshake failure"), ResponseFlag.TLS_FAILURE, id="tls"),
        pytest.param(h2.exceptions.ProtocolError("bad frame"), ResponseFlag.H2_HANDSHAKE_FAILURE, id="h2"),
        pytest.param(ConnectionResetError("reset"), ResponseFlag.CONNECT, id="socket error"),
        pytest.param(
            ConnectionFailure(ResponseFlag.DENY, "denied"), ResponseFlag.DENY, id="carries its flag"
        ),
        pytest.param(ValueError("bug"), ResponseFlag.NONE, id="anything else"),
    ],
)
def test_error_classification(error: BaseException, flag: ResponseFlag) -> None:
    assert ErrorClassifier()(error) is flag


def test_extra_classifier_rules_come_first() -> None:
    classifier = ErrorClassifier([(ConnectionResetError, ResponseFlag.NETWORK_POLICY)])
    assert classifier(ConnectionResetError()) is ResponseFlag.NETWORK_POLICY
    assert classifier(ConnectionRefusedError()) is ResponseFlag.CONNECT


def test_exception_without_message_is_named_by_type(metrics: ProxyMetrics) -> None:
    with collect("access"), pytest.raises(TimeoutError), outbound(metrics) as result:
        raise TimeoutError
    assert result.outcome == (ResponseFlag.CONNECT, "TimeoutError")


# ------------------------------------------------------------------ label cache and exposition


def test_label_sets_are_cached_per_proto_and_follow_updates(metrics: ProxyMetrics) -> None:
    first, second = outbound(metrics), outbound(metrics)
    assert first.labels == second.labels == OUTBOUND_LABELS
    assert len(metrics._cache) == 1

    updated = workload(
        "productpage-v1-d5789fdfb-8x8kq",
        "10.244.1.10",
        service_account="bookinfo-productpage",
        canonical=("productpage", "v2"),
        workload_name="productpage-v1",
    ).workload
    result = metrics.connection(
        Direction.OUTBOUND,
        src_addr="10.244.1.12:1",
        dst_addr="10.244.1.10:15008",
        source=SOURCE,
        destination=updated,
        service=SERVICE,
        source_identity=CURL,
        destination_identity=PRODUCTPAGE,
        mtls=True,
    )
    assert result.labels["destination_canonical_revision"] == "v2"
    assert len(metrics._cache) == 1, "the entry for this key was replaced, not added"


def test_label_cache_is_bounded(registry: CollectorRegistry) -> None:
    metrics = ProxyMetrics(registry, tag="t", label_cache_size=2)
    for i in range(5):
        pod = workload(f"pod-{i}", f"10.0.0.{i + 1}").workload
        metrics.connection(Direction.INBOUND, src_addr="10.9.9.9:1", dst_addr="10.0.0.1:80", destination=pod)
    assert len(metrics._cache) == 2
    with pytest.raises(ValueError, match="label_cache_size"):
        ProxyMetrics(CollectorRegistry(), label_cache_size=0)


def test_exposition_matches_istio(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    with collect("access"), outbound(metrics) as result:
        result.record_bytes(3, 4)
    text = prometheus_client.generate_latest(registry).decode()
    assert "_created" not in text
    assert 'istio_build{component="ztunnel",tag="1.2.3"} 1.0' in text
    samples = {
        sample.name: (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples["istio_tcp_connections_opened_total"] == (OUTBOUND_LABELS, 1.0)
    assert samples["istio_tcp_connections_closed_total"] == (OUTBOUND_LABELS, 1.0)
    assert samples["istio_tcp_sent_bytes_total"] == (OUTBOUND_LABELS, 3.0)
    assert samples["istio_tcp_received_bytes_total"] == (OUTBOUND_LABELS, 4.0)
    assert "# TYPE istio_tcp_connections_failed_total counter" in text


def test_default_tag_is_the_package_version(registry: CollectorRegistry) -> None:
    ProxyMetrics(registry)
    samples = next(s for s in registry.collect() if s.name == "istio_build").samples
    assert samples[0].labels["component"] == "ztunnel"
    assert samples[0].labels["tag"] == loom.__version__ == importlib.metadata.version("loom-mesh")
