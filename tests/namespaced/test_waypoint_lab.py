"""Waypoints in the lab, end to end, as a user drives them (issue 5, "Tests (lab, root, in CI)").

One lab (own state directory under /tmp and its own namespace prefix, so a user's lab is never
touched) runs Bookinfo in an ambient `default` namespace for the whole module. Every request is made
from inside a pod's network namespace with the lab's own clients (`python -m loom.lab.workload call`,
curl, a raw socket), so it is captured by that pod's ztunnel exactly as application traffic is.

The tests run in file order and build on the lab state; each removes what it added (routes,
policies, workloads) and waits until the waypoint has dropped it, so the next one starts clean:

 1. `waypoint apply` for the account bookinfo-reviews -> Programmed; reviews traffic passes it
    (metrics with reporter="waypoint", one access log line per request). Keeps the waypoint.
 2. Istio's bookinfo-versions.yaml + route-reviews-90-10.yaml: 1,000 requests split 90/10. Keeps the
    per-version Services (test 3 routes to them), removes the route.
 3. Header-based routing with an HTTPRoute of our own (end-user: jason -> v3, else v1).
 4. Retries: one reviews pod stopped (SIGSTOP: its connections hang), a route with a per-try timeout
    and retries; every request succeeds. The pod is continued in `finally`.
 5. L7 authorization: the sample l7-policy.yaml (403 `RBAC: access denied` for another caller and
    for DELETE) plus a DENY of our own by method and path that wins over the ALLOW.
 6. Path normalization: a DENY on /admin/* and the usual bypass spellings, all 403 or 400, none of
    them reaching a backend.
 7. gRPC: a Deployment + Service (port named grpc) of our own in the reviews account, so the per-SA
    waypoint serves it. Removed at the end.
 8. The backend's ztunnel sees the waypoint's identity, and an L4 policy "only from the waypoint"
    lets service traffic through while a direct call from productpage to a reviews pod is refused.
    The per-SA waypoint also takes pod-addressed traffic (Istio's traffic type "all"), so the test
    narrows it to service traffic for the duration (`--for service`) to make the call direct, and
    restores it in `finally`.
8b. Pod-addressed traffic to a workload the waypoint serves goes through the waypoint and reaches
    that pod (istio-ambient-facts §5.3 step 4).
 9. The per-SA waypoint serves only that account's workloads: details/ratings traffic never passes it.
10. Hostile HTTP/1.1 (request smuggling) from a pod gets 400, the refusal counter names the reason,
    and the next good request succeeds.

Root only; the module fixture removes the lab in `finally` and checks that no namespace is left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from loom.cli.main import main as loomctl
from loom.lab.cluster import PREFIX_ENV, Cluster, PodRecord, http_get_in_netns, http_status_in_netns
from loom.lab.network import list_namespaces
from loom.lab.store import StoredKey
from tests.samples import samples_dir

pytestmark = pytest.mark.root

NS = "default"
WAYPOINT = "reviews-waypoint"
REVIEWS_SA = "bookinfo-reviews"
WAIT = 30.0
METRICS_PORT = 15020
READINESS_PORT = 15021
RBAC_DENIED = "RBAC: access denied"
RAW_READ_LIMIT = 64 * 1024


def principal(service_account: str) -> str:
    return f"spiffe://cluster.local/ns/{NS}/sa/{service_account}"


# Per-service-account waypoints run as <gateway>-istio-waypoint, never as the account they serve.
WAYPOINT_PRINCIPAL = principal(f"{WAYPOINT}-istio-waypoint")
PRODUCTPAGE_PRINCIPAL = principal("bookinfo-productpage")
REVIEWS_PRINCIPAL = principal(REVIEWS_SA)
REVIEWS_VERSIONS = ("reviews-v1", "reviews-v2", "reviews-v3")


# ---------------------------------------------------------------------------------------------------
# The lab


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    samples = samples_dir()
    lab_dir = Path(f"/tmp/lw-wp-{secrets.token_hex(3)}")  # short: unix socket paths live in it
    cluster = Cluster(lab_dir, prefix="lw" + secrets.token_hex(2))
    previous_prefix = os.environ.get(PREFIX_ENV)
    os.environ[PREFIX_ENV] = cluster.prefix  # for the loomctl commands the tests run
    try:
        cluster.up([samples / "istio" / "bookinfo.yaml"], 2, lambda line: None)
        assert ctl(cluster, "label", "namespace", NS, "istio.io/dataplane-mode=ambient") == 0
        eventually(
            lambda: {p.redirection for p in cluster.status().pods} == {"enabled"}, "every pod captured"
        )
        yield cluster
    finally:
        try:
            cluster.down(lambda line: None)
            shutil.rmtree(lab_dir, ignore_errors=True)
        finally:
            if previous_prefix is None:
                os.environ.pop(PREFIX_ENV, None)
            else:
                os.environ[PREFIX_ENV] = previous_prefix
        assert list_namespaces(cluster.prefix + "-") == []


def eventually(test: Callable[[], bool], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not test():
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        time.sleep(0.1)


def ctl(cluster: Cluster, *argv: str) -> int:
    return loomctl([*argv, "--lab-dir", str(cluster.lab_dir)])


def waypoint_apply(cluster: Cluster, *options: str) -> int:
    """`loomctl waypoint apply` of the reviews account's waypoint, waiting until it is Programmed."""
    return ctl(cluster, "waypoint", "apply", "-n", NS, "--service-account", REVIEWS_SA, "--name", WAYPOINT,
               *options, "--wait", "--waypoint-timeout", "30s")  # fmt: skip


