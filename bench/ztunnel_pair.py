"""loom-ztunnel pair vs direct TCP vs a stunnel4 pair, side by side in one run on one namespace lab.

    sudo .venv/bin/python -m bench.ztunnel_pair [--seconds 10 --rate 1000 --connections 4 --bytes 256MiB ...]

The lab (`bench.netlab`): nodes n1 and n2; client pod on n1, server pod on n2, three ways between them:

* direct   plain pods, plain TCP (the floor: kernel + the Python load generator and app);
* stunnel  plain pods, a stunnel4 client in the client pod (127.0.0.1) -> TLS 1.3 mutual auth -> a
           stunnel4 server in the server pod -> the app over loopback;
* loom     enrolled pods: the app's connection is captured in the client pod -> ztunnel (n1) -> HBONE
           (HTTP/2 CONNECT over TLS 1.3 mTLS) -> ztunnel (n2) -> the app.

Measured per path (issue targets in brackets):

a. single-stream throughput: one connection pushes --bytes to a sink (bounded by --throughput-seconds);
   --repeats rounds, interleaved across the paths, median reported            [loom >= 1.0x stunnel]
b. latency at --rate requests/s of --size bytes each way over --connections persistent connections,
   open loop, for --seconds after --warmup; p50/p90/p99 and the latency added over direct
                                                                                 [added p99 <= 1 ms]
c. CPU seconds of the two proxies (utime+stime from /proc) during the measured window of (b), per
   1,000 requests and as vCPU                                   [<= 0.1 vCPU per 1,000 rps per proxy]
d. RSS (VmRSS) of the client-side proxy idle (right after start-up) and holding --hold connections
   open through it                                                               [<= 40 MB idle]

Every load generator and the app run as their own processes inside the pods (`bench.ztunnel_load`);
the proxies are separate processes too, so the CPU and memory readings are theirs alone. Before the
figures are trusted the run checks that the loom path really went through the mesh (the ztunnels'
connection counters moved) and that the other two did not touch it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.netlab import WAIT, BenchLab, Child, Memory, bench_lab, in_pod, python_module
from bench.stacks import ZTUNNEL_COMPONENTS, summarize
from loom.testing.netns import Pod
from tests.namespaced.ztunnel_harness import APP_PORT

MB: Final = 1e6
OPENED: Final = "istio_tcp_connections_opened_total"
TARGET_THROUGHPUT_VS_STUNNEL: Final = 1.0
TARGET_ADDED_P99_MS: Final = 1.0
TARGET_VCPU_PER_1000_RPS: Final = 0.1
TARGET_IDLE_RSS_MB: Final = 40.0


@dataclass
class Route:
    """One way from the client pod to the app, and the proxy processes on it (client side first)."""

    name: str
    pod: Pod
    host: str
    port: int
    proxies: list[Child]
    throughput_mb_s: list[float] = field(default_factory=list)
    throughput_core_share: list[list[float]] = field(default_factory=list)  # per run, per proxy
    throughput_notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: list[float] = field(default_factory=list)  # per proxy, during the latency window
    cpu_user: list[float] = field(default_factory=list)  # the user-space part of cpu_seconds
    memory_idle: list[Memory] = field(default_factory=list)  # per proxy, right after start-up
    memory_held: list[Memory] = field(default_factory=list)  # per proxy, holding --hold connections
    held: dict[str, Any] = field(default_factory=dict)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(|k|kib|m|mib|g|gib)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 262144, 256MiB or 1GiB")
    unit = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    return int(match.group(1)) * unit[match.group(2)]


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ztunnel_pair", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="latency window per path (s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded load before each window (s)")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second, all connections")
    parser.add_argument("--connections", type=int, default=4, help="persistent connections for latency")
    parser.add_argument("--size", type=parse_size, default=1024, help="request and response size")
    parser.add_argument("--bytes", type=parse_size, default=256 << 20, help="bytes per throughput run")
    parser.add_argument("--throughput-seconds", type=float, default=20.0, help="cap per throughput run")
    parser.add_argument("--repeats", type=int, default=3, help="throughput rounds (median reported)")
    parser.add_argument("--hold", type=int, default=1000, help="connections held open for the RSS reading")
    parser.add_argument("--log-level", default="info", help="the ztunnels' LOG_LEVEL (access logs at info)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--profile",
        help="after the measurements, rerun the loom latency and throughput cases under py-spy (installed "
        "in the venv) and write its collapsed stacks and a top-functions summary to this directory",
    )
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 120 or not 0 <= args.warmup <= 30:
        parser.error("--seconds must be in (0, 120] and --warmup in [0, 30]")
    if not 0 < args.rate <= 20000 or not 0 < args.connections <= 256 or not 0 < args.size <= 1 << 20:
        parser.error("--rate (0, 20000], --connections (0, 256], --size (0, 1MiB]")
    if not 0 < args.bytes <= 8 << 30 or not 0 < args.throughput_seconds <= 60 or not 0 < args.repeats <= 10:
        parser.error("--bytes (0, 8GiB], --throughput-seconds (0, 60], --repeats (0, 10]")
    if not 0 <= args.hold <= 5000:
        parser.error("--hold must be in [0, 5000]")
    return args


# ---------------------------------------------------------------------------------------------------
# running the load generators


CpuTimes = list[tuple[float, float]]  # per proxy: (user, system) seconds


async def run_client(path: Route, mode: str, *args: str, within: float) -> tuple[dict[str, Any], CpuTimes]:
    """Run one `bench.ztunnel_load` client in the path's client pod; its result, and each proxy's CPU
    time (user, system) between the client's "measuring" and "measured" marks (empty without marks)."""
    child = await Child.start(
        f"load-{mode}-{path.name}",
        in_pod(path.pod, *python_module("bench.ztunnel_load", mode, path.host, str(path.port), *args)),
        pipe_stdout=True,
    )
    try:
        before: CpuTimes = []
        cpu: CpuTimes = []
        deadline = time.monotonic() + within
        while True:
            event = await child.read_event(max(0.1, deadline - time.monotonic()))
            if event.get("event") == "measuring":
                before = [p.cpu_times() for p in path.proxies]
            elif event.get("event") == "measured":
                after = [p.cpu_times() for p in path.proxies]
                cpu = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
            elif "result" in event:
                await asyncio.wait_for(child.process.wait(), WAIT)
                return event["result"], cpu
    finally:
        await child.stop()


