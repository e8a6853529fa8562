"""Field selectors end to end: the stand-in API server narrows LIST and WATCH by `fieldSelector` as the real
server does (which fields each kind accepts, 400 for the others, ADDED/DELETED when an object moves into or
out of the selection), and `KubernetesSource` with a node-scoped pods resource sees exactly the pods of
its node, through watch events, relists and 410s alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException

from controller.sources.kubernetes import (
    NAMESPACES,
    PODS,
    ApiResource,
    KubernetesSource,
    KubernetesSourceSettings,
    pods_on_node,
)
from loom.resources.model import ConfigSnapshot, Pod, ResourceKey
from loom.testing import FakeApiServer, RecordedRequest
from loom.testing import manifests as m
from tests.integration.sources.test_kubernetes_source import Recorder as SourceRecorder

FAST = KubernetesSourceSettings(
    watch_timeout=30,
    backoff_initial=0.01,
    backoff_max=0.05,
    debounce=0.01,
    max_delay=0.5,
    request_timeout=5,
)
WAIT = 5.0


def pod(
    namespace: str, name: str, node: str, phase: str = "Running", ip: str = "10.244.0.10"
) -> dict[str, Any]:
    manifest = m.pod(namespace, name, node=node, ip=ip)
    manifest["status"]["phase"] = phase
    return manifest


def changed(api: FakeApiServer, namespace: str, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply `edit` to the stored pod and write it back (status included, as a test control does)."""
    current = api.get("pods", namespace, name)
    assert current is not None
    edit(current)
    api.update(current)


def set_phase(phase: str) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj["status"].__setitem__("phase", phase)


def set_node(node: str) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj["spec"].__setitem__("nodeName", node)


def set_label(key: str, value: str) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj["metadata"].setdefault("labels", {}).__setitem__(key, value)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        yield server


@pytest.fixture
async def http(api: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=api.url) as session:
        yield session


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(WAIT):
        for _ in range(count):
            events.append(json.loads(await response.content.readline()))
    return events


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events]


# ---------------------------------------------------------------------------------------------------
# the stand-in API server: LIST


def populate(api: FakeApiServer) -> None:
    api.add(pod("default", "a", "n1", ip="10.244.1.1"))
    api.add(pod("default", "b", "n2", ip="10.244.2.1"))
    api.add(pod("other", "c", "n1", phase="Pending", ip="10.244.1.2"))
    api.add(pod("default", "d", "", phase="Pending"))  # not scheduled yet


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("spec.nodeName=n1", {"default/a", "other/c"}),
        ("spec.nodeName==n1", {"default/a", "other/c"}),
        ("spec.nodeName!=n1", {"default/b", "default/d"}),
        ("spec.nodeName=", {"default/d"}),  # the unscheduled ones
        ("spec.nodeName=n1,status.phase=Running", {"default/a"}),
        ("status.phase=Running,spec.nodeName=n1,", {"default/a"}),  # a trailing comma is ignored
        ("spec.nodeName!=n1,spec.nodeName!=n2", {"default/d"}),
        ("status.phase=Pending", {"other/c", "default/d"}),
        ("metadata.namespace=other", {"other/c"}),
        ("metadata.name=b", {"default/b"}),
        ("spec.host=n2", {"default/b"}),  # the old name of spec.nodeName
        ("status.podIP=10.244.1.2", {"other/c"}),
        ("spec.hostNetwork=false", {"default/a", "default/b", "other/c", "default/d"}),
        (r"spec.nodeName=n1\,n2", set()),  # one term whose value contains a comma
        ("", {"default/a", "default/b", "other/c", "default/d"}),
    ],
)
async def test_list_selects_by_field(
    api: FakeApiServer, http: aiohttp.ClientSession, selector: str, expected: set[str]
) -> None:
    populate(api)
    async with http.get("/api/v1/pods", params={"fieldSelector": selector}) as response:
        assert response.status == 200
        body = await response.json()
    assert {f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in body["items"]} == expected
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)


