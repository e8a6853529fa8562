"""KubernetesSource against the stand-in API server: list+watch, resume, relist, faults, and writes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.sources.kubernetes import (
    KubernetesApiError,
    KubernetesSource,
    KubernetesSourceSettings,
    KubernetesUnreachable,
)
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import AuthorizationPolicy, ConfigSnapshot, Gateway, Pod, ResourceKey
from loom.testing import FakeApiServer, FakeToken, RecordedRequest
from loom.testing import manifests as m
from loom.testing.waiting import eventually

# Everything small, so faults heal within tens of milliseconds.
FAST = KubernetesSourceSettings(
    watch_timeout=30,
    missing_retry=0.2,
    backoff_initial=0.01,
    backoff_max=0.05,
    debounce=0.01,
    max_delay=0.5,
    request_timeout=5,
)

State = tuple[ConfigSnapshot, tuple[Diagnostic, ...]]


class Recorder:
    """Collects on_change calls; waits (bounded) for one that satisfies a predicate."""

    def __init__(self) -> None:
        self.calls: list[State] = []
        self._arrived = asyncio.Event()

    def __call__(self, snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        self.calls.append((snapshot, diagnostics))
        self._arrived.set()

    async def wait_for(
        self, predicate: Callable[[ConfigSnapshot, tuple[Diagnostic, ...]], bool], within: float = 5.0
    ) -> State:
        async with asyncio.timeout(within):
            while True:
                if self.calls and predicate(*self.calls[-1]):
                    return self.calls[-1]
                self._arrived.clear()
                await self._arrived.wait()


def pod_key(name: str, namespace: str = "default") -> ResourceKey:
    return ResourceKey("Pod", namespace, name)


@contextlib.asynccontextmanager
async def running(source: KubernetesSource, recorder: Recorder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(recorder), name="kubernetes-source-under-test")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        server.add(m.namespace("default", {"istio.io/dataplane-mode": "ambient"}))
        yield server


@pytest.fixture
async def source(api: FakeApiServer) -> AsyncIterator[KubernetesSource]:
    async with KubernetesSource.from_url(api.url, settings=FAST) as src:
        yield src


def populate(api: FakeApiServer) -> None:
    api.add(m.service_account("default", "client"))
    api.add(
        m.pod("default", "client-1", labels={"app": "client"}, service_account="client", ip="10.244.0.11")
    )
    api.add(m.pod("default", "server-1", labels={"app": "server"}, ip="10.244.0.12"))
    api.add(m.service("default", "server", selector={"app": "server"}))
    api.add(m.authorization_policy("default", "allow-client"))
    api.add(m.peer_authentication("default"))
    api.add(m.waypoint_gateway("default"))
    api.add(m.http_route("default", "to-server", service="server", backend="server"))


def watches_of(api: FakeApiServer, resource: str) -> list[RecordedRequest]:
    return api.requests_for(resource, watch=True)


async def test_first_snapshot_holds_every_kind(api: FakeApiServer, source: KubernetesSource) -> None:
    populate(api)
    recorder = Recorder()
    async with running(source, recorder):
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: True)
        await api.wait_until(lambda: api.open_watches() == 8)
    assert diagnostics == ()
    kinds = {key.kind for key in snapshot}
    assert kinds == {
        "Namespace",
        "ServiceAccount",
        "Pod",
        "Service",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "Gateway",
        "HTTPRoute",
    }
    assert len(recorder.calls) == 1
    server = snapshot.get_obj(Pod, "default", "server-1")
    assert server is not None and server.ips == ("10.244.0.12",)
    # Every resource was listed (cluster-wide) before it was watched, from the list's revision.
    for resource in ("namespaces", "pods", "gateways"):
        requests = api.requests_for(resource)
        assert not requests[0].is_watch and requests[0].path.count("/namespaces/") == 0
        first_watch = next(r for r in requests if r.is_watch)
        assert first_watch.query["allowWatchBookmarks"] == "true"
        assert first_watch.query["resourceVersion"] != ""


async def test_added_modified_deleted_propagate(api: FakeApiServer, source: KubernetesSource) -> None:
    recorder = Recorder()
    async with running(source, recorder):
        await recorder.wait_for(lambda s, d: True)
        await api.wait_until(lambda: api.open_watches() == 8)

        api.add(m.pod("default", "web-1", labels={"app": "web"}))
        await recorder.wait_for(lambda s, d: pod_key("web-1") in s)

        changed = m.pod("default", "web-1", labels={"app": "web", "version": "v2"})
        api.update(changed)
        snapshot, _ = await recorder.wait_for(
            lambda s, d: pod_key("web-1") in s and s[pod_key("web-1")].meta.labels.get("version") == "v2"
        )

        api.delete("Pod", "default", "web-1")
        snapshot, _ = await recorder.wait_for(lambda s, d: pod_key("web-1") not in s)
    assert ResourceKey("Namespace", "", "default") in snapshot


async def test_burst_of_events_is_coalesced(api: FakeApiServer) -> None:
    settings = KubernetesSourceSettings(debounce=0.05, max_delay=2.0, backoff_initial=0.01, backoff_max=0.05)
    recorder = Recorder()
    async with KubernetesSource.from_url(api.url, settings=settings) as source, running(source, recorder):
        await recorder.wait_for(lambda s, d: True)
        await api.wait_until(lambda: api.open_watches() == 8)
        before = len(recorder.calls)
        for i in range(300):
            api.add(m.pod("default", f"burst-{i}", ip=f"10.244.1.{i % 250 + 1}"))
        await recorder.wait_for(lambda s, d: len(s.of_kind(Pod)) == 300)
    # 300 events became a handful of snapshots, not 300.
    assert len(recorder.calls) - before <= 3


async def test_bookmark_advances_the_resume_point(api: FakeApiServer, source: KubernetesSource) -> None:
    recorder = Recorder()
    async with running(source, recorder):
        await recorder.wait_for(lambda s, d: True)
        await api.wait_until(lambda: api.open_watches() == 8)
        listed_at = watches_of(api, "pods")[-1].query["resourceVersion"]
        # Move the global revision on without touching pods, then bookmark: only the bookmark can tell
        # the pods watch about the newer revision.
        api.add(m.namespace("other"))
        await recorder.wait_for(lambda s, d: ResourceKey("Namespace", "", "other") in s)
        bookmark_rv = api.send_bookmark()
        assert str(bookmark_rv) != listed_at
        await api.wait_until(lambda: source.stats.events.get("BOOKMARK", 0) >= 8)
        notifications = len(recorder.calls)
        mark = len(api.requests)
        api.drop_watches()
        rewatch = await api.wait_for_request(lambda r: r.is_watch and r.path == "/api/v1/pods", after=mark)
        assert rewatch.query["resourceVersion"] == str(bookmark_rv)
        # Resuming from the bookmark replays nothing: the snapshot did not change.
        await api.wait_until(lambda: api.open_watches() == 8)
    assert len(recorder.calls) == notifications
    assert not any(r.is_list for r in api.requests[mark:] if r.path == "/api/v1/pods")


async def test_gone_relists_and_diffs_the_cache(api: FakeApiServer, source: KubernetesSource) -> None:
    api.add(m.pod("default", "doomed"))
    api.add(m.pod("default", "kept"))
    recorder = Recorder()
    async with running(source, recorder):
        await recorder.wait_for(lambda s, d: pod_key("doomed") in s)
        await api.wait_until(lambda: api.open_watches() == 8)
        mark = len(api.requests)
        # While the watches are down, a pod goes and another comes, and the history is compacted: the
        # source's resume point is too old, so it must relist and work out the deletion itself.
        api.drop_watches()
        api.delete("Pod", "default", "doomed")
        api.add(m.pod("default", "newcomer"))
        api.compact()
        snapshot, _ = await recorder.wait_for(
            lambda s, d: pod_key("doomed") not in s and pod_key("newcomer") in s
        )
    assert pod_key("kept") in snapshot
    assert source.stats.relists_after_gone >= 1
    pods_after = [r for r in api.requests[mark:] if r.path == "/api/v1/pods"]
    assert pods_after[0].is_watch  # first it tried to resume ...
    assert any(r.is_list for r in pods_after[1:])  # ... got 410 and listed again


async def test_abrupt_drop_resumes_the_watch_without_relisting(
    api: FakeApiServer, source: KubernetesSource
) -> None:
    recorder = Recorder()
    async with running(source, recorder):
        await recorder.wait_for(lambda s, d: True)
        await api.wait_until(lambda: api.open_watches() == 8)
        api.add(m.pod("default", "before-drop"))
        await recorder.wait_for(lambda s, d: pod_key("before-drop") in s)
        last_rv = api.get("Pod", "default", "before-drop")["metadata"]["resourceVersion"]  # type: ignore[index]
        mark = len(api.requests)
        assert api.drop_watches() == 8
        rewatch = await api.wait_for_request(lambda r: r.path == "/api/v1/pods", after=mark)
        assert rewatch.is_watch and rewatch.query["resourceVersion"] == last_rv
        await api.wait_until(lambda: api.open_watches() == 8)
        api.add(m.pod("default", "after-drop"))
        await recorder.wait_for(lambda s, d: pod_key("after-drop") in s)
    assert source.stats.relists_after_gone == 0


async def test_server_side_timeout_rewatches_from_last_revision(api: FakeApiServer) -> None:
    settings = KubernetesSourceSettings(
        watch_timeout=1, backoff_initial=0.01, backoff_max=0.05, debounce=0.01
    )
    recorder = Recorder()
    async with KubernetesSource.from_url(api.url, settings=settings) as source, running(source, recorder):
        await recorder.wait_for(lambda s, d: True)
        api.add(m.pod("default", "p"))
        await recorder.wait_for(lambda s, d: pod_key("p") in s)
        rv = api.get("Pod", "default", "p")["metadata"]["resourceVersion"]  # type: ignore[index]
        second = await api.wait_for_request(
            lambda r: r.path == "/api/v1/pods" and r.is_watch and r.query.get("resourceVersion") == rv,
            within=5,
        )
    assert second.query["timeoutSeconds"] == "1"
    assert len([r for r in api.requests_for("pods") if r.is_list]) == 1


async def test_missing_crd_warns_and_is_picked_up_once_installed(api: FakeApiServer) -> None:
    api.uninstall("gateways")
    api.add(m.pod("default", "p"))
    recorder = Recorder()
    async with KubernetesSource.from_url(api.url, settings=FAST) as source, running(source, recorder):
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: True)
        assert pod_key("p") in snapshot  # the other kinds work
        (warning,) = diagnostics
        assert warning.severity is Severity.WARNING
        assert "gateways.gateway.networking.k8s.io is not installed" in warning.message

        api.install("gateways")
        api.add(m.waypoint_gateway("default"))
        snapshot, diagnostics = await recorder.wait_for(
            lambda s, d: s.get_obj(Gateway, "default", "waypoint") is not None
        )
    assert diagnostics == ()


async def test_crd_removed_while_watching_empties_that_kind(
    api: FakeApiServer, source: KubernetesSource
) -> None:
    api.add(m.waypoint_gateway("default"))
    recorder = Recorder()
    async with running(source, recorder):
        await recorder.wait_for(lambda s, d: bool(s.of_kind(Gateway)))
        api.uninstall("gateways")
        _, diagnostics = await recorder.wait_for(lambda s, d: not s.of_kind(Gateway))
    assert [d.severity for d in diagnostics] == [Severity.WARNING]


async def test_list_errors_back_off_and_recover(api: FakeApiServer, source: KubernetesSource) -> None:
    api.add(m.pod("default", "p"))
    api.fail_next("pods", 500, count=3)
    recorder = Recorder()
    async with running(source, recorder):
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: True)
    # The first snapshot waited for pods: an empty pod list would have been a lie.
    assert pod_key("p") in snapshot and diagnostics == ()
    assert len(recorder.calls) == 1
    assert len([r for r in api.requests_for("pods") if r.is_list]) == 4


async def test_404_for_a_built_in_kind_is_an_outage_not_a_missing_crd(
    api: FakeApiServer, source: KubernetesSource
) -> None:
    api.add(m.pod("default", "p"))
    api.fail_next("pods", 404, count=2)  # e.g. a misrouted proxy; pods cannot be "not installed"
    recorder = Recorder()
    async with running(source, recorder):
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: True)
    assert pod_key("p") in snapshot and diagnostics == ()
    assert len(recorder.calls) == 1


async def test_failing_watch_request_backs_off_and_relists(
    api: FakeApiServer, source: KubernetesSource
) -> None:
    recorder = Recorder()
    async with running(source, recorder):
        await recorder.wait_for(lambda s, d: True)
        await api.wait_until(lambda: api.open_watches() == 8)
        mark = len(api.requests)
        api.fail_next("pods", 503, verb="watch", count=2)
        api.drop_watches()
        api.add(m.pod("default", "late"))
        await recorder.wait_for(lambda s, d: pod_key("late") in s)
    pods_after = [r for r in api.requests[mark:] if r.path == "/api/v1/pods"]
    assert any(r.is_list for r in pods_after)


async def test_invalid_object_is_a_diagnostic_and_the_rest_still_works(
    api: FakeApiServer, source: KubernetesSource
) -> None:
    api.add(m.authorization_policy("default", "good"))
    api.add(m.authorization_policy("default", "bad", action="PERMIT"))
    recorder = Recorder()
    bad = ResourceKey("AuthorizationPolicy", "default", "bad")
    async with running(source, recorder):
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: True)
        assert ResourceKey("AuthorizationPolicy", "default", "good") in snapshot
        stand_in = snapshot[bad]  # the invalid policy stands in as a deny-all (fail closed)
        assert isinstance(stand_in, AuthorizationPolicy) and stand_in.invalid
        assert diagnostics and all(d.is_error and d.key == bad for d in diagnostics)
        assert any("spec.action" in d.field for d in diagnostics)
        assert str(diagnostics[0]).startswith("kubernetes AuthorizationPolicy default/bad")

        api.update(m.authorization_policy("default", "bad", action="DENY"))
        snapshot, diagnostics = await recorder.wait_for(
            lambda s, d: bad in s and not getattr(s[bad], "invalid", True)
        )
    assert diagnostics == ()


async def test_objects_reach_the_parser_in_api_form(api: FakeApiServer, source: KubernetesSource) -> None:
    # List items of built-in kinds carry no kind/apiVersion and may carry managedFields.
    manifest = m.pod("default", "typed")
    manifest["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Update"}]
    api.add(manifest)
    recorder = Recorder()
    async with running(source, recorder):
        snapshot, _ = await recorder.wait_for(lambda s, d: pod_key("typed") in s)
    pod = snapshot[pod_key("typed")]  # parsed at all: kind/apiVersion were filled in for the loader
    assert isinstance(pod, Pod) and pod.spec.service_account == "default"


async def test_paginated_list(api: FakeApiServer) -> None:
    for i in range(25):
        api.add(m.pod("default", f"p{i:02}", ip=f"10.244.2.{i + 1}"))
    settings = KubernetesSourceSettings(page_size=10, debounce=0.01, backoff_initial=0.01, backoff_max=0.05)
    recorder = Recorder()
    async with KubernetesSource.from_url(api.url, settings=settings) as source, running(source, recorder):
        snapshot, _ = await recorder.wait_for(lambda s, d: True)
    assert len(snapshot.of_kind(Pod)) == 25
    lists = [r for r in api.requests_for("pods") if r.is_list]
    assert [r.query.get("continue", "") != "" for r in lists] == [False, True, True]


async def test_callback_errors_do_not_stop_the_source(api: FakeApiServer, source: KubernetesSource) -> None:
    seen: list[ConfigSnapshot] = []

    def flaky(snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        seen.append(snapshot)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    task = asyncio.create_task(source.run(flaky), name="flaky-consumer")
    try:
        await api.wait_until(lambda: len(seen) == 1 and api.open_watches() == 8)
        api.add(m.pod("default", "after-bug"))
        await api.wait_until(lambda: bool(seen) and pod_key("after-bug") in seen[-1])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------------------------------
# writes


async def test_patch_annotations_sets_and_removes(api: FakeApiServer, source: KubernetesSource) -> None:
    api.add(m.pod("default", "p", annotations={"keep": "yes", "drop": "me"}))
    updated = await source.patch_annotations(
        pod_key("p"), {"ambient.istio.io/redirection": "enabled", "drop": None}
    )
    assert updated["metadata"]["annotations"] == {"keep": "yes", "ambient.istio.io/redirection": "enabled"}
    stored = api.get("Pod", "default", "p")
    assert stored is not None and stored["metadata"]["annotations"] == updated["metadata"]["annotations"]
    patch = next(r for r in api.requests if r.method == "PATCH")
    assert patch.path == "/api/v1/namespaces/default/pods/p"
    assert patch.content_type.startswith("application/merge-patch+json")


async def test_patch_status_touches_only_status(api: FakeApiServer, source: KubernetesSource) -> None:
    created = api.add(m.waypoint_gateway("default"))
    conditions = [
        {
            "type": "Accepted",
            "status": "True",
            "reason": "Accepted",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        },
        {
            "type": "Programmed",
            "status": "True",
            "reason": "Programmed",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        },
    ]
    key = ResourceKey("Gateway", "default", "waypoint")
    updated = await source.patch_status(key, {"conditions": conditions})
    assert updated["status"]["conditions"] == conditions
    assert updated["spec"] == created["spec"]
    assert updated["metadata"]["generation"] == created["metadata"]["generation"]
    assert next(r for r in api.requests if r.method == "PATCH").path.endswith("/gateways/waypoint/status")

    policy = ResourceKey("AuthorizationPolicy", "default", "p")
    api.add(m.authorization_policy("default", "p"))
    warning = {
        "type": "WaypointAccepted",
        "status": "False",
        "reason": "UnsupportedValue",
        "message": "ignored",
    }
    patched = await source.patch_status(policy, {"conditions": [warning]})
    assert patched["status"] == {"conditions": [warning]}


async def test_create_or_update(api: FakeApiServer, source: KubernetesSource) -> None:
    manifest = m.deployment("default", "waypoint", replicas=1, service_account="waypoint")
    created = await source.create_or_update(manifest)
    assert created["metadata"]["uid"]
    # Unchanged desired state: no write at all.
    writes_before = sum(r.method in ("PUT", "POST") for r in api.requests)
    again = await source.create_or_update(manifest)
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert sum(r.method in ("PUT", "POST") for r in api.requests) == writes_before + 1  # the 409'd POST
    # Changed desired state: replaced.
    manifest["spec"]["replicas"] = 2
    replaced = await source.create_or_update(manifest)
    assert replaced["spec"]["replicas"] == 2
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert [r.method for r in api.requests[-3:]] == ["POST", "GET", "PUT"]
    # The other waypoint objects go through the same call.
    await source.create_or_update(m.service_account("default", "waypoint"))
    await source.create_or_update(m.service("default", "waypoint", cluster_ip="10.96.0.99"))
    assert api.get("ServiceAccount", "default", "waypoint") is not None
    assert api.get("Service", "default", "waypoint") is not None
    assert await source.delete_object(ResourceKey("Deployment", "default", "waypoint")) is True
    assert await source.delete_object(ResourceKey("Deployment", "default", "waypoint")) is False
    assert await source.get_object(ResourceKey("Deployment", "default", "waypoint")) is None


async def test_create_or_update_rejects_unknown_kinds(source: KubernetesSource) -> None:
    with pytest.raises(ValueError, match="Secret"):
        await source.create_or_update(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": "d"}}
        )
    with pytest.raises(ValueError, match=r"metadata\.namespace"):
        await source.create_or_update({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}})


async def test_write_errors_name_the_status(api: FakeApiServer, source: KubernetesSource) -> None:
    with pytest.raises(KubernetesApiError) as caught:
        await source.patch_annotations(pod_key("missing"), {"a": "b"})
    assert caught.value.status == 404 and caught.value.reason == "NotFound"
    api.add(m.pod("default", "p"))
    api.fail_next("pods", 500, verb="patch")
    with pytest.raises(KubernetesApiError) as caught:
        await source.patch_annotations(pod_key("p"), {"a": "b"})
    assert caught.value.status == 500


@pytest.mark.parametrize(
    ("token", "audiences", "authenticated"),
    [
        pytest.param("pod-token", ["istio-ca"], True, id="bound pod token for the CA audience"),
        pytest.param("pod-token", ["other"], False, id="token for another audience"),
        pytest.param("unknown-token", ["istio-ca"], False, id="unknown token"),
    ],
)
async def test_token_review(
    api: FakeApiServer, source: KubernetesSource, token: str, audiences: list[str], authenticated: bool
) -> None:
    api.tokens["pod-token"] = FakeToken(
        username="system:serviceaccount:istio-system:ztunnel",
        audiences=("istio-ca",),
        pod_name="ztunnel-abcde",
        pod_uid="0b9f3c52-6f1f-4a4e-9a53-0d4c6f7d1c11",
        node_name="node-1",
    )
    status = await source.token_review(token, audiences)
    assert status["authenticated"] is authenticated
    if authenticated:
        assert status["user"]["username"] == "system:serviceaccount:istio-system:ztunnel"
        extra: dict[str, Any] = status["user"]["extra"]
        assert extra["authentication.kubernetes.io/pod-name"] == ["ztunnel-abcde"]
        assert extra["authentication.kubernetes.io/pod-uid"] == ["0b9f3c52-6f1f-4a4e-9a53-0d4c6f7d1c11"]
        assert status["audiences"] == ["istio-ca"]
    else:
        assert status.get("error")


async def test_bearer_token_is_sent() -> None:
    async with FakeApiServer(bearer_token="s3cret") as api:
        api.add(m.pod("default", "p"))
        async with KubernetesSource.from_url(api.url, token="s3cret", settings=FAST) as good:
            assert await good.get_object(pod_key("p")) is not None
        async with KubernetesSource.from_url(api.url, token="wrong", settings=FAST) as bad:
            with pytest.raises(KubernetesApiError) as caught:
                await bad.get_object(pod_key("p"))
    assert caught.value.status == 401


async def test_unreachable_server_is_a_clear_error() -> None:
    async with FakeApiServer() as api:
        url = api.url
    async with KubernetesSource.from_url(url, settings=FAST) as source:
        with pytest.raises(KubernetesUnreachable, match="GET /api/v1/namespaces/default/pods/p"):
            await source.get_object(pod_key("p"))


async def test_source_rides_out_an_unreachable_server() -> None:
    """Started before the API server is reachable, the source retries until it is (here: never), and
    never emits a snapshot it could not list; cancelling it is clean."""
    async with FakeApiServer() as dead:
        url = dead.url
    recorder = Recorder()
    async with KubernetesSource.from_url(url, settings=FAST) as source, running(source, recorder) as task:
        # Every informer has failed and retried at least once.
        await eventually(lambda: source.stats.request_failures >= 16, what="16 failed requests")
        assert not task.done()
    assert recorder.calls == []


async def test_kubeconfig_construction(tmp_path: Path) -> None:
    async with FakeApiServer(bearer_token="kube-token") as api:
        api.add(m.namespace("from-kubeconfig"))
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                    "users": [{"name": "tester", "user": {"token": "kube-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
                    "current-context": "fake",
                }
            )
        )
        key = ResourceKey("Namespace", "", "from-kubeconfig")
        async with KubernetesSource.from_kubeconfig(str(kubeconfig), settings=FAST) as source:
            assert await source.get_object(key) is not None
        # Outside a pod (no KUBERNETES_SERVICE_HOST) the environment's KUBECONFIG is used.
        async with KubernetesSource.from_environment({"KUBECONFIG": str(kubeconfig)}, FAST) as source:
            assert await source.get_object(key) is not None
