"""A ztunnel restart under steady load: a second ztunnel takes the node's pods over (SO_REUSEPORT)
while the first drains, on the client node and then on the server node, and no new connection fails.
Root only."""

from __future__ import annotations

import asyncio

import pytest

from loom.testing.netns import NetnsLab
from loom.testing.waiting import eventually
from tests.namespaced.ztunnel_harness import APP_PORT, WAIT, Layout, MeshLab, PodSpec, call, mesh_lab

pytestmark = pytest.mark.root

LAYOUT = Layout(
    nodes=("n1", "n2"),
    pods=(PodSpec("a", "n1", service_account="sa-x"), PodSpec("b", "n2", service_account="sa-y")),
)
CLIENTS = 32
MAX_CALLS_PER_CLIENT = 5000  # bounds the load loop; a run needs a few hundred


class Load:
    """CLIENTS concurrent loops of fresh connections a -> b, each answered and echoed."""

    def __init__(self, mesh: MeshLab) -> None:
        self.mesh = mesh
        self.ok = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(CLIENTS)]

    async def _loop(self) -> None:
        a, b = self.mesh.pods["a"], self.mesh.pods["b"]
        for _ in range(MAX_CALLS_PER_CLIENT):
            if self._stop.is_set():
                return
            try:
                answer = await call(a, b.address, APP_PORT, b"steady")
                assert answer.echoed == b"steady"
                self.ok += 1
            except (OSError, TimeoutError, AssertionError, ValueError) as e:
                self.failures.append(repr(e))

    async def progress(self, calls: int) -> None:
        target = self.ok + calls
        await eventually(lambda: self.ok >= target or bool(self.failures), within=WAIT, what=f"{calls} calls")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), WAIT)


async def restart(mesh: MeshLab, node: str, pods: tuple[str, ...]) -> None:
    old = mesh.ztunnel(node)
    new = await mesh.start_ztunnel(node)
    await eventually(
        lambda: {f"uid-{p}" for p in pods} <= set(new.manager.proxies), within=WAIT, what="pods taken over"
    )
    await old.shutdown()


async def test_j_restarting_either_ztunnel_under_load_fails_no_new_connection(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        load = Load(mesh)
        load.start()
        try:
            await load.progress(100)
            await restart(mesh, "n1", ("a",))
            await load.progress(100)
            await restart(mesh, "n2", ("b",))
            await load.progress(100)
        finally:
            await load.stop()
        assert load.failures == []
        assert load.ok >= 300


async def test_shutdown_keeps_open_connections_until_the_deadline_then_closes_them(lab: NetnsLab) -> None:
    async with mesh_lab(lab, LAYOUT) as mesh:
        a, b = mesh.pods["a"], mesh.pods["b"]
        reader, writer = await a.netns.open_connection(b.address, APP_PORT)
        loop = asyncio.get_running_loop()
        try:
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"b ")
            n1 = mesh.ztunnel("n1")
            started = loop.time()
            shutdown = asyncio.create_task(n1.shutdown())  # deadline: 1 s (the harness default)
            await eventually(lambda: not n1.ready, within=WAIT, what="not ready while draining")
            # New connections find no listener (no other ztunnel took over)...
            with pytest.raises((ConnectionError, OSError)):
                await call(a, b.address, APP_PORT)
            # ...while the open one keeps working during the drain.
            writer.write(b"draining")
            assert await asyncio.wait_for(reader.readexactly(8), WAIT) == b"draining"
            try:
                rest = await asyncio.wait_for(reader.read(), WAIT)
            except ConnectionResetError:
                rest = b""
            assert rest == b"", "closed at the deadline"
            await asyncio.wait_for(shutdown, WAIT)
            elapsed = loop.time() - started
            assert 0.9 <= elapsed < 3.0, f"drain took {elapsed:.2f} s for a 1 s deadline"
        finally:
            writer.close()
