"""HTTP/2 and gRPC through the waypoint: multiplexing, flow control, trailers, protocol translation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from loom.lab.workload import (
    decode_grpc_messages,
    decode_health_response,
    encode_grpc_message,
    encode_health_request,
)
from tests.integration.waypoint_proxy.waypoint_harness import (
    GRPC,
    GRPC_VIP,
    H2_VIP,
    H2SVC,
    VIP,
    WEB,
    H1Client,
    H2Client,
    mesh,
    request_headers,
)
from waypoint.model import AuthzDecision


def grpc_health_headers(authority: str = "grpc.default.svc.cluster.local") -> list[tuple[str, str]]:
    return request_headers(
        "/grpc.health.v1.Health/Check",
        "POST",
        authority=authority,
        content_type="application/grpc",
        te="trailers",
    )


async def test_grpc_health_check_with_trailers(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.2.0.1")
        m.serve(GRPC, GRPC_VIP, backend)
        client = await H2Client(await m.tunnel(f"{GRPC_VIP}:9090")).start()
        stream_id = client.send(grpc_health_headers(), encode_grpc_message(encode_health_request("svc")))
        stream = await client.response(stream_id)
        assert stream.status == 200 and dict(stream.headers)["content-type"] == "application/grpc"
        assert stream.trailers == [("grpc-status", "0")]
        (message,) = decode_grpc_messages(bytes(stream.body))
        assert decode_health_response(message) == 1  # SERVING
        # An unimplemented method is a trailers-only response: grpc-status in the only HEADERS frame.
        other = client.send(
            request_headers("/pkg.Svc/Missing", "POST", content_type="application/grpc", te="trailers"),
            encode_grpc_message(b""),
        )
        missing = await client.response(other)
        assert dict(missing.headers)["grpc-status"] == "12"
        await client.close()
    assert [r.grpc_status for r in m.observer.records] == ["0", "12"]
    assert all(r.view.grpc and r.upstream_protocol == "HTTP/2" for r in m.observer.records)


async def test_grpc_denied_gets_a_grpc_permission_denied(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.2.0.2")
        m.serve(GRPC, GRPC_VIP, backend)
        m.authorizer.fn = lambda view: AuthzDecision(False, policy="default/deny-all")
        client = await H2Client(await m.tunnel(f"{GRPC_VIP}:9090")).start()
        stream = await client.response(
            client.send(grpc_health_headers(), encode_grpc_message(encode_health_request()))
        )
        headers = dict(stream.headers)
        assert (stream.status, headers["grpc-status"], headers["grpc-message"]) == (
            200,
            "7",
            "RBAC: access denied",
        )
        await client.close()
        assert backend.requests == 0


async def test_streams_are_multiplexed_over_one_backend_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.2.0.3")
        m.serve(H2SVC, H2_VIP, backend)
        client = await H2Client(await m.tunnel(f"{H2_VIP}:8080")).start()
        # Each answer waits 300 ms at the backend: 20 in flight at once on one client connection.
        ids = [client.send(request_headers(f"/item/{i}?delay_ms=300")) for i in range(20)]
        streams = await asyncio.gather(*(client.response(i) for i in ids))
        assert [json.loads(s.body)["path"] for s in streams] == [f"/item/{i}?delay_ms=300" for i in range(20)]
        assert all(json.loads(s.body)["protocol"] == "HTTP/2" for s in streams)
        await client.close()
        assert backend.workload is not None and backend.workload.stats.connections == 1
        assert len(backend.tunnels) == 1  # one multiplexed h2 connection on one HBONE tunnel


async def test_large_bodies_stream_both_ways_within_flow_control(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        web = await m.add_backend("10.2.0.4", scripted=True)
        m.serve(WEB, VIP, web)
        client = await H2Client(await m.tunnel()).start()
        payload = bytes(range(256)) * 12_000  # ~3 MB: several times every window on the way
        stream_id = client.send(request_headers("/echo", "POST"), end_stream=False)
        for offset in range(0, len(payload), 16_384):
            while client.h2.local_flow_control_window(stream_id) < 16_384:
                await client.wait(lambda: client.h2.local_flow_control_window(stream_id) >= 16_384)
            client.h2.send_data(stream_id, payload[offset : offset + 16_384])
            client.flush()
        client.h2.end_stream(stream_id)
        client.flush()
        stream = await client.response(stream_id)
        assert stream.status == 200 and bytes(stream.body) == payload
        await client.close()


async def test_http1_client_reaches_an_http2_backend_and_the_reverse(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.2.0.5")
        m.serve(H2SVC, H2_VIP, backend)
        m.serve(WEB, VIP, backend)
        h1 = H1Client(await m.tunnel(f"{H2_VIP}:8080"))
        response = await h1.request("POST", "/up", [("cookie", "a=1")], body=b"x" * 1000, host="h2.default")
        seen = json.loads(response.body)
        assert (
            seen["protocol"] == "HTTP/2" and seen["body_bytes"] == 1000 and seen["authority"] == "h2.default"
        )
        h2client = await H2Client(await m.tunnel(f"{VIP}:80")).start()
        cookies = [*request_headers("/down"), ("cookie", "a=1"), ("cookie", "b=2")]
        stream = await h2client.response(h2client.send(cookies))
        seen = json.loads(stream.body)
        assert seen["protocol"] == "HTTP/1.1" and seen["headers"]["cookie"] == "a=1; b=2"
        await h2client.close()
