"""The lab network (loom/lab/network.py) in real namespaces: topology, traffic between pods across
nodes, Service VIPs balanced over backends on two nodes, refused VIPs, idempotence, recovery from a new
process's view of the kernel, isolation of the root namespace and a complete sweep. Root only."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import re
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from cni.plugin import pod_ips, validate_prev_result
from loom.lab.network import (
    ETC_NETNS_DIR,
    NETNS_RUN_DIR,
    LabNetwork,
    LabNetworkError,
    NodeNet,
    PodNet,
    ServiceVip,
    check_prerequisites,
    list_namespaces,
    render_resolv_conf,
)
from loom.lab.services import verify
from loom.testing.netns import Netns

pytestmark = pytest.mark.root

WAIT = 5.0
PORT = 8080
IP = ipaddress.IPv4Address


def etc_netns_entries(prefix: str) -> list[str]:
    try:
        return sorted(entry for entry in os.listdir(ETC_NETNS_DIR) if entry.startswith(prefix + "-"))
    except FileNotFoundError:
        return []


def make_bare_netns_file(name: str) -> None:
    """What an `ip netns add` interrupted before mounting the namespace leaves: a plain file."""
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    with open(os.path.join(NETNS_RUN_DIR, name), "w"):
        pass


@pytest.fixture
def network() -> Iterator[LabNetwork]:
    net = LabNetwork("lt" + secrets.token_hex(2))
    try:
        yield net
    finally:
        net.sweep()
        assert list_namespaces(net.prefix + "-") == []
        assert etc_netns_entries(net.prefix) == []


@pytest.fixture(autouse=True)
def root_namespace_untouched() -> Iterator[None]:
    """Every test here must leave the root namespace's addresses, routes, rules, links and netfilter
    rules exactly as it found them."""
    before = root_network_state()
    yield
    assert root_network_state() == before, "the root namespace changed"


def root_network_state() -> dict[str, object]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout

    # Drop what changes by itself: save timestamps, packet counters, address lifetimes.
    save = "\n".join(
        re.sub(r"\[\d+:\d+\]", "", line)
        for line in run("iptables-save").splitlines()
        if not line.startswith("#")
    )
    return {
        "route": run("ip", "route", "show", "table", "all"),
        "addr": re.sub(r"(valid|preferred)_lft \S+", "", run("ip", "-4", "addr")),
        "rule": run("ip", "rule"),
        "links": sorted(re.findall(r"^\d+: ([^:@]+)", run("ip", "-o", "link"), flags=re.M)),
        "iptables": save,
    }


class Servers:
    """TCP servers in pod namespaces that answer "<name> <peer ip>" and close."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []

    async def start(self, netns: str, name: str, port: int = PORT) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")[0]
            writer.write(f"{name} {peer}".encode())
            await writer.drain()
            writer.close()

        listener = Netns(netns).listen("0.0.0.0", port)
        self._servers.append(await asyncio.start_server(answer, sock=listener))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


async def ask(client: str, host: str, port: int = PORT) -> tuple[str, str]:
    """Connect from namespace `client`; returns (server name, client address the server saw)."""
    reader, writer = await Netns(client).open_connection(host, port, connect_timeout=WAIT)
    try:
        async with asyncio.timeout(WAIT):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    name, peer = data.decode().split()
    return name, peer


async def ask_many(client: str, host: str, count: int, port: int = PORT) -> collections.Counter[str]:
    limit = asyncio.Semaphore(20)

    async def one() -> str:
        async with limit:
            return (await ask(client, host, port))[0]

    return collections.Counter(await asyncio.gather(*(one() for _ in range(count))))


def build(net: LabNetwork) -> tuple[NodeNet, NodeNet, dict[str, PodNet]]:
    """Wire, two nodes, the controller; pods a and b on node-1, c on node-2."""
    net.ensure_wire()
    node1, node2 = net.ensure_node("node-1", 1), net.ensure_node("node-2", 2)
    net.ensure_controller()
    pods = {
        "a": net.add_pod_netns(node1, f"{net.prefix}-a", IP("10.80.1.2")),
        "b": net.add_pod_netns(node1, f"{net.prefix}-b", IP("10.80.1.3")),
        "c": net.add_pod_netns(node2, f"{net.prefix}-c", IP("10.80.2.2")),
    }
    return node1, node2, pods


