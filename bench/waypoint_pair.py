"""loom-waypoint against no waypoint and against HAProxy as the L7 hop, side by side in one run.

    sudo .venv/bin/python -m bench.waypoint_pair [--seconds 10 --rate 1000 --max-connections 32 ...]
    sudo .venv/bin/python -m bench.waypoint_pair --smoke        # about 1 s per case: does it all work?

The lab (`bench.waypoint_lab`): the client pod on n1 and the server pod on n2, both enrolled (each
node's ztunnel captures them); the L7 hops on n3. Every path starts with the client's plain HTTP/1.1
keep-alive connection, captured by ztunnel n1, and ends at the server pod's app:

  A  no waypoint     client -> ztunnel n1 =HBONE=> ztunnel n2 -> app
                     (the client calls the Service ``server-direct``; no waypoint is bound to it)
  B  loom waypoint   client -> ztunnel n1 =HBONE=> loom-waypoint =HBONE=> ztunnel n2 -> app
                     (the Service ``server`` carries istio.io/use-waypoint, so ztunnel n1 tunnels to
                     the waypoint, which terminates HBONE, parses HTTP, routes, authorizes, picks the
                     endpoint and sends each request over its own pooled HBONE connection)
  C  HAProxy         client -> ztunnel n1 -TCP-> HAProxy -HTTP-> ztunnel n2 -> app
                     (the client calls HAProxy's pod ip:8080. That pod is outside the mesh, so ztunnel
                     n1 relays the connection as plain TCP (passthrough); ztunnel n2 takes HAProxy's
                     connection to the server pod on its plaintext inbound port 15006)
  D  HAProxy in the  client -> ztunnel n1 =HBONE=> ztunnel n3 -> HAProxy -> ztunnel n3 =HBONE=>
     mesh            ztunnel n2 -> app
                     (HAProxy's pod ``haproxy-mesh`` is enrolled: its node's ztunnel terminates the
                     client's tunnel and originates the one to the server, as a workload's would)

(=HBONE=>: HTTP/2 CONNECT inside TLS 1.3 with mutual authentication by SPIFFE certificates.)

How fair C and D are. HAProxy cannot speak HBONE, so no single HAProxy process can take the
waypoint's place. Both C and D give HAProxy the same HTTP work as the waypoint: parse every request
and response, pick the (one) backend, forward on kept-alive upstream connections reused across client
connections, and write one access-log line per request to stdout.
* C has the same number of proxy processes on the path as B (ztunnel n1, one L7 proxy, ztunnel n2)
  over the same wires, but nothing in it is encrypted or framed as HTTP/2: the ztunnels relay plain
  TCP, HAProxy does HTTP only. C is the floor of an L7 hop: HAProxy's HTTP cost alone. Its latency can
  even undercut A's, whose ztunnels do HBONE.
* D carries the mTLS both ways, like B: HAProxy plus ztunnel n3 together do what the waypoint does
  alone (terminate one mTLS tunnel, originate another, and the HTTP in between); it has one more
  process on the path than B and one more loopback hop each way (ztunnel n3 <-> HAProxy), and its
  encryption is done by loom's own Python ztunnel. D's L7 hop cost is counted as HAProxy + ztunnel n3.
What neither does: check identities or authorization policies (there are none here), route by
HTTPRoute, or produce Istio's metrics, all of which the waypoint does on every request.

Measured per path, side by side (issue 5's targets in brackets):

1. fixed rate: --rate requests/s over --connections keep-alive connections, open loop, for --seconds
   after --warmup (`bench.waypoint_load rate`); achieved rate, latency p50/p90/p99, and the latency
   B, C and D add over A                                      [B adds p99 <= 2 ms at 1,000 req/s]
2. CPU seconds of every process during the window of (1), from /proc/<pid>/stat utime+stime, per
   1,000 requests, which is also vCPU per 1,000 requests/s       [waypoint <= 0.25 vCPU per 1,000 rps]
3. maximum throughput: closed loop over --max-connections connections for --max-seconds (wrk with one
   thread, or the Python generator when wrk is not installed); requests/s, latency, CPU per 1,000
   requests and the share of a core every process used;
4. RSS (VmRSS, and VmHWM as the peak) of the L7 hops: idle after start-up, after (1), after (3).

Contention, honestly: every process (generator, ztunnels, L7 hop, app, and this process, which runs
the controller and the node agents) shares the machine's cores; on 2 cores the max-throughput case is
bound by the machine as a whole, and the table shows who used the CPU. The machine's busy time beyond
the lab's processes is reported as "other load": on a shared machine it shows when a run was noisy.
Before the figures are trusted the run checks that B went through the waypoint (its
istio_requests_total moved by at least the requests completed), C and D through their HAProxy (req_tot),
and that no path touched another's hop. Everything is bounded in time; the lab is removed on every
exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from bench.netlab import CLK_TCK, Child, in_pod, python_module
from bench.stacks import WAYPOINT_COMPONENTS, summarize
from bench.waypoint_lab import HAPROXY_PORT, SERVICE_PORT, VIP_DIRECT, VIP_WAYPOINT, WaypointLab, waypoint_lab

T = TypeVar("T")
MB: Final = 1e6
TARGET_VCPU_PER_1000_RPS: Final = 0.25
TARGET_ADDED_P99_MS: Final = 2.0
GENERATOR_WAIT: Final = 60.0  # beyond the run's own length, for start-up and draining
PHASES: Final = ("rate", "max")
SETTLE: Final = 0.5  # seconds between a run's end and the reading of the hops' request counters
WRK_SCRIPT: Final = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"wrk":1,"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


@dataclass
class Route:
    """One way from the client pod to the app, and the processes that make its L7 hop (none for A)."""

    key: str  # A, B, C, D
    name: str
    host: str
    port: int
    hop: tuple[str, ...]  # process names (see `processes`)
    counter: str  # which request counter must move on this path ("" for A)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # "rate" / "max" -> figures
    checks: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> counter -> requests


def routes(bench: WaypointLab) -> list[Route]:
    found = [
        Route("A", "no waypoint", VIP_DIRECT, SERVICE_PORT, (), ""),
        Route("B", "loom waypoint", VIP_WAYPOINT, SERVICE_PORT, ("waypoint",), "waypoint"),
    ]
    if "haproxy" in bench.haproxies:
        found.append(
            Route("C", "HAProxy", bench.pods["haproxy"].address, HAPROXY_PORT, ("haproxy",), "haproxy")
        )
    if "haproxy-mesh" in bench.haproxies:
        address = bench.pods["haproxy-mesh"].address
        found.append(
            Route(
                "D",
                "HAProxy in the mesh",
                address,
                HAPROXY_PORT,
                ("haproxy-mesh", "ztunnel-n3"),
                "haproxy-mesh",
            )
        )
    return found


# ---------------------------------------------------------------------------------------------------
# arguments


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.waypoint_pair", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="fixed-rate window per path (s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded load before each window (s)")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed rate, requests/s")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections at fixed rate")
    parser.add_argument("--max-seconds", type=int, default=10, help="max-throughput window per path (s)")
    parser.add_argument("--max-connections", type=int, default=32, help="connections at max throughput")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="max-throughput load generator (auto: wrk when installed)",
    )
    parser.add_argument("--haproxy-threads", type=int, default=1, help="HAProxy nbthread (1: like the loop)")
    parser.add_argument("--no-haproxy-log", action="store_true", help="HAProxy without its per-request log")
    parser.add_argument("--log-level", default="info", help="LOG_LEVEL of the ztunnels and the waypoint")
    parser.add_argument("--smoke", action="store_true", help="1 s per case, small counts: a quick check")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--logs", help="copy every process's log (access logs included) to this directory")
    parser.add_argument(
        "--profile",
        help="after the measurements, run B's fixed-rate case again with py-spy sampling the waypoint, and "
        "write its stacks and a summary to this directory (not part of the figures)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rate, args.connections = 1.0, 0.2, 200.0, 4
        args.max_seconds, args.max_connections = 1, 4
    if not 0 < args.seconds <= 120 or not 0 <= args.warmup <= 30:
        parser.error("--seconds must be in (0, 120] and --warmup in [0, 30]")
    if not 0 < args.rate <= 20000 or not 0 < args.connections <= 256:
        parser.error("--rate (0, 20000], --connections (0, 256]")
    if not 0 < args.max_seconds <= 120 or not 0 < args.max_connections <= 1000:
        parser.error("--max-seconds (0, 120], --max-connections (0, 1000]")
    if not 0 <= args.size <= 1 << 20 or not 0 < args.haproxy_threads <= 64:
        parser.error("--size [0, 1MiB], --haproxy-threads (0, 64]")
    return args


# ---------------------------------------------------------------------------------------------------
# /proc readings


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (user, nice, system, irq, softirq, steal), from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def peak_rss(child: Child) -> int:
    """VmHWM (the highest RSS so far) in bytes."""
    with open(f"/proc/{child.pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{child.name} has no VmHWM in /proc/<pid>/status")


@dataclass
class CpuWindow:
    """CPU time of the lab's processes, of this process (the controller, the node agents and the relay
    run in it) and of the whole machine between `open()` and `close()`. Whatever the machine did beyond
    those is other load (other users of the machine), reported so that a noisy run shows as one."""

    processes: dict[str, Child]
    before: dict[str, tuple[float, float]] = field(default_factory=dict)
    machine_before: float = 0.0
    opened: float = 0.0
    total: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds
    user: dict[str, float] = field(default_factory=dict)  # process -> user-space CPU seconds
    elapsed: float = 0.0
    machine: float = 0.0  # busy CPU seconds of all cores

    def open(self) -> None:
        self.before = {name: child.cpu_times() for name, child in self.processes.items()}
        me = os.times()
        self.before["orchestrator"] = (me.user, me.system)
        self.machine_before = machine_busy_seconds()
        self.opened = time.monotonic()

    def close(self) -> None:
        self.elapsed = time.monotonic() - self.opened
        self.machine = machine_busy_seconds() - self.machine_before
        now = {name: child.cpu_times() for name, child in self.processes.items()}
        me = os.times()
        now["orchestrator"] = (me.user, me.system)
        for name, (user, system) in now.items():
            self.total[name] = user + system - sum(self.before[name])
            self.user[name] = user - self.before[name][0]

    def add(self, name: str, user: float, system: float) -> None:
        """A process measured another way (a generator that has exited)."""
        self.total[name] = user + system
        self.user[name] = user

    def figures(self) -> dict[str, Any]:
        other = self.machine - sum(self.total.values())
        return {
            "cpu_seconds": self.total,
            "cpu_user_seconds": self.user,
            "elapsed_s": self.elapsed,
            "machine_busy_seconds": self.machine,
            "other_load_cores": max(0.0, other) / self.elapsed if self.elapsed > 0 else 0.0,
        }


# ---------------------------------------------------------------------------------------------------
# running the load generators


def processes(bench: WaypointLab) -> dict[str, Child]:
    """Every process of the lab whose CPU is measured, by the name the report uses."""
    found = {f"ztunnel-{node}": child for node, child in bench.ztunnels.items()}
    found["waypoint"] = bench.waypoint
    found.update((name, haproxy.child) for name, haproxy in bench.haproxies.items())
    found["app"] = bench.app
    return found


async def run_marked(
    bench: WaypointLab, name: str, argv: list[str], within: float
) -> tuple[dict[str, Any], CpuWindow]:
    """Run a `bench.waypoint_load` client in the client pod; its result and the CPU window between its
    "measuring" and "measured" marks (the generator's own CPU included, as "generator")."""
    child = await Child.start(
        name, in_pod(bench.pods["client"], *argv), pipe_stdout=True, log=bench.workdir / f"{name}.log"
    )
    window = CpuWindow({**processes(bench), "generator": child})
    try:
        deadline = time.monotonic() + within
        while True:
            event = await child.read_event(max(0.1, deadline - time.monotonic()))
            if event.get("event") == "measuring":
                window.open()
            elif event.get("event") == "measured":
                window.close()
            elif "result" in event:
                await asyncio.wait_for(child.process.wait(), 10.0)
                if not window.total:
                    raise RuntimeError(f"{name} reported without measuring marks")
                return event["result"], window
    finally:
        await child.stop()


async def run_wrk(
    bench: WaypointLab, name: str, url: str, connections: int, seconds: int, measure: bool
) -> tuple[dict[str, Any], CpuWindow]:
    """One wrk run (one thread) in the client pod: its figures, and the CPU window around it.

    wrk's own CPU: it is a child of this process (`ip netns exec` execs it), so once it has exited and
    been reaped its utime+stime are in this process's children accounting (`os.times`); no other child
    exits during the run, so the difference is wrk's alone."""
    script = bench.workdir / "report.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), url]
    window = CpuWindow(processes(bench))
    children_before = os.times()
    if measure:
        window.open()
    child = await Child.start(name, in_pod(bench.pods["client"], *argv), pipe_stdout=True)
    try:
        assert child.process.stdout is not None
        async with asyncio.timeout(seconds + GENERATOR_WAIT):
            output = await child.process.stdout.read()
            await child.process.wait()
    finally:
        await child.stop()
    if measure:
        window.close()
        children = os.times()
        window.add(
            "generator",
            children.children_user - children_before.children_user,
            children.children_system - children_before.children_system,
        )
    lines = [line for line in output.decode(errors="replace").splitlines() if line.startswith('{"wrk"')]
    if child.process.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({child.process.returncode}): {output[-400:]!r}")
    raw = json.loads(lines[-1])
    duration = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    result = {
        "generator": "wrk",
        "requests": raw["requests"],
        "completed": raw["requests"],
        "ok": raw["requests"] - raw["status"],
        "errors": errors,
        "error_kinds": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")},
        "window_s": duration,
        "achieved_rps": raw["requests"] / duration if duration > 0 else 0.0,
        **{f"{p}_ms": raw[f"{p}_us"] / 1e3 for p in ("p50", "p90", "p99", "p999", "max", "mean")},
    }
    return result, window


async def measure_rate(bench: WaypointLab, path: Route, args: argparse.Namespace) -> None:
    argv = python_module(
        "bench.waypoint_load", "rate", path.host, str(path.port),
        "--rate", str(args.rate), "--connections", str(args.connections),
        "--seconds", str(args.seconds), "--warmup", str(args.warmup),
    )  # fmt: skip
    within = args.seconds + args.warmup + GENERATOR_WAIT
    result, window = await run_marked(bench, f"rate-{path.key}", argv, within)
    result["generator"] = "python"
    path.phases["rate"] = {**result, **window.figures()}


async def measure_max(bench: WaypointLab, path: Route, args: argparse.Namespace) -> None:
    if args.generator == "wrk":
        url = f"http://{path.host}:{path.port}/"
        if args.warmup > 0:  # unrecorded: fills the proxies' pools and caches
            await run_wrk(bench, f"wrk-warmup-{path.key}", url, args.max_connections, 1, measure=False)
        result, window = await run_wrk(
            bench, f"wrk-{path.key}", url, args.max_connections, args.max_seconds, measure=True
        )
    else:
        argv = python_module(
            "bench.waypoint_load", "closed", path.host, str(path.port),
            "--connections", str(args.max_connections),
            "--seconds", str(args.max_seconds), "--warmup", str(args.warmup),
        )  # fmt: skip
        within = args.max_seconds + args.warmup + GENERATOR_WAIT
        result, window = await run_marked(bench, f"closed-{path.key}", argv, within)
        result["generator"] = "python"
    path.phases["max"] = {**result, **window.figures()}


# ---------------------------------------------------------------------------------------------------
# the run


async def counters(bench: WaypointLab) -> dict[str, float]:
    """Requests counted so far by each L7 hop (the path checks)."""
    found = {"waypoint": await bench.waypoint_requests()}
    found.update((name, float(haproxy.requests())) for name, haproxy in bench.haproxies.items())
    return found


async def profile_waypoint(bench: WaypointLab, path: Route, args: argparse.Namespace) -> str:
    """B's fixed-rate case once more with py-spy sampling the waypoint (a phase of its own, so the
    sampler's pauses never touch the reported figures); the summary of `bench.stacks`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.profile)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    target = out / "waypoint-rate.txt"
    # C frames too (--native), so OpenSSL, uvloop and the syscalls show under their own names.
    argv = [py_spy, "record", "-p", str(bench.waypoint.pid), "-r", "250", "--native", "--nolineno"]
    sampler = await Child.start("py-spy", [*argv, "-f", "raw", "-o", str(target)], log=out / "py-spy.log")
    await asyncio.sleep(0.5)  # py-spy attaches
    try:
        scratch = Route(path.key, path.name, path.host, path.port, path.hop, path.counter)  # figures not kept
        await measure_rate(bench, scratch, args)
    finally:
        if sampler.alive():
            sampler.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                await asyncio.wait_for(sampler.process.wait(), 15.0)
            except TimeoutError:
                await sampler.stop()
    if not target.exists():
        return f"py-spy wrote nothing:\n{sampler.log_tail()}"
    text = summarize(target.read_text(), WAYPOINT_COMPONENTS, "(waypoint/")
    (out / "waypoint-rate-summary.txt").write_text(text + "\n")
    return text


def check_alive(children: Mapping[str, Child]) -> None:
    for child in children.values():
        if not child.alive():
            raise RuntimeError(
                f"{child.name} exited during the run ({child.process.returncode}):\n{child.log_tail()}"
            )


def copy_logs(workdir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copyfile(log, target / log.name)


def memory_of(child: Child) -> dict[str, int]:
    memory = child.memory()
    return {"rss": memory.rss, "anon": memory.anon, "peak": peak_rss(child)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "bw" + secrets.token_hex(3)
    started = time.monotonic()
    async with waypoint_lab(
        prefix,
        size=args.size,
        log_level=args.log_level,
        haproxy_threads=args.haproxy_threads,
        haproxy_log=not args.no_haproxy_log,
    ) as bench:
        paths = routes(bench)
        measured = processes(bench)
        memory = {"idle": {name: memory_of(child) for name, child in measured.items()}}
        print(f"lab {prefix} up in {time.monotonic() - started:.1f} s; measuring", file=sys.stderr)
        for phase in PHASES:
            # The paths one after the other within a phase, so drift on a shared machine hits them alike.
            for path in paths:
                before = await counters(bench)
                if phase == "rate":
                    await measure_rate(bench, path, args)
                else:
                    await measure_max(bench, path, args)
                # The hops count a request when its exchange ends, a moment after the client has the
                # response: let the last ones land before reading, so they are not charged to the next path.
                await asyncio.sleep(SETTLE)
                check_alive(measured)
                after = await counters(bench)
                path.checks[phase] = {name: after[name] - before[name] for name in after}
                print(f"{phase} {path.key} ({path.name}) done", file=sys.stderr)
            memory[f"after {phase}"] = {name: memory_of(child) for name, child in measured.items()}
        profile = await profile_waypoint(bench, paths[1], args) if args.profile else ""
        if args.logs:
            await asyncio.to_thread(copy_logs, bench.workdir, Path(args.logs))
        check_alive(measured)
    figures: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "cpus": os.cpu_count(),
        "wall_seconds": time.monotonic() - started,
        "memory": memory,
        "paths": {
            p.key: {
                "name": p.name,
                "target": f"{p.host}:{p.port}",
                "hop": list(p.hop),
                "counter": p.counter,
                **p.phases,
                "checks": p.checks,
            }
            for p in paths
        },
    }
    figures["profile"] = profile
    figures["problems"] = path_problems(figures)
    figures["summary"] = summary(figures)
    return figures


def path_problems(figures: Mapping[str, Any]) -> list[str]:
    """What makes figures untrustworthy: a path that did not go through its hop (or through another's),
    or failed requests."""
    problems: list[str] = []
    for key, p in figures["paths"].items():
        for phase in PHASES:
            done = p[phase]["completed"]
            for counter, moved in p["checks"][phase].items():
                if counter == p["counter"] and moved < done:
                    problems.append(f"{phase} {key}: {counter} counted {moved:.0f} of {done} requests")
                elif counter != p["counter"] and moved:
                    problems.append(f"{phase} {key}: {moved:.0f} requests went through {counter}")
            if p[phase]["errors"]:
                problems.append(f"{phase} {key}: {p[phase]['errors']} requests failed")
    return problems


# ---------------------------------------------------------------------------------------------------
# the figures


def per_1000(phase: Mapping[str, Any], names: Sequence[str], key: str = "cpu_seconds") -> float | None:
    """CPU seconds of the processes `names` together per 1,000 requests completed, which is also vCPU
    per 1,000 requests/s. None for no process (path A's hop) or no request."""
    if not names or not phase["completed"]:
        return None
    return sum(float(phase[key][n]) for n in names) / float(phase["completed"]) * 1000


def cores(phase: Mapping[str, Any], names: Sequence[str]) -> float | None:
    """The share of one core the processes `names` used together during the phase's window."""
    if not names or phase["elapsed_s"] <= 0:
        return None
    return sum(float(phase["cpu_seconds"][n]) for n in names) / float(phase["elapsed_s"])


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing or b is not positive (an added latency at or below zero)."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def summary(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures (in the JSON too), from the raw ones."""
    paths = figures["paths"]
    base = paths["A"]["rate"]
    out: dict[str, Any] = {}
    for key, p in paths.items():
        rate, top, hop = p["rate"], p["max"], p["hop"]
        entry: dict[str, Any] = {
            "hop": hop,
            "rate_rps": rate["achieved_rps"],
            "rate_p50_ms": rate["p50_ms"],
            "rate_p90_ms": rate["p90_ms"],
            "rate_p99_ms": rate["p99_ms"],
            "added_p50_ms": rate["p50_ms"] - base["p50_ms"] if key != "A" else None,
            "added_p99_ms": rate["p99_ms"] - base["p99_ms"] if key != "A" else None,
            "hop_cpu_s_per_1000_req_rate": per_1000(rate, hop),
            "max_rps": top["achieved_rps"],
            "max_p50_ms": top["p50_ms"],
            "max_p99_ms": top["p99_ms"],
            "hop_cpu_s_per_1000_req_max": per_1000(top, hop),
            "hop_cores_max": cores(top, hop),
            "hop_rss_mb": {
                phase: sum(m[n]["rss"] for n in hop) / MB if hop else None
                for phase, m in figures["memory"].items()
            },
            "hop_peak_rss_mb": sum(figures["memory"]["after max"][n]["peak"] for n in hop) / MB
            if hop
            else None,
        }
        out[key] = entry
    for other in ("C", "D"):
        if other not in out:
            continue
        b, o = out["B"], out[other]
        out[f"loom_over_{other}"] = {
            "max_rps": ratio(b["max_rps"], o["max_rps"]),
            "added_p50": ratio(b["added_p50_ms"], o["added_p50_ms"]),
            "added_p99": ratio(b["added_p99_ms"], o["added_p99_ms"]),
            "cpu_per_request_rate": ratio(b["hop_cpu_s_per_1000_req_rate"], o["hop_cpu_s_per_1000_req_rate"]),
            "cpu_per_request_max": ratio(b["hop_cpu_s_per_1000_req_max"], o["hop_cpu_s_per_1000_req_max"]),
            "rss_after_max": ratio(b["hop_rss_mb"]["after max"], o["hop_rss_mb"]["after max"]),
        }
    return out


# ---------------------------------------------------------------------------------------------------
# the report


def fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return lines


CORE_ROWS: Final = (
    ("generator", "load generator"),
    ("ztunnel-n1", "ztunnel n1"),
    ("waypoint", "loom-waypoint"),
    ("haproxy", "haproxy"),
    ("haproxy-mesh", "haproxy (in the mesh)"),
    ("ztunnel-n3", "ztunnel n3"),
    ("ztunnel-n2", "ztunnel n2"),
    ("app", "app"),
    ("orchestrator", "controller + agents (this process)"),
)
Cell = Callable[[Mapping[str, Any], Mapping[str, Any]], str]  # (path figures, phase figures) -> text


def core_cell(name: str) -> Cell:
    return lambda path, phase: fmt(cores(phase, [name]) if name in phase["cpu_seconds"] else None, 2)


def phase_rows(figures: Mapping[str, Any], phase: str) -> list[list[str]]:
    paths = figures["paths"]
    heads = figures["summary"]

    def row(label: str, cell: Cell) -> list[str]:
        return [label, *(cell(p, p[phase]) for p in paths.values())]

    def added(which: str) -> Cell:
        return lambda path, f: fmt(heads[path_key(paths, path)][which], signed=True)

    rows = [
        row("  achieved req/s", lambda p, f: f"{f['achieved_rps']:.0f}"),
        row("  errors", lambda p, f: str(f["errors"])),
    ]
    if phase == "rate":
        rows.append(row("  requests that waited for a free connection", lambda p, f: str(f["queued"])))
    rows += [
        row("  latency p50 / p90 / p99, ms", lambda p, f: " / ".join(f"{f[q]:.3f}" for q in PERCENTILES)),
        row("  latency max, ms", lambda p, f: f"{f['max_ms']:.3f}"),
    ]
    if phase == "rate":
        rows += [
            row("  added p50 vs A, ms", added("added_p50_ms")),
            row("  added p99 vs A, ms", added("added_p99_ms")),
            row(
                "  generator's worst lag behind schedule, ms", lambda p, f: f"{f['max_schedule_lag_ms']:.2f}"
            ),
        ]
    rows += [
        row("  L7 hop CPU s / 1,000 req (= vCPU / 1,000 req/s)", lambda p, f: fmt(per_1000(f, p["hop"]))),
        row("    of which user space", lambda p, f: fmt(per_1000(f, p["hop"], "cpu_user_seconds"))),
        row(
            "  ztunnels n1 + n2 CPU s / 1,000 req",
            lambda p, f: fmt(per_1000(f, ["ztunnel-n1", "ztunnel-n2"])),
        ),
    ]
    rows += [row(f"  cores: {label}", core_cell(name)) for name, label in CORE_ROWS]
    rows.append(row("  cores: other load on the machine", lambda p, f: fmt(f["other_load_cores"], 2)))
    return rows


PERCENTILES: Final = ("p50_ms", "p90_ms", "p99_ms")


def path_key(paths: Mapping[str, Any], path: Mapping[str, Any]) -> str:
    return next(k for k, p in paths.items() if p is path)


def report(figures: Mapping[str, Any], command: str) -> str:
    paths = figures["paths"]
    args = figures["args"]
    heads = figures["summary"]
    keys = list(paths)
    blank = [""] * len(keys)
    generator = paths["A"]["max"]["generator"]
    rows: list[list[str]] = [
        [
            f"fixed rate {args['rate']:.0f} req/s, {args['connections']} connections, {args['seconds']:g} s",
            *blank,
        ],
        *phase_rows(figures, "rate"),
        [
            f"max throughput, {generator}, {args['max_connections']} connections, {args['max_seconds']} s",
            *blank,
        ],
        *phase_rows(figures, "max"),
        ["memory of the L7 hop (D: HAProxy + ztunnel n3)", *blank],
    ]
    for phase in figures["memory"]:
        rows.append([f"  RSS {phase}, MB", *(fmt(heads[k]["hop_rss_mb"][phase], 1) for k in keys)])
    rows.append(["  peak RSS (VmHWM), MB", *(fmt(heads[k]["hop_peak_rss_mb"], 1) for k in keys)])
    counter_names = list(paths["A"]["checks"]["rate"])
    rows.append([f"requests counted by {' / '.join(counter_names)}", *blank])
    for phase in PHASES:
        rows.append(
            [
                f"  during {phase}",
                *(" / ".join(f"{paths[k]['checks'][phase][n]:.0f}" for n in counter_names) for k in keys),
            ]
        )
    header = ["metric", *(f"{k}: {paths[k]['name']}" for k in keys)]
    lines = [
        f"waypoint benchmark: {figures['cpus']} CPUs; HTTP/1.1 keep-alive GET, {args['size']} B responses; "
        f"wall {figures['wall_seconds']:.0f} s",
        "",
        *table(header, rows),
    ]
    b = heads["B"]
    vcpu = b["hop_cpu_s_per_1000_req_rate"]
    vcpu_target = f"<= {TARGET_VCPU_PER_1000_RPS} vCPU per 1,000 req/s (at the fixed rate)"
    p99_target = f"added p99 <= {TARGET_ADDED_P99_MS:.0f} ms at {args['rate']:.0f} req/s"
    lines += [
        "",
        f"{'targets (issue 5)':<52}{'loom-waypoint':>13}  verdict",
        f"  {vcpu_target:<50}{fmt(vcpu):>13}  "
        f"{verdict(vcpu is not None and vcpu <= TARGET_VCPU_PER_1000_RPS)}",
        f"  {p99_target:<50}{fmt(b['added_p99_ms'], signed=True):>13}  "
        f"{verdict(b['added_p99_ms'] <= TARGET_ADDED_P99_MS)}",
    ]
    compared = [k for k in ("C", "D") if f"loom_over_{k}" in heads]
    if compared:
        lines += [
            "",
            f"{'loom-waypoint / HAProxy':<38}" + "".join(f"{'vs ' + k:>12}" for k in compared),
            *(
                f"  {label:<36}"
                + "".join(f"{fmt_ratio(heads[f'loom_over_{k}'][field_]):>12}" for k in compared)
                for field_, label in RATIO_ROWS
            ),
            "  ('-': the HAProxy path added nothing over A; C's plain relays can undercut A's HBONE)",
        ]
    else:
        lines += ["", "HAProxy is not installed (apt-get install -y haproxy): paths C and D were skipped"]
    if figures["profile"]:
        lines += ["", "profile of the waypoint in B's fixed-rate case (py-spy, a phase of its own):"]
        lines.append(figures["profile"])
    if figures["problems"]:
        lines += [
            "",
            "PROBLEMS (do not trust the figures they concern):",
            *(f"  {p}" for p in figures["problems"]),
        ]
    lines += ["", "command + figures (for the closing note):", *closing_block(figures, command)]
    return "\n".join(lines)


RATIO_ROWS: Final = (
    ("max_rps", "max throughput, req/s"),
    ("added_p50", "added latency p50"),
    ("added_p99", "added latency p99"),
    ("cpu_per_request_rate", "L7 hop CPU per request, fixed rate"),
    ("cpu_per_request_max", "L7 hop CPU per request, max"),
    ("rss_after_max", "L7 hop RSS after max"),
)


def closing_block(figures: Mapping[str, Any], command: str) -> list[str]:
    args = figures["args"]
    heads = figures["summary"]
    paths = figures["paths"]
    generator = paths["A"]["max"]["generator"]
    lines = [
        "```",
        f"$ {command}",
        f"{figures['cpus']} vCPU, paths side by side in one run; HTTP/1.1 keep-alive GET, {args['size']} B "
        "responses. A = client-ztunnel=HBONE=>ztunnel-server; B = + loom-waypoint between (HBONE both "
        "sides); C = HAProxy between, plain HTTP, no mTLS; D = HAProxy as a mesh workload behind its own "
        "ztunnel (mTLS both sides; hop = HAProxy + that ztunnel)",
        f"fixed {args['rate']:.0f} req/s x {args['seconds']:g} s, {args['connections']} conns: "
        "latency p50 / p99 ms, added vs A, L7 hop vCPU per 1,000 req/s",
    ]
    for key, h in heads.items():
        if key not in paths:
            continue
        text = f"  {key}  {h['rate_p50_ms']:.3f} / {h['rate_p99_ms']:.3f}"
        if key != "A":
            text += (
                f"  added {h['added_p50_ms']:+.3f} / {h['added_p99_ms']:+.3f}"
                f"  hop {fmt(h['hop_cpu_s_per_1000_req_rate'])} vCPU"
            )
        lines.append(text)
    lines.append(
        f"max throughput ({generator}, {args['max_connections']} conns x {args['max_seconds']} s): req/s, "
        "L7 hop cores, hop CPU s per 1,000 req, hop RSS after"
    )
    for key, h in heads.items():
        if key not in paths:
            continue
        text = f"  {key}  {h['max_rps']:.0f}"
        if key != "A":
            text += (
                f"  {fmt(h['hop_cores_max'], 2)} cores  {fmt(h['hop_cpu_s_per_1000_req_max'])}"
                f"  {fmt(h['hop_rss_mb']['after max'], 1)} MB"
            )
        lines.append(text)
    for key in ("C", "D"):
        r = heads.get(f"loom_over_{key}")
        if r is None:
            continue
        lines.append(
            f"loom/HAProxy ({key}): max req/s {fmt_ratio(r['max_rps'])}; "
            f"added p50 {fmt_ratio(r['added_p50'])} p99 {fmt_ratio(r['added_p99'])}; "
            f"CPU/req {fmt_ratio(r['cpu_per_request_rate'])} (fixed) "
            f"{fmt_ratio(r['cpu_per_request_max'])} (max); "
            f"RSS {fmt_ratio(r['rss_after_max'])}"
        )
    other = max(paths[k][p]["other_load_cores"] for k in paths for p in PHASES)
    lines.append(f"other load on the machine during the windows: up to {other:.2f} cores")
    if figures["problems"]:
        lines.append("PROBLEMS: " + "; ".join(figures["problems"]))
    lines.append("```")
    return lines


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


async def interruptible(work: Coroutine[Any, Any, T]) -> T:
    """`work`, cancelled on SIGINT or SIGTERM, so that the lab's teardown runs either way. (Handled here
    rather than left to asyncio.run, which does nothing for SIGTERM, and nothing for SIGINT either when
    the process was started with SIGINT ignored, as a background job of a script is.)"""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if os.geteuid() != 0:
        print("this benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 2
    if shutil.which("haproxy") is None:
        print(
            "haproxy is not installed (apt-get install -y haproxy): paths C and D are skipped",
            file=sys.stderr,
        )
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "python"
        if args.generator == "python":
            print(
                "wrk is not installed (apt-get install -y wrk): max throughput uses the Python generator, "
                "which takes much more CPU from the proxies on this machine",
                file=sys.stderr,
            )
    elif args.generator == "wrk" and shutil.which("wrk") is None:
        print("--generator wrk: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "bench.waypoint_pair", *(sys.argv[1:] if argv is None else argv)])
    try:
        figures = asyncio.run(interruptible(run(args)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the lab has been removed", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"the benchmark failed ({type(e).__name__}): {e}\nthe lab has been removed", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    print(report(figures, command))
    print("JSON " + json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
