"""loom-ztunnel on a dual-stack mesh: every pod has an IPv4 and an IPv6 address, the in-pod rules capture
both families, and ztunnel listens on 15001 / 15006 / 15008 for both. IPv6 traffic gets everything IPv4
traffic gets: HBONE mTLS between nodes over IPv6, the client's own IPv6 address kept at the app, L4
policy on IPv6 source blocks, a dual-stack Service VIP balanced over its endpoints, passthrough to pods
outside the mesh, and plaintext from outside the mesh judged on 15006 (STRICT refuses it). Root only;
each test builds its own dual-stack lab (see ztunnel_harness)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest

from loom.testing import manifests
from loom.testing.netns import NetnsLab
from loom.testing.waiting import eventually
from tests.namespaced.ztunnel_harness import (
    APP_PORT,
    MESH_NAMESPACE,
    OUTSIDE_NAMESPACE,
    WAIT,
    Capture,
    Layout,
    PodSpec,
    ServiceSpec,
    allowed,
    call,
    mesh_lab,
    refused,
    samples,
)

pytestmark = pytest.mark.root

VIP = "10.96.0.60"
VIP6 = "fd10:96::60"
LAYOUT = Layout(
    nodes=("n1", "n2"),
    pods=(
        PodSpec("a", "n1", service_account="sa-x"),
        PodSpec("c", "n1", service_account="sa-z"),
        PodSpec("plain", "n1", namespace=OUTSIDE_NAMESPACE),
        PodSpec("v4only", "n1", service_account="sa-z", ipv6_off=True),
        PodSpec("b", "n2", service_account="sa-y", labels={"app": "web", "pod": "b"}),
        PodSpec("d", "n2", service_account="sa-y", labels={"app": "web", "pod": "d"}),
        PodSpec("far", "n2", namespace=OUTSIDE_NAMESPACE),
    ),
    services=(ServiceSpec("web", VIP, {"app": "web"}, vip6=VIP6),),
)


async def test_ipv6_between_nodes_goes_over_hbone_on_ipv6_and_keeps_the_client_address(
    dual_stack_lab: NetnsLab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="access")
    async with mesh_lab(dual_stack_lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        marker = b"LOOM-V6-PLAINTEXT-" + secrets.token_hex(8).encode()
        capture = Capture(b.node.netns.name, b.host_veth, tmp_path / "b.pcap")
        try:
            await capture.wait_listening()
            answer = await call(a, b.address6, APP_PORT, marker * 32)
        finally:
            raw = capture.stop()
        assert (answer.server, answer.seen_ip, answer.echoed) == ("b", a.address6, marker * 32)
        summary = capture.summary()
        assert f"{b.address6}.15008" in summary, "HBONE crossed the wire over IPv6"
        assert f"{b.address6}.{APP_PORT}" not in summary, "nothing reached the app port in plaintext"
        assert marker not in raw and f"b {a.address6}".encode() not in raw

        await eventually(
            lambda: (
                not mesh.ztunnel("n1").connections.connections()
                and not mesh.ztunnel("n2").connections.connections()
            ),
            within=WAIT,
            what="both ends done",
        )
        lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "access"]
        assert sorted(line["direction"] for line in lines) == ["inbound", "outbound"]
        for line in lines:
            assert line["src.identity"] == "spiffe://cluster.local/ns/demo/sa/sa-x"
            assert line["dst.identity"] == "spiffe://cluster.local/ns/demo/sa/sa-y"
            assert line["dst.hbone_addr"] == f"[{b.address6}]:{APP_PORT}"
            assert line["src.addr"].startswith(f"[{a.address6}]:")
        opened = samples(mesh.ztunnel("n1"), "istio_tcp_connections_opened_total")
        opened += samples(mesh.ztunnel("n2"), "istio_tcp_connections_opened_total")
        assert {s["connection_security_policy"] for s in opened} == {"mutual_tls"}

        # The same pods over IPv4 still work: both families are captured side by side.
        answer = await call(a, b.address, APP_PORT)
        assert (answer.server, answer.seen_ip) == ("b", a.address)
        # A pod with IPv6 switched off is enrolled and served over IPv4 (Istio's ztunnel failed to
        # enrol such pods for a while: a bind to [::1] in the pod, istio/istio#53843).
        v4only = mesh.pods["v4only"]
        answer = await call(v4only, b.address, APP_PORT)
        assert (answer.server, answer.seen_ip) == ("b", v4only.address)
        answer = await call(a, v4only.address, APP_PORT)
        assert (answer.server, answer.seen_ip) == ("v4only", a.address)


async def test_ipv6_policy_service_vip_and_passthrough(dual_stack_lab: NetnsLab) -> None:
    async with mesh_lab(dual_stack_lab, LAYOUT) as mesh:
        a, b, c = (mesh.pods[n] for n in "abc")
        # A dual-stack Service: its IPv6 cluster IP balances over the endpoints' IPv6 addresses.
        seen: set[str] = set()
        for _ in range(40):  # P(one endpoint never picked in 40 tries) = 2 * 2**-40
            answer = await call(a, VIP6, 80)
            assert answer.seen_ip == a.address6
            seen.add(answer.server)
            if seen == {"b", "d"}:
                break
        assert seen == {"b", "d"}

        # Pods outside the mesh: plain TCP over IPv6 from the client pod's own address.
        far = mesh.pods["far"]
        answer = await call(a, far.address6, APP_PORT, b"in the clear")
        assert (answer.server, answer.seen_ip, answer.echoed) == ("far", a.address6, b"in the clear")
        opened = samples(mesh.ztunnel("n1"), "istio_tcp_connections_opened_total")
        assert any(
            s["destination_workload"] == "far" and s["connection_security_policy"] == "unknown"
            for s in opened
        )

        # L4 DENY on an IPv6 source block: a is refused at b, c is not; IPv4 from a is not in the block.
        policy = manifests.authorization_policy(
            MESH_NAMESPACE, "deny-a6", action="DENY", match_labels={"pod": "b"}
        )
        policy["spec"]["rules"] = [{"from": [{"source": {"ipBlocks": [f"{a.address6}/128"]}}]}]
        mesh.apply("deny-a6", policy)
        await eventually(
            lambda: not allowed(mesh, "a", "b", ipv6=True), within=WAIT, what="DENY policy in force"
        )
        assert await refused(a, b.address6, APP_PORT)
        assert (await call(c, b.address6, APP_PORT)).server == "b"
        assert (await call(a, b.address, APP_PORT)).server == "b"
        denied = samples(mesh.ztunnel("n2"), "istio_tcp_connections_closed_total")
        assert any(s["response_flags"] == "DENY" and s["source_workload"] == "a" for s in denied)


async def test_ipv6_plaintext_from_outside_the_mesh_is_judged_on_15006(dual_stack_lab: NetnsLab) -> None:
    async with mesh_lab(dual_stack_lab, LAYOUT) as mesh:
        plain, b = mesh.pods["plain"], mesh.pods["b"]
        answer = await call(plain, b.address6, APP_PORT)
        assert (answer.server, answer.seen_ip) == ("b", plain.address6), "15006 keeps the client address"
        inbound = samples(mesh.ztunnel("n2"), "istio_tcp_connections_opened_total")
        assert any(
            s["reporter"] == "destination" and s["connection_security_policy"] == "unknown" for s in inbound
        )

        mesh.apply("strict", manifests.peer_authentication(MESH_NAMESPACE, mode="STRICT"))
        await eventually(
            lambda: not allowed(mesh, "plain", "b", identity=False, ipv6=True),
            within=WAIT,
            what="STRICT in force",
        )
        assert await refused(plain, b.address6, APP_PORT)
        assert (await call(mesh.pods["a"], b.address6, APP_PORT)).server == "b", "mesh traffic unaffected"
