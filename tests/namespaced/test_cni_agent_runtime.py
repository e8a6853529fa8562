"""The node agent at runtime, end to end: a real NodeAgentApp (in-process, iptables backend, probe SNAT
in the node's namespace) following the controller's configuration directory, and a real ztunnel. Root.

Layout: pod `a` (namespace `outside`, not enrolled at first) on node n1, where the stand-in agent of the
ztunnel lab is replaced by the production agent; pod `b` (namespace `demo`, enrolled by the lab's
stand-in) on node n2. Enrolment is switched by labelling `outside` in the configuration directory,
exactly as `loomctl label namespace` does, without touching pod a's sandbox.

How a connection's path is told apart: n1's ztunnel counts every connection it carries
(istio_tcp_connections_opened_total, reporter source for a -> b, reporter destination for x -> a,
with connection_security_policy mutual_tls); a direct connection leaves n1's counters unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from cni.agent.app import AgentConfig, NodeAgentApp
from cni.agent.host_rules import HOST_CHAIN
from cni.agent.prerequisites import KernelFeature, check_prerequisites, kernel_feature_problems
from cni.agent.reconcile import REDIRECTION_ANNOTATION
from cni.events import AgentRequest, Outcome, PodAttachment, RequestKind, call_agent
from cni.rules import PROBE_SNAT_IPV4
from loom.testing.netns import Netns, NetnsLab, Pod
from loom.testing.waiting import eventually
from tests.namespaced.ztunnel_harness import (
    APP_PORT,
    OUTSIDE_NAMESPACE,
    WAIT,
    Answer,
    Layout,
    MeshLab,
    PodSpec,
    call,
    mesh_lab,
)
from ztunnel.app import ZtunnelApp

pytestmark = pytest.mark.root

LAYOUT = Layout(
    nodes=("n1", "n2"),
    pods=(PodSpec("a", "n1", namespace=OUTSIDE_NAMESPACE), PodSpec("b", "n2", service_account="sa-b")),
)
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
OPENED = "istio_tcp_connections_opened_total"


# ---------------------------------------------------------------------------------------------------
# helpers


def opened(ztunnel: ZtunnelApp, reporter: str, destination: str, *, mtls_only: bool = False) -> int:
    """How many connections ztunnel opened as `reporter` toward `destination` (the counter's value)."""
    total = 0.0
    for family in ztunnel.registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == OPENED
                and labels.get("reporter") == reporter
                and labels.get("destination_workload") == destination
                and (not mtls_only or labels.get("connection_security_policy") == "mutual_tls")
            ):
                total += sample.value
    return int(total)


