"""The xDS servicer's scheduling (controller/xds/server.py) with fake gRPC contexts: debouncing, the
max-delay bound, slow subscribers that must not delay others, and clean shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.auth import LabNodeAuthenticator
from controller.metrics import ControllerMetrics
from controller.translate import AUTHORIZATION_TYPE_URL, Translation
from controller.xds.resources import version_resource
from controller.xds.server import XdsServer, requested_node
from loom.api import authorization_pb2, discovery_pb2

AUTHZ = AUTHORIZATION_TYPE_URL


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class FakeContext:
    """The parts of grpc.aio.ServicerContext the servicer uses; writes can be held back by a gate."""

    def __init__(self, token: str | None) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.written: list[discovery_pb2.DeltaDiscoveryResponse] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.wrote = asyncio.Event()
        self.consumed = 0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def write(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.gate.wait()
        self.written.append(response)
        self.wrote.set()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    async def next_write(self) -> discovery_pb2.DeltaDiscoveryResponse:
        """The next response not yet returned by this method (like a client reading its stream)."""
        async with asyncio.timeout(5):
            while len(self.written) <= self.consumed:
                self.wrote.clear()
                await self.wrote.wait()
        self.consumed += 1
        return self.written[self.consumed - 1]


class Stream:
    """One simulated node proxy connected to the servicer."""

    def __init__(self, server: XdsServer, token: str | None, node: str) -> None:
        self.requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = asyncio.Queue()
        self.context = FakeContext(token)
        self.node = node
        self.task = asyncio.create_task(server.DeltaAggregatedResources(self._iterate(), self.context))

    async def _iterate(self) -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    def subscribe(self) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHZ)
        request.node.id = self.node
        self.requests.put_nowait(request)

    def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        self.requests.put_nowait(
            discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHZ, response_nonce=response.nonce)
        )


def policies(version: int, names: tuple[str, ...] = ("ns/a",)) -> Translation:
    return Translation(
        authorizations={n: authorization_pb2.Authorization(name=n, namespace=f"v{version}") for n in names}
    )


def version_of(name: str, version: int) -> str:
    return version_resource(authorization_pb2.Authorization(name=name, namespace=f"v{version}")).version


@pytest.fixture
def credentials(tmp_path: Path) -> LabNodeAuthenticator:
    return LabNodeAuthenticator.load_or_create(tmp_path)


async def started(server: XdsServer, translation: Translation) -> XdsServer:
    await server.start()
    server.publish(translation)
    async with asyncio.timeout(5):
        await server.wait_for_generation(1)
    return server


async def test_bursts_of_publications_are_coalesced(credentials: LabNodeAuthenticator) -> None:
    server = await started(
        XdsServer(credentials, ControllerMetrics(), debounce=0.02, max_delay=1.0), policies(0)
    )
    try:
        for version in range(1, 6):
            server.publish(policies(version))
        async with asyncio.timeout(5):
            await server.wait_for_generation(2)
        await asyncio.sleep(0.1)
        assert server.generation == 2
        assert server.served.versions(AUTHZ) == {"ns/a": version_of("ns/a", 5)}
    finally:
        await server.close()


async def test_continuous_publications_are_still_pushed_within_max_delay(
    credentials: LabNodeAuthenticator,
) -> None:
    server = await started(
        XdsServer(credentials, ControllerMetrics(), debounce=0.05, max_delay=0.1), policies(0)
    )
    try:
        # A publication every 10 ms never leaves 50 ms of quiet; only max_delay gets pushes out.
        for version in range(1, 41):
            server.publish(policies(version))
            await asyncio.sleep(0.01)
        assert server.generation >= 3
    finally:
        await server.close()


async def test_slow_subscriber_does_not_delay_others_and_catches_up_coalesced(
    credentials: LabNodeAuthenticator,
) -> None:
    metrics = ControllerMetrics()
    server = await started(XdsServer(credentials, metrics, debounce=0.001, max_delay=0.005), policies(0))
    fast = Stream(server, credentials.issue_node_token("node-a"), "node-a")
    slow = Stream(server, credentials.issue_node_token("node-b"), "node-b")
    try:
        for stream in (fast, slow):
            stream.subscribe()
            stream.ack(await stream.context.next_write())
        slow.context.gate.clear()  # the slow proxy stops reading: its next write blocks
        for version in (1, 2, 3):
            server.publish(policies(version))
            response = await fast.context.next_write()
            assert {r.name: r.version for r in response.resources} == {"ns/a": version_of("ns/a", version)}
            fast.ack(response)
        assert len(slow.context.written) == 1
        slow.context.gate.set()
        # The write that was blocked (version 1) completes, then one catch-up to the latest (3): no 2.
        first = await slow.context.next_write()
        second = await slow.context.next_write()
        assert [r.version for r in first.resources] == [version_of("ns/a", 1)]
        assert [r.version for r in second.resources] == [version_of("ns/a", 3)]
        await asyncio.sleep(0.05)
        assert len(slow.context.written) == 3
        assert metrics.xds_push_latency._sum.get() > 0  # observed for delivered publications
    finally:
        await server.close()
        for stream in (fast, slow):
            stream.requests.put_nowait(None)
            await asyncio.wait_for(stream.task, 5)


async def test_streams_wait_for_the_first_configuration(credentials: LabNodeAuthenticator) -> None:
    """Before the first translation the served state is empty; answering then would tell a reconnecting
    node proxy to remove everything it holds. The stream must wait and then get the real state."""
    server = XdsServer(credentials, ControllerMetrics(), debounce=0.001, max_delay=0.005)
    await server.start()
    stream = Stream(server, credentials.issue_node_token("node-a"), "node-a")
    try:
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHZ)
        request.node.id = "node-a"
        request.initial_resource_versions["ns/a"] = version_of("ns/a", 0)  # what it held before
        stream.requests.put_nowait(request)
        await asyncio.sleep(0.1)
        assert stream.context.written == []  # nothing, in particular no removal of ns/a
        server.publish(policies(1))
        response = await stream.context.next_write()
        assert list(response.removed_resources) == []
        assert {r.name: r.version for r in response.resources} == {"ns/a": version_of("ns/a", 1)}
    finally:
        await server.close()
        stream.requests.put_nowait(None)
        await asyncio.wait_for(stream.task, 5)


async def test_close_ends_every_stream_normally(credentials: LabNodeAuthenticator) -> None:
    metrics = ControllerMetrics()
    server = await started(XdsServer(credentials, metrics), policies(0))
    streams = [Stream(server, credentials.issue_node_token(f"node-{i}"), f"node-{i}") for i in range(3)]
    for stream in streams:
        stream.subscribe()
        await stream.context.next_write()
    assert metrics.xds_connected._value.get() == 3
    assert [s.node for s in server.streams()] == ["node-0", "node-1", "node-2"]
    await server.close()
    await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 5)  # returned, not aborted
    assert metrics.xds_connected._value.get() == 0
    # New streams are refused while shutting down.
    late = Stream(server, credentials.issue_node_token("node-9"), "node-9")
    with pytest.raises(Aborted) as e:
        await asyncio.wait_for(late.task, 5)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


async def test_first_request_without_node_is_refused(credentials: LabNodeAuthenticator) -> None:
    server = await started(XdsServer(credentials, ControllerMetrics()), policies(0))
    try:
        stream = Stream(server, credentials.issue_node_token("node-a"), "node-a")
        stream.requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHZ))
        with pytest.raises(Aborted) as e:
            await asyncio.wait_for(stream.task, 5)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert stream.context.written == []
    finally:
        await server.close()


def test_requested_node_prefers_node_name_metadata() -> None:
    node = discovery_pb2.Node(id="ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local")
    assert requested_node(node) == node.id
    node.metadata.update({"NODE_NAME": "node-a"})
    assert requested_node(node) == "node-a"
    node.metadata.update({"NODE_NAME": 7})
    assert requested_node(node) == node.id


def test_invalid_timing_is_rejected(credentials: LabNodeAuthenticator) -> None:
    with pytest.raises(ValueError, match="debounce"):
        XdsServer(credentials, ControllerMetrics(), debounce=0.5, max_delay=0.1)
