"""Waypoints and the controller, end to end on loopback: a waypoint (waypoint/xds.py's real client)
gets exactly its own WaypointConfig plus the addresses, and updates when routes and policies change;
node proxies never see WaypointConfig; a waypoint cannot reach for another waypoint's configuration,
nor for policies or identities that are not its own (fail closed)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from control_harness import RawStream, waypoint_settings
from grpclib.const import Status

from controller.app import ControllerApp
from controller.xds.resources import WAYPOINT_CONFIG_TYPE_URL
from loom.identity import Identity
from loom.testing.controller import WAIT, controller_config, running_controller, write_manifests
from loom.testing.waiting import eventually
from waypoint.xds import WaypointView, WaypointXds
from ztunnel.identity.caclient import CaClient, CertificateRefused
from ztunnel.xds import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Backoff, NodeInfo

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def ns(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def gateway(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def service(name: str, ip: str, waypoint: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": {"istio.io/use-waypoint": waypoint}},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
            "clusterIP": ip,
        },
    }


def pod(name: str, app: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"serviceAccountName": app, "nodeName": "node-a", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def route(name: str, backend: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
            "rules": [{"backendRefs": [{"name": backend, "port": 9080}]}],
        },
    }


def deny(methods: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": methods}}]}],
        },
    }


@dataclass
class Env:
    app: ControllerApp
    config: Path
    tmp: Path


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    config = tmp_path / "config"
    config.mkdir()
    write_manifests(
        config / "base.yaml",
        ns("default", AMBIENT),
        gateway("waypoint"),
        gateway("second"),
        service("reviews", "10.96.0.11", "waypoint"),
        service("details", "10.96.0.13", "second"),
        pod("reviews-1", "reviews", "10.244.0.11"),
        pod("details-1", "details", "10.244.0.13"),
    )
    write_manifests(config / "route.yaml", route("reviews", "reviews"))
    write_manifests(config / "policy.yaml", deny(["DELETE"]))
    async with running_controller(controller_config(tmp_path / "state", [config])) as app:
        yield Env(app, config, tmp_path)


def served(app: ControllerApp) -> dict[str, str]:
    assert app.xds is not None
    return app.xds.served.versions(WAYPOINT_CONFIG_TYPE_URL)


async def test_waypoint_gets_exactly_its_config_and_the_addresses_and_follows_changes(env: Env) -> None:
    settings = waypoint_settings(env.app, env.tmp, "default", "waypoint", "waypoint")
    xds = WaypointXds(settings, backoff=Backoff(0.01, 0.2))
    xds.start()
    try:
        await eventually(lambda: xds.ready.is_set(), within=WAIT, what="waypoint ready")
        assert set(served(env.app)) == {"default/waypoint", "default/second"}
        assert xds.session.held(WAYPOINT_CONFIG_TYPE_URL) == {
            "default/waypoint": served(env.app)["default/waypoint"]
        }
        view = xds.config.view
        assert view is not None
        assert [s.name for s in view.services] == ["reviews"]
        assert [r.name for r in view.routes] == ["reviews"]
        assert [p.name for p in view.policies] == ["deny"]
        assert str(view.identity) == "spiffe://cluster.local/ns/default/sa/waypoint"
        # The same addresses a node proxy gets.
        assert env.app.xds is not None
        assert xds.session.held(ADDRESS_TYPE_URL) == env.app.xds.served.versions(ADDRESS_TYPE_URL)

        # A route changes: the new version arrives.
        write_manifests(env.config / "route.yaml", route("reviews", "details"))

        def backend() -> str:
            current: WaypointView | None = xds.config.view
            return current.routes[0].rules[0].backend_refs[0].name if current and current.routes else ""

        await eventually(lambda: backend() == "details", within=WAIT, what="the route update")

        # A policy changes, then goes away.
        write_manifests(env.config / "policy.yaml", deny(["DELETE", "PUT"]))

        def methods() -> tuple[str, ...]:
            current = xds.config.view
            if current is None or not current.policies or current.policies[0].rules is None:
                return ()
            return current.policies[0].rules[0].operations[0].methods

        await eventually(lambda: methods() == ("DELETE", "PUT"), within=WAIT, what="the policy update")
        (env.config / "policy.yaml").unlink()
        await eventually(lambda: xds.config.view is not None and not xds.config.view.policies, within=WAIT)

        # Its Gateway is deleted: the configuration is removed (the waypoint then refuses everything).
        write_manifests(
            env.config / "base.yaml",
            ns("default", AMBIENT),
            gateway("second"),
            service("reviews", "10.96.0.11", "waypoint"),
        )
        await eventually(lambda: xds.config.view is None, within=WAIT, what="the configuration removal")
    finally:
        await xds.close()


async def test_node_proxies_never_get_waypoint_configs(env: Env) -> None:
    node = NodeInfo("node-a").to_proto()
    stream = RawStream(env.app, env.app.issue_node_token("node-a"), node)
    try:
        await stream.send(AUTHORIZATION_TYPE_URL)
        await stream.send(ADDRESS_TYPE_URL)
        types = {(await stream.recv()).type_url, (await stream.recv()).type_url}
        assert types == {AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL}
        await stream.send(WAYPOINT_CONFIG_TYPE_URL)
        assert await stream.status() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await stream.close()


def waypoint_node(name: str) -> Any:
    return NodeInfo(
        "", pod_namespace="default", proxy_type="waypoint", extra_metadata=(("WAYPOINT_NAME", name),)
    ).to_proto()


@pytest.mark.parametrize(
    ("claimed", "type_url", "names"),
    [
        pytest.param(
            "waypoint", WAYPOINT_CONFIG_TYPE_URL, ["default/second"], id="another waypoint's config by name"
        ),
        pytest.param(
            "waypoint", WAYPOINT_CONFIG_TYPE_URL, ["default/waypoint", "default/second"], id="own + another"
        ),
        pytest.param("second", WAYPOINT_CONFIG_TYPE_URL, [], id="claims to be another waypoint"),
        pytest.param("waypoint", AUTHORIZATION_TYPE_URL, [], id="the node proxies' L4 policies"),
    ],
)
async def test_a_waypoint_cannot_reach_beyond_its_own(
    env: Env, claimed: str, type_url: str, names: list[str]
) -> None:
    stream = RawStream(env.app, env.app.issue_waypoint_token("default", "waypoint"), waypoint_node(claimed))
    try:
        await stream.send(type_url, names)
        assert await stream.status() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await stream.close()


async def test_a_wildcard_waypoint_stream_carries_its_config_only(env: Env) -> None:
    stream = RawStream(
        env.app, env.app.issue_waypoint_token("default", "waypoint"), waypoint_node("waypoint")
    )
    try:
        await stream.send(WAYPOINT_CONFIG_TYPE_URL)
        response = await stream.recv()
        assert response.type_url == WAYPOINT_CONFIG_TYPE_URL
        assert [r.name for r in response.resources] == ["default/waypoint"]
        # Explicitly its own: allowed (and answered again, as every explicit subscription is).
        await stream.send(WAYPOINT_CONFIG_TYPE_URL, ["default/waypoint"])
        again = await stream.recv()
        assert [r.name for r in again.resources] == ["default/waypoint"]
        await stream.send(ADDRESS_TYPE_URL)
        assert (await stream.recv()).type_url == ADDRESS_TYPE_URL
    finally:
        await stream.close()


async def test_ca_issues_a_waypoint_its_identity_and_refuses_others(env: Env) -> None:
    settings = waypoint_settings(env.app, env.tmp, "default", "waypoint", "waypoint")
    ca = CaClient(settings.ca_address, settings.root_cert, settings.token_source, ttl=dt.timedelta(hours=1))
    try:
        certificate = await ca.fetch_certificate(settings.identity)  # verified: SAN, key, chain
        assert certificate.identity == Identity("cluster.local", "default", "waypoint")
        for other in (
            Identity("cluster.local", "default", "reviews"),  # a workload on the node
            Identity("cluster.local", "default", "second"),  # another waypoint
        ):
            with pytest.raises(CertificateRefused) as refused:
                await ca.fetch_certificate(other)
            assert refused.value.code is Status.UNAUTHENTICATED
        # The Gateway goes away: its credential stops working at once.
        write_manifests(env.config / "base.yaml", ns("default", AMBIENT), gateway("second"))
        await eventually(lambda: "default/waypoint" not in served(env.app), within=WAIT)
        with pytest.raises(CertificateRefused):
            await ca.fetch_certificate(settings.identity)
    finally:
        await ca.close()