def pod(cluster: Cluster, deployment: str) -> PodRecord:
    """The (first) pod of a Deployment of the default namespace."""
    found = sorted(
        (
            r
            for r in cluster.require_state().pods.values()
            if r.namespace == NS and r.name.startswith(deployment + "-")
        ),
        key=lambda r: r.name,
    )
    assert found, f"no pod of deployment {NS}/{deployment} in the lab"
    return found[0]


def deployment_of(pod_name: str) -> str:
    """reviews-v1-qz4grs4ftc-vq6s2 -> reviews-v1 (lab pods are <deployment>-<hash>-<suffix>)."""
    return pod_name.rsplit("-", 2)[0]


def write_manifests(directory: Path, name: str, manifests: Sequence[dict[str, Any]]) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# Clients inside a pod


def in_pod(cluster: Cluster, source: str, *argv: str) -> list[str]:
    """A command line run in the network namespace of `source`'s pod (as `loomctl lab exec` does)."""
    return ["ip", "netns", "exec", pod(cluster, source).netns, *argv]


def call(
    cluster: Cluster, source: str, url: str, *options: str, count: int = 1, timeout: float = 3.0
) -> tuple[bool, list[dict[str, Any]]]:
    """The lab's `call` client run in `source`'s pod: (every attempt succeeded, every attempt)."""
    argv = in_pod(cluster, source, sys.executable, "-m", "loom.lab.workload", "call", url,
                  "--count", str(count), "--timeout", f"{timeout:g}", *options)  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=10 + count * (timeout + 1), check=False
    )
    attempts: list[dict[str, Any]] = []
    for line in result.stdout.splitlines():
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            if isinstance(answer, dict) and "attempt" in answer:
                attempts.append(answer)
    return result.returncode == 0 and len(attempts) == count, attempts


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: str

    @property
    def from_backend(self) -> bool:
        """Whether a lab workload produced this answer (every workload answer names its pod)."""
        return "x-loom-pod" in self.headers or '"pod":' in self.body

    def document(self) -> dict[str, Any]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


def curl(cluster: Cluster, source: str, url: str, *options: str) -> HttpAnswer | None:
    """curl from `source`'s pod, the path sent exactly as written; None when no HTTP answer came."""
    argv = in_pod(cluster, source, "curl", "-sS", "-i", "--path-as-is", "-m", "5", *options, url)
    result = subprocess.run(argv, capture_output=True, timeout=15, check=False)
    if result.returncode != 0:
        return None
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(status_line.split()[1]), headers, body.decode("utf-8", "replace"))


# Sends stdin as is on one connection and prints what comes back until the peer closes (bounded).
_RAW_CLIENT = f"""
import socket, sys
payload = sys.stdin.buffer.read()
received = b""
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(payload)
    try:
        while len(received) < {RAW_READ_LIMIT}:
            data = s.recv(65536)
            if not data:
                break
            received += data
    except OSError:
        pass
sys.stdout.buffer.write(received)
"""


