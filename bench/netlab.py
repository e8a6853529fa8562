"""The two-node namespace lab of the ztunnel benchmark, with every proxy in a process of its own.

`bench_lab(args)` builds, and always tears down (also on failure or Ctrl-C):

* a `NetnsLab` with nodes n1 and n2 and four pods: ``client`` (n1) and ``server`` (n2) are enrolled in the
  mesh (namespace "demo", in-pod capture rules installed); ``pclient`` (n1) and ``pserver`` (n2) are
  plain pods (namespace "outside"), used for direct TCP and for the stunnel pair so the mesh is never
  in their path. The pods of a pair sit on the same nodes, so every case crosses the same wire;
* the controller in-process on 127.0.0.1 (port 0), reading Namespace/Pod manifests for exactly those
  pods (the manifests and the controller configuration of `tests.namespaced.ztunnel_harness`);
* per node the stand-in node agent (`InpodTestAgent`) in-process, and one ``python -m ztunnel.main``
  SUBPROCESS configured through its environment (`ztunnel.config`), so its CPU time and RSS are its own;
* the app (`bench.ztunnel_load serve`) as its own process in ``server`` and in ``pserver``;
* a stunnel4 pair: a client in ``pclient`` accepting on 127.0.0.1 and a server in ``pserver`` forwarding
  to the app over loopback, TLS 1.3 only, both sides with EC P-256 certificates carrying SPIFFE URIs
  minted by `controller.ca.authority.CertificateAuthority` (the same kind ztunnel uses) and verifying
  the peer's chain to that root.

Every child is started in its own session, so a Ctrl-C reaches only the orchestrator, which then stops
the children in order (SIGTERM, then SIGKILL after a bound) before it removes the namespaces. The
ztunnels run in the root namespace like the in-process ones of the root tests: their pod sockets are
made inside the pods through the netns fds the agent hands over. All traffic stays in the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.app import ControllerApp
from controller.ca.authority import CertificateAuthority
from loom.identity import Identity
from loom.testing import manifests
from loom.testing.inpod_agent import AgentPod, InpodTestAgent, enrol
from loom.testing.netns import NetnsLab, Pod, cleanup_prefix
from tests.namespaced.ztunnel_harness import (
    AMBIENT,
    APP_PORT,
    MESH_NAMESPACE,
    OUTSIDE_NAMESPACE,
    TRUST_DOMAIN,
    PodSpec,
    pod_manifest,
    start_lab_controller,
)
from ztunnel.inpod import WorkloadInfo

REPO: Final = Path(__file__).resolve().parent.parent
WAIT: Final = 20.0  # upper bound of every start-up wait; normal steps take well under a second
STOP_WAIT: Final = 5.0
STUNNEL_SERVER_PORT: Final = 8443
STUNNEL_CLIENT_PORT: Final = 18080
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

PODS: Final = (
    PodSpec("client", "n1", service_account="client"),
    PodSpec("server", "n2", service_account="server"),
    PodSpec("pclient", "n1", namespace=OUTSIDE_NAMESPACE),
    PodSpec("pserver", "n2", namespace=OUTSIDE_NAMESPACE),
)
NODES: Final = ("n1", "n2")


# ---------------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 of the root namespace that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Memory:
    rss: int  # bytes
    anon: int  # bytes


def open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # handed to the child; the caller closes it right after the spawn


class Child:
    """A child process in its own session, with /proc readings of its CPU time and memory."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path | None) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        pipe_stdout: bool = False,
        pipe_stdin: bool = False,
    ) -> Child:
        sink: IO[bytes] | None = None
        if log is not None:
            sink = open_log(log)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO,
                env=dict(env) if env is not None else None,
                stdin=asyncio.subprocess.PIPE if pipe_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipe_stdout else (sink or asyncio.subprocess.DEVNULL),
                stderr=sink or asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C goes to the orchestrator only; it stops us in order
                limit=1 << 20,
            )
        finally:
            if sink is not None:
                sink.close()
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.returncode is None

    def cpu_times(self) -> tuple[float, float]:
        """(utime, stime) of the process, all its threads, in seconds, from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid}/stat") as handle:
            stat = handle.read()
        # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def memory(self) -> Memory:
        """VmRSS and its anonymous part (RssAnon: heap and stacks, not the shared libraries' pages)."""
        found: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    found[key] = int(value.split()[0]) * 1024
        if len(found) != 2:
            raise RuntimeError(f"{self.name} (pid {self.pid}) has no VmRSS/RssAnon in /proc/<pid>/status")
        return Memory(found["VmRSS"], found["RssAnon"])

    def comm(self) -> str:
        with open(f"/proc/{self.pid}/comm") as handle:
            return handle.read().strip()

    async def read_event(self, within: float) -> dict[str, Any]:
        """The next JSON line the child prints (children started with pipe_stdout)."""
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            line = await self.process.stdout.readline()
        if not line:
            await asyncio.wait_for(self.process.wait(), STOP_WAIT)
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}) without reporting")
        parsed = json.loads(line)
        if not isinstance(parsed, dict):
            raise RuntimeError(f"{self.name} printed {line!r}, not a JSON object")
        return parsed

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_WAIT."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_WAIT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await asyncio.wait_for(self.process.wait(), STOP_WAIT)


