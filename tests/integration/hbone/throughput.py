"""Single-stream HBONE throughput on loopback (a measurement, not a test).

    .venv/bin/python -m tests.integration.hbone.throughput [--mib 512] [--loop uvloop|asyncio]

Three processes, like a node pair: an application process, the client side (HBONE pool, the app's
connection joined to a tunnel with pump_socket) and the server side (HBONE server and a sink/source
upstream). Reports MB/s for upload (app -> upstream) and download (upstream -> app), and plain TCP
between the same processes for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import multiprocessing.connection
import os
import socket
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvloop

from loom.hbone import ConnectionPool, Decision, HboneServer, TunnelRequest, pump_socket
from loom.identity import WorkloadCertificate
from tests.integration.hbone.hbone_harness import Pki, listening_socket, tcp_connector

CHUNK = 1 << 20


def run(main: Coroutine[Any, Any, None], loop_kind: str, profile: str | None = None) -> None:
    """Run `main` on the chosen loop, under cProfile (stats written to `profile`) when asked."""
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    try:
        if loop_kind == "uvloop":
            uvloop.run(main)
        else:
            asyncio.run(main)
    finally:
        if profiler is not None and profile:
            profiler.disable()
            profiler.dump_stats(profile)


async def _sink_or_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream app: the first byte says 'u' (sink: count until EOF) or 'd' (source: send N bytes)."""
    mode = await reader.readexactly(1)
    if mode == b"u":
        total = 0
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(total.to_bytes(8, "big"))
    else:
        size = int.from_bytes(await reader.readexactly(8), "big")
        block = memoryview(bytes(CHUNK))
        sent = 0
        while sent < size:
            piece = block[: min(CHUNK, size - sent)]
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
    await writer.drain()
    writer.close()


def server_process(
    cert: WorkloadCertificate,
    direct: bool,
    pipe: multiprocessing.connection.Connection,
    loop_kind: str,
    profile: str | None,
) -> None:
    async def main() -> None:
        upstream = await asyncio.start_server(_sink_or_source, "127.0.0.1", 0)
        upstream_address = upstream.sockets[0].getsockname()[:2]
        if direct:
            pipe.send(upstream_address)
        else:

            async def handler(request: TunnelRequest) -> Decision:
                return Decision(200, tcp_connector(upstream_address))

            server = HboneServer(lambda: cert, handler)
            sock = listening_socket("127.0.0.2")
            server.serve(sock)
            pipe.send(sock.getsockname()[:2])
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told to stop

    run(main(), loop_kind, profile)


def app_process(
    address: tuple[str, int], mode: str, size: int, pipe: multiprocessing.connection.Connection
) -> None:
    """The application: blocking sockets, so it costs the measured processes nothing."""
    sock = socket.create_connection(address)
    start = time.perf_counter()
    if mode == "u":
        sock.sendall(b"u")
        block = bytes(CHUNK)
        sent = 0
        while sent < size:
            sent += sock.send(block[: min(CHUNK, size - sent)])
        sock.shutdown(socket.SHUT_WR)
        total = int.from_bytes(_read_exactly(sock, 8), "big")
    else:
        sock.sendall(b"d" + size.to_bytes(8, "big"))
        total = 0
        buffer = bytearray(CHUNK)
        while count := sock.recv_into(buffer):
            total += count
    elapsed = time.perf_counter() - start
    sock.close()
    pipe.send((total, elapsed))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("short read")
        data += more
    return data


def client_process(
    client_cert: WorkloadCertificate,
    server_cert: WorkloadCertificate,
    hbone_address: tuple[str, int],
    pipe: multiprocessing.connection.Connection,
    loop_kind: str,
    profile: str | None,
    connections: int,
) -> None:
    """Accepts the app's connections and joins it to an HBONE tunnel."""

    async def main() -> None:
        listener = listening_socket("127.0.0.3")
        listener.setblocking(False)
        pipe.send(listener.getsockname()[:2])
        pool = ConnectionPool()
        loop = asyncio.get_running_loop()
        for _ in range(connections):
            conn, _addr = await loop.sock_accept(listener)
            tunnel = await pool.connect(client_cert, [server_cert.identity], hbone_address, "127.0.0.1:1")
            await pump_socket(tunnel, conn)
        await pool.close()

    run(main(), loop_kind, profile)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (the machine may have fewer cores than processes
    here, so CPU per GiB is the steadier number)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mib: int, loop_kind: str, profile_dir: str | None, modes: str) -> None:
    context = multiprocessing.get_context("spawn")
    pki = Pki.create(Path(tempfile.mkdtemp(prefix="hbone-bench-")))
    server_cert, client_cert = pki.issue("bench", "server"), pki.issue("bench", "client")
    size = mib << 20
    for direct in (True, False):
        ours, theirs = context.Pipe()
        server_profile = None if direct or not profile_dir else f"{profile_dir}/server.prof"
        client_profile = None if direct or not profile_dir else f"{profile_dir}/client.prof"
        server = context.Process(
            target=server_process, args=(server_cert, direct, theirs, loop_kind, server_profile)
        )
        server.start()
        target = ours.recv()
        client = None
        if not direct:
            c_ours, c_theirs = context.Pipe()
            client = context.Process(
                target=client_process,
                args=(client_cert, server_cert, target, c_theirs, loop_kind, client_profile, len(modes)),
            )
            client.start()
            target = c_ours.recv()
        for mode in modes:
            label = "upload" if mode == "u" else "download"
            a_ours, a_theirs = context.Pipe()
            server_cpu = cpu_seconds(server.pid)
            client_cpu = cpu_seconds(client.pid) if client is not None else 0.0
            app = context.Process(target=app_process, args=(target, mode, size, a_theirs))
            app.start()
            total, elapsed = a_ours.recv()
            app.join()
            server_cpu = cpu_seconds(server.pid) - server_cpu
            client_cpu = (cpu_seconds(client.pid) if client is not None else 0.0) - client_cpu
            assert total == size, f"{label}: {total} of {size} bytes"
            kind = "plain TCP " if direct else f"HBONE ({loop_kind})"
            gib = size / (1 << 30)
            print(
                f"{kind:18} {label:8} {size / elapsed / 1e6:8.1f} MB/s  ({mib} MiB in {elapsed:.2f} s)"
                + (
                    ""
                    if direct
                    else f"  CPU s/GiB: client {client_cpu / gib:.2f}, server {server_cpu / gib:.2f}"
                )
            )
        if client is not None:
            client.join()
        ours.send("stop")
        server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--modes", default="ud", help="u: upload, d: download (default both)")
    parser.add_argument("--profile", metavar="DIR", help="write cProfile stats of both HBONE sides to DIR")
    args = parser.parse_args()
    measure(args.mib, args.loop, args.profile, args.modes)


if __name__ == "__main__":
    main()
