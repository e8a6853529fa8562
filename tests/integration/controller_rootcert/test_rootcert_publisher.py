"""The root certificate publisher against the stand-in API server, writing through `KubernetesSource`
(real HTTP): every namespace gets istio-ca-root-cert with the root, a new namespace gets one, a deleted
or edited one is restored, a root change reaches every namespace, a ConfigMap that is not loom's is left
alone (and reported), failures are retried, and a pass with nothing to do sends nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rootcert_harness import (
    FAST,
    ROOT_A,
    ROOT_B,
    WAIT,
    config_map,
    configmap_requests,
    configmap_writes,
    fields_of,
    foreign_config_map,
    root_in,
)

from controller.rootcert import (
    LABEL_MANAGED_BY,
    MANAGED_BY,
    ROOT_CERT_KEY,
    RootCertPublisher,
    namespace_names,
)
from controller.sources.kubernetes import KubernetesApiError, KubernetesSource
from loom.resources.diagnostics import Diagnostic
from loom.resources.model import ConfigSnapshot, ResourceKey
from loom.testing import manifests as m
from loom.testing.controller import metric_value
from loom.testing.fake_apiserver import FakeApiServer
from loom.testing.waiting import eventually

pytestmark = pytest.mark.timeout(60)

NAMESPACES = ("default", "istio-system", "shop")


@dataclass
class Setup:
    api: FakeApiServer
    source: KubernetesSource
    publisher: RootCertPublisher
    registry: CollectorRegistry
    root: list[str] = field(default_factory=lambda: [ROOT_A])  # tests replace it to rotate the root

    def gauge(self, state: str) -> float:
        exposition = generate_latest(self.registry).decode()
        return metric_value(exposition, "loom_root_cert_configmaps", {"state": state})

    def writes_total(self) -> float:
        return metric_value(generate_latest(self.registry).decode(), "loom_root_cert_writes_total")


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    async with FakeApiServer() as api:
        for name in NAMESPACES:
            api.add(m.namespace(name))
        async with KubernetesSource.from_url(api.url, settings=FAST) as source:
            registry = CollectorRegistry(auto_describe=True)
            root = [ROOT_A]
            publisher = RootCertPublisher(source, lambda: root[0], registry=registry)
            yield Setup(api, source, publisher, registry, root)


async def test_every_namespace_gets_the_root_labelled_as_loom_s(setup: Setup) -> None:
    report = await setup.publisher.publish(NAMESPACES)
    assert report.written == NAMESPACES and report.failed == () and report.retry_after is None
    for namespace in NAMESPACES:
        stored = config_map(setup.api, namespace)
        assert stored is not None
        assert stored["data"] == {ROOT_CERT_KEY: ROOT_A}
        assert stored["metadata"]["labels"][LABEL_MANAGED_BY] == MANAGED_BY
    assert setup.publisher.published == dict.fromkeys(NAMESPACES, ROOT_A)
    assert setup.gauge("published") == 3 and setup.gauge("foreign") == 0 and setup.gauge("failed") == 0
    assert setup.writes_total() == 3


async def test_a_pass_with_nothing_new_sends_nothing_and_a_resync_only_reads(setup: Setup) -> None:
    await setup.publisher.publish(NAMESPACES)
    before = len(setup.api.requests)
    report = await setup.publisher.publish(NAMESPACES)
    assert report.checked == 0 and configmap_requests(setup.api, before) == 0
    report = await setup.publisher.publish(NAMESPACES, resync=True)
    assert report.checked == 3 and report.written == ()
    assert configmap_requests(setup.api, before) == 3 and configmap_writes(setup.api, before) == []


async def test_a_new_namespace_gets_one_and_a_gone_one_is_forgotten(setup: Setup) -> None:
    await setup.publisher.publish(NAMESPACES)
    before = len(setup.api.requests)
    report = await setup.publisher.publish([*NAMESPACES, "payments"])
    assert report.written == ("payments",) and report.checked == 1
    assert root_in(setup.api, "payments") == ROOT_A
    assert configmap_writes(setup.api, before) == [("POST", "/api/v1/namespaces/payments/configmaps")]
    await setup.publisher.publish(["default", "payments"])
    assert set(setup.publisher.published) == {"default", "payments"}
    assert setup.gauge("published") == 2


async def test_deleted_and_edited_configmaps_are_restored_on_resync(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    await setup.publisher.publish(NAMESPACES)
    setup.api.delete("ConfigMap", "default", "istio-ca-root-cert")
    edited = config_map(setup.api, "shop")
    assert edited is not None
    edited["data"][ROOT_CERT_KEY] = ROOT_B
    setup.api.update(edited)
    # Without a resync nothing is read: ConfigMaps are not watched.
    assert (await setup.publisher.publish(NAMESPACES)).checked == 0
    with caplog.at_level(logging.WARNING, logger="controller.rootcert"):
        report = await setup.publisher.publish(NAMESPACES, resync=True)
    assert report.written == ("default", "shop")
    assert root_in(setup.api, "default") == ROOT_A and root_in(setup.api, "shop") == ROOT_A
    restored = [r for r in caplog.records if "restored" in r.getMessage()]
    assert sorted(fields_of(r)["namespace"] for r in restored) == ["default", "shop"]


async def test_a_new_root_reaches_every_namespace(setup: Setup) -> None:
    await setup.publisher.publish(NAMESPACES)
    setup.root[0] = ROOT_A + ROOT_B  # a root rotation: both roots trusted for a while
    report = await setup.publisher.publish(NAMESPACES)
    assert report.written == NAMESPACES
    assert all(root_in(setup.api, ns) == ROOT_A + ROOT_B for ns in NAMESPACES)
    setup.root[0] = ROOT_B
    await setup.publisher.publish(NAMESPACES)
    assert all(root_in(setup.api, ns) == ROOT_B for ns in NAMESPACES)
    assert setup.writes_total() == 9


async def test_a_foreign_configmap_is_left_alone_reported_and_handed_over_by_label(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    setup.api.add(foreign_config_map("shop"))
    with caplog.at_level(logging.WARNING, logger="controller.rootcert"):
        report = await setup.publisher.publish(NAMESPACES)
        again = await setup.publisher.publish(NAMESPACES, resync=True)
    assert report.written == ("default", "istio-system") and report.foreign == ("shop",)
    assert again.written == () and again.foreign == ("shop",)
    assert setup.publisher.foreign == ("shop",)
    assert root_in(setup.api, "shop") == "hand-made\n"
    stored = config_map(setup.api, "shop")
    assert stored is not None and "labels" not in stored["metadata"]
    assert setup.gauge("foreign") == 1 and setup.gauge("published") == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning while it lasts, not one per pass"
    assert "not managed by loom" in warnings[0] and f"{LABEL_MANAGED_BY}={MANAGED_BY}" in warnings[0]
    # Labelled by its owner: loom takes it over at the next resync.
    stored["metadata"]["labels"] = {LABEL_MANAGED_BY: MANAGED_BY}
    setup.api.update(stored)
    report = await setup.publisher.publish(NAMESPACES, resync=True)
    assert report.written == ("shop",) and report.foreign == ()
    assert root_in(setup.api, "shop") == ROOT_A and setup.gauge("foreign") == 0


async def test_a_deleted_foreign_configmap_makes_way_for_loom_s(setup: Setup) -> None:
    setup.api.add(foreign_config_map("shop", ROOT_A))
    assert (await setup.publisher.publish(NAMESPACES)).foreign == ("shop",)
    setup.api.delete("ConfigMap", "shop", "istio-ca-root-cert")
    # Foreign namespaces are looked at again on resync only.
    assert (await setup.publisher.publish(NAMESPACES)).checked == 0
    report = await setup.publisher.publish(NAMESPACES, resync=True)
    assert report.written == ("shop",) and report.foreign == ()
    stored = config_map(setup.api, "shop")
    assert stored is not None and stored["metadata"]["labels"][LABEL_MANAGED_BY] == MANAGED_BY


async def test_failures_are_reported_retried_with_backoff_and_do_not_stop_the_others(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    setup.api.fail_next("configmaps", 500, verb="create", count=2)
    with caplog.at_level(logging.WARNING, logger="controller.rootcert"):
        first = await setup.publisher.publish(NAMESPACES)
        second = await setup.publisher.publish(NAMESPACES)
    assert len(first.failed) == 2 and len(first.written) == 1
    assert first.retry_after is not None and first.retry_after > 0
    assert second.written == first.failed and second.retry_after is None
    assert all(root_in(setup.api, ns) == ROOT_A for ns in NAMESPACES)
    assert setup.gauge("failed") == 0 and setup.gauge("published") == 3
    failures = [r for r in caplog.records if "could not publish" in r.getMessage()]
    assert len(failures) == 2 and all("500" in fields_of(r)["error"] for r in failures)


async def test_backoff_grows_while_failures_last(setup: Setup) -> None:
    setup.api.fail_next("configmaps", 503, verb="get", count=1000)
    delays = [(await setup.publisher.publish(["default"])).retry_after for _ in range(4)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    for _ in range(10):
        capped = (await setup.publisher.publish(["default"])).retry_after
    assert capped == 30.0
    assert setup.gauge("failed") == 1


class _Terminating:
    """A writer whose namespace is being deleted: the API server refuses new content with this 403."""

    def __init__(self) -> None:
        self.writes = 0

    async def get_object(self, key: ResourceKey) -> dict[str, Any] | None:
        return None

    async def create_or_update(self, manifest: Any) -> dict[str, Any]:
        self.writes += 1
        raise KubernetesApiError(
            "POST",
            "/api/v1/namespaces/old/configmaps",
            403,
            "Forbidden",
            'configmaps "istio-ca-root-cert" is forbidden: unable to create new content in namespace old '
            "because it is being terminated",
        )


async def test_a_namespace_being_deleted_is_skipped_until_the_next_resync() -> None:
    writer = _Terminating()
    publisher = RootCertPublisher(writer, lambda: ROOT_A)
    report = await publisher.publish(["old"])
    assert report.failed == () and report.retry_after is None and writer.writes == 1
    await publisher.publish(["old"])
    assert writer.writes == 1
    await publisher.publish(["old"], resync=True)
    assert writer.writes == 2


async def test_run_follows_namespaces_from_snapshots_and_restores_on_resync(setup: Setup) -> None:
    """The loop as the controller runs it, fed by the source's own snapshots."""
    setup.publisher.resync_seconds = 0.05
    wake = asyncio.Event()
    latest: list[ConfigSnapshot] = [ConfigSnapshot()]

    def on_change(snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        latest[0] = snapshot
        wake.set()

    watching = asyncio.create_task(setup.source.run(on_change))
    running = asyncio.create_task(setup.publisher.run(wake, lambda: namespace_names(latest[0])))
    try:
        await eventually(
            lambda: all(root_in(setup.api, ns) == ROOT_A for ns in NAMESPACES), WAIT, what="published"
        )
        setup.api.add(m.namespace("payments"))
        await eventually(lambda: root_in(setup.api, "payments") == ROOT_A, WAIT, what="new namespace")
        setup.api.delete("ConfigMap", "shop", "istio-ca-root-cert")
        await eventually(lambda: root_in(setup.api, "shop") == ROOT_A, WAIT, what="restored")
    finally:
        for task in (running, watching):
            task.cancel()
        await asyncio.gather(running, watching, return_exceptions=True)


async def test_run_waits_for_the_first_snapshot(setup: Setup) -> None:
    wake = asyncio.Event()
    running = asyncio.create_task(setup.publisher.run(wake, lambda: NAMESPACES))
    try:
        await asyncio.sleep(0.05)
        assert configmap_requests(setup.api) == 0
        wake.set()
        await eventually(lambda: root_in(setup.api, "shop") == ROOT_A, WAIT, what="published")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
