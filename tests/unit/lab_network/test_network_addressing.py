"""The lab network's pure parts (loom/lab/network.py): names, addresses, resolv.conf, validation.
Nothing here creates a namespace."""

from __future__ import annotations

import ipaddress
import re

import pytest

from loom.lab.network import (
    LabNetwork,
    NetnsCommandError,
    host_veth_name,
    render_resolv_conf,
    run_command,
    sysctl_path,
)

IP = ipaddress.IPv4Address


@pytest.mark.parametrize(
    ("index", "wire_ip", "pod_cidr", "gateway"),
    [
        (1, "10.79.0.1", "10.80.1.0/24", "10.80.1.1"),
        (2, "10.79.0.2", "10.80.2.0/24", "10.80.2.1"),
        (253, "10.79.0.253", "10.80.253.0/24", "10.80.253.1"),
    ],
)
def test_node_addresses_follow_the_index(index: int, wire_ip: str, pod_cidr: str, gateway: str) -> None:
    node = LabNetwork("loom").node_net("node-1", index)
    assert node.netns == "loom-node-1"
    assert (node.wire_ip, node.pod_cidr, node.gateway) == (
        IP(wire_ip),
        ipaddress.IPv4Network(pod_cidr),
        IP(gateway),
    )


def test_lab_wide_names_and_the_controller_address() -> None:
    network = LabNetwork("lab1")
    assert (network.wire_netns, network.controller_netns) == ("lab1-wire", "lab1-cp")
    assert network.controller_ip == IP("10.79.0.254")
    assert network.max_nodes == 253, "every node address stays below the controller's"
    other = LabNetwork("lab2", node_network="10.1.0.0/28", pod_supernet="10.2.0.0/20")
    assert other.controller_ip == IP("10.1.0.14")
    assert other.max_nodes == 13
    assert other.node_net("a", 13).pod_cidr == ipaddress.IPv4Network("10.2.13.0/24")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"prefix": "l"}, "must match", id="prefix too short"),
        pytest.param({"prefix": "loomlabtest123"}, "must match", id="prefix too long"),
        pytest.param({"prefix": "loom-1"}, "must match", id="prefix with a dash"),
        pytest.param({"prefix": "1loom"}, "must match", id="prefix starting with a digit"),
        pytest.param({"prefix": "Loom"}, "must match", id="upper-case prefix"),
        pytest.param({"node_network": "10.79.0.0/31"}, "too small", id="node network too small"),
        pytest.param({"pod_supernet": "10.80.0.0/24"}, "too small", id="pod supernet too small"),
        pytest.param({"node_network": "fd00::/64"}, "IPv6", id="IPv6 node network"),
        pytest.param({"pod_supernet": "10.80.0.1/16"}, "not a network", id="host bits set"),
        pytest.param({"node_network": "10.80.5.0/24"}, "overlap", id="node network inside the pod range"),
    ],
)
def test_lab_network_settings_are_validated(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabNetwork(**kwargs)


@pytest.mark.parametrize(
    ("name", "index", "message"),
    [
        pytest.param("Node-1", 1, "node name", id="upper case"),
        pytest.param("node_1", 1, "node name", id="underscore"),
        pytest.param("-node", 1, "node name", id="leading dash"),
        pytest.param("wire", 1, "reserved", id="the wire's name"),
        pytest.param("cp", 1, "reserved", id="the controller's name"),
        pytest.param("node-1", 0, "index 0", id="index zero"),
        pytest.param("node-1", 254, "index 254", id="index of the controller address"),
        pytest.param("node-1", True, "index True", id="bool index"),
    ],
)
def test_node_names_and_indices_are_validated(name: str, index: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        LabNetwork("loom").node_net(name, index)


@pytest.mark.parametrize(
    ("ip", "veth"),
    [
        ("10.80.1.2", "p1-2"),
        ("10.80.12.200", "p12-200"),
        ("10.80.255.254", "p255-254"),
        (IP("10.0.3.4"), "p3-4"),
    ],
)
def test_host_veth_names_come_from_the_pod_address(ip: str | ipaddress.IPv4Address, veth: str) -> None:
    assert host_veth_name(ip) == veth
    assert len(veth) <= 15


def test_host_veth_name_refuses_ipv6() -> None:
    with pytest.raises(ValueError, match="IPv4 only"):
        host_veth_name("fd00::1")


@pytest.mark.parametrize(
    ("netns", "ok"),
    [
        ("loom-default-productpage-v1-abc123", True),
        ("loom-a", True),
        ("loom-ns.with.dots-1", True),
        ("loom-", False),
        ("loom-wire", False),
        ("loom-cp", False),
        ("other-pod", False),
        ("loomx-pod", False),
        ("loom-Pod", False),
        ("loom-pod/../../etc", False),
        ("loom-pod-", False),
    ],
)
def test_pod_namespaces_must_carry_the_prefix(netns: str, ok: bool) -> None:
    network = LabNetwork("loom")
    if ok:
        assert network.check_pod_netns_name(netns) == netns
    else:
        with pytest.raises(ValueError, match="pod namespace"):
            network.check_pod_netns_name(netns)


def test_resolv_conf_is_the_kubelet_cluster_first_one() -> None:
    assert render_resolv_conf(IP("10.79.0.254"), "default") == (
        "nameserver 10.79.0.254\n"
        "search default.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )
    assert render_resolv_conf("10.79.0.254", "bookinfo", "lab.example").splitlines()[1] == (
        "search bookinfo.svc.lab.example svc.lab.example lab.example"
    )


@pytest.mark.parametrize(
    ("nameserver", "namespace", "domain", "message"),
    [
        ("10.79.0", "default", "cluster.local", "nameserver"),
        ("10.79.0.254", "Default", "cluster.local", "namespace"),
        ("10.79.0.254", "a" * 64, "cluster.local", "namespace"),
        ("10.79.0.254", "default", "cluster..local", "cluster domain"),
    ],
)
def test_resolv_conf_input_is_validated(nameserver: str, namespace: str, domain: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_resolv_conf(nameserver, namespace, domain)


def test_only_namespaced_sysctls_are_accepted() -> None:
    assert sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    for key in ("kernel.pid_max", "net", "net.ipv4/../../x", "net..ipv4"):
        with pytest.raises(ValueError, match="per-namespace sysctl"):
            sysctl_path(key)


def test_failing_and_missing_commands_raise_with_the_command_line() -> None:
    with pytest.raises(NetnsCommandError, match=r"sh -c echo oops >&2; exit 3 failed \(3\): oops"):
        run_command(["sh", "-c", "echo oops >&2; exit 3"])
    assert run_command(["sh", "-c", "exit 3"], check=False).returncode == 3
    with pytest.raises(NetnsCommandError, match="could not be started"):
        run_command(["/nonexistent/loom-command"])
    with pytest.raises(NetnsCommandError, match=re.escape("did not finish within 0.2 s")):
        run_command(["sleep", "5"], timeout=0.2)