def in_pod(pod: Pod, *argv: str) -> list[str]:
    """`argv` run inside the pod's namespace (ip netns exec execs it: the child pid is argv's own)."""
    return ["ip", "netns", "exec", pod.netns.name, *argv]


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# ---------------------------------------------------------------------------------------------------
# certificates for the stunnel pair


@dataclass(frozen=True, slots=True)
class TlsFiles:
    chain: Path
    key: Path
    root: Path


def mint(ca: CertificateAuthority, identity: Identity, directory: Path, name: str) -> TlsFiles:
    """An EC P-256 key and a CA-signed chain for `identity` (a SPIFFE URI SAN), written to `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    chain = ca.sign(csr.public_bytes(serialization.Encoding.PEM), identity)
    files = TlsFiles(directory / f"{name}-chain.pem", directory / f"{name}-key.pem", directory / "root.pem")
    files.chain.write_text("".join(chain))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    files.root.write_text(ca.trust_bundle_pem)
    return files


def stunnel_config(
    files: TlsFiles, *, client: bool, accept: str, connect: str, log_level: str = "warning"
) -> str:
    """One stunnel service, TLS 1.3 only, the peer's chain verified against the root (both ways)."""
    lines = [
        "foreground = yes",
        "pid =",
        f"debug = {log_level}",
        "[tunnel]",
        f"client = {'yes' if client else 'no'}",
        f"accept = {accept}",
        f"connect = {connect}",
        f"cert = {files.chain}",
        f"key = {files.key}",
        f"CAfile = {files.root}",
        "verifyChain = yes",  # implies requireCert on the server side: mutual TLS
        "sslVersionMin = TLSv1.3",
        "sslVersionMax = TLSv1.3",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# the lab


@dataclass
class BenchLab:
    lab: NetnsLab
    workdir: Path
    controller: ControllerApp
    pods: dict[str, Pod]
    ztunnels: dict[str, Child]  # by node
    metrics_ports: dict[str, int]  # by node
    stunnels: dict[str, Child]  # "client", "server"
    apps: dict[str, Child]  # by pod

    @property
    def stunnel_target(self) -> tuple[str, int]:
        """Where a client in pclient connects to go through the stunnel pair."""
        return "127.0.0.1", STUNNEL_CLIENT_PORT

    async def metric_sum(self, node: str, name: str, labels: Mapping[str, str]) -> float:
        """Sum of the samples of `name` whose labels include `labels`, from the node ztunnel's /metrics."""
        body = await http_get("127.0.0.1", self.metrics_ports[node], "/metrics")
        total = 0.0
        for line in body.splitlines():
            if not line.startswith(name + "{"):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


async def http_get(host: str, port: int, path: str, within: float = 5.0) -> str:
    """A tiny HTTP/1.0 GET (the ztunnel's admin surfaces on loopback); raises unless the status is 200."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ConnectionError(f"GET {path} on {host}:{port}: {head[:80]!r}")
    return body.decode(errors="replace")


async def echo_once(pod: Pod, host: str, port: int, within: float = 5.0) -> bool:
    """One echo round trip from `pod` (an ordinary app socket: captured when the pod is enrolled)."""
    try:
        reader, writer = await pod.netns.open_connection(host, port, connect_timeout=within)
    except (OSError, TimeoutError):
        return False
    try:
        async with asyncio.timeout(within):
            writer.write(b"Eping")
            await writer.drain()
            return await reader.readexactly(4) == b"ping"
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def wait_for(check: Callable[[], Any], what: str, within: float = WAIT) -> None:
    """Until the coroutine function `check` returns true (bounded)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            if await check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.05)


