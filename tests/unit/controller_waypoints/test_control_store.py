"""The reconciler with the lab's StoreApplier on a temporary lab store: objects, credential file and
Gateway status, step by step as the lab would move (cluster IP allocated, pod scheduled and ready),
updates, conflicts, rejection and deletion."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import gateway, namespace, service

from controller.auth import LabNodeAuthenticator
from controller.waypoints.auth import LabMeshAuthenticator
from controller.waypoints.desired import LabSettings, WaypointSettings
from controller.waypoints.reconciler import ApplyError, ReconcileReport, WaypointReconciler
from controller.waypoints.store import LabCredentialFiles, StoreApplier, keep_lab_owned
from loom.lab.store import LabStore, StoredKey
from loom.resources.loader import expand_deployment, parse_object, pod_to_manifest
from loom.resources.model import ConfigSnapshot, Deployment

GATEWAY = StoredKey("Gateway", "default", "waypoint")


class Lab:
    def __init__(self, root: Path) -> None:
        self.store = LabStore(root / "config")
        self.auth = LabMeshAuthenticator(LabNodeAuthenticator.load_or_create(root / "state"), self.snapshot)
        self.lab = LabSettings(
            root_cert=root / "state" / "root-cert.pem", token_dir=root / "state" / "tokens"
        )
        settings = WaypointSettings(xds_address="10.0.0.2:15012", command=("loom-waypoint",), lab=self.lab)
        self.reconciler = WaypointReconciler(
            settings,
            StoreApplier(self.store),
            credentials=LabCredentialFiles(self.auth.issue_waypoint_token, self.lab),
            now=lambda: "2026-01-01T00:00:00Z",
        )
        self.store.put(namespace("default"))

    def snapshot(self) -> ConfigSnapshot:
        return self.store.snapshot()

    async def reconcile(self, *, resync: bool = False) -> ReconcileReport:
        return await self.reconciler.reconcile(self.snapshot(), resync=resync)

    def get(self, kind: str, name: str = "waypoint") -> dict[str, Any] | None:
        return self.store.get(StoredKey(kind, "default", name))

    def conditions(self) -> dict[str, tuple[str, str]]:
        status = (self.get("Gateway") or {}).get("status", {})
        return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}

    def addresses(self) -> list[str]:
        status = (self.get("Gateway") or {}).get("status", {})
        return [a["value"] for a in status.get("addresses", [])]

    def allocate_cluster_ip(self, ip: str) -> None:
        """What the lab's reconcile does for a Service without one."""

        def allocate(manifest: dict[str, Any]) -> None:
            manifest["spec"]["clusterIP"] = ip
            manifest["spec"]["clusterIPs"] = [ip]

        self.store.update(StoredKey("Service", "default", "waypoint"), allocate)

    def schedule_pods(self, *, ready: bool = True) -> None:
        """What the lab's reconcile does for the Deployment: its pods, scheduled, running."""
        deployment = parse_object(self.get("Deployment") or {})
        assert isinstance(deployment, Deployment)
        for pod in expand_deployment(deployment):
            scheduled = replace(
                pod,
                spec=replace(pod.spec, node_name="node-a"),
                ips=("10.244.0.7",),
                phase="Running",
                ready=ready,
            )
            self.store.put(pod_to_manifest(scheduled))

    @property
    def token_path(self) -> Path:
        return self.lab.token_path("default", "waypoint")


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


async def test_waypoint_is_deployed_and_reported_as_the_lab_brings_it_up(lab: Lab) -> None:
    lab.store.put(gateway("default", "waypoint"))
    report = await lab.reconcile()
    assert (report.written, report.statuses, report.errors) == (3, 1, ())
    assert report.retry_after is not None  # not ready: look again
    account, svc, deployment = lab.get("ServiceAccount"), lab.get("Service"), lab.get("Deployment")
    assert account is not None and svc is not None and deployment is not None
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "waypoint"
    annotation = deployment["spec"]["template"]["metadata"]["annotations"]["lab.loom.io/command"]
    assert f"WORKLOAD_TOKEN_FILE={lab.token_path}" in annotation
    # The credential: only the owner may read it, and it is this waypoint's.
    assert stat.S_IMODE(lab.token_path.stat().st_mode) == 0o600
    assert lab.auth.verify_waypoint(lab.token_path.read_text()) == ("default", "waypoint")
    assert lab.conditions() == {
        "Accepted": ("True", "Accepted"),
        "Programmed": ("False", "AddressNotAssigned"),
    }

    # The lab gives the Service its cluster IP: kept, not rewritten; the waypoint still has no pod.
    lab.allocate_cluster_ip("10.96.0.42")
    report = await lab.reconcile()
    assert report.written == 0
    assert (lab.get("Service") or {})["spec"]["clusterIP"] == "10.96.0.42"
    assert lab.conditions()["Programmed"] == ("False", "Pending")
    assert lab.addresses() == ["10.96.0.42"]

    # Reading our own status back changes nothing (no write loop through the watch).
    assert (await lab.reconcile()).statuses == 0

    # A pod that is not ready yet is not enough.
    lab.schedule_pods(ready=False)
    await lab.reconcile()
    assert lab.conditions()["Programmed"] == ("False", "Pending")

    # The lab schedules the pod and it is ready: programmed; nothing else to wait for.
    lab.schedule_pods(ready=True)
    report = await lab.reconcile()
    assert lab.conditions()["Programmed"] == ("True", "Programmed")
    assert report.retry_after is None
    assert (await lab.reconcile()) == ReconcileReport(waypoints=1, written=0, deleted=0, statuses=0)


