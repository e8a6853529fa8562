"""The iptables redirection backend inside a real pod namespace (given by path, as CNI_NETNS is). Root."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from cni.agent.host_rules import HostRulesApplier
from cni.agent.redirect import IptablesBackend, NetnsRunner, RedirectionError
from cni.rules import INPOD_MARK, PROBE_SNAT_IPV6, InpodRules, IpFamily
from loom.testing.netns import NetnsLab
from tests.namespaced.harness import nothing_pending
from ztunnel.inpod.netns import original_dst

pytestmark = pytest.mark.root


async def test_apply_verify_remove_idempotent(lab: NetnsLab) -> None:
    node = lab.add_node("n1")
    pod = lab.add_pod(node, "p1")
    rules = InpodRules()
    pristine = pod.netns.iptables_save()
    backend = IptablesBackend(rules)
    try:
        assert await backend.verify(pod.netns.path) != ()
        await backend.apply(pod.netns.path)
        assert await backend.verify(pod.netns.path) == ()
        assert rules.verify(IpFamily.V4, pod.netns.iptables_save()) == ()
        assert rules.policy_rule(IpFamily.V4).found_in(pod.netns.ip_json("-4", "rule", "show"))
        route = rules.local_route(IpFamily.V4)
        assert route.found_in(pod.netns.ip_json("-4", "route", "show", "table", str(route.table)))

        # Applying again changes nothing (no duplicate jumps, rules or policy rules).
        installed = pod.netns.iptables_save()
        await backend.apply(pod.netns.path)
        assert _rules_only(pod.netns.iptables_save()) == _rules_only(installed)
        fwmark_rules = [r for r in pod.netns.ip_json("-4", "rule", "show") if r.get("fwmark") == "0x111"]
        assert len(fwmark_rules) == 1

        # A tampered chain is reported and repaired by the next apply.
        pod.netns.exec(["iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"])
        assert any("ISTIO_OUTPUT" in p for p in await backend.verify(pod.netns.path))
        await backend.apply(pod.netns.path)
        assert await backend.verify(pod.netns.path) == ()

        await backend.remove(pod.netns.path)
        assert "ISTIO" not in pod.netns.iptables_save()
        assert _rules_only(pod.netns.iptables_save()) == _rules_only(pristine)
        assert not rules.policy_rule(IpFamily.V4).found_in(pod.netns.ip_json("-4", "rule", "show"))
        assert pod.netns.ip("-4", "route", "show", "table", str(route.table), check=False).strip() == ""
        await backend.remove(pod.netns.path)  # removing twice is a no-op

        # The agent's own namespace was never touched.
        assert "ISTIO" not in _host_save()
    finally:
        backend.close()


async def test_connection_opened_before_apply_survives(lab: NetnsLab) -> None:
    """Enrolling a running pod must not cut what it already has open: the first rules start connection
    tracking in the pod, and a mid-stream pick-up of the old connection would be REDIRECTed to the
    inbound listener and reset (the backend sets nf_conntrack_tcp_loose=0 in the pod to prevent it)."""
    node = lab.add_node("n1")
    client, server = lab.add_pod(node, "client"), lab.add_pod(node, "server")
    backend = IptablesBackend()
    listener = server.netns.listen("0.0.0.0", 8080)
    inbound = client.netns.listen("0.0.0.0", 15006)  # where ztunnel's inbound listener would be
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await client.netns.open_connection(server.address, 8080)
        accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        try:
            await backend.apply(client.netns.path)
            assert client.netns.read_sysctl("net.netfilter.nf_conntrack_tcp_loose") == "0"
            await loop.sock_sendall(accepted, b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
            writer.write(b"back")
            await writer.drain()
            assert await asyncio.wait_for(loop.sock_recv(accepted, 16), 5) == b"back"
        finally:
            writer.close()
            accepted.close()
    finally:
        listener.close()
        inbound.close()
        backend.close()


async def test_ipv6_is_captured_wherever_the_pod_namespace_has_it(dual_stack_lab: NetnsLab) -> None:
    """IPv6 left uncaptured would leave the pod past ztunnel (no mTLS, no policy): a namespace with IPv6
    gets the IPv6 rules, policy rule and route as well; one with IPv6 off gets IPv4's only."""
    lab = dual_stack_lab
    node = lab.add_node("n1")
    a, b, off = lab.add_pod(node, "a"), lab.add_pod(node, "b"), lab.add_pod(node, "off")
    off.netns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    rules = InpodRules()
    backend = IptablesBackend(rules)
    outbound = a.netns.listen("::", 15001)  # where ztunnel's IPv6 listeners would be
    inbound = b.netns.listen("::", 15006)
    app = b.netns.listen("::", 8080)
    loop = asyncio.get_running_loop()
    try:
        for pod in (a, b, off):
            await backend.apply(pod.netns.path)
            assert await backend.verify(pod.netns.path) == ()
        for pod in (a, b):
            assert rules.verify(IpFamily.V6, pod.netns.iptables_save(IpFamily.V6)) == ()
            assert rules.policy_rule(IpFamily.V6).found_in(pod.netns.ip_json("-6", "rule", "show"))
        assert "ISTIO" not in off.netns.iptables_save(IpFamily.V6)
        assert rules.verify(IpFamily.V4, off.netns.iptables_save()) == ()

        # The app's IPv6 connection from a is redirected to a's 15001, its destination kept.
        _, writer = await a.netns.open_connection(b.address6, 8080)
        try:
            conn, peer = await asyncio.wait_for(loop.sock_accept(outbound), 5)
            with conn:
                assert original_dst(conn) == (b.address6, 8080)
                assert peer[0] == a.address6
        finally:
            writer.close()
        # Arriving at b from outside (marked, as ztunnel's own sockets are, so a lets it go): b's 15006.
        _, writer = await a.netns.open_connection(b.address6, 8080, mark=INPOD_MARK)
        try:
            conn, peer = await asyncio.wait_for(loop.sock_accept(inbound), 5)
            with conn:
                assert original_dst(conn) == (b.address6, 8080)
                assert peer[0] == a.address6
        finally:
            writer.close()

        for pod in (a, b, off):
            await backend.remove(pod.netns.path)
            assert "ISTIO" not in pod.netns.iptables_save(IpFamily.V6)
        assert not rules.policy_rule(IpFamily.V6).found_in(a.netns.ip_json("-6", "rule", "show"))
    finally:
        for sock in (outbound, inbound, app):
            sock.close()
        backend.close()


