"""`loom-ztunnel` as a process: configuration errors exit 2 naming every bad variable; SIGTERM with no
pods drains at once and exits 0; readiness stays 503 while the controller and the node agent are
unreachable. Everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from ztunnel.main import EXIT_CONFIG, main

WAIT = 10.0


def test_configuration_errors_exit_2_and_name_every_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    monkeypatch.setenv("METRICS_ADDR", "everywhere")
    assert main([]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "NODE_NAME= is not valid" in err
    assert "LOG_FORMAT=yaml is not valid: expected text or json" in err
    assert "METRICS_ADDR=everywhere is not valid" in err


def test_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--node", "x"]) == EXIT_CONFIG
    assert "environment variables" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def readiness(port: int) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz/ready") as response,
    ):
        return response.status, await response.text()


async def test_sigterm_stops_the_process_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NODE_NAME": "node-1",
        "XDS_ADDRESS": "127.0.0.1:1",  # nothing listens: the xDS client keeps retrying
        "ROOT_CERT": str(tmp_path / "root-cert.pem"),
        "NODE_TOKEN_FILE": str(tmp_path / "token"),
        "INPOD_UDS": str(tmp_path / "zt.sock"),
        "ADMIN_ADDR": "127.0.0.1:0",
        "METRICS_ADDR": "127.0.0.1:0",
        "READINESS_ADDR": f"127.0.0.1:{port}",
        "CONNECTION_TERMINATION_DEADLINE": "1s",
        "LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ztunnel.main", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        status, body = 0, ""
        while loop.time() < deadline:
            try:
                status, body = await readiness(port)
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        assert status == 503
        assert "inpod" in body and "xds" in body
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
        assert "termination requested" in log and "ztunnel stopped" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