async def test_list_selection_combines_with_namespace_and_pages(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    populate(api)
    api.add(pod("default", "e", "n1"))
    params = {"fieldSelector": "spec.nodeName=n1"}
    async with http.get("/api/v1/namespaces/default/pods", params=params) as response:
        assert [i["metadata"]["name"] for i in (await response.json())["items"]] == ["a", "e"]
    async with http.get("/api/v1/pods", params={**params, "limit": "1"}) as response:
        first = await response.json()
    # Pages hold selected objects only: three pods are on n1, so two remain after the first page.
    assert [i["metadata"]["name"] for i in first["items"]] == ["a"]
    assert first["metadata"]["remainingItemCount"] == 2
    async with http.get("/api/v1/pods", params={"continue": first["metadata"]["continue"]}) as response:
        rest = await response.json()
    assert [i["metadata"]["name"] for i in rest["items"]] == ["e", "c"]


@pytest.mark.parametrize(
    ("path", "selector", "message"),
    [
        ("/api/v1/pods", "spec.foo=x", "field label not supported: spec.foo"),
        (
            "/api/v1/pods",
            "spec.nodeName=n1,status.hostIP=1.2.3.4",
            "field label not supported: status.hostIP",
        ),
        ("/api/v1/namespaces", "metadata.namespace=x", "field label not supported: metadata.namespace"),
        ("/api/v1/services", "spec.selector=x", "field label not supported: spec.selector"),
        (
            "/api/v1/serviceaccounts",
            "secrets=x",
            '"secrets" is not a known field selector: only "metadata.name", "metadata.namespace"',
        ),
        (
            "/apis/security.istio.io/v1/authorizationpolicies",
            "spec.action=DENY",
            '"spec.action" is not a known field selector: only "metadata.name", "metadata.namespace"',
        ),
        (
            "/api/v1/pods",
            "spec.nodeName",
            "invalid selector: 'spec.nodeName'; can't understand 'spec.nodeName'",
        ),
        (
            "/api/v1/pods",
            "spec.nodeName=n1,n2",
            "invalid selector: 'spec.nodeName=n1,n2'; can't understand 'n2'",
        ),
        ("/api/v1/pods", "spec.nodeName=a=b", "invalid field selector: unescaped character in value: ="),
        ("/api/v1/pods", r"spec.nodeName=a\x", r"invalid field selector: invalid escape sequence: \x"),
    ],
)
@pytest.mark.parametrize("watch", [False, True])
async def test_unsupported_or_malformed_selector_is_a_bad_request(
    api: FakeApiServer, http: aiohttp.ClientSession, path: str, selector: str, message: str, watch: bool
) -> None:
    params = {"fieldSelector": selector, **({"watch": "true", "timeoutSeconds": "1"} if watch else {})}
    async with http.get(path, params=params) as response:
        assert response.status == 400
        status = await response.json()
    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "BadRequest",
        "code": 400,
    }
    assert api.open_watches() == 0


async def test_kubernetes_asyncio_sends_the_field_selector(api: FakeApiServer) -> None:
    populate(api)
    async with k8s_client.ApiClient(k8s_client.Configuration(host=api.url)) as client:
        core = k8s_client.CoreV1Api(client)
        listed = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
        assert sorted(p.metadata.name for p in listed.items) == ["a", "c"]
        with pytest.raises(ApiException) as refused:
            await core.list_pod_for_all_namespaces(field_selector="spec.nodeNam=n1")
    assert refused.value.status == 400 and refused.value.body is not None
    assert json.loads(refused.value.body)["message"] == "field label not supported: spec.nodeNam"


# ---------------------------------------------------------------------------------------------------
# the stand-in API server: WATCH