def raw_exchange(cluster: Cluster, source: str, host: str, port: int, payload: bytes) -> bytes:
    argv = in_pod(cluster, source, sys.executable, "-c", _RAW_CLIENT, host, str(port))
    result = subprocess.run(argv, input=payload, capture_output=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout


# ---------------------------------------------------------------------------------------------------
# What the waypoint and the ztunnels report


def scrape(netns: str, host: str) -> list[Sample]:
    answer = http_get_in_netns(netns, host, METRICS_PORT, "/metrics")
    assert answer is not None and answer[0] == 200, f"no metrics from {host}:{METRICS_PORT} in {netns}"
    return [s for family in text_string_to_metric_families(answer[1].decode()) for s in family.samples]


def total(samples: Sequence[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def waypoint_metrics(cluster: Cluster) -> list[Sample]:
    record = pod(cluster, WAYPOINT)
    return scrape(record.netns, record.ip)


def node_metrics(cluster: Cluster, node: str) -> list[Sample]:
    net = cluster.node_net(cluster.require_state(), node)
    return scrape(net.netns, str(net.wire_ip))


def waypoint_requests(cluster: Cluster, **labels: str) -> float:
    return total(waypoint_metrics(cluster), "istio_requests_total", reporter="waypoint", **labels)


def waypoint_log(cluster: Cluster) -> Path:
    return cluster.log_path(f"pod/{pod(cluster, WAYPOINT).key}")


def log_size(path: Path) -> int:
    return path.stat().st_size


# The waypoint writes its access log in batches, each at most this long after its first request
# (waypoint.telemetry.AccessLog's flush interval); three intervals leave a wide margin.
ACCESS_LOG_SETTLE = 0.3


def settled_access_log_size(cluster: Cluster) -> int:
    """The waypoint log's size once the access log lines of requests already answered are in it."""
    time.sleep(ACCESS_LOG_SETTLE)
    return log_size(waypoint_log(cluster))


def log_since(path: Path, offset: int) -> str:
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().decode("utf-8", "replace")


_CONFIG_LINE = re.compile(r"configuration: (\d+) services, (\d+) routes, (\d+) policies")


def wait_for_config(cluster: Cluster, since: int, *, routes: int, policies: int) -> None:
    """Wait until the waypoint logged a configuration with these counts after byte `since` of its log
    (the waypoint logs one line per configuration it swaps in)."""

    def applied() -> bool:
        found = _CONFIG_LINE.findall(log_since(waypoint_log(cluster), since))
        return bool(found) and (int(found[-1][1]), int(found[-1][2])) == (routes, policies)

    eventually(applied, f"the waypoint configured with {routes} routes and {policies} policies")


def change_config(cluster: Cluster, verb: str, paths: Sequence[Path], *, routes: int, policies: int) -> None:
    """`loomctl apply|delete -f ...`, then wait until the waypoint runs with the result."""
    since = log_size(waypoint_log(cluster))  # config lines: logged at once
    argv = [verb]
    for path in paths:
        argv += ["-f", str(path)]
    assert ctl(cluster, *argv) == 0
    wait_for_config(cluster, since, routes=routes, policies=policies)


def access_log_lines(cluster: Cluster, since: int, pattern: str) -> list[str]:
    """The waypoint's access log lines (Istio's text format, '[time] "METHOD PATH PROTO" ...') written
    after byte `since` that contain `pattern`, once those of the requests already answered are written."""
    time.sleep(ACCESS_LOG_SETTLE)
    return [
        line
        for line in log_since(waypoint_log(cluster), since).splitlines()
        if line.startswith("[") and pattern in line
    ]


def workload_waypoint(cluster: Cluster, node: str, pod_name: str) -> str:
    """The WAYPOINT column of `loomctl ztunnel-config workloads` for a pod, as `node`'s ztunnel sees it.

    A subprocess: the command enters the node's network namespace with the calling thread."""
    env = {**os.environ, "LOOM_LAB_DIR": str(cluster.lab_dir), PREFIX_ENV: cluster.prefix}
    result = subprocess.run(
        [sys.executable, "-m", "loom.cli.main", "ztunnel-config", "workloads", "--node", node],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    column = lines[0].split().index("WAYPOINT") - 1  # "POD NAME" is one column in two words
    for row in (line.split() for line in lines[1:]):
        if row[0] == NS and row[1] == pod_name:
            return row[column]
    raise AssertionError(f"{node}'s ztunnel does not know pod {pod_name}:\n{result.stdout}")


# ---------------------------------------------------------------------------------------------------
# Manifests of our own


def http_route(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "reviews", "port": 9080}],
            "rules": rules,
        },
    }


def reviews_policy(name: str, action: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "action": action,
            "rules": rules,
        },
    }


# ---------------------------------------------------------------------------------------------------
# 1. Creation


