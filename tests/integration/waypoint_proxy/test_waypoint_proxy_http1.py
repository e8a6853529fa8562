"""HTTP/1.1 through the waypoint on loopback: client HBONE -> WaypointProxy -> backend HBONE -> app."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.integration.waypoint_proxy.waypoint_harness import (
    VIP,
    WAIT,
    WEB,
    H1Client,
    exchange_until_close,
    mesh,
    raw_exchange,
    status_of,
)
from waypoint.model import (
    AuthzDecision,
    DirectResponse,
    Forward,
    HeaderEdits,
    Redirect,
    RequestView,
    RouteAction,
    WeightedBackend,
)


async def test_keep_alive_requests_reach_the_backend_with_the_waypoint_identity(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.1")
        m.serve(WEB, VIP, backend)
        client = H1Client(await m.tunnel())
        first = await client.request(
            "GET",
            "/hello?x=1",
            [
                ("x-request-id", "req-1"),
                ("user-agent", "t"),
                ("x-forwarded-client-cert", "By=spiffe://forged"),
            ],
        )
        second = await client.request("GET", "/again")
        assert (first.status, second.status) == (200, 200)
        seen = json.loads(first.body)
        assert seen["path"] == "/hello?x=1" and seen["authority"] == "web.default.svc.cluster.local"
        assert seen["headers"]["x-request-id"] == "req-1"  # propagated as received
        assert seen["headers"]["x-forwarded-proto"] == "http"
        assert "x-forwarded-client-cert" not in seen["headers"]  # a client cannot claim an identity
        assert seen["headers"]["traceparent"].startswith("00-")  # generated when missing
        generated = json.loads(second.body)["headers"]["x-request-id"]
        assert generated and generated != "req-1"
        # Both requests went over one upstream HTTP/1.1 connection (one HBONE tunnel to the backend).
        assert backend.workload is not None and backend.workload.stats.connections == 1
        assert m.proxy.pools.stats.reused == 1
        (tunnel,) = backend.tunnels
        assert tunnel.peer_identity == m.waypoint_cert.identity
        assert tunnel.authority == "10.1.0.1:8080"
    records = m.observer.records
    assert [r.response_code for r in records] == [200, 200]
    assert records[0].view.source.identity == m.client_cert.identity
    assert records[0].view.destination_ip == VIP and records[0].endpoint == backend.endpoint()
    assert records[0].response_flags == "-" and records[0].attempts == 1


async def test_chunked_upload_and_download_stream_through(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.2", scripted=True)
        m.serve(WEB, VIP, backend)
        client = H1Client(await m.tunnel())
        chunks = [bytes([i]) * 50_000 for i in range(40)]  # 2 MB, well over every buffer on the way
        echoed = await client.request("POST", "/echo", body=chunks)
        assert echoed.status == 200 and echoed.body == b"".join(chunks)
        assert echoed.headers.get("transfer-encoding") == "chunked"
        streamed = await client.request("GET", "/stream?n=64&size=32768")
        assert streamed.status == 200 and len(streamed.body) == 64 * 32768
        assert streamed.body[:3] == b"AAA" and streamed.body[-32768:] == bytes([65 + 63 % 26]) * 32768
        assert backend.scripted is not None and backend.scripted.body_bytes == 2_000_000
    record = m.observer.records[0]
    assert (record.request_bytes, record.response_bytes) == (2_000_000, 2_000_000)


async def test_trailers_pass_to_a_client_that_accepts_them(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.3", scripted=True)
        m.serve(WEB, VIP, backend)
        client = H1Client(await m.tunnel())
        response = await client.request("GET", "/trailers", [("te", "trailers")])
        assert (response.status, response.body, response.trailers) == (200, b"body", {"x-checksum": "abc"})


async def test_route_header_edits_and_rewrite_are_visible_at_the_backend(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.4")
        m.serve(WEB, VIP, backend)
        m.router.fn = lambda view: Forward(
            (WeightedBackend(WEB, 1),),
            route="default/web-route",
            request_headers=HeaderEdits(
                set=(("x-env", "canary"),), add=(("x-tag", "b"),), remove=("x-drop",)
            ),
            response_headers=HeaderEdits(set=(("x-served-by", "waypoint"),), remove=("server",)),
            rewrite_path="/v2/items",
            rewrite_authority="web-internal",
        )
        client = H1Client(await m.tunnel())
        response = await client.request(
            "GET", "/items?page=2", [("x-env", "prod"), ("x-tag", "a"), ("x-drop", "1")]
        )
        seen = json.loads(response.body)
        assert seen["path"] == "/v2/items?page=2" and seen["authority"] == "web-internal"
        assert seen["headers"]["x-env"] == "canary"
        assert seen["headers"]["x-tag"] == "a, b"
        assert "x-drop" not in seen["headers"]
        assert response.headers["x-served-by"] == "waypoint" and "server" not in response.headers
    assert m.observer.records[0].route == "default/web-route"


async def test_normalized_path_is_what_authz_routing_and_the_backend_see(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.5")
        m.serve(WEB, VIP, backend)
        client = H1Client(await m.tunnel())
        response = await client.request("GET", "//admin//panel?q=1")
        assert json.loads(response.body)["path"] == "/admin/panel?q=1"
        assert (
            m.authorizer.views[0].path == "/admin/panel"
            and m.authorizer.views[0].raw_path == "//admin//panel?q=1"
        )
        assert m.router.views[0].query == "q=1"
        # A path the normalizer refuses is a 400 and never reaches routing or the backend.
        raw = await raw_exchange(
            await m.tunnel(), b"GET /a/../admin HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        assert status_of(raw) == 400
        assert backend.requests == 1 and m.observer.refusals["bad_path"] == 1
        [refused] = m.observer.refused_requests
        assert (refused.status, refused.details, refused.method, refused.path, refused.authority) == (
            400,
            "path_normalization_failed",
            "GET",
            "/a/../admin",
            "web",
        )


async def test_denied_request_gets_403_and_never_reaches_the_backend(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.6")
        m.serve(WEB, VIP, backend)
        m.authorizer.fn = lambda view: AuthzDecision(
            view.path != "/admin", policy="default/deny-admin", reason="denied by DENY policy"
        )
        client = H1Client(await m.tunnel())
        denied = await client.request("GET", "/admin")
        assert (denied.status, denied.body) == (403, b"RBAC: access denied")
        allowed = await client.request("GET", "/public")  # same connection: still usable after a 403
        assert allowed.status == 200
        # A denied upload: answered without reading the body, so the connection is closed after it.
        tunnel = await m.tunnel()
        raw = await raw_exchange(
            tunnel,
            b"POST /admin HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
            within=3,
        )
        assert status_of(raw) == 403 and b"connection: close" in raw.lower()
        assert backend.requests == 1
    denied_record = m.observer.records[0]
    assert denied_record.response_code == 403
    assert denied_record.response_code_details == "rbac_access_denied_matched_policy[default/deny-admin]"
    assert denied_record.authz is not None and not denied_record.authz.allowed


async def test_redirect_and_direct_response(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.7")
        m.serve(WEB, VIP, backend)

        def route(view: RequestView) -> RouteAction:
            if view.path == "/old":
                return Redirect(301, "http://web.default.svc.cluster.local/new", route="default/r")
            if view.path == "/missing":
                return DirectResponse(404, b"no route matched", route="default/r")
            return Forward((WeightedBackend(WEB, 1),))

        m.router.fn = route
        client = H1Client(await m.tunnel())
        moved = await client.request("GET", "/old")
        assert moved.status == 301 and moved.headers["location"] == "http://web.default.svc.cluster.local/new"
        missing = await client.request("GET", "/missing")
        assert (missing.status, missing.body) == (404, b"no route matched")
        assert (await client.request("GET", "/new")).status == 200
        assert backend.requests == 1
    assert [r.response_code_details for r in m.observer.records] == [
        "redirect",
        "direct_response",
        "via_upstream",
    ]


async def test_expect_100_continue_is_answered_after_authorization(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.8", scripted=True)
        m.serve(WEB, VIP, backend)
        tunnel = await m.tunnel()
        tunnel.write(
            b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n"
        )
        interim = await asyncio.wait_for(tunnel.read(), WAIT)
        assert interim.startswith(b"HTTP/1.1 100 ")
        tunnel.write(b"hello")
        response = await raw_exchange(tunnel, b"")
        assert status_of(response) == 200 and response.endswith(b"hello\r\n0\r\n\r\n")
        assert backend.scripted is not None
        assert all(n != b"expect" for n, _ in backend.scripted.heads[0].headers)  # answered by the waypoint


async def test_websocket_upgrade_is_spliced_after_the_101(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.9", scripted=True)
        m.serve(WEB, VIP, backend)
        tunnel = await m.tunnel()
        tunnel.write(
            b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly"
        )
        received = bytearray()
        # The backend greets, then echoes the bytes the client sent right behind its upgrade request.
        while not received.endswith(b"early"):
            received += await asyncio.wait_for(tunnel.read(), WAIT)
        assert received.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\nwelcome:" in received
        for message in (b"frame-1", b"frame-2" * 1000):
            tunnel.write(message)
            echoed = bytearray()
            while len(echoed) < len(message):
                echoed += await asyncio.wait_for(tunnel.read(), WAIT)
            assert bytes(echoed) == message
        tunnel.write_eof()
        while await asyncio.wait_for(tunnel.read(), WAIT):
            pass
    (record,) = m.observer.records
    assert record.response_code == 101 and record.response_bytes > 7000


async def test_upgrade_answered_200_stays_http_and_a_pipelined_request_is_parsed(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.10", scripted=True)
        m.serve(WEB, VIP, backend)
        tunnel = await m.tunnel()
        raw = await raw_exchange(
            tunnel,
            b"GET /upgrade-200 HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            within=3,
        )
        assert raw.count(b"HTTP/1.1 200 ") == 2
        assert backend.scripted is not None
        assert [h.target for h in backend.scripted.heads] == [b"/upgrade-200", b"/second"]


async def test_http10_without_host_gets_the_service_as_authority(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.12")
        m.serve(WEB, VIP, backend)
        raw = await raw_exchange(await m.tunnel(), b"GET /old-client HTTP/1.0\r\n\r\n")
        assert status_of(raw) == 200
        assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["authority"] == WEB.hostname


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.11")
        m.serve(WEB, VIP, backend)
        requests = b"".join(b"GET /p%d HTTP/1.1\r\nHost: web\r\n\r\n" % i for i in range(5))
        raw = await raw_exchange(
            await m.tunnel(), requests + b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        paths = [
            json.loads(line)["path"]
            for line in raw.replace(b"\n", b"\r\n").split(b"\r\n")
            if line[:1] == b"{"
        ]
        assert paths == ["/p0", "/p1", "/p2", "/p3", "/p4", "/last"]


async def test_a_request_pipelined_behind_a_chunked_body_is_served(tmp_path: Path) -> None:
    # The chunked body's end is found by its decoder; what follows it is the next request's head.
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.13", scripted=True)
        m.serve(WEB, VIP, backend)
        raw = await raw_exchange(
            await m.tunnel(),
            b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n\r\nwxyz"
            b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            within=3,
        )
        assert raw.count(b"HTTP/1.1 200 ") == 3, raw
        assert b"abc" in raw and b"de" in raw
        assert b"wxyz" in raw
        assert backend.scripted is not None
        assert [h.target for h in backend.scripted.heads] == [b"/echo", b"/echo", b"/last"]
        assert backend.scripted.body_bytes == 5 + 4
    assert [r.request_bytes for r in m.observer.records] == [5, 4, 0]


async def test_head_responses_carry_framing_headers_and_no_body(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.14", scripted=True)
        m.serve(WEB, VIP, backend)
        raw = await raw_exchange(
            await m.tunnel(),
            b"HEAD /stream?n=3&size=10 HTTP/1.1\r\nHost: web\r\n\r\n"
            b"GET /after-head HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            within=3,
        )
        first, _, rest = raw.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in first.lower()
        # No body follows the HEAD response: the next bytes are the second response's status line.
        assert rest.startswith(b"HTTP/1.1 200 "), rest[:80]


async def test_an_http10_client_gets_a_body_of_unknown_length_delimited_by_close(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.15", scripted=True)
        m.serve(WEB, VIP, backend)
        raw, closed = await exchange_until_close(
            await m.tunnel(), b"GET /stream?n=4&size=1000 HTTP/1.0\r\nHost: web\r\n\r\n"
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert closed and head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
        assert b"connection: close" in head.lower()
        assert len(body) == 4000 and body[:3] == b"AAA"


async def test_connection_close_from_the_client_is_honoured(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.16")
        m.serve(WEB, VIP, backend)
        raw, closed = await exchange_until_close(
            await m.tunnel(),
            b"GET /one HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
            b"GET /never HTTP/1.1\r\nHost: web\r\n\r\n",
        )
        assert closed and raw.count(b"HTTP/1.1 ") == 1 and b"connection: close" in raw.lower()
        assert [r.view.path for r in m.observer.records] == ["/one"]
