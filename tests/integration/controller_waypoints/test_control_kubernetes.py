"""The waypoint reconciler on Kubernetes: a controller with --deploy-waypoints against the stand-in API
server (loom/testing/fake_apiserver.py) creates each waypoint's ServiceAccount, Deployment and
Service, keeps them in step with the Gateway, deletes them with it, and reports status on the
Gateway's status subresource; an object in the way is never taken over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.app import ControllerApp
from controller.sources.kubernetes import KubernetesSource, KubernetesSourceSettings
from loom.testing.controller import WAIT, controller_config, running_controller
from loom.testing.fake_apiserver import FakeApiServer

GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
OBJECTS = (("ServiceAccount", "waypoint"), ("Service", "waypoint"), ("Deployment", "waypoint"))


def gateway(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "waypoint", "namespace": "default"}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": meta,
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


@dataclass
class Cluster:
    api: FakeApiServer
    app: ControllerApp

    def get(self, kind: str, name: str = "waypoint") -> dict[str, Any] | None:
        return self.api.get(kind, "default", name)

    def conditions(self) -> dict[str, tuple[str, str]]:
        status = (self.get("Gateway") or {}).get("status") or {}
        return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}

    def addresses(self) -> list[str]:
        status = (self.get("Gateway") or {}).get("status") or {}
        return [a["value"] for a in status.get("addresses", [])]

    def status_writes(self) -> int:
        path = "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways/waypoint/status"
        return sum(1 for r in self.api.requests if r.method == "PATCH" and r.path == path)

    async def until(self, predicate: Any, what: str) -> None:
        try:
            await self.api.wait_until(predicate, within=WAIT)
        except TimeoutError:
            raise AssertionError(f"{what}: not reached; conditions {self.conditions()}") from None


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with FakeApiServer() as api:
        api.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        settings = KubernetesSourceSettings(debounce=0.005, backoff_initial=0.01, backoff_max=0.1)
        source = KubernetesSource.from_url(api.url, settings=settings)
        config = controller_config(
            tmp_path / "state",
            kubernetes=True,
            extra=["--deploy-waypoints", "--waypoint-image", "reg/loom:2"],
        )
        async with running_controller(config, source=source) as app:
            yield Cluster(api, app)


async def test_waypoint_lifecycle_on_kubernetes(cluster: Cluster) -> None:
    api = cluster.api
    uid = api.add(gateway())["metadata"]["uid"]

    await cluster.until(lambda: all(cluster.get(k, n) for k, n in OBJECTS), "objects created")
    deployment = cluster.get("Deployment") or {}
    for kind, name in OBJECTS:
        meta = (cluster.get(kind, name) or {})["metadata"]
        assert meta["labels"][GATEWAY_LABEL] == "waypoint"
        assert meta["ownerReferences"][0]["uid"] == uid and meta["ownerReferences"][0]["kind"] == "Gateway"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/loom:2"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["XDS_ADDRESS"] == f"127.0.0.1:{cluster.app.grpc_port}"
    await cluster.until(
        lambda: (
            cluster.conditions()
            == {"Accepted": ("True", "Accepted"), "Programmed": ("False", "AddressNotAssigned")}
        ),
        "status: no address yet",
    )

    # The API server allocates the Service's address: reported, and kept by later writes.
    service = cluster.get("Service") or {}
    service["spec"]["clusterIP"] = "10.96.0.50"
    service["spec"]["clusterIPs"] = ["10.96.0.50"]
    api.update(service)
    await cluster.until(
        lambda: (
            cluster.conditions().get("Programmed") == ("False", "Pending")
            and cluster.addresses() == ["10.96.0.50"]
        ),
        "status: address, no ready pod",
    )

    # The Deployment's pod becomes ready.
    deployment = cluster.get("Deployment") or {}
    deployment["status"] = {"replicas": 1, "readyReplicas": 1}
    api.update(deployment)
    api.add(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "waypoint-6c8f-x1",
                "namespace": "default",
                "labels": {GATEWAY_LABEL: "waypoint"},
            },
            "spec": {
                "serviceAccountName": "waypoint",
                "nodeName": "node-a",
                "containers": [{"name": "loom-waypoint"}],
            },
            "status": {
                "phase": "Running",
                "podIP": "10.244.0.9",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )
    await cluster.until(
        lambda: cluster.conditions().get("Programmed") == ("True", "Programmed"), "programmed"
    )

    # Our own status coming back through the watch is not written again.
    writes = cluster.status_writes()
    await asyncio.sleep(0.3)
    assert cluster.status_writes() == writes
    assert (cluster.get("Service") or {})["spec"]["clusterIP"] == "10.96.0.50"

    # The Gateway changes (per-service-account model): new account, Deployment follows, old account goes.
    current = cluster.get("Gateway") or {}
    current["metadata"]["annotations"] = {"istio.io/for-service-account": "reviews"}
    api.update(current)

    def moved() -> bool:
        template = ((cluster.get("Deployment") or {}).get("spec") or {}).get("template") or {}
        return (
            cluster.get("ServiceAccount", "waypoint-istio-waypoint") is not None
            and cluster.get("ServiceAccount", "waypoint") is None
            and template.get("spec", {}).get("serviceAccountName") == "waypoint-istio-waypoint"
        )

    await cluster.until(moved, "objects updated")

    # The Gateway is deleted: everything goes with it (the fake API server has no garbage collector).
    api.delete("Gateway", "default", "waypoint")
    await cluster.until(
        lambda: (
            not any(cluster.get(k, n) for k, n in (*OBJECTS, ("ServiceAccount", "waypoint-istio-waypoint")))
        ),
        "objects deleted",
    )


async def test_an_object_in_the_way_is_reported_and_left_alone(cluster: Cluster) -> None:
    api = cluster.api
    theirs = api.add(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "waypoint", "namespace": "default"},
            "spec": {"selector": {"app": "theirs"}, "ports": [{"name": "http", "port": 80}]},
        }
    )
    api.add(gateway())
    await cluster.until(
        lambda: cluster.conditions().get("Programmed") == ("False", "Invalid"), "conflict reported"
    )
    status = (cluster.get("Gateway") or {})["status"]
    [message] = [c["message"] for c in status["conditions"] if c["type"] == "Programmed"]
    assert "Service default/waypoint" in message
    assert cluster.get("Service") == theirs
    assert cluster.get("Deployment") is None
    # Deleting the Gateway does not delete their Service either.
    api.delete("Gateway", "default", "waypoint")
    await cluster.until(lambda: cluster.get("ServiceAccount") is None, "our account deleted")
    assert cluster.get("Service") == theirs
