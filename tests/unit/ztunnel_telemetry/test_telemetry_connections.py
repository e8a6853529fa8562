"""The live connection registry: listing, the policy re-check against a real ProxyState (a DENY applied
while connections are open closes exactly the ones it now refuses), and drain."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry
from telemetry_builders import (
    apply_policies,
    collect,
    deny_from_namespace,
    fixed_time,
    state_with,
    strict_mtls,
    workload,
)

from loom.identity import Identity
from ztunnel.connections import (
    CloseReason,
    ConnectionHandle,
    ConnectionInfo,
    ConnectionRegistry,
    Direction,
    Transport,
    cancelling_closer,
)
from ztunnel.state import ProxyState
from ztunnel.telemetry.access_log import TextFormatter
from ztunnel.telemetry.metrics import ProxyMetrics

pytestmark = pytest.mark.timeout(30)

PRODUCTPAGE_UID = "Kubernetes//Pod/default/productpage"
FRIEND = Identity("cluster.local", "default", "curl")
STRANGER = Identity("cluster.local", "legacy", "sleep")


def make_state() -> ProxyState:
    return state_with(
        workload("productpage", "10.244.1.10", service_account="bookinfo-productpage"),
        workload("curl", "10.244.1.12", service_account="curl", node="node-b"),
        workload("sleep", "10.244.2.7", namespace="legacy", service_account="sleep", node="node-b"),
    )


def inbound(identity: Identity | None, src: str, port: int = 9080) -> ConnectionInfo:
    return ConnectionInfo(
        workload_uid=PRODUCTPAGE_UID,
        workload="productpage.default",
        direction=Direction.INBOUND,
        local_ip=ipaddress.ip_address("10.244.1.10"),
        local_port=port,
        remote_ip=ipaddress.ip_address(src),
        remote_port=40000,
        remote_target="10.244.1.10:9080" if identity else "",
        protocol=Transport.HBONE if identity else Transport.TCP,
        source_identity=identity,
    )


def outbound() -> ConnectionInfo:
    return ConnectionInfo(
        workload_uid=PRODUCTPAGE_UID,
        workload="productpage.default",
        direction=Direction.OUTBOUND,
        local_ip=ipaddress.ip_address("10.244.1.10"),
        local_port=51000,
        remote_ip=ipaddress.ip_address("10.244.2.7"),
        remote_port=15008,
        remote_target="10.96.0.30:80",
        protocol=Transport.HBONE,
        source_identity=Identity("cluster.local", "default", "bookinfo-productpage"),
    )


class Closers:
    """Records which connection was closed with which reason; unregisters it like a proxy would."""

    def __init__(self, registry: ConnectionRegistry) -> None:
        self.registry = registry
        self.closed: list[tuple[str, CloseReason]] = []

    def register(self, name: str, info: ConnectionInfo) -> None:
        handles: list[ConnectionHandle] = []

        async def close(reason: CloseReason) -> None:
            self.closed.append((name, reason))
            handles[0].unregister()

        handles.append(self.registry.register(info, close))


def test_listing_and_json() -> None:
    registry = ConnectionRegistry()
    with registry.register(inbound(FRIEND, "10.244.1.12"), cancelling_closer_unused) as handle:
        registry.register(outbound(), cancelling_closer_unused)
        assert len(registry) == 2
        assert registry.to_json() == [
            {
                "workload": "productpage.default",
                "workloadUid": PRODUCTPAGE_UID,
                "direction": "inbound",
                "local": "10.244.1.10:9080",
                "remote": "10.244.1.12:40000",
                "remoteTarget": "10.244.1.10:9080",
                "protocol": "HBONE",
                "sourceIdentity": "spiffe://cluster.local/ns/default/sa/curl",
            },
            {
                "workload": "productpage.default",
                "workloadUid": PRODUCTPAGE_UID,
                "direction": "outbound",
                "local": "10.244.1.10:51000",
                "remote": "10.244.2.7:15008",
                "remoteTarget": "10.96.0.30:80",
                "protocol": "HBONE",
                "sourceIdentity": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            },
        ]
        assert handle.closing is None
    assert len(registry) == 1
    handle.unregister()  # idempotent
    assert len(registry) == 1


async def cancelling_closer_unused(reason: CloseReason) -> None:
    raise AssertionError(f"nothing should close this connection ({reason})")


def test_ipv6_addresses_are_bracketed() -> None:
    info = ConnectionInfo(
        "u", "w.ns", Direction.INBOUND, ipaddress.ip_address("fd00::1"), 80,
        ipaddress.ip_address("fd00::2"), 5000, "", Transport.TCP,
    )  # fmt: skip
    assert (info.local, info.remote) == ("[fd00::1]:80", "[fd00::2]:5000")


async def test_deny_policy_closes_only_the_connections_it_refuses() -> None:
    state = make_state()
    registry = ConnectionRegistry()
    closers = Closers(registry)
    closers.register("friend", inbound(FRIEND, "10.244.1.12"))
    closers.register("stranger", inbound(STRANGER, "10.244.2.7"))
    closers.register("outbound", outbound())
    assert registry.recheck(state) == 0, "no policy yet: everything allowed"

    apply_policies(state, deny_from_namespace("deny-legacy", "default", "legacy"))
    with collect("ztunnel.proxy") as logged:
        assert registry.recheck(state) == 1
    assert registry.recheck(state) == 0, "already closing: not closed twice"
    await registry.settle()
    assert closers.closed == [("stranger", CloseReason.LATE_REJECTION)]
    assert [c.source_identity for c in registry.connections()] == [FRIEND, outbound().source_identity]
    (message,) = [r for r in logged.records if r.getMessage() == "closing connection no longer allowed"]
    assert message.fields["reason"] == "denied by policy default/deny-legacy"  # type: ignore[attr-defined]


async def test_follow_rechecks_when_the_state_changes() -> None:
    state = make_state()
    registry = ConnectionRegistry()
    closers = Closers(registry)
    closers.register("plaintext", inbound(None, "10.244.2.7"))
    closers.register("mtls", inbound(FRIEND, "10.244.1.12"))
    unfollow = registry.follow(state)
    apply_policies(state, strict_mtls("default"))
    await registry.settle()
    assert closers.closed == [("plaintext", CloseReason.LATE_REJECTION)]
    unfollow()
    apply_policies(state, deny_from_namespace("deny-default", "default", "default"))
    await registry.settle()
    assert len(closers.closed) == 1, "no longer following"


async def test_connections_to_a_removed_workload_are_closed() -> None:
    state = make_state()
    registry = ConnectionRegistry()
    closers = Closers(registry)
    closers.register("friend", inbound(FRIEND, "10.244.1.12"))
    state.apply_addresses({}, removals=[PRODUCTPAGE_UID])
    assert registry.recheck(state) == 1
    await registry.settle()
    assert closers.closed == [("friend", CloseReason.LATE_REJECTION)]


async def test_late_rejection_reaches_the_access_log() -> None:
    """The proxy's wiring: the copy task runs inside a ConnectionResult and is registered with a
    cancelling closer that records the reason on the result."""
    state = make_state()
    registry = ConnectionRegistry()
    prom = CollectorRegistry()
    metrics = ProxyMetrics(prom, tag="t")
    result = metrics.connection(
        Direction.INBOUND,
        src_addr=("10.244.2.7", 40000),
        dst_addr=("10.244.1.10", 9080),
        source=state.workload("Kubernetes//Pod/legacy/sleep"),
        destination=state.workload(PRODUCTPAGE_UID),
        source_identity=STRANGER,
        mtls=True,
    )
    running = asyncio.Event()

    async def copy() -> None:
        async with result:
            running.set()
            await asyncio.Event().wait()

    with collect("access") as access:
        task = asyncio.create_task(copy())
        handle = registry.register(inbound(STRANGER, "10.244.2.7"), cancelling_closer(task, result.closing))
        task.add_done_callback(lambda _: handle.unregister())
        await running.wait()
        apply_policies(state, deny_from_namespace("deny-legacy", "default", "legacy"))
        assert registry.recheck(state) == 1
        await registry.settle()
    assert task.cancelled()
    assert len(registry) == 0
    (line,) = [TextFormatter().format(fixed_time(r)) for r in access.records]
    assert line.startswith(
        "2024-05-04T09:59:05.028709Z\terror\taccess\tconnection failed\tsrc.addr=10.244.2.7:40000"
    )
    assert 'error="late rejection: connection closed due to policy change"' in line
    labels = dict(result.labels, response_flags="DENY")
    assert prom.get_sample_value("istio_tcp_connections_closed_total", labels) == 1


async def test_broken_and_slow_closers_do_not_stop_the_others() -> None:
    state = make_state()
    apply_policies(state, deny_from_namespace("deny-all-default", "default", "default"))
    registry = ConnectionRegistry(close_wait=0.05)
    closed: list[str] = []

    async def broken(reason: CloseReason) -> None:
        raise RuntimeError("closer bug")

    async def stuck(reason: CloseReason) -> None:
        await asyncio.Event().wait()

    async def good(reason: CloseReason) -> None:
        closed.append(reason.value)

    for closer in (broken, stuck, good):
        registry.register(inbound(FRIEND, "10.244.1.12"), closer)
    with collect("ztunnel.proxy") as logged:
        assert registry.recheck(state) == 3
        await asyncio.wait_for(registry.settle(), 2)
    assert closed == ["AuthorizationPolicyLateRejection"]
    messages = {r.getMessage() for r in logged.records}
    assert {"connection closer failed", "connection closer did not finish in time"} <= messages


async def test_drain_returns_at_once_when_connections_end_in_time() -> None:
    registry = ConnectionRegistry()
    handle = registry.register(outbound(), cancelling_closer_unused)
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, handle.unregister)
    assert await registry.drain(loop.time() + 5) == 0
    assert await registry.drain(loop.time() - 1) == 0, "nothing left"


def unregister_on_done(handle: ConnectionHandle) -> Callable[[object], None]:
    return lambda _: handle.unregister()


async def test_drain_closes_what_is_left_at_the_deadline() -> None:
    registry = ConnectionRegistry()
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(asyncio.Event().wait()) for _ in range(3)]
    for task in tasks:
        handle = registry.register(outbound(), cancelling_closer(task))
        task.add_done_callback(unregister_on_done(handle))
    started = loop.time()
    assert await registry.drain(started + 0.05) == 3
    assert loop.time() - started < 2
    assert all(t.cancelled() for t in tasks)
    assert len(registry) == 0


async def test_cancelling_closer_of_a_finished_task_does_nothing() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    reasons: list[CloseReason] = []
    await cancelling_closer(task, reasons.append)(CloseReason.WORKLOAD_REMOVED)
    assert reasons == [CloseReason.WORKLOAD_REMOVED]
    assert not task.cancelled()
