"""`loomctl demo` (what `make demo` runs): the main job in the lab, with evidence a person can read.

  1. A two-node lab comes up with the Istio Bookinfo sample (`loomctl lab up -f bookinfo.yaml`).
  2. Before enrolment: productpage calls reviews; a packet capture on the reviews pod's veth shows the
     HTTP request in plaintext.
  3. `loomctl label namespace default istio.io/dataplane-mode=ambient`: the node agents capture every
     pod at runtime, without restarting them.
  4. The same call now travels over HBONE: the capture shows no application plaintext, only TLS to port
     15008; the destination ztunnel's metrics show the connection with
     connection_security_policy="mutual_tls" and both SPIFFE principals.
  5. The sample L4 AuthorizationPolicy: productpage may call reviews, ratings may not.
  6. `loomctl waypoint apply --service-account bookinfo-reviews`: the controller deploys a waypoint,
     reviews traffic passes it (its access log), the Istio sample HTTPRoute splits 90/10, and the sample
     L7 policy allows GET from productpage and answers DELETE and other callers 403.
  7. `loomctl label namespace default istio.io/dataplane-mode-`: pods are released; traffic is direct
     (plaintext) again and no longer passes a ztunnel.
  8. `loomctl lab down`: nothing of the lab is left behind.

Every step checks what it shows; the demo exits 0 only if every check held, and always tears the lab
down (unless --keep). `--control-plane` runs the control-plane walk-through without the lab instead
(no root needed; loom/cli/demo_control_plane.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loom.cli import demo_control_plane
from loom.lab.cluster import (
    CallOutcome,
    Cluster,
    LabError,
    PodRecord,
    call_from_netns,
    http_get_in_netns,
    lab_dir_from_env,
)
from loom.lab.network import check_prerequisites, list_namespaces

NAMESPACE = "default"
AMBIENT_LABEL = "istio.io/dataplane-mode"
REVIEWS_URL = "http://reviews:9080/reviews/0"
WAYPOINT = "reviews-waypoint"
CALLS = 5
STEP_TIMEOUT = 30.0  # seconds; every wait in the demo is bounded by it
TRUST_DOMAIN = "cluster.local"


class DemoFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


def register(commands: Any) -> None:
    p = commands.add_parser("demo", help="run the main job in the lab (needs root), with checks")
    p.add_argument(
        "--samples",
        type=Path,
        default=demo_control_plane.default_samples(),
        help="Istio sample YAML directory",
    )
    p.add_argument("--lab-dir", type=Path, default=None, help="lab state directory ($LOOM_LAB_DIR)")
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end (for exploring)")
    p.add_argument(
        "--control-plane", action="store_true", help="only the control-plane walk-through (no lab, no root)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.control_plane:
        return demo_control_plane.run(args)
    missing = preflight(args.samples)
    if missing:
        print("loomctl demo cannot run here:", file=sys.stderr)
        for problem in missing:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    cluster = Cluster(args.lab_dir or lab_dir_from_env())
    started = time.monotonic()
    try:
        Demo(cluster, args.samples).run()
    except (DemoFailed, LabError) as failed:
        print(f"\n✘ demo failed: {failed}", file=sys.stderr)
        print(f"  logs of every lab process: {cluster.lab_dir / 'logs'}", file=sys.stderr)
        if not args.keep:
            teardown(cluster)
        return 1
    except KeyboardInterrupt:
        teardown(cluster)
        return 130
    if not args.keep:
        print("\n8. Tear the lab down (loomctl lab down)")
        teardown(cluster)
        left = list_namespaces(cluster.prefix + "-")
        if left:
            print(f"\n✘ demo failed: namespaces left behind: {', '.join(left)}", file=sys.stderr)
            return 1
        print("  ✔ no namespace, link, rule or process of the lab is left")
    print(f"\n✔ every check held ({time.monotonic() - started:.0f}s)")
    return 0


def preflight(samples: Path) -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append(
            "it needs root (network namespaces, veth, iptables): run it as root, e.g. sudo make demo"
        )
    for tool in ("ip", "iptables-restore", "tcpdump"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is not installed (make demo installs it: iproute2, iptables, tcpdump)")
    if not (samples / "istio" / "bookinfo.yaml").is_file():
        problems.append(f"the Istio samples are not at {samples} (pass --samples DIR)")
    if not problems:  # root and tools present: probe the kernel (netfilter tables, veth, namespaces)
        problems += check_prerequisites()
    return problems


def teardown(cluster: Cluster) -> None:
    try:
        cluster.down(lambda line: None)
    except (LabError, OSError) as e:
        print(f"  ! teardown: {e}", file=sys.stderr)


def check(condition: bool, what: str, seen: str = "") -> None:
    if not condition:
        raise DemoFailed(what + (f" — seen: {seen}" if seen else ""))
    print(f"  ✔ {what}")


def show(text: str, indent: str = "    ") -> None:
    for line in text.rstrip().splitlines():
        print(indent + line)


def eventually(test: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.2)


class Capture:
    """tcpdump on a pod's node-side veth, bounded in packets and time; stopped with SIGINT."""

    def __init__(self, node_netns: str, interface: str) -> None:
        self.interface = interface
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", node_netns, "tcpdump", "-i", interface, "-n", "-l", "-U", "-A",
             "-c", "2000", "-s", "512", "tcp"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        assert self._process.stderr is not None
        os.set_blocking(self._process.stderr.fileno(), False)
        self._stderr = b""
        while b"listening on" not in self._stderr and time.monotonic() < deadline:
            self._stderr += self._process.stderr.read() or b""
            time.sleep(0.05)
        if b"listening on" not in self._stderr:
            self.stop()
            raise DemoFailed(f"tcpdump did not start on {interface}: {self._stderr.decode(errors='replace')}")

    def stop(self) -> str:
        time.sleep(0.3)  # let the last packets of the calls be written
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGINT)
        try:
            out, _ = self._process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            out, _ = self._process.communicate()
        return out.decode("ascii", errors="replace")


