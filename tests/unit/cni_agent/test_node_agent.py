"""NodeAgent request handling with a recording redirection backend and a real ZDS server + InpodClient."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni.agent.agent import CapturedPod, CapturedStore, NodeAgent, StaticPodDirectory
from cni.agent.redirect import RedirectionError
from cni.agent.zds_server import ZdsServer
from cni.events import AgentReply, AgentRequest, Attachment, Outcome, PodAttachment, RequestKind
from loom.resources.model import LABEL_DATAPLANE_MODE, Namespace, ObjectMeta, Pod
from tests.unit.cni_agent.test_zds_server import NETNS, WAIT, ztunnel


class RecordingBackend:
    def __init__(self) -> None:
        self.installed: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fail_apply = False

    async def apply(self, netns_path: str) -> None:
        self.calls.append(("apply", netns_path))
        if self.fail_apply:
            raise RedirectionError(f"iptables-restore in {netns_path} failed (injected)")
        self.installed.add(netns_path)

    async def remove(self, netns_path: str) -> None:
        self.calls.append(("remove", netns_path))
        self.installed.discard(netns_path)

    async def verify(self, netns_path: str) -> tuple[str, ...]:
        return () if netns_path in self.installed else ("nat: table has none of our rules",)


@pytest.fixture
def zds_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="zdsa", dir="/tmp")
    try:
        yield os.path.join(directory, "ztunnel.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def directory() -> StaticPodDirectory:
    return StaticPodDirectory(
        [
            Namespace(meta=ObjectMeta("mesh", "", labels={LABEL_DATAPLANE_MODE: "ambient"})),
            Namespace(meta=ObjectMeta("plain", "")),
            Pod(meta=ObjectMeta("a", "mesh", uid="uid-a")),
            Pod(meta=ObjectMeta("b", "plain", uid="uid-b")),
        ]
    )


def request(kind: RequestKind, namespace: str, name: str, container: str = "c1") -> AgentRequest:
    pod = PodAttachment(namespace, name, "", container, NETNS, "eth0")
    return AgentRequest(kind, pod)


async def test_add_check_del(zds_path: str) -> None:
    backend = RecordingBackend()
    async with ZdsServer(zds_path) as server:
        agent = NodeAgent(directory(), backend, server)
        # No ztunnel yet: rules go in (fail closed) but the runtime must retry.
        reply = await agent.handle(request(RequestKind.ADD, "mesh", "a"))
        assert reply.outcome is Outcome.ERROR and reply.retry and "no ztunnel" in reply.message
        assert NETNS in backend.installed
        status = await agent.handle(AgentRequest(RequestKind.STATUS))
        assert status == AgentReply(Outcome.ERROR, "no ztunnel connection yet", retry=True)

        async with ztunnel(zds_path) as (_, manager):
            await server.wait_ready(WAIT)
            assert "uid-a" in manager.running  # the retried pod was in the snapshot
            assert (await agent.handle(AgentRequest(RequestKind.STATUS))).outcome is Outcome.DONE
            assert (await agent.handle(request(RequestKind.ADD, "mesh", "a"))).outcome is Outcome.ENROLLED
            assert (await agent.handle(request(RequestKind.CHECK, "mesh", "a"))).outcome is Outcome.ENROLLED

            backend.installed.clear()  # somebody flushed the rules
            check = await agent.handle(request(RequestKind.CHECK, "mesh", "a"))
            assert check.outcome is Outcome.ERROR and "table has none" in check.message

            assert (await agent.handle(request(RequestKind.ADD, "plain", "b", "c2"))).outcome is (
                Outcome.NOT_ENROLLED
            )
            assert (await agent.handle(request(RequestKind.CHECK, "plain", "b", "c2"))).outcome is (
                Outcome.NOT_ENROLLED
            )
            assert (await agent.handle(request(RequestKind.DEL, "mesh", "a"))).outcome is Outcome.DONE
            assert "uid-a" not in manager.running
            assert backend.calls[-1] == ("remove", NETNS)
            # DEL of an unknown attachment is still done (the runtime retries DEL until it succeeds).
            assert (await agent.handle(request(RequestKind.DEL, "mesh", "a"))).outcome is Outcome.DONE
            check = await agent.handle(request(RequestKind.CHECK, "mesh", "a"))
            assert check.outcome is Outcome.ERROR and "should be enrolled" in check.message


async def test_unknown_pod_and_failed_rules_ask_for_retry(zds_path: str) -> None:
    backend = RecordingBackend()
    async with ZdsServer(zds_path) as server, ztunnel(zds_path) as (_, manager):
        await server.wait_ready(WAIT)
        agent = NodeAgent(directory(), backend, server, unknown_pod_wait=0.05)
        unknown = await agent.handle(request(RequestKind.ADD, "mesh", "ghost"))
        assert unknown.outcome is Outcome.ERROR and unknown.retry and "not known" in unknown.message
        backend.fail_apply = True
        failed = await agent.handle(request(RequestKind.ADD, "mesh", "a"))
        assert failed.outcome is Outcome.ERROR and failed.retry and "injected" in failed.message
        assert manager.running == {}, "ztunnel must not get a pod whose rules failed"


async def test_gc_releases_attachments_the_runtime_no_longer_has(zds_path: str) -> None:
    backend = RecordingBackend()
    async with ZdsServer(zds_path) as server, ztunnel(zds_path) as (_, manager):
        await server.wait_ready(WAIT)
        agent = NodeAgent(directory(), backend, server)
        assert (await agent.handle(request(RequestKind.ADD, "mesh", "a"))).outcome is Outcome.ENROLLED
        keep = AgentRequest(RequestKind.GC, valid_attachments=(Attachment("c1", "eth0"),))
        assert (await agent.handle(keep)).outcome is Outcome.DONE
        assert "uid-a" in manager.running
        drop = AgentRequest(RequestKind.GC, valid_attachments=())
        assert (await agent.handle(drop)).outcome is Outcome.DONE
        assert "uid-a" not in manager.running and agent.captured == {}


@pytest.mark.parametrize("persisted", [True, False], ids=["restored from state", "no state (control)"])
async def test_agent_restart_keeps_ztunnel_proxies(zds_path: str, tmp_path: Path, persisted: bool) -> None:
    """A restarted agent must give ztunnel the same snapshot; an empty one would drain every proxy."""
    backend = RecordingBackend()
    state = tmp_path / "captured.json"
    gone = PodAttachment("mesh", "gone", "uid-gone", "c9", str(tmp_path / "no-such-netns"), "eth0")
    async with ztunnel(zds_path) as (_, manager):
        first = NodeAgent(directory(), backend, ZdsServer(zds_path), CapturedStore(state))
        async with first.zds:
            await first.zds.wait_ready(WAIT)
            assert (await first.handle(request(RequestKind.ADD, "mesh", "a"))).outcome is Outcome.ENROLLED
            assert "uid-a" in manager.running
        # The agent is gone; ztunnel keeps serving and reconnects. A sandbox deleted meanwhile:
        first.known["c9"] = gone
        first.captured["c9"] = CapturedPod("uid-gone", gone)
        first._persist()
        second = NodeAgent(
            directory(), backend, ZdsServer(zds_path), CapturedStore(state if persisted else tmp_path / "x")
        )
        assert await second.restore() == (1 if persisted else 0)
        async with second.zds:
            await second.zds.wait_ready(WAIT)
            await asyncio.sleep(0.1)  # let the client finish reconciling after the snapshot
            if persisted:
                assert "uid-a" in manager.running
                assert ("stop-drain", "uid-a") not in manager.events and (
                    "stop",
                    "uid-a",
                ) not in manager.events
                assert set(second.captured) == {"c1"}  # the vanished sandbox was dropped
            else:
                assert "uid-a" not in manager.running  # what the state file prevents