async def start_app(pod: Pod, workdir: Path) -> Child:
    child = await Child.start(
        f"app-{pod.name}",
        in_pod(pod, *python_module("bench.ztunnel_load", "serve", "--port", str(APP_PORT))),
        pipe_stdout=True,
        log=workdir / f"app-{pod.name}.log",
    )
    event = await child.read_event(WAIT)
    if event.get("event") != "listening":
        raise RuntimeError(f"app in {pod.name} did not start: {event}")
    return child


async def start_ztunnel(
    node: str, workdir: Path, controller: ControllerApp, log_level: str
) -> tuple[Child, int]:
    ports = {name: free_port() for name in ("admin", "metrics", "readiness")}
    env = {
        **os.environ,
        "NODE_NAME": node,
        "XDS_ADDRESS": controller.grpc_address,
        "CA_ADDRESS": controller.grpc_address,
        "ROOT_CERT": str(workdir / "root-cert.pem"),
        "NODE_TOKEN_FILE": str(workdir / f"token-{node}"),
        "INPOD_UDS": str(workdir / f"{node}.sock"),
        "ADMIN_ADDR": f"127.0.0.1:{ports['admin']}",
        "METRICS_ADDR": f"127.0.0.1:{ports['metrics']}",
        "READINESS_ADDR": f"127.0.0.1:{ports['readiness']}",
        "CONNECTION_TERMINATION_DEADLINE": "1s",
        "LOG_LEVEL": log_level,
    }
    child = await Child.start(
        f"ztunnel-{node}", python_module("ztunnel.main"), env=env, log=workdir / f"ztunnel-{node}.log"
    )

    async def ready() -> bool:
        if not child.alive():
            raise RuntimeError(f"ztunnel on {node} exited:\n{child.log_tail()}")
        await http_get("127.0.0.1", ports["readiness"], "/healthz/ready", within=1.0)
        return True

    try:
        await wait_for(ready, f"ztunnel on {node} ready")
    except BaseException:
        await child.stop()
        raise
    return child, ports["metrics"]


