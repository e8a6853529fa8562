"""The production ZDS server against ztunnel's real InpodClient (no root: no listeners are opened, the
"pod namespace" is the test's own /proc/self/ns/net)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from cni.agent.zds_server import ZdsPod, ZdsServer, ZtunnelUnavailable
from loom.testing import eventually
from loom.testing.inpod_agent import RecordingProxyManager
from ztunnel.inpod.client import InpodClient, InpodClientConfig
from ztunnel.inpod.protocol import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    encode_hello,
)

NETNS = "/proc/self/ns/net"
WAIT = 5.0


def info(name: str) -> WorkloadInfo:
    return WorkloadInfo(name, "default", "sa")


@pytest.fixture
def zds_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="zdsu", dir="/tmp")
    try:
        yield os.path.join(directory, "ztunnel.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def ztunnel(path: str) -> AsyncIterator[tuple[InpodClient, RecordingProxyManager]]:
    manager = RecordingProxyManager()
    client = InpodClient(manager, InpodClientConfig(socket_path=path, backoff_max=0.05))
    task = asyncio.create_task(client.run())
    try:
        yield client, manager
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        manager.close()


async def test_snapshot_then_add_and_delete(zds_path: str) -> None:
    async with ZdsServer(zds_path, keepalive_interval=0.05) as server:
        assert not server.ready
        with pytest.raises(ZtunnelUnavailable):
            await server.add("u0", info("early"), NETNS)
        # The early pod is remembered (its rules are in place) and goes into the first snapshot.
        server.pods["u1"] = ZdsPod("u1", info("kept"))
        async with ztunnel(zds_path) as (_client, manager):
            await server.wait_ready(WAIT)
            assert server.ready
            requests = [type(r) for r, _ in server.connections[0].exchanges]
            assert requests == [AddWorkload, KeepWorkload, SnapshotSent]
            assert [uid for event, uid in manager.events if event == "start"] == ["u0"]

            assert await server.add("u2", info("new"), NETNS) == ""
            assert "u2" in manager.running
            assert await server.delete("u2") == []
            assert "u2" not in manager.running and "u2" not in server.pods
        # ztunnel gone: the keepalive notices the EOF and the server stops claiming readiness.
        await eventually(lambda: not server.ready, within=WAIT, what="EOF noticed")
        assert server.connections == []
    assert not await asyncio.to_thread(os.path.exists, zds_path)


async def test_add_goes_to_newest_and_delete_to_all(zds_path: str) -> None:
    async with ZdsServer(zds_path) as server, ztunnel(zds_path) as (_, old), ztunnel(zds_path) as (_, new):
        await server.wait_ready(WAIT, connections=2)
        first, second = server.connections
        assert await server.add("u1", info("a"), NETNS) == ""
        assert "u1" in new.running and "u1" not in old.running
        assert [type(r) for r, _ in first.exchanges] == [SnapshotSent]
        assert await server.delete("u1") == []
        assert type(first.exchanges[-1][0]) is DelWorkload
        assert type(second.exchanges[-1][0]) is DelWorkload


async def test_bad_hello_drops_only_that_connection(zds_path: str) -> None:
    async with ZdsServer(zds_path, io_timeout=1.0) as server:
        loop = asyncio.get_running_loop()
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bad.setblocking(False)
        with bad:
            await loop.sock_connect(bad, zds_path)
            await loop.sock_sendall(bad, b"\xff\xff not protobuf")
            assert await asyncio.wait_for(loop.sock_recv(bad, 1024), WAIT) == b""  # closed by the server
        async with ztunnel(zds_path):
            await server.wait_ready(WAIT)
        good = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        good.setblocking(False)
        with good:
            await loop.sock_connect(good, zds_path)
            await loop.sock_sendall(good, encode_hello())
            # Empty pod list: the snapshot is just snapshot_sent.
            assert await asyncio.wait_for(loop.sock_recv(good, 1024), WAIT) != b""


async def test_snapshot_reports_each_pod_and_survives_a_vanished_namespace(zds_path: str) -> None:
    reports: list[dict[str, str]] = []
    async with ZdsServer(zds_path) as server:
        server.on_snapshot = lambda results: reports.append(dict(results))
        server.pods["u1"] = ZdsPod("u1", info("alive"), NETNS)
        server.pods["gone"] = ZdsPod("gone", info("deleted"), "/proc/self/ns/no-such-namespace")
        async with ztunnel(zds_path) as (_, manager):
            await server.wait_ready(WAIT)
            assert server.ready_connections == 1
            assert "u1" in manager.running
            assert reports[0]["u1"] == "" and "cannot open the pod's network namespace" in reports[0]["gone"]
            # An add for a vanished sandbox is reported, the connection stays.
            error = await server.add("u2", info("late"), "/proc/self/ns/no-such-namespace")
            assert "cannot open" in error and server.ready
            assert await server.add("u3", info("fine"), NETNS) == ""