def test_01_waypoint_apply_is_programmed_and_reviews_traffic_passes_it(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert waypoint_apply(cluster) == 0
    capsys.readouterr()
    assert ctl(cluster, "waypoint", "status", "-n", NS, WAYPOINT) == 0
    assert re.search(rf"^{WAYPOINT}\s+True\s+Programmed\s", capsys.readouterr().out, re.MULTILINE)
    gateway = cluster.store.get(StoredKey("Gateway", NS, WAYPOINT))
    assert gateway is not None
    conditions = {c["type"]: c["status"] for c in gateway["status"]["conditions"]}
    assert conditions == {"Accepted": "True", "Programmed": "True"}

    waypoint = pod(cluster, WAYPOINT)
    eventually(
        lambda: http_status_in_netns(waypoint.netns, waypoint.ip, READINESS_PORT, "/healthz/ready") == 200,
        "the waypoint ready",
    )
    assert f"as {WAYPOINT_PRINCIPAL}" in waypoint_log(cluster).read_text()  # its own identity
    eventually(
        lambda: call(cluster, "productpage-v1", "http://reviews:9080/reviews/0")[0], "reviews reachable"
    )

    labels = {
        "destination_service_name": "reviews",
        "source_principal": PRODUCTPAGE_PRINCIPAL,
        "response_code": "200",
        "request_protocol": "http",
    }
    before = waypoint_requests(cluster, **labels)
    since = settled_access_log_size(cluster)
    ok, answers = call(cluster, "productpage-v1", "http://reviews:9080/reviews/0", count=10)
    assert ok, answers
    assert {deployment_of(a["pod"]) for a in answers} <= set(REVIEWS_VERSIONS)
    # Metrics and the log line are written when the response completed, which may be just after the
    # client read it.
    eventually(lambda: waypoint_requests(cluster, **labels) == before + 10, "10 more waypoint requests")
    lines = access_log_lines(cluster, since, '"GET /reviews/0 HTTP/1.1" 200 ')
    assert len(lines) == 10, lines
    assert all(
        '"reviews:9080"' in line and "inbound-vip|9080|http|reviews.default.svc.cluster.local" in line
        for line in lines
    )
    request_ids = {re.findall(r'"([0-9a-f-]{36})"', line)[0] for line in lines}
    assert len(request_ids) == 10  # x-request-id generated per request


# ---------------------------------------------------------------------------------------------------
# 2-4. Routing


def test_02_canary_split_90_10_over_1000_requests(cluster: Cluster) -> None:
    samples = samples_dir() / "istio"
    route = samples / "route-reviews-90-10.yaml"
    change_config(cluster, "apply", [samples / "bookinfo-versions.yaml", route], routes=1, policies=0)
    try:
        # The route can arrive a moment before the Addresses of the Services it names.
        eventually(
            lambda: call(cluster, "productpage-v1", "http://reviews:9080/", count=5)[0], "the split serves"
        )
        requests = 1000
        ok, answers = call(cluster, "productpage-v1", "http://reviews:9080/reviews/0", count=requests)
        assert ok, [a for a in answers if not a["ok"]][:5]
        counts = Counter(deployment_of(a["pod"]) for a in answers)
        assert set(counts) <= {"reviews-v1", "reviews-v2"}, counts  # v3 has no weight
        assert counts["reviews-v1"] + counts["reviews-v2"] == requests
        # Each request picks v1 with p = 0.9 independently, so the v1 count is Binomial(1000, 0.9):
        # mean 900, sigma = sqrt(n p (1-p)) = 9.49. A bound of 4.5 sigma (43 requests) is crossed by a
        # correct 90/10 split with probability about 7e-6 (two-sided normal tail), while a broken
        # split, e.g. 85/15 or 95/5 (50 away), or one ignoring the weights (500 away), is caught.
        p = 0.9
        sigma = math.sqrt(requests * p * (1 - p))
        bound = math.ceil(4.5 * sigma)
        assert abs(counts["reviews-v1"] - requests * p) <= bound, counts
    finally:
        change_config(cluster, "delete", [route], routes=0, policies=0)  # the version Services stay


def test_03_header_based_routing(cluster: Cluster, tmp_path: Path) -> None:
    to_v3 = {
        "matches": [{"headers": [{"name": "end-user", "value": "jason"}]}],
        "backendRefs": [{"name": "reviews-v3", "port": 9080}],
    }
    to_v1 = {"backendRefs": [{"name": "reviews-v1", "port": 9080}]}
    route = write_manifests(tmp_path, "by-header", [http_route("reviews-by-header", [to_v3, to_v1])])
    change_config(cluster, "apply", [route], routes=1, policies=0)
    try:
        url = "http://reviews:9080/reviews/0"
        eventually(
            lambda: call(
                cluster, "productpage-v1", url, "-H", "end-user: jason", "--expect-pod", "reviews-v3"
            )[0],
            "the header route",
        )
        cases = [
            (("-H", "end-user: jason"), "reviews-v3"),
            (("-H", "END-USER: jason"), "reviews-v3"),  # header names compare case-insensitively
            (("-H", "end-user: jason", "--http2"), "reviews-v3"),
            (("-H", "end-user: bob"), "reviews-v1"),
            ((), "reviews-v1"),
        ]
        for options, expected in cases:
            ok, answers = call(cluster, "productpage-v1", url, *options, count=10)
            assert ok, (options, answers)
            assert {deployment_of(a["pod"]) for a in answers} == {expected}, options
    finally:
        change_config(cluster, "delete", [route], routes=0, policies=0)


PER_TRY_MS = 250


def test_04_retry_recovers_from_a_stopped_endpoint(cluster: Cluster, tmp_path: Path) -> None:
    retrying = {
        "backendRefs": [{"name": "reviews", "port": 9080}],
        "timeouts": {"request": "5s", "backendRequest": f"{PER_TRY_MS}ms"},
        "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
    }
    route = write_manifests(tmp_path, "retry", [http_route("reviews-retry", [retrying])])
    change_config(cluster, "apply", [route], routes=1, policies=0)
    stopped = pod(cluster, "reviews-v2")
    assert stopped.process is not None
    try:
        eventually(
            lambda: call(cluster, "productpage-v1", "http://reviews:9080/", count=3)[0], "the route serves"
        )
        # A stopped process still has its listening socket: the kernel completes the connection (and
        # the destination ztunnel the HBONE CONNECT) but nothing ever answers, so only the per-try
        # timeout can end such an attempt.
        os.kill(stopped.process.pid, signal.SIGSTOP)
        ok, answers = call(cluster, "productpage-v1", "http://reviews:9080/reviews/0", count=30)
    finally:
        os.kill(stopped.process.pid, signal.SIGCONT)
        change_config(cluster, "delete", [route], routes=0, policies=0)
    assert ok, [a for a in answers if not a["ok"]]
    assert {deployment_of(a["pod"]) for a in answers} <= {"reviews-v1", "reviews-v3"}
    # Round-robin sends some first attempts to the stopped pod: those requests took at least one
    # per-try timeout and still succeeded, on a retry to another endpoint.
    retried = [a for a in answers if a["elapsed_ms"] >= PER_TRY_MS]
    assert retried, sorted(a["elapsed_ms"] for a in answers)


# ---------------------------------------------------------------------------------------------------
# 5-6. Authorization


def test_05_l7_deny_by_method_and_path(cluster: Cluster, tmp_path: Path) -> None:
    sample = samples_dir() / "ambient" / "l7-policy.yaml"  # ALLOW GET /reviews/* from productpage
    deny = {"to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/reviews/internal/*"]}}]}
    own = write_manifests(
        tmp_path, "deny-internal", [reviews_policy("reviews-deny-internal", "DENY", [deny])]
    )
    change_config(cluster, "apply", [sample, own], routes=0, policies=2)
    try:
        url = "http://reviews:9080/reviews/0"
        eventually(
            lambda: (a := curl(cluster, "ratings-v1", url)) is not None and a.status == 403, "the policy"
        )
        allowed = curl(cluster, "productpage-v1", url)
        assert allowed is not None and allowed.status == 200 and allowed.from_backend
        since = settled_access_log_size(cluster)

        denied = {
            "another caller (ratings)": curl(cluster, "ratings-v1", url),
            "DELETE": curl(cluster, "productpage-v1", url, "-X", "DELETE"),
            "POST": curl(cluster, "productpage-v1", url, "-X", "POST", "-d", "x"),
            "a path outside /reviews/*": curl(cluster, "productpage-v1", "http://reviews:9080/ratings/0"),
            "the DENY on GET /reviews/internal/*": curl(
                cluster, "productpage-v1", "http://reviews:9080/reviews/internal/x"
            ),
        }
        for case, answer in denied.items():
            assert answer is not None, case
            assert (answer.status, answer.body) == (403, RBAC_DENIED), case
            assert not answer.from_backend, case
        # The DENY covers its paths only: GET elsewhere under /reviews/ is still allowed.
        other = curl(cluster, "productpage-v1", "http://reviews:9080/reviews/public/x")
        assert other is not None and other.status == 200
        lines = access_log_lines(cluster, since, '"GET /reviews/internal/x HTTP/1.1" 403 ')
        assert lines and f"rbac_access_denied_matched_policy[{NS}/reviews-deny-internal]" in lines[-1]
    finally:
        change_config(cluster, "delete", [sample, own], routes=0, policies=0)


