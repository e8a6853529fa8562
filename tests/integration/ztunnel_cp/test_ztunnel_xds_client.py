"""The node proxy's xDS client against a real in-process controller (TLS on loopback), and against a
fake control plane for malformed and oversized configuration (hardening checklist items 19 and 20)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from ztunnel_cp_harness import (
    AMBIENT,
    WAIT,
    FakeControlPlane,
    controller_config,
    metric_value,
    start_controller,
    write_manifests,
)

from controller.app import ControllerApp
from loom.api import authorization_pb2, discovery_pb2, workload_pb2
from loom.identity import Identity
from loom.policy.rbac import BrokenPolicy, CompiledPolicy, Connection, DecisionReason
from loom.testing import manifests as m
from loom.testing.waiting import eventually
from ztunnel.state import ProxyState, StateChange
from ztunnel.xds import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Backoff, XdsClient, token_from_file

pytestmark = pytest.mark.timeout(60)

ADDR, AUTHZ = ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
FAST = Backoff(0.01, 0.2)  # Istio's 10 ms start; a low cap keeps reconnects in tests quick


def uid(name: str) -> str:
    return f"Kubernetes//Pod/default/{name}"


ALICE_SERVICE = "default/alice.default.svc.cluster.local"


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
        m.authorization_policy(
            "default",
            "allow-bob",
            match_labels={"app": "alice"},
            principals=["cluster.local/ns/default/sa/bob"],
        ),
    )
    write_manifests(
        config_dir / "30-extra.yaml",
        m.pod("default", "carol-1", service_account="carol", node="node-a", ip="10.244.1.11"),
    )


@dataclass
class Lab:
    tmp: Path
    config_dir: Path
    state_dir: Path
    app: ControllerApp
    state: ProxyState
    client: XdsClient
    registry: CollectorRegistry
    changes: list[StateChange]

    @property
    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    base_config(config_dir)
    state_dir = tmp_path / "state"
    app = await start_controller(controller_config(state_dir, [config_dir]))
    token_file = tmp_path / "istio-token"
    token_file.write_text(app.issue_node_token("node-a") + "\n")
    state = ProxyState("node-a")
    changes: list[StateChange] = []
    state.watch(changes.append)
    registry = CollectorRegistry()
    client = XdsClient(
        f"127.0.0.1:{app.grpc_port}",
        state_dir / "root-cert.pem",  # the published root file, re-read on every connection
        token_from_file(token_file),
        "node-a",
        state,
        registry=registry,
        backoff=FAST,
    )
    lab = Lab(tmp_path, config_dir, state_dir, app, state, client, registry, changes)
    try:
        yield lab
    finally:
        await client.close()
        await lab.app.stop()


def served_versions(app: ControllerApp, type_url: str) -> dict[str, str]:
    assert app.xds is not None
    return app.xds.latest_prepared.versions(type_url)


async def converged(lab: Lab) -> None:
    await eventually(
        lambda: all(lab.client.session.held(t) == served_versions(lab.app, t) for t in (ADDR, AUTHZ)),
        within=WAIT,
        what="client holds what the controller serves",
    )


async def test_full_state_and_ready(lab: Lab) -> None:
    assert not lab.client.ready.is_set()
    lab.client.start()
    await asyncio.wait_for(lab.client.ready.wait(), WAIT)
    await converged(lab)
    state = lab.state
    alice = state.workload(uid("alice-1"))
    assert alice is not None and alice.tunnel_protocol == workload_pb2.HBONE
    assert state.workload_by_ip("10.244.2.10") is state.workload(uid("bob-1"))
    assert state.service_by_vip("10.96.0.10") is state.service(ALICE_SERVICE)
    assert [e.workload.name for e in state.endpoints(ALICE_SERVICE)] == ["alice-1"]
    assert sorted(w.name for w in state.local_workloads()) == ["alice-1", "carol-1"]
    assert isinstance(state.policies.get("default/allow-bob"), CompiledPolicy)
    bob = Identity("cluster.local", "default", "bob")
    assert state.authorize(alice, Connection.of(bob, "10.244.2.10", "10.244.1.10", 8080)).allowed
    carol = Identity("cluster.local", "default", "carol")
    assert not state.authorize(alice, Connection.of(carol, "10.244.1.11", "10.244.1.10", 8080)).allowed
    assert state.rejected == {}
    text = lab.exposition
    assert metric_value(text, "istio_xds_message_total", {"url": ADDR}) >= 1
    assert metric_value(text, "istio_xds_message_total", {"url": AUTHZ}) >= 1
    assert metric_value(text, "loom_xds_connected") == 1
    assert lab.client.connected


async def test_a_file_change_arrives(lab: Lab) -> None:
    lab.client.start()
    await asyncio.wait_for(lab.client.ready.wait(), WAIT)
    write_manifests(
        lab.config_dir / "40-dave.yaml",
        m.pod("default", "dave-1", service_account="dave", node="node-a", ip="10.244.1.12"),
    )
    (lab.config_dir / "30-extra.yaml").unlink()
    await eventually(
        lambda: lab.state.workload(uid("dave-1")) is not None and lab.state.workload(uid("carol-1")) is None,
        within=WAIT,
        what="dave added and carol removed",
    )
    await converged(lab)
    assert any(uid("dave-1") in c.local_workloads for c in lab.changes)
    assert sorted(w.name for w in lab.state.local_workloads()) == ["alice-1", "dave-1"]


async def test_controller_down_then_restarted_in_place(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    lab.client.start()
    await asyncio.wait_for(lab.client.ready.wait(), WAIT)
    await converged(lab)
    port = lab.app.grpc_port
    held_before = lab.client.session.held(ADDR)

    await lab.app.stop()
    await eventually(lambda: not lab.client.connected, within=WAIT, what="stream ended")
    # Retries fail while the controller is down; the last known state keeps being served.
    await eventually(
        lambda: (
            metric_value(
                lab.exposition, "istio_xds_connection_terminations_total", {"reason": "ConnectionError"}
            )
            >= 2
        ),
        within=WAIT,
        what="failed reconnects",
    )
    assert lab.state.workload(uid("alice-1")) is not None
    assert lab.state.service_by_vip("10.96.0.10") is not None
    assert lab.client.session.held(ADDR) == held_before
    assert lab.client.ready.is_set()

    # The configuration changes while the controller is down.
    (lab.config_dir / "30-extra.yaml").unlink()
    write_manifests(
        lab.config_dir / "40-dave.yaml",
        m.pod("default", "dave-1", service_account="dave", node="node-a", ip="10.244.1.12"),
    )
    caplog.set_level(logging.INFO, logger="controller.xds")
    # Same state directory (same root and node credential key) and same port.
    lab.app = await start_controller(controller_config(lab.state_dir, [lab.config_dir], grpc_port=port))
    await eventually(
        lambda: lab.state.workload(uid("dave-1")) is not None and lab.state.workload(uid("carol-1")) is None,
        within=WAIT,
        what="converged after the restart",
    )
    await converged(lab)
    subscriptions = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "xDS subscription"]
    # The reconnecting client announced everything it held (initial_resource_versions).
    assert {"Address": len(held_before), "Authorization": 1} in (
        {f["type"]: f["initial_versions"] for f in subscriptions[i : i + 2]}
        for i in range(len(subscriptions))
    )
    assert lab.client.connections >= 2


async def test_reconnect_receives_only_what_changed(lab: Lab) -> None:
    """With the versions it holds announced, a reconnecting client gets exactly the differences."""
    lab.client.start()
    await asyncio.wait_for(lab.client.ready.wait(), WAIT)
    await converged(lab)
    port = lab.app.grpc_port
    # The client is paused while the controller restarts, so that it reconnects only to a controller
    # that has translated its configuration (see the report on streams opened before that).
    await lab.client.close()
    await lab.app.stop()
    (lab.config_dir / "30-extra.yaml").unlink()
    write_manifests(
        lab.config_dir / "40-dave.yaml",
        m.pod("default", "dave-1", service_account="dave", node="node-a", ip="10.244.1.12"),
    )
    lab.app = await start_controller(controller_config(lab.state_dir, [lab.config_dir], grpc_port=port))
    lab.changes.clear()
    lab.client.start()
    await converged(lab)
    changed_workloads = set().union(*(c.workloads for c in lab.changes))
    assert changed_workloads == {uid("carol-1"), uid("dave-1")}
    assert not any(c.services or c.policies for c in lab.changes)
    assert lab.state.workload(uid("carol-1")) is None and lab.state.workload(uid("dave-1")) is not None
    assert lab.client.connections == 2


async def test_unreadable_credential_is_retried(lab: Lab) -> None:
    token_file = lab.tmp / "istio-token"
    token = token_file.read_text()
    token_file.unlink()
    lab.client.start()
    await eventually(
        lambda: (
            metric_value(lab.exposition, "istio_xds_connection_terminations_total", {"reason": "Error"}) >= 2
        ),
        within=WAIT,
        what="failed attempts",
    )
    assert "cannot read the node credential" in lab.client.last_error
    token_file.write_text(token)
    await asyncio.wait_for(lab.client.ready.wait(), WAIT)


# ----------------------------------------------------------------------------------- fake control plane


def authorization(name: str, action: int = authorization_pb2.ALLOW) -> discovery_pb2.Resource:
    policy = authorization_pb2.Authorization(
        name=name,
        namespace="default",
        scope=authorization_pb2.WORKLOAD_SELECTOR,
        action=action,  # type: ignore[arg-type]
        groups=[authorization_pb2.Group(rules=[authorization_pb2.Rules()])],
    )
    return discovery_pb2.Resource(
        name=f"default/{name}", version="1", resource={"type_url": AUTHZ, "value": policy.SerializeToString()}
    )


def workload_resource(name: str, *addresses: bytes, policies: tuple[str, ...] = ()) -> discovery_pb2.Resource:
    address = workload_pb2.Address()
    w = address.workload
    w.uid, w.name, w.namespace, w.node = uid(name), name, "default", "node-a"
    w.addresses.extend(addresses)
    w.tunnel_protocol = workload_pb2.HBONE
    w.authorization_policies.extend(policies)
    return discovery_pb2.Resource(
        name=uid(name), version="1", resource={"type_url": ADDR, "value": address.SerializeToString()}
    )


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeControlPlane]:
    plane = FakeControlPlane(tmp_path / "fake")
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


async def test_malformed_resources_are_nacked_by_name_and_the_rest_applied(
    fake: FakeControlPlane,
) -> None:
    state = ProxyState("node-a")
    registry = CollectorRegistry()
    client = XdsClient(
        fake.address, fake.root_pem, lambda: "lab-token", "node-a", state, registry=registry, backoff=FAST
    )
    client.start()
    try:
        await eventually(lambda: len(fake.requests) >= 2, within=WAIT, what="opening requests")
        opening = fake.requests[:2]
        assert [r.type_url for r in opening] == [AUTHZ, ADDR]
        assert opening[0].node.metadata.fields["NODE_NAME"].string_value == "node-a"
        assert opening[0].node.id.startswith("ztunnel~")

        fake.responses.put_nowait(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=AUTHZ, nonce="a1", resources=[authorization("good"), authorization("bad", action=7)]
            )
        )
        fake.responses.put_nowait(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=ADDR,
                nonce="w1",
                resources=[
                    workload_resource("guarded", bytes([10, 0, 0, 1]), policies=("default/bad",)),
                    workload_resource("open", bytes([10, 0, 0, 2])),
                    workload_resource("mangled", bytes([10, 0, 0])),
                ],
            )
        )
        await eventually(lambda: len(fake.requests) >= 4, within=WAIT, what="ACK/NACKs")
        authz_reply, addr_reply = fake.requests[2:4]
        assert (authz_reply.type_url, authz_reply.response_nonce) == (AUTHZ, "a1")
        assert authz_reply.error_detail.code == 3
        assert "default/bad" in authz_reply.error_detail.message
        assert "unknown action 7" in authz_reply.error_detail.message
        assert "default/good" not in authz_reply.error_detail.message
        assert (addr_reply.type_url, addr_reply.response_nonce) == (ADDR, "w1")
        assert uid("mangled") in addr_reply.error_detail.message
        assert uid("open") not in addr_reply.error_detail.message
        assert client.ready.is_set()

        assert isinstance(state.policies.get("default/good"), CompiledPolicy)
        assert isinstance(state.policies.get("default/bad"), BrokenPolicy)
        guarded, opened = state.workload(uid("guarded")), state.workload(uid("open"))
        assert guarded is not None and opened is not None and state.workload(uid("mangled")) is None
        peer = Identity("cluster.local", "default", "client")
        denied = state.authorize(guarded, Connection.of(peer, "10.0.9.9", "10.0.0.1", 80))
        assert not denied.allowed and denied.reason is DecisionReason.INVALID_POLICY
        assert state.authorize(opened, Connection.of(peer, "10.0.9.9", "10.0.0.2", 80)).allowed
        text = generate_latest(registry).decode()
        assert metric_value(text, "loom_xds_rejected_resources_total", {"url": AUTHZ}) == 1
        assert metric_value(text, "loom_xds_rejected_resources_total", {"url": ADDR}) == 1

        # An oversized message ends the stream, not the proxy: the state stays and the client
        # reconnects announcing what it holds (the NACKed workload is not among it).
        fake.responses.put_nowait(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=ADDR, nonce="w2", system_version_info="x" * (5 * 1024 * 1024)
            )
        )
        await eventually(lambda: len(fake.requests) >= 6, within=WAIT, what="reconnect")
        reopened = fake.requests[4:6]
        assert reopened[0].HasField("node")
        assert dict(reopened[0].initial_resource_versions) == {"default/good": "1", "default/bad": "1"}
        assert dict(reopened[1].initial_resource_versions) == {uid("guarded"): "1", uid("open"): "1"}
        assert "RESOURCE_EXHAUSTED" in client.last_error
        assert state.workload(uid("open")) is not None
    finally:
        await client.close()
