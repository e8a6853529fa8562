"""Retries, timeouts, failing and missing endpoints, connection reuse and expiry, L4 tunnels, refusals."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from loom.hbone import Decision, HboneError, HboneRejected, TunnelRequest
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import tcp_connector
from tests.integration.waypoint_proxy.waypoint_harness import (
    DB,
    TCP_VIP,
    VIP,
    WAIT,
    WEB,
    WEB_V2,
    Backend,
    H1Client,
    mesh,
)
from waypoint.model import Endpoint, Forward, RetryPolicy, WeightedBackend
from waypoint.proxy import Destination, ProxyLimits

RETRY_5XX = RetryPolicy(attempts=2, on_status=frozenset(range(500, 600)), backoff=0.001)
NO_RETRY = RetryPolicy()


def forward_web(retry: RetryPolicy = NO_RETRY, timeout: float | None = None) -> Forward:
    return Forward((WeightedBackend(WEB, 1),), retry=retry, timeout=timeout)


async def test_retry_recovers_from_a_failing_endpoint(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        failing = await m.add_backend("10.3.0.1", fail_status=503)
        healthy = await m.add_backend("10.3.0.2")
        m.serve(WEB, VIP, failing, healthy)
        m.router.fn = lambda view: forward_web(RETRY_5XX)
        client = H1Client(await m.tunnel())
        response = await client.request("GET", "/retry-me")
        assert response.status == 200 and json.loads(response.body)["pod"] == "pod-10.3.0.2"
        assert (failing.requests, healthy.requests) == (1, 1)
        assert m.picker.reports == [("10.3.0.1", False), ("10.3.0.2", True)]
    (record,) = m.observer.records
    assert record.attempts == 2 and record.endpoint is not None and record.endpoint.ip == "10.3.0.2"
    assert record.response_flags == "-"


async def test_weighted_split_between_two_services(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        v1 = await m.add_backend("10.3.0.20")
        v2 = await m.add_backend("10.3.0.21")
        m.serve(WEB, VIP, v1)
        m.picker.endpoints[WEB_V2.hostname] = [v2.endpoint()]
        m.router.fn = lambda view: Forward(
            (WeightedBackend(WEB, 90), WeightedBackend(WEB_V2, 10)), route="r/canary"
        )
        client = H1Client(await m.tunnel())
        pods: Counter[str] = Counter()
        for _ in range(300):
            pods[json.loads((await client.request("GET", "/split")).body)["pod"]] += 1
        # The rng is seeded: the split is deterministic, and within a few percent of 90/10.
        assert pods["pod-10.3.0.20"] + pods["pod-10.3.0.21"] == 300
        assert 250 <= pods["pod-10.3.0.20"] <= 290
    assert {r.backend for r in m.observer.records} == {WEB, WEB_V2}


async def test_status_retries_exhausted_return_the_last_answer(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.3.0.3")
        m.serve(WEB, VIP, backend)
        m.router.fn = lambda view: forward_web(RETRY_5XX)
        client = H1Client(await m.tunnel())
        response = await client.request("GET", "/status/503")
        assert response.status == 503
        assert backend.requests == 3  # 1 + 2 retries, the same (only) endpoint again
        # POST is not idempotent: never retried.
        posted = await client.request("POST", "/status/503", body=b"data")
        assert posted.status == 503 and backend.requests == 4
    assert [r.response_flags for r in m.observer.records] == ["URX", "-"]


async def test_request_with_a_body_beyond_the_retry_buffer_is_not_retried(tmp_path: Path) -> None:
    async with mesh(tmp_path, limits=ProxyLimits(retry_buffer=1024, body_buffer=1024)) as m:
        failing = await m.add_backend("10.3.0.4", fail_status=500)
        healthy = await m.add_backend("10.3.0.5")
        m.serve(WEB, VIP, failing, healthy)
        m.router.fn = lambda view: forward_web(RETRY_5XX)
        client = H1Client(await m.tunnel())
        small = await client.request("PUT", "/small", body=b"s" * 500)
        assert small.status == 200  # replayed to the healthy endpoint
        big = await client.request("PUT", "/big", body=[b"b" * 4096] * 8)
        assert big.status == 500  # 32 KiB went to the first endpoint; it cannot be sent again
        assert json.loads(small.body)["body_bytes"] == 500


async def test_connect_failure_is_retried_then_503_uf(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        healthy = await m.add_backend("10.3.0.6")
        unreachable = Endpoint("10.3.0.99", 8080, healthy.certificate.identity)  # nothing listens there
        m.resolver.destinations[(VIP, 80)] = Destination(WEB)
        m.picker.endpoints[WEB.hostname] = [unreachable, healthy.endpoint()]
        m.router.fn = lambda view: forward_web(RetryPolicy(attempts=1, backoff=0.001))
        client = H1Client(await m.tunnel())
        assert (await client.request("GET", "/a")).status == 200
        m.picker.endpoints[WEB.hostname] = [unreachable]
        failed = await client.request("GET", "/b")
        assert failed.status == 503 and failed.body.startswith(b"upstream connect error")
    assert m.observer.records[-1].response_flags == "UF"
    assert ("10.3.0.99", False) in m.picker.reports


async def test_endpoint_with_another_identity_is_never_sent_the_request(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.3.0.15")
        impostor = Endpoint("10.3.0.15", 8080, m.pki.issue("default", "someone-else").identity)
        m.resolver.destinations[(VIP, 80)] = Destination(WEB)
        m.picker.endpoints[WEB.hostname] = [impostor]
        response = await H1Client(await m.tunnel()).request("GET", "/secret")
        assert response.status == 503
        assert backend.tunnels == [] and backend.requests == 0
        assert m.proxy.hbone_pool.stats.dial_failures["identity_mismatch"] == 1
    assert m.observer.records[0].response_flags == "UF"


async def test_per_try_timeout_moves_on_and_the_route_timeout_gives_504(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        hanging = await m.add_backend("10.3.0.7", hang=True)
        healthy = await m.add_backend("10.3.0.8")
        m.serve(WEB, VIP, hanging, healthy)
        retry = RetryPolicy(attempts=1, per_try_timeout=0.2, backoff=0.001)
        m.router.fn = lambda view: forward_web(retry, timeout=5.0)
        client = H1Client(await m.tunnel())
        response = await client.request("GET", "/slow-first")
        assert response.status == 200 and json.loads(response.body)["pod"] == "pod-10.3.0.8"
        m.picker.endpoints[WEB.hostname] = [hanging.endpoint()]
        m.router.fn = lambda view: forward_web(timeout=0.3)
        timed_out = await H1Client(await m.tunnel()).request("GET", "/hang")
        assert timed_out.status == 504 and timed_out.body == b"upstream request timeout"
    assert m.observer.records[-1].response_flags == "UT"


async def test_no_endpoint_is_503_uh(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        m.resolver.destinations[(VIP, 80)] = Destination(WEB)
        response = await H1Client(await m.tunnel()).request("GET", "/")
        assert (response.status, response.body) == (503, b"no healthy upstream")
    assert m.observer.records[0].response_flags == "UH"


async def test_workload_addressed_traffic_goes_to_that_workload(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        first = await m.add_backend("10.3.0.9")
        second = await m.add_backend("10.3.0.10")
        m.serve(WEB, VIP, first, second)
        m.resolver.destinations[("10.3.0.10", 8080)] = Destination(WEB, second.endpoint())
        client = H1Client(await m.tunnel("10.3.0.10:8080"))
        for _ in range(3):
            response = await client.request("GET", "/pinned")
            assert json.loads(response.body)["pod"] == "pod-10.3.0.10"
        assert first.requests == 0


async def test_idle_upstream_connections_expire(tmp_path: Path) -> None:
    async with mesh(tmp_path, limits=ProxyLimits(upstream_idle_timeout=0.2)) as m:
        backend = await m.add_backend("10.3.0.11")
        m.serve(WEB, VIP, backend)
        client = H1Client(await m.tunnel())
        assert (await client.request("GET", "/one")).status == 200
        assert m.proxy.pools.open_connections() == 1
        await eventually(lambda: m.proxy.pools.stats.expired == 1, within=WAIT, what="idle expiry")
        assert m.proxy.pools.open_connections() == 0
        assert (await client.request("GET", "/two")).status == 200
        assert m.proxy.pools.stats.opened == 2


async def test_unknown_destination_is_refused_and_nothing_is_dialled(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.3.0.12")
        m.serve(WEB, VIP, backend)
        with pytest.raises(HboneRejected) as refused:
            await m.tunnel("10.96.99.99:80")
        assert refused.value.status == 404
        assert m.observer.refusals["unknown_destination"] == 1
        assert backend.tunnels == [] and m.proxy.server.stats.requests_rejected["unknown_destination"] == 1


async def test_tcp_service_is_spliced_at_l4_with_policy(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.3.0.13")
        m.resolver.destinations[(TCP_VIP, 5432)] = Destination(DB)
        m.picker.endpoints[DB.hostname] = [backend.endpoint(5432)]
        backend.server.handler = _echo_to(backend)
        tunnel = await m.tunnel(f"{TCP_VIP}:5432")
        tunnel.write(b"ping over l4\n")
        tunnel.write_eof()
        echoed = bytearray()
        while data := await asyncio.wait_for(tunnel.read(), WAIT):
            echoed += data
        assert bytes(echoed) == b"ping over l4\n"
        (view,) = m.l4_decisions
        assert view.source.identity == m.client_cert.identity and view.destination_port == 5432
        assert backend.tunnels[0].peer_identity == m.waypoint_cert.identity
        await eventually(lambda: len(m.observer.tunnels) == 1, within=WAIT, what="tunnel record")
        record = m.observer.tunnels[0]
        assert (record.received, record.sent, record.response_flags) == (13, 13, "-")
        m.l4_allow = False
        with pytest.raises(HboneRejected) as denied:
            await m.tunnel(f"{TCP_VIP}:5432")
        assert denied.value.status == 401
        assert m.observer.tunnels[-1].response_flags == "DENY"
        assert len(backend.tunnels) == 1


def _echo_to(backend: Backend) -> Callable[[TunnelRequest], Awaitable[Decision]]:
    """The backend's HBONE handler, recording tunnels, dialling the workload (which echoes TCP)."""

    async def handle(request: TunnelRequest) -> Decision:
        backend.tunnels.append(request)
        return Decision(200, tcp_connector(backend.app_address))

    return handle


async def test_stop_drains_and_closes(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.3.0.14")
        m.serve(WEB, VIP, backend)
        busy_tunnel, idle_tunnel = await m.tunnel(), await m.tunnel()
        idle = H1Client(idle_tunnel)
        assert (await idle.request("GET", "/before")).status == 200
        slow = asyncio.ensure_future(H1Client(busy_tunnel).request("GET", "/slow?delay_ms=300"))
        await eventually(
            lambda: m.proxy.active_sessions == 2 and backend.requests == 1, within=WAIT, what="busy"
        )
        stopping = asyncio.ensure_future(m.proxy.stop(grace=60.0))
        # The idle keep-alive connection is closed at once; the busy one after its response.
        assert await asyncio.wait_for(idle_tunnel.read(), WAIT) == b""
        assert (await slow).status == 200
        assert await asyncio.wait_for(busy_tunnel.read(), WAIT) == b""
        for tunnel in (idle_tunnel, busy_tunnel):
            tunnel.write_eof()  # as a client's ztunnel relays its application's close
        await asyncio.wait_for(stopping, WAIT)  # long before the grace: nothing was left open
        assert m.proxy.active_sessions == 0
        with pytest.raises((HboneError, OSError)):
            await m.tunnel()
