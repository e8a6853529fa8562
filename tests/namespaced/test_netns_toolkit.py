"""The namespace toolkit itself (loom/testing/netns.py): topology, isolation from the root namespace,
pod deletion and recreation, cleanup. Root only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from loom.testing.netns import Netns, NetnsLab, cleanup_prefix, list_namespaces, run_command
from tests.namespaced.harness import namespaces_with_prefix

pytestmark = pytest.mark.root

WAIT = 5.0


def root_network_state() -> tuple[object, ...]:
    """Addresses, routes (all tables), rules and link names of the root namespace."""

    def ip_json(*args: str) -> object:
        return json.loads(
            subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
        )

    links = sorted(link["ifname"] for link in ip_json("link", "show"))  # type: ignore[attr-defined]
    return (ip_json("addr", "show"), ip_json("route", "show", "table", "all"), ip_json("rule", "show"), links)


async def echo_once(listener_ns: Netns, host: str, client_ns: Netns, payload: bytes) -> tuple[bytes, str]:
    """Serve one echo in `listener_ns` on host:8080 and connect from `client_ns`; (echo, peer ip seen)."""
    listener = listener_ns.listen(host, 8080)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await client_ns.open_connection(host, 8080)
        try:
            writer.write(payload)
            async with asyncio.timeout(WAIT):
                conn, peer = await loop.sock_accept(listener)
                with conn:
                    data = await loop.sock_recv(conn, 100)
                    await loop.sock_sendall(conn, data)
                    echoed = await reader.readexactly(len(data))
        finally:
            writer.close()
            await writer.wait_closed()
        return echoed, peer[0]
    finally:
        listener.close()


async def test_pods_reach_each_other_on_one_node_and_across_nodes(lab: NetnsLab) -> None:
    before = root_network_state()
    node1, node2 = lab.add_node("n1"), lab.add_node("n2")
    a = lab.add_pod(node1, "a")
    b = lab.add_pod(node1, "b")
    c = lab.add_pod(node2, "c")
    assert (str(a.ip), str(b.ip), str(c.ip)) == ("10.80.1.2", "10.80.1.3", "10.80.2.2")

    for server, client in ((b, a), (c, a), (a, c)):
        echoed, peer = await echo_once(server.netns, server.address, client.netns, b"ping")
        assert (echoed, peer) == (b"ping", client.address), "delivered, with no NAT between pods"

    assert root_network_state() == before, "the root namespace must not change"
    assert node1.netns.read_sysctl("net.ipv4.ip_forward") == "1"
    assert a.netns.read_sysctl("net.ipv4.ip_forward") == "0"
    for node in (node1, node2):
        assert all(route["dst"] != "default" for route in node.netns.ip_json("route", "show")), "no way out"
    assert sorted(lab.namespaces()) == sorted(
        f"{lab.prefix}-{n}" for n in ("n1", "n2", "wire", "a", "b", "c")
    )


async def test_a_recreated_pod_keeps_its_address_in_a_new_namespace(lab: NetnsLab) -> None:
    node = lab.add_node("n1")
    a = lab.add_pod(node, "a")
    b = lab.add_pod(node, "b")
    old_inode = os.stat(b.netns.path).st_ino
    held = b.netns.open_fd()  # like ztunnel holding the old sandbox's namespace
    try:
        b2 = lab.recreate_pod(b)
        assert b2.ip == b.ip and b2.netns.name == b.netns.name
        assert os.stat(b2.netns.path).st_ino != old_inode
        assert b.host_veth not in {link["ifname"] for link in node.netns.ip_json("link", "show")}
        echoed, peer = await echo_once(b2.netns, b2.address, a.netns, b"hello")
        assert (echoed, peer) == (b"hello", a.address)
    finally:
        os.close(held)


def test_close_removes_everything_and_is_idempotent() -> None:
    lab = NetnsLab()
    try:
        node = lab.add_node("n1")
        lab.add_pod(node, "a")
        lab.namespace("controller")
        assert len(namespaces_with_prefix(lab.prefix)) == 4
    finally:
        lab.close()
    lab.close()
    assert namespaces_with_prefix(lab.prefix) == []
    assert lab.namespaces() == []
    with pytest.raises(RuntimeError, match="the lab is closed"):
        lab.namespace("late")


def test_cleanup_prefix_sweeps_leftovers_of_a_crashed_run() -> None:
    prefix = NetnsLab().prefix  # a fresh random prefix; nothing was created with it
    for name in ("n1", "a"):
        run_command(["ip", "netns", "add", f"{prefix}-{name}"])
    try:
        assert sorted(cleanup_prefix(prefix)) == [f"{prefix}-a", f"{prefix}-n1"]
    finally:
        cleanup_prefix(prefix)
    assert list_namespaces(prefix + "-") == []
    assert cleanup_prefix(prefix) == []


@pytest.mark.parametrize("prefix", ["", "l", "lt", "LT123", "lt-1", "lt/x"])
def test_cleanup_prefix_refuses_prefixes_that_could_match_foreign_namespaces(prefix: str) -> None:
    with pytest.raises(ValueError, match="refusing to sweep"):
        cleanup_prefix(prefix)


def test_lab_rejects_bad_names_and_addresses(lab: NetnsLab) -> None:
    node = lab.add_node("n1")
    with pytest.raises(ValueError, match="must be lower-case"):
        lab.namespace("Bad_Name")
    with pytest.raises(ValueError, match="already used"):
        lab.add_node("n1")
    lab.add_pod(node, "a", "10.80.1.7")
    with pytest.raises(ValueError, match=r"10\.80\.1\.7 is not a free pod address"):
        lab.add_pod(node, "b", "10.80.1.7")
    with pytest.raises(ValueError, match=r"10\.80\.9\.1 is not a free pod address"):
        lab.add_pod(node, "c", "10.80.9.1")
    with pytest.raises(ValueError, match="not a per-namespace sysctl"):
        node.netns.sysctl("kernel.panic", 1)