# Spellings of a path under /admin/ that a naive matcher would not see as /admin/*.
BYPASS_PATHS = [
    "/admin/x",  # the plain path, for comparison
    "//admin/x",
    "///admin//x",
    "/./admin/x",
    "/%2e/admin/x",
    "/admin/./x",
    "/a/../admin/x",
    "/../admin/x",
    "/reviews/../admin/x",
    "/a/%2e%2e/admin/x",
    "/%2e%2e/admin/x",
    "/%61dmin/x",  # percent-encoded unreserved character
    "/%2fadmin/x",  # encoded separators: refused (400), never decoded into a path
    "/admin%2fx",
    "/admin%5cx",
    "/admin\\x",  # backslash, which some servers treat as '/'
    "/admin;x",  # path parameters, which some servers strip
    "/admin/x?y=1",
]


def test_06_normalized_path_bypass_attempts_are_denied(cluster: Cluster, tmp_path: Path) -> None:
    deny = {"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}
    policy = write_manifests(tmp_path, "deny-admin", [reviews_policy("reviews-deny-admin", "DENY", [deny])])
    change_config(cluster, "apply", [policy], routes=0, policies=1)
    try:
        refused_before = total(waypoint_metrics(cluster), "loom_waypoint_refused_total")
        statuses: Counter[int] = Counter()
        for path in BYPASS_PATHS:
            answer = curl(cluster, "productpage-v1", f"http://reviews:9080{path}")
            assert answer is not None, path
            assert answer.status in (400, 403), (path, answer)
            assert not answer.from_backend, (path, answer)  # no backend answered
            if answer.status == 403:
                assert answer.body == RBAC_DENIED, path
            statuses[answer.status] += 1
        # A path refused outright (400) is counted with its reason, like any other refusal.
        eventually(
            lambda: (
                total(waypoint_metrics(cluster), "loom_waypoint_refused_total")
                == refused_before + statuses[400]
            ),
            f"{statuses[400]} path refusals counted",
        )
        # The backend receives the path the policy saw: normalized out of /admin, it is allowed.
        escaped = curl(cluster, "productpage-v1", "http://reviews:9080/admin/../reviews/1")
        assert escaped is not None and escaped.status == 200
        assert escaped.document()["path"] == "/reviews/1"
    finally:
        change_config(cluster, "delete", [policy], routes=0, policies=0)


# ---------------------------------------------------------------------------------------------------
# 7. gRPC


GRPC_PORT = 50051
GRPC_APP: list[dict[str, Any]] = [
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "reviews-grpc", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "reviews-grpc"}},
            "template": {
                "metadata": {"labels": {"app": "reviews-grpc", "version": "v1"}},
                "spec": {
                    "serviceAccountName": REVIEWS_SA,  # so the per-SA waypoint serves it
                    "containers": [
                        {
                            "name": "grpc",
                            "image": "x",
                            "ports": [{"containerPort": GRPC_PORT, "name": "grpc"}],
                        }
                    ],
                },
            },
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "reviews-grpc", "namespace": NS},
        "spec": {
            "selector": {"app": "reviews-grpc"},
            "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"}],
        },
    },
]


