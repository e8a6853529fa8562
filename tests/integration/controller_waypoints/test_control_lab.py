"""The waypoint reconciler in the lab, full circle: a controller in directory mode over a lab store
(--deploy-waypoints --lab-store) writes the waypoint's objects and credential, reports its status as
the lab brings it up, and the settings on the Deployment's command line are exactly what a waypoint
needs: with them, the real client gets its configuration and its certificate."""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from controller.app import ControllerApp
from loom.lab.store import LabStore, StoredKey
from loom.resources.loader import expand_deployment, parse_object, pod_to_manifest
from loom.resources.model import Deployment
from loom.testing.controller import WAIT, controller_config, running_controller
from loom.testing.waiting import eventually
from waypoint.xds import WaypointXds, WaypointXdsSettings
from ztunnel.identity.caclient import CaClient
from ztunnel.xds import Backoff


@dataclass
class Lab:
    app: ControllerApp
    store: LabStore

    def get(self, kind: str, name: str = "waypoint") -> dict[str, Any] | None:
        return self.store.get(StoredKey(kind, "default", name))

    def programmed(self) -> tuple[str, str] | None:
        status = (self.get("Gateway") or {}).get("status") or {}
        found = [
            (c["status"], c["reason"]) for c in status.get("conditions", []) if c["type"] == "Programmed"
        ]
        return found[0] if found else None


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    store = LabStore(tmp_path / "lab" / "config")
    store.put(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
        }
    )
    extra = ["--deploy-waypoints", "--lab-store", str(store.root), "--waypoint-command", "loom-waypoint --v"]
    config = controller_config(tmp_path / "lab" / "controller", [store.root], extra=extra)
    async with running_controller(config, source=None) as app:
        yield Lab(app, store)


async def test_lab_waypoint_full_circle(lab: Lab) -> None:
    lab.store.put(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "default"},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }
    )
    await eventually(
        lambda: lab.get("Deployment") is not None, within=WAIT, what="the Deployment in the store"
    )
    await eventually(lambda: lab.programmed() == ("False", "AddressNotAssigned"), within=WAIT, what="status")

    # What the lab does: a cluster IP for the Service, then the pod, scheduled and running.
    def allocate(manifest: dict[str, Any]) -> None:
        manifest["spec"]["clusterIP"] = "10.96.0.60"
        manifest["spec"]["clusterIPs"] = ["10.96.0.60"]

    lab.store.update(StoredKey("Service", "default", "waypoint"), allocate)
    deployment = parse_object(lab.get("Deployment") or {})
    assert isinstance(deployment, Deployment)
    [pod] = expand_deployment(deployment)
    scheduled = replace(
        pod, spec=replace(pod.spec, node_name="node-a"), ips=("10.244.0.8",), phase="Running", ready=True
    )
    lab.store.put(pod_to_manifest(scheduled))
    await eventually(lambda: lab.programmed() == ("True", "Programmed"), within=WAIT, what="programmed")

    # The pod's command line, as the lab would run it: its settings connect the real client.
    words = shlex.split(pod.meta.annotations["lab.loom.io/command"])
    assert words[:2] == ["exec", "env"] and words[-2:] == ["loom-waypoint", "--v"]
    env = dict(word.split("=", 1) for word in words[2:-2])
    settings = WaypointXdsSettings.from_env(env)
    assert settings.token_file.stat().st_mode & 0o077 == 0
    xds = WaypointXds(settings, backoff=Backoff(0.01, 0.2))
    xds.start()
    ca = CaClient(settings.ca_address, settings.root_cert, settings.token_source, ttl=dt.timedelta(hours=1))
    try:
        await eventually(lambda: xds.ready.is_set(), within=WAIT, what="the waypoint's xDS")
        assert xds.config.view is not None and xds.config.view.name == "waypoint"
        certificate = await ca.fetch_certificate(settings.identity)
        assert str(certificate.identity) == "spiffe://cluster.local/ns/default/sa/waypoint"
    finally:
        await ca.close()
        await xds.close()

    # Deleting the Gateway removes the objects and the credential.
    lab.store.remove(StoredKey("Gateway", "default", "waypoint"))
    await eventually(
        lambda: lab.get("Deployment") is None and not settings.token_file.exists(),
        within=WAIT,
        what="cleanup",
    )
