"""A small ambient mesh in network namespaces for the ztunnel root tests.

`mesh_lab(lab, layout)` builds, and always tears down:

* the namespaces of `layout` (nodes, pods; see `PodSpec`) through the test's `NetnsLab`;
* one controller in-process on 127.0.0.1 (port 0) reading a temp config directory of Namespace / Pod /
  Service YAML that describes exactly those pods (uid, nodeName, podIP, serviceAccountName, Ready);
  tests add policies by writing more files (`MeshLab.apply`), which the controller watches;
* per node: the in-pod rules in every mesh pod (`enrol`), a stand-in node agent (`InpodTestAgent`) on a
  temp unix socket handing the mesh pods' netns fds over, and a real `ZtunnelApp` in-process for that
  node, authenticated with a node token and the controller's root written to temp files;
* per pod an identify/echo server (`PodServer`): it first answers with "<pod name> <peer ip>\n" (so a
  test sees who answered and which source address the app saw), then echoes what it receives.

The ztunnels run in the root namespace (their pod sockets are created inside the pods through the netns
fds); all pod traffic stays inside the lab's namespaces. Every wait is bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cni.rules import IpFamily
from controller.app import ControllerApp
from controller.config import Config as ControllerConfig
from loom.identity import Identity
from loom.policy.rbac import Connection
from loom.testing import manifests
from loom.testing.inpod_agent import AgentPod, InpodTestAgent, enrol
from loom.testing.netns import NetnsLab, Node, Pod
from loom.testing.waiting import eventually
from ztunnel.app import ZtunnelApp
from ztunnel.config import Config
from ztunnel.inpod import InpodClientConfig, WorkloadInfo
from ztunnel.proxy import ProxySettings

WAIT = 10.0  # upper bound of every wait; normal steps take milliseconds
APP_PORT = 8080
TRUST_DOMAIN = "cluster.local"
MESH_NAMESPACE = "demo"
OUTSIDE_NAMESPACE = "outside"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    node: str
    namespace: str = MESH_NAMESPACE
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    ipv6_off: bool = False  # net.ipv6.conf.all.disable_ipv6=1 in the pod (before it is enrolled)

    @property
    def mesh(self) -> bool:
        return self.namespace == MESH_NAMESPACE

    @property
    def uid(self) -> str:
        return f"uid-{self.name}"

    @property
    def identity(self) -> Identity:
        return Identity(TRUST_DOMAIN, self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    vip: str
    selector: Mapping[str, str]
    port: int = 80
    target_port: int = APP_PORT
    vip6: str | None = None  # a dual-stack Service's IPv6 cluster IP


@dataclass(frozen=True, slots=True)
class Layout:
    nodes: tuple[str, ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...] = ()


class PodServer:
    """The app of one pod: greets with "<pod> <peer ip>\\n", then echoes; records every peer."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.peers: list[tuple[str, int]] = []
        self._server: asyncio.Server | None = None
        self._server6: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = APP_PORT) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.pod.netns.listen("0.0.0.0", port))
        if self.pod.ip6 is not None:
            self._server6 = await asyncio.start_server(self._handle, sock=self.pod.netns.listen("::", port))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.peers.append((peer[0], peer[1]))
        self._writers.add(writer)
        try:
            writer.write(f"{self.pod.name} {peer[0]}\n".encode())
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        servers = [server for server in (self._server, self._server6) if server is not None]
        for server in servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), WAIT)


@dataclass
class MeshNode:
    node: Node
    socket_path: str
    agent: InpodTestAgent
    app: ZtunnelApp | None = None  # the newest ztunnel of this node
    started: list[ZtunnelApp] = field(default_factory=list)  # every one started, for the teardown


@dataclass
class MeshLab:
    lab: NetnsLab
    layout: Layout
    workdir: Path
    config_dir: Path
    controller: ControllerApp
    pods: dict[str, Pod]
    specs: dict[str, PodSpec]
    servers: dict[str, PodServer]
    nodes: dict[str, MeshNode]

    def ztunnel(self, node: str) -> ZtunnelApp:
        app = self.nodes[node].app
        assert app is not None, f"no ztunnel runs on {node}"
        return app

    def ztunnel_of(self, pod: str) -> ZtunnelApp:
        return self.ztunnel(self.specs[pod].node)

    def apply(self, name: str, *objects: Mapping[str, Any]) -> None:
        """Write (or replace) one config file; the controller picks it up."""
        path = self.config_dir / f"{name}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False))
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        (self.config_dir / f"{name}.yaml").unlink(missing_ok=True)

    def ztunnel_config(self, node: str, deadline: float = 1.0) -> Config:
        return Config(
            node_name=node,
            xds_address=self.controller.grpc_address,
            ca_address=self.controller.grpc_address,
            root_cert=self.workdir / "root-cert.pem",
            node_token_file=self.workdir / f"token-{node}",
            inpod_uds=self.nodes[node].socket_path,
            admin_addr=("127.0.0.1", 0),
            metrics_addr=("127.0.0.1", 0),
            readiness_addr=("127.0.0.1", 0),
            connection_termination_deadline=dt.timedelta(seconds=deadline),
        )

    async def start_ztunnel(self, node: str, deadline: float = 1.0) -> ZtunnelApp:
        """A new ztunnel for `node` (also while an older one still runs: it takes the pods over)."""
        config = self.ztunnel_config(node, deadline)
        app = ZtunnelApp(
            config,
            inpod_config=InpodClientConfig(
                socket_path=config.inpod_uds, retry_interval=0.05, backoff_max=0.05, io_timeout=2.0
            ),
            settings=ProxySettings(drain_deadline=deadline),
        )
        try:
            await app.start()
            await eventually(lambda: app.ready, within=WAIT, what=f"ztunnel on {node} ready")
        except BaseException:
            await app.stop()
            raise
        self.nodes[node].app = app
        self.nodes[node].started.append(app)
        return app


