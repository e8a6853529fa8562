"""The in-pod halves of the ztunnel benchmark: the app server and the load generators.

Run inside a pod's network namespace as its own process (so its CPU never mixes with the proxies'):

    ip netns exec <pod> python -m bench.ztunnel_load serve --port 8080
    ip netns exec <pod> python -m bench.ztunnel_load throughput HOST PORT --bytes N --seconds S
    ip netns exec <pod> python -m bench.ztunnel_load latency HOST PORT --rate R --connections C ...
    ip netns exec <pod> python -m bench.ztunnel_load hold HOST PORT --count N

Wire protocol (one byte chosen by the client opens every connection):

* ``E`` echo: everything after it is echoed back as it arrives. The latency client pipelines fixed-size
  requests on it; every request's response is the next `size` bytes.
* ``S`` + 8-byte big-endian length N: sink. The server reads N bytes and answers with the 8-byte count
  it received. A header instead of a half-close keeps the protocol identical through every proxy (TLS
  tunnels differ in how they carry a half-close).

Output: each client prints JSON lines on stdout: ``{"event": ...}`` marks (the orchestrator snapshots
the proxies' CPU time when the measured window opens and closes) and finally ``{"result": {...}}``.

Latency is measured open loop: requests leave at their scheduled instants (rate over the connections,
round robin) whether or not earlier responses have arrived, so a slow proxy cannot slow the offered
load down (no coordinated omission). Each round trip is timed from the moment its request was written
to the moment its full response was read; the worst lag of the sender behind its schedule is reported
so a generator that could not keep up is visible. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, Final, cast

import uvloop

ECHO: Final = b"E"
SINK: Final = b"S"
SINK_HEADER: Final = struct.Struct("!Q")
CHUNK: Final = 1 << 20  # the throughput client's write size
HIGH_WATER: Final = 4 << 20  # an echo connection stops reading while this much is unsent


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(fraction * len(sorted_values) + 0.999999)))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------------------------------------
# server


class AppProtocol(asyncio.Protocol):
    """One server connection: the first byte picks echo or sink (see the module docstring)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.header = b""
        self.expected = -1
        self.received = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.mode:
            self.mode, data = data[:1], data[1:]
            if self.mode not in (ECHO, SINK):
                self.transport.close()
                return
        if self.mode == ECHO:
            if data:
                self.transport.write(data)
            return
        if self.expected < 0:
            self.header += data
            if len(self.header) < SINK_HEADER.size:
                return
            (self.expected,) = SINK_HEADER.unpack(self.header[: SINK_HEADER.size])
            data = self.header[SINK_HEADER.size :]
        self.received += len(data)
        if self.received >= self.expected:
            self.transport.write(SINK_HEADER.pack(self.received))
            self.expected = 1 << 62  # answered; anything more is ignored

    # Echo backpressure: a peer that does not read its echoes stops being read from.
    def pause_writing(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(port: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(AppProtocol, "0.0.0.0", port, backlog=4096, reuse_address=True)
    emit(event="listening", port=port)
    try:
        await asyncio.sleep(seconds)  # the orchestrator ends us long before this safety limit
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------
# clients


def connect_blocking(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def throughput(host: str, port: int, total: int, seconds: float) -> None:
    """One connection pushes `total` bytes to the sink (or what fits in `seconds`); blocking I/O, since
    a single stream is fastest without an event loop in between."""
    payload = memoryview(bytes(CHUNK))
    sock = connect_blocking(host, port, timeout=seconds)
    try:
        sock.settimeout(seconds)
        emit(event="measuring")
        start = time.perf_counter()
        deadline = start + seconds
        sock.sendall(SINK + SINK_HEADER.pack(total))
        sent = 0
        truncated = False
        while sent < total:
            if time.perf_counter() > deadline:
                truncated = True
                break
            n = min(CHUNK, total - sent)
            sock.sendall(payload[:n])
            sent += n
        acknowledged = 0
        if not truncated:
            answer = b""
            while len(answer) < SINK_HEADER.size and time.perf_counter() < deadline + 5.0:
                part = sock.recv(SINK_HEADER.size - len(answer))
                if not part:
                    break
                answer += part
            if len(answer) == SINK_HEADER.size:
                (acknowledged,) = SINK_HEADER.unpack(answer)
        elapsed = time.perf_counter() - start
        emit(event="measured")
    finally:
        sock.close()
    emit(
        result={
            "bytes": acknowledged if acknowledged else sent,
            "acknowledged": acknowledged == total,
            "truncated": truncated,
            "seconds": elapsed,
            "mb_per_s": (acknowledged if acknowledged else sent) / elapsed / 1e6,
        }
    )


class LatencyConnection(asyncio.Protocol):
    """A pipelined echo connection: FIFO of write times; every `size` bytes read complete the oldest."""

    def __init__(self, size: int, samples: list[float], recording: list[bool]) -> None:
        self.size = size
        self.samples = samples
        self.recording = recording  # shared one-element flag: record round trips of the window only
        self.sent: collections.deque[tuple[int, bool]] = collections.deque()
        self.buffered = 0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.completed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.sent.append((time.perf_counter_ns(), self.recording[0]))
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.buffered += len(data)
        while self.buffered >= self.size and self.sent:
            self.buffered -= self.size
            started, record = self.sent.popleft()
            self.completed += 1
            if record:
                self.samples.append((now - started) / 1e6)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def latency(
    host: str, port: int, rate: float, connections: int, size: int, seconds: float, warmup: float
) -> None:
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    recording = [False]
    conns: list[LatencyConnection] = []
    try:
        for _ in range(connections):
            sock = await asyncio.wait_for(
                loop.run_in_executor(None, connect_blocking, host, port, 10.0), 10.0
            )
            sock.setblocking(False)
            _, conn = await loop.create_connection(
                lambda: LatencyConnection(size, samples, recording), sock=sock
            )
            conns.append(conn)
        request = bytes(size)
        for conn in conns:  # the path is fully established (handshakes done) before the clock starts
            assert conn.transport is not None
            conn.transport.write(ECHO)
            conn.send(request)
        await wait_drained(conns, 10.0)

        total_requests = int(rate * (warmup + seconds))
        warmup_requests = int(rate * warmup)
        interval = 1.0 / rate
        start = time.perf_counter() + 0.01
        max_lag = 0.0
        window_start = start
        for i in range(total_requests):
            if i == warmup_requests:
                await wait_drained(conns, 5.0)
                emit(event="measuring")
                recording[0] = True
                window_start = time.perf_counter()
                start = window_start - i * interval  # keep the schedule, re-anchored after the drain
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            if any(c.lost.done() for c in conns):
                break
            conns[i % connections].send(request)
        await wait_drained(conns, 10.0)
        window = time.perf_counter() - window_start
        emit(event="measured")
        measured = total_requests - warmup_requests
        samples.sort()
        emit(
            result={
                "requests": measured,
                "completed": len(samples),
                "errors": measured - len(samples),
                "window_s": window,
                "achieved_rps": len(samples) / window if window > 0 else 0.0,
                "p50_ms": percentile(samples, 0.50),
                "p90_ms": percentile(samples, 0.90),
                "p99_ms": percentile(samples, 0.99),
                "p999_ms": percentile(samples, 0.999),
                "max_ms": samples[-1] if samples else 0.0,
                "max_schedule_lag_ms": max_lag * 1e3,
            }
        )
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()


async def wait_drained(conns: Sequence[LatencyConnection], within: float) -> None:
    """Until every request sent so far has its response (bounded)."""
    deadline = time.perf_counter() + within
    while any(c.sent for c in conns) and time.perf_counter() < deadline:
        if any(c.lost.done() for c in conns):
            return
        await asyncio.sleep(0.001)


async def hold(host: str, port: int, count: int, parallel: int, seconds: float) -> None:
    """Open `count` echo connections (each proven end to end by a one-byte echo), report, then hold them
    until stdin says so (or `seconds` pass)."""
    loop = asyncio.get_running_loop()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(15.0):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(ECHO + b"x")
                    await writer.drain()
                    if await reader.readexactly(1) != b"x":
                        raise ConnectionError("wrong echo")
                    opened.append((reader, writer))
            except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as e:
                failures.append(type(e).__name__ + ": " + str(e))

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    emit(
        event="holding",
        opened=len(opened),
        failed=len(failures),
        first_failures=failures[:3],
        open_seconds=time.perf_counter() - start,
    )
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        async with asyncio.timeout(seconds):
            await stdin.readline()
    except TimeoutError:
        pass
    alive = 0
    for reader, writer in opened:
        if not reader.at_eof() and not writer.is_closing():
            alive += 1
        writer.close()
    emit(result={"opened": len(opened), "failed": len(failures), "alive_at_release": alive})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ztunnel_load", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, required=True)
    p_serve.add_argument("--seconds", type=float, default=900.0)
    for name in ("throughput", "latency", "hold"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--seconds", type=float, default=10.0)
        if name == "throughput":
            p.add_argument("--bytes", type=int, default=256 << 20)
        elif name == "latency":
            p.add_argument("--rate", type=float, default=1000.0)
            p.add_argument("--connections", type=int, default=4)
            p.add_argument("--size", type=int, default=1024)
            p.add_argument("--warmup", type=float, default=1.0)
        else:
            p.add_argument("--count", type=int, default=1000)
            p.add_argument("--parallel", type=int, default=50)
    args = parser.parse_args(argv)
    if args.command == "serve":
        uvloop.run(serve(args.port, args.seconds))
    elif args.command == "throughput":
        throughput(args.host, args.port, args.bytes, args.seconds)
    elif args.command == "latency":
        uvloop.run(
            latency(args.host, args.port, args.rate, args.connections, args.size, args.seconds, args.warmup)
        )
    else:
        uvloop.run(hold(args.host, args.port, args.count, args.parallel, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
