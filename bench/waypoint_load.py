"""The in-pod halves of the waypoint benchmark: an HTTP/1.1 app server and two HTTP/1.1 load generators.

Run inside a pod's network namespace as its own process (so its CPU never mixes with the proxies'):

    ip netns exec <pod> python -m bench.waypoint_load serve --port 8080 --size 1024
    ip netns exec <pod> python -m bench.waypoint_load rate HOST PORT --rate R --connections C --seconds S
    ip netns exec <pod> python -m bench.waypoint_load closed HOST PORT --connections C --seconds S

* ``serve``: HTTP/1.1 keep-alive; every request (any method and path; a Content-Length body is read and
  dropped) gets ``200`` with a body of ``--size`` bytes and a Content-Length. Requests may be pipelined.
* ``rate``: open loop at a fixed rate. Requests leave at their scheduled instants (rate spread evenly)
  on whichever of the `C` keep-alive connections is idle; one request per connection at a time (no
  pipelining: proxies treat pipelining differently, keep-alive they all do). A request that finds no idle
  connection waits in a queue and its latency counts from its scheduled instant, so a slow path cannot
  slow the offered load down unnoticed (no coordinated omission); the number that had to wait is
  reported. Otherwise latency counts from the moment the request was written to the moment the last
  byte of its response was read; the worst lag of the sender behind its schedule is reported too, so a
  generator that could not keep up is visible.
* ``closed``: closed loop, maximum throughput: each of `C` connections sends its next request as soon as
  the previous response is complete. The fallback when ``wrk`` is not installed (the orchestrator
  prefers wrk: a C generator takes far less of the machine's CPU from the proxies).

Output: JSON lines on stdout: ``{"event": "measuring"}`` / ``{"event": "measured"}`` around the measured
window (the orchestrator snapshots the proxies' CPU time at those marks), then ``{"result": {...}}``.
Every loop is bounded in count and in time; a connection that dies ends the run with the requests it
left unanswered counted as errors.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, cast

import uvloop

from bench.ztunnel_load import emit, percentile

MAX_HEAD: Final = 64 << 10  # a response or request head larger than this is a broken peer
DRAIN_WAIT: Final = 10.0


def latency_summary(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {
        "p50_ms": percentile(samples, 0.50),
        "p90_ms": percentile(samples, 0.90),
        "p99_ms": percentile(samples, 0.99),
        "p999_ms": percentile(samples, 0.999),
        "max_ms": samples[-1] if samples else 0.0,
        "mean_ms": sum(samples) / len(samples) if samples else 0.0,
    }


def content_length(head: bytes) -> int:
    """The Content-Length of a message head (0 when absent); ValueError when it is not a number."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def is_chunked(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# server