async def test_pods_reach_each_other_across_nodes_and_the_controller_reaches_pods(
    network: LabNetwork,
) -> None:
    node1, node2, pods = build(network)
    a, b, c = pods["a"], pods["b"], pods["c"]
    cp = network.controller_netns
    servers = Servers()
    try:
        for pod in (a, b, c):
            await servers.start(pod.netns, pod.netns)
        await servers.start(cp, "controller")
        for client, server in ((a, c), (c, a), (a, b)):
            assert await ask(client.netns, str(server.ip)) == (server.netns, str(client.ip)), (
                "no NAT between pods"
            )
        assert await ask(cp, str(c.ip)) == (c.netns, str(network.controller_ip))
        assert await ask(c.netns, str(network.controller_ip)) == ("controller", str(c.ip)), (
            "the lab DNS's path"
        )
        assert await ask(node2.netns, str(a.ip)) == (a.netns, str(node2.wire_ip))
    finally:
        await servers.close()

    assert Netns(node1.netns).read_sysctl("net.ipv4.ip_forward") == "1"
    assert Netns(a.netns).read_sysctl("net.ipv4.ip_forward") == "0"
    for netns in (node1.netns, node2.netns, cp):
        assert all(route["dst"] != "default" for route in Netns(netns).ip_json("route")), (
            f"{netns}: no way out"
        )
    for pod, node in ((a, node1), (c, node2)):
        defaults = [route for route in Netns(pod.netns).ip_json("route") if route["dst"] == "default"]
        assert [route["gateway"] for route in defaults] == [str(node.gateway)]
    assert a.host_veth == "p1-2" and c.host_veth == "p2-2"
    assert network.nodes() == [node1, node2]
    assert network.pods(node1) == [a, b] and network.pods(node2) == [c]
    assert sorted(list_namespaces(network.prefix + "-")) == sorted(
        f"{network.prefix}-{name}" for name in ("wire", "cp", "node-1", "node-2", "a", "b", "c")
    )


async def test_service_vip_balances_over_backends_on_two_nodes(network: LabNetwork) -> None:
    node1, node2, pods = build(network)
    a, b, c = pods["a"], pods["b"], pods["c"]
    reviews = ServiceVip(
        IP("10.96.0.10"), 9080, "TCP", ((b.ip, PORT), (c.ip, PORT)), name="default/reviews:http"
    )
    empty = ServiceVip(IP("10.96.0.11"), 9080, "TCP", ())
    for node in (node1, node2):
        network.sync_services(node, [reviews, empty])
    servers = Servers()
    try:
        await servers.start(b.netns, "b")
        await servers.start(c.netns, "c")
        counts = await ask_many(a.netns, "10.96.0.10", 200, port=9080)
        assert sum(counts.values()) == 200
        assert counts["b"] >= 40 and counts["c"] >= 40, f"both backends take a share: {counts}"
        # The backend sees the client pod's own address, also across nodes.
        seen = {await ask(a.netns, "10.96.0.10", 9080) for _ in range(10)}
        assert {peer for _, peer in seen} == {str(a.ip)}
        # Processes in the node namespace reach the VIP too (nat OUTPUT).
        counts = await ask_many(node2.netns, "10.96.0.10", 40, port=9080)
        assert set(counts) == {"b", "c"}, counts
        # No backends, or a port the Service does not have: refused at once, from a pod and a node.
        for client, port in ((a.netns, 9080), (node1.netns, 9080), (c.netns, 9080), (a.netns, 1234)):
            with pytest.raises(ConnectionRefusedError):
                await ask(client, "10.96.0.11", port)
        with pytest.raises(ConnectionRefusedError):
            await ask(a.netns, "10.96.0.10", 9081)
        # Hairpin: a pod reaching itself through a VIP gets an answer (seen from its node's gateway).
        itself = ServiceVip(IP("10.96.0.12"), 80, "TCP", ((b.ip, PORT),))
        network.sync_services(node1, [reviews, empty, itself])
        assert await ask(b.netns, "10.96.0.12", 80) == ("b", str(node1.gateway))
    finally:
        await servers.close()


