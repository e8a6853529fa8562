"""The lab's network: namespaces, the wire between nodes, pod interfaces and Service VIPs.

Theory of operation
-------------------
A lab cluster lives entirely in network namespaces this module creates; the root namespace's
addresses, routes and netfilter rules are never touched (every command runs as `ip -n <netns>` or
`ip netns exec <netns>` on a namespace of the lab), and no lab namespace has a route out of the machine.
The topology, with the default prefix "loom", node network 10.79.0.0/24 and pod supernet 10.80.0.0/16::

    loom-wire      bridge br0; one port per node (n<i>) and one for the controller (cp); no addresses
       | veth
    loom-<node>    eth0 = 10.79.0.<i>/24 on the wire; net.ipv4.ip_forward=1; for every other node j
       |           a route 10.80.<j>.0/24 via 10.79.0.<j>; per pod a host veth p<o3>-<o4> (the last two
       |           octets of the pod IP) holding the gateway 10.80.<i>.1/32 and a /32 route to the pod;
       | veth      per Service VIP a /32 route (protocol 76) and the rules of `loom.lab.services`
    <pod netns>    eth0 = 10.80.<i>.<k>/32; routes: the gateway on-link, default via the gateway
    loom-cp        eth0 = 10.79.0.254/24 (the last usable address of the node network): the controller and
                   the lab DNS; a route to every node's pod range via that node

The same gateway address sits on every pod veth of a node, so each pod resolves its gateway on its own
link and the node routes between its pods, and to other nodes over the bridge, with plain forwarding and
no NAT: every pod keeps its address end to end (`loom.lab.services` explains the return path of
Service traffic).

Service VIP routes
------------------
`sync_services` writes the kube-proxy-like rules of `loom.lab.services` and gives every VIP a /32 route
on the node's wire interface (marked with routing protocol 76, so the routes it owns are found again).
The route is needed because routing happens before netfilter's FORWARD hook and, for local processes,
before nat OUTPUT: without it a VIP with no backends would fail the routing lookup ("no route to host")
instead of being refused, and processes in the node namespace could not reach any VIP. On the wire
interface the first lookup picks the node's wire address as source, which backends can answer. No
packet to a VIP ever leaves over that route: filter rejects whatever nat did not translate. (A dummy
device would be the classic sink, but lab kernels may lack the module; a `local` route would hand
stray VIP packets to sockets listening on the node.)

State and recovery
------------------
The kernel is the only state: every call works from a fresh process, checks before it creates and
uses `replace` for addresses and routes, so repeating a call (after a crash half-way, or in a later
`loomctl` run) converges on the same result. Nodes are found again from the wire: each port n<i> is
one end of a veth whose other end is `eth0` in the node's namespace, and the kernel reports that
namespace (the link's netnsid, named by `ip netns list-id`). Pods are found the same way from the host
veths in their node. A file in /var/run/netns that is not a usable namespace (an interrupted
`ip netns add`) is replaced. `sweep()` removes, for a prefix, every namespace, every link in them
(links die with their namespace, but a process still holding a namespace open would keep its links
alive and connected) and every /etc/netns directory: what is left after a crash is found by name.

Names: the prefix is 2-12 characters `[a-z][a-z0-9]*` (no '-', so `<prefix>-` never matches another
lab's names); node names are DNS-label-like; pod namespaces are named by the caller and must start
with `<prefix>-`, so that `sweep()` finds them. Interface names stay within Linux's 15 characters.

Tooling: links, addresses and routes are configured with iproute2's `ip -n <netns>`, which refuses to
act on a namespace that does not exist (pyroute2's `IPRoute(netns=...)` silently *creates* a missing
namespace, which would turn a cleanup race into a leak). Rules go through `ip netns exec <netns>
iptables-restore`. The one sysctl (ip_forward) is written from a short-lived thread that enters the
node namespace and then ends, so no thread is ever left in the wrong namespace.

Concurrency: one writer per lab at a time (the caller holds the lab's lock); reads are safe anytime.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from loom.lab.services import (
    ServiceRulesError,
    ServiceVip,
    check_unique,
    render_removal,
    render_restore,
    verify,
    vip_addresses,
)

__all__ = [
    "CLUSTER_DOMAIN",
    "COMMAND_TIMEOUT",
    "DEFAULT_NODE_NETWORK",
    "DEFAULT_POD_SUPERNET",
    "DEFAULT_PREFIX",
    "ETC_NETNS_DIR",
    "NETNS_RUN_DIR",
    "LabNetwork",
    "LabNetworkError",
    "NamedNetns",
    "NetnsCommandError",
    "NodeNet",
    "PodNet",
    "ServiceRulesError",
    "ServiceVip",
    "check_prerequisites",
    "host_veth_name",
    "list_namespaces",
    "render_resolv_conf",
    "run_command",
    "run_in_netns",
    "sysctl_path",
    "write_sysctl",
]

T = TypeVar("T")
IPAddressLike = str | ipaddress.IPv4Address | ipaddress.IPv6Address

NETNS_RUN_DIR: Final = "/var/run/netns"
# `ip netns exec <netns>` bind-mounts every file of /etc/netns/<netns>/ over the same file in /etc.
ETC_NETNS_DIR: Final = "/etc/netns"
# Every external command gets this long before it counts as hung.
COMMAND_TIMEOUT: Final = 10.0
DEFAULT_PREFIX: Final = "loom"
DEFAULT_NODE_NETWORK: Final = "10.79.0.0/24"
DEFAULT_POD_SUPERNET: Final = "10.80.0.0/16"
CLUSTER_DOMAIN: Final = "cluster.local"
CNI_VERSION: Final = "1.0.0"
WIRE_BRIDGE: Final = "br0"
# The wire-side end of the controller's veth (node ports are n<index>).
CONTROLLER_PORT: Final = "cp"
# The node's (and the controller's) end of its veth to the wire, and the pod's end of its veth.
WIRE_IFNAME: Final = "eth0"
POD_IFNAME: Final = "eth0"
# Routing protocol number marking the per-VIP routes sync_services owns (any number the kernel and
# routing daemons do not use; 76 is unassigned in iproute2's rt_protos).
SERVICE_ROUTE_PROTOCOL: Final = 76
# iptables-restore waits this long for the xtables lock (iptables-legacy shares one lock file between
# all namespaces, so two nodes synced at once would otherwise fail).
IPTABLES_WAIT_SECONDS: Final = 5
CLONE_NEWNET: Final = 0x40000000

_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,11}$")
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_RESERVED_NODE_NAMES: Final = frozenset({"wire", "cp"})
# What follows "<prefix>-" in a pod namespace name: a file name in /var/run/netns and /etc/netns.
_POD_NETNS_SUFFIX = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,198}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_WIRE_PORT = re.compile(r"^n([1-9][0-9]{0,2})$")
_HOST_VETH = re.compile(r"^p([0-9]{1,3})-([0-9]{1,3})$")
_SYSCTL = re.compile(r"^net(\.[a-z0-9_*-]+)+$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class LabNetworkError(RuntimeError):
    """The lab network cannot be built as asked (a conflict with what exists, a missing piece)."""


class NetnsCommandError(LabNetworkError):
    """An `ip`/iptables command failed or hung; carries the command line and its stderr."""


# -- commands ---------------------------------------------------------------------------------------


def run_command(
    argv: Sequence[str], *, input: str | None = None, timeout: float = COMMAND_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `argv` (never through a shell), capturing text output; raise NetnsCommandError on failure
    (when `check`) or when it does not finish within `timeout` seconds."""
    try:
        result = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetnsCommandError(f"{' '.join(argv)} did not finish within {timeout} s") from None
    except OSError as exc:
        raise NetnsCommandError(f"{' '.join(argv)} could not be started: {exc}") from None
    if check and result.returncode != 0:
        raise NetnsCommandError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def list_namespaces(prefix: str = "") -> list[str]:
    """Named namespaces (those in /var/run/netns) whose name starts with `prefix`."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))


def sysctl_path(key: str) -> str:
    """/proc/sys path of a per-namespace sysctl such as net.ipv4.ip_forward (only net.* keys)."""
    if not _SYSCTL.match(key):
        raise ValueError(f"{key!r} is not a per-namespace sysctl name (net.*)")
    return "/proc/sys/" + key.replace(".", "/")


def run_in_netns(netns: str, fn: Callable[[], T], timeout: float = COMMAND_TIMEOUT) -> T:
    """Run `fn` on a new thread that enters the named namespace and then ends.

    A thread's network namespace is its own (setns moves the calling thread only); a thread that never
    returns to a pool cannot leak its namespace into later work. Keep `fn` short."""
    path = os.path.join(NETNS_RUN_DIR, netns)
    results: list[T] = []
    errors: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns into {netns}: {os.strerror(code)}")
            finally:
                os.close(fd)
            results.append(fn())
        except BaseException as exc:  # handed to the caller's thread below
            errors.append(exc)

    thread = threading.Thread(target=enter_and_call, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NetnsCommandError(f"work inside namespace {netns} did not finish within {timeout} s")
    if errors:
        raise errors[0]
    return results[0]


def write_sysctl(netns: str, key: str, value: str | int) -> None:
    """Set a per-namespace sysctl (net.*) inside `netns`."""
    path = sysctl_path(key)

    def write() -> None:
        with open(path, "w") as handle:
            handle.write(f"{value}\n")

    run_in_netns(netns, write)


@dataclass(frozen=True, slots=True)
class NamedNetns:
    """A named network namespace (/var/run/netns/<name>) and the iproute2 commands run against it."""

    name: str

    @property
    def path(self) -> str:
        return os.path.join(NETNS_RUN_DIR, self.name)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def open_fd(self) -> int:
        """A new fd for the namespace (O_CLOEXEC); the caller closes it."""
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def ip(self, *args: str, check: bool = True) -> str:
        """`ip -n <name> <args>`; returns stdout."""
        return run_command(["ip", "-n", self.name, *args], check=check).stdout

    def ip_batch(self, commands: Sequence[str]) -> None:
        """Several `ip` commands in one process (`ip -n <name> -batch -`), stopping at the first failure."""
        if commands:
            run_command(["ip", "-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n")

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        output = self.ip("-j", *args).strip()
        parsed = json.loads(output) if output else []
        if not isinstance(parsed, list):
            raise NetnsCommandError(f"ip -j {' '.join(args)} in {self.name} did not print a JSON list")
        return parsed

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (`ip netns exec`)."""
        return run_command(
            ["ip", "netns", "exec", self.name, *argv], input=input, check=check, timeout=timeout
        )

    def links(self) -> dict[str, dict[str, Any]]:
        """Every link in the namespace by name (`ip -j link show`)."""
        return {str(link["ifname"]): link for link in self.ip_json("link", "show")}

    def peer_namespaces(self) -> dict[int, str]:
        """netnsid (as this namespace numbers other namespaces) -> name, for the named ones."""
        return {
            int(entry["nsid"]): str(entry["name"])
            for entry in self.ip_json("netns", "list-id")
            if "nsid" in entry and "name" in entry
        }

    def peers(self, links: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str | None]:
        """Link name -> name of the namespace holding its veth peer, for links whose peer is in another
        namespace (None: that namespace has no name any more, e.g. deleted but still held open)."""
        links = self.links() if links is None else links
        names = self.peer_namespaces()
        return {
            name: names.get(int(link["link_netnsid"]))
            for name, link in links.items()
            if "link_netnsid" in link
        }


