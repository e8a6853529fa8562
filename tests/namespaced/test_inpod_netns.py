"""The namespace switcher and InpodNetns socket factories (ztunnel/inpod/netns.py). Root only."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from loom.testing.netns import NetnsLab
from tests.namespaced.harness import accept
from ztunnel.inpod import netns as netns_module
from ztunnel.inpod.netns import InpodNetns, NetnsError, NetnsSwitcher

pytestmark = pytest.mark.root

ROOT_INODE = os.stat("/proc/self/ns/net").st_ino


def thread_netns_inode(native_id: int) -> int:
    return os.stat(f"/proc/self/task/{native_id}/ns/net").st_ino


def inside() -> tuple[int, int]:
    """(the switcher thread's id, the namespace it is in)."""
    return threading.get_native_id(), os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def switcher() -> Iterator[NetnsSwitcher]:
    instance = NetnsSwitcher("test-switcher")
    try:
        yield instance
    finally:
        instance.close()


def test_the_switcher_runs_inside_and_always_returns_home(lab: NetnsLab, switcher: NetnsSwitcher) -> None:
    pod_ns = lab.namespace("p")
    with InpodNetns.open(pod_ns.path, switcher=switcher) as pod:
        thread, where = pod.run_blocking(inside)
        assert where == pod.inode != ROOT_INODE
        assert thread_netns_inode(thread) == ROOT_INODE

        def fail() -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            pod.run_blocking(fail)
        assert thread_netns_inode(thread) == ROOT_INODE, "switched back after an exception too"


def test_a_thread_that_cannot_return_home_is_retired(
    lab: NetnsLab, switcher: NetnsSwitcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod_ns = lab.namespace("p")
    real_setns = netns_module.setns
    calls = 0

    def setns_failing_on_the_way_back(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise NetnsError(1, "injected: cannot switch back")
        real_setns(fd)

    with InpodNetns.open(pod_ns.path, switcher=switcher) as pod:
        monkeypatch.setattr(netns_module, "setns", setns_failing_on_the_way_back)
        stranded: list[int] = []
        with pytest.raises(NetnsError, match="injected"):
            pod.run_blocking(lambda: stranded.append(threading.get_native_id()))
        monkeypatch.setattr(netns_module, "setns", real_setns)
        thread, where = pod.run_blocking(inside)
        assert thread != stranded[0], "later work runs on a fresh thread"
        assert where == pod.inode
        assert thread_netns_inode(thread) == ROOT_INODE


async def test_async_run_and_socket_factories(lab: NetnsLab) -> None:
    pod_ns = lab.namespace("p")
    with InpodNetns.open(pod_ns.path) as pod:
        _, where = await pod.run(inside)
        assert where == pod.inode
        listener = await pod.listener(15008, reuseport=True)
        second = await pod.listener(15008, reuseport=True)  # a second ztunnel taking over (SO_REUSEPORT)
        try:
            upstream = await pod.connect(("127.0.0.1", 15008), mark=0x539)
            with upstream:
                assert upstream.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
                assert not upstream.getblocking()
                async with asyncio.timeout(5):
                    conns: list[socket.socket] = []
                    while not conns:
                        for candidate in (listener, second):
                            try:
                                conns.append(candidate.accept()[0])
                            except BlockingIOError:
                                pass
                        await asyncio.sleep(0.001)
                conns[0].close()
        finally:
            listener.close()
            second.close()


async def test_a_spoofed_source_must_match_the_destination_family(lab: NetnsLab) -> None:
    pod_ns = lab.namespace("p")
    with InpodNetns.open(pod_ns.path) as pod:
        with pytest.raises(ValueError, match="different address families"):
            await pod.socket_for(("127.0.0.1", 80), src_ip="::1")
        with pytest.raises(ValueError, match="'nonsense' is not an IP address"):
            await pod.listener(1, host="nonsense")


async def test_dup_is_an_independent_handle(lab: NetnsLab) -> None:
    pod_ns = lab.namespace("p")
    original = InpodNetns.open(pod_ns.path)
    copy = original.dup()
    original.close()
    with copy:
        assert copy.identity == (os.stat(pod_ns.path).st_dev, os.stat(pod_ns.path).st_ino)
        listener = await copy.listener(15006)
        with listener:
            _, writer = await pod_ns.open_connection("127.0.0.1", 15006)
            conn, peer = await accept(listener)
            conn.close()
            writer.close()
            assert peer[0] == "127.0.0.1"


def test_closing_while_work_is_queued_keeps_the_fd_until_the_work_ran(
    lab: NetnsLab, switcher: NetnsSwitcher
) -> None:
    pod_ns = lab.namespace("p")
    pod = InpodNetns.open(pod_ns.path, switcher=switcher)
    fd = pod.fd
    release = threading.Event()
    running = pod.submit(lambda: release.wait(5))
    queued = pod.submit(inside)
    pod.close()
    assert pod.closed
    os.fstat(fd)  # still open: the queued switch must not find a reused fd number
    with pytest.raises(NetnsError, match="already closed"):
        pod.run_blocking(inside)
    release.set()
    assert running.result(5) is True
    assert queued.result(5)[1] == pod.inode, "the queued work still ran in the right namespace"
    # The fd is released by the future's done-callback, which may run just after result() returns.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and fd_is_open(fd):
        time.sleep(0.001)
    assert not fd_is_open(fd)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
