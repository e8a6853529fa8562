"""The stand-in API server speaks the protocol real clients expect (checked with kubernetes_asyncio's own
typed client and Watch, and with raw HTTP where the wire format matters)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from loom.testing import FakeApiServer, FakeToken
from loom.testing import manifests as m


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        yield server


@pytest.fixture
async def http(api: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=api.url) as session:
        yield session


@pytest.fixture
async def core(api: FakeApiServer) -> AsyncIterator[k8s_client.CoreV1Api]:
    async with k8s_client.ApiClient(k8s_client.Configuration(host=api.url)) as client:
        yield k8s_client.CoreV1Api(client)


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(5):
        for _ in range(count):
            events.append(json.loads(await response.content.readline()))
    return events


async def test_list_shape_matches_the_real_server(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.add(m.pod("default", "p"))
    api.add(m.authorization_policy("default", "ap"))
    async with http.get("/api/v1/pods") as response:
        pods = await response.json()
    assert pods["kind"] == "PodList" and pods["apiVersion"] == "v1"
    assert pods["metadata"]["resourceVersion"] == str(api.resource_version)
    (item,) = pods["items"]
    assert "kind" not in item and "apiVersion" not in item  # typed lists omit them on items
    assert item["metadata"]["uid"] and item["metadata"]["resourceVersion"]
    async with http.get("/apis/security.istio.io/v1/authorizationpolicies") as response:
        policies = await response.json()
    assert policies["items"][0]["kind"] == "AuthorizationPolicy"  # custom resources keep them
    async with http.get("/apis/security.istio.io/v1/namespaces/other/authorizationpolicies") as response:
        assert (await response.json())["items"] == []


async def test_kubernetes_asyncio_list_and_watch(api: FakeApiServer, core: k8s_client.CoreV1Api) -> None:
    api.add(m.pod("default", "a"))
    listed = await core.list_namespaced_pod("default")
    assert [p.metadata.name for p in listed.items] == ["a"]
    watch = k8s_watch.Watch()
    seen: list[tuple[str, str]] = []
    async with asyncio.timeout(5):
        async with watch.stream(
            core.list_namespaced_pod,
            "default",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=5,
        ) as stream:
            api.add(m.pod("default", "b"))
            api.update(m.pod("default", "b", labels={"x": "y"}))
            api.delete("pods", "default", "a")
            async for event in stream:  # watch=True on the wire, typed V1Pod objects out
                seen.append((event["type"], event["object"].metadata.name))
                if len(seen) == 3:
                    break
    assert seen == [("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a")]


async def test_too_old_resource_version_is_an_error_event(
    api: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    api.add(m.pod("default", "a"))
    old = str(api.resource_version)
    api.add(m.pod("default", "b"))
    api.compact()
    watch = k8s_watch.Watch()
    with pytest.raises(ApiException) as caught:
        async with asyncio.timeout(5):
            async with watch.stream(
                core.list_pod_for_all_namespaces, resource_version=old, timeout_seconds=5
            ) as s:
                async for _ in s:
                    pass
    assert caught.value.status == 410


async def test_watch_replays_history_after_the_revision(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.add(m.pod("default", "a"))
    since = api.resource_version
    api.add(m.pod("default", "b"))
    api.delete("Pod", "default", "a")
    params = {"watch": "1", "resourceVersion": str(since), "timeoutSeconds": "5"}
    async with http.get("/api/v1/pods", params=params) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        events = await read_events(response, 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]
    assert events[0]["object"]["kind"] == "Pod"  # watch events carry kind, unlike list items


async def test_watch_without_revision_starts_with_the_current_objects(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.add(m.pod("default", "a"))
    api.delete("Pod", "default", "a")
    api.add(m.pod("default", "b"))
    async with http.get("/api/v1/pods", params={"watch": "true", "resourceVersion": "0"}) as response:
        (event,) = await read_events(response, 1)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "b")


async def test_history_overflow_expires_old_revisions() -> None:
    async with FakeApiServer(history_size=2) as small:
        small.add(m.pod("default", "a"))
        since = small.resource_version
        for name in ("b", "c", "d"):
            small.add(m.pod("default", name))
        async with (
            aiohttp.ClientSession(base_url=small.url) as session,
            session.get("/api/v1/pods", params={"watch": "true", "resourceVersion": str(since)}) as response,
        ):
            (event,) = await read_events(response, 1)
            assert await response.content.read() == b""  # and the stream ends
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410


async def test_bookmarks_on_demand_and_periodic(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    params = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": str(api.resource_version)}
    async with http.get("/api/v1/pods", params=params) as response:
        await api.wait_until(lambda: api.open_watches("pods") == 1)
        api.add(m.namespace("elsewhere"))
        rv = api.send_bookmark()
        (event,) = await read_events(response, 1)
    assert event == {
        "type": "BOOKMARK",
        "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}},
    }
    async with (
        FakeApiServer(bookmark_interval=0.02) as ticking,
        aiohttp.ClientSession(base_url=ticking.url) as s,
    ):
        async with s.get(
            "/api/v1/namespaces", params={"watch": "true", "allowWatchBookmarks": "true"}
        ) as response:
            events = await read_events(response, 2)
        assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
        # Without allowWatchBookmarks there are none: the stream just ends at its timeout.
        params = {"watch": "true", "timeoutSeconds": "0.1"}
        async with s.get("/api/v1/namespaces", params=params) as response:
            async with asyncio.timeout(5):
                assert await response.content.read() == b""


async def test_drop_watches_breaks_the_stream(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/pods", params={"watch": "true"}) as response:
        await api.wait_until(lambda: api.open_watches() == 1)
        assert api.drop_watches() == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                await response.content.read()
    await api.wait_until(lambda: api.open_watches() == 0)


async def test_pagination_and_expired_continue(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    for i in range(5):
        api.add(m.pod("default", f"p{i}"))
    async with http.get("/api/v1/pods", params={"limit": "2"}) as response:
        first = await response.json()
    token = first["metadata"]["continue"]
    assert first["metadata"]["remainingItemCount"] == 3
    api.delete("Pod", "default", "p4")  # pages are a consistent snapshot of the first page's revision
    names = [i["metadata"]["name"] for i in first["items"]]
    while token:
        async with http.get("/api/v1/pods", params={"limit": "2", "continue": token}) as response:
            page = await response.json()
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["p0", "p1", "p2", "p3", "p4"]

    async with http.get("/api/v1/pods", params={"limit": "2"}) as response:
        token = (await response.json())["metadata"]["continue"]
    api.compact()
    async with http.get("/api/v1/pods", params={"limit": "2", "continue": token}) as response:
        assert response.status == 410
        assert (await response.json())["reason"] == "Expired"


async def test_writes(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    path = "/api/v1/namespaces/default/services"
    async with http.post(path, json=m.service("default", "s")) as response:
        assert response.status == 201
        created = await response.json()
    async with http.post(path, json=m.service("default", "s")) as response:
        assert response.status == 409
        assert (await response.json())["reason"] == "AlreadyExists"
    stale = dict(created, spec={**created["spec"], "type": "NodePort"})
    async with http.put(f"{path}/s", json=stale) as response:
        assert response.status == 200
        replaced = await response.json()
    assert replaced["metadata"]["generation"] == 2
    async with http.put(f"{path}/s", json=stale) as response:  # carries the old resourceVersion
        assert response.status == 409
    before = api.resource_version
    async with http.put(f"{path}/s", json=replaced) as response:  # no change: no new revision
        assert response.status == 200
    assert api.resource_version == before
    async with http.patch(f"{path}/s", json={"spec": {"type": "ClusterIP"}}) as response:
        assert response.status == 415  # a JSON patch content type is required
    headers = {"Content-Type": "application/merge-patch+json"}
    body = json.dumps(
        {"metadata": {"labels": {"a": "b"}}, "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}
    )
    async with http.patch(f"{path}/s", data=body, headers=headers) as response:
        patched = await response.json()
    assert patched["metadata"]["labels"] == {"a": "b"}
    assert "status" not in patched  # the main resource ignores status ...
    async with http.patch(f"{path}/s/status", data=body, headers=headers) as response:
        patched = await response.json()
    assert patched["status"]["loadBalancer"]["ingress"] == [{"ip": "1.2.3.4"}]  # ... the subresource takes it
    assert patched["metadata"]["labels"] == {"a": "b"}
    async with http.get(f"{path}/missing") as response:
        assert response.status == 404
        assert (await response.json())["code"] == 404
    async with http.delete(f"{path}/s") as response:
        assert response.status == 200
    assert api.get("Service", "default", "s") is None


async def test_missing_crds_and_injected_failures(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.uninstall("httproutes")
    async with http.get("/apis/gateway.networking.k8s.io/v1/httproutes") as response:
        assert response.status == 404
        assert await response.text() == "404 page not found\n"
    api.install("httproutes")
    api.fail_next("httproutes", 503)
    async with http.get("/apis/gateway.networking.k8s.io/v1/httproutes") as response:
        assert response.status == 503
        assert (await response.json())["reason"] == "ServiceUnavailable"
    async with http.get("/apis/gateway.networking.k8s.io/v1/httproutes") as response:
        assert response.status == 200
    with pytest.raises(ValueError, match="built-in"):
        api.uninstall("pods")


async def test_token_review_shape(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.tokens["t"] = FakeToken("system:serviceaccount:default:client", pod_name="client-1", pod_uid="uid-1")
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "t"}}
    async with http.post("/apis/authentication.k8s.io/v1/tokenreviews", json=review) as response:
        assert response.status == 201
        answer = await response.json()
    status = answer["status"]
    assert status["authenticated"] is True
    assert status["user"]["groups"] == [
        "system:serviceaccounts",
        "system:serviceaccounts:default",
        "system:authenticated",
    ]
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["client-1"]
    review["spec"] = {}
    async with http.post("/apis/authentication.k8s.io/v1/tokenreviews", json=review) as response:
        assert response.status == 422


async def test_bearer_token_required() -> None:
    async with FakeApiServer(bearer_token="tok") as api, aiohttp.ClientSession(base_url=api.url) as http:
        async with http.get("/api/v1/pods") as response:
            assert response.status == 401
        async with http.get("/api/v1/pods", headers={"Authorization": "Bearer tok"}) as response:
            assert response.status == 200


async def test_request_log(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/pods", params={"watch": "True", "timeoutSeconds": "0"}) as response:
        await response.read()
    (request,) = api.requests
    assert (request.method, request.path, request.is_watch) == ("GET", "/api/v1/pods", True)
    assert request.query == {"watch": "True", "timeoutSeconds": "0"}
    assert api.requests_for("pods", watch=True) == [request]


async def test_test_controls_report_misuse_clearly(api: FakeApiServer) -> None:
    api.add(m.pod("default", "p"))
    with pytest.raises(KeyError, match="already exists"):
        api.add(m.pod("default", "p"))
    with pytest.raises(ValueError, match="namespace"):
        api.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nowhere"}})
    with pytest.raises(KeyError, match="no resource serves"):
        api.add({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c", "namespace": "d"}})
    with pytest.raises(KeyError, match="does not exist"):
        api.delete("Pod", "default", "missing")
    stale = api.get("Pod", "default", "p")
    assert stale is not None
    api.update(m.pod("default", "p", labels={"v": "2"}))
    stale["metadata"]["labels"] = {"v": "3"}
    assert api.update(stale)["metadata"]["labels"] == {"v": "3"}  # controls never conflict