async def start_stunnels(pods: Mapping[str, Pod], workdir: Path) -> dict[str, Child]:
    tls_dir = workdir / "tls"
    tls_dir.mkdir()
    ca = CertificateAuthority.load_or_create(workdir / "stunnel-ca", TRUST_DOMAIN)
    server_files = mint(ca, Identity(TRUST_DOMAIN, OUTSIDE_NAMESPACE, "stunnel-server"), tls_dir, "server")
    client_files = mint(ca, Identity(TRUST_DOMAIN, OUTSIDE_NAMESPACE, "stunnel-client"), tls_dir, "client")
    server_conf = tls_dir / "server.conf"
    server_conf.write_text(
        stunnel_config(
            server_files,
            client=False,
            accept=f"{pods['pserver'].address}:{STUNNEL_SERVER_PORT}",
            connect=f"127.0.0.1:{APP_PORT}",
        )
    )
    client_conf = tls_dir / "client.conf"
    client_conf.write_text(
        stunnel_config(
            client_files,
            client=True,
            accept=f"127.0.0.1:{STUNNEL_CLIENT_PORT}",
            connect=f"{pods['pserver'].address}:{STUNNEL_SERVER_PORT}",
        )
    )
    stunnels: dict[str, Child] = {}
    try:
        for role, pod, conf in (
            ("server", pods["pserver"], server_conf),
            ("client", pods["pclient"], client_conf),
        ):
            stunnels[role] = await Child.start(
                f"stunnel-{role}", in_pod(pod, "stunnel4", str(conf)), log=workdir / f"stunnel-{role}.log"
            )

        async def through() -> bool:
            for child in stunnels.values():
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
            return await echo_once(pods["pclient"], "127.0.0.1", STUNNEL_CLIENT_PORT, within=2.0)

        try:
            await wait_for(through, "an echo through the stunnel pair")
        except TimeoutError as e:
            logs = "\n".join(f"--- {c.name}:\n{c.log_tail()}" for c in stunnels.values())
            raise TimeoutError(f"{e}\n{logs}") from None
    except BaseException:
        for child in stunnels.values():
            await child.stop()
        raise
    return stunnels


@asynccontextmanager
async def bench_lab(prefix: str, log_level: str = "info") -> AsyncIterator[BenchLab]:
    """Everything of the module docstring, ready; torn down in reverse on exit, also on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="zb", dir="/tmp"))  # short: unix socket paths
    config_dir = workdir / "config"
    config_dir.mkdir()
    lab = NetnsLab(prefix)
    try:
        async with contextlib.AsyncExitStack() as stack:
            nodes = {name: lab.add_node(name) for name in NODES}
            pods = {spec.name: lab.add_pod(nodes[spec.node], spec.name) for spec in PODS}
            objects: list[Mapping[str, Any]] = [
                manifests.namespace(MESH_NAMESPACE, AMBIENT),
                manifests.namespace(OUTSIDE_NAMESPACE),
                *(pod_manifest(spec, pods[spec.name]) for spec in PODS),
            ]
            controller = await start_lab_controller(stack, workdir, config_dir, objects, NODES)

            apps: dict[str, Child] = {}
            for pod_name in ("server", "pserver"):
                apps[pod_name] = await start_app(pods[pod_name], workdir)
                stack.push_async_callback(apps[pod_name].stop)
            for spec in PODS:
                if spec.mesh:
                    enrol(pods[spec.name])
            for name in NODES:
                agent = InpodTestAgent(str(workdir / f"{name}.sock"))
                agent.pods = {
                    spec.uid: AgentPod(
                        spec.uid,
                        WorkloadInfo(spec.name, spec.namespace, spec.service_account),
                        pods[spec.name].netns.path,
                    )
                    for spec in PODS
                    if spec.node == name and spec.mesh
                }
                await agent.start()
                stack.push_async_callback(agent.close)

            ztunnels: dict[str, Child] = {}
            metrics_ports: dict[str, int] = {}
            for name in NODES:
                ztunnels[name], metrics_ports[name] = await start_ztunnel(
                    name, workdir, controller, log_level
                )
                stack.push_async_callback(ztunnels[name].stop)

            stunnels = await start_stunnels(pods, workdir)
            for child in stunnels.values():
                stack.push_async_callback(child.stop)

            bench = BenchLab(lab, workdir, controller, pods, ztunnels, metrics_ports, stunnels, apps)
            await wait_for(
                lambda: echo_once(pods["client"], pods["server"].address, APP_PORT, within=2.0),
                "an echo through the ztunnel pair",
            )
            yield bench
    finally:
        try:
            lab.close()
        finally:
            cleanup_prefix(prefix)
            shutil.rmtree(workdir, ignore_errors=True)