def controller_config(state_dir: Path, config_dir: Path) -> ControllerConfig:
    """A directory-mode controller on 127.0.0.1 with ephemeral ports and fast pushes."""
    argv = ["--state-dir", str(state_dir), "--config-dir", str(config_dir)]
    argv += [
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--debounce",
        "5ms",
        "--max-push-delay",
        "20ms",
    ]
    return ControllerConfig.from_args(argv, {})


def pod_families(pod: Pod) -> tuple[IpFamily, ...]:
    """The address families the in-pod rules capture, as the node agent picks them: IPv6 too wherever
    the pod's namespace has it (cni.agent.redirect)."""
    ipv6 = pod.netns.read_sysctl("net.ipv6.conf.all.disable_ipv6") == "0"
    return (IpFamily.V4, IpFamily.V6) if ipv6 else (IpFamily.V4,)


def pod_manifest(spec: PodSpec, pod: Pod) -> dict[str, Any]:
    manifest = manifests.pod(
        spec.namespace,
        spec.name,
        labels=dict(spec.labels) or {"app": spec.name},
        service_account=spec.service_account,
        node=spec.node,
        ip=pod.address,
        secondary_ips=[str(ip) for ip in pod.ips[1:]],
        port=APP_PORT,
    )
    manifest["metadata"]["uid"] = spec.uid
    return manifest


def _service_manifest(spec: ServiceSpec) -> dict[str, Any]:
    manifest = manifests.service(
        MESH_NAMESPACE,
        spec.name,
        selector=spec.selector,
        port=spec.port,
        cluster_ip=spec.vip,
        secondary_cluster_ips=[spec.vip6] if spec.vip6 else [],
    )
    manifest["spec"]["ports"][0]["targetPort"] = spec.target_port
    return manifest


async def start_lab_controller(
    stack: contextlib.AsyncExitStack,
    workdir: Path,
    config_dir: Path,
    objects: Sequence[Mapping[str, Any]],
    nodes: Sequence[str],
) -> ControllerApp:
    """The configuration written, an in-process controller ready (stopped by `stack`), its root at
    workdir/root-cert.pem and a node credential at workdir/token-<node> for every node."""
    (config_dir / "mesh.yaml").write_text(yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False))
    controller = ControllerApp(controller_config(workdir / "state", config_dir))
    try:
        await controller.start()
    finally:
        stack.push_async_callback(controller.stop)
    await eventually(lambda: controller.ready, within=WAIT, what="controller ready")
    (workdir / "root-cert.pem").write_text(controller.root_cert_pem)
    for name in nodes:
        token = workdir / f"token-{name}"
        token.write_text(controller.issue_node_token(name))
        token.chmod(0o600)
    return controller