async def test_gateway_change_updates_the_objects_and_removes_what_is_no_longer_needed(lab: Lab) -> None:
    lab.store.put(gateway("default", "waypoint"))
    await lab.reconcile()
    assert lab.get("ServiceAccount", "waypoint") is not None
    lab.store.put(gateway("default", "waypoint", for_sa="reviews"))
    report = await lab.reconcile()
    assert report.deleted == 1 and report.written == 2  # new account + Deployment; the Service is as it was
    assert lab.get("ServiceAccount", "waypoint") is None
    assert lab.get("ServiceAccount", "waypoint-istio-waypoint") is not None
    deployment = lab.get("Deployment") or {}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "waypoint-istio-waypoint"


async def test_gateway_deletion_removes_everything(lab: Lab) -> None:
    lab.store.put(gateway("default", "waypoint"))
    await lab.reconcile()
    assert lab.token_path.exists()
    lab.store.remove(GATEWAY)
    report = await lab.reconcile()
    assert report.deleted == 3
    assert all(lab.get(kind) is None for kind in ("ServiceAccount", "Service", "Deployment"))
    assert not lab.token_path.exists()


async def test_objects_left_from_before_a_restart_are_collected(lab: Lab, tmp_path: Path) -> None:
    lab.store.put(gateway("default", "waypoint"))
    await lab.reconcile()
    lab.store.remove(GATEWAY)
    # Someone else's object with the gateway label but without ours is left alone.
    foreign = service("default", "lookalike", labels={"gateway.networking.k8s.io/gateway-name": "waypoint"})
    lab.store.put(foreign)
    fresh = Lab(tmp_path)  # a restarted controller: it remembers nothing
    report = await fresh.reconcile()
    assert report.deleted == 3
    assert fresh.get("Service", "lookalike") is not None
    assert fresh.get("Deployment") is None


async def test_an_object_in_the_way_is_never_taken_over(lab: Lab) -> None:
    users = service("default", "waypoint", cluster_ip="10.96.0.77")
    lab.store.put(users)
    lab.store.put(gateway("default", "waypoint"))
    report = await lab.reconcile()
    assert report.retry_after == 2.0  # looked at again: the object in the way may go unnoticed
    programmed = lab.conditions()["Programmed"]
    assert programmed == ("False", "Invalid")
    status = (lab.get("Gateway") or {})["status"]
    [message] = [c["message"] for c in status["conditions"] if c["type"] == "Programmed"]
    assert "Service default/waypoint" in message and "not managed by loom" in message
    assert lab.get("Service") == users  # untouched
    assert lab.get("Deployment") is None
    # Once it is gone, the waypoint is deployed.
    lab.store.remove(StoredKey("Service", "default", "waypoint"))
    await lab.reconcile()
    assert lab.get("Deployment") is not None
    assert lab.conditions()["Programmed"] == ("False", "AddressNotAssigned")


async def test_a_rejected_gateway_gets_no_objects_and_loses_those_it_had(lab: Lab) -> None:
    lab.store.put(gateway("default", "waypoint"))
    await lab.reconcile()
    lab.store.put(
        gateway("default", "waypoint", listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}])
    )
    report = await lab.reconcile()
    assert report.deleted == 3
    assert lab.conditions() == {
        "Accepted": ("False", "ListenersNotValid"),
        "Programmed": ("False", "Invalid"),
    }
    assert lab.get("Deployment") is None


async def test_objects_deleted_behind_its_back_are_recreated(lab: Lab) -> None:
    lab.store.put(gateway("default", "waypoint"))
    await lab.reconcile()
    lab.store.remove(StoredKey("Service", "default", "waypoint"))
    report = await lab.reconcile()
    assert report.written == 1
    assert lab.get("Service") is not None


def test_keep_lab_owned() -> None:
    desired = {"kind": "Service", "spec": {"ports": [1]}}
    current = {
        "kind": "Service",
        "spec": {"ports": [2], "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"]},
        "status": {"x": 1},
    }
    merged = keep_lab_owned(current, desired)
    assert merged == {
        "kind": "Service",
        "spec": {"ports": [1], "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"]},
        "status": {"x": 1},
    }
    assert desired == {"kind": "Service", "spec": {"ports": [1]}}  # not modified
    assert keep_lab_owned(None, desired) == desired


class FlakyApplier(StoreApplier):
    """Fails the first `failures` writes, like an API server that is briefly unavailable."""

    def __init__(self, store: LabStore, failures: int) -> None:
        super().__init__(store)
        self.failures = failures

    async def put(self, manifest: Mapping[str, Any], current: Mapping[str, Any] | None) -> Mapping[str, Any]:
        if self.failures > 0:
            self.failures -= 1
            raise ApplyError("the store is unavailable")
        return await super().put(manifest, current)


async def test_failed_writes_are_reported_and_retried_with_backoff(lab: Lab) -> None:
    flaky = FlakyApplier(lab.store, failures=2)
    reconciler = WaypointReconciler(
        lab.reconciler.settings, flaky, credentials=LabCredentialFiles(lab.auth.issue_waypoint_token, lab.lab)
    )
    lab.store.put(gateway("default", "waypoint"))
    first = await reconciler.reconcile(lab.snapshot())
    assert first.errors and first.retry_after == 0.5
    assert lab.conditions()["Programmed"] == ("False", "NoResources")
    second = await reconciler.reconcile(lab.snapshot(), resync=True)
    assert second.errors and second.retry_after == 1.0  # backing off
    third = await reconciler.reconcile(lab.snapshot(), resync=True)
    assert not third.errors and third.written == 3
    assert lab.conditions()["Programmed"] == ("False", "AddressNotAssigned")
    assert third.retry_after == 2.0  # not ready: the resync period, not the error backoff
