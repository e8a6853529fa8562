"""The lab cluster: what `loomctl lab up/down/status` and `loomctl apply/delete/label` act on.

Theory of operation
-------------------
The lab plays, on one machine, the parts of Kubernetes that loom depends on; there is no long-running
lab daemon. Each `loomctl` command takes the lab lock, does its work and leaves:

* the **API server** is the object store `LAB_DIR/config` (`loom.lab.store`): one YAML file per object,
  read by the controller (`--config-dir`), the node agents and the lab DNS server, which all watch it;
* the **scheduler + kubelet + container runtime** is `Cluster.reconcile()`: it expands Deployments into
  pods (`loom.resources.loader.expand_deployment`), places each new pod on the node with the fewest
  pods, builds its network namespace and interface (the primary CNI plugin's job, `loom.lab.network`),
  writes the Pod object with its node and IP into the store, then runs the `loom-cni` plugin exactly as a
  runtime would (CNI_* environment, network configuration with prevResult on stdin; error 11 is retried
  as the kubelet does) and only then starts the pod's process (the built-in workload, or the command of
  the annotation `lab.loom.io/command`). Pods no longer wanted are stopped, their CNI DEL is run, their
  namespace and store object are removed;
* **kube-proxy** is `LabNetwork.sync_services`: Service VIPs DNAT'ed in every node's namespace to ready
  backends, for traffic that no ztunnel handles (unenrolled pods);
* **cluster DNS** is `loom.lab.dns` in the controller's namespace; Services without a clusterIP get one
  allocated from 10.96.0.0/16 and written back into the store, as an API server does.

Per node run a `loom-cni-agent` and a `loom-ztunnel` inside the node's namespace; the controller and
the DNS server run in `<prefix>-cp`. Processes are found again through `lab.json` and their lab marker
(`loom.lab.processes`). `down()` stops every marked process, sweeps every namespace, link and rule of
the prefix and removes LAB_DIR: it works from any state, including after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from loom.lab.network import LabNetwork, NodeNet, PodNet, ServiceVip, check_prerequisites
from loom.lab.processes import ProcessRecord, is_running, spawn, stop
from loom.lab.store import LabStore, StoredKey, default_lab_dir, lab_store
from loom.resources.loader import expand_deployment, pod_to_manifest
from loom.resources.model import ConfigSnapshot, Deployment, Pod, PodTemplate, Service

# The name prefix of every namespace of the lab; another prefix (with another LOOM_LAB_DIR) gives an
# independent second lab, which the tests use to never touch a user's lab.
PREFIX_ENV: Final = "LOOM_LAB_PREFIX"
DEFAULT_PREFIX: Final = "loom"
SERVICE_CIDR: Final = ipaddress.ip_network("10.96.0.0/16")
DNS_SERVICE_PORT: Final = 53
CONTROLLER_GRPC_PORT: Final = 15012
CONTROLLER_HTTP_PORT: Final = 15014
ZTUNNEL_READINESS_PORT: Final = 15021
ZTUNNEL_ADMIN_PORT: Final = 15000
AGENT_HTTP_PORT: Final = 15016
DEFAULT_WORKLOAD_PORT: Final = 8080
COMMAND_ANNOTATION: Final = "lab.loom.io/command"
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
# How long a component gets to become ready, and a pod's CNI ADD to succeed (the kubelet retries too).
READY_TIMEOUT: Final = 60.0
CNI_TIMEOUT: Final = 60.0
CNI_RETRY_INTERVAL: Final = 0.2
# A pod command still running after this long counts as started (there is no readiness probe).
COMMAND_GRACE: Final = 0.3

Progress = Callable[[str], None]


class LabError(Exception):
    """The lab cannot do what was asked; the message says what is missing or what failed."""


def lab_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    return default_lab_dir(os.environ if env is None else env)


# ---------------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    netns: str
    container_id: str
    host_veth: str = ""  # the node-side end of the pod's veth (where tcpdump sees its traffic)
    process: ProcessRecord | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "node": self.node,
            "ip": self.ip,
            "netns": self.netns,
            "container_id": self.container_id,
            "host_veth": self.host_veth,
            "process": self.process.to_json() if self.process else None,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PodRecord:
        process = raw.get("process")
        return cls(
            str(raw["namespace"]),
            str(raw["name"]),
            str(raw["uid"]),
            str(raw["node"]),
            str(raw["ip"]),
            str(raw["netns"]),
            str(raw["container_id"]),
            str(raw.get("host_veth", "")),
            ProcessRecord.from_json(process) if process else None,
        )


@dataclass
class LabState:
    """lab.json: what the lab created, so later commands (and `down`) can find it."""

    prefix: str
    lab_id: str
    nodes: list[str] = field(default_factory=list)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    pods: dict[str, PodRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "lab_id": self.lab_id,
            "nodes": self.nodes,
            "processes": {k: v.to_json() for k, v in self.processes.items()},
            "pods": {k: v.to_json() for k, v in self.pods.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LabState:
        return cls(
            prefix=str(raw["prefix"]),
            lab_id=str(raw["lab_id"]),
            nodes=[str(n) for n in raw.get("nodes", [])],
            processes={k: ProcessRecord.from_json(v) for k, v in raw.get("processes", {}).items()},
            pods={k: PodRecord.from_json(v) for k, v in raw.get("pods", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What `loom.lab.workload call` run inside a pod reported."""

    ok: bool  # every attempt succeeded
    answers: list[dict[str, Any]]  # the successful attempts (pod, namespace, status, ...)
    output: str  # everything it printed, for error messages


