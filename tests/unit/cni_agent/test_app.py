"""The assembled node agent without root: HTTP endpoints, readiness, the manifests watch driving runtime
enrolment, plugin events over the real socket and a real ztunnel InpodClient (recording backend and
node rules instead of iptables)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cni.agent.app import AgentConfig, NodeAgentApp
from cni.agent.health import BLOCK_CONFIG, BLOCK_PLUGIN_SOCKET, BLOCK_STATE, AgentHttpServer
from cni.agent.metrics import AgentMetrics
from cni.agent.reconcile import REDIRECTION_ANNOTATION
from cni.events import AgentRequest, Outcome, PodAttachment, RequestKind, call_agent
from controller.sources.kubernetes import ApiResource
from loom.lab.store import LabStore, StoredKey
from loom.testing.fake_apiserver import FakeApiServer
from loom.testing.waiting import eventually
from tests.unit.cni_agent.test_runtime_reconcile import POD_IP, RecordingBackend, RecordingHostRules, settles
from tests.unit.cni_agent.test_zds_server import NETNS, WAIT, ztunnel
from ztunnel.readiness import Readiness

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {LABELS}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, uid: uid-web, annotations: {ANNOTATIONS}}}
spec: {{nodeName: n1, serviceAccountName: sa-web, containers: [{{name: app, image: x}}]}}
"""


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