class AppServer(asyncio.Protocol):
    """One keep-alive server connection (see the module docstring)."""

    def __init__(self, response: bytes, counter: list[int]) -> None:
        self.response = response
        self.counter = counter
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = 0  # bytes of the current request's body still to drop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out: list[bytes] = []
        close = False
        while True:
            if self.body_left:
                dropped = min(self.body_left, len(self.buffer))
                del self.buffer[:dropped]
                self.body_left -= dropped
                if self.body_left:
                    break
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    close = True
                break
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            try:
                self.body_left = content_length(head)
            except ValueError:
                close = True
                break
            if is_chunked(head):  # the benchmark never sends one; refuse rather than misparse
                out.append(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                close = True
                break
            self.counter[0] += 1
            out.append(self.response)
            if b"\r\nconnection: close" in head.lower():
                close = True
                break
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()

    def eof_received(self) -> bool:
        return False


async def serve(port: int, size: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {size}\r\n\r\n".encode()
        + b"x" * size
    )
    counter = [0]
    server = await loop.create_server(
        lambda: AppServer(response, counter), "0.0.0.0", port, backlog=4096, reuse_address=True
    )
    emit(event="listening", port=port)
    try:
        await asyncio.sleep(seconds)  # the orchestrator ends us long before this safety limit
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------
# client connection


class ResponseReader:
    """Incremental HTTP/1.1 response framing: Content-Length and chunked bodies (no trailers used)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.status = 0
        self.state = "head"  # head | body | chunk-size | chunk-data | chunk-end | trailers
        self.left = 0

    def feed(self, data: bytes) -> list[int]:
        """Consume `data`; the status codes of the responses it completed. ValueError on garbage."""
        self.buffer += data
        done: list[int] = []
        while True:
            if self.state == "head":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD:
                        raise ValueError("response head too large")
                    return done
                head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                parts = head.split(b" ", 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                    raise ValueError(f"not an HTTP/1.1 response: {head[:60]!r}")
                self.status = int(parts[1])
                if 100 <= self.status < 200:
                    continue  # interim response: the real one follows
                if is_chunked(head):
                    self.state = "chunk-size"
                else:
                    self.left = content_length(head)
                    self.state = "body"
            elif self.state == "body":
                taken = min(self.left, len(self.buffer))
                del self.buffer[:taken]
                self.left -= taken
                if self.left:
                    return done
                done.append(self.status)
                self.state = "head"
            elif self.state == "chunk-size":
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return done
                self.left = int(bytes(self.buffer[:end]).split(b";")[0].strip(), 16)
                del self.buffer[: end + 2]
                self.state = "chunk-data" if self.left else "trailers"
            elif self.state == "chunk-data":
                taken = min(self.left + 2, len(self.buffer))  # the data and its CRLF
                del self.buffer[:taken]
                self.left -= taken
                if self.left > -2:
                    return done
                self.state = "chunk-size"
            else:  # trailers: lines until an empty one
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return done
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                if not line:
                    done.append(self.status)
                    self.state = "head"


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; `on_response(conn, status)` per response."""

    def __init__(self, on_response: Callable[[ClientConnection, int], None]) -> None:
        self.on_response = on_response
        self.reader = ResponseReader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.busy = False
        self.started_ns = 0  # when the request in flight counts from
        self.recording = False  # whether the request in flight is in the measured window

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes, started_ns: int, recording: bool) -> None:
        assert self.transport is not None and not self.busy
        self.busy = True
        self.started_ns = started_ns
        self.recording = recording
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self.reader.feed(data)
        except ValueError:
            assert self.transport is not None
            self.transport.close()
            return
        for status in statuses:
            self.busy = False
            self.on_response(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


def connect_blocking(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def open_connections(
    host: str, port: int, count: int, on_response: Callable[[ClientConnection, int], None]
) -> list[ClientConnection]:
    loop = asyncio.get_running_loop()
    conns: list[ClientConnection] = []
    for _ in range(count):
        sock = await asyncio.wait_for(loop.run_in_executor(None, connect_blocking, host, port, 10.0), 10.0)
        sock.setblocking(False)
        _, conn = await loop.create_connection(lambda: ClientConnection(on_response), sock=sock)
        conns.append(conn)
    return conns


def request_bytes(host: str, port: int, path: str) -> bytes:
    authority = host if port == 80 else f"{host}:{port}"
    return f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: loom-bench\r\n\r\n".encode()


async def until(predicate: Callable[[], bool], within: float) -> bool:
    """Poll `predicate` every millisecond for at most `within` seconds; its last value."""
    deadline = time.perf_counter() + within
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


# ---------------------------------------------------------------------------------------------------
# open loop at a fixed rate


async def rate_run(
    host: str, port: int, path: str, rate: float, connections: int, seconds: float, warmup: float
) -> None:
    samples: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    idle: collections.deque[ClientConnection] = collections.deque()
    queued: collections.deque[tuple[int, bool]] = collections.deque()  # (scheduled ns, recording)
    request = request_bytes(host, port, path)
    waited = [0]

    def on_response(conn: ClientConnection, status: int) -> None:
        now = time.perf_counter_ns()
        if conn.recording:
            samples.append((now - conn.started_ns) / 1e6)
            statuses[status] += 1
        if queued:
            scheduled, recording = queued.popleft()
            conn.send(request, scheduled, recording)
        else:
            idle.append(conn)

    conns = await open_connections(host, port, connections, on_response)
    try:
        # Every connection proven end to end (handshakes, pools) before the clock starts.
        for conn in conns:
            conn.send(request, time.perf_counter_ns(), False)
        if not await until(lambda: len(idle) == len(conns), DRAIN_WAIT):
            raise ConnectionError("not every connection answered its first request")

        total_requests = int(rate * (warmup + seconds))
        warmup_requests = int(rate * warmup)
        interval = 1.0 / rate
        start = time.perf_counter() + 0.01
        window_start = start
        max_lag = 0.0
        recording = False
        for i in range(total_requests):
            if i == warmup_requests:
                await until(lambda: len(idle) == len(conns) and not queued, 5.0)
                emit(event="measuring")
                recording = True
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
            if idle:
                idle.popleft().send(request, time.perf_counter_ns(), recording)
            else:
                # No idle connection: the path is slower than the offered load; the wait counts.
                queued.append((int(due * 1e9), recording))
                if recording:
                    waited[0] += 1
        await until(
            lambda: (len(idle) == len(conns) and not queued) or any(c.lost.done() for c in conns), 10.0
        )
        window = time.perf_counter() - window_start
        emit(event="measured")
        measured = total_requests - warmup_requests
        ok = statuses.get(200, 0)
        emit(
            result={
                "requests": measured,
                "completed": len(samples),
                "ok": ok,
                "errors": measured - ok,
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "window_s": window,
                "achieved_rps": len(samples) / window if window > 0 else 0.0,
                "queued": waited[0],
                "max_schedule_lag_ms": max_lag * 1e3,
                **latency_summary(samples),
            }
        )
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()


# ---------------------------------------------------------------------------------------------------
# closed loop (the fallback for wrk)


async def closed_run(
    host: str, port: int, path: str, connections: int, seconds: float, warmup: float
) -> None:
    samples: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    request = request_bytes(host, port, path)
    phase = ["warmup"]  # warmup | measuring | stopping

    def on_response(conn: ClientConnection, status: int) -> None:
        now = time.perf_counter_ns()
        # Only round trips wholly inside the window: both of its edges cut alike.
        if conn.recording and phase[0] == "measuring":
            samples.append((now - conn.started_ns) / 1e6)
            statuses[status] += 1
        if phase[0] != "stopping":
            conn.send(request, time.perf_counter_ns(), phase[0] == "measuring")

    conns = await open_connections(host, port, connections, on_response)
    try:
        for conn in conns:
            conn.send(request, time.perf_counter_ns(), False)
        await asyncio.sleep(warmup)
        emit(event="measuring")
        phase[0] = "measuring"
        window_start = time.perf_counter()
        await asyncio.sleep(seconds)
        phase[0] = "stopping"
        window = time.perf_counter() - window_start
        await until(lambda: not any(c.busy for c in conns) or any(c.lost.done() for c in conns), DRAIN_WAIT)
        emit(event="measured")
        ok = statuses.get(200, 0)
        emit(
            result={
                "requests": len(samples),
                "completed": len(samples),
                "ok": ok,
                "errors": len(samples) - ok,
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "window_s": window,
                "achieved_rps": len(samples) / window if window > 0 else 0.0,
                **latency_summary(samples),
            }
        )
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.waypoint_load", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, required=True)
    p_serve.add_argument("--size", type=int, default=1024)
    p_serve.add_argument("--seconds", type=float, default=1800.0)
    for name in ("rate", "closed"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--path", default="/")
        p.add_argument("--connections", type=int, default=16)
        p.add_argument("--seconds", type=float, default=10.0)
        p.add_argument("--warmup", type=float, default=1.0)
        if name == "rate":
            p.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not 0 <= args.size <= 1 << 24:
            parser.error("--size must be in [0, 16MiB]")
        uvloop.run(serve(args.port, args.size, args.seconds))
        return 0
    if not 0 < args.connections <= 1024 or not 0 < args.seconds <= 300 or not 0 <= args.warmup <= 60:
        parser.error("--connections (0, 1024], --seconds (0, 300], --warmup [0, 60]")
    if args.command == "rate":
        if not 0 < args.rate <= 100_000:
            parser.error("--rate must be in (0, 100000]")
        uvloop.run(
            rate_run(args.host, args.port, args.path, args.rate, args.connections, args.seconds, args.warmup)
        )
    else:
        uvloop.run(closed_run(args.host, args.port, args.path, args.connections, args.seconds, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