@dataclass(frozen=True, slots=True)
class PodStatus:
    namespace: str
    name: str
    node: str
    ip: str
    running: bool
    redirection: str  # the node agent's annotation: "enabled", "pending" or "" (not captured)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    wire_ip: str
    pod_cidr: str
    agent_running: bool
    ztunnel_running: bool
    ztunnel_ready: bool


@dataclass(frozen=True, slots=True)
class LabStatus:
    up: bool
    controller_running: bool
    nodes: tuple[NodeStatus, ...]
    pods: tuple[PodStatus, ...]


# ---------------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    def __init__(self, lab_dir: Path | None = None, prefix: str | None = None) -> None:
        self.lab_dir = (lab_dir or lab_dir_from_env()).resolve()
        self.prefix = prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX
        self.network = LabNetwork(self.prefix)
        self.store: LabStore = lab_store(self.lab_dir)

    # -- paths -------------------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.lab_dir / "config"

    @property
    def state_path(self) -> Path:
        return self.lab_dir / "lab.json"

    @property
    def controller_dir(self) -> Path:
        return self.lab_dir / "controller"

    def node_dir(self, node: str) -> Path:
        return self.lab_dir / "nodes" / node

    def log_path(self, name: str) -> Path:
        return self.lab_dir / "logs" / f"{name.replace('/', '_')}.log"

    # -- state -------------------------------------------------------------------------------------
    def load_state(self) -> LabState | None:
        try:
            return LabState.from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(
                f"the lab state {self.state_path} is unreadable ({exc}); run `loomctl lab down`"
            ) from exc

    def save_state(self, state: LabState) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=1))
        os.replace(tmp, self.state_path)

    def require_state(self) -> LabState:
        state = self.load_state()
        if state is None:
            raise LabError(f"no lab is up (no {self.state_path}); run `loomctl lab up` first")
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time (the store has its own finer lock for single writes)."""
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lab_dir / ".lab.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- up ----------------------------------------------------------------------------------------
    def up(self, files: Sequence[Path], nodes: int, progress: Progress) -> list[str]:
        """Bring the lab up (or, when it is up, apply `files` to it); returns the apply report lines."""
        problems = check_prerequisites()
        if problems:
            raise LabError("the lab cannot start here:\n  " + "\n  ".join(problems))
        if not 1 <= nodes <= 50:
            raise LabError(f"--nodes must be between 1 and 50, got {nodes}")
        with self.locked():
            state = self.load_state()
            if state is None:
                # The lab dir names the lab: `down` finds its processes by it even without lab.json.
                state = LabState(prefix=self.prefix, lab_id=str(self.lab_dir))
                state.nodes = [f"node-{i}" for i in range(1, nodes + 1)]
                self.config_dir.mkdir(parents=True, exist_ok=True)
                self.save_state(state)
            elif state.prefix != self.prefix:
                raise LabError(f"a lab with prefix {state.prefix!r} is up in {self.lab_dir}")
            elif nodes != len(state.nodes):
                progress(f"  ! the lab has {len(state.nodes)} nodes; --nodes counts only when it is created")
            self._build_network(state, progress)
            report = self._apply(files, progress) if files else []
            self._start_control_plane(state, progress)
            self._start_nodes(state, progress)
            self.reconcile(state, progress)
            self._start_manager(state, progress)
            return report

    def _build_network(self, state: LabState, progress: Progress) -> None:
        with _step(progress, f"network: bridge, {len(state.nodes)} nodes, controller namespace"):
            self.network.ensure_wire()
            for index, node in enumerate(state.nodes, start=1):
                self.network.ensure_node(node, index)
            self.network.ensure_controller()

    def _apply(self, files: Sequence[Path], progress: Progress) -> list[str]:
        with _step(progress, "configuration: " + ", ".join(str(f) for f in files)):
            report = self.store.apply_paths(list(files))
        return list(report.lines) + [f"Error: {e}" for e in report.errors]

    def node_net(self, state: LabState, node: str) -> NodeNet:
        """The node's addressing (pure: the network itself is built by `up`)."""
        return self.network.node_net(node, state.nodes.index(node) + 1)

    @property
    def controller_ip(self) -> str:
        return str(self.network.controller_ip)

    def _start_control_plane(self, state: LabState, progress: Progress) -> None:
        cp_netns = self.network.controller_netns
        if not self._running(state, "controller"):
            with _step(progress, f"controller in {cp_netns} ({self.controller_ip}:{CONTROLLER_GRPC_PORT})"):
                argv = [
                    sys.executable, "-m", "controller.main",
                    "--config-dir", str(self.config_dir),
                    "--state-dir", str(self.controller_dir),
                    "--grpc-addr", f"0.0.0.0:{CONTROLLER_GRPC_PORT}",
                    "--http-addr", f"0.0.0.0:{CONTROLLER_HTTP_PORT}",
                    "--tls-ip", self.controller_ip,
                    # Waypoint Gateways become Deployments in the store; the lab manager runs their pods.
                    "--deploy-waypoints", "--lab-store", str(self.config_dir),
                ]  # fmt: skip
                self._spawn(state, "controller", argv, cp_netns)
                self._wait_http(
                    cp_netns, self.controller_ip, CONTROLLER_HTTP_PORT, "/ready", "the controller"
                )
        if not self._running(state, "dns"):
            with _step(progress, f"cluster DNS in {cp_netns} ({self.controller_ip}:{DNS_SERVICE_PORT})"):
                argv = [
                    sys.executable, "-m", "loom.lab.dns",
                    "--config-dir", str(self.config_dir),
                    "--listen", f"{self.controller_ip}:{DNS_SERVICE_PORT}",
                ]  # fmt: skip
                self._spawn(state, "dns", argv, cp_netns)
                self._wait_udp_dns(cp_netns)

    def _start_nodes(self, state: LabState, progress: Progress) -> None:
        for node in state.nodes:
            net = self.node_net(state, node)
            node_dir = self.node_dir(node)
            node_dir.mkdir(parents=True, exist_ok=True)
            if not self._running(state, f"agent/{node}"):
                with _step(progress, f"{node}: loom-cni-agent"):
                    argv = [
                        sys.executable, "-m", "cni.agent.main",
                        "--node", node,
                        "--plugin-socket", str(node_dir / "plugin.sock"),
                        "--zds-socket", str(node_dir / "ztunnel.sock"),
                        "--manifests", str(self.config_dir),
                        "--state-file", str(node_dir / "captured.json"),
                        "--annotate-store", str(self.config_dir),
                        "--http-addr", f"{net.wire_ip}:{AGENT_HTTP_PORT}",
                    ]  # fmt: skip
                    self._spawn(state, f"agent/{node}", argv, net.netns)
                    self._wait_http(
                        net.netns, str(net.wire_ip), AGENT_HTTP_PORT, "/readyz", f"{node}'s agent"
                    )
            if not self._running(state, f"ztunnel/{node}"):
                with _step(progress, f"{node}: loom-ztunnel"):
                    token = node_dir / "token"
                    token.write_text(self._node_token(node))
                    token.chmod(0o600)
                    env = {
                        "NODE_NAME": node,
                        "XDS_ADDRESS": f"{self.controller_ip}:{CONTROLLER_GRPC_PORT}",
                        "ROOT_CERT": str(self.controller_dir / "root-cert.pem"),
                        "NODE_TOKEN_FILE": str(token),
                        "INPOD_UDS": str(node_dir / "ztunnel.sock"),
                        "ADMIN_ADDR": f"127.0.0.1:{ZTUNNEL_ADMIN_PORT}",
                        "METRICS_ADDR": "0.0.0.0:15020",
                        "READINESS_ADDR": f"0.0.0.0:{ZTUNNEL_READINESS_PORT}",
                        "CONNECTION_TERMINATION_DEADLINE": "2s",
                    }
                    argv = [sys.executable, "-m", "ztunnel.main"]
                    self._spawn(state, f"ztunnel/{node}", argv, net.netns, env=env)
                    self._wait_http(
                        net.netns,
                        str(net.wire_ip),
                        ZTUNNEL_READINESS_PORT,
                        "/healthz/ready",
                        f"{node}'s ztunnel",
                    )

    def _start_manager(self, state: LabState, progress: Progress) -> None:
        if self._running(state, "manager"):
            return
        with _step(progress, "lab manager (reconciles on every change to the store)"):
            argv = [sys.executable, "-m", "loom.lab.manager", "--lab-dir", str(self.lab_dir),
                    "--prefix", self.prefix]  # fmt: skip
            self._spawn(state, "manager", argv, None)

    def _node_token(self, node: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "controller.main", "node-token", "--node", node,
             "--state-dir", str(self.controller_dir)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise LabError(f"cannot issue {node}'s node credential: {result.stderr.strip()}")
        return result.stdout.strip()

    def _spawn(
        self,
        state: LabState,
        name: str,
        argv: Sequence[str],
        netns: str | None,
        env: Mapping[str, str] | None = None,
    ) -> ProcessRecord:
        record = spawn(name, argv, netns=netns, log_path=self.log_path(name), lab_id=state.lab_id, env=env)
        state.processes[name] = record
        self.save_state(state)
        return record

    def _running(self, state: LabState, name: str) -> bool:
        record = state.processes.get(name)
        return record is not None and is_running(record)

    def _wait_http(self, netns: str, host: str, port: int, path: str, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            status = http_status_in_netns(netns, host, port, path)
            if status == 200:
                return
            last = f"HTTP {status}" if status else "no answer"
            time.sleep(0.1)
        raise LabError(f"{what} did not become ready in {READY_TIMEOUT:g}s ({last} on {host}:{port}{path})")

    def _wait_udp_dns(self, netns: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if dns_answers_in_netns(netns, self.controller_ip, DNS_SERVICE_PORT):
                return
            time.sleep(0.1)
        raise LabError(f"the lab DNS server did not answer in {READY_TIMEOUT:g}s; see {self.log_path('dns')}")

    def sync(self, progress: Progress) -> None:
        """Reconcile after a change to the store; nothing to do when no lab is up."""
        with self.locked():
            state = self.load_state()
            if state is not None:
                self.reconcile(state, progress)

    # -- reconcile ---------------------------------------------------------------------------------
    def reconcile(self, state: LabState, progress: Progress) -> None:
        """Make the pods and Service VIPs match the store (see the module docstring)."""
        self._allocate_cluster_ips()
        snapshot = self.store.snapshot()
        wanted = desired_pods(snapshot)
        leaving = sorted(set(state.pods) - set(wanted))
        if leaving:
            # As Kubernetes does: endpoints first (the Pod object leaves the store, so the controller
            # withdraws the workload, and the VIPs drop it), then the pod itself.
            for key in leaving:
                record = state.pods[key]
                self.store.remove(StoredKey("Pod", record.namespace, record.name))
            self._sync_services(state, excluding=set(leaving))
        for key in leaving:
            with _step(progress, f"pod {key}: deleting"):
                self._delete_pod(state, state.pods[key])
        for pod in snapshot.of_kind(Pod):  # written for a Deployment by a lab run that crashed
            key = f"{pod.namespace}/{pod.meta.name}"
            if pod.owner_deployment and key not in wanted and key not in state.pods:
                self.store.remove(StoredKey("Pod", pod.namespace, pod.meta.name))
        for key in sorted(set(wanted) - set(state.pods)):
            pod = wanted[key]
            node = pod.spec.node_name if pod.spec.node_name in state.nodes else self._schedule(state)
            with _step(progress, f"pod {key}: on {node}"):
                self._create_pod(state, pod, node)
        for key, record in sorted(state.pods.items()):
            if record.process is not None and not is_running(record.process):
                # As a kubelet would: the pod is not ready while its container is down (a waypoint's
                # Gateway then reports not Programmed), and the process is restarted.
                self._set_ready(record, False)
                try:
                    with _step(progress, f"pod {key}: restarting its process"):
                        self._start_pod_process(state, record, wanted.get(key))
                except (LabError, OSError) as exc:
                    progress(f"  ✗ pod {key}: {exc}")
                    continue
                process = state.pods[key].process
                if process is not None and is_running(process):
                    self._set_ready(record, True)
        self._sync_services(state)

    def _set_ready(self, record: PodRecord, ready: bool) -> None:
        """Write the pod's Ready condition (and phase) into the store when it differs."""
        manifest = self.store.get(StoredKey("Pod", record.namespace, record.name))
        if manifest is None:
            return
        conditions = (manifest.get("status") or {}).get("conditions") or []
        wanted = "True" if ready else "False"
        if any(c.get("type") == "Ready" and c.get("status") == wanted for c in conditions):
            return

        def mutate(pod: dict[str, Any]) -> None:
            status = pod.setdefault("status", {})
            others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
            status["conditions"] = [*others, {"type": "Ready", "status": wanted}]

        self.store.update(StoredKey("Pod", record.namespace, record.name), mutate)

    def _allocate_cluster_ips(self) -> None:
        snapshot = self.store.snapshot()
        services = snapshot.of_kind(Service)
        used = {ip for s in services for ip in s.cluster_ips}
        pool = (str(ip) for ip in SERVICE_CIDR.hosts() if str(ip) not in used and ip.packed[-1] not in (0, 1))
        for service in services:
            if service.cluster_ips or service.headless:
                continue
            address = next(pool)

            def allocate(manifest: dict[str, Any], address: str = address) -> None:
                spec = manifest.setdefault("spec", {})
                if not spec.get("clusterIP"):  # under the store's lock: nobody set one meanwhile
                    spec["clusterIP"] = address
                    spec["clusterIPs"] = [address]

            self.store.update(StoredKey("Service", service.namespace, service.meta.name), allocate)

    def _schedule(self, state: LabState) -> str:
        load = {node: 0 for node in state.nodes}
        for record in state.pods.values():
            if record.node in load:
                load[record.node] += 1
        return min(state.nodes, key=lambda n: (load[n], state.nodes.index(n)))

    def _pick_ip(self, state: LabState, net: NodeNet) -> str:
        used = {r.ip for r in state.pods.values() if r.node == net.name}
        for host in net.pod_cidr.hosts():
            if host != net.gateway and str(host) not in used:
                return str(host)
        raise LabError(f"node {net.name} has no free pod address in {net.pod_cidr}")

    def pod_netns_name(self, namespace: str, name: str) -> str:
        digest = uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}").hex[:6]
        return f"{self.prefix}-{namespace}-{name}"[:48].rstrip("-") + f"-{digest}"

    def _create_pod(self, state: LabState, pod: Pod, node: str) -> None:
        net = self.node_net(state, node)
        ip = self._pick_ip(state, net)
        record = PodRecord(
            namespace=pod.namespace,
            name=pod.meta.name,
            uid=str(uuid.uuid4()),
            node=node,
            ip=ip,
            netns=self.pod_netns_name(pod.namespace, pod.meta.name),
            container_id=uuid.uuid4().hex,
        )
        # Recorded before anything is built, so a failure half-way is cleaned up by the next
        # reconcile or by `down`.
        state.pods[record.key] = record
        self.save_state(state)
        pod_net = self.network.add_pod_netns(net, record.netns, ipaddress.ip_address(ip))
        record = replace(record, host_veth=pod_net.host_veth)
        state.pods[record.key] = record
        self.save_state(state)
        self.network.write_resolv_conf(record.netns, self.network.controller_ip, pod.namespace)
        scheduled = replace(
            pod,
            meta=replace(pod.meta, uid=record.uid),
            spec=replace(pod.spec, node_name=node),
            ips=(ip,),
            phase="Running",
            ready=True,
        )
        self.store.put(pod_to_manifest(scheduled))
        prev_result = self.network.pod_interface(net, record.netns, ipaddress.ip_address(ip))
        self._cni(state, "ADD", record, pod_net, prev_result)
        self._start_pod_process(state, record, pod)

    def _start_pod_process(self, state: LabState, record: PodRecord, pod: Pod | None) -> None:
        command = (pod.meta.annotations.get(COMMAND_ANNOTATION, "") if pod else "").strip()
        if command:
            argv = ["/bin/sh", "-c", command]
        else:
            ports = sorted({p.container_port for c in (pod.spec.containers if pod else ()) for p in c.ports})
            argv = [sys.executable, "-m", "loom.lab.workload", "serve", "--pod", record.name,
                    "--namespace", record.namespace]  # fmt: skip
            for port in ports or [DEFAULT_WORKLOAD_PORT]:
                argv += ["--port", str(port)]
        process = spawn(
            f"pod/{record.key}", argv, netns=record.netns, log_path=self.log_path(f"pod/{record.key}"),
            lab_id=state.lab_id, env={"POD_NAME": record.name, "POD_NAMESPACE": record.namespace},
        )  # fmt: skip
        state.pods[record.key] = replace(record, process=process)
        self.save_state(state)
        if command:  # a command that fails at once is not ready (the next pass restarts it)
            time.sleep(COMMAND_GRACE)
            if not is_running(process):
                self._set_ready(record, False)
        else:  # readiness: a Service gets the pod as a backend only once it listens
            deadline = time.monotonic() + READY_TIMEOUT
            for port in ports or [DEFAULT_WORKLOAD_PORT]:
                while not tcp_listening_in_netns(record.netns, "127.0.0.1", port):
                    if time.monotonic() > deadline or not is_running(process):
                        log = self.log_path(f"pod/{record.key}")
                        raise LabError(f"pod {record.key} is not listening on port {port}; see {log}")
                    time.sleep(0.05)

    def _cni(
        self,
        state: LabState,
        command: str,
        record: PodRecord,
        pod_net: PodNet | None,
        prev: Mapping[str, Any] | None,
    ) -> None:
        node_dir = self.node_dir(record.node)
        config: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "loom-lab",
            "type": "loom-cni",
            "agentSocket": str(node_dir / "plugin.sock"),
            "agentTimeoutSeconds": 10,
            "logFile": str(self.log_path(f"cni/{record.node}")),
        }
        if prev is not None:
            config["prevResult"] = dict(prev)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": record.container_id,
            "CNI_NETNS": pod_net.netns_path if pod_net else f"/var/run/netns/{record.netns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(Path(sys.executable).parent),
            "CNI_ARGS": f"K8S_POD_NAMESPACE={record.namespace};K8S_POD_NAME={record.name};"
            f"K8S_POD_UID={record.uid}",
        }
        self.log_path(f"cni/{record.node}").parent.mkdir(parents=True, exist_ok=True)
        # As a runtime does: the binary named by the config's "type", found in CNI_PATH.
        binary = Path(env["CNI_PATH"]) / "loom-cni"
        plugin = [str(binary)] if binary.exists() else [sys.executable, "-m", "cni.plugin_main"]
        deadline = time.monotonic() + CNI_TIMEOUT
        while True:
            result = subprocess.run(
                plugin,
                input=json.dumps(config),
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode == 0 or command == "DEL":
                return
            try:
                error = json.loads(result.stdout)
            except ValueError:
                error = {"code": 999, "msg": result.stdout.strip() or result.stderr.strip()}
            # Error 11 "try again later" (agent busy or not ready, pod not yet known to it): retry as
            # the kubelet does, within a bound.
            if error.get("code") != 11 or time.monotonic() > deadline:
                raise LabError(
                    f"CNI {command} for pod {record.key} failed: code {error.get('code')}: {error.get('msg')}"
                    + (f" ({error['details']})" if error.get("details") else "")
                )
            time.sleep(CNI_RETRY_INTERVAL)

    def _delete_pod(self, state: LabState, record: PodRecord) -> None:
        if record.process is not None:
            stop([record.process])
        pod_net = PodNet(
            record.netns, record.node, ipaddress.ip_address(record.ip), "", f"/var/run/netns/{record.netns}"
        )
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._cni(state, "DEL", record, pod_net, None)
        self.network.delete_pod_netns(pod_net)
        self.store.remove(StoredKey("Pod", record.namespace, record.name))  # if `reconcile` did not yet
        del state.pods[record.key]
        self.save_state(state)

    def _sync_services(self, state: LabState, excluding: Set[str] = frozenset()) -> None:
        snapshot = self.store.snapshot()
        vips = service_vips(snapshot, state, excluding)
        for node in state.nodes:
            self.network.sync_services(self.node_net(state, node), vips)

    # -- down / status -----------------------------------------------------------------------------
    def down(self, progress: Progress) -> list[str]:
        """Remove everything the lab created; safe to run any number of times, from any state."""
        with self.locked():
            try:
                state = self.load_state()
            except LabError:
                state = None
            records = list(state.processes.values()) if state else []
            records += [p.process for p in (state.pods.values() if state else ()) if p.process]
            with _step(progress, "stopping the lab's processes"):
                stop(records, lab_id=str(self.lab_dir))
            with _step(progress, "removing namespaces, links and rules"):
                removed = self.network.sweep()
        with _step(progress, f"removing {self.lab_dir}"):
            shutil.rmtree(self.lab_dir, ignore_errors=True)
        return removed

    def status(self) -> LabStatus:
        state = self.load_state()
        if state is None:
            return LabStatus(False, False, (), ())
        nodes: list[NodeStatus] = []
        for node in state.nodes:
            net = self.node_net(state, node)
            ready = (
                http_status_in_netns(net.netns, str(net.wire_ip), ZTUNNEL_READINESS_PORT, "/healthz/ready")
                == 200
            )
            nodes.append(
                NodeStatus(
                    node,
                    str(net.wire_ip),
                    str(net.pod_cidr),
                    self._running(state, f"agent/{node}"),
                    self._running(state, f"ztunnel/{node}"),
                    ready,
                )
            )
        pods: list[PodStatus] = []
        for _key, record in sorted(state.pods.items()):
            manifest = self.store.get(StoredKey("Pod", record.namespace, record.name)) or {}
            annotations = (manifest.get("metadata") or {}).get("annotations") or {}
            pods.append(
                PodStatus(
                    record.namespace,
                    record.name,
                    record.node,
                    record.ip,
                    record.process is not None and is_running(record.process),
                    str(annotations.get(REDIRECTION_ANNOTATION, "")),
                )
            )
        return LabStatus(True, self._running(state, "controller"), tuple(nodes), tuple(pods))

    def enter_node_netns(self, node: str) -> str:
        """Move the calling thread into `node`'s namespace; returns its ztunnel's admin address there."""
        from ztunnel.inpod.netns import setns

        netns = self.netns_of(f"node/{node}")
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd)
        except OSError as e:
            raise LabError(f"cannot enter {node}'s network namespace {netns}: {e}") from e
        finally:
            os.close(fd)
        return f"127.0.0.1:{ZTUNNEL_ADMIN_PORT}"

    def netns_of(self, target: str, namespace: str = "default") -> str:
        """The network namespace of `POD`, `NS/POD`, `deploy/NAME` (first pod) or `node/NODE`."""
        state = self.require_state()
        kind, _, name = target.rpartition("/") if target.count("/") == 1 else ("", "", target)
        if kind == "node":
            if name not in state.nodes:
                raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(state.nodes)})")
            return self.node_net(state, name).netns
        if kind in ("cp", "controller"):
            return self.network.controller_netns
        if kind in ("deploy", "deployment"):
            for record in sorted(state.pods.values(), key=lambda r: r.key):
                manifest = self.store.get(StoredKey("Pod", record.namespace, record.name)) or {}
                owners = (manifest.get("metadata") or {}).get("ownerReferences") or []
                if record.namespace == namespace and any(
                    str(o.get("name", "")).rsplit("-", 1)[0] == name for o in owners
                ):
                    return record.netns
            raise LabError(f"no pod of deployment {namespace}/{name} in the lab")
        pod_ns, pod_name = (kind, name) if kind else (namespace, name)
        found = state.pods.get(f"{pod_ns}/{pod_name}")
        if found is None:
            matches = [
                r for r in state.pods.values() if r.namespace == pod_ns and r.name.startswith(pod_name)
            ]
            if len(matches) == 1:
                return matches[0].netns
            raise LabError(
                f"no pod {pod_ns}/{pod_name} in the lab"
                + (f" ({len(matches)} pods start with that name)" if matches else "")
            )
        return found.netns


