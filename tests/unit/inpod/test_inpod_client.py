"""The asyncio ZDS client against the stand-in node agent over a real unix SEQPACKET socket.

The pods' "namespaces" here are all the test process's own (/proc/self/ns/net): enough for the protocol,
fd passing, idempotency and snapshot semantics, without root. Distinct namespaces (a recreated pod
sandbox) are covered by the root tests in tests/namespaced/."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from loom.testing import eventually
from loom.testing.inpod_agent import AgentPod, InpodTestAgent, RecordingProxyManager
from ztunnel.inpod.client import InpodClient, InpodClientConfig
from ztunnel.inpod.protocol import (
    AddWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    encode_request,
)

OWN_NETNS = "/proc/self/ns/net"
WAIT = 5.0


def info(name: str) -> WorkloadInfo:
    return WorkloadInfo(name, "default", f"sa-{name}")


def pod(uid: str, *, keep: bool = False) -> AgentPod:
    return AgentPod(uid, info(uid), None if keep else OWN_NETNS)


@pytest.fixture
def zds_path() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="zds", dir="/tmp")
    try:
        yield os.path.join(directory, "ztunnel.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def config(path: str, **overrides: float) -> InpodClientConfig:
    values: dict[str, float] = {"retry_interval": 0.05, "backoff_max": 0.05, "io_timeout": 2.0, **overrides}
    return InpodClientConfig(socket_path=path, **values)


@asynccontextmanager
async def serving(client: InpodClient) -> AsyncIterator[InpodClient]:
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@asynccontextmanager
async def setup(
    path: str, pods: list[AgentPod], manager: RecordingProxyManager | None = None, **overrides: float
) -> AsyncIterator[tuple[InpodTestAgent, RecordingProxyManager, InpodClient]]:
    manager = manager if manager is not None else RecordingProxyManager()
    async with InpodTestAgent(path) as agent:
        agent.pods = {p.uid: p for p in pods}
        client = InpodClient(manager, config(path, **overrides))
        async with serving(client):
            yield agent, manager, client
        await client.stop_all(drain=False)


def summary(agent: InpodTestAgent, connection: int = 1) -> list[tuple[str, str, str]]:
    """(kind, uid, ack error) of every exchange on a connection."""
    out = []
    for request, error in agent.connections[connection - 1].exchanges:
        uid = getattr(request, "uid", "")
        out.append((type(request).__name__, uid, error))
    return out


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_snapshot_starts_every_added_pod_then_ztunnel_is_ready(zds_path: str) -> None:
    async with setup(zds_path, [pod("a"), pod("b")]) as (agent, manager, client):
        await agent.wait_snapshot(1)
        assert summary(agent) == [
            ("AddWorkload", "a", ""),
            ("AddWorkload", "b", ""),
            ("SnapshotSent", "", ""),
        ]
        assert agent.connections[0].hello_version == 1
        assert manager.events == [("start", "a"), ("start", "b")]
        await asyncio.wait_for(client.wait_ready(), WAIT)
        status = client.workloads()["a"]
        assert (status.info, status.running, status.error) == (info("a"), True, "")
        assert status.netns_inode == os.stat(OWN_NETNS).st_ino


async def test_the_same_pod_and_namespace_again_is_a_no_op_without_fd_leaks(zds_path: str) -> None:
    async with setup(zds_path, [pod("a")]) as (agent, manager, client):
        await agent.wait_snapshot(1)
        before = open_fds()
        for _ in range(3):
            assert await agent.add("a", info("a"), OWN_NETNS) == ""
        assert manager.events == [("start", "a")]
        assert open_fds() == before
        assert list(client.workloads()) == ["a"]


async def test_delete_stops_at_once_and_unknown_deletes_are_fine(zds_path: str) -> None:
    async with setup(zds_path, [pod("a"), pod("b")]) as (agent, manager, client):
        await agent.wait_snapshot(1)
        assert await agent.delete("a") == ""
        assert await agent.delete("never-added") == ""
        assert manager.events == [("start", "a"), ("start", "b"), ("stop", "a")]
        assert list(client.workloads()) == ["b"]


async def test_add_after_the_snapshot_starts_the_pod(zds_path: str) -> None:
    async with setup(zds_path, []) as (agent, manager, client):
        await agent.wait_snapshot(1)
        await asyncio.wait_for(client.wait_ready(), WAIT)
        assert await agent.add("c", info("c"), OWN_NETNS) == ""
        assert manager.events == [("start", "c")]


async def test_keep_for_a_pod_ztunnel_does_not_know_is_acked_with_an_error(zds_path: str) -> None:
    async with setup(zds_path, [pod("x", keep=True)]) as (agent, manager, client):
        await agent.wait_snapshot(1)
        (_, uid, error), snapshot_sent = summary(agent)
        assert uid == "x"
        assert error == "keep for unknown workload x: no proxy runs for it and no netns was sent"
        assert snapshot_sent == ("SnapshotSent", "", "")
        assert manager.events == []
        await asyncio.wait_for(client.wait_ready(), WAIT)


async def test_a_new_snapshot_drains_pods_left_out_and_keeps_kept_ones(zds_path: str) -> None:
    async with setup(zds_path, [pod("a"), pod("b"), pod("c")]) as (agent, manager, client):
        await agent.wait_snapshot(1)
        await asyncio.wait_for(client.wait_ready(), WAIT)
        # The agent restarted: it lost b's fd (keep) and a is gone; c is re-added with its namespace.
        agent.pods = {"b": pod("b", keep=True), "c": pod("c")}
        await agent.disconnect()
        await eventually(lambda: not client.ready, within=WAIT, what="not ready after the disconnect")
        await agent.wait_snapshot(2)
        assert summary(agent, 2) == [
            ("KeepWorkload", "b", ""),
            ("AddWorkload", "c", ""),
            ("SnapshotSent", "", ""),
        ]
        assert manager.events == [("start", "a"), ("start", "b"), ("start", "c"), ("stop-drain", "a")]
        assert sorted(client.workloads()) == ["b", "c"]
        await asyncio.wait_for(client.wait_ready(), WAIT)
        assert client.connections == 2


async def test_a_failed_start_is_acked_retried_and_holds_readiness(zds_path: str) -> None:
    manager = RecordingProxyManager()
    manager.fail_starts["a"] = 2
    async with setup(zds_path, [pod("a"), pod("b")], manager) as (agent, _, client):
        await agent.wait_snapshot(1)
        (_, _, error), *_ = summary(agent)
        assert error == "failed to start the proxy for pod default/a (uid a): injected start failure for a"
        assert not client.ready
        assert not client.workloads()["a"].running
        await asyncio.wait_for(client.wait_ready(), WAIT)
        assert manager.events == [
            ("start-failed", "a"),
            ("start", "b"),
            ("start-failed", "a"),
            ("start", "a"),
        ]


async def test_a_pod_deleted_while_its_start_keeps_failing_is_no_longer_retried(zds_path: str) -> None:
    manager = RecordingProxyManager()
    manager.fail_starts["a"] = 1_000
    async with setup(zds_path, [pod("a")], manager) as (agent, _, client):
        await agent.wait_snapshot(1)
        assert await agent.delete("a") == ""
        await asyncio.wait_for(client.wait_ready(), WAIT)
        failures = len(manager.events)
        await asyncio.sleep(0.2)  # four retry intervals
        assert len(manager.events) == failures
        assert client.workloads() == {}


async def test_a_protocol_violation_is_acked_and_the_client_resynchronises(zds_path: str) -> None:
    async with setup(zds_path, [pod("a")]) as (agent, manager, client):
        await agent.wait_snapshot(1)
        reply = await agent.send_raw(encode_request(KeepWorkload("a")))
        assert decode_ack(reply) == "unexpected keep in state snapshot_done"
        await agent.wait_snapshot(2)
        # Same pod, same namespace in the new snapshot: its proxy was never interrupted.
        assert manager.events == [("start", "a")]
        await asyncio.wait_for(client.wait_ready(), WAIT)


@pytest.mark.parametrize(
    ("datagram", "reply"),
    [
        pytest.param(b"\xff\xff", "request does not decode", id="garbage"),
        pytest.param(b"", "", id="empty datagram reads as end of stream"),
        pytest.param(b"a" * 2000, "", id="oversized datagram: connection dropped"),
    ],
)
async def test_bad_datagrams_end_the_connection_and_the_client_reconnects(
    zds_path: str, datagram: bytes, reply: str
) -> None:
    async with setup(zds_path, [pod("a")]) as (agent, manager, _):
        await agent.wait_snapshot(1)
        answer = await agent.send_raw(datagram)
        if reply:
            assert reply in decode_ack(answer)
        else:
            assert answer == b""
        await agent.wait_snapshot(2)
        assert manager.events == [("start", "a")]


async def test_an_add_whose_fd_is_not_a_namespace_is_refused_and_closed(zds_path: str) -> None:
    async with setup(zds_path, []) as (agent, manager, client):
        await agent.wait_snapshot(1)
        read_end, write_end = os.pipe()
        try:
            before = open_fds()
            reply = await agent.send_raw(encode_request(AddWorkload("p", info("p"), -1)), [read_end])
            assert open_fds() == before, "the received copy of the fd was closed"
        finally:
            os.close(read_end)
            os.close(write_end)
        assert "is not a network namespace" in decode_ack(reply)
        assert await agent.add("q", info("q"), OWN_NETNS) == "", "the connection is still usable"
        assert manager.events == [("start", "q")]
        assert client.connections == 1


async def test_the_client_keeps_trying_until_the_agent_appears(zds_path: str) -> None:
    manager = RecordingProxyManager()
    client = InpodClient(manager, config(zds_path))
    async with serving(client):
        await asyncio.sleep(0.1)
        assert not client.connected
        async with InpodTestAgent(zds_path) as agent:
            agent.pods = {"a": pod("a")}
            await agent.wait_snapshot(1)
            await asyncio.wait_for(client.wait_ready(), WAIT)
        await eventually(lambda: not client.ready, within=WAIT, what="not ready once the agent is gone")
        assert manager.running.keys() == {"a"}, "proxies outlive the connection"
        await client.stop_all()
        assert manager.events == [("start", "a"), ("stop-drain", "a")]


async def test_snapshot_exchanges_are_acked_in_order(zds_path: str) -> None:
    async with setup(zds_path, [pod("a"), pod("k", keep=True)]) as (agent, _, _):
        connection = await agent.wait_snapshot(1)
        kinds = [type(request) for request, _ in connection.exchanges]
        assert kinds == [AddWorkload, KeepWorkload, SnapshotSent]