async def test_readyz_names_what_it_waits_for() -> None:
    readiness = Readiness()
    blocks = [readiness.block(name) for name in (BLOCK_STATE, BLOCK_CONFIG, BLOCK_PLUGIN_SOCKET)]
    server = AgentHttpServer(readiness, AgentMetrics(), "127.0.0.1", 0)
    await server.start()
    try:
        status, body = await http_get(server.port, "/readyz")
        assert status == 503
        assert BLOCK_STATE in body and BLOCK_CONFIG in body and BLOCK_PLUGIN_SOCKET in body
        assert await http_get(server.port, "/healthz") == (200, "ok\n")
        for block in blocks[:2]:
            block.release()
        status, body = await http_get(server.port, "/readyz")
        assert status == 503 and body == f"not ready, waiting for: {BLOCK_PLUGIN_SOCKET}\n"
        blocks[2].release()
        assert await http_get(server.port, "/readyz") == (200, "ready\n")
        assert (await http_get(server.port, "/nope"))[0] == 404
    finally:
        await server.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cnia", dir="/tmp"))  # short: unix socket paths
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class ManifestFiles:
    """The configuration directory with one file; the annotator writes back into it, as the lab store
    does, so the agent sees its own annotation come back through its watch."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.labels = "{}"
        self.annotation: str | None = None
        self.calls: list[tuple[str, str, str | None]] = []

    def write(self) -> None:
        annotations = f"{{{REDIRECTION_ANNOTATION}: {self.annotation}}}" if self.annotation else "{}"
        tmp = self.config_dir / ".shop.tmp"
        tmp.write_text(MANIFEST.format(LABELS=self.labels, ANNOTATIONS=annotations))
        os.replace(tmp, self.config_dir / "shop.yaml")

    def label(self, labels: str) -> None:
        self.labels = labels
        self.write()

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        self.calls.append((namespace, name, changes[REDIRECTION_ANNOTATION]))
        self.annotation = changes[REDIRECTION_ANNOTATION]
        self.write()
        return True


@contextlib.asynccontextmanager
async def running_app(workdir: Path, annotator: ManifestFiles) -> AsyncIterator[NodeAgentApp]:
    config = AgentConfig(
        node="n1",
        plugin_socket=str(workdir / "plugin.sock"),
        zds_socket=str(workdir / "zds.sock"),
        manifests=(workdir / "config",),
        state_file=workdir / "state.json",
        http_port=0,
        config_debounce=0.01,
    )
    app = NodeAgentApp(
        config, annotator=annotator, backend=RecordingBackend(), host_rules=RecordingHostRules()
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def test_app_follows_the_manifests(workdir: Path) -> None:
    config_dir = workdir / "config"
    config_dir.mkdir()
    files = ManifestFiles(config_dir)
    files.write()
    attachment = PodAttachment("shop", "web", "uid-web", "c1", NETNS, "eth0", (POD_IP,))
    async with running_app(workdir, files) as app, ztunnel(str(workdir / "zds.sock")) as (_, manager):
        await eventually(lambda: app.readiness.ready, within=WAIT, what="agent ready")
        assert await http_get(app.http_port, "/readyz") == (200, "ready\n")
        await app.zds.wait_ready(WAIT)
        request = AgentRequest(RequestKind.ADD, attachment)
        reply = await asyncio.to_thread(call_agent, str(workdir / "plugin.sock"), request, WAIT)
        assert reply.outcome is Outcome.NOT_ENROLLED

        files.label("{istio.io/dataplane-mode: ambient}")
        await eventually(lambda: "uid-web" in manager.running, within=WAIT, what="enrolled at runtime")

        def pod_annotated() -> bool:
            pod = app.agent.directory.pod("shop", "web")
            return pod is not None and pod.meta.annotations.get(REDIRECTION_ANNOTATION) == "enabled"

        await eventually(pod_annotated, within=WAIT, what="own annotation seen through the watch")
        status, metrics = await http_get(app.http_port, "/metrics")
        assert status == 200
        assert 'loom_cni_agent_pods{state="enrolled"} 1.0' in metrics
        assert "loom_cni_agent_ztunnel_connected 1.0" in metrics
        assert 'loom_cni_agent_events_total{kind="add",outcome="not-enrolled"} 1.0' in metrics
        assert "loom_cni_agent_redirection_errors_total 0.0" in metrics

        # No churn: the write came back once and changed nothing.
        def passes() -> float | None:
            return app.metrics.registry.get_sample_value("loom_cni_agent_reconciles_total", {"result": "ok"})

        await settles(passes)
        assert files.calls == [("shop", "web", "enabled")]

        files.label("{}")
        await eventually(lambda: "uid-web" not in manager.running, within=WAIT, what="released at runtime")
        await eventually(lambda: files.annotation is None, within=WAIT, what="annotation removed")
    # Stopping leaves the state for the next agent; a new one restores it and follows again.
    async with running_app(workdir, files) as app:
        await eventually(lambda: app.readiness.ready, within=WAIT, what="agent ready again")
        assert set(app.agent.known) == {"c1"} and app.agent.captured == {}


async def test_app_in_the_lab_configuration(workdir: Path) -> None:
    """As the lab runs it: --manifests and --annotate-store are the same object store directory, which
    `loomctl label` changes. The annotation lands in the store and causes no further writes."""
    root = workdir / "config"
    store = LabStore(root)
    pod_key = store.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "x"}]},
        }
    )
    store.label(StoredKey("Namespace", "", "shop"), {})  # creates the namespace, unlabelled
    config = AgentConfig(
        node="n1",
        plugin_socket=str(workdir / "plugin.sock"),
        zds_socket=str(workdir / "zds.sock"),
        manifests=(root,),
        state_file=workdir / "state.json",
        annotate_store=root,
        http_port=0,
        config_debounce=0.01,
    )
    app = NodeAgentApp(config, backend=RecordingBackend(), host_rules=RecordingHostRules())
    attachment = PodAttachment("shop", "web", "uid-web", "c1", NETNS, "eth0", (POD_IP,))
    await app.start()
    try:
        async with ztunnel(config.zds_socket) as (_, manager):
            await app.zds.wait_ready(WAIT)
            reply = await app.agent.handle(AgentRequest(RequestKind.ADD, attachment))
            assert reply.outcome is Outcome.NOT_ENROLLED

            def annotation() -> str | None:
                stored = store.get(pod_key) or {}
                return (stored.get("metadata", {}).get("annotations") or {}).get(REDIRECTION_ANNOTATION)

            store.label(StoredKey("Namespace", "", "shop"), {"istio.io/dataplane-mode": "ambient"})
            await eventually(lambda: "uid-web" in manager.running, within=WAIT, what="enrolled")
            await eventually(lambda: annotation() == "enabled", within=WAIT, what="annotated in the store")
            assert app.annotations is not None
            await settles(lambda: app.annotations.writes if app.annotations else None)
            assert app.annotations.writes == 1

            store.label(StoredKey("Namespace", "", "shop"), {"istio.io/dataplane-mode": None})
            await eventually(lambda: "uid-web" not in manager.running, within=WAIT, what="released")
            await eventually(lambda: annotation() is None, within=WAIT, what="annotation removed")
    finally:
        await app.stop()


async def test_app_follows_kubernetes_and_annotates_pods_there(workdir: Path) -> None:
    """--kubernetes: pods and namespaces by list+watch from the API server (the stand-in speaks the
    real protocol), the redirection annotation written back as a merge patch on the Pod."""
    async with FakeApiServer() as api:
        api.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        api.add(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web"},
                "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "x"}]},
                "status": {"phase": "Running", "podIP": str(POD_IP)},
            }
        )
        config = AgentConfig(
            node="n1",
            plugin_socket=str(workdir / "plugin.sock"),
            zds_socket=str(workdir / "zds.sock"),
            state_file=workdir / "state.json",
            kubernetes=True,
            kubernetes_url=api.url,
            http_port=0,
        )
        app = NodeAgentApp(config, backend=RecordingBackend(), host_rules=RecordingHostRules())
        attachment = PodAttachment("shop", "web", "uid-web", "c1", NETNS, "eth0", (POD_IP,))
        await app.start()
        try:
            async with ztunnel(config.zds_socket) as (_, manager):
                await eventually(lambda: app.readiness.ready, within=WAIT, what="agent ready")
                await app.zds.wait_ready(WAIT)
                reply = await app.agent.handle(AgentRequest(RequestKind.ADD, attachment))
                assert reply.outcome is Outcome.NOT_ENROLLED

                def annotation() -> str | None:
                    pod = api.get("pods", "shop", "web") or {}
                    return (pod.get("metadata", {}).get("annotations") or {}).get(REDIRECTION_ANNOTATION)

                namespace = api.get("namespaces", "", "shop")
                assert namespace is not None
                namespace["metadata"]["labels"] = {"istio.io/dataplane-mode": "ambient"}
                api.update(namespace)
                await eventually(lambda: "uid-web" in manager.running, within=WAIT, what="enrolled")
                await eventually(lambda: annotation() == "enabled", within=WAIT, what="pod annotated")

                namespace = api.get("namespaces", "", "shop")
                assert namespace is not None
                namespace["metadata"]["labels"] = {}
                api.update(namespace)
                await eventually(lambda: "uid-web" not in manager.running, within=WAIT, what="released")
                await eventually(lambda: annotation() is None, within=WAIT, what="annotation removed")
            patches = [r for r in api.requests if r.method == "PATCH"]
            assert patches and all(r.path == "/api/v1/namespaces/shop/pods/web" for r in patches)
        finally:
            await app.stop()


async def test_app_follows_only_the_pods_of_its_node(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--kubernetes with --node: pods are listed and watched with `fieldSelector=spec.nodeName=<node>`, as
    Istio's node agent does, so a pod of another node never reaches the agent, whatever happens to it,
    and a pod bound to this node later arrives through the watch (not before, while unscheduled)."""

    def shop_pod(name: str, node: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}"},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running", "podIP": str(POD_IP)},
        }

    def edit_pod(api: FakeApiServer, name: str, edit: Callable[[dict[str, Any]], object]) -> None:
        pod = api.get("pods", "shop", name)
        assert pod is not None
        edit(pod)
        api.update(pod)

    def web_labels(app: NodeAgentApp) -> Mapping[str, str]:
        pod = app.agent.directory.pod("shop", "web")
        return pod.meta.labels if pod is not None else {}

    async with FakeApiServer() as api:
        labels = {"istio.io/dataplane-mode": "ambient"}
        api.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}})
        api.add(shop_pod("web", "n1"))
        api.add(shop_pod("elsewhere", "n2"))
        config = AgentConfig(
            node="n1",
            plugin_socket=str(workdir / "plugin.sock"),
            zds_socket=str(workdir / "zds.sock"),
            state_file=workdir / "state.json",
            kubernetes=True,
            kubernetes_url=api.url,
            http_port=0,
        )
        app = NodeAgentApp(config, backend=RecordingBackend(), host_rules=RecordingHostRules())
        assert app.kubernetes is not None
        # Every pod object the agent's source takes in from the API server, as (name, node).
        taken_in: list[tuple[str, str]] = []
        upsert = app.kubernetes.cache.upsert

        def recording_upsert(resource: ApiResource, raw: Mapping[str, Any]) -> bool:
            if resource.kind == "Pod":
                taken_in.append((raw["metadata"]["name"], raw["spec"]["nodeName"]))
            return upsert(resource, raw)

        monkeypatch.setattr(app.kubernetes.cache, "upsert", recording_upsert)
        await app.start()
        try:
            await eventually(lambda: app.readiness.ready, within=WAIT, what="agent ready")
            assert app.agent.directory.pod("shop", "web") is not None

            # The other node's pod changes and a new pod waits unscheduled. A change of this node's pod
            # after them, on the same revision-ordered stream, shows when the agent has been told
            # everything its watch would ever tell it about them.
            edit_pod(api, "elsewhere", lambda pod: pod["metadata"].update(labels={"changed": "yes"}))
            api.add(shop_pod("late", ""))
            edit_pod(api, "web", lambda pod: pod["metadata"].update(labels={"barrier": "1"}))
            await eventually(lambda: web_labels(app) == {"barrier": "1"}, within=WAIT, what="barrier")
            assert app.agent.directory.pod("shop", "late") is None

            # The scheduler binds the pending pod to this node: it enters the selection as ADDED.
            edit_pod(api, "late", lambda pod: pod["spec"].update(nodeName="n1"))
            await eventually(
                lambda: app.agent.directory.pod("shop", "late") is not None, within=WAIT, what="bound pod"
            )
            api.delete("pods", "shop", "elsewhere")
            api.delete("pods", "shop", "web")
            await eventually(
                lambda: app.agent.directory.pod("shop", "web") is None, within=WAIT, what="deleted pod"
            )
            # Stop only once the reconcile loop is idle: on Python 3.11 the asyncio.wait_for in
            # NodeAgent.run swallows a cancel that lands together with a wake-up, and stop() would
            # then wait for that task forever.
            await settles(
                lambda: app.metrics.registry.get_sample_value(
                    "loom_cni_agent_reconciles_total", {"result": "ok"}
                )
            )
        finally:
            await app.stop()
        assert set(taken_in) == {("web", "n1"), ("late", "n1")}
        pod_requests = api.requests_for("pods")
        assert any(r.is_watch for r in pod_requests) and any(not r.is_watch for r in pod_requests)
        assert all(r.query.get("fieldSelector") == "spec.nodeName=n1" for r in pod_requests)


@pytest.mark.parametrize("node", ["Node-1", "n1,status.phase=Running", "n1 "])
def test_app_refuses_a_node_name_it_cannot_select_pods_by(workdir: Path, node: str) -> None:
    config = AgentConfig(
        node=node,
        plugin_socket=str(workdir / "plugin.sock"),
        zds_socket=str(workdir / "zds.sock"),
        state_file=workdir / "state.json",
        kubernetes=True,
        kubernetes_url="http://127.0.0.1:9",  # never contacted: construction fails first
        http_port=0,
    )
    with pytest.raises(ValueError, match="node name: invalid name"):
        NodeAgentApp(config, backend=RecordingBackend(), host_rules=RecordingHostRules())