async def measure_throughput(path: Route, args: argparse.Namespace) -> None:
    result, cpu = await run_client(
        path,
        "throughput",
        "--bytes",
        str(args.bytes),
        "--seconds",
        str(args.throughput_seconds),
        within=args.throughput_seconds + 30,
    )
    path.throughput_mb_s.append(result["mb_per_s"])
    # The share of one core each proxy used while the bytes flowed: 1.0 means that proxy was the limit.
    path.throughput_core_share.append([(user + system) / result["seconds"] for user, system in cpu])
    if not result["acknowledged"]:
        path.throughput_notes.append(f"incomplete: {result['bytes']} bytes (truncated={result['truncated']})")


async def measure_latency(path: Route, args: argparse.Namespace) -> None:
    result, cpu = await run_client(
        path,
        "latency",
        "--rate",
        str(args.rate),
        "--connections",
        str(args.connections),
        "--size",
        str(args.size),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        within=args.seconds + args.warmup + 60,
    )
    path.latency = result
    path.cpu_seconds = [user + system for user, system in cpu]
    path.cpu_user = [user for user, _ in cpu]


async def measure_held_rss(path: Route, args: argparse.Namespace) -> None:
    """Open --hold connections through the path, read the proxies' RSS while they are open, release."""
    child = await Child.start(
        f"load-hold-{path.name}",
        in_pod(
            path.pod,
            *python_module(
                "bench.ztunnel_load",
                "hold",
                path.host,
                str(path.port),
                "--count",
                str(args.hold),
                "--seconds",
                "60",
            ),
        ),
        pipe_stdout=True,
        pipe_stdin=True,
    )
    try:
        holding = await child.read_event(90.0)
        if holding.get("event") != "holding":
            raise RuntimeError(f"hold client on {path.name}: {holding}")
        await asyncio.sleep(0.5)  # let the proxies settle (buffers allocated, pools filled)
        path.memory_held = [p.memory() for p in path.proxies]
        assert child.process.stdin is not None
        child.process.stdin.write(b"release\n")
        await child.process.stdin.drain()
        result = await child.read_event(30.0)
        path.held = {**holding, **result.get("result", {})}
    finally:
        await child.stop()


