"""End to end, in process: YAML directory -> controller -> delta xDS over TLS to a real grpc.aio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from controller_harness import (
    ADDR,
    AUTHZ,
    XdsClient,
    controller_config,
    http_get,
    metric_value,
    running_controller,
    write_manifests,
)

from controller.app import ControllerApp, StartupError
from controller.sources.base import ChangeCallback
from controller.sources.directory import DirectorySource
from loom.testing import manifests as m
from loom.testing.waiting import eventually

pytestmark = pytest.mark.timeout(60)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def base_config(config_dir: Path) -> None:
    write_manifests(config_dir / "00-namespace.yaml", m.namespace("default", AMBIENT))
    write_manifests(
        config_dir / "10-workloads.yaml",
        m.pod(
            "default",
            "alice-1",
            labels={"app": "alice"},
            service_account="alice",
            node="node-a",
            ip="10.244.1.10",
        ),
        m.pod(
            "default", "bob-1", labels={"app": "bob"}, service_account="bob", node="node-b", ip="10.244.2.10"
        ),
        m.service("default", "alice", selector={"app": "alice"}, cluster_ip="10.96.0.10"),
    )
    write_manifests(
        config_dir / "20-policy.yaml",
        m.authorization_policy("default", "allow-bob", match_labels={"app": "alice"}),
    )
    write_manifests(
        config_dir / "30-extra.yaml",
        m.pod("default", "carol-1", service_account="carol", node="node-a", ip="10.244.1.11"),
    )


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[ControllerApp]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    base_config(config_dir)
    async with running_controller(controller_config(tmp_path / "state", [config_dir])) as app:
        yield app


@pytest.fixture
async def client(app: ControllerApp) -> AsyncIterator[XdsClient]:
    c = XdsClient(app, app.issue_node_token("node-a"), "node-a")
    yield c
    await c.close()


async def subscribe_all(client: XdsClient) -> None:
    """Wildcard subscription to both types, like ztunnel; first responses ACKed."""
    await client.send(ADDR)
    await client.send(AUTHZ)
    types = {(await client.recv_acked()).type_url, (await client.recv_acked()).type_url}
    assert types == {ADDR, AUTHZ}


async def test_wildcard_client_gets_snapshot_then_only_changes(
    app: ControllerApp, client: XdsClient, tmp_path: Path
) -> None:
    await subscribe_all(client)
    served = app.xds.latest_prepared  # type: ignore[union-attr]
    assert client.held[ADDR] == served.versions(ADDR)
    assert client.held[AUTHZ] == served.versions(AUTHZ)
    assert "default/allow-bob" in client.held[AUTHZ]
    assert len(client.held[ADDR]) == 4  # three pods and one service
    before_addresses = dict(client.held[ADDR])

    # Change one policy: only that Authorization arrives.
    write_manifests(
        tmp_path / "config" / "20-policy.yaml",
        m.authorization_policy(
            "default",
            "allow-bob",
            match_labels={"app": "alice"},
            principals=["cluster.local/ns/default/sa/bob"],
        ),
    )
    response = await client.recv_acked()
    assert response.type_url == AUTHZ
    assert [r.name for r in response.resources] == ["default/allow-bob"]
    assert list(response.removed_resources) == []
    await client.expect_silence(0.2)
    assert client.held[ADDR] == before_addresses

    # Delete an object: a removal of exactly its workload.
    (tmp_path / "config" / "30-extra.yaml").unlink()
    response = await asyncio.wait_for(client.pending_read, 10)
    assert response.type_url == ADDR
    assert [r.name for r in response.resources] == []
    [removed] = response.removed_resources
    assert removed.endswith("/Pod/default/carol-1")


async def test_nack_is_counted_and_not_resent_until_changed(
    app: ControllerApp, client: XdsClient, tmp_path: Path
) -> None:
    await subscribe_all(client)
    policy = tmp_path / "config" / "20-policy.yaml"
    write_manifests(
        policy,
        m.authorization_policy(
            "default", "allow-bob", match_labels={"app": "alice"}, principals=["cluster.local/ns/x/sa/v2"]
        ),
    )
    rejected = await client.recv()
    assert rejected.type_url == AUTHZ
    await client.send(AUTHZ, nonce=rejected.nonce, error="default/allow-bob: unsupported field")

    # An unrelated change still arrives; the rejected version is not offered again.
    write_manifests(
        tmp_path / "config" / "40-new.yaml",
        m.authorization_policy("default", "second", match_labels={"app": "bob"}),
    )
    # (Authorization first, then bob's workload, which now names the policy.)
    authorizations = await client.recv_acked()
    assert [r.name for r in authorizations.resources] == ["default/second"]
    addresses = await client.recv_acked()
    assert [r.name.rsplit("/", 1)[-1] for r in addresses.resources] == ["bob-1"]
    await client.expect_silence(0.2)

    # A new version of the rejected policy is sent again.
    write_manifests(
        policy,
        m.authorization_policy(
            "default", "allow-bob", match_labels={"app": "alice"}, principals=["cluster.local/ns/x/sa/v3"]
        ),
    )
    response = await asyncio.wait_for(client.pending_read, 10)
    assert [r.name for r in response.resources] == ["default/allow-bob"]

    status, body = await http_get(app, "/metrics")
    assert status == 200
    assert metric_value(body, "loom_xds_nacks_total", {"type": "Authorization"}) == 1
    assert metric_value(body, "loom_xds_connected_proxies") == 1
    assert metric_value(body, "loom_xds_pushes_total", {"type": "Authorization"}) >= 4
    assert metric_value(body, "loom_xds_push_latency_seconds_count") >= 2
    assert metric_value(body, "loom_xds_resources", {"type": "Address"}) == 4
    assert "_created" not in body


async def test_reconnect_with_initial_versions_gets_exactly_the_difference(
    app: ControllerApp, client: XdsClient, tmp_path: Path
) -> None:
    await subscribe_all(client)
    held = {t: dict(v) for t, v in client.held.items()}
    await client.close()

    # While disconnected: one policy changes, one pod goes away, one pod is added.
    write_manifests(
        tmp_path / "config" / "20-policy.yaml",
        m.authorization_policy(
            "default", "allow-bob", match_labels={"app": "alice"}, principals=["cluster.local/ns/z/sa/z"]
        ),
    )
    (tmp_path / "config" / "30-extra.yaml").unlink()
    write_manifests(
        tmp_path / "config" / "50-dave.yaml",
        m.pod("default", "dave-1", service_account="dave", node="node-a", ip="10.244.1.12"),
    )
    xds = app.xds
    assert xds is not None
    expected_names = {"alice-1", "bob-1", "dave-1", "alice.default.svc.cluster.local"}
    await eventually(
        lambda: (
            {n.rsplit("/", 1)[-1] for n in xds.served.versions(ADDR)} == expected_names
            and xds.served.versions(AUTHZ) != held[AUTHZ]
        ),
        within=10,
        what="the controller to serve the changed configuration",
    )

    again = XdsClient(app, app.issue_node_token("node-a"), "node-a")
    try:
        await again.send(ADDR, initial=held[ADDR])
        await again.send(AUTHZ, initial=held[AUTHZ])
        responses = {r.type_url: r for r in [await again.recv_acked(), await again.recv_acked()]}
        addresses, authorizations = responses[ADDR], responses[AUTHZ]
        assert [r.name for r in authorizations.resources] == ["default/allow-bob"]
        assert list(authorizations.removed_resources) == []
        assert [r.name.rsplit("/", 1)[-1] for r in addresses.resources] == ["dave-1"]
        assert [n.rsplit("/", 1)[-1] for n in addresses.removed_resources] == ["carol-1"]
        served = xds.served
        merged = {**held[ADDR], **again.held[ADDR]}
        for name in addresses.removed_resources:
            merged.pop(name)
        assert merged == served.versions(ADDR)
    finally:
        await again.close()


@pytest.mark.parametrize(
    ("token", "code"),
    [
        pytest.param(None, grpc.StatusCode.UNAUTHENTICATED, id="no credential"),
        pytest.param("loom-node.v1.node-a.AAAA", grpc.StatusCode.UNAUTHENTICATED, id="forged credential"),
        pytest.param("eyJhbGciOi.fake.jwt", grpc.StatusCode.UNAUTHENTICATED, id="not a node credential"),
    ],
)
async def test_unauthenticated_streams_are_refused(
    app: ControllerApp, token: str | None, code: grpc.StatusCode
) -> None:
    client = XdsClient(app, token, "node-a")
    try:
        # Refused on connect, before any request is read. (Not writing here also avoids a grpc-python
        # client quirk: a write racing the server's refusal turns the status into INTERNAL.)
        assert await client.status() == (code, "request authentication failure")
    finally:
        await client.close()
    _, body = await http_get(app, "/metrics")
    assert metric_value(body, "loom_xds_connected_proxies") == 0


async def test_stream_for_another_node_is_refused(app: ControllerApp) -> None:
    client = XdsClient(app, app.issue_node_token("node-a"), "node-b")
    try:
        await client.send(ADDR)
        code, details = await client.status()
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "node-b" in details
    finally:
        await client.close()
    _, body = await http_get(app, "/metrics")
    assert metric_value(body, "loom_xds_streams_refused_total", {"reason": "node-mismatch"}) == 1


async def test_node_switch_mid_stream_is_refused(app: ControllerApp, client: XdsClient) -> None:
    await subscribe_all(client)
    await client.send(AUTHZ, node="node-b")
    code, _ = await client.status()
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_unknown_type_is_a_protocol_error(app: ControllerApp, client: XdsClient) -> None:
    await client.send("type.googleapis.com/envoy.config.cluster.v3.Cluster")
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not served" in details


async def test_slow_subscriber_does_not_delay_others(app: ControllerApp, tmp_path: Path) -> None:
    fast = XdsClient(app, app.issue_node_token("node-a"), "node-a")
    slow = XdsClient(app, app.issue_node_token("node-b"), "node-b")
    try:
        await subscribe_all(fast)
        await subscribe_all(slow)
        # `slow` stops reading; several changes happen; `fast` sees each of them promptly.
        for version in range(3):
            write_manifests(
                tmp_path / "config" / "20-policy.yaml",
                m.authorization_policy(
                    "default",
                    "allow-bob",
                    match_labels={"app": "alice"},
                    principals=[f"cluster.local/ns/v/sa/{version}"],
                ),
            )
            response = await fast.recv_acked()
            assert [r.name for r in response.resources] == ["default/allow-bob"]
        # When `slow` reads again it catches up to the latest state.
        latest = app.xds.latest_prepared.versions(AUTHZ)  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            while slow.held[AUTHZ] != latest:
                await slow.recv_acked()
    finally:
        await fast.close()
        await slow.close()


class GatedSource:
    """A directory source whose first snapshot is held back until the test opens the gate."""

    def __init__(self, directory: Path) -> None:
        self.inner = DirectorySource([directory])
        self.gate = asyncio.Event()

    async def run(self, on_change: ChangeCallback) -> None:
        await self.gate.wait()
        await self.inner.run(on_change)


async def test_ready_only_after_the_first_configuration_is_served(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    base_config(config_dir)
    source = GatedSource(config_dir)
    config = controller_config(tmp_path / "state", [config_dir])
    async with running_controller(config, source=source, wait_ready=False) as app:
        assert (await http_get(app, "/ready"))[0] == 503
        _, body = await http_get(app, "/metrics")
        assert metric_value(body, "loom_controller_ready") == 0
        source.gate.set()
        await eventually(lambda: app.ready, within=10, what="controller ready")
        assert (await http_get(app, "/ready"))[0] == 200
        _, body = await http_get(app, "/metrics")
        assert metric_value(body, "loom_controller_ready") == 1
        assert metric_value(body, "loom_controller_translations_total", {"result": "ok"}) >= 1
        assert metric_value(body, "loom_controller_config_objects") == 6  # namespace, 3 pods, service, policy


async def test_stop_ends_streams_cleanly(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    base_config(config_dir)
    async with running_controller(controller_config(tmp_path / "state", [config_dir])) as app:
        client = XdsClient(app, app.issue_node_token("node-a"), "node-a")
        try:
            await subscribe_all(client)
            stopping = asyncio.create_task(app.stop())
            assert await client.status() == (grpc.StatusCode.OK, "")
            await stopping
        finally:
            await client.close()


async def test_startup_errors_are_clear(tmp_path: Path) -> None:
    missing = controller_config(tmp_path / "state", [tmp_path / "does-not-exist"])
    app = ControllerApp(missing)
    with pytest.raises(StartupError, match="does-not-exist"):
        await app.start()
    await app.stop()

    (tmp_path / "state" / "ca" / "root-key.pem").unlink()
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    app = ControllerApp(controller_config(tmp_path / "state", [config_dir]))
    with pytest.raises(StartupError, match="exists but its key"):
        await app.start()
    await app.stop()