def test_07_grpc_through_the_waypoint(cluster: Cluster, tmp_path: Path) -> None:
    app = write_manifests(tmp_path, "grpc", GRPC_APP)
    url = f"grpc://reviews-grpc:{GRPC_PORT}"
    assert ctl(cluster, "apply", "-f", str(app)) == 0
    try:
        eventually(lambda: call(cluster, "productpage-v1", url)[0], "the gRPC service reachable")
        labels = {
            "destination_service_name": "reviews-grpc",
            "request_protocol": "grpc",
            "grpc_response_status": "0",
            "response_code": "200",
        }
        before = waypoint_requests(cluster, **labels)
        since = settled_access_log_size(cluster)
        ok, answers = call(cluster, "productpage-v1", url, count=5)
        assert ok, answers
        assert all(a["grpc_status"] == 0 and deployment_of(a["pod"]) == "reviews-grpc" for a in answers)
        eventually(
            lambda: waypoint_requests(cluster, **labels) == before + 5, "5 gRPC requests at the waypoint"
        )
        lines = access_log_lines(cluster, since, '"POST /grpc.health.v1.Health/Check HTTP/2" 200 ')
        assert len(lines) == 5, lines
    finally:
        assert ctl(cluster, "delete", "-f", str(app)) == 0


# ---------------------------------------------------------------------------------------------------
# 8, 8b. Identity at the backend, L4 policy, pod-addressed traffic


