"""Shared pieces of the root tests: the `ip netns list` leftover check, and the in-pod set-up (a node
with pods, the stand-in node agent, and the real ZDS client driving a RecordingProxyManager that opens
15001/15006/15008 inside each pod's namespace)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from loom.testing.inpod_agent import AgentPod, InpodTestAgent, RecordingProxyManager
from loom.testing.netns import NetnsLab, Node, Pod
from ztunnel.inpod.client import InpodClient, InpodClientConfig
from ztunnel.inpod.protocol import WorkloadInfo

WAIT = 5.0


def namespaces_with_prefix(prefix: str) -> list[str]:
    """`ip netns list`, filtered: what the kernel-side tooling sees, not what our bookkeeping believes."""
    output = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return [line.split()[0] for line in output.splitlines() if line.startswith(prefix + "-")]


def uid_of(pod: Pod) -> str:
    return f"uid-{pod.name}"


def info_of(pod: Pod) -> WorkloadInfo:
    return WorkloadInfo(pod.name, "default", f"sa-{pod.name}")


def agent_pod(pod: Pod, *, keep: bool = False) -> AgentPod:
    return AgentPod(uid_of(pod), info_of(pod), None if keep else pod.netns.path)


@dataclass
class Inpod:
    lab: NetnsLab
    node: Node
    pods: dict[str, Pod]
    agent: InpodTestAgent
    manager: RecordingProxyManager
    client: InpodClient

    def listener(self, pod: Pod, port: int) -> socket.socket:
        return self.manager.listeners[uid_of(pod)][port]


@asynccontextmanager
async def inpod_node(
    lab: NetnsLab, zds_path: str, pod_names: tuple[str, ...] = ("a", "b")
) -> AsyncIterator[Inpod]:
    """Everything up, the first snapshot done and ztunnel ready; torn down (proxies, agent) on exit."""
    node = lab.add_node("n1")
    pods = {name: lab.add_pod(node, name) for name in pod_names}
    manager = RecordingProxyManager(open_listeners=True)
    async with InpodTestAgent(zds_path) as agent:
        agent.pods = {uid_of(p): agent_pod(p) for p in pods.values()}
        config = InpodClientConfig(
            socket_path=zds_path, retry_interval=0.05, backoff_max=0.05, io_timeout=2.0
        )
        client = InpodClient(manager, config)
        task = asyncio.create_task(client.run(), name="inpod-client")
        try:
            await agent.wait_snapshot(1, within=WAIT)
            await asyncio.wait_for(client.wait_ready(), WAIT)
            yield Inpod(lab, node, pods, agent, manager, client)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.stop_all(drain=False)
            manager.close()


async def accept(listener: socket.socket, within: float = WAIT) -> tuple[socket.socket, tuple[str, int]]:
    async with asyncio.timeout(within):
        conn, peer = await asyncio.get_running_loop().sock_accept(listener)
    return conn, peer


def nothing_pending(listener: socket.socket) -> bool:
    """True when no connection waits in the (non-blocking) listener's queue."""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


async def exchange(sock: socket.socket, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
    """Bytes flow both ways between an accepted socket and a client stream."""
    loop = asyncio.get_running_loop()
    writer.write(b"request")
    await writer.drain()
    async with asyncio.timeout(WAIT):
        assert await loop.sock_recv(sock, 100) == b"request"
        await loop.sock_sendall(sock, b"response")
        assert await reader.readexactly(8) == b"response"