def churn(api: FakeApiServer) -> None:
    """Objects moving in and out of `status.phase=Running`, each step annotated with what a watch with
    that selector receives. The last step is a matching ADDED, so reading up to it proves that every
    step in between that should send nothing sent nothing."""
    api.add(pod("default", "a", "n1"))  # ADDED a
    api.add(pod("default", "b", "n1", phase="Pending"))  # nothing: does not match
    changed(api, "default", "b", set_phase("Running"))  # ADDED b: starts matching
    changed(api, "default", "a", set_label("tier", "web"))  # MODIFIED a: keeps matching
    changed(api, "default", "a", set_phase("Succeeded"))  # DELETED a: stops matching
    changed(api, "default", "a", set_label("tier", "db"))  # nothing: still not matching
    api.delete("pods", "default", "a")  # nothing: it had left the selection already
    api.delete("pods", "default", "b")  # DELETED b
    api.add(pod("default", "z", "n1"))  # ADDED z


CHURN_EVENTS = [
    ("ADDED", "a"),
    ("ADDED", "b"),
    ("MODIFIED", "a"),
    ("DELETED", "a"),
    ("DELETED", "b"),
    ("ADDED", "z"),
]


def check_churn(events: list[dict[str, Any]], api: FakeApiServer, start: int) -> None:
    assert summary(events) == CHURN_EVENTS
    # An object that stops matching is deleted with its previous (still matching) content, at the
    # resourceVersion of the change that made it stop matching.
    left = events[3]["object"]
    assert left["status"]["phase"] == "Running" and left["metadata"]["labels"]["tier"] == "web"
    assert left["metadata"]["resourceVersion"] == str(start + 5)
    assert events[1]["object"]["status"]["phase"] == "Running"
    assert [int(e["object"]["metadata"]["resourceVersion"]) for e in events] == [
        start + 1,
        start + 3,
        start + 4,
        start + 5,
        start + 8,
        start + 9,
    ]


