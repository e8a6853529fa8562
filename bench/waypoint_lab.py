"""The namespace lab of the waypoint benchmark: the ztunnels, a real loom-waypoint and HAProxy, each a
process of its own.

`waypoint_lab(prefix, ...)` builds, and always tears down (also on failure or Ctrl-C):

* a `NetnsLab` with three nodes and five pods::

      n1: client        (namespace demo, enrolled: in-pod capture rules, handed to ztunnel n1)
      n2: server        (namespace demo, enrolled: handed to ztunnel n2)
      n3: waypoint      (namespace demo, NOT captured: labelled as the waypoint's own pod, it speaks
                         HBONE itself, exactly as the reconciler's Deployment template labels it)
      n3: haproxy       (namespace outside: a plain pod, no capture)
      n3: haproxy-mesh  (namespace demo, enrolled: handed to ztunnel n3; HAProxy as a mesh workload)

  The L7 hops all sit on n3, so every L7 path crosses the same wires (n1 -> n3 -> n2);
* the controller in-process on 127.0.0.1 (port 0), in directory mode, reading: the Namespaces, the
  Pods, the waypoint Gateway (class istio-waypoint, listener mesh/15008 HBONE) with the ServiceAccount
  and Service the waypoint reconciler would create for it (`controller.waypoints.desired.plan`, the
  Service given a cluster IP), and two Services in front of the server pod: ``server`` (VIP_WAYPOINT,
  labelled istio.io/use-waypoint) and ``server-direct`` (VIP_DIRECT, no waypoint);
* per mesh node (n1, n2, n3) the stand-in node agent (`InpodTestAgent`) in-process and one ``python -m
  ztunnel.main`` subprocess (`bench.netlab.start_ztunnel`);
* the waypoint: ``python -m waypoint.main`` (the `loom-waypoint` entry point) run inside the waypoint
  pod with the environment the reconciler writes (`waypoint_environment`) and a waypoint credential the
  controller issued (`issue_waypoint_token`). It gets its WaypointConfig and the Address resources over
  delta xDS and its certificate from the controller's CA, like any waypoint. The controller listens on
  the root namespace's loopback, which a pod cannot reach, so the orchestrator relays 127.0.0.1:<grpc
  port> inside the waypoint pod to the same address in the root namespace (`LoopbackRelay`: bytes only,
  the TLS and the credential are the waypoint's own). The reconciler itself is not run: it only writes
  these same objects and starts the process, which this module does directly;
* two HAProxy processes (when haproxy is installed), plain HTTP mode, one backend server = the server
  pod's ip:8080 (see `haproxy_config`): one in the plain ``haproxy`` pod, one in ``haproxy-mesh``;
* the app (`bench.waypoint_load serve`) in the server pod.

Every child runs in its own session, so a Ctrl-C reaches only the orchestrator, which then stops the
children (SIGTERM, then SIGKILL after a bound) before removing the namespaces. All traffic stays in
the lab's namespaces and the root namespace's loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from bench.netlab import WAIT, Child, in_pod, python_module, start_ztunnel, wait_for
from controller.app import ControllerApp
from controller.translate.waypoints import LABEL_GATEWAY_NAME
from controller.waypoints.desired import (
    DesiredWaypoint,
    LabSettings,
    WaypointSettings,
    plan,
    waypoint_environment,
)
from loom.resources.loader import parse_object
from loom.resources.model import (
    DATAPLANE_MODE_NONE,
    LABEL_DATAPLANE_MODE,
    LABEL_USE_WAYPOINT,
    Gateway,
)
from loom.testing import manifests
from loom.testing.inpod_agent import AgentPod, InpodTestAgent, enrol
from loom.testing.netns import NetnsLab, Pod, cleanup_prefix
from tests.namespaced.ztunnel_harness import (
    AMBIENT,
    APP_PORT,
    MESH_NAMESPACE,
    OUTSIDE_NAMESPACE,
    PodSpec,
    pod_manifest,
    start_lab_controller,
)
from ztunnel.inpod import WorkloadInfo

WAYPOINT_NAME: Final = "waypoint"
VIP_WAYPOINT: Final = "10.96.0.10"  # Service "server", bound to the waypoint
VIP_DIRECT: Final = "10.96.0.11"  # Service "server-direct", the same pod, no waypoint
VIP_WAYPOINT_SERVICE: Final = "10.96.0.12"  # the waypoint's own Service (mesh/15008)
SERVICE_PORT: Final = 80
HAPROXY_PORT: Final = 8080
WAYPOINT_METRICS_PORT: Final = 15020
WAYPOINT_READINESS_PORT: Final = 15021
NODES: Final = ("n1", "n2", "n3")
ENROLLED: Final = ("client", "server", "haproxy-mesh")
HAPROXY_PODS: Final = ("haproxy", "haproxy-mesh")


def waypoint_gateway() -> Gateway:
    resource = parse_object(manifests.waypoint_gateway(MESH_NAMESPACE, WAYPOINT_NAME))
    if not isinstance(resource, Gateway):
        raise RuntimeError(f"the waypoint manifest parses as {type(resource).__name__}, not a Gateway")
    return resource


def waypoint_plan(gateway: Gateway, xds_address: str) -> DesiredWaypoint:
    desired = plan(gateway, WaypointSettings(xds_address=xds_address))
    if not isinstance(desired, DesiredWaypoint):
        raise RuntimeError(f"the benchmark's waypoint Gateway is rejected: {desired.message}")
    return desired


def pod_specs(waypoint_account: str, waypoint_labels: Mapping[str, str]) -> tuple[PodSpec, ...]:
    return (
        PodSpec("client", "n1", service_account="client"),
        PodSpec("server", "n2", service_account="server", labels={"app": "server"}),
        PodSpec("waypoint", "n3", service_account=waypoint_account, labels=waypoint_labels),
        PodSpec("haproxy", "n3", namespace=OUTSIDE_NAMESPACE),
        PodSpec("haproxy-mesh", "n3", service_account="haproxy"),
    )


def server_service(name: str, vip: str, *, waypoint: bool) -> dict[str, Any]:
    manifest = manifests.service(
        MESH_NAMESPACE, name, selector={"app": "server"}, port=SERVICE_PORT, cluster_ip=vip
    )
    manifest["spec"]["ports"][0]["targetPort"] = APP_PORT  # port name "http": the waypoint parses HTTP
    if waypoint:
        manifest["metadata"]["labels"] = {LABEL_USE_WAYPOINT: WAYPOINT_NAME}
    return manifest


def with_cluster_ip(manifest: Mapping[str, Any], vip: str) -> dict[str, Any]:
    """A copy of a Service manifest with a cluster IP (what the lab's IP allocator would add)."""
    copy: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(manifest)))
    copy["spec"]["clusterIP"] = vip
    copy["spec"]["clusterIPs"] = [vip]
    return copy


