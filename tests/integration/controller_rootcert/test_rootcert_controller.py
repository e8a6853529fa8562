"""loom-controller with --kubernetes publishes istio-ca-root-cert in every namespace, as istiod does: the
whole controller (plugged-in CA, KubernetesSource) against the stand-in API server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest
from rootcert_harness import FAST, WAIT, config_map, foreign_config_map, make_cacerts, root_in

from controller.app import ControllerApp
from controller.rootcert import LABEL_MANAGED_BY, MANAGED_BY
from controller.sources.kubernetes import KubernetesSource
from loom.testing import manifests as m
from loom.testing.controller import controller_config, metric_value, running_controller
from loom.testing.fake_apiserver import FakeApiServer
from loom.testing.waiting import eventually

pytestmark = pytest.mark.timeout(60)

SERVED = ("default", "istio-system", "kube-system", "shop")


def start_cluster(api: FakeApiServer) -> None:
    for name in (*SERVED, "kube-node-lease", "legacy"):
        api.add(m.namespace(name))
    # What the README told users to create by hand before loom published it: left alone.
    api.add(foreign_config_map("legacy", "made by hand\n"))


async def metrics_of(app: ControllerApp) -> str:
    url = f"http://127.0.0.1:{app.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def trusted_by(root_pem: str, app: ControllerApp) -> bool:
    """Whether a TLS client trusting only `root_pem` (what ztunnel mounts) accepts the controller."""
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem.encode())
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 2.0)
        except TimeoutError:
            return False
    return True


async def test_every_namespace_gets_the_cas_root_and_new_namespaces_follow(tmp_path: Path) -> None:
    root = make_cacerts(tmp_path / "cacerts")
    async with FakeApiServer() as api:
        start_cluster(api)
        config = controller_config(
            tmp_path / "state", kubernetes=True, extra=["--cacerts-dir", str(tmp_path / "cacerts")]
        )
        source = KubernetesSource.from_url(api.url, settings=FAST)
        async with running_controller(config, source=source) as app:
            publisher = app.root_certs
            assert publisher is not None
            # Wait for the publisher's own account of its pass, not for the ConfigMaps in the API server:
            # the server stores the last one before the publisher has its answer, and the publisher
            # records a pass (published, foreign, the gauges) only once every namespace of it is done.
            await eventually(
                lambda: set(publisher.published) == set(SERVED), WAIT, what="ConfigMaps published"
            )
            assert publisher.published == dict.fromkeys(SERVED, root)
            for namespace in SERVED:
                assert root_in(api, namespace) == root == app.root_cert_pem
                stored = config_map(api, namespace)
                assert stored is not None and stored["metadata"]["labels"][LABEL_MANAGED_BY] == MANAGED_BY
            assert config_map(api, "kube-node-lease") is None
            assert root_in(api, "legacy") == "made by hand\n"
            assert publisher.foreign == ("legacy",)
            # What ztunnel mounts is what the controller's serving certificate chains to.
            assert await trusted_by(str(root_in(api, "istio-system")), app)

            api.add(m.namespace("payments"))
            await eventually(lambda: "payments" in publisher.published, WAIT, what="new namespace")
            assert publisher.published["payments"] == root and root_in(api, "payments") == root

            exposition = await metrics_of(app)
            assert metric_value(exposition, "loom_root_cert_configmaps", {"state": "published"}) == 5
            assert metric_value(exposition, "loom_root_cert_configmaps", {"state": "foreign"}) == 1
            assert metric_value(exposition, "loom_root_cert_configmaps", {"state": "failed"}) == 0


async def test_a_restart_with_another_ca_replaces_the_root_everywhere(tmp_path: Path) -> None:
    first = make_cacerts(tmp_path / "cacerts-1")
    second = make_cacerts(tmp_path / "cacerts-2")
    assert first != second
    async with FakeApiServer() as api:
        start_cluster(api)
        for cacerts, root in ((tmp_path / "cacerts-1", first), (tmp_path / "cacerts-2", second)):
            config = controller_config(
                tmp_path / "state", kubernetes=True, extra=["--cacerts-dir", str(cacerts)]
            )
            source = KubernetesSource.from_url(api.url, settings=FAST)
            async with running_controller(config, source=source) as app:
                await eventually(
                    lambda: all(root_in(api, ns) == app.root_cert_pem for ns in SERVED),
                    WAIT,
                    what="every namespace holding the CA's root",
                )
                assert app.root_cert_pem == root
                assert await trusted_by(root, app)
        assert root_in(api, "legacy") == "made by hand\n"


async def test_directory_mode_publishes_no_configmap(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    async with running_controller(controller_config(tmp_path / "state", [config_dir])) as app:
        assert app.root_certs is None
