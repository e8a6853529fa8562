"""Control-plane scale benchmark: a loom-controller serving a large mesh to many node proxies.

    python -m bench.controller_scale [--workloads 10000 --services 1000 --policies 500 --subscribers 100]

What it measures (issue targets in brackets):
  * full snapshot: from a fresh node proxy opening its stream to holding every resource   [<= 1 s]
  * change propagation: one pod edited in the config directory -> every one of N connected
    subscribers holds the new version; p50/p99 over all (change, subscriber) pairs, end to end
    from the file write (includes the file watch), plus the controller's own publish->written
    histogram from /metrics                                                                   [p99 <= 100 ms]
  * controller RSS, empty and loaded, and bytes per workload (RSS growth / workloads, and the
    serialized size of a Workload resource on the wire)                                        [<= 5 KB]

The controller runs as its own process (so its RSS is its own) on loopback; the subscribers are
grpc.aio streams in this process. Nothing leaves 127.0.0.1. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import struct_pb2

from controller.auth import LabNodeAuthenticator
from loom.api import discovery_pb2

ADDRESS = "type.googleapis.com/istio.workload.Address"
AUTHZ = "type.googleapis.com/istio.security.Authorization"
XDS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
NAMESPACES = 20
SERVICE_ACCOUNTS = 50
PODS_PER_FILE = 100
WAIT = 120.0


# ------------------------------------------------------------------------------------------------
# The synthetic mesh


def pod_manifest(i: int, nodes: int, services: int, revision: str = "v1") -> dict[str, Any]:
    ns = f"ns-{i % NAMESPACES}"
    app = f"svc-{i % services}"
    ip = ipaddress.ip_address("10.128.0.0") + i + 1
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{i}",
            "namespace": ns,
            "uid": f"uid-{i}",
            "labels": {"app": app, "version": revision},
        },
        "spec": {
            "serviceAccountName": f"sa-{i % SERVICE_ACCOUNTS}",
            "nodeName": f"node-{i % nodes}",
            "containers": [
                {"name": "app", "image": "app", "ports": [{"containerPort": 8080, "name": "http"}]}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": str(ip),
            "podIPs": [{"ip": str(ip)}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def service_manifest(i: int) -> dict[str, Any]:
    # Service i selects app=svc-i; pods with that label live in namespace i % NAMESPACES when
    # services < pods, matching pod_manifest's placement for i < services.
    ip = ipaddress.ip_address("10.96.0.0") + i + 1
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % NAMESPACES}"},
        "spec": {
            "clusterIP": str(ip),
            "selector": {"app": f"svc-{i}"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def policy_manifest(i: int, services: int) -> dict[str, Any]:
    ns = f"ns-{i % NAMESPACES}"
    if i % 5 == 0:  # namespace-wide DENY from a namespace
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"deny-{i}", "namespace": ns},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": [f"legacy-{i}"]}}]}]},
        }
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"allow-{i}", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": f"svc-{i % services}"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [
                        {"source": {"principals": [f"cluster.local/ns/{ns}/sa/sa-{i % SERVICE_ACCOUNTS}"]}}
                    ],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }
            ],
        },
    }


def pods_file(directory: Path, index: int) -> Path:
    return directory / "pods" / f"pods-{index // PODS_PER_FILE:04d}.yaml"


def render_pod_file(first: int, args: argparse.Namespace, revisions: dict[int, str]) -> str:
    last = min(first + PODS_PER_FILE, args.workloads)
    docs = [pod_manifest(i, args.nodes, args.services, revisions.get(i, "v1")) for i in range(first, last)]
    return yaml.safe_dump_all(docs, sort_keys=False)


def write_pod_file(directory: Path, first: int, text: str) -> None:
    path = pods_file(directory, first)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)  # atomic, as editors and config-map updates do


def write_mesh(directory: Path, args: argparse.Namespace) -> None:
    (directory / "pods").mkdir(parents=True)
    namespaces = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": f"ns-{n}", "labels": {"istio.io/dataplane-mode": "ambient"}},
        }
        for n in range(NAMESPACES)
    ]
    (directory / "namespaces.yaml").write_text(yaml.safe_dump_all(namespaces))
    services = [service_manifest(i) for i in range(args.services)]
    (directory / "services.yaml").write_text(yaml.safe_dump_all(services))
    policies = [policy_manifest(i, args.services) for i in range(args.policies)]
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(policies))
    for first in range(0, args.workloads, PODS_PER_FILE):
        write_pod_file(directory, first, render_pod_file(first, args, {}))


# ------------------------------------------------------------------------------------------------
# The controller process


@dataclass
class Controller:
    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    state_dir: Path
    root_pem: bytes = b""

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def controller(config_dir: Path, state_dir: Path) -> Iterator[Controller]:
    grpc_port, http_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "controller.main",
        "--config-dir",
        str(config_dir),
        "--state-dir",
        str(state_dir),
        "--grpc-addr",
        f"127.0.0.1:{grpc_port}",
        "--http-addr",
        f"127.0.0.1:{http_port}",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    ctl = Controller(proc, grpc_port, http_port, state_dir)
    try:
        yield ctl
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def wait_ready(ctl: Controller) -> float:
    start = time.monotonic()
    while time.monotonic() - start < WAIT:
        if ctl.process.poll() is not None:
            raise RuntimeError(f"controller exited with {ctl.process.returncode}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            status, _ = await http_get(ctl.http_port, "/ready")
            if status == 200:
                ctl.root_pem = (ctl.state_dir / "root-cert.pem").read_bytes()
                return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise TimeoutError("controller not ready")


# ------------------------------------------------------------------------------------------------
# Subscribers


@dataclass
class Subscriber:
    node: str
    held: dict[str, dict[str, str]] = field(default_factory=lambda: {ADDRESS: {}, AUTHZ: {}})
    arrivals: dict[tuple[str, str], float] = field(default_factory=dict)  # (name, version) -> time
    bytes_received: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def node_message(node: str) -> discovery_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"NODE_NAME": node})
    return discovery_pb2.Node(
        id=f"ztunnel~127.0.0.1~ztunnel-{node}.istio-system~istio-system.svc.cluster.local", metadata=metadata
    )


async def subscribe(ctl: Controller, token: str, sub: Subscriber, stop: asyncio.Event) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=ctl.root_pem)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{ctl.grpc_port}", creds, options=options) as channel:
        call = channel.stream_stream(
            XDS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )(metadata=(("authorization", f"Bearer {token}"),))
        first = True
        for type_url in (AUTHZ, ADDRESS):
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
            if first:
                req.node.CopyFrom(node_message(sub.node))
                first = False
            await call.write(req)
        reader = asyncio.ensure_future(call.read())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    break
                response = reader.result()
                if response is grpc.aio.EOF:
                    break
                now = time.monotonic()
                sub.bytes_received += response.ByteSize()
                held = sub.held[response.type_url]
                for name in response.removed_resources:
                    held.pop(name, None)
                for resource in response.resources:
                    held[resource.name] = resource.version
                    sub.arrivals[(resource.name, resource.version)] = now
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=response.type_url, response_nonce=response.nonce
                    )
                )
                sub.changed.set()
                reader = asyncio.ensure_future(call.read())
        finally:
            reader.cancel()
            stopper.cancel()
            call.cancel()


async def wait_until(predicate: Any, subs: list[Subscriber], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("condition not reached")
        events = [asyncio.ensure_future(s.changed.wait()) for s in subs]
        await asyncio.wait(events, timeout=min(remaining, 0.5), return_when=asyncio.FIRST_COMPLETED)
        for e in events:
            e.cancel()
        for s in subs:
            s.changed.clear()


def workload_name(i: int) -> str:
    return f"Kubernetes//Pod/ns-{i % NAMESPACES}/pod-{i}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def histogram_quantile(text: str, name: str, q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile q of a Prometheus histogram."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    for bound, count in sorted(buckets):
        if count >= q * total:
            return bound * 1000
    return float("inf")


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as tmp:
        base = Path(tmp)
        # Empty controller first: the baseline RSS.
        (base / "empty").mkdir()
        with controller(base / "empty", base / "state-empty") as ctl:
            await wait_ready(ctl)
            await asyncio.sleep(0.5)
            results["rss_empty_mib"] = ctl.rss_kib() / 1024

        config = base / "config"
        write_mesh(config, args)
        state = base / "state"
        with controller(config, state) as ctl:
            results["startup_to_ready_s"] = await wait_ready(ctl)
            authenticator = LabNodeAuthenticator.load_or_create(state)
            expected_addresses = args.workloads + args.services

            # Full snapshot to a fresh subscriber, three times.
            snapshot_times = []
            for attempt in range(3):
                stop = asyncio.Event()
                sub = Subscriber(node=f"node-{attempt}")
                start = time.monotonic()
                task = asyncio.create_task(
                    subscribe(ctl, authenticator.issue_node_token(sub.node), sub, stop)
                )
                await wait_until(lambda s=sub: len(s.held[ADDRESS]) >= expected_addresses, [sub], WAIT)
                snapshot_times.append(time.monotonic() - start)
                results["snapshot_bytes"] = sub.bytes_received
                stop.set()
                await task
            results["full_snapshot_s"] = snapshot_times
            results["rss_loaded_mib"] = ctl.rss_kib() / 1024

            # N connected subscribers, then pod changes one at a time.
            stop = asyncio.Event()
            subs = [Subscriber(node=f"node-{i % args.nodes}") for i in range(args.subscribers)]
            tasks = [
                asyncio.create_task(subscribe(ctl, authenticator.issue_node_token(s.node), s, stop))
                for s in subs
            ]
            await wait_until(
                lambda: all(len(s.held[ADDRESS]) >= expected_addresses for s in subs), subs, WAIT
            )
            results["rss_with_subscribers_mib"] = ctl.rss_kib() / 1024

            delays: list[float] = []
            first_delays: list[float] = []
            revisions: dict[int, str] = {}
            for change in range(args.changes):
                pod = (change * 7919) % args.workloads
                revisions[pod] = f"r{change}"
                name = workload_name(pod)
                before = {s.held[ADDRESS].get(name) for s in subs}
                first = pod - pod % PODS_PER_FILE
                text = render_pod_file(
                    first, args, revisions
                )  # before the clock starts: not the controller's work
                start = time.monotonic()
                write_pod_file(config, first, text)
                await wait_until(
                    lambda n=name, b=before: all(s.held[ADDRESS].get(n) not in b for s in subs), subs, 30
                )
                these = [s.arrivals[(name, s.held[ADDRESS][name])] - start for s in subs]
                delays.extend(these)
                first_delays.append(min(these))
                await asyncio.sleep(0.05)  # let the debounce window close: changes measured one at a time
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            results["change_p50_ms"] = percentile(delays, 0.50) * 1000
            results["change_p99_ms"] = percentile(delays, 0.99) * 1000
            results["change_max_ms"] = max(delays) * 1000
            results["first_p50_ms"] = percentile(first_delays, 0.50) * 1000
            results["first_p99_ms"] = percentile(first_delays, 0.99) * 1000
            _, metrics = await http_get(ctl.http_port, "/metrics")
            count = metric_value(metrics, "loom_xds_push_latency_seconds_count")
            total = metric_value(metrics, "loom_xds_push_latency_seconds_sum")
            results["controller_push_mean_ms"] = total / count * 1000 if count else float("nan")
            results["controller_push_p99_ms"] = histogram_quantile(
                metrics, "loom_xds_push_latency_seconds", 0.99
            )
            results["rss_per_workload_bytes"] = (
                (results["rss_loaded_mib"] - results["rss_empty_mib"]) * 1024 * 1024 / args.workloads
            )
            results["wire_bytes_per_address"] = results["snapshot_bytes"] / expected_addresses
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--changes", type=int, default=30)
    args = parser.parse_args()
    if args.services > args.workloads:
        parser.error("--services must not exceed --workloads")
    results = asyncio.run(run(args))
    print(
        f"loom controller scale: {args.workloads} workloads, {args.services} services, "
        f"{args.policies} policies, {args.subscribers} subscribers, {args.changes} changes"
    )
    snap = results["full_snapshot_s"]
    print(f"  startup to ready             {results['startup_to_ready_s']:.2f} s")
    print(
        f"  full snapshot (3 runs)       median {statistics.median(snap):.3f} s  "
        f"[{', '.join(f'{t:.3f}' for t in snap)}]   target <= 1 s"
    )
    print(
        f"  pod change -> all subs       p50 {results['change_p50_ms']:.1f} ms  "
        f"p99 {results['change_p99_ms']:.1f} ms  max {results['change_max_ms']:.1f} ms   target p99 <= 100 ms"
    )
    print(
        f"  pod change -> first sub      p50 {results['first_p50_ms']:.1f} ms  "
        f"p99 {results['first_p99_ms']:.1f} ms"
        "   (pipeline: file watch, parse, translate, push)"
    )
    print(
        f"  controller publish->written  mean {results['controller_push_mean_ms']:.1f} ms  "
        f"p99 <= {results['controller_push_p99_ms']:.0f} ms (histogram bucket)"
    )
    print(
        f"  RSS empty / loaded / +subs   {results['rss_empty_mib']:.0f} / {results['rss_loaded_mib']:.0f} / "
        f"{results['rss_with_subscribers_mib']:.0f} MiB"
    )
    print(f"  memory per workload          {results['rss_per_workload_bytes']:.0f} B   target <= 5 KB")
    print(f"  wire bytes per address       {results['wire_bytes_per_address']:.0f} B")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