def haproxy_config(listen: str, server: str, *, threads: int, stats_socket: Path, log: bool) -> str:
    """HAProxy as the L7 hop: HTTP mode (it parses every request and response, like the waypoint), one
    backend server, keep-alive on both sides with server connections reused across client connections
    (`http-reuse always`, as the waypoint pools its upstream connections), one log line per request on
    stdout in HAProxy's HTTP format (the waypoint writes its access log line to stdout too)."""
    lines = [
        "global",
        f"    nbthread {threads}",
        # HAProxy raises its fd limit to about twice maxconn at start; its default maxconn asks for more
        # than this machine's hard limit (20,000) allows, and the benchmark needs a few hundred.
        "    maxconn 4096",
        f"    stats socket {stats_socket} mode 600 level user",
    ]
    if log:
        lines.append("    log stdout format raw local0 info")
    lines += [
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-keep-alive 60s",
        "    http-reuse always",
    ]
    if log:
        lines += ["    log global", "    option httplog"]
    lines += [
        "frontend l7",
        f"    bind {listen}",
        "    default_backend app",
        "backend app",
        f"    server server {server}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# helpers


class LoopbackRelay:
    """Listens on host:port inside a pod and relays every connection, byte for byte, to the same
    host:port in the orchestrator's own (root) namespace. Only for the waypoint's control-plane traffic
    (xDS and CA: a few kilobytes), never on a measured path."""

    def __init__(self, pod: Pod, host: str, port: int) -> None:
        self.pod = pod
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        listener = await self.pod.netns.arun(lambda: self._listen())
        self._server = await asyncio.start_server(self._accept, sock=listener)

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(WAIT):
                up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def http_get_in(pod: Pod, host: str, port: int, path: str, within: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.0 GET made from inside `pod` (captured when the pod is enrolled): (status, body)."""
    async with asyncio.timeout(within):
        reader, writer = await pod.netns.open_connection(host, port, connect_timeout=within)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
    return code, body


async def answers_200(pod: Pod, host: str, port: int, path: str = "/") -> bool:
    try:
        code, _ = await http_get_in(pod, host, port, path, within=2.0)
    except (OSError, TimeoutError, ConnectionError):
        return False
    return code == 200


def probe(pod: Pod, host: str, port: int) -> Callable[[], Awaitable[bool]]:
    return lambda: answers_200(pod, host, port)


def metric_sum(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of `name` (Prometheus text) whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in (labels or {}).items()):
            total += float(value)
    return total


def haproxy_stat(stats_socket: Path, proxy: str, column: str) -> int:
    """One counter of `show stat` (CSV) on HAProxy's stats socket, for the row `proxy`/FRONTEND."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    rows = b"".join(chunks).decode(errors="replace").splitlines()
    if not rows or not rows[0].startswith("# "):
        raise RuntimeError(f"unexpected answer on HAProxy's stats socket: {rows[:1]}")
    header = rows[0][2:].split(",")
    for row in rows[1:]:
        values = row.split(",")
        if len(values) == len(header) and values[0] == proxy and values[1] == "FRONTEND":
            return int(values[header.index(column)] or 0)
    raise RuntimeError(f"HAProxy reports no frontend {proxy!r}")


# ---------------------------------------------------------------------------------------------------
# the lab


@dataclass(frozen=True, slots=True)
class Haproxy:
    child: Child
    stats_socket: Path

    def requests(self) -> int:
        return haproxy_stat(self.stats_socket, "l7", "req_tot")


@dataclass
class WaypointLab:
    lab: NetnsLab
    workdir: Path
    controller: ControllerApp
    pods: dict[str, Pod]
    ztunnels: dict[str, Child]  # by node
    waypoint: Child
    haproxies: dict[str, Haproxy]  # by pod; empty when haproxy is not installed
    app: Child

    async def waypoint_metrics(self) -> str:
        code, body = await http_get_in(self.pods["waypoint"], "127.0.0.1", WAYPOINT_METRICS_PORT, "/metrics")
        if code != 200:
            raise ConnectionError(f"the waypoint's /metrics answered {code}")
        return body.decode(errors="replace")

    async def waypoint_requests(self) -> float:
        return metric_sum(await self.waypoint_metrics(), "istio_requests_total", {"reporter": "waypoint"})


async def start_waypoint(
    pod: Pod, gateway: Gateway, account: str, workdir: Path, controller: ControllerApp, log_level: str
) -> Child:
    lab_settings = LabSettings(root_cert=workdir / "root-cert.pem", token_dir=workdir)
    token = lab_settings.token_path(gateway.namespace, gateway.name)
    token.write_text(controller.issue_waypoint_token(gateway.namespace, gateway.name))
    token.chmod(0o600)
    settings = WaypointSettings(xds_address=controller.grpc_address, lab=lab_settings)
    env = {
        **os.environ,
        **waypoint_environment(gateway, account, settings),
        "POD_NAME": pod.name,
        "INSTANCE_IP": pod.address,
        "NODE_NAME": "n3",
        "LISTEN_ADDR": "0.0.0.0:15008",
        "METRICS_ADDR": f"127.0.0.1:{WAYPOINT_METRICS_PORT}",
        "READINESS_ADDR": f"127.0.0.1:{WAYPOINT_READINESS_PORT}",
        "CONNECTION_TERMINATION_DEADLINE": "1s",
        "LOG_LEVEL": log_level,
    }
    child = await Child.start(
        "waypoint", in_pod(pod, *python_module("waypoint.main")), env=env, log=workdir / "waypoint.log"
    )

    async def ready() -> bool:
        if not child.alive():
            raise RuntimeError(f"the waypoint exited:\n{child.log_tail()}")
        code, _ = await http_get_in(pod, "127.0.0.1", WAYPOINT_READINESS_PORT, "/healthz/ready", within=1.0)
        return code == 200

    try:
        await wait_for(ready, "the waypoint ready")
    except BaseException:
        await child.stop()
        raise
    return child


async def start_haproxy(
    pod: Pod, server: Pod, workdir: Path, *, threads: int, log: bool, binary: str
) -> Haproxy:
    stats_socket = workdir / f"{pod.name}.sock"
    conf = workdir / f"{pod.name}.cfg"
    conf.write_text(
        haproxy_config(
            f"{pod.address}:{HAPROXY_PORT}",
            f"{server.address}:{APP_PORT}",
            threads=threads,
            stats_socket=stats_socket,
            log=log,
        )
    )
    check = await Child.start(
        "haproxy-check", [binary, "-c", "-q", "-f", str(conf)], log=workdir / f"{pod.name}-check.log"
    )
    if await asyncio.wait_for(check.process.wait(), WAIT) != 0:
        raise RuntimeError(f"haproxy refuses its configuration:\n{check.log_tail()}")
    # -db: stay in the foreground, one process (so the pid is the one that does the work).
    child = await Child.start(
        pod.name, in_pod(pod, binary, "-db", "-f", str(conf)), log=workdir / f"{pod.name}.log"
    )
    return Haproxy(child, stats_socket)


async def start_app(pod: Pod, workdir: Path, size: int) -> Child:
    child = await Child.start(
        "app",
        in_pod(
            pod, *python_module("bench.waypoint_load", "serve", "--port", str(APP_PORT), "--size", str(size))
        ),
        pipe_stdout=True,
        log=workdir / "app.log",
    )
    event = await child.read_event(WAIT)
    if event.get("event") != "listening":
        raise RuntimeError(f"the app did not start: {event}")
    return child


@asynccontextmanager
async def waypoint_lab(
    prefix: str, *, size: int, log_level: str, haproxy_threads: int, haproxy_log: bool
) -> AsyncIterator[WaypointLab]:
    """Everything of the module docstring, ready; torn down in reverse on exit, also on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="wb", dir="/tmp"))  # short: unix socket paths
    config_dir = workdir / "config"
    lab: NetnsLab | None = None
    try:
        config_dir.mkdir()
        lab = NetnsLab(prefix)
        async with contextlib.AsyncExitStack() as stack:
            gateway = waypoint_gateway()
            # Only the plan's objects and pod labels are used; the waypoint's environment is built by
            # start_waypoint with the controller's real address, known once it runs.
            desired = waypoint_plan(gateway, "127.0.0.1:15012")
            labels = desired.deployment["spec"]["template"]["metadata"]["labels"]
            if labels.get(LABEL_GATEWAY_NAME) != WAYPOINT_NAME or labels.get(LABEL_DATAPLANE_MODE) != (
                DATAPLANE_MODE_NONE
            ):
                raise RuntimeError(
                    f"the reconciler's waypoint pods are labelled {labels}: not a waypoint pod"
                )
            specs = pod_specs(desired.account_name, labels)
            nodes = {name: lab.add_node(name) for name in NODES}
            pods = {spec.name: lab.add_pod(nodes[spec.node], spec.name) for spec in specs}
            objects: list[Mapping[str, Any]] = [
                manifests.namespace(MESH_NAMESPACE, AMBIENT),
                manifests.namespace(OUTSIDE_NAMESPACE),
                *(pod_manifest(spec, pods[spec.name]) for spec in specs),
                dict(gateway.raw),
                desired.service_account,
                with_cluster_ip(desired.service, VIP_WAYPOINT_SERVICE),
                server_service("server", VIP_WAYPOINT, waypoint=True),
                server_service("server-direct", VIP_DIRECT, waypoint=False),
            ]
            controller = await start_lab_controller(stack, workdir, config_dir, objects, NODES)

            app = await start_app(pods["server"], workdir, size)
            stack.push_async_callback(app.stop)
            by_name = {spec.name: spec for spec in specs}
            for name in ENROLLED:
                enrol(pods[name])
            for node in NODES:
                agent = InpodTestAgent(str(workdir / f"{node}.sock"))
                agent.pods = {
                    spec.uid: AgentPod(
                        spec.uid,
                        WorkloadInfo(spec.name, spec.namespace, spec.service_account),
                        pods[spec.name].netns.path,
                    )
                    for spec in (by_name[n] for n in ENROLLED)
                    if spec.node == node
                }
                await agent.start()
                stack.push_async_callback(agent.close)

            ztunnels: dict[str, Child] = {}
            for node in NODES:
                ztunnels[node], _ = await start_ztunnel(node, workdir, controller, log_level)
                stack.push_async_callback(ztunnels[node].stop)

            host, port = controller.grpc_address.rsplit(":", 1)
            relay = LoopbackRelay(pods["waypoint"], host, int(port))
            await relay.start()
            stack.push_async_callback(relay.close)
            waypoint = await start_waypoint(
                pods["waypoint"], gateway, desired.account_name, workdir, controller, log_level
            )
            stack.push_async_callback(waypoint.stop)

            haproxies: dict[str, Haproxy] = {}
            binary = shutil.which("haproxy")
            for name in HAPROXY_PODS if binary is not None else ():
                assert binary is not None
                haproxies[name] = await start_haproxy(
                    pods[name],
                    pods["server"],
                    workdir,
                    threads=haproxy_threads,
                    log=haproxy_log,
                    binary=binary,
                )
                stack.push_async_callback(haproxies[name].child.stop)

            bench = WaypointLab(lab, workdir, controller, pods, ztunnels, waypoint, haproxies, app)
            client = pods["client"]
            children = [*ztunnels.values(), waypoint, *(h.child for h in haproxies.values()), app]
            targets = [
                (VIP_DIRECT, SERVICE_PORT, "the ztunnel pair"),
                (VIP_WAYPOINT, SERVICE_PORT, "the waypoint"),
                *((pods[name].address, HAPROXY_PORT, name) for name in haproxies),
            ]
            try:
                for target_host, target_port, what in targets:
                    await wait_for(probe(client, target_host, target_port), f"a request through {what}")
            except TimeoutError as e:
                logs = "\n".join(f"--- {c.name}:\n{c.log_tail()}" for c in children)
                raise TimeoutError(f"{e}\n{logs}") from None
            yield bench
    finally:
        try:
            if lab is not None:
                lab.close()
        finally:
            cleanup_prefix(prefix)
            shutil.rmtree(workdir, ignore_errors=True)