def reviews_nodes(cluster: Cluster) -> set[str]:
    return {pod(cluster, version).node for version in REVIEWS_VERSIONS}


def test_08_backend_ztunnel_sees_the_waypoint_and_l4_policy_blocks_direct_calls(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Every productpage -> reviews request so far went through the waypoint: the reviews pods' ztunnels
    # saw the waypoint's identity, never productpage's.
    def inbound(principal_: str) -> float:
        return sum(
            total(
                node_metrics(cluster, node),
                "istio_tcp_connections_opened_total",
                reporter="destination",
                source_principal=principal_,
                destination_principal=REVIEWS_PRINCIPAL,
            )
            for node in reviews_nodes(cluster)
        )

    assert inbound(WAYPOINT_PRINCIPAL) >= 1
    assert inbound(PRODUCTPAGE_PRINCIPAL) == 0

    target = pod(cluster, "reviews-v1")
    direct_url = f"http://{target.ip}:9080/reviews/0"
    client_node = pod(cluster, "productpage-v1").node
    only_from_waypoint = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "reviews-only-from-waypoint", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "reviews"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [WAYPOINT_PRINCIPAL.removeprefix("spiffe://")]}}]}],
        },
    }
    policy = write_manifests(tmp_path, "only-from-waypoint", [only_from_waypoint])
    # The per-SA waypoint takes pod-addressed traffic too (traffic type "all"); for productpage's call
    # to a pod IP to be direct, narrow it to service traffic for this test.
    assert waypoint_apply(cluster, "--for", "service") == 0
    try:
        eventually(lambda: workload_waypoint(cluster, client_node, target.name) == "None", "pods unbound")
        direct = curl(cluster, "productpage-v1", direct_url)
        assert direct is not None and direct.status == 200
        assert direct.document()["pod"] == target.name
        assert "x-request-id" not in direct.document()["headers"]  # no waypoint on this path

        log = cluster.log_path(f"ztunnel/{target.node}")
        since = log_size(log)
        assert ctl(cluster, "apply", "-f", str(policy)) == 0
        eventually(lambda: curl(cluster, "productpage-v1", direct_url) is None, "the direct call refused")
        _, attempts = call(cluster, "productpage-v1", direct_url, count=3)
        assert attempts and not any(a["ok"] for a in attempts), attempts
        refusals = [
            line
            for line in log_since(log, since).splitlines()
            if "policy_denied" in line and "bookinfo-productpage" in line
        ]
        assert refusals, "the destination ztunnel did not log the policy denial"

        # Service traffic still passes: the waypoint's identity is the allowed one. (Connections the
        # waypoint opened before the policy are re-checked by ztunnel, which closes those a new policy
        # no longer allows, so reused connections prove as much as new ones.)
        labels = {
            "destination_service_name": "reviews",
            "response_code": "200",
            "source_principal": PRODUCTPAGE_PRINCIPAL,
        }
        before = waypoint_requests(cluster, **labels)
        ok, answers = call(cluster, "productpage-v1", "http://reviews:9080/reviews/0", count=10)
        assert ok, answers
        eventually(
            lambda: waypoint_requests(cluster, **labels) == before + 10, "10 requests via the waypoint"
        )
        assert inbound(WAYPOINT_PRINCIPAL) >= 1
    finally:
        assert ctl(cluster, "delete", "-f", str(policy)) == 0
        assert waypoint_apply(cluster, "--for", "all") == 0
        eventually(
            lambda: workload_waypoint(cluster, client_node, target.name) == WAYPOINT, "pods bound again"
        )