async def test_node_probes_of_an_ipv6_pod_address_reach_the_app_from_the_ipv6_probe_address(
    dual_stack_lab: NetnsLab,
) -> None:
    """The kubelet's probe of an enrolled pod's IPv6 address leaves the node SNATed to the IPv6 probe
    address, which the pod's IPv6 rules let straight through to the app (not into ztunnel's 15006)."""
    node = dual_stack_lab.add_node("n1")
    pod = dual_stack_lab.add_pod(node, "a")
    assert pod.ip6 is not None
    runner = NetnsRunner()
    backend = IptablesBackend(runner=runner)
    host_rules = HostRulesApplier(runner, netns_path=node.netns.path)
    app = pod.netns.listen("::", 8080)
    inbound = pod.netns.listen("::", 15006)
    loop = asyncio.get_running_loop()
    try:
        await backend.apply(pod.netns.path)
        await host_rules.sync([pod.ip, pod.ip6])
        assert await host_rules.verify([pod.ip, pod.ip6]) == ()
        saved = node.netns.iptables_save(IpFamily.V6)
        assert (
            f"-d {pod.ip6}/128 -p tcp -m owner --socket-exists -j SNAT --to-source {PROBE_SNAT_IPV6}" in saved
        )

        _, writer = await node.netns.open_connection(pod.address6, 8080)
        try:
            conn, peer = await asyncio.wait_for(loop.sock_accept(app), 5)
            conn.close()
            assert peer[0] == PROBE_SNAT_IPV6
        finally:
            writer.close()
        assert nothing_pending(inbound), "the probe never went to ztunnel's inbound port"

        await host_rules.sync([])
        assert "LOOM-POSTRT" not in node.netns.iptables_save(IpFamily.V6)
    finally:
        for sock in (app, inbound):
            sock.close()
        await backend.remove(pod.netns.path)
        runner.close()


async def test_missing_namespace(lab: NetnsLab) -> None:
    backend = IptablesBackend()
    try:
        missing = f"/var/run/netns/{lab.prefix}-gone"
        with pytest.raises(RedirectionError, match="does not exist"):
            await backend.apply(missing)
        await backend.remove(missing)  # nothing to remove: the sandbox is gone
    finally:
        backend.close()


def _rules_only(save: str) -> list[str]:
    # The rules themselves; counters, comments and (empty) table headers differ between saves.
    return [line for line in save.splitlines() if line.startswith("-A ")]


def _host_save() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True, timeout=10).stdout