# -- addressing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeNet:
    """A node's place in the lab network (all derived from its name and index)."""

    name: str  # the node's name, e.g. "node-1"
    netns: str  # its namespace, "<prefix>-<name>"
    index: int  # 1-based; selects its wire address and pod range
    wire_ip: ipaddress.IPv4Address  # its address on the bridge between nodes, <node network> + index
    pod_cidr: ipaddress.IPv4Network  # its pods' range, the index-th /24 of the pod supernet
    gateway: ipaddress.IPv4Address  # the first address of pod_cidr, on every pod veth of the node


@dataclass(frozen=True, slots=True)
class PodNet:
    """A pod's network namespace and interface as built by `LabNetwork.add_pod_netns`."""

    netns: str  # the pod's namespace name
    node: str  # the name of the node it is attached to
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # its address (/32 on its eth0; IPv4 in the lab)
    host_veth: str  # the node-side end of its veth ("" when unknown: derived from `ip`)
    netns_path: str  # /var/run/netns/<netns>: what a runtime passes as CNI_NETNS


def host_veth_name(ip: IPAddressLike) -> str:
    """The node-side veth name of the pod with address `ip`: "p" + its last two octets, e.g. p1-23.

    Unique within a node (a node's pods share the first three octets) and derivable from the address
    alone, so a later process finds the link again; at most 8 characters."""
    address = _ipv4(ip, "pod address")
    octets = address.packed
    return f"p{octets[2]}-{octets[3]}"


