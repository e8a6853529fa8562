"""Network-namespace building blocks for root tests (and the lab): nodes, pods, a wire between nodes.

Theory of operation
-------------------
Everything lives in namespaces this module creates; the root namespace's addresses, routes and
netfilter rules are never touched, and no namespace has a route out of the machine. The topology::

    <prefix>-wire        bridge br0; one port per node (n<i>)            no addresses
        | veth
    <prefix>-<node>      eth0 = 10.79.0.<i>/24 on the wire; ip_forward=1; a route to every other
        | veth per pod   node's pod range via that node's wire address; per pod: p<k> with the
        |                node's pod gateway <range>.1/32 and a /32 route to the pod
    <prefix>-<pod>       eth0 = <range>.<k>/32, routes: gateway on-link, default via the gateway

Node i's pod range is 10.80.<i>.0/24 (the node network and pod supernet can be changed). The same
gateway address sits on every pod veth of a node, so each pod resolves its gateway on its own link,
and the node routes between its pods, and to other nodes over the bridge, with plain forwarding.

Dual stack (`NetnsLab(ipv6=True)`): every node and pod also gets an IPv6 address, laid out the same
way: node i is fd10:79::<i>/64 on the wire and routes fd10:80:0:<i>::/64 to its pods; a pod is
fd10:80:0:<i>::<k>/128 (k as in its IPv4 address) with its default route via fe80::1, the link-local
gateway on every pod veth of its node. Duplicate address detection is off in every lab namespace, so
addresses are usable at once (nothing else shares these links).

Sysctls: only ip_forward=1 (and, dual stack, IPv6 forwarding) in node namespaces. The in-pod rules
need neither route_localnet (nothing is redirected to 127.0.0.1 from PREROUTING; REDIRECT targets the
interface address) nor a relaxed rp_filter (every path passes strict reverse-path checks: pod traffic
returns the way it came, and the replies of ztunnel's spoofed-source connections are delivered over
loopback, where no reverse-path check applies).

Tooling choices: links, addresses and routes are configured with iproute2's `ip -n <netns>`, which
refuses to act on a namespace that does not exist. (pyroute2's `IPRoute(netns=...)` silently *creates* a
missing namespace by default, which would turn a cleanup race into a leak, and a pyroute2 socket opened
on a thread that has switched namespace is not bound to that namespace.) iptables-restore and
iptables-save run through `ip netns exec`. The command runner and the `ip -n` primitives are the
production ones of `loom.lab.network` (`Netns` extends its `NamedNetns`), re-exported here. Python
callables run inside a namespace on a dedicated switcher thread (`ztunnel.inpod.netns.NetnsSwitcher`),
which always switches back.

Cleanup: `NetnsLab` records every namespace as soon as it exists and `close()` removes them all (links
die with their namespace; pod veths are deleted explicitly because an open fd can keep a pod namespace
alive after its name is gone). `cleanup_prefix(prefix)` sweeps what a crashed run left behind. Use a
unique prefix per test (the default is "lt" + random hex) so concurrent runs never collide.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cni.rules import InpodRules, IpFamily
from loom.hbone import listening_socket
from loom.hbone.headers import IPAddress
from loom.lab.network import (
    COMMAND_TIMEOUT,
    DEFAULT_NODE_NETWORK,
    DEFAULT_POD_SUPERNET,
    NETNS_RUN_DIR,
    NamedNetns,
    NetnsCommandError,
    list_namespaces,
    run_command,
    sysctl_path,
)
from ztunnel.inpod.netns import NetnsSwitcher

__all__ = [
    "COMMAND_TIMEOUT",
    "DEFAULT_NODE_NETWORK",
    "DEFAULT_POD_SUPERNET",
    "NETNS_RUN_DIR",
    "Netns",
    "NetnsCommandError",
    "NetnsLab",
    "Node",
    "Pod",
    "apply_inpod_rules",
    "cleanup_prefix",
    "list_namespaces",
    "remove_inpod_rules",
    "run_command",
]

T = TypeVar("T")

DEFAULT_NODE_NETWORK_V6 = "fd10:79::/64"
DEFAULT_POD_SUPERNET_V6 = "fd10:80::/48"
POD_GATEWAY_V6 = "fe80::1"  # link-local, on every pod veth of a node (as Calico's fe80::ecee:eeff:...)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{2,15}$")

_switcher: NetnsSwitcher | None = None


def _testing_switcher() -> NetnsSwitcher:
    # Separate from ztunnel's default switcher, so test scaffolding never queues behind (or ahead of)
    # the code under test.
    global _switcher
    if _switcher is None:
        _switcher = NetnsSwitcher("test-netns")
    return _switcher


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace named `<prefix>-...` (leftovers of a crashed run); returns their names."""
    if not _PREFIX.match(prefix):
        # A short or odd prefix could match namespaces that are not ours.
        raise ValueError(f"refusing to sweep namespaces with prefix {prefix!r}: need [a-z][a-z0-9]{{2,15}}")
    removed = []
    for name in list_namespaces(prefix + "-"):
        run_command(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


@dataclass(frozen=True, slots=True)
class Netns(NamedNetns):
    """A named network namespace (/var/run/netns/<name>): the production `NamedNetns` (path, `ip -n`,
    `ip netns exec`) plus what tests need (running Python inside it, sysctls, sockets, iptables)."""

    def run(self, fn: Callable[[], T], timeout: float = COMMAND_TIMEOUT) -> T:
        """Run `fn` on a thread switched into this namespace; keep `fn` short (it blocks that thread)."""
        fd = self.open_fd()
        try:
            return _testing_switcher().call(fd, fn, timeout)
        finally:
            os.close(fd)

    async def arun(self, fn: Callable[[], T]) -> T:
        """`run` without blocking the event loop."""
        fd = self.open_fd()
        try:
            return await _testing_switcher().run(fd, fn)
        finally:
            os.close(fd)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a (per-namespace) sysctl such as net.ipv4.ip_forward."""
        path = sysctl_path(key)

        def write() -> None:
            with open(path, "w") as handle:
                handle.write(f"{value}\n")

        self.run(write)

    def read_sysctl(self, key: str) -> str:
        path = sysctl_path(key)

        def read() -> str:
            with open(path) as handle:
                return handle.read().strip()

        return self.run(read)

    def iptables_save(self, family: IpFamily = IpFamily.V4) -> str:
        return self.exec([family.save_command]).stdout

    def iptables_restore(self, text: str, family: IpFamily = IpFamily.V4) -> None:
        """Apply restore input without flushing what is not mentioned (--noflush); atomic per table."""
        if text:
            self.exec([family.restore_command, "--noflush"], input=text)

    def tcp_socket(
        self, family: socket.AddressFamily = socket.AF_INET, *, mark: int | None = None
    ) -> socket.socket:
        """A TCP socket created inside this namespace (it stays bound to it), optionally with SO_MARK."""

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            return sock

        return self.run(make)

    def listen(self, host: str, port: int, *, backlog: int = 64) -> socket.socket:
        """A non-blocking TCP listener inside this namespace (an IPv6 one takes IPv6 only, so "::" and
        "0.0.0.0" can listen on the same port side by side)."""
        return self.run(lambda: listening_socket(host, port, backlog))

    async def open_connection(
        self, host: str, port: int, *, mark: int | None = None, connect_timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An asyncio stream connected from inside this namespace."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)
            return sock

        sock = await self.arun(make)
        try:
            async with asyncio.timeout(connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    netns: Netns
    index: int
    pod_cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address  # on every pod veth of this node; the pods' default gateway
    wire_ip: ipaddress.IPv4Address  # this node's address on the bridge between nodes
    pod_cidr6: ipaddress.IPv6Network | None = None  # dual stack only
    wire_ip6: ipaddress.IPv6Address | None = None


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    netns: Netns
    node: Node
    ip: ipaddress.IPv4Address
    host_veth: str  # the node-side end of the pod's veth pair
    ip6: ipaddress.IPv6Address | None = None  # dual stack only

    @property
    def address(self) -> str:
        return str(self.ip)

    @property
    def address6(self) -> str:
        if self.ip6 is None:
            raise ValueError(f"pod {self.name} has no IPv6 address (the lab is not dual stack)")
        return str(self.ip6)

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        """Every address of the pod, IPv4 first (as status.podIPs lists them)."""
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)


@dataclass
class _NodeState:
    node: Node
    next_pod_veth: int = 0
    used_hosts: set[int] = field(default_factory=set)


def apply_inpod_rules(
    netns: Netns, rules: InpodRules | None = None, families: Sequence[IpFamily] = (IpFamily.V4,)
) -> None:
    """Install (or re-install, idempotently) the in-pod redirection rules and policy routing."""
    rules = rules if rules is not None else InpodRules()
    for family in families:
        netns.iptables_restore(rules.iptables_restore(family, netns.iptables_save(family)), family)
        policy_rule = rules.policy_rule(family)
        if not policy_rule.found_in(netns.ip_json(family.ip_flag, "rule", "show")):
            netns.ip(*policy_rule.ip_args("add"))
        netns.ip(*rules.local_route(family).ip_args("replace"))


def remove_inpod_rules(
    netns: Netns, rules: InpodRules | None = None, families: Sequence[IpFamily] = (IpFamily.V4,)
) -> None:
    """Remove the in-pod rules, policy rule and route; a no-op where they are absent."""
    rules = rules if rules is not None else InpodRules()
    for family in families:
        netns.iptables_restore(rules.removal_restore(family, netns.iptables_save(family)), family)
        policy_rule = rules.policy_rule(family)
        while policy_rule.found_in(netns.ip_json(family.ip_flag, "rule", "show")):
            netns.ip(*policy_rule.ip_args("del"))
        route = rules.local_route(family)
        if route.found_in(netns.ip_json(family.ip_flag, "route", "show", "table", str(route.table))):
            netns.ip(*route.ip_args("del"))


class NetnsLab:
    """Builds nodes, pods and the wire between nodes; `close()` (or leaving the `with`) removes it all."""

    def __init__(
        self,
        prefix: str | None = None,
        *,
        node_network: str = DEFAULT_NODE_NETWORK,
        pod_supernet: str = DEFAULT_POD_SUPERNET,
        ipv6: bool = False,
    ) -> None:
        self.prefix = prefix if prefix is not None else "lt" + secrets.token_hex(3)
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"namespace prefix {self.prefix!r} must match [a-z][a-z0-9]{{2,15}}")
        self._node_network = ipaddress.IPv4Network(node_network)
        self._pod_ranges = list(ipaddress.IPv4Network(pod_supernet).subnets(new_prefix=24))
        self.ipv6 = ipv6
        self._node_network6 = ipaddress.IPv6Network(DEFAULT_NODE_NETWORK_V6)
        self._pod_supernet6 = ipaddress.IPv6Network(DEFAULT_POD_SUPERNET_V6)
        self._created: list[Netns] = []  # in creation order; removed in reverse
        self._nodes: dict[str, _NodeState] = {}
        self._pods: dict[str, Pod] = {}
        self._wire: Netns | None = None
        self._closed = False

    # -- inventory --------------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        return [state.node for state in self._nodes.values()]

    @property
    def pods(self) -> list[Pod]:
        return list(self._pods.values())

    @property
    def wire(self) -> Netns | None:
        return self._wire

    def namespaces(self) -> list[str]:
        """Names of the namespaces this lab created that still exist."""
        return [ns.name for ns in self._created if ns.exists()]

    # -- building ---------------------------------------------------------------------------------------

    def namespace(self, name: str) -> Netns:
        """A new, empty namespace (loopback up) named <prefix>-<name>."""
        if self._closed:
            raise RuntimeError("the lab is closed")
        if not _NAME.match(name):
            raise ValueError(f"namespace name {name!r} must be lower-case letters, digits and '-' (max 42)")
        netns = Netns(f"{self.prefix}-{name}")
        if netns.exists():
            raise ValueError(f"namespace {netns.name} already exists")
        run_command(["ip", "netns", "add", netns.name])
        self._created.append(netns)
        if self.ipv6:
            # Before any link exists, so every interface made or moved here starts without DAD.
            for scope in ("all", "default"):
                netns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)
        netns.ip("link", "set", "lo", "up")
        return netns

    def add_node(self, name: str) -> Node:
        index = len(self._nodes) + 1
        if name in self._nodes or name in self._pods:
            raise ValueError(f"name {name!r} is already used in this lab")
        if index >= len(self._pod_ranges) or index >= self._node_network.num_addresses - 1:
            raise ValueError(f"no address range left for node {name!r}")
        pod_cidr = self._pod_ranges[index]
        node = Node(
            name=name,
            netns=self.namespace(name),
            index=index,
            pod_cidr=pod_cidr,
            gateway=pod_cidr.network_address + 1,
            wire_ip=self._node_network.network_address + index,
            pod_cidr6=(
                ipaddress.IPv6Network((int(self._pod_supernet6.network_address) + (index << 64), 64))
                if self.ipv6
                else None
            ),
            wire_ip6=self._node_network6.network_address + index if self.ipv6 else None,
        )
        self._nodes[name] = _NodeState(node, used_hosts={0, 1, pod_cidr.num_addresses - 1})
        node.netns.sysctl("net.ipv4.ip_forward", 1)  # the node routes for its pods
        wire = self._ensure_wire()
        node.netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", f"n{index}", "netns", wire.name)
        wire.ip_batch([f"link set n{index} master br0", f"link set n{index} up"])
        commands = [f"addr add {node.wire_ip}/{self._node_network.prefixlen} dev eth0", "link set eth0 up"]
        if node.wire_ip6 is not None:
            node.netns.sysctl("net.ipv6.conf.all.forwarding", 1)
            commands.append(f"addr add {node.wire_ip6}/{self._node_network6.prefixlen} dev eth0 nodad")
        for other in self.nodes:
            if other.name == name:
                continue
            commands.append(f"route add {other.pod_cidr} via {other.wire_ip} dev eth0")
            other.netns.ip("route", "add", str(pod_cidr), "via", str(node.wire_ip), "dev", "eth0")
            if other.wire_ip6 is not None and node.wire_ip6 is not None:
                commands.append(f"route add {other.pod_cidr6} via {other.wire_ip6} dev eth0")
                other.netns.ip("route", "add", str(node.pod_cidr6), "via", str(node.wire_ip6), "dev", "eth0")
        node.netns.ip_batch(commands)
        return node

    def _ensure_wire(self) -> Netns:
        if self._wire is None:
            wire = self.namespace("wire")
            wire.ip_batch(["link add br0 type bridge", "link set br0 up"])
            self._wire = wire
        return self._wire

    def add_pod(self, node: Node, name: str, ip: str | None = None) -> Pod:
        """A pod namespace on `node`, with a veth to it and an address from the node's pod range."""
        if name in self._pods or name in self._nodes:
            raise ValueError(f"name {name!r} is already used in this lab")
        state = self._nodes[node.name]
        address = self._pick_address(state, ip)
        state.next_pod_veth += 1
        host_veth = f"p{state.next_pod_veth}"
        netns = self.namespace(name)
        state.used_hosts.add(int(address) - int(node.pod_cidr.network_address))
        node.netns.ip("link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns.name)
        node.netns.ip_batch(
            [
                f"addr add {node.gateway}/32 dev {host_veth}",
                f"link set {host_veth} up",
                f"route add {address}/32 dev {host_veth} scope link",
            ]
        )
        netns.ip_batch(
            [
                f"addr add {address}/32 dev eth0",
                "link set eth0 up",
                f"route add {node.gateway} dev eth0 scope link",
                f"route add default via {node.gateway} dev eth0",
            ]
        )
        address6 = None
        if node.pod_cidr6 is not None:
            address6 = node.pod_cidr6.network_address + (int(address) - int(node.pod_cidr.network_address))
            node.netns.ip_batch(
                [
                    f"addr add {POD_GATEWAY_V6}/64 dev {host_veth} nodad",
                    f"route add {address6}/128 dev {host_veth}",
                ]
            )
            netns.ip_batch(
                [
                    f"addr add {address6}/128 dev eth0 nodad",
                    f"route add default via {POD_GATEWAY_V6} dev eth0",
                ]
            )
        pod = Pod(name, netns, node, address, host_veth, address6)
        self._pods[name] = pod
        return pod

    def _pick_address(self, state: _NodeState, ip: str | None) -> ipaddress.IPv4Address:
        cidr = state.node.pod_cidr
        if ip is not None:
            address = ipaddress.IPv4Address(ip)
            offset = int(address) - int(cidr.network_address)
            if address not in cidr or offset in state.used_hosts:
                raise ValueError(f"{ip} is not a free pod address in {cidr} on node {state.node.name}")
            return address
        for offset in range(2, cidr.num_addresses - 1):
            if offset not in state.used_hosts:
                return cidr.network_address + offset
        raise ValueError(f"node {state.node.name} has no free pod address in {cidr}")

    def delete_pod(self, pod: Pod) -> None:
        """Remove the pod: its veth (even if something still holds the namespace open) and namespace."""
        if self._pods.get(pod.name) is not pod:
            raise ValueError(f"pod {pod.name!r} is not in this lab")
        del self._pods[pod.name]
        state = self._nodes[pod.node.name]
        state.used_hosts.discard(int(pod.ip) - int(pod.node.pod_cidr.network_address))
        pod.node.netns.ip("link", "del", pod.host_veth, check=False)
        run_command(["ip", "netns", "del", pod.netns.name])
        self._created.remove(pod.netns)

    def recreate_pod(self, pod: Pod) -> Pod:
        """The same pod (name, node, IP) in a brand-new namespace, like a recreated pod sandbox."""
        self.delete_pod(pod)
        return self.add_pod(pod.node, pod.name, str(pod.ip))

    # -- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every namespace this lab created (idempotent); raises if any could not be removed."""
        self._closed = True
        failures = []
        for pod in list(self._pods.values()):
            pod.node.netns.ip("link", "del", pod.host_veth, check=False)
        for netns in reversed(self._created):
            if netns.exists():
                result = run_command(["ip", "netns", "del", netns.name], check=False)
                if result.returncode != 0 and netns.exists():
                    failures.append(f"{netns.name}: {result.stderr.strip()}")
        self._created.clear()
        self._pods.clear()
        self._nodes.clear()
        self._wire = None
        if failures:
            raise NetnsCommandError("could not remove namespaces: " + "; ".join(failures))

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