@asynccontextmanager
async def mesh_lab(lab: NetnsLab, layout: Layout) -> AsyncIterator[MeshLab]:
    """Everything of the module docstring up and ready; torn down in reverse on exit, also on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="zt", dir="/tmp"))  # short: unix socket paths
    config_dir = workdir / "config"
    config_dir.mkdir()
    nodes = {name: lab.add_node(name) for name in layout.nodes}
    pods = {spec.name: lab.add_pod(nodes[spec.node], spec.name) for spec in layout.pods}
    specs = {spec.name: spec for spec in layout.pods}
    objects: list[Mapping[str, Any]] = [
        manifests.namespace(MESH_NAMESPACE, AMBIENT),
        manifests.namespace(OUTSIDE_NAMESPACE),
    ]
    objects += [pod_manifest(spec, pods[spec.name]) for spec in layout.pods]
    objects += [_service_manifest(s) for s in layout.services]

    servers: dict[str, PodServer] = {}
    mesh_nodes: dict[str, MeshNode] = {}
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        controller = await start_lab_controller(stack, workdir, config_dir, objects, layout.nodes)
        for spec in layout.pods:
            if spec.ipv6_off:
                pods[spec.name].netns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
            server = PodServer(pods[spec.name])
            await server.start()
            stack.push_async_callback(server.close)
            servers[spec.name] = server
            if spec.mesh:
                enrol(pods[spec.name], families=pod_families(pods[spec.name]))
        for name in layout.nodes:
            agent = InpodTestAgent(str(workdir / f"{name}.sock"))
            agent.pods = {
                spec.uid: AgentPod(
                    spec.uid,
                    WorkloadInfo(spec.name, spec.namespace, spec.service_account),
                    pods[spec.name].netns.path,
                )
                for spec in layout.pods
                if spec.node == name and spec.mesh
            }
            await agent.start()
            stack.push_async_callback(agent.close)
            mesh_nodes[name] = MeshNode(nodes[name], agent.socket_path, agent)
        mesh = MeshLab(lab, layout, workdir, config_dir, controller, pods, specs, servers, mesh_nodes)

        stack.push_async_callback(_stop_all_ztunnels, mesh)
        for name in layout.nodes:
            await mesh.start_ztunnel(name)
        yield mesh


async def _stop_all_ztunnels(mesh: MeshLab) -> None:
    for node in mesh.nodes.values():
        for app in node.started:
            await app.stop()


# ---------------------------------------------------------------------------------------------------
# what a ztunnel holds


def samples(app: ZtunnelApp, name: str) -> list[dict[str, str]]:
    """Label sets of the non-zero samples of metric `name` (e.g. istio_tcp_connections_opened_total)."""
    found = []
    for family in app.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.value > 0:
                found.append(dict(sample.labels))
    return found


def allowed(
    mesh: MeshLab, source: str, destination: str, *, identity: bool = True, ipv6: bool = False
) -> bool:
    """What the destination's ztunnel would decide right now for source -> destination:APP_PORT (over
    IPv6 between the pods' IPv6 addresses with `ipv6`)."""
    app = mesh.ztunnel_of(destination)
    spec = mesh.specs[destination]
    workload = app.state.workload(f"Kubernetes//Pod/{spec.namespace}/{spec.name}")
    assert workload is not None
    connection = Connection(
        mesh.specs[source].identity if identity else None,
        ipaddress.ip_address(mesh.pods[source].address6 if ipv6 else mesh.pods[source].address),
        ipaddress.ip_address(mesh.pods[destination].address6 if ipv6 else mesh.pods[destination].address),
        APP_PORT,
    )
    return app.state.authorize(workload, connection).allowed


# ---------------------------------------------------------------------------------------------------
# clients


@dataclass(frozen=True, slots=True)
class Answer:
    server: str  # the pod whose app answered
    seen_ip: str  # the source address the app saw
    echoed: bytes


async def call(pod: Pod, host: str, port: int, payload: bytes = b"ping") -> Answer:
    """Connect from `pod` (an ordinary app socket: captured when the pod is enrolled), read the
    greeting, send `payload`, half-close, read the echo to EOF. Raises ConnectionError when refused."""
    reader, writer = await pod.netns.open_connection(host, port, connect_timeout=WAIT)
    try:
        async with asyncio.timeout(WAIT):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionRefusedError(f"{pod.name} -> {host}:{port}: closed without an answer")
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            echoed = await reader.read()
    finally:
        writer.close()
    server, seen_ip = line.decode().split()
    return Answer(server, seen_ip, echoed)


async def refused(pod: Pod, host: str, port: int) -> bool:
    """True when a connection from `pod` gets no answer from the app (reset or closed by ztunnel)."""
    try:
        await call(pod, host, port)
    except (ConnectionError, OSError):
        return True
    return False


# ---------------------------------------------------------------------------------------------------
# packet capture


class Capture:
    """tcpdump on one interface inside a namespace, writing a pcap; `stop()` returns the raw bytes."""

    def __init__(self, netns: str, interface: str, path: Path) -> None:
        self.path = path
        self._process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "tcpdump",
                # Keep root: the default drops to the tcpdump user, who cannot write into the test's
                # private temp directory.
                "-Z",
                "root",
                # Hand each packet over at once; otherwise the last ones wait in the kernel ring
                # buffer and are lost when the capture is stopped.
                "--immediate-mode",
                "-i",
                interface,
                "-U",
                "-s",
                "0",
                "-n",
                "-w",
                str(path),
                "tcp",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def wait_listening(self) -> None:
        """tcpdump prints "listening on" once its capture is armed."""
        assert self._process.stderr is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, self._process.stderr.readline), WAIT)
        if b"listening on" not in line:
            raise RuntimeError(f"tcpdump did not start: {line!r}")

    def stop(self) -> bytes:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(WAIT)
        if self._process.stderr is not None:
            self._process.stderr.close()
        return self.path.read_bytes() if self.path.exists() else b""

    def summary(self) -> str:
        """The capture decoded by tcpdump (one line per packet, numeric)."""
        result = subprocess.run(
            ["tcpdump", "-nn", "-r", str(self.path)], capture_output=True, text=True, timeout=WAIT, check=True
        )
        return result.stdout