def render_resolv_conf(nameserver: IPAddressLike, namespace: str, domain: str = CLUSTER_DOMAIN) -> str:
    """A pod's resolv.conf, as the kubelet writes it for dnsPolicy ClusterFirst."""
    server = _ip(nameserver, "nameserver")
    if not _DNS_LABEL.match(namespace):
        raise ValueError(
            f"namespace {namespace!r} is not a DNS label (lower-case letters, digits, '-', max 63)"
        )
    if not _DOMAIN.match(domain):
        raise ValueError(f"cluster domain {domain!r} is not a DNS name")
    return f"nameserver {server}\nsearch {namespace}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n"


def _ip(value: IPAddressLike, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None


def _ipv4(value: IPAddressLike, what: str) -> ipaddress.IPv4Address:
    address = _ip(value, what)
    if not isinstance(address, ipaddress.IPv4Address):
        raise ValueError(f"{what}: {address} is IPv6; the lab's network is IPv4 only")
    return address


def _ipv4_network(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value!r} is not a network: {exc}") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"{what} {value!r} is IPv6; the lab's network is IPv4 only")
    return network


# -- the lab network --------------------------------------------------------------------------------


class LabNetwork:
    """Idempotent building blocks of the lab network for one prefix; see the module docstring."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        node_network: str = DEFAULT_NODE_NETWORK,
        pod_supernet: str = DEFAULT_POD_SUPERNET,
    ) -> None:
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ValueError(f"lab prefix {prefix!r} must match [a-z][a-z0-9]{{1,11}} (2-12 characters)")
        self._prefix = prefix
        self._node_network = _ipv4_network(node_network, "node network")
        self._pod_supernet = _ipv4_network(pod_supernet, "pod supernet")
        if self._node_network.prefixlen > 30:
            raise ValueError(f"node network {node_network} is too small (need at least a /30)")
        if self._pod_supernet.prefixlen > 23:
            raise ValueError(
                f"pod supernet {pod_supernet} is too small (need at least a /23: one /24 per node)"
            )
        if self._node_network.overlaps(self._pod_supernet):
            raise ValueError(f"node network {node_network} and pod supernet {pod_supernet} overlap")
        # Node i gets <node network> + i; the last usable address is the controller's.
        self._max_index = min(
            self._node_network.num_addresses - 3, self._pod_supernet.num_addresses // 256 - 1
        )

    # -- names and addresses (pure) -------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def node_network(self) -> ipaddress.IPv4Network:
        return self._node_network

    @property
    def pod_supernet(self) -> ipaddress.IPv4Network:
        return self._pod_supernet

    @property
    def max_nodes(self) -> int:
        return self._max_index

    @property
    def wire_netns(self) -> str:
        return f"{self._prefix}-wire"

    @property
    def controller_netns(self) -> str:
        return f"{self._prefix}-cp"

    @property
    def controller_ip(self) -> ipaddress.IPv4Address:
        """The controller's (and lab DNS's) wire address: the node network's last usable address."""
        return self._node_network.broadcast_address - 1

    def node_netns_name(self, name: str) -> str:
        if not isinstance(name, str) or not _NODE_NAME.match(name):
            raise ValueError(
                f"node name {name!r} must be lower-case letters, digits and '-' (max 42, no '-' at the ends)"
            )
        if name in _RESERVED_NODE_NAMES:
            raise ValueError(f"node name {name!r} is reserved for the lab's own namespaces")
        return f"{self._prefix}-{name}"

    def node_net(self, name: str, index: int) -> NodeNet:
        """Where node `name` with `index` sits in the network; computes only, touches nothing."""
        netns = self.node_netns_name(name)
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= self._max_index:
            raise ValueError(f"node {name!r}: index {index!r} must be an integer from 1 to {self._max_index}")
        pod_cidr = ipaddress.IPv4Network((int(self._pod_supernet.network_address) + index * 256, 24))
        return NodeNet(
            name=name,
            netns=netns,
            index=index,
            wire_ip=self._node_network.network_address + index,
            pod_cidr=pod_cidr,
            gateway=pod_cidr.network_address + 1,
        )

    def check_pod_netns_name(self, netns: str) -> str:
        """`netns` if it is a valid pod namespace name of this lab (it starts with "<prefix>-")."""
        own = f"{self._prefix}-"
        if (
            not isinstance(netns, str)
            or not netns.startswith(own)
            or not _POD_NETNS_SUFFIX.match(netns[len(own) :])
        ):
            raise ValueError(
                f"pod namespace {netns!r} must be '{own}' followed by lower-case letters, digits, '.' and '-'"
                " (the prefix lets sweep() find it)"
            )
        if netns in (self.wire_netns, self.controller_netns):
            raise ValueError(f"pod namespace {netns!r} is one of the lab's own namespaces")
        return netns

    # -- wire, nodes, controller ----------------------------------------------------------------------

    def ensure_wire(self) -> None:
        """The wire namespace with its bridge, up."""
        wire = NamedNetns(self.wire_netns)
        _ensure_netns(wire)
        bridge = wire.links().get(WIRE_BRIDGE)
        if bridge is None:
            wire.ip_batch([f"link add {WIRE_BRIDGE} type bridge", f"link set {WIRE_BRIDGE} up"])
        elif "UP" not in bridge.get("flags", ()):
            wire.ip("link", "set", WIRE_BRIDGE, "up")

    def ensure_node(self, name: str, index: int) -> NodeNet:
        """Node `name` with `index`: namespace, veth to the wire, wire address, forwarding, and routes
        between its pod range and every other node's (and the controller's)."""
        node = self.node_net(name, index)
        self.ensure_wire()
        wire = NamedNetns(self.wire_netns)
        ns = NamedNetns(node.netns)
        port = f"n{index}"
        ports = self._wire_ports(wire)
        for other_port, peer in ports.items():
            if peer == node.netns and other_port != port:
                raise LabNetworkError(
                    f"node {name} is already attached to the wire as {other_port}, not with index {index};"
                    f" run sweep() to rebuild the lab with other indices"
                )
        if port in ports and ports[port] != node.netns:
            if ports[port] is not None:
                raise LabNetworkError(f"node index {index} is already used by namespace {ports[port]}")
            # The node namespace behind this port has lost its name (deleted, but held open by a
            # process): nobody can reach it any more, so its attachment is dropped and rebuilt.
            wire.ip("link", "del", port)
            del ports[port]
        _ensure_netns(ns)
        if port not in ports:
            if WIRE_IFNAME in ns.links():
                raise LabNetworkError(
                    f"{node.netns} already has an {WIRE_IFNAME} that is not port {port} of the wire;"
                    " run sweep() to rebuild it"
                )
            ns.ip("link", "add", WIRE_IFNAME, "type", "veth", "peer", "name", port, "netns", wire.name)
        # Before the routes: the node forwards between its pods and the wire.
        write_sysctl(ns.name, "net.ipv4.ip_forward", 1)
        wire.ip_batch([f"link set {port} master {WIRE_BRIDGE}", f"link set {port} up"])
        others = [other for other in self._nodes_from_ports(ports) if other.index != index]
        ns.ip_batch(
            [
                f"addr replace {node.wire_ip}/{self._node_network.prefixlen} dev {WIRE_IFNAME}",
                f"link set {WIRE_IFNAME} up",
            ]
            + [f"route replace {other.pod_cidr} via {other.wire_ip} dev {WIRE_IFNAME}" for other in others]
        )
        back = ("route", "replace", str(node.pod_cidr), "via", str(node.wire_ip), "dev", WIRE_IFNAME)
        for other in others:
            NamedNetns(other.netns).ip(*back)
        if ports.get(CONTROLLER_PORT) == self.controller_netns:
            NamedNetns(self.controller_netns).ip(*back)
        return node

    def ensure_controller(self) -> str:
        """The controller namespace "<prefix>-cp" on the wire at `controller_ip`, with a route to every
        node's pod range; returns its name."""
        self.ensure_wire()
        wire = NamedNetns(self.wire_netns)
        cp = NamedNetns(self.controller_netns)
        ports = self._wire_ports(wire)
        if CONTROLLER_PORT in ports and ports[CONTROLLER_PORT] != cp.name:
            if ports[CONTROLLER_PORT] is not None:
                raise LabNetworkError(
                    f"wire port {CONTROLLER_PORT} belongs to namespace {ports[CONTROLLER_PORT]}"
                )
            wire.ip("link", "del", CONTROLLER_PORT)  # a controller namespace that lost its name
            del ports[CONTROLLER_PORT]
        _ensure_netns(cp)
        if CONTROLLER_PORT not in ports:
            if WIRE_IFNAME in cp.links():
                raise LabNetworkError(
                    f"{cp.name} already has an {WIRE_IFNAME} that is not on the wire; run sweep()"
                )
            cp.ip(
                "link",
                "add",
                WIRE_IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                CONTROLLER_PORT,
                "netns",
                wire.name,
            )
        wire.ip_batch([f"link set {CONTROLLER_PORT} master {WIRE_BRIDGE}", f"link set {CONTROLLER_PORT} up"])
        cp.ip_batch(
            [
                f"addr replace {self.controller_ip}/{self._node_network.prefixlen} dev {WIRE_IFNAME}",
                f"link set {WIRE_IFNAME} up",
            ]
            + [
                f"route replace {node.pod_cidr} via {node.wire_ip} dev {WIRE_IFNAME}"
                for node in self._nodes_from_ports(ports)
            ]
        )
        return cp.name

    def nodes(self) -> list[NodeNet]:
        """The nodes attached to the wire now, by index (read from the kernel)."""
        wire = NamedNetns(self.wire_netns)
        if not wire.exists():
            return []
        return self._nodes_from_ports(self._wire_ports(wire))

    def _wire_ports(self, wire: NamedNetns) -> dict[str, str | None]:
        """Wire port name -> the namespace at its other end (None: a namespace without a name)."""
        return wire.peers()

    def _nodes_from_ports(self, ports: Mapping[str, str | None]) -> list[NodeNet]:
        nodes: list[NodeNet] = []
        own = f"{self._prefix}-"
        for port, peer in ports.items():
            match = _WIRE_PORT.match(port)
            if match is None or peer is None or not peer.startswith(own):
                continue
            name = peer[len(own) :]
            try:
                nodes.append(self.node_net(name, int(match.group(1))))
            except ValueError:
                continue  # not a node of this lab's shape; never ours to route to
        return sorted(nodes, key=lambda node: node.index)

    # -- pods ----------------------------------------------------------------------------------------

    def add_pod_netns(self, node: NodeNet, netns: str, ip: IPAddressLike) -> PodNet:
        """A pod namespace `netns` attached to `node` with address `ip`: namespace, veth pair, the pod's
        /32 address and routes, the node's gateway address and /32 route on the host veth. Idempotent;
        refuses an address another pod holds and a namespace attached elsewhere."""
        self.check_pod_netns_name(netns)
        address = self._pod_address(node, ip)
        node_ns = self._existing_node_ns(node)
        pod_ns = NamedNetns(netns)
        veth = host_veth_name(address)
        node_links = node_ns.links()
        if veth in node_links:
            peer = node_ns.peers({veth: node_links[veth]}).get(veth)
            if peer != netns:
                holder = f"namespace {peer}" if peer else "a namespace that has lost its name"
                raise LabNetworkError(f"address {address} on node {node.name} is already used by {holder}")
            _ensure_netns(pod_ns)
        else:
            _ensure_netns(pod_ns)
            if POD_IFNAME in pod_ns.links():
                raise LabNetworkError(
                    f"namespace {netns} already has an {POD_IFNAME} that is not {veth} on node {node.name};"
                    " delete_pod_netns() it first"
                )
            node_ns.ip("link", "add", veth, "type", "veth", "peer", "name", POD_IFNAME, "netns", netns)
        node_ns.ip_batch(
            [
                f"addr replace {node.gateway}/32 dev {veth}",
                f"link set {veth} up",
                f"route replace {address}/32 dev {veth} scope link",
            ]
        )
        pod_ns.ip_batch(
            [
                f"addr replace {address}/32 dev {POD_IFNAME}",
                f"link set {POD_IFNAME} up",
                f"route replace {node.gateway} dev {POD_IFNAME} scope link",
                f"route replace default via {node.gateway} dev {POD_IFNAME}",
            ]
        )
        return PodNet(netns=netns, node=node.name, ip=address, host_veth=veth, netns_path=pod_ns.path)

    def pod_interface(self, node: NodeNet, netns: str, ip: IPAddressLike) -> dict[str, Any]:
        """The CNI result a ptp-style primary plugin returns for the pod (the `prevResult` handed to
        chained plugins): both veth ends with their MACs, the pod's address and gateway, its route."""
        self.check_pod_netns_name(netns)
        address = self._pod_address(node, ip)
        veth = host_veth_name(address)
        host = self._existing_node_ns(node).links().get(veth)
        pod_ns = NamedNetns(netns)
        inside = pod_ns.links().get(POD_IFNAME) if pod_ns.exists() else None
        if host is None or inside is None:
            raise LabNetworkError(
                f"pod namespace {netns} ({address} on node {node.name}) is not built; call add_pod_netns()"
            )
        return {
            "cniVersion": CNI_VERSION,
            "interfaces": [
                {"name": veth, "mac": str(host["address"])},
                {"name": POD_IFNAME, "mac": str(inside["address"]), "sandbox": pod_ns.path},
            ],
            "ips": [{"address": f"{address}/32", "gateway": str(node.gateway), "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": str(node.gateway)}],
        }

    def pods(self, node: NodeNet) -> list[PodNet]:
        """The pods attached to `node` now, by address (read from the kernel; pods whose namespace has
        lost its name are left out)."""
        node_ns = NamedNetns(node.netns)
        if not node_ns.exists():
            return []
        found: list[PodNet] = []
        for veth, peer in node_ns.peers().items():
            match = _HOST_VETH.match(veth)
            if match is None or peer is None:
                continue
            address = node.pod_cidr.network_address + int(match.group(2))
            if host_veth_name(address) != veth:
                continue
            found.append(PodNet(peer, node.name, address, veth, NamedNetns(peer).path))
        return sorted(found, key=lambda pod: pod.ip)

    def delete_pod_netns(self, pod: PodNet) -> None:
        """Remove the pod's veth (even when something still holds its namespace open), its namespace and
        its /etc/netns directory; a no-op for whatever is already gone."""
        self.check_pod_netns_name(pod.netns)
        node_ns = NamedNetns(self.node_netns_name(pod.node))
        veth = pod.host_veth or host_veth_name(pod.ip)
        if node_ns.exists():
            links = node_ns.links()
            if veth in links:
                peer = node_ns.peers({veth: links[veth]}).get(veth)
                # Another pod may hold the address by now: only our own veth (or one whose namespace
                # has lost its name, i.e. this pod's after a half-done delete) is removed.
                if peer in (pod.netns, None):
                    node_ns.ip("link", "del", veth, check=False)
        pod_ns = NamedNetns(pod.netns)
        if pod_ns.exists():
            run_command(["ip", "netns", "del", pod.netns], check=False)
            if pod_ns.exists():
                raise LabNetworkError(f"could not remove namespace {pod.netns}")
        shutil.rmtree(os.path.join(ETC_NETNS_DIR, pod.netns), ignore_errors=True)

    def write_resolv_conf(
        self, netns: str, nameserver: IPAddressLike, namespace: str, *, domain: str = CLUSTER_DOMAIN
    ) -> None:
        """/etc/netns/<netns>/resolv.conf, which `ip netns exec <netns>` shows as /etc/resolv.conf:
        the lab DNS as nameserver, Kubernetes' search path for `namespace`, ndots:5. Written atomically."""
        self.check_pod_netns_name(netns)
        text = render_resolv_conf(nameserver, namespace, domain)
        directory = os.path.join(ETC_NETNS_DIR, netns)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        target = os.path.join(directory, "resolv.conf")
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".resolv.conf.", delete=False) as handle:
            temporary = handle.name
            try:
                handle.write(text)
                handle.flush()
                os.chmod(temporary, 0o644)
            except BaseException:
                os.unlink(temporary)
                raise
        try:
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise

    # -- services ------------------------------------------------------------------------------------

    def sync_services(self, node: NodeNet, services: Sequence[ServiceVip]) -> None:
        """Make `services` the node's Service VIPs: one iptables-restore transaction rebuilds every
        service chain (see `loom.lab.services`), and each VIP gets a /32 route into the wire so that
        traffic not DNATed reaches the REJECT rules instead of failing the routing lookup."""
        ordered = check_unique(services)
        ns = self._existing_node_ns(node)
        wanted = {f"{vip}/32" for vip in vip_addresses(ordered)}
        present = self._service_routes(ns)
        current = ns.exec(["iptables-save"]).stdout
        if present == wanted and not verify(ordered, current):
            return  # already in place: the lab manager syncs on every store change
        # Stale routes go first and new ones last, so a VIP never has a route without its rules.
        ns.ip_batch(
            [f"route del {route} proto {SERVICE_ROUTE_PROTOCOL}" for route in sorted(present - wanted)]
        )
        ns.exec(
            ["iptables-restore", "-w", str(IPTABLES_WAIT_SECONDS), "--noflush"],
            input=render_restore(ordered, current),
        )
        ns.ip_batch(
            [
                f"route replace {route} dev {WIRE_IFNAME} proto {SERVICE_ROUTE_PROTOCOL} scope link"
                for route in sorted(wanted - present)
            ]
        )

    def clear_services(self, node: NodeNet) -> None:
        """Remove every service chain, jump and VIP route from the node (a no-op when there are none)."""
        ns = self._existing_node_ns(node)
        removal = render_removal(ns.exec(["iptables-save"]).stdout)
        if removal:
            ns.exec(["iptables-restore", "-w", str(IPTABLES_WAIT_SECONDS), "--noflush"], input=removal)
        ns.ip_batch(
            [
                f"route del {route} proto {SERVICE_ROUTE_PROTOCOL}"
                for route in sorted(self._service_routes(ns))
            ]
        )

    @staticmethod
    def _service_routes(ns: NamedNetns) -> set[str]:
        routes = ns.ip_json("route", "show", "proto", str(SERVICE_ROUTE_PROTOCOL))
        return {str(ipaddress.ip_network(str(route["dst"]))) for route in routes}

    # -- teardown ------------------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Remove every namespace named "<prefix>-...", every link in them and every /etc/netns/<prefix>-...
        directory; returns what was removed. Idempotent, and works without any state from the process
        that built the lab. Raises LabNetworkError naming what could not be removed (after trying all)."""
        removed: list[str] = []
        failures: list[str] = []
        names = list_namespaces(f"{self._prefix}-")
        for name in names:
            ns = NamedNetns(name)
            try:
                links = [link for link in ns.links() if link != "lo"]
            except NetnsCommandError:
                continue  # not a usable namespace (an interrupted `ip netns add`): only the file is left
            if links:
                # -force: keep going when a veth is already gone with its peer.
                run_command(
                    ["ip", "-force", "-n", name, "-batch", "-"],
                    input="".join(f"link del {link}\n" for link in links),
                    check=False,
                )
        for name in names:
            result = run_command(["ip", "netns", "del", name], check=False)
            if NamedNetns(name).exists():
                failures.append(f"namespace {name}: {result.stderr.strip()}")
            else:
                removed.append(f"netns {name}")
        try:
            entries = sorted(os.listdir(ETC_NETNS_DIR))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.startswith(f"{self._prefix}-"):
                path = os.path.join(ETC_NETNS_DIR, entry)
                try:
                    shutil.rmtree(path)
                    removed.append(path)
                except OSError as exc:
                    failures.append(f"{path}: {exc}")
        if failures:
            raise LabNetworkError("could not remove: " + "; ".join(failures))
        return removed

    # -- helpers -------------------------------------------------------------------------------------

    def _pod_address(self, node: NodeNet, ip: IPAddressLike) -> ipaddress.IPv4Address:
        address = _ipv4(ip, f"pod address on node {node.name}")
        if address not in node.pod_cidr or address in (
            node.pod_cidr.network_address,
            node.gateway,
            node.pod_cidr.broadcast_address,
        ):
            raise ValueError(
                f"{address} is not a pod address of node {node.name}: it must be in {node.pod_cidr},"
                f" other than {node.pod_cidr.network_address}, the gateway {node.gateway}"
                f" and {node.pod_cidr.broadcast_address}"
            )
        return address

    def _existing_node_ns(self, node: NodeNet) -> NamedNetns:
        expected = self.node_netns_name(node.name)
        if node.netns != expected:
            raise ValueError(
                f"node {node.name} is not a node of lab {self._prefix!r} (namespace {node.netns})"
            )
        ns = NamedNetns(node.netns)
        if not ns.exists():
            raise LabNetworkError(f"node {node.name} has no namespace {node.netns}; call ensure_node() first")
        return ns


def _ensure_netns(ns: NamedNetns) -> None:
    """Create the namespace if needed and bring its loopback up (idempotent).

    Setting lo up doubles as the check that an existing /var/run/netns file is a usable namespace: an
    `ip netns add` interrupted between creating the file and mounting the namespace leaves one that is
    not, and it is replaced."""
    if ns.exists():
        if run_command(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=False).returncode == 0:
            return
        run_command(["ip", "netns", "del", ns.name], check=False)
    result = run_command(["ip", "netns", "add", ns.name], check=False)
    if result.returncode != 0 and not ns.exists():
        raise NetnsCommandError(f"cannot create network namespace {ns.name}: {result.stderr.strip()}")
    ns.ip("link", "set", "lo", "up")


# -- prerequisites ----------------------------------------------------------------------------------


def check_prerequisites() -> list[str]:
    """What this machine lacks for the lab, one clear sentence each; empty when the lab can run.

    Kernel features are probed for real (a throwaway namespace gets a veth pair, a bridge and the
    service rules the lab writes), so a missing module or netfilter extension is reported here and not
    half-way through building the lab. The probe namespace is always removed."""
    problems: list[str] = []
    root = os.geteuid() == 0
    if not root:
        problems.append(
            "not running as root: the lab creates network namespaces, veth links and iptables rules"
            " (run it with sudo)"
        )
    tools = {"ip": "iproute2", "iptables-restore": "iptables", "iptables-save": "iptables"}
    missing = [tool for tool in tools if shutil.which(tool) is None]
    problems += [f"{tool} is not installed (package {tools[tool]})" for tool in missing]
    if not root or "ip" in missing:
        return problems
    for directory, purpose in (
        (NETNS_RUN_DIR, "named network namespaces"),
        (ETC_NETNS_DIR, "pod resolv.conf files"),
    ):
        existing = directory
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK):
            problems.append(f"{existing} is not writable ({directory} holds the lab's {purpose})")
    # '_' cannot appear in a lab prefix, so no lab's sweep() ever matches the probe namespace.
    probe = NamedNetns(f"loom_probe_{secrets.token_hex(4)}")
    created = run_command(["ip", "netns", "add", probe.name], check=False)
    if created.returncode != 0:
        problems.append(f"cannot create network namespaces (ip netns add): {created.stderr.strip()}")
        return problems
    try:
        for kind, module, args in (
            ("veth", "veth", ("link", "add", "probe0", "type", "veth", "peer", "name", "probe1")),
            ("bridge", "bridge", ("link", "add", "probebr", "type", "bridge")),
        ):
            result = run_command(["ip", "-n", probe.name, *args], check=False)
            if result.returncode != 0:
                problems.append(
                    f"the kernel cannot create {kind} links (module {module}): {result.stderr.strip()}"
                )
        if "iptables-restore" not in missing and "iptables-save" not in missing:
            problems += _probe_service_rules(probe)
    finally:
        run_command(["ip", "netns", "del", probe.name], check=False)
    return problems


def _probe_service_rules(probe: NamedNetns) -> list[str]:
    """Apply a small service rule set with every extension the lab uses (DNAT, statistic, comment,
    MASQUERADE, REJECT) in the probe namespace."""
    sample: Iterable[ServiceVip] = (
        ServiceVip(
            ipaddress.IPv4Address("10.96.0.1"),
            80,
            "TCP",
            ((ipaddress.IPv4Address("10.80.1.2"), 8080), (ipaddress.IPv4Address("10.80.2.2"), 8080)),
            name="probe/probe:http",
        ),
        ServiceVip(ipaddress.IPv4Address("10.96.0.2"), 53, "UDP", ()),
    )
    saved = probe.exec(["iptables-save"], check=False)
    if saved.returncode != 0:
        return [f"iptables-save does not work in a network namespace: {saved.stderr.strip()}"]
    result = probe.exec(
        ["iptables-restore", "-w", str(IPTABLES_WAIT_SECONDS), "--noflush"],
        input=render_restore(sample, saved.stdout),
        check=False,
    )
    if result.returncode != 0:
        return [
            "iptables-restore cannot write the lab's service rules (nat and filter tables with DNAT,"
            " statistic, comment, MASQUERADE and REJECT; kernel netfilter modules missing?):"
            f" {result.stderr.strip()}"
        ]
    return []