async def test_sync_services_is_idempotent_and_replaces_backends(network: LabNetwork) -> None:
    node1, _, pods = build(network)
    b, c = pods["b"], pods["c"]
    node = Netns(node1.netns)
    both = [ServiceVip(IP("10.96.0.10"), 9080, "TCP", ((b.ip, PORT), (c.ip, PORT)))]

    def state() -> tuple[str, str]:
        save = "\n".join(
            line for line in node.exec(["iptables-save"]).stdout.splitlines() if not line.startswith("#")
        )
        return save, node.ip("route", "show")

    network.sync_services(node1, both)
    first = state()
    network.sync_services(node1, both)
    assert state() == first, "a second sync changes nothing"
    assert verify(both, first[0]) == ()
    assert "10.96.0.10 dev eth0 proto 76 scope link" in first[1]

    only_c = [ServiceVip(IP("10.96.0.10"), 9080, "TCP", ((c.ip, PORT),))]
    network.sync_services(node1, only_c)
    assert verify(only_c, state()[0]) == ()
    servers = Servers()
    try:
        await servers.start(b.netns, "b")
        await servers.start(c.netns, "c")
        assert await ask_many(pods["a"].netns, "10.96.0.10", 30, port=9080) == {"c": 30}
    finally:
        await servers.close()

    moved = [ServiceVip(IP("10.96.0.20"), 80, "UDP", ((b.ip, 53),))]
    network.sync_services(node1, moved)
    save, routes = state()
    assert verify(moved, save) == ()
    assert "10.96.0.10" not in save and "10.96.0.10" not in routes, "the old VIP is gone entirely"
    assert "10.96.0.20 dev eth0 proto 76 scope link" in routes

    network.clear_services(node1)
    save, routes = state()
    assert "LOOM-" not in save and "proto 76" not in routes
    network.clear_services(node1)
    assert state() == (save, routes)


def test_resolv_conf_is_what_the_pod_sees(network: LabNetwork) -> None:
    _, _, pods = build(network)
    a = pods["a"]
    network.write_resolv_conf(a.netns, network.controller_ip, "default")
    inside = Netns(a.netns).exec(["cat", "/etc/resolv.conf"]).stdout
    assert inside == render_resolv_conf(network.controller_ip, "default")
    assert "search default.svc.cluster.local svc.cluster.local cluster.local" in inside
    network.write_resolv_conf(a.netns, network.controller_ip, "bookinfo")
    assert "search bookinfo.svc.cluster.local" in Netns(a.netns).exec(["cat", "/etc/resolv.conf"]).stdout
    assert os.listdir(os.path.join(ETC_NETNS_DIR, a.netns)) == ["resolv.conf"], "no temporary file left"
    network.delete_pod_netns(a)
    assert etc_netns_entries(network.prefix) == []


