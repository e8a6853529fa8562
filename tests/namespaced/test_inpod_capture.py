"""In-pod listeners and capture, end to end in namespaces: the stand-in agent hands both pods' netns fds
to the real ZDS client, whose proxy manager opens 15001/15006/15008 inside each pod; then the in-pod rules
of cni/rules.py steer real TCP connections. Root only."""

from __future__ import annotations

import asyncio
import socket

import pytest

from cni.rules import INPOD_MARK, PROBE_SNAT_IPV4
from loom.testing.inpod_agent import INPOD_PORTS, enrol, unenrol
from loom.testing.netns import NetnsLab
from tests.namespaced.harness import WAIT, accept, exchange, inpod_node, nothing_pending
from ztunnel.inpod.netns import InpodNetns, original_dst

pytestmark = pytest.mark.root


async def test_listeners_run_inside_each_pod_namespace_and_carry_the_inpod_mark(
    lab: NetnsLab, zds_path: str
) -> None:
    async with inpod_node(lab, zds_path) as env:
        for pod in env.pods.values():
            for port in INPOD_PORTS:
                listener = env.listener(pod, port)
                assert listener.getsockname() == ("0.0.0.0", port)
                assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == INPOD_MARK
                assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                reader, writer = await pod.netns.open_connection("127.0.0.1", port)
                try:
                    conn, peer = await accept(listener)
                    with conn:
                        assert peer[0] == "127.0.0.1"
                        await exchange(conn, writer, reader)
                finally:
                    writer.close()
        # Nothing listens in the node's own namespace: the listeners really are in the pods.
        with pytest.raises(ConnectionRefusedError):
            await env.node.netns.open_connection("127.0.0.1", 15008)


async def test_app_traffic_leaving_a_pod_is_redirected_to_15001_with_its_original_destination(
    lab: NetnsLab, zds_path: str
) -> None:
    async with inpod_node(lab, zds_path) as env:
        a, b = env.pods["a"], env.pods["b"]
        enrol(a)
        enrol(b)
        reader, writer = await a.netns.open_connection(b.address, 8080)
        try:
            conn, peer = await accept(env.listener(a, 15001))
            with conn:
                assert original_dst(conn) == (b.address, 8080)
                assert peer[0] == a.address
                await exchange(conn, writer, reader)
        finally:
            writer.close()
        assert nothing_pending(env.listener(b, 15006)), "the connection never left pod a"


async def test_inbound_lands_on_15006_hbone_on_15008_and_marked_sockets_are_not_captured(
    lab: NetnsLab, zds_path: str
) -> None:
    async with inpod_node(lab, zds_path) as env:
        a, b = env.pods["a"], env.pods["b"]
        enrol(a)
        enrol(b)
        # Marked like ztunnel's own sockets, so pod a's outbound capture lets it go.
        reader, writer = await a.netns.open_connection(b.address, 8080, mark=INPOD_MARK)
        try:
            conn, peer = await accept(env.listener(b, 15006))
            with conn:
                assert peer[0] == a.address
                assert original_dst(conn) == (b.address, 8080)
                await exchange(conn, writer, reader)
        finally:
            writer.close()

        reader, writer = await a.netns.open_connection(b.address, 15008, mark=INPOD_MARK)
        try:
            conn, peer = await accept(env.listener(b, 15008))
            with conn:
                assert peer[0] == a.address
                await exchange(conn, writer, reader)
        finally:
            writer.close()
        assert nothing_pending(env.listener(b, 15006)), "HBONE to 15008 must not be redirected"
        assert nothing_pending(env.listener(a, 15001)), "marked sockets must not be captured"


async def test_app_traffic_to_its_own_pod_address_is_not_captured(lab: NetnsLab, zds_path: str) -> None:
    async with inpod_node(lab, zds_path) as env:
        b = env.pods["b"]
        enrol(b)
        app = b.netns.listen("0.0.0.0", 8080)
        try:
            reader, writer = await b.netns.open_connection(b.address, 8080)
            try:
                conn, _ = await accept(app)
                with conn:
                    await exchange(conn, writer, reader)
            finally:
                writer.close()
        finally:
            app.close()
        assert nothing_pending(env.listener(b, 15001))
        assert nothing_pending(env.listener(b, 15006))


async def test_ztunnel_reaches_the_app_with_the_client_address_and_the_reply_comes_back(
    lab: NetnsLab, zds_path: str
) -> None:
    async with inpod_node(lab, zds_path) as env:
        a, b = env.pods["a"], env.pods["b"]
        app = b.netns.listen("0.0.0.0", 8080)
        loop = asyncio.get_running_loop()
        with InpodNetns.open(b.netns.path) as ztunnel_side:
            try:
                # Without the rules, the app's SYN-ACK to the spoofed client address leaves through eth0
                # (and pod a resets it): the connect never completes. A reply would take microseconds.
                with pytest.raises(TimeoutError):
                    await ztunnel_side.connect((b.address, 8080), src_ip=a.address, connect_timeout=0.5)
                assert nothing_pending(app)

                enrol(b)
                upstream = await ztunnel_side.connect((b.address, 8080), src_ip=a.address)
                with upstream:
                    assert upstream.getsockname()[0] == a.address
                    assert upstream.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == INPOD_MARK
                    conn, peer = await accept(app)
                    with conn:
                        assert peer == upstream.getsockname(), "the app sees the client's own address"
                        async with asyncio.timeout(WAIT):
                            await loop.sock_sendall(upstream, b"via ztunnel")
                            assert await loop.sock_recv(conn, 100) == b"via ztunnel"
                            await loop.sock_sendall(conn, b"reply")
                            assert await loop.sock_recv(upstream, 100) == b"reply"
            finally:
                app.close()
        assert nothing_pending(env.listener(b, 15001)), "the app's replies are not captured as outbound"


async def test_node_probes_from_the_probe_address_bypass_capture(lab: NetnsLab, zds_path: str) -> None:
    async with inpod_node(lab, zds_path, ("a",)) as env:
        a = env.pods["a"]
        enrol(a)
        # Stand in for the node's SNAT of kubelet probes: the node owns the probe address itself.
        env.node.netns.ip("addr", "add", f"{PROBE_SNAT_IPV4}/32", "dev", a.host_veth)
        app = a.netns.listen("0.0.0.0", 8080)
        probe = env.node.netns.tcp_socket()
        try:
            probe.bind((PROBE_SNAT_IPV4, 0))
            probe.setblocking(False)
            async with asyncio.timeout(WAIT):
                await asyncio.get_running_loop().sock_connect(probe, (a.address, 8080))
            conn, peer = await accept(app)
            conn.close()
            assert peer[0] == PROBE_SNAT_IPV4
        finally:
            probe.close()
            app.close()
        assert nothing_pending(env.listener(a, 15006))


async def test_after_unenrolment_traffic_flows_directly_again(lab: NetnsLab, zds_path: str) -> None:
    async with inpod_node(lab, zds_path) as env:
        a, b = env.pods["a"], env.pods["b"]
        enrol(a)
        unenrol(a)
        app = b.netns.listen("0.0.0.0", 8080)
        try:
            reader, writer = await a.netns.open_connection(b.address, 8080)
            try:
                conn, peer = await accept(app)
                with conn:
                    assert peer[0] == a.address
                    await exchange(conn, writer, reader)
            finally:
                writer.close()
        finally:
            app.close()
        assert nothing_pending(env.listener(a, 15001))