def desired_pods(snapshot: ConfigSnapshot) -> dict[str, Pod]:
    """The pods the store asks for: every Deployment's replicas plus Pods written by hand (pods the lab
    wrote for a Deployment are not 'by hand': they carry the Deployment as owner)."""
    wanted: dict[str, Pod] = {}
    for deployment in snapshot.of_kind(Deployment):
        for pod in expand_deployment(deployment):
            wanted[f"{pod.namespace}/{pod.meta.name}"] = pod
    for pod in snapshot.of_kind(Pod):
        if not pod.owner_deployment:
            wanted[f"{pod.namespace}/{pod.meta.name}"] = pod
    return wanted


def service_vips(
    snapshot: ConfigSnapshot, state: LabState, excluding: Set[str] = frozenset()
) -> list[ServiceVip]:
    """kube-proxy's view: each ClusterIP:port of a Service -> the running pods it selects (but those in
    `excluding`, which are going away), at their target port (a number, or a named container port
    looked up per pod)."""
    pods = [
        p
        for p in snapshot.of_kind(Pod)
        if (key := f"{p.namespace}/{p.meta.name}") in state.pods and key not in excluding and p.ips
    ]
    vips: list[ServiceVip] = []
    for service in snapshot.of_kind(Service):
        if not service.cluster_ips or service.headless:
            continue
        selected = [
            p
            for p in pods
            if service.selector is not None
            and p.namespace == service.namespace
            and all(p.meta.labels.get(k) == v for k, v in service.selector.items())
            and p.phase == "Running"
        ]
        for port in service.ports:
            if port.protocol.upper() != "TCP":
                continue
            backends: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
            for pod in selected:
                target = _target_port(port.target_port, port.port, pod.spec)
                if target:
                    backends.append((ipaddress.ip_address(pod.ips[0]), target))
            for cluster_ip in service.cluster_ips:
                vips.append(
                    ServiceVip(ipaddress.ip_address(cluster_ip), port.port, "tcp", tuple(sorted(backends)))
                )
    return vips