class Demo:
    def __init__(self, cluster: Cluster, samples: Path) -> None:
        self.cluster = cluster
        self.samples = samples

    # -- helpers -----------------------------------------------------------------------------------
    def pod(self, app: str) -> PodRecord:
        state = self.cluster.require_state()
        for record in sorted(state.pods.values(), key=lambda r: r.key):
            if record.namespace == NAMESPACE and record.name.startswith(app + "-"):
                return record
        raise DemoFailed(f"no {app} pod in the lab")

    def call(self, source: PodRecord, url: str = REVIEWS_URL, count: int = CALLS) -> CallOutcome:
        return call_from_netns(source.netns, url, count)

    def metrics(self, node: str) -> str:
        state = self.cluster.require_state()
        net = self.cluster.node_net(state, node)
        answer = http_get_in_netns(net.netns, str(net.wire_ip), 15020, "/metrics")
        if answer is None or answer[0] != 200:
            raise DemoFailed(f"{node}'s ztunnel metrics endpoint did not answer")
        return answer[1].decode()

    def loomctl(self, *argv: str) -> None:
        from loom.cli.main import main

        print(f"  $ loomctl {' '.join(argv)}")
        code = main([*argv, "--lab-dir", str(self.cluster.lab_dir)])
        if code != 0:
            raise DemoFailed(f"`loomctl {' '.join(argv)}` exited {code}")

    def access_log_lines(self, *needles: str) -> list[str]:
        """Lines of the nodes' ztunnel logs (the access log goes there) that contain every needle."""
        lines: list[str] = []
        for node in self.cluster.require_state().nodes:
            try:
                text = self.cluster.log_path(f"ztunnel/{node}").read_text(errors="replace")
            except OSError:
                continue
            lines += [line for line in text.splitlines() if all(n in line for n in needles)]
        return lines

    def redirection(self) -> dict[str, str]:
        return {p.name: p.redirection for p in self.cluster.status().pods if p.namespace == NAMESPACE}

    # -- the steps ---------------------------------------------------------------------------------
    def run(self) -> None:
        istio = self.samples / "istio"
        print("1. Bring up a two-node lab with the Istio Bookinfo sample")
        teardown(self.cluster)  # a clean slate, whatever an earlier run left
        print(f"  $ loomctl lab up -f {istio / 'bookinfo.yaml'} --nodes 2")
        self.cluster.up(
            [istio / "bookinfo.yaml"], 2, lambda line: print("   " + line) if "✓" in line else None
        )
        status = self.cluster.status()
        nodes = {p.node for p in status.pods}
        check(
            len(status.pods) == 6 and all(p.running for p in status.pods),
            f"{len(status.pods)} Bookinfo pods running",
        )
        check(nodes == {"node-1", "node-2"}, "pods are spread over both nodes", str(nodes))
        check(
            all(n.ztunnel_ready for n in status.nodes), "a ready loom-ztunnel and loom-cni-agent on each node"
        )
        show("\n".join(f"{p.name:<34} {p.node:<7} {p.ip}" for p in status.pods))

        productpage, ratings = self.pod("productpage-v1"), self.pod("ratings-v1")
        # Any of the three reviews pods may answer the Service: capture on all of them.
        reviews_pods = [
            r for r in self.cluster.require_state().pods.values() if r.name.startswith("reviews-")
        ]

        print("\n2. Before enrolment: productpage -> reviews is plaintext on the wire")
        plain, dump = self.captured_calls(productpage, reviews_pods)
        check(
            plain.ok and len(plain.answers) == CALLS, f"{CALLS} calls to {REVIEWS_URL} answered", plain.output
        )
        check(all(a["pod"].startswith("reviews-") for a in plain.answers), "answered by reviews pods")
        check("GET /reviews/0" in dump, "tcpdump on the reviews veths shows the HTTP request in plaintext")
        show(_excerpt(dump, "GET /reviews/0"))

        print("\n3. Enrol the namespace (no pod restarts)")
        self.loomctl("label", "namespace", NAMESPACE, f"{AMBIENT_LABEL}=ambient", "--overwrite")
        eventually(
            lambda: all(v == "enabled" for v in self.redirection().values()),
            "every pod annotated ambient.istio.io/redirection=enabled",
        )
        check(True, "every Bookinfo pod is captured (ambient.istio.io/redirection=enabled)")
        pids_before = {k: r.process.pid for k, r in self.cluster.require_state().pods.items() if r.process}

        print("\n4. The same call now travels over HBONE with mTLS")
        meshed, dump = self.captured_calls(productpage, reviews_pods)
        check(
            meshed.ok and len(meshed.answers) == CALLS,
            f"{CALLS} calls answered through the mesh",
            meshed.output,
        )
        check("GET /reviews/0" not in dump, "no application plaintext on the reviews veths")
        check(".15008 " in dump or ".15008:" in dump, "the packets go to port 15008 (HBONE)")
        tls = [line for line in dump.splitlines() if ".15008:" in line and "length 0" not in line]
        show("\n".join(tls[:3]))  # packet headers only: the payloads are TLS records
        served = {a["pod"] for a in meshed.answers}
        source_principal = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/bookinfo-productpage"
        lines = []
        for record in reviews_pods:
            lines += [
                line
                for line in self.metrics(record.node).splitlines()
                if line.startswith("istio_tcp_connections_opened_total{")
                and 'reporter="destination"' in line
                and 'connection_security_policy="mutual_tls"' in line
                and f'source_principal="{source_principal}"' in line
                and 'destination_principal="spiffe://cluster.local/ns/default/sa/bookinfo-reviews"' in line
            ]
        check(bool(lines), f"ztunnel metrics: mutual_tls connections from {source_principal}")
        show("\n".join(_metric_summary(line) for line in sorted(set(lines))[:3]))
        pids_after = {k: r.process.pid for k, r in self.cluster.require_state().pods.items() if r.process}
        check(
            pids_before == pids_after and bool(served), "the pods kept running: enrolment restarted nothing"
        )

        print("\n5. L4 AuthorizationPolicy: only productpage may call reviews")
        policy = self.samples / "ambient" / "l4-policy.yaml"
        self.loomctl("apply", "-f", str(policy))
        eventually(lambda: not self.call(ratings, count=1).ok, "ratings -> reviews denied")
        denied = self.call(ratings, count=3)
        check(not denied.ok and not denied.answers, "ratings (sa bookinfo-ratings) -> reviews is denied")
        refusals = self.access_log_lines('direction="inbound"', "policy_denied", "sa/bookinfo-ratings")
        check(bool(refusals), "the reviews side's ztunnel logged the refusal (policy_denied)")
        show(_shorten(refusals[-1]))
        allowed = self.call(productpage)
        check(
            allowed.ok and len(allowed.answers) == CALLS,
            "productpage -> reviews is still allowed",
            allowed.output,
        )
        self.loomctl("delete", "-f", str(policy))

        print("\n6. A waypoint for the reviews service account: L7 routing and authorization")
        self.waypoint_steps(productpage, ratings)

        print("\n7. Unenrol the namespace: traffic is direct again")
        self.loomctl("label", "namespace", NAMESPACE, f"{AMBIENT_LABEL}-")
        eventually(lambda: not any(self.redirection().values()), "every pod released")
        check(True, "every pod released (annotation removed)")
        direct, dump = self.captured_calls(productpage, reviews_pods)
        check(direct.ok and len(direct.answers) == CALLS, f"{CALLS} calls answered directly", direct.output)
        check("GET /reviews/0" in dump and ".15008 " not in dump, "plaintext on the wire again, no HBONE")

    def waypoint_log(self) -> list[str]:
        """The waypoint pod's access log lines (Istio's text format, one per request)."""
        lines: list[str] = []
        for path in sorted((self.cluster.lab_dir / "logs").glob(f"pod_{NAMESPACE}_{WAYPOINT}-*.log")):
            lines += [line for line in path.read_text(errors="replace").splitlines() if line.startswith("[")]
        return lines

    def waypoint_steps(self, productpage: PodRecord, ratings: PodRecord) -> None:
        istio, ambient = self.samples / "istio", self.samples / "ambient"
        self.loomctl(
            "waypoint", "apply", "-n", NAMESPACE, "--service-account", "bookinfo-reviews", "--name", WAYPOINT,
            "--wait", "--waypoint-timeout", f"{STEP_TIMEOUT:g}s",
        )  # fmt: skip
        check(True, "the controller deployed it and reports it Programmed")
        eventually(
            lambda: self.call(productpage, count=1).ok and len(self.waypoint_log()) > 0,
            "reviews traffic passing the waypoint",
        )
        show(self.waypoint_log()[-1])
        check(True, "reviews traffic now passes the waypoint (its access log, Istio's format)")

        self.loomctl(
            "apply",
            "-f",
            str(istio / "bookinfo-versions.yaml"),
            "-f",
            str(istio / "route-reviews-90-10.yaml"),
        )
        eventually(lambda: self.v1_share(productpage, 20) >= 0.7, "the 90/10 route taking effect")
        total = 200
        v1 = round(self.v1_share(productpage, total) * total)
        # 90% of 200 is 180 with a standard deviation of 4.2: [163, 195] is about ±4 sigma.
        check(163 <= v1 <= 195, f"the Istio sample route-reviews-90-10: {v1}/{total} requests to reviews-v1")

        self.loomctl("apply", "-f", str(ambient / "l7-policy.yaml"))
        eventually(lambda: not self.call(ratings, count=1).ok, "the L7 policy taking effect")
        get = self.call(productpage, count=3)
        check(get.ok and len(get.answers) == 3, "GET /reviews/0 from productpage is allowed", get.output)
        delete = subprocess.run(
            ["ip", "netns", "exec", productpage.netns, "curl", "-s", "-m", "5", "-X", "DELETE",
             "-w", " %{http_code}", REVIEWS_URL],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        check(
            delete.stdout.strip() == "RBAC: access denied 403",
            "DELETE from productpage: 403 RBAC: access denied",
            delete.stdout + delete.stderr,
        )
        denied = self.call(ratings, count=1)
        check(
            not denied.ok and "403" in denied.output, "GET from ratings: 403 (not productpage)", denied.output
        )
        # The waypoint writes its access log in batches (every 100 ms): wait for both denials' lines.
        eventually(
            lambda: sum('" 403 ' in line for line in self.waypoint_log()) >= 2, "the denials' log lines"
        )
        show("\n".join(line for line in self.waypoint_log() if '" 403 ' in line)[-600:])
        self.loomctl(
            "delete", "-f", str(ambient / "l7-policy.yaml"), "-f", str(istio / "route-reviews-90-10.yaml")
        )
        self.loomctl("waypoint", "delete", "-n", NAMESPACE, WAYPOINT)

    def v1_share(self, source: PodRecord, count: int) -> float:
        outcome = self.call(source, count=count)
        if not outcome.answers:
            return 0.0
        to_v1 = sum(1 for a in outcome.answers if str(a["pod"]).startswith("reviews-v1-"))
        return to_v1 / count

    def captured_calls(self, source: PodRecord, targets: list[PodRecord]) -> tuple[CallOutcome, str]:
        state = self.cluster.require_state()
        captures = [Capture(self.cluster.node_net(state, t.node).netns, t.host_veth) for t in targets]
        try:
            result = self.call(source)
        finally:
            dump = "".join(c.stop() for c in captures)
        return result, dump


def _metric_summary(line: str) -> str:
    """A metric sample reduced to the labels the demo is about, and its value."""
    keep = ("reporter", "source_principal", "destination_workload", "destination_principal",
            "connection_security_policy")  # fmt: skip
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    shown = ",".join(f'{k}="{labels[k]}"' for k in keep if k in labels)
    return f"{line.split('{', 1)[0]}{{{shown}}} {line.rsplit(' ', 1)[-1]}"


def _shorten(
    line: str, keep: tuple[str, ...] = ("src.identity", "dst.workload", "direction", "error")
) -> str:
    """An access log line reduced to the fields a reader needs (the timestamp and message stay)."""
    words = line.split("\t")
    head = " ".join(words[:4]) if len(words) >= 4 else line
    fields = [f for f in re.findall(r'(\S+?=(?:"[^"]*"|\S+))', line) if f.split("=", 1)[0] in keep]
    return head.split(" src.")[0] + "\n  " + "\n  ".join(fields)


def _excerpt(dump: str, needle: str, lines: int = 3) -> str:
    """The first packet lines around `needle`, printable characters only."""
    text = [re.sub(r"[^\x20-\x7e]", ".", line) for line in dump.splitlines()]
    for index, line in enumerate(text):
        if needle in line:
            return "\n".join(text[max(0, index - 1) : index + lines])
    return "(not in the capture)"
