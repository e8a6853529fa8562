"""NodeAgent end to end: plugin events over the real socket, in-pod rules in a real pod namespace and a
real ztunnel on the ZDS socket. Root only.

The ztunnel lab (ztunnel_harness) starts with every mesh pod enrolled by its stand-in agent; on node n1
the stand-in is replaced by the production ZdsServer + NodeAgent with pod `a` released, so the test
drives a's enrolment through the agent exactly as the CNI plugin would."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from cni.agent.agent import NodeAgent, StaticPodDirectory
from cni.agent.redirect import IptablesBackend
from cni.agent.zds_server import ZdsServer
from cni.events import AgentRequest, Outcome, PodAttachment, RequestKind, call_agent, serve_plugin_events
from loom.resources.model import LABEL_DATAPLANE_MODE, Namespace, ObjectMeta, Pod, PodTemplate
from loom.testing.inpod_agent import unenrol
from loom.testing.netns import NetnsLab
from tests.namespaced.ztunnel_harness import (
    APP_PORT,
    MESH_NAMESPACE,
    WAIT,
    Layout,
    PodSpec,
    call,
    mesh_lab,
    samples,
)

pytestmark = pytest.mark.root

LAYOUT = Layout(nodes=("n1", "n2"), pods=(PodSpec("a", "n1", service_account="sa-x"), PodSpec("b", "n2")))


def outbound_to_b(mesh_app_samples: list[dict[str, str]]) -> int:
    return sum(1 for s in mesh_app_samples if s["reporter"] == "source" and s["destination_workload"] == "b")


async def test_plugin_add_captures_and_del_restores_direct_traffic(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        node = mesh.nodes["n1"]
        ztunnel = mesh.ztunnel("n1")
        # Hand node n1 over to the production agent, with pod a not captured.
        await node.agent.close()
        unenrol(a)
        directory = StaticPodDirectory(
            [
                Namespace(meta=ObjectMeta(MESH_NAMESPACE, "", labels={LABEL_DATAPLANE_MODE: "ambient"})),
                Pod(
                    meta=ObjectMeta("a", MESH_NAMESPACE, uid="uid-a"),
                    spec=PodTemplate(service_account="sa-x"),
                ),
            ]
        )
        backend = IptablesBackend()
        plugin_socket = str(mesh.workdir / "plugin.sock")
        attachment = PodAttachment(
            MESH_NAMESPACE, "a", "uid-a", "cid-a", a.netns.path, "eth0", (ipaddress.ip_address(a.address),)
        )

        async def plugin(kind: RequestKind) -> Outcome:
            reply = await asyncio.to_thread(call_agent, plugin_socket, AgentRequest(kind, attachment), WAIT)
            assert reply.outcome is not Outcome.ERROR, reply.message
            return reply.outcome

        try:
            async with ZdsServer(node.socket_path) as zds:
                agent = NodeAgent(directory, backend, zds)
                server = await serve_plugin_events(plugin_socket, agent.handle)
                try:
                    await zds.wait_ready(WAIT)  # ztunnel reconnected; the empty snapshot released a
                    before = outbound_to_b(samples(ztunnel, "istio_tcp_connections_opened_total"))
                    answer = await call(a, b.address, APP_PORT, b"direct")
                    assert (answer.server, answer.seen_ip) == ("b", a.address)
                    assert outbound_to_b(samples(ztunnel, "istio_tcp_connections_opened_total")) == before

                    assert await plugin(RequestKind.ADD) is Outcome.ENROLLED
                    assert "uid-a" in ztunnel.inpod.workloads()
                    assert await plugin(RequestKind.CHECK) is Outcome.ENROLLED
                    answer = await call(a, b.address, APP_PORT, b"captured")
                    assert (answer.server, answer.seen_ip, answer.echoed) == ("b", a.address, b"captured")
                    opened = samples(ztunnel, "istio_tcp_connections_opened_total")
                    assert outbound_to_b(opened) == before + 1, "a's connection went through ztunnel"
                    assert {s["connection_security_policy"] for s in opened} == {"mutual_tls"}

                    assert await plugin(RequestKind.DEL) is Outcome.DONE
                    assert "uid-a" not in ztunnel.inpod.workloads()
                    assert "ISTIO" not in a.netns.iptables_save()
                    answer = await call(a, b.address, APP_PORT, b"direct again")
                    assert (answer.server, answer.echoed) == ("b", b"direct again")
                    assert outbound_to_b(samples(ztunnel, "istio_tcp_connections_opened_total")) == before + 1
                finally:
                    server.close()
                    await server.wait_closed()
        finally:
            backend.close()