def call_from_netns(netns: str, url: str, count: int = 1, timeout: float = 3.0) -> CallOutcome:
    """Run the built-in client inside `netns` (as `loomctl lab exec POD -- ... call` would)."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "loom.lab.workload", "call", url,
            "--count", str(count), "--timeout", f"{timeout:g}"]  # fmt: skip
    limit = 10 + count * (timeout + 1)  # bounded whatever the client does
    result = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    answers: list[dict[str, Any]] = []
    for line in result.stdout.splitlines():
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and answer.get("ok"):
            answers.append(answer)
    return CallOutcome(result.returncode == 0, answers, (result.stdout + result.stderr).strip())


def _target_port(target: int | str, port: int, spec: PodTemplate) -> int:
    if isinstance(target, int):
        return target or port
    if not target:
        return port
    if target.isdigit():
        return int(target)
    for container in spec.containers:
        for container_port in container.ports:
            if container_port.name == target:
                return container_port.container_port
    return 0  # a named port this pod does not have: not a backend (as kube-proxy)


# ---------------------------------------------------------------------------------------------------
# Probing inside a namespace (the root namespace has no route into the lab, by design)


def _socket_in_netns(netns: str, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    from ztunnel.inpod.netns import default_switcher

    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return default_switcher().call(fd, lambda: socket.socket(family, kind), timeout=5.0)
    finally:
        os.close(fd)


MAX_PROBE_BODY: Final = 16 * 1024 * 1024


def http_get_in_netns(
    netns: str, host: str, port: int, path: str, timeout: float = 2.0
) -> tuple[int, bytes] | None:
    """GET http://host:port/path from inside `netns`: (status, body), None when nothing answers."""
    import h11

    try:
        sock = _socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    connection = h11.Connection(h11.CLIENT)
    status = 0
    body = bytearray()
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            request = h11.Request(
                method="GET", target=path, headers=[("Host", host), ("Connection", "close")]
            )
            sock.sendall(connection.send(request) + connection.send(h11.EndOfMessage()))
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_PROBE_BODY:
                        return None
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except (OSError, h11.ProtocolError):
            return None
    return (status, bytes(body)) if status else None


def http_status_in_netns(netns: str, host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    answer = http_get_in_netns(netns, host, port, path, timeout)
    return answer[0] if answer else None


def tcp_listening_in_netns(netns: str, host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        sock = _socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return False
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError:
            return False
    return True


def dns_answers_in_netns(netns: str, server: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a DNS server answers a query for the cluster's own domain from inside `netns`."""
    import dns.message
    import dns.query

    try:
        sock = _socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return False
    with sock:
        sock.setblocking(False)  # dnspython waits with its own timeout on a non-blocking socket only
        query = dns.message.make_query("kubernetes.default.svc.cluster.local", "A")
        try:
            dns.query.udp(query, server, port=port, timeout=timeout, sock=sock)
        except (OSError, dns.exception.DNSException):
            return False
    return True


@contextlib.contextmanager
def _step(progress: Progress, what: str) -> Iterator[None]:
    started = time.monotonic()
    progress(f"  … {what}")
    yield
    progress(f"  ✓ {what} ({time.monotonic() - started:.1f}s)")