async def profile_loom(loom: Route, args: argparse.Namespace) -> dict[str, str]:
    """The loom latency and throughput cases again, each ztunnel sampled by py-spy (a separate phase, so
    the sampler's pauses never touch the reported figures); a text summary per (phase, ztunnel)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = await asyncio.to_thread(make_directory, Path(args.profile))
    summaries: dict[str, str] = {}
    for phase in ("latency", "throughput"):
        scratch = Route(loom.name, loom.pod, loom.host, loom.port, loom.proxies)  # figures not kept
        samplers: list[tuple[str, Child, Path]] = []
        for node, proxy in zip(("n1", "n2"), loom.proxies, strict=True):
            target = out / f"ztunnel-{node}-{phase}.txt"
            sampler = await Child.start(
                f"py-spy-{node}",
                [
                    py_spy,
                    "record",
                    "-p",
                    str(proxy.pid),
                    "-r",
                    "250",
                    # C frames too, so OpenSSL, uvloop and the syscalls show up under their own names.
                    # (Not --gil: the ssl module encrypts with the GIL released.) py-spy's idle
                    # detection does not recognise uvloop's epoll wait; `bench.stacks.summarize` drops it.
                    "--native",
                    "--nolineno",
                    "-f",
                    "raw",
                    "-o",
                    str(target),
                ],
                log=out / f"py-spy-{node}-{phase}.log",
            )
            samplers.append((node, sampler, target))
        await asyncio.sleep(0.5)  # py-spy attaches
        try:
            if phase == "latency":
                await measure_latency(scratch, args)
            else:
                await measure_throughput(scratch, args)
        finally:
            for _, sampler, _ in samplers:
                if sampler.alive():
                    sampler.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                    try:
                        await asyncio.wait_for(sampler.process.wait(), 15.0)
                    except TimeoutError:
                        await sampler.stop()
        for node, _, target in samplers:
            if target.exists():
                summaries[f"{phase} ztunnel-{node}"] = summarize(
                    target.read_text(), ZTUNNEL_COMPONENTS, "(loom/hbone/"
                )
                (out / f"ztunnel-{node}-{phase}-top.txt").write_text(summaries[f"{phase} ztunnel-{node}"])
    return summaries


def make_directory(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------
# the run


async def mesh_opened(bench: BenchLab) -> float:
    return await bench.metric_sum(
        "n1", OPENED, {"reporter": "source", "connection_security_policy": "mutual_tls"}
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "bz" + secrets.token_hex(3)
    started = time.monotonic()
    async with bench_lab(prefix, log_level=args.log_level) as bench:
        pods = bench.pods
        direct = Route("direct", pods["pclient"], pods["pserver"].address, APP_PORT, [])
        stunnel_host, stunnel_port = bench.stunnel_target
        stunnel = Route(
            "stunnel",
            pods["pclient"],
            stunnel_host,
            stunnel_port,
            [bench.stunnels["client"], bench.stunnels["server"]],
        )
        loom = Route(
            "loom",
            pods["client"],
            pods["server"].address,
            APP_PORT,
            [bench.ztunnels["n1"], bench.ztunnels["n2"]],
        )
        paths = [direct, stunnel, loom]
        for path in paths:
            path.memory_idle = [p.memory() for p in path.proxies]
        checks: dict[str, Any] = {}
        print(f"lab {prefix} up in {time.monotonic() - started:.1f} s; measuring", file=sys.stderr)

        # (a) throughput, interleaved so drift on a shared machine hits every path alike.
        for round_ in range(args.repeats):
            for path in paths:
                opened_before = await mesh_opened(bench)
                await measure_throughput(path, args)
                moved = await mesh_opened(bench) - opened_before
                checks.setdefault(f"mesh connections during {path.name} throughput", []).append(moved)
            print(f"throughput round {round_ + 1}/{args.repeats} done", file=sys.stderr)

        # (b, c) latency and proxy CPU.
        for path in paths:
            await measure_latency(path, args)
            print(f"latency {path.name} done", file=sys.stderr)

        # (d) connections held open.
        if args.hold:
            for path in (stunnel, loom):
                opened_before = await mesh_opened(bench)
                await measure_held_rss(path, args)
                checks[f"mesh connections during {path.name} hold"] = await mesh_opened(bench) - opened_before
                print(f"hold {path.name} done", file=sys.stderr)
        profiles: dict[str, str] = {}
        if args.profile:
            profiles = await profile_loom(loom, args)
        checks["ztunnel processes"] = {n: c.comm() for n, c in bench.ztunnels.items()}
        checks["stunnel processes"] = {n: c.comm() for n, c in bench.stunnels.items()}
        for child in [*bench.ztunnels.values(), *bench.stunnels.values()]:
            if not child.alive():
                raise RuntimeError(f"{child.name} died during the run:\n{child.log_tail()}")
        memory_after = {n: c.memory() for n, c in bench.ztunnels.items()}
    return {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "cpus": os.cpu_count(),
        "wall_seconds": time.monotonic() - started,
        "checks": checks,
        "profiles": profiles,
        "ztunnel_memory_after_run": {n: asdict(m) for n, m in memory_after.items()},
        "paths": {
            p.name: {
                "throughput_mb_s": p.throughput_mb_s,
                "throughput_core_share": p.throughput_core_share,
                "throughput_notes": p.throughput_notes,
                "latency": p.latency,
                "proxy_cpu_seconds": p.cpu_seconds,
                "proxy_cpu_user_seconds": p.cpu_user,
                "memory_idle": [asdict(m) for m in p.memory_idle],
                "memory_held": [asdict(m) for m in p.memory_held],
                "held": p.held,
            }
            for p in paths
        },
    }


# ---------------------------------------------------------------------------------------------------
# the report

NAMES: Final = ("direct", "stunnel", "loom")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def megabytes(memory: list[dict[str, int]], index: int) -> str:
    """ "VmRSS (anon)" in MB of proxy `index`, or "-" for a path without proxies."""
    if len(memory) <= index:
        return "-"
    return f"{memory[index]['rss'] / MB:.1f} ({memory[index]['anon'] / MB:.1f})"


def table(rows: list[tuple[str, ...]]) -> list[str]:
    header = ("metric", *NAMES)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def report(figures: dict[str, Any]) -> str:
    paths = figures["paths"]
    args = figures["args"]
    lat = {n: paths[n]["latency"] for n in NAMES}
    tput = {n: statistics.median(paths[n]["throughput_mb_s"]) for n in NAMES}

    def per_1000_requests(n: str, key: str = "proxy_cpu_seconds") -> list[float]:
        # CPU seconds per 1,000 requests is also vCPU per 1,000 requests/s (both are CPU-s / 1,000 req).
        completed = lat[n]["completed"]
        return [c / completed * 1000 for c in paths[n][key]] if completed else []

    def core_share(n: str) -> str:
        shares = paths[n]["throughput_core_share"]
        if not shares or not shares[0]:
            return "-"
        return " / ".join(f"{statistics.median(run[i] for run in shares):.2f}" for i in range(len(shares[0])))

    def split(values: list[float], digits: int) -> str:
        if not values:
            return "-"
        return f"{sum(values):.{digits}f} ({' + '.join(f'{v:.{digits}f}' for v in values)})"

    rows: list[tuple[str, ...]] = [
        ("single-stream throughput, MB/s (median)", *(f"{tput[n]:.0f}" for n in NAMES)),
        ("  every run, MB/s", *(" ".join(f"{v:.0f}" for v in paths[n]["throughput_mb_s"]) for n in NAMES)),
        ("  proxy CPU while streaming, cores (cl/srv)", *(core_share(n) for n in NAMES)),
    ]
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max")):
        rows.append((f"latency {label}, ms", *(f"{lat[n][key]:.3f}" for n in NAMES)))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        rows.append(
            (
                f"added latency {label} vs direct, ms",
                "-",
                *(f"{lat[n][key] - lat['direct'][key]:+.3f}" for n in NAMES[1:]),
            )
        )
    rows += [
        ("achieved req/s (errors)", *(f"{lat[n]['achieved_rps']:.0f} ({lat[n]['errors']})" for n in NAMES)),
        ("load generator max schedule lag, ms", *(f"{lat[n]['max_schedule_lag_ms']:.2f}" for n in NAMES)),
        (
            "proxy CPU s / 1,000 req = vCPU / 1,000 rps",
            "-",
            *(split(per_1000_requests(n), 3) for n in NAMES[1:]),
        ),
        (
            "  of which user space (not kernel)",
            "-",
            *(split(per_1000_requests(n, "proxy_cpu_user_seconds"), 3) for n in NAMES[1:]),
        ),
        ("client proxy RSS idle, MB (anon)", *(megabytes(paths[n]["memory_idle"], 0) for n in NAMES)),
        ("server proxy RSS idle, MB (anon)", *(megabytes(paths[n]["memory_idle"], 1) for n in NAMES)),
    ]
    if args["hold"]:
        rows += [
            (
                f"client proxy RSS, {args['hold']} conns, MB (anon)",
                *(megabytes(paths[n]["memory_held"], 0) for n in NAMES),
            ),
            (
                f"server proxy RSS, {args['hold']} conns, MB (anon)",
                *(megabytes(paths[n]["memory_held"], 1) for n in NAMES),
            ),
            (
                "  connections opened / failed",
                "-",
                *(
                    f"{paths[n]['held'].get('opened', 0)} / {paths[n]['held'].get('failed', 0)}"
                    for n in NAMES[1:]
                ),
            ),
        ]

    lines = [
        f"ztunnel pair benchmark: {figures['cpus']} CPUs; latency: {args['rate']:.0f} req/s x "
        f"{args['size']} B "
        f"each way over {args['connections']} connections for {args['seconds']:g} s (+{args['warmup']:g} s "
        f"warm-up); throughput: {args['bytes'] >> 20} MiB x {args['repeats']}; "
        f"wall {figures['wall_seconds']:.0f} s",
        "",
        *table(rows),
    ]

    loom_vcpu = max(per_1000_requests("loom"), default=float("inf"))
    added_p99 = lat["loom"]["p99_ms"] - lat["direct"]["p99_ms"]
    idle = paths["loom"]["memory_idle"][0]["rss"] / MB
    stunnel_idle = paths["stunnel"]["memory_idle"][0]["rss"]
    lines += [
        "",
        "ratios                    loom/stunnel  loom/direct",
        f"  throughput              {ratio(tput['loom'], tput['stunnel']):>12}  "
        f"{ratio(tput['loom'], tput['direct']):>11}",
    ]
    for key, label in (("p50_ms", "latency p50"), ("p99_ms", "latency p99")):
        lines.append(
            f"  {label:<22}  {ratio(lat['loom'][key], lat['stunnel'][key]):>12}  "
            f"{ratio(lat['loom'][key], lat['direct'][key]):>11}"
        )
    lines += [
        f"  proxy CPU per request   "
        f"{ratio(sum(per_1000_requests('loom')), sum(per_1000_requests('stunnel'))):>12}  "
        f"{'-':>11}",
        f"  client proxy idle RSS   "
        f"{ratio(paths['loom']['memory_idle'][0]['rss'], stunnel_idle):>12}  {'-':>11}",
        "",
        "targets (issue 3)                          loom    verdict",
        f"  throughput >= {TARGET_THROUGHPUT_VS_STUNNEL:.1f}x stunnel            "
        f"{ratio(tput['loom'], tput['stunnel']):>8}    {verdict(tput['loom'] >= tput['stunnel'])}",
        f"  added p99 <= {TARGET_ADDED_P99_MS:.1f} ms                    {added_p99:>+8.3f}    "
        f"{verdict(added_p99 <= TARGET_ADDED_P99_MS)}",
        f"  <= {TARGET_VCPU_PER_1000_RPS} vCPU per 1,000 rps (worst proxy) {loom_vcpu:>8.3f}    "
        f"{verdict(loom_vcpu <= TARGET_VCPU_PER_1000_RPS)}",
        f"  idle RSS <= {TARGET_IDLE_RSS_MB:.0f} MB (client ztunnel)     {idle:>8.1f}    "
        f"{verdict(idle <= TARGET_IDLE_RSS_MB)}",
        "",
        "path checks (outbound mTLS connections counted by ztunnel n1 while each path ran):",
        *(f"  {k}: {v}" for k, v in figures["checks"].items()),
    ]
    notes = [f"  {n}: {note}" for n in NAMES for note in paths[n]["throughput_notes"]]
    if notes:
        lines += ["throughput notes:", *notes]
    for name, summary in figures["profiles"].items():
        lines += ["", f"profile (py-spy, a separate phase after the measurements): {name}", summary]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if os.geteuid() != 0:
        print("this benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 2
    try:
        figures = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted; the lab has been removed", file=sys.stderr)
        return 130
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    print(report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
