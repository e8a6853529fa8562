"""The real loom-controller process: start-up, node-token, a live xDS stream, SIGTERM -> exit 0 promptly."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from controller_harness import ADDR, write_manifests

from controller.auth import LabNodeAuthenticator
from loom.api import discovery_pb2
from loom.testing import manifests as m

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[3]
STARTUP_SECONDS = 20.0


class Process:
    """A loom-controller subprocess whose stderr is collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.new_line = asyncio.Event()
        self.reader = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self.new_line.set()
        self.new_line.set()

    async def wait_for_line(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(STARTUP_SECONDS):
            seen = 0
            for _ in range(100_000):  # bounded; each round waits for at least one new line
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self.proc.returncode is not None or self.reader.done():
                    break
                self.new_line.clear()
                await self.new_line.wait()
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))


async def start(*args: str) -> Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.main", *args, cwd=REPO, stderr=asyncio.subprocess.PIPE
    )
    return Process(proc)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[tuple[Process, Path]]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_manifests(
        config_dir / "workloads.yaml",
        m.namespace("default", {"istio.io/dataplane-mode": "ambient"}),
        m.pod("default", "alice-1", service_account="alice", node="node-a", ip="10.244.1.10"),
    )
    state = tmp_path / "state"
    process = await start(
        "--config-dir", str(config_dir), "--state-dir", str(state), "--grpc-addr", "127.0.0.1:0",
        "--http-addr", "127.0.0.1:0", "--debounce", "5ms",
    )  # fmt: skip
    try:
        yield process, state
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()
        await process.reader


async def test_sigterm_ends_streams_and_exits_zero_promptly(controller: tuple[Process, Path]) -> None:
    process, state = controller
    running = await process.wait_for_line(
        r"controller started.*grpc=127\.0\.0\.1:(\d+) http=127\.0\.0\.1:(\d+)"
    )
    grpc_port, http_port = int(running.group(1)), int(running.group(2))
    await process.wait_for_line(r"first configuration served")
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{http_port}/ready") as r:
        assert r.status == 200
    # The line format is Istio's: RFC 3339 UTC time, level, scope, message, key=value.
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\tinfo\tapp\tcontroller started\t", running.string
    )

    # node-token prints a credential from the same state directory.
    token_proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.main", "node-token", "--node", "node-a", "--state-dir", str(state),
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(token_proc.communicate(), STARTUP_SECONDS)
    assert token_proc.returncode == 0
    token = stdout.decode().strip()
    assert LabNodeAuthenticator.load_or_create(state).verify(token) == "node-a"

    root = (state / "root-cert.pem").read_bytes()
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{grpc_port}", grpc.ssl_channel_credentials(root)
    ) as channel:
        call = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )(metadata=(("authorization", f"Bearer {token}"),))
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDR)
        request.node.id = "node-a"
        await call.write(request)
        first = await asyncio.wait_for(call.read(), STARTUP_SECONDS)
        assert isinstance(first, discovery_pb2.DeltaDiscoveryResponse) and first.resources

        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        # The open stream is ended cleanly (OK), not reset.
        assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(process.proc.wait(), 5) == 0
    assert time.monotonic() - started < 3.0
    await process.reader
    assert any("\tstopped" in line for line in process.lines)


async def test_invalid_settings_exit_2_naming_every_problem(tmp_path: Path) -> None:
    process = await start("--grpc-addr", "nowhere", "--cert-ttl", "soon")
    assert await asyncio.wait_for(process.proc.wait(), STARTUP_SECONDS) == 2
    await process.reader
    text = "\n".join(process.lines)
    assert "--grpc-addr=nowhere is not valid" in text
    assert "--cert-ttl=soon is not valid" in text
    assert "exactly one configuration source" in text


async def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await start(
            "--config-dir", str(config_dir), "--state-dir", str(tmp_path / "state"),
            "--grpc-addr", "127.0.0.1:0", "--http-addr", f"127.0.0.1:{port}",
        )  # fmt: skip
        assert await asyncio.wait_for(process.proc.wait(), STARTUP_SECONDS) == 1
    await process.reader
    assert any(f"cannot start: cannot listen on 127.0.0.1:{port} (HTTP)" in line for line in process.lines)