def test_08b_pod_addressed_traffic_to_a_served_workload_passes_the_waypoint(cluster: Cluster) -> None:
    """A per-SA waypoint serves its account's pods (traffic type "all"): the client's ztunnel sends a
    call to such a pod's IP to the waypoint with :authority = pod IP:port (istio-ambient-facts §5.3
    step 4), and the waypoint must serve it -- with its L7 policy -- and forward it to that very pod."""
    target = pod(cluster, "reviews-v1")
    assert workload_waypoint(cluster, pod(cluster, "productpage-v1").node, target.name) == WAYPOINT
    since = settled_access_log_size(cluster)
    ok, answers = call(cluster, "productpage-v1", f"http://{target.ip}:9080/reviews/8", count=3)
    assert ok, (answers, log_since(waypoint_log(cluster), since)[-1500:])
    assert {a["pod"] for a in answers} == {target.name}
    lines = access_log_lines(cluster, since, '"GET /reviews/8 HTTP/1.1" 200 ')
    assert len(lines) == 3 and all(f'"{target.ip}:9080"' in line for line in lines), lines


# ---------------------------------------------------------------------------------------------------
# 9. Only the account's workloads


def test_09_the_per_sa_waypoint_serves_only_its_account(cluster: Cluster) -> None:
    details_node, ratings_node = pod(cluster, "details-v1").node, pod(cluster, "ratings-v1").node

    def direct(node: str, source: str, destination: str) -> float:
        return total(
            node_metrics(cluster, node),
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_principal=principal(source),
            destination_principal=principal(destination),
        )

    details_before = direct(details_node, "bookinfo-productpage", "bookinfo-details")
    ratings_before = direct(ratings_node, "bookinfo-reviews", "bookinfo-ratings")
    since = settled_access_log_size(cluster)
    ok, answers = call(cluster, "productpage-v1", "http://details:9080/details/0", count=10)
    assert ok and {deployment_of(a["pod"]) for a in answers} == {"details-v1"}, answers
    # A call *from* a reviews pod does not pass its waypoint either: waypoints sit on the destination side.
    ok, answers = call(cluster, "reviews-v1", "http://ratings:9080/ratings/0", count=10)
    assert ok and {deployment_of(a["pod"]) for a in answers} == {"ratings-v1"}, answers
    # Each call arrived at the destination ztunnel straight from the client's identity ...
    assert direct(details_node, "bookinfo-productpage", "bookinfo-details") >= details_before + 10
    assert direct(ratings_node, "bookinfo-reviews", "bookinfo-ratings") >= ratings_before + 10
    # ... and the waypoint never saw them.
    samples = waypoint_metrics(cluster)
    for service in ("details", "ratings", "productpage"):
        assert total(samples, "istio_requests_total", destination_service_name=service) == 0, service
    assert access_log_lines(cluster, since, "details") == []
    assert access_log_lines(cluster, since, "ratings") == []


# ---------------------------------------------------------------------------------------------------
# 10. Bad input through the lab


HOST = b"Host: reviews:9080\r\n"
SMUGGLING = [
    (
        "cl-te",
        b"POST /reviews/0 HTTP/1.1\r\n"
        + HOST
        + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        "te_and_cl",
    ),
    (
        "te-cl",
        b"POST /reviews/0 HTTP/1.1\r\n"
        + HOST
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST",
        "te_and_cl",
    ),
    (
        "cl-differ",
        b"POST /reviews/0 HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "bad_content_length",
    ),
]


@pytest.mark.parametrize(
    ("payload", "reason"), [(p, r) for _, p, r in SMUGGLING], ids=[c for c, _, _ in SMUGGLING]
)
def test_10_request_smuggling_is_refused_and_counted(cluster: Cluster, payload: bytes, reason: str) -> None:
    def refused() -> float:
        return total(waypoint_metrics(cluster), "loom_waypoint_refused_total", reason=reason)

    before = refused()
    since = settled_access_log_size(cluster)
    answer = raw_exchange(cluster, "productpage-v1", "reviews", 9080, payload)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # nothing smuggled behind it was answered
    assert b"x-loom-pod" not in answer.lower() and b'"pod":' not in answer  # no backend answered
    eventually(lambda: refused() == before + 1, f"loom_waypoint_refused_total{{reason={reason!r}}} counted")
    # ... and logged: a 400 with Envoy's flag for a downstream protocol error and the reason.
    lines = access_log_lines(cluster, since, f" 400 DPE http1.{reason} ")
    assert len(lines) == 1, log_since(waypoint_log(cluster), since)[-2000:]
    ok, answers = call(cluster, "productpage-v1", "http://reviews:9080/reviews/0", count=3)
    assert ok, answers
