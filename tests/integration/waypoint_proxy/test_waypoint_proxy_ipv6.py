"""The waypoint over IPv6: its HBONE listeners take both families, and a client arriving over IPv6 is
served, authorized and logged with its IPv6 address (bracketed where a port follows, never mapped)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.integration.waypoint_proxy.waypoint_harness import VIP, WEB, H1Client, mesh
from waypoint.app import hbone_listeners
from waypoint.telemetry import AccessLogEntry, format_access_log


def test_the_unspecified_ipv4_address_listens_on_both_families_on_one_port() -> None:
    listeners = hbone_listeners("0.0.0.0", 0)
    try:
        # Port 0 picks a port per socket: bind the pair again on the one the IPv4 listener got.
        port = listeners[0].getsockname()[1]
    finally:
        for sock in listeners:
            sock.close()
    listeners = hbone_listeners("0.0.0.0", port)
    try:
        assert [(s.family, s.getsockname()[:2]) for s in listeners] == [
            (socket.AF_INET, ("0.0.0.0", port)),
            (socket.AF_INET6, ("::", port)),
        ]
        # IPv6 only: an IPv4 client never reaches the IPv6 socket as an IPv4-mapped address.
        assert listeners[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in listeners:
            sock.close()
    (only,) = hbone_listeners("::1", 0)  # any other address is listened on as given
    with only:
        assert only.family == socket.AF_INET6 and only.getsockname()[0] == "::1"


async def test_a_client_over_ipv6_is_served_and_seen_with_its_ipv6_address(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.1.0.1")
        m.serve(WEB, VIP, backend)
        (listener,) = hbone_listeners("::1", 0)
        try:
            m.proxy.start(listener)
            tunnel = await m.client.connect(
                m.client_cert, [m.waypoint_cert.identity], listener.getsockname()[:2], f"{VIP}:80", ()
            )
            client = H1Client(tunnel)
            response = await client.request("GET", "/v6", [("user-agent", "t")])
            assert response.status == 200
            assert json.loads(response.body)["path"] == "/v6"
            (record,) = m.observer.records
            source = record.view.source.address
            assert source.startswith("[::1]:") and int(source.rsplit(":", 1)[1]) > 0
            assert record.view.source.identity == m.client_cert.identity
            line = format_access_log(AccessLogEntry.for_request(record.view, record.start_time, 200))
            assert line.split()[-3] == source, "DOWNSTREAM_REMOTE_ADDRESS is the bracketed IPv6 client"
            tunnel.close()
        finally:
            listener.close()
