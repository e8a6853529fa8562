"""ZDS snapshot semantics with real pod namespaces: reconnect snapshots, keep, delete, and a pod sandbox
recreated with a new namespace. Root only."""

from __future__ import annotations

import os

import pytest

from loom.testing import eventually
from loom.testing.netns import NetnsLab, Pod
from tests.namespaced.harness import WAIT, Inpod, accept, agent_pod, exchange, info_of, inpod_node, uid_of

pytestmark = pytest.mark.root


async def assert_listening(env: Inpod, pod: Pod, port: int = 15008) -> None:
    reader, writer = await pod.netns.open_connection("127.0.0.1", port)
    try:
        conn, _ = await accept(env.listener(pod, port))
        with conn:
            await exchange(conn, writer, reader)
    finally:
        writer.close()


async def assert_not_listening(pod: Pod, port: int = 15008) -> None:
    with pytest.raises(ConnectionRefusedError):
        await pod.netns.open_connection("127.0.0.1", port)


async def test_snapshot_delete_and_recreated_sandboxes(lab: NetnsLab, zds_path: str) -> None:
    async with inpod_node(lab, zds_path, ("a", "b", "c")) as env:
        a, b, c = env.pods["a"], env.pods["b"], env.pods["c"]
        for pod in (a, b, c):
            await assert_listening(env, pod)
        b_listener = env.listener(b, 15008)

        # The agent restarts: a is gone, b is only known by uid (keep), c comes with its namespace again.
        env.agent.pods = {uid_of(b): agent_pod(b, keep=True), uid_of(c): agent_pod(c)}
        await env.agent.disconnect()
        await env.agent.wait_snapshot(2, within=WAIT)
        await eventually(lambda: env.client.ready, within=WAIT, what="ready after the second snapshot")
        assert env.manager.events == [
            ("start", uid_of(a)),
            ("start", uid_of(b)),
            ("start", uid_of(c)),
            ("stop-drain", uid_of(a)),
        ]
        await assert_not_listening(a)
        assert env.listener(b, 15008) is b_listener, "kept: the very same listener keeps serving"
        await assert_listening(env, b)
        await assert_listening(env, c)

        # Delete tears the proxy down at once.
        assert await env.agent.delete(uid_of(c)) == ""
        assert env.manager.events[-1] == ("stop", uid_of(c))
        await assert_not_listening(c)

        # The same pod comes back in a new sandbox (new namespace): a fresh start there.
        c2 = lab.recreate_pod(c)
        assert await env.agent.add(uid_of(c2), info_of(c2), c2.netns.path) == ""
        assert env.manager.running[uid_of(c2)].netns_inode == os.stat(c2.netns.path).st_ino
        await assert_listening(env, c2)

        # b's sandbox is recreated while its proxy runs: the old proxy drains, a new one starts inside.
        old_inode = env.manager.running[uid_of(b)].netns_inode
        b2 = lab.recreate_pod(b)
        assert await env.agent.add(uid_of(b2), info_of(b2), b2.netns.path) == ""
        assert env.manager.events[-2:] == [("stop-drain", uid_of(b)), ("start", uid_of(b2))]
        new_inode = env.manager.running[uid_of(b2)].netns_inode
        assert new_inode == os.stat(b2.netns.path).st_ino != old_inode
        await assert_listening(env, b2)

        # Adding it again with the same namespace changes nothing.
        starts = len(env.manager.starts)
        assert await env.agent.add(uid_of(b2), info_of(b2), b2.netns.path) == ""
        assert len(env.manager.starts) == starts
        assert sorted(env.client.workloads()) == [uid_of(b2), uid_of(c2)]
