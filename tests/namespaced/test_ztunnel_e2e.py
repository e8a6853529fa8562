"""loom-ztunnel end to end in network namespaces: two nodes, real in-pod capture, HBONE mTLS between
nodes, L4 policy, passthrough, service load balancing, late rejection, controller outage, bad HBONE
input. Root only; each test builds its own lab (see ztunnel_harness)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from cni.rules import INPOD_MARK
from loom.identity import Identity
from loom.testing import manifests
from loom.testing.inpod_agent import enrol
from loom.testing.netns import NetnsLab
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import RawH2Client, raw_client_context
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
    pod_manifest,
    refused,
    samples,
)
from ztunnel.inpod import WorkloadInfo

pytestmark = pytest.mark.root

LAYOUT = Layout(
    nodes=("n1", "n2"),
    pods=(
        PodSpec("a", "n1", service_account="sa-x"),
        PodSpec("c", "n1", service_account="sa-z"),
        PodSpec("plain", "n1", namespace=OUTSIDE_NAMESPACE),
        PodSpec("b", "n2", service_account="sa-y", labels={"app": "web", "pod": "b"}),
        PodSpec("d", "n2", service_account="sa-y", labels={"app": "web", "pod": "d"}),
        PodSpec("far", "n2", namespace=OUTSIDE_NAMESPACE),
    ),
    services=(ServiceSpec("web", "10.96.0.50", {"app": "web"}),),
)
VIP = "10.96.0.50"


async def until(predicate: Callable[[], bool], what: str) -> None:
    await eventually(predicate, within=WAIT, what=what)


def principals(*service_accounts: str) -> list[str]:
    return [f"cluster.local/ns/{MESH_NAMESPACE}/sa/{sa}" for sa in service_accounts]


async def test_a_pod_to_pod_across_nodes_is_tunnelled_and_keeps_the_source_address(
    lab: NetnsLab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="access")
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        answer = await call(a, b.address, APP_PORT, b"hello over hbone")
        assert (answer.server, answer.seen_ip, answer.echoed) == ("b", a.address, b"hello over hbone")
        await until(
            lambda: len(mesh.ztunnel("n1").connections) + len(mesh.ztunnel("n2").connections) == 0,
            "both ends done",
        )
        # Exactly one access log line per side, with the identities and the HBONE target.
        lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "access"]
        assert sorted(line["direction"] for line in lines) == ["inbound", "outbound"]
        for line in lines:
            assert line["src.identity"] == "spiffe://cluster.local/ns/demo/sa/sa-x"
            assert line["dst.identity"] == "spiffe://cluster.local/ns/demo/sa/sa-y"
            assert line["dst.hbone_addr"] == f"{b.address}:{APP_PORT}"
            assert line["bytes_sent"] == len(b"hello over hbone")
        # Both ends report it as an mTLS connection: it went through the two ztunnels.
        outbound = samples(mesh.ztunnel("n1"), "istio_tcp_connections_opened_total")
        inbound = samples(mesh.ztunnel("n2"), "istio_tcp_connections_opened_total")
        assert any(s["reporter"] == "source" and s["destination_workload"] == "b" for s in outbound)
        assert any(s["reporter"] == "destination" and s["source_workload"] == "a" for s in inbound)
        assert {s["connection_security_policy"] for s in outbound + inbound} == {"mutual_tls"}


async def test_b_the_wire_between_nodes_carries_only_tls_on_15008(lab: NetnsLab, tmp_path: Path) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        marker = b"LOOM-PLAINTEXT-MARKER-" + secrets.token_hex(8).encode()
        capture = Capture(b.node.netns.name, b.host_veth, tmp_path / "b.pcap")
        try:
            await capture.wait_listening()
            answer = await call(a, b.address, APP_PORT, marker * 64)
            assert answer.echoed == marker * 64
        finally:
            raw = capture.stop()
        summary = capture.summary()
        assert f"{b.address}.15008" in summary, "the transfer crossed the wire on the HBONE port"
        assert f"{b.address}.{APP_PORT}" not in summary, "nothing reached the app port in plaintext"
        assert len(raw) > len(marker) * 64, "the capture holds the (encrypted) transfer"
        assert marker not in raw
        assert b"hello" not in raw and f"b {a.address}".encode() not in raw


async def test_c_the_server_side_ztunnel_sees_the_client_spiffe_identity(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        reader, writer = await a.netns.open_connection(b.address, APP_PORT)
        try:
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"b ")
            server_side = mesh.ztunnel("n2").connections.connections()
            assert [str(c.source_identity) for c in server_side] == ["spiffe://cluster.local/ns/demo/sa/sa-x"]
            assert server_side[0].workload == "b.demo"
            # The admin endpoint (what `loomctl ztunnel-config connections` reads) shows it too.
            n2 = mesh.ztunnel("n2")
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{n2.ports['admin']}/config_dump") as response,
            ):
                dump = await response.json()
            assert [c["sourceIdentity"] for c in dump["connections"]] == [
                "spiffe://cluster.local/ns/demo/sa/sa-x"
            ]
            assert {w["name"] for w in dump["workloads"]} >= {"a", "b", "c", "d"}
        finally:
            writer.close()
        await until(lambda: len(mesh.ztunnel("n2").connections) == 0, "inbound connection closed")
        closed = samples(mesh.ztunnel("n2"), "istio_tcp_connections_closed_total")
        assert closed and closed[0]["source_principal"] == "spiffe://cluster.local/ns/demo/sa/sa-x"
        assert closed[0]["destination_principal"] == "spiffe://cluster.local/ns/demo/sa/sa-y"


async def test_d_l4_allow_and_deny_policies_use_the_mtls_identity(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b, c, d = (mesh.pods[n] for n in "abcd")
        policy = manifests.authorization_policy(
            MESH_NAMESPACE,
            "b-policy",
            action="ALLOW",
            principals=principals("sa-x"),
            match_labels={"pod": "b"},
        )
        mesh.apply("b-policy", policy)
        await until(lambda: not allowed(mesh, "c", "b"), "ALLOW policy in force")
        assert (await call(a, b.address, APP_PORT)).server == "b"
        assert await refused(c, b.address, APP_PORT)
        assert (await call(c, d.address, APP_PORT)).server == "d", "d is not selected by the policy"
        denied = samples(mesh.ztunnel("n2"), "istio_tcp_connections_closed_total")
        assert any(s["response_flags"] == "DENY" and s["source_workload"] == "c" for s in denied)

        policy["spec"]["action"] = "DENY"
        mesh.apply("b-policy", policy)
        await until(lambda: not allowed(mesh, "a", "b") and allowed(mesh, "c", "b"), "DENY policy in force")
        assert await refused(a, b.address, APP_PORT)
        assert (await call(c, b.address, APP_PORT)).server == "b"


async def test_d_strict_peer_authentication_refuses_plaintext_from_outside_the_mesh(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        plain, b = mesh.pods["plain"], mesh.pods["b"]
        answer = await call(plain, b.address, APP_PORT)
        assert (answer.server, answer.seen_ip) == ("b", plain.address), "15006 keeps the client address"
        mesh.apply("strict", manifests.peer_authentication(MESH_NAMESPACE, mode="STRICT"))
        await until(lambda: not allowed(mesh, "plain", "b", identity=False), "STRICT in force")
        assert await refused(plain, b.address, APP_PORT)
        # Mesh traffic (with an identity) is unaffected.
        assert (await call(mesh.pods["a"], b.address, APP_PORT)).server == "b"


async def test_e_passthrough_to_pods_outside_the_mesh(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a = mesh.pods["a"]
        for target in ("far", "plain"):
            pod = mesh.pods[target]
            answer = await call(a, pod.address, APP_PORT, b"in the clear")
            assert (answer.server, answer.seen_ip, answer.echoed) == (target, a.address, b"in the clear")
        opened = samples(mesh.ztunnel("n1"), "istio_tcp_connections_opened_total")
        assert {
            s["destination_workload"] for s in opened if s["connection_security_policy"] == "unknown"
        } == {
            "far",
            "plain",
        }


async def test_f_a_service_vip_balances_over_its_endpoints_with_target_port_mapping(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a = mesh.pods["a"]
        seen: set[str] = set()
        for _ in range(40):  # P(one endpoint never picked in 40 tries) = 2 * 2**-40
            answer = await call(a, VIP, 80)
            assert answer.seen_ip == a.address
            seen.add(answer.server)
            if seen == {"b", "d"}:
                break
        assert seen == {"b", "d"}
        opened = samples(mesh.ztunnel("n1"), "istio_tcp_connections_opened_total")
        assert {s["destination_service"] for s in opened} == {"web.demo.svc.cluster.local"}


async def test_g_a_policy_applied_while_a_connection_is_open_closes_it(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        reader, writer = await a.netns.open_connection(b.address, APP_PORT)
        try:
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"b ")
            writer.write(b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), WAIT) == b"still here"
            mesh.apply(
                "deny-x",
                manifests.authorization_policy(
                    MESH_NAMESPACE,
                    "deny-x",
                    action="DENY",
                    principals=principals("sa-x"),
                    match_labels={"pod": "b"},
                ),
            )
            try:
                rest = await asyncio.wait_for(reader.read(), WAIT)
            except ConnectionResetError:
                rest = b""
            assert rest == b"", "the connection was closed by the late rejection"
        finally:
            writer.close()
        n2 = mesh.ztunnel("n2")
        await until(lambda: len(n2.connections) == 0, "registry empty")
        closed = samples(n2, "istio_tcp_connections_closed_total")
        assert any(s["response_flags"] == "DENY" and s["source_workload"] == "a" for s in closed)


async def test_h_with_the_controller_stopped_known_pods_keep_talking(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        assert (await call(a, b.address, APP_PORT)).server == "b"
        await mesh.controller.stop()
        await until(lambda: not mesh.ztunnel("n1").xds.connected, "xDS stream ended")
        for _ in range(3):
            assert (await call(a, b.address, APP_PORT)).server == "b"
        assert (await call(a, VIP, 80)).server in {"b", "d"}
        assert (await call(mesh.pods["c"], mesh.pods["d"].address, APP_PORT)).server == "d"


async def test_i_bad_hbone_requests_from_a_peer_pod_get_400_and_nothing_is_dialled(
    lab: NetnsLab, tmp_path: Path
) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        c, b, d = mesh.pods["c"], mesh.pods["b"], mesh.pods["d"]
        certificate = await mesh.ztunnel("n1").certificates.fetch(Identity("cluster.local", "demo", "sa-z"))
        sock = c.netns.tcp_socket(mark=INPOD_MARK)  # marked: not captured, like ztunnel's own sockets
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (b.address, 15008)), WAIT)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=raw_client_context(certificate, tmp_path), server_hostname=""
        )
        client = RawH2Client(reader, writer)
        client.h2.initiate_connection()
        await client.flush()
        try:
            before = (len(mesh.servers["b"].peers), len(mesh.servers["d"].peers))
            get = await client.request(
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/"),
                    (":authority", f"{b.address}:{APP_PORT}"),
                ],
                end_stream=True,
            )
            assert await client.response_status(get) == 400
            mismatch = await client.request(
                [(":method", "CONNECT"), (":authority", f"{d.address}:{APP_PORT}")]
            )
            assert await client.response_status(mismatch) == 400
            own_port = await client.request([(":method", "CONNECT"), (":authority", f"{b.address}:15008")])
            assert await client.response_status(own_port) == 400
            assert (len(mesh.servers["b"].peers), len(mesh.servers["d"].peers)) == before, "nothing dialled"
            # The same connection still works for a good request: the bad ones cost only themselves.
            good = await client.request([(":method", "CONNECT"), (":authority", f"{b.address}:{APP_PORT}")])
            assert await client.response_status(good) == 200
            await until(lambda: len(mesh.servers["b"].peers) == before[0] + 1, "app dialled once")
            assert mesh.servers["b"].peers[-1][0] == c.address
        finally:
            client.close()


async def test_a_pod_sending_before_its_workload_is_known_is_held_then_tunnelled(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        b = mesh.pods["b"]
        late = lab.add_pod(mesh.nodes["n1"].node, "late")
        enrol(late)
        spec = PodSpec("late", "n1", service_account="sa-late")
        agent = mesh.nodes["n1"].agent
        assert (
            await agent.add(spec.uid, WorkloadInfo("late", MESH_NAMESPACE, "sa-late"), late.netns.path) == ""
        )
        # The app's first connection leaves before the controller has heard of the pod.
        first = asyncio.create_task(call(late, b.address, APP_PORT, b"early bird"))
        await asyncio.sleep(0.2)
        assert not first.done(), "held while the pod's workload is unknown (never sent in plaintext)"
        mesh.apply("late", pod_manifest(spec, late))
        answer = await asyncio.wait_for(first, WAIT)
        assert (answer.server, answer.seen_ip, answer.echoed) == ("b", late.address, b"early bird")
        inbound = samples(mesh.ztunnel("n2"), "istio_tcp_connections_opened_total")
        assert any(s["source_principal"] == "spiffe://cluster.local/ns/demo/sa/sa-late" for s in inbound)


async def test_loomctl_ztunnel_config_reads_a_running_ztunnel(
    lab: NetnsLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loomctl ztunnel-config` against n2's live admin port: Istio's columns with real state."""
    from loom.cli.main import main

    async with mesh_lab(lab, LAYOUT) as mesh:
        mesh.apply(
            "b-policy",
            manifests.authorization_policy(
                MESH_NAMESPACE,
                "b-policy",
                action="ALLOW",
                principals=principals("sa-x"),
                match_labels={"pod": "b"},
            ),
        )
        await until(lambda: not allowed(mesh, "c", "b"), "policy received")
        await call(mesh.pods["a"], mesh.pods["b"].address, APP_PORT)  # n2 now holds sa-y's certificate
        admin = f"127.0.0.1:{mesh.ztunnel('n2').ports['admin']}"

        async def ztunnel_config(*args: str) -> list[str]:
            # The CLI blocks on HTTP; the admin server runs on this loop, so the CLI runs in a thread.
            code = await asyncio.to_thread(main, ["ztunnel-config", *args, "--admin-address", admin])
            assert code == 0
            return capsys.readouterr().out.splitlines()

        workloads = await ztunnel_config("workloads")
        assert workloads[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
        rows = {line.split()[1]: line.split() for line in workloads[1:]}
        assert rows["b"] == [MESH_NAMESPACE, "b", mesh.pods["b"].address, "n2", "None", "HBONE"]
        assert rows["far"][-1] == "TCP"  # outside the mesh

        policies = await ztunnel_config("policies")
        assert [MESH_NAMESPACE, "b-policy", "Allow", "WorkloadSelector"] in [
            line.split() for line in policies
        ]

        certificates = await ztunnel_config("certificates")
        leaf = [
            line
            for line in certificates
            if line.startswith(f"spiffe://cluster.local/ns/{MESH_NAMESPACE}/sa/sa-y")
        ]
        assert leaf and leaf[0].split()[1:3] == ["Leaf", "Available"]