def edit_object(mesh: MeshLab, kind: str, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change one object in the lab's configuration file (atomically, as the lab store does)."""
    path = mesh.config_dir / "mesh.yaml"
    documents = list(yaml.safe_load_all(path.read_text()))
    for document in documents:
        if document["kind"] == kind and document["metadata"]["name"] == name:
            edit(document["metadata"])
    tmp = path.with_name(".mesh.yaml.tmp")
    tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    os.replace(tmp, path)


def label_namespace(mesh: MeshLab, name: str, labels: Mapping[str, str]) -> None:
    edit_object(mesh, "Namespace", name, lambda meta: meta.__setitem__("labels", dict(labels)))


async def call_from(netns: Netns, host: str, port: int, payload: bytes = b"probe") -> Answer:
    """Like `call`, from any namespace (here: the node's own, as a kubelet probe)."""
    reader, writer = await netns.open_connection(host, port, connect_timeout=WAIT)
    try:
        async with asyncio.timeout(WAIT):
            line = await reader.readline()
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            echoed = await reader.read()
    finally:
        writer.close()
    server, seen_ip = line.decode().split()
    return Answer(server, seen_ip, echoed)


def host_rules_text(netns: Netns) -> str:
    return "\n".join(line for line in netns.iptables_save().splitlines() if HOST_CHAIN in line)


class FileAnnotator:
    """Writes the annotation into the configuration file the agent (and the controller) watch, like
    the lab store: the agent sees its own write come back."""

    def __init__(self, mesh: MeshLab) -> None:
        self.mesh = mesh
        self.values: list[str | None] = []

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        value = changes[REDIRECTION_ANNOTATION]
        self.values.append(value)

        def edit(meta: dict[str, Any]) -> None:
            annotations = meta.setdefault("annotations", {})
            if value is None:
                annotations.pop(REDIRECTION_ANNOTATION, None)
            else:
                annotations[REDIRECTION_ANNOTATION] = value

        edit_object(self.mesh, "Pod", name, edit)
        return True


@dataclass
class Rig:
    mesh: MeshLab
    config: AgentConfig
    annotator: FileAnnotator
    app: NodeAgentApp | None = None

    @property
    def a(self) -> Pod:
        return self.mesh.pods["a"]

    @property
    def b(self) -> Pod:
        return self.mesh.pods["b"]

    @property
    def node(self) -> Netns:
        return self.mesh.nodes["n1"].node.netns

    @property
    def ztunnel(self) -> ZtunnelApp:
        return self.mesh.ztunnel("n1")

    @property
    def agent_app(self) -> NodeAgentApp:
        assert self.app is not None, "the agent is not running"
        return self.app

    async def start_agent(self) -> NodeAgentApp:
        app = NodeAgentApp(self.config, annotator=self.annotator)
        await app.start()
        self.app = app
        await eventually(lambda: app.readiness.ready, within=WAIT, what="agent ready")
        await app.zds.wait_ready(WAIT)  # n1's ztunnel reconnected and got the agent's snapshot
        return app

    async def stop_agent(self) -> None:
        if self.app is not None:
            app, self.app = self.app, None
            await app.stop()

    async def plugin_add(self) -> Outcome:
        attachment = PodAttachment(
            OUTSIDE_NAMESPACE, "a", "uid-a", "cid-a", self.a.netns.path, "eth0", (self.a.ip,)
        )
        request = AgentRequest(RequestKind.ADD, attachment)
        reply = await asyncio.to_thread(call_agent, self.config.plugin_socket, request, WAIT)
        return reply.outcome

    def enrolled(self) -> bool:
        agent = self.agent_app.agent
        return "cid-a" in agent.acked and "uid-a" in self.ztunnel.inpod.workloads()

    def released(self) -> bool:
        return "cid-a" not in self.agent_app.agent.captured and "uid-a" not in self.ztunnel.inpod.workloads()

    def settled(self, enrolled: int) -> bool:
        """The agent finished the pass (the pod gauge is updated after the node's probe rules)."""
        registry = self.agent_app.metrics.registry
        return registry.get_sample_value("loom_cni_agent_pods", {"state": "enrolled"}) == enrolled

    async def label(self, labels: Mapping[str, str]) -> None:
        label_namespace(self.mesh, OUTSIDE_NAMESPACE, labels)
        wanted = self.enrolled if labels else self.released
        await eventually(wanted, within=WAIT, what="enrolled" if labels else "released")
        await eventually(lambda: self.settled(1 if labels else 0), within=WAIT, what="pass finished")


@contextlib.asynccontextmanager
async def runtime_rig(lab: NetnsLab) -> AsyncIterator[Rig]:
    async with mesh_lab(lab, LAYOUT) as mesh:
        node = mesh.nodes["n1"]
        await node.agent.close()  # n1 now belongs to the production agent
        tag = secrets.token_hex(3)
        config = AgentConfig(
            node="n1",
            plugin_socket=str(mesh.workdir / f"plugin-{tag}.sock"),
            zds_socket=node.socket_path,
            manifests=(mesh.config_dir,),
            state_file=mesh.workdir / f"agent-{tag}.json",
            http_port=0,
            host_netns=node.node.netns.path,
            config_debounce=0.01,
        )
        rig = Rig(mesh, config, FileAnnotator(mesh))
        try:
            await rig.start_agent()
            yield rig
        finally:
            await rig.stop_agent()


@dataclass(frozen=True)
class Attempt:
    started: float
    ended: float
    error: str  # "" when the connection worked end to end


async def client_loop(
    pod: Pod, host: str, count: int, done: list[Attempt], pause: float = 0.01, per_connection: float = 2.0
) -> None:
    """`count` connections one after another (bounded in number and, each, in time): every one must be
    answered by b and echo its payload."""
    for index in range(count):
        started = time.monotonic()
        payload = f"conn {index}".encode()
        error = ""
        try:
            reader, writer = await pod.netns.open_connection(host, APP_PORT, connect_timeout=per_connection)
            try:
                async with asyncio.timeout(per_connection):
                    greeting = await reader.readline()
                    writer.write(payload)
                    await writer.drain()
                    writer.write_eof()
                    echoed = await reader.read()
            finally:
                writer.close()
            if not greeting.startswith(b"b ") or echoed != payload:
                error = f"wrong answer {greeting!r} {echoed!r}"
        except (OSError, TimeoutError) as exc:
            error = repr(exc)
        done.append(Attempt(started, time.monotonic(), error))
        await asyncio.sleep(pause)


# ---------------------------------------------------------------------------------------------------
# tests


async def test_labels_enrol_and_release_a_running_pod(lab: NetnsLab) -> None:
    async with runtime_rig(lab) as rig:
        a, b, ztunnel = rig.a, rig.b, rig.ztunnel
        assert await rig.plugin_add() is Outcome.NOT_ENROLLED

        # Not enrolled: a -> b leaves directly; the node's own connection to a is not rewritten.
        before = opened(ztunnel, "source", "b")
        assert await call(a, b.address, APP_PORT, b"plain") == Answer("b", a.address, b"plain")
        assert opened(ztunnel, "source", "b") == before
        probe = await call_from(rig.node, a.address, APP_PORT)
        assert probe.seen_ip == str(rig.mesh.nodes["n1"].node.gateway)
        assert host_rules_text(rig.node) == ""

        # Label the namespace: a is captured without a restart of its sandbox.
        await rig.label(AMBIENT)
        assert await call(a, b.address, APP_PORT, b"meshed") == Answer("b", a.address, b"meshed")
        assert opened(ztunnel, "source", "b", mtls_only=True) == before + 1, "a -> b went through ztunnel"
        await eventually(lambda: rig.annotator.values[-1:] == ["enabled"], within=WAIT, what="annotated")

        # Node-originated (probe) traffic reaches the app directly, from 169.254.7.127 ...
        inbound = opened(ztunnel, "destination", "a")
        probe = await call_from(rig.node, a.address, APP_PORT)
        assert (probe.server, probe.seen_ip, probe.echoed) == ("a", PROBE_SNAT_IPV4, b"probe")
        assert opened(ztunnel, "destination", "a") == inbound, "the probe must not pass ztunnel"
        assert f"-d {a.address}/32 -p tcp -m owner --socket-exists -j SNAT" in host_rules_text(rig.node)
        # ... while pod-to-pod traffic to a arrives through ztunnel (mTLS, b's address preserved).
        assert await call(b, a.address, APP_PORT, b"to a") == Answer("a", b.address, b"to a")
        assert opened(ztunnel, "destination", "a", mtls_only=True) == inbound + 1

        port = rig.agent_app.http_port
        status, body = await http_get(port, "/metrics")
        assert status == 200 and 'loom_cni_agent_pods{state="enrolled"} 1.0' in body
        assert "loom_cni_agent_ztunnel_connected 1.0" in body
        assert await http_get(port, "/readyz") == (200, "ready\n")
        assert await http_get(port, "/healthz") == (200, "ok\n")

        # Remove the label: direct again, rules and probe SNAT gone, annotation removed.
        await rig.label({})
        assert "ISTIO" not in a.netns.iptables_save()
        sent = opened(ztunnel, "source", "b")
        assert await call(a, b.address, APP_PORT, b"plain again") == Answer("b", a.address, b"plain again")
        assert opened(ztunnel, "source", "b") == sent
        probe = await call_from(rig.node, a.address, APP_PORT)
        assert probe.seen_ip == str(rig.mesh.nodes["n1"].node.gateway)
        assert host_rules_text(rig.node) == ""
        await eventually(lambda: rig.annotator.values[-1:] == [None], within=WAIT, what="annotation removed")
        assert rig.annotator.values == ["enabled", None], "each value written once: no churn"


async def test_switching_under_a_client_loop(lab: NetnsLab) -> None:
    """200 connections a -> b, one after another, while a is enrolled and released twice.

    What may fail, honestly: a connection ztunnel was carrying when a release happened (its `del` ends
    them), so one that started before the release finished and was still open when it began. Enrolment
    cuts nothing: ztunnel listens before the rules send traffic to it, and a connection opened just
    before keeps going directly (the backend's nf_conntrack_tcp_loose=0). Every connection started
    after a switch completed must succeed."""
    async with runtime_rig(lab) as rig:
        assert await rig.plugin_add() is Outcome.NOT_ENROLLED
        attempts: list[Attempt] = []
        loop = asyncio.create_task(client_loop(rig.a, rig.b.address, 200, attempts))
        switches: list[tuple[float, float, bool]] = []  # (configuration written, agent finished, enrol)

        def progressed(count: int) -> Callable[[], bool]:
            return lambda: len(attempts) >= count

        try:
            for step, labels in enumerate([AMBIENT, {}, AMBIENT, {}]):
                await eventually(progressed(30 * (step + 1)), within=WAIT * 2, what="load")
                began = time.monotonic()
                await rig.label(labels)
                switches.append((began, time.monotonic(), bool(labels)))
            async with asyncio.timeout(WAIT * 4):
                await loop
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        assert len(attempts) == 200
        meshed = opened(rig.ztunnel, "source", "b", mtls_only=True)
        assert 0 < meshed < 200, f"both paths must have been used, {meshed} went through ztunnel"

        def in_flight_at_a_release(attempt: Attempt) -> bool:
            return any(
                attempt.started < end and attempt.ended > began for began, end, enrol in switches if not enrol
            )

        unexplained = [x for x in attempts if x.error and not in_flight_at_a_release(x)]
        assert unexplained == [], f"connections failed outside a release: {unexplained}"
        assert sum(1 for x in attempts if x.error) <= 2, "at most the one in flight per release"
        ends = [end for _, end, _ in switches]
        starts = [began for began, _, _ in switches[1:]] + [float("inf")]
        for finished, next_began in zip(ends, starts, strict=True):
            after = [x for x in attempts if finished <= x.started < next_began]
            assert after and all(not x.error for x in after), "new connections after a switch succeed"


async def test_agent_restart_keeps_traffic_and_cleans_stale_state(lab: NetnsLab) -> None:
    async with runtime_rig(lab) as rig:
        assert await rig.plugin_add() is Outcome.NOT_ENROLLED
        await rig.label(AMBIENT)
        served_by = rig.ztunnel.inpod.workloads()["uid-a"].netns_inode
        sessions = rig.ztunnel.inpod.connections
        attempts: list[Attempt] = []
        loop = asyncio.create_task(client_loop(rig.a, rig.b.address, 120, attempts))
        try:
            await eventually(lambda: len(attempts) >= 20, within=WAIT, what="load")
            await rig.stop_agent()
            # What a crashed agent could leave behind: a probe rule for a pod that no longer exists.
            stale = f"-A {HOST_CHAIN} -d 10.80.1.250/32 -p tcp -m owner --socket-exists -j SNAT"
            rig.node.exec(["iptables", "-t", "nat", *stale.split(), "--to-source", PROBE_SNAT_IPV4])
            await eventually(lambda: len(attempts) >= 50, within=WAIT, what="load without an agent")
            await rig.start_agent()
            async with asyncio.timeout(WAIT * 3):
                await loop
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        assert [x for x in attempts if x.error] == [], "traffic must not notice the agent restart"
        assert len(attempts) == 120
        assert rig.ztunnel.inpod.connections == sessions + 1
        assert rig.ztunnel.inpod.workloads()["uid-a"].netns_inode == served_by, "ztunnel kept a's proxy"
        rules = host_rules_text(rig.node)
        assert "10.80.1.250" not in rules and f"-d {rig.a.address}/32" in rules, "stale rule cleaned"

        # The label goes away while the agent is down: the restarted agent releases the pod.
        await rig.stop_agent()
        label_namespace(rig.mesh, OUTSIDE_NAMESPACE, {})
        await rig.start_agent()
        await eventually(rig.released, within=WAIT, what="released after restart")
        await eventually(lambda: rig.settled(0), within=WAIT, what="pass finished")
        assert "ISTIO" not in rig.a.netns.iptables_save() and host_rules_text(rig.node) == ""
        answer = await call(rig.a, rig.b.address, APP_PORT, b"direct")
        assert answer == Answer("b", rig.a.address, b"direct")


def test_prerequisites_hold_here_and_a_missing_feature_is_named() -> None:
    assert check_prerequisites() == []
    bogus = KernelFeature(
        "the frobnicate match",
        "testing",
        ("iptables-restore", "--noflush"),
        "*nat\n-A OUTPUT -m frobnicate -j ACCEPT\nCOMMIT\n",
    )
    problems = kernel_feature_problems([bogus])
    assert len(problems) == 1
    assert problems[0].startswith("the kernel lacks the frobnicate match, needed for testing:")
    assert "frobnicate" in problems[0].split(":", 1)[1]


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(WAIT):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body
