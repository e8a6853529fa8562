"""The admin (:15000), metrics (:15020) and readiness (:15021) servers, live on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ztunnel_admin_harness import PRODUCTPAGE, AdminHarness, running_admin

from ztunnel.admin import AdminServer, AdminSources
from ztunnel.connections import Direction

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[AdminHarness]:
    async with running_admin(tmp_path, blockers=("xds", "inpod")) as h:
        yield h


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get(http: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def test_config_dump_shape(harness: AdminHarness, http: aiohttp.ClientSession) -> None:
    status, body = await get(http, harness.admin.port, "/config_dump")
    assert status == 200
    dump = json.loads(body)
    assert list(dump) == [
        "workloads",
        "services",
        "policies",
        "certificates",
        "workloadState",
        "connections",
        "rejected",
    ]
    assert [w["name"] for w in dump["workloads"]] == [
        "productpage-v1-aaa",
        "reviews-v1-bbb",
        "reviews-v2-ccc",
        "waypoint-ddd",
        "legacy-eee",
    ]
    for entry in dump["workloads"]:
        assert {
            "workloadIps",
            "protocol",
            "uid",
            "name",
            "namespace",
            "trustDomain",
            "serviceAccount",
        } <= set(entry)
        assert {"workloadName", "workloadType", "canonicalName", "canonicalRevision", "node"} <= set(entry)
        assert {"nativeTunnel", "status", "clusterId", "services"} <= set(entry)
    reviews = next(w for w in dump["workloads"] if w["name"] == "reviews-v1-bbb")
    assert reviews["waypoint"] == {"destination": "default/waypoint.default.svc.cluster.local", "port": 15008}
    assert [s["name"] for s in dump["services"]] == ["productpage", "reviews", "waypoint"]
    assert dump["services"][1]["vips"] == ["/10.96.0.10"]
    assert len(dump["services"][1]["endpoints"]) == 2
    assert [(p["namespace"], p["name"], p["scope"], p["action"]) for p in dump["policies"]] == [
        ("default", "allow-curl", "WorkloadSelector", "Allow"),
        ("default", "deny-legacy", "Namespace", "Deny"),
        ("istio-system", "audit", "Global", "Deny"),
    ]
    (cert,) = dump["certificates"]
    assert cert["identity"] == str(PRODUCTPAGE)
    assert cert["state"] == "Available"
    assert len(cert["cert_chain"]) >= 1 and len(cert["root_certs"]) == 1
    assert set(cert["cert_chain"][0]) == {"pem", "serialNumber", "validFrom", "expirationTime"}
    assert sorted(dump["workloadState"]) == [
        "Kubernetes//Pod/default/productpage-v1-aaa",
        "Kubernetes//Pod/default/reviews-v1-bbb",
        "Kubernetes//Pod/default/waypoint-ddd",
    ]
    assert dump["workloadState"]["Kubernetes//Pod/default/productpage-v1-aaa"]["state"] == "Up"
    assert [(c["direction"], c["remote"]) for c in dump["connections"]] == [
        ("outbound", "10.244.1.99:15008"),
        ("inbound", "10.244.2.21:41234"),
    ]
    assert dump["rejected"] == {}


async def test_metrics_after_a_connection(harness: AdminHarness, http: aiohttp.ClientSession) -> None:
    state = harness.state
    result = harness.metrics.connection(
        Direction.INBOUND,
        src_addr=("10.244.2.21", 41234),
        dst_addr=("10.244.1.10", 9080),
        destination=state.workload("Kubernetes//Pod/default/productpage-v1-aaa"),
        destination_identity=PRODUCTPAGE,
        mtls=True,
    )
    with result:
        result.record_bytes(120, 4000)
    for path in ("/metrics", "/stats/prometheus"):
        status, body = await get(http, harness.metrics_server.port, path)
        assert status == 200
        assert "_created" not in body
        samples = {
            s.name: (s.labels, s.value)
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        labels, opened = samples["istio_tcp_connections_opened_total"]
        assert opened == 1
        assert labels["reporter"] == "destination"
        assert labels["destination_workload"] == "productpage-v1"
        assert labels["destination_principal"] == str(PRODUCTPAGE)
        assert labels["connection_security_policy"] == "mutual_tls"
        assert samples["istio_tcp_connections_closed_total"][1] == 1
        assert samples["istio_tcp_sent_bytes_total"][1] == 120
        assert samples["istio_tcp_received_bytes_total"][1] == 4000
        assert samples["istio_build"] == ({"component": "ztunnel", "tag": "test"}, 1.0)


async def test_readiness_503_then_200(harness: AdminHarness, http: aiohttp.ClientSession) -> None:
    port = harness.readiness_server.port
    assert await get(http, port, "/healthz/ready") == (503, "not ready, waiting for: inpod, xds\n")
    with harness.readiness.block("proxy"):
        assert await get(http, port, "/healthz/ready") == (503, "not ready, waiting for: inpod, proxy, xds\n")
    harness.blockers["xds"].release()
    assert await get(http, port, "/healthz/ready") == (503, "not ready, waiting for: inpod\n")
    harness.blockers["inpod"].release()
    assert await get(http, port, "/healthz/ready") == (200, "ready\n")


async def test_logging_levels_over_http(harness: AdminHarness, http: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{harness.admin.port}/logging"
    assert await get(http, harness.admin.port, "/logging") == (200, "current log level is info\n")
    async with http.post(base, params={"level": "access:debug,xds:warn"}) as response:
        assert (response.status, await response.text()) == (
            200,
            "current log level is info,access:debug,xds:warn\n",
        )
    assert logging.getLogger("access").isEnabledFor(logging.DEBUG)
    async with http.post(base, params={"level": "access:loud"}) as response:
        assert response.status == 400
        assert "unknown log level 'loud'" in await response.text()
    async with http.post(base, params={"level": "debug", "reset": ""}) as response:
        assert await response.text() == "current log level is debug\n"
    async with http.post(base) as response:
        assert response.status == 400
    async with http.post(base, params={"reset": ""}) as response:
        assert await response.text() == "current log level is info\n"
    assert not logging.getLogger("access").isEnabledFor(logging.DEBUG)


async def test_index_lists_the_endpoints(harness: AdminHarness, http: aiohttp.ClientSession) -> None:
    status, body = await get(http, harness.admin.port, "/")
    assert status == 200
    assert "/config_dump" in body and "POST /logging?level=" in body and "access, xds, inpod, ca" in body


async def test_without_log_control_logging_is_404(http: aiohttp.ClientSession) -> None:
    server = AdminServer(AdminSources(), "127.0.0.1", 0)
    await server.start()
    try:
        assert (await get(http, server.port, "/logging"))[0] == 404
        assert json.loads((await get(http, server.port, "/config_dump"))[1])["workloads"] == []
    finally:
        await server.stop()


async def test_a_busy_port_is_named(harness: AdminHarness) -> None:
    server = AdminServer(AdminSources(), "127.0.0.1", harness.admin.port)
    with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{harness.admin.port} \(admin\)"):
        await server.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