def test_pods_are_built_idempotently_and_conflicts_are_refused(network: LabNetwork) -> None:
    node1, node2, pods = build(network)
    a = pods["a"]
    assert network.add_pod_netns(node1, a.netns, "10.80.1.2") == a, "the same pod again is a no-op"
    assert network.ensure_node("node-1", 1) == node1
    assert network.ensure_controller() == network.controller_netns

    with pytest.raises(
        LabNetworkError, match=rf"10.80.1.2 on node node-1 is already used by namespace {a.netns}"
    ):
        network.add_pod_netns(node1, f"{network.prefix}-other", "10.80.1.2")
    with pytest.raises(LabNetworkError, match="already has an eth0"):
        network.add_pod_netns(node1, a.netns, "10.80.1.9")
    with pytest.raises(LabNetworkError, match="already has an eth0"):
        network.add_pod_netns(node1, node2.netns, "10.80.1.9")
    with pytest.raises(ValueError, match="not a pod address of node node-1"):
        network.add_pod_netns(node1, f"{network.prefix}-x", "10.80.2.9")
    with pytest.raises(ValueError, match="not a pod address"):
        network.add_pod_netns(node1, f"{network.prefix}-x", node1.gateway)
    with pytest.raises(LabNetworkError, match="index 1 is already used"):
        network.ensure_node("node-3", 1)
    with pytest.raises(LabNetworkError, match="already attached to the wire as n1"):
        network.ensure_node("node-1", 3)
    with pytest.raises(LabNetworkError, match="call ensure_node"):
        network.add_pod_netns(network.node_net("node-9", 9), f"{network.prefix}-x", "10.80.9.2")

    prev = network.pod_interface(node1, a.netns, a.ip)
    assert validate_prev_result(prev) is prev
    assert pod_ips(prev) == (a.ip,)
    assert prev["interfaces"][1]["sandbox"] == a.netns_path == f"/var/run/netns/{a.netns}"
    assert prev["ips"] == [{"address": "10.80.1.2/32", "gateway": "10.80.1.1", "interface": 1}]
    links = Netns(a.netns).ip_json("link", "show", "eth0")
    assert prev["interfaces"][1]["mac"] == links[0]["address"]

    # Deleting twice is fine; the address is free again, and a stale delete never hits the new pod.
    network.delete_pod_netns(a)
    network.delete_pod_netns(a)
    assert not Netns(a.netns).exists()
    with pytest.raises(LabNetworkError, match="is not built"):
        network.pod_interface(node1, a.netns, a.ip)
    again = network.add_pod_netns(node1, f"{network.prefix}-a2", "10.80.1.2")
    network.delete_pod_netns(PodNet(a.netns, "node-1", a.ip, "", a.netns_path))
    assert network.pods(node1) == [again, pods["b"]]


async def test_a_new_process_recovers_the_lab_and_sweep_removes_everything(network: LabNetwork) -> None:
    node1, node2, pods = build(network)
    network.sync_services(node1, [ServiceVip(IP("10.96.0.10"), 80, "TCP", ((pods["c"].ip, PORT),))])
    network.write_resolv_conf(pods["a"].netns, network.controller_ip, "default")
    prefix = network.prefix
    del network  # a crash: nothing is left of the process that built the lab but the kernel's state

    fresh = LabNetwork(prefix)
    assert fresh.nodes() == [node1, node2]
    assert fresh.pods(node1) == [pods["a"], pods["b"]]
    assert fresh.ensure_node("node-2", 2) == node2
    assert fresh.add_pod_netns(node2, pods["c"].netns, pods["c"].ip) == pods["c"]
    # A node added later gets routes to and from every existing node and the controller.
    node3 = fresh.ensure_node("node-3", 3)
    d = fresh.add_pod_netns(node3, f"{prefix}-d", "10.80.3.2")
    servers = Servers()
    try:
        await servers.start(d.netns, "d")
        await servers.start(pods["a"].netns, "a")
        assert await ask(pods["a"].netns, str(d.ip)) == ("d", str(pods["a"].ip))
        assert await ask(d.netns, str(pods["a"].ip)) == ("a", str(d.ip))
        assert await ask(fresh.controller_netns, str(d.ip)) == ("d", str(fresh.controller_ip))
    finally:
        await servers.close()

    # An `ip netns add` interrupted before the namespace was mounted leaves a bare file behind.
    make_bare_netns_file(f"{prefix}-stale")
    removed = fresh.sweep()
    expected = {f"netns {prefix}-{name}" for name in ("wire", "cp", "node-1", "node-2", "node-3")}
    expected |= {f"netns {prefix}-{name}" for name in ("a", "b", "c", "d", "stale")}
    expected.add(os.path.join(ETC_NETNS_DIR, f"{prefix}-a"))
    assert set(removed) == expected
    assert list_namespaces(prefix + "-") == [] and etc_netns_entries(prefix) == []
    assert fresh.sweep() == [], "sweeping again finds nothing"
    assert fresh.nodes() == []


def test_a_stale_namespace_file_is_replaced_when_building(network: LabNetwork) -> None:
    make_bare_netns_file(f"{network.prefix}-node-1")
    node = network.ensure_node("node-1", 1)
    assert Netns(node.netns).ip_json("addr", "show", "eth0")[0]["addr_info"][0]["local"] == "10.79.0.1"


def test_prerequisites_are_met_here_and_the_probe_leaves_nothing() -> None:
    before = list_namespaces()
    assert check_prerequisites() == []
    assert list_namespaces() == before