async def test_live_watch_follows_objects_in_and_out_of_the_selection(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    start = api.resource_version
    params = {
        "watch": "true",
        "resourceVersion": str(start),
        "fieldSelector": "status.phase=Running",
        "timeoutSeconds": "5",
    }
    async with http.get("/api/v1/pods", params=params) as response:
        assert response.status == 200
        await api.wait_until(lambda: api.open_watches("pods") == 1)
        churn(api)
        events = await read_events(response, len(CHURN_EVENTS))
    check_churn(events, api, start)


async def test_replayed_watch_filters_history_the_same_way(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    start = api.resource_version
    churn(api)
    params = {
        "watch": "true",
        "resourceVersion": str(start),
        "fieldSelector": "status.phase==Running",
        "timeoutSeconds": "5",
    }
    async with http.get("/api/v1/pods", params=params) as response:
        events = await read_events(response, len(CHURN_EVENTS))
    check_churn(events, api, start)


async def test_watch_without_revision_starts_with_the_selected_objects(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    populate(api)
    params = {"watch": "1", "fieldSelector": "spec.nodeName=n1", "timeoutSeconds": "5"}
    async with http.get("/api/v1/pods", params=params) as response:
        initial = await read_events(response, 2)
        await api.wait_until(lambda: api.open_watches("pods") == 1)
        api.add(pod("default", "on-n2", "n2"))
        api.add(pod("default", "on-n1", "n1"))
        (live,) = await read_events(response, 1)
    assert summary(initial) == [("ADDED", "a"), ("ADDED", "c")]
    assert summary([live]) == [("ADDED", "on-n1")]


async def test_a_pod_moving_between_nodes_leaves_one_watch_and_enters_the_other(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.add(pod("default", "mover", "n1"))
    since = str(api.resource_version)

    def params(node: str) -> dict[str, str]:
        selector = f"spec.nodeName={node}"
        return {"watch": "true", "resourceVersion": since, "fieldSelector": selector, "timeoutSeconds": "5"}

    async with (
        http.get("/api/v1/pods", params=params("n1")) as on_n1,
        http.get("/api/v1/pods", params=params("n2")) as on_n2,
        http.get("/api/v1/pods", params={"watch": "true", "resourceVersion": since}) as everything,
    ):
        await api.wait_until(lambda: api.open_watches("pods") == 3)
        changed(api, "default", "mover", set_node("n2"))
        api.add(pod("default", "marker", "n1"))  # ends the n1 watch's expected stream
        api.add(pod("default", "marker-2", "n2"))
        assert summary(await read_events(on_n1, 2)) == [("DELETED", "mover"), ("ADDED", "marker")]
        assert summary(await read_events(on_n2, 2)) == [("ADDED", "mover"), ("ADDED", "marker-2")]
        unselected = await read_events(everything, 3)
    assert summary(unselected) == [("MODIFIED", "mover"), ("ADDED", "marker"), ("ADDED", "marker-2")]


# ---------------------------------------------------------------------------------------------------
# the node-scoped resource


def test_pods_on_node_narrows_the_pods_resource() -> None:
    on_n1 = pods_on_node("node-1.example")
    assert on_n1.field_selector == "spec.nodeName=node-1.example"
    assert on_n1.selection_query == [("fieldSelector", "spec.nodeName=node-1.example")]
    assert on_n1 != PODS and on_n1 == pods_on_node("node-1.example")
    assert len({on_n1, PODS, pods_on_node("node-1.example")}) == 2  # hashable; the selector counts
    assert (on_n1.kind, on_n1.collection_path(), on_n1.object_path("ns", "p")) == (
        "Pod",
        "/api/v1/pods",
        "/api/v1/namespaces/ns/pods/p",
    )
    assert on_n1.description == "pods (spec.nodeName=node-1.example)"
    assert PODS.field_selector == "" and PODS.selection_query == [] and PODS.description == "pods"
    assert pods_on_node("") is PODS  # no node name: the cluster-wide watch
    assert on_n1.with_field_selector("") == PODS


@pytest.mark.parametrize("node", ["Node-1", "n1,status.phase=Running", "n1=", "-n1", "n" * 254, "n 1"])
def test_pods_on_node_refuses_a_name_that_is_no_dns_subdomain(node: str) -> None:
    with pytest.raises(ValueError, match="node name: invalid name"):
        pods_on_node(node)


@pytest.mark.parametrize("selector", ["spec.nodeName", "=n1", "!=n1", "spec.nodeName=n1,phase"])
def test_api_resource_refuses_a_malformed_selector(selector: str) -> None:
    with pytest.raises(ValueError, match="pods: invalid field selector"):
        PODS.with_field_selector(selector)
    with pytest.raises(ValueError, match="invalid field selector"):
        ApiResource("", "v1", "pods", "Pod", field_selector=selector)


def test_a_source_watches_each_kind_once() -> None:
    async def factory() -> k8s_client.ApiClient:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"Pod is watched twice \(pods and pods \(spec.nodeName=n1\)\)"):
        KubernetesSource(factory, resources=(NAMESPACES, PODS, pods_on_node("n1")))
    with pytest.raises(ValueError, match="Namespace is watched twice"):
        KubernetesSource(factory, resources=(NAMESPACES, NAMESPACES))


# ---------------------------------------------------------------------------------------------------
# KubernetesSource with a selector


class Recorder(SourceRecorder):
    async def wait_for_snapshot(self, predicate: Callable[[ConfigSnapshot], bool]) -> ConfigSnapshot:
        snapshot, _ = await self.wait_for(lambda snapshot, _diagnostics: predicate(snapshot), within=WAIT)
        return snapshot

    def pods_ever_seen(self) -> set[str]:
        return {f"{k.namespace}/{k.name}" for snapshot, _ in self.calls for k in snapshot if k.kind == "Pod"}


def pods_in(snapshot: ConfigSnapshot) -> set[str]:
    return {f"{k.namespace}/{k.name}" for k in snapshot if k.kind == "Pod"}


@contextlib.asynccontextmanager
async def node_source(api: FakeApiServer, node: str, recorder: Recorder) -> AsyncIterator[KubernetesSource]:
    async with KubernetesSource.from_url(
        api.url, settings=FAST, resources=(NAMESPACES, pods_on_node(node))
    ) as source:
        task = asyncio.create_task(source.run(recorder), name="node-scoped-source-under-test")
        try:
            yield source
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def pod_requests(api: FakeApiServer) -> list[RecordedRequest]:
    return api.requests_for("pods")


async def test_source_sees_only_the_pods_of_its_node(api: FakeApiServer) -> None:
    api.add(m.namespace("default", {"istio.io/dataplane-mode": "ambient"}))
    api.add(m.namespace("other"))
    populate(api)
    recorder = Recorder()
    async with node_source(api, "n1", recorder) as source:
        first = await recorder.wait_for_snapshot(lambda s: True)
        assert pods_in(first) == {"default/a", "other/c"}
        assert ResourceKey("Namespace", "", "other") in first  # namespaces are not narrowed
        await api.wait_until(lambda: api.open_watches() == 2)

        # Pods elsewhere come and change; a pod is bound to n1 (moves in) and one leaves n1 (moves out).
        api.add(pod("default", "elsewhere", "n2"))
        changed(api, "default", "b", set_label("touched", "yes"))
        api.add(pod("default", "pending", ""))
        changed(api, "default", "pending", set_node("n1"))
        changed(api, "other", "c", set_node("n3"))
        moved = await recorder.wait_for_snapshot(lambda s: pods_in(s) == {"default/a", "default/pending"})
        pending = moved[ResourceKey("Pod", "default", "pending")]
        assert isinstance(pending, Pod) and pending.spec.node_name == "n1"

        # Deleting pods of another node changes nothing; deleting one of n1 does.
        api.delete("pods", "default", "b")
        api.delete("pods", "default", "a")
        await recorder.wait_for_snapshot(lambda s: pods_in(s) == {"default/pending"})
    assert recorder.pods_ever_seen() == {"default/a", "other/c", "default/pending"}
    assert source.stats.events.get("DELETED") == 2  # c leaving the selection, then a
    requests = pod_requests(api)
    assert requests and all(r.query.get("fieldSelector") == "spec.nodeName=n1" for r in requests)
    assert all("fieldSelector" not in r.query for r in api.requests_for("namespaces"))


async def test_relist_after_gone_keeps_the_selection(api: FakeApiServer) -> None:
    api.add(m.namespace("default"))
    api.add(pod("default", "kept", "n1"))
    api.add(pod("default", "leaving", "n1"))
    recorder = Recorder()
    async with node_source(api, "n1", recorder) as source:
        await recorder.wait_for_snapshot(lambda s: pods_in(s) == {"default/kept", "default/leaving"})
        await api.wait_until(lambda: api.open_watches() == 2)
        mark = len(api.requests)
        # While the watches are down one pod leaves the node, others arrive here and elsewhere, and the
        # history is compacted: the source must relist (with its selector) and diff out the leaver.
        api.drop_watches()
        changed(api, "default", "leaving", set_node("n2"))
        api.add(pod("default", "arrived", "n1"))
        api.add(pod("default", "far-away", "n2"))
        api.compact()
        await recorder.wait_for_snapshot(lambda s: pods_in(s) == {"default/kept", "default/arrived"})
    assert source.stats.relists_after_gone >= 1
    relists = [r for r in api.requests[mark:] if r.path == "/api/v1/pods" and r.is_list]
    assert relists and all(r.query["fieldSelector"] == "spec.nodeName=n1" for r in relists)
    assert "default/far-away" not in recorder.pods_ever_seen()


async def test_source_without_a_node_watches_every_pod(api: FakeApiServer) -> None:
    api.add(m.namespace("default"))
    api.add(m.namespace("other"))
    populate(api)
    recorder = Recorder()
    async with node_source(api, "", recorder):
        snapshot = await recorder.wait_for_snapshot(lambda s: True)
    assert pods_in(snapshot) == {"default/a", "default/b", "other/c", "default/d"}
    assert all("fieldSelector" not in r.query for r in pod_requests(api))
