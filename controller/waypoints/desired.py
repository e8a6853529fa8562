"""What runs one waypoint, and what its Gateway's status says: pure functions, no I/O.

Theory of operation
-------------------
For every Gateway of class istio-waypoint, `plan(gateway, settings)` either accepts it and returns the
three objects that run it (`DesiredWaypoint`), or rejects it (`Rejected`, with the Gateway API reason
and a message). `gateway_status` turns a plan plus what was observed (ready replicas, the Service's
address, a problem met while applying) into the Gateway's `status`. The reconciler (reconciler.py)
does the I/O around these.

The objects, all in the Gateway's namespace, all labelled `gateway.networking.k8s.io/gateway-name:
<gateway>` and `gateway.istio.io/managed: loom.io-waypoint-controller` (what marks them as ours: the
reconciler never changes or deletes an object without both labels), all owned by the Gateway
(ownerReferences, so Kubernetes' garbage collector removes them with it too):

* ServiceAccount: the waypoint's own identity. Naming (a choice; Istio names it after the Gateway):
  - Istio's current model: the Gateway's name, as Istio does (`sa/waypoint` for the default waypoint);
  - the per-service-account model (annotation istio.io/for-service-account): `<gateway>-istio-waypoint`,
    which is how Istio named that era's waypoint resources. Such Gateways are usually named after the
    account they serve (the sample `bookinfo-reviews` serves `bookinfo-reviews`); running the waypoint
    as that account would give it the identity of the workloads behind it, and L4 policies could no
    longer tell the waypoint from them.
  The waypoint never runs as the account it serves.
* Service `<gateway>`: port `mesh` 15008 (appProtocol hbone), ClusterIP, selecting the waypoint's pods.
  Its name is fixed by the binding: node proxies reach a waypoint as `<gateway>.<ns>.svc.<domain>`
  (controller/translate/waypoints.py), hence the Gateway name must be a DNS-1035 label.
* Deployment `<gateway>`: pods labelled gateway-name (what the translation recognises as a waypoint's
  own pod: never captured, never given a waypoint), `istio.io/dataplane-mode: none` and
  `sidecar.istio.io/inject: "false"`; container `loom-waypoint` with ports 15008 (HBONE), 15020
  (metrics) and 15021 (readiness, /healthz/ready).
  - On Kubernetes the container gets its settings as environment variables (waypoint/xds.py names
    them), the projected service-account token (audience istio-ca) and the mesh root from the
    ConfigMap `istio-ca-root-cert`, at Istio's paths.
  - In the lab (`settings.lab`), which runs a pod's command from the annotation `lab.loom.io/command`
    and knows nothing of container env or volumes, the command line carries the same variables
    (`exec env NAME=value ... loom-waypoint`), with the root certificate and a credential file the
    controller writes (reconciler.py) as paths on the machine.

Status (Gateway API conditions, as Istio reports on waypoints):

* Accepted: True, or False with reason ListenersNotValid (no listener HBONE/15008) or Invalid (a name
  the objects cannot take); a rejected Gateway gets no objects.
* Programmed: True (reason Programmed) only when the Service has an address and at least one
  replica is ready; else False: AddressNotAssigned, Pending (no ready pod), Invalid (an object in
  the way that is not ours), NoResources (writing the objects failed). A waypoint that is not
  programmed keeps its traffic: the translation binds to it regardless, so connections fail instead
  of going around it.
* addresses: the Service's cluster IPs (type IPAddress).

`lastTransitionTime` moves only when a condition's status changes, and `status_current` compares
without it, so writing a status and reading it back is a fixed point (no write loop through a watch).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controller.translate.waypoints import LABEL_GATEWAY_NAME
from loom.resources.model import (
    DATAPLANE_MODE_NONE,
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    HBONE_PORT,
    LABEL_DATAPLANE_MODE,
    ConfigSnapshot,
    Gateway,
    Pod,
    ResourceKey,
)
from waypoint.xds import (
    ENV_CLUSTER_ID,
    ENV_INSTANCE_IP,
    ENV_NAME,
    ENV_NAMESPACE,
    ENV_NODE_NAME,
    ENV_POD_NAME,
    ENV_ROOT_CERT,
    ENV_SERVICE_ACCOUNT,
    ENV_TOKEN_FILE,
    ENV_TRUST_DOMAIN,
    ENV_XDS_ADDRESS,
)

LABEL_MANAGED: Final = "gateway.istio.io/managed"
MANAGED_BY: Final = "loom.io-waypoint-controller"
LABEL_SIDECAR_INJECT: Final = "sidecar.istio.io/inject"
# The lab runs a pod's process from this annotation (loom/lab/cluster.py COMMAND_ANNOTATION; not
# imported: that module pulls in the lab's network code, which the controller has no use for).
COMMAND_ANNOTATION: Final = "lab.loom.io/command"
PER_SERVICE_ACCOUNT_SUFFIX: Final = "-istio-waypoint"
CONTAINER_NAME: Final = "loom-waypoint"
METRICS_PORT: Final = 15020
READINESS_PORT: Final = 15021
READINESS_PATH: Final = "/healthz/ready"
SERVICE_PORT_NAME: Final = "mesh"
SERVICE_APP_PROTOCOL: Final = "hbone"
LISTENER_PROTOCOL: Final = "HBONE"
DEFAULT_IMAGE: Final = "loom:latest"
DEFAULT_COMMAND: Final = ("loom-waypoint",)
DEFAULT_XDS_ADDRESS: Final = "loom-controller.istio-system.svc:15012"
# Istio's paths and names for a proxy's credentials on Kubernetes.
ROOT_CERT_CONFIGMAP: Final = "istio-ca-root-cert"
ROOT_CERT_DIR: Final = "/var/run/secrets/istio"
TOKEN_DIR: Final = "/var/run/secrets/tokens"
TOKEN_FILE: Final = "istio-token"
TOKEN_AUDIENCE: Final = "istio-ca"
TOKEN_SECONDS: Final = 43200
# Open connections get this long to finish when a waypoint pod stops (Istio's proxies default to 5 s).
TERMINATION_GRACE_SECONDS: Final = 5

CONDITION_ACCEPTED: Final = "Accepted"
CONDITION_PROGRAMMED: Final = "Programmed"
OUR_CONDITIONS: Final = (CONDITION_ACCEPTED, CONDITION_PROGRAMMED)
# Longer condition messages are cut (Kubernetes allows 32 KiB; a status should stay readable).
MAX_MESSAGE: Final = 1024

_DNS_1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_OWNER_API_VERSION = "gateway.networking.k8s.io/v1"


@dataclass(frozen=True, slots=True)
class LabSettings:
    """How a waypoint pod in the lab reaches the controller: files on the machine."""

    root_cert: Path  # the mesh root the controller publishes
    token_dir: Path  # where the controller writes each waypoint's credential (mode 0600)

    def token_path(self, namespace: str, name: str) -> Path:
        # Namespace and name are DNS labels (no "."), so "<ns>.<name>" names one waypoint only.
        return self.token_dir / f"{namespace}.{name}.token"


@dataclass(frozen=True, slots=True)
class WaypointSettings:
    """Everything `plan` needs besides the Gateway."""

    xds_address: str = DEFAULT_XDS_ADDRESS  # host:port of the controller, as the waypoint dials it
    image: str = DEFAULT_IMAGE
    command: tuple[str, ...] = DEFAULT_COMMAND
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    replicas: int = 1
    lab: LabSettings | None = None  # set: the lab runs the pods (command annotation, credential files)

    def __post_init__(self) -> None:
        if not self.command or not all(self.command):
            raise ValueError("the waypoint command must be a non-empty list of non-empty words")
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if not self.xds_address:
            raise ValueError("the waypoint needs the controller's address")


@dataclass(frozen=True, slots=True)
class DesiredWaypoint:
    """An accepted waypoint: the objects that run it (API-form manifests, creation order)."""

    gateway: ResourceKey
    service_account: Mapping[str, Any]
    service: Mapping[str, Any]
    deployment: Mapping[str, Any]

    @property
    def manifests(self) -> tuple[Mapping[str, Any], ...]:
        # The account first (the pods run as it), the Deployment last (its pods need both).
        return (self.service_account, self.service, self.deployment)

    @property
    def account_name(self) -> str:
        return str(self.service_account["metadata"]["name"])


@dataclass(frozen=True, slots=True)
class Rejected:
    """A waypoint Gateway that is not deployed: Accepted=False with this reason and message."""

    gateway: ResourceKey
    reason: str
    message: str


Plan = DesiredWaypoint | Rejected


@dataclass(frozen=True, slots=True)
class Observation:
    """What the reconciler saw of a deployed waypoint."""

    ready_replicas: int = 0
    addresses: tuple[str, ...] = ()  # the Service's cluster IPs
    conflict: str = ""  # an object in the way that loom does not manage
    error: str = ""  # writing the objects failed (retried)


def waypoint_service_account(gateway: Gateway) -> str:
    """The account the waypoint runs as (see the module docstring for the choice)."""
    if gateway.for_service_account:
        return f"{gateway.name}{PER_SERVICE_ACCOUNT_SUFFIX}"
    return gateway.name


def is_managed(manifest: Mapping[str, Any], gateway_name: str | None = None) -> bool:
    """Whether an object carries our labels (for `gateway_name`, when given)."""
    meta = manifest.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    if not isinstance(labels, Mapping) or labels.get(LABEL_MANAGED) != MANAGED_BY:
        return False
    return gateway_name is None or labels.get(LABEL_GATEWAY_NAME) == gateway_name


def has_mesh_listener(gateway: Gateway) -> bool:
    return any(
        listener.protocol == LISTENER_PROTOCOL and listener.port == HBONE_PORT
        for listener in gateway.listeners
    )


def plan(gateway: Gateway, settings: WaypointSettings) -> Plan:
    """The objects for one waypoint Gateway, or why it is not deployed."""
    key = gateway.key
    if not gateway.is_waypoint:
        raise ValueError(f"{key} is not a waypoint (class {gateway.gateway_class!r})")
    if not _DNS_1035_LABEL.match(gateway.name):
        return Rejected(
            key,
            "Invalid",
            f"the waypoint's Service takes the Gateway's name, so it must be a DNS-1035 label (at most 63 "
            f"lower-case letters, digits or '-', starting with a letter); {gateway.name!r} is not",
        )
    if not has_mesh_listener(gateway):
        return Rejected(
            key,
            "ListenersNotValid",
            f"a waypoint needs a listener with protocol {LISTENER_PROTOCOL} on port {HBONE_PORT} "
            "(e.g. name mesh); none found",
        )
    account = waypoint_service_account(gateway)
    return DesiredWaypoint(
        gateway=key,
        service_account=_service_account(gateway, account),
        service=_service(gateway),
        deployment=_deployment(gateway, account, settings),
    )


def _metadata(gateway: Gateway, name: str) -> dict[str, Any]:
    owner: dict[str, Any] = {
        "apiVersion": str(gateway.raw.get("apiVersion") or _OWNER_API_VERSION),
        "kind": "Gateway",
        "name": gateway.name,
        "controller": True,
    }
    if gateway.meta.uid:
        owner["uid"] = gateway.meta.uid
    return {
        "name": name,
        "namespace": gateway.namespace,
        "labels": {LABEL_GATEWAY_NAME: gateway.name, LABEL_MANAGED: MANAGED_BY},
        "ownerReferences": [owner],
    }


def _service_account(gateway: Gateway, account: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(gateway, account)}


def _service(gateway: Gateway) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(gateway, gateway.name),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_GATEWAY_NAME: gateway.name},
            "ports": [
                {
                    "name": SERVICE_PORT_NAME,
                    "port": HBONE_PORT,
                    "targetPort": HBONE_PORT,
                    "protocol": "TCP",
                    "appProtocol": SERVICE_APP_PROTOCOL,
                }
            ],
        },
    }


def waypoint_environment(gateway: Gateway, account: str, settings: WaypointSettings) -> dict[str, str]:
    """The settings every waypoint process gets (waypoint/xds.py reads them); paths differ by mode."""
    if settings.lab is not None:
        root_cert = str(settings.lab.root_cert)
        token = str(settings.lab.token_path(gateway.namespace, gateway.name))
    else:
        root_cert = f"{ROOT_CERT_DIR}/root-cert.pem"
        token = f"{TOKEN_DIR}/{TOKEN_FILE}"
    return {
        ENV_XDS_ADDRESS: settings.xds_address,
        ENV_ROOT_CERT: root_cert,
        ENV_TOKEN_FILE: token,
        ENV_NAMESPACE: gateway.namespace,
        ENV_NAME: gateway.name,
        ENV_SERVICE_ACCOUNT: account,
        ENV_TRUST_DOMAIN: settings.trust_domain,
        ENV_CLUSTER_ID: settings.cluster_id,
    }


def lab_command(environment: Mapping[str, str], command: Sequence[str]) -> str:
    """The lab's command line: `exec` so that the recorded pid is the waypoint's own, `env` so that
    no value is ever read by the shell (every word is quoted)."""
    words = ["exec", "env", *(f"{k}={v}" for k, v in environment.items()), *command]
    return shlex.join(words)


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _deployment(gateway: Gateway, account: str, settings: WaypointSettings) -> dict[str, Any]:
    environment = waypoint_environment(gateway, account, settings)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "command": list(settings.command),
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": account,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
    }
    template_meta: dict[str, Any] = {
        "labels": {
            LABEL_GATEWAY_NAME: gateway.name,
            LABEL_DATAPLANE_MODE: DATAPLANE_MODE_NONE,
            LABEL_SIDECAR_INJECT: "false",
            LABEL_MANAGED: MANAGED_BY,
        }
    }
    if settings.lab is not None:
        template_meta["annotations"] = {COMMAND_ANNOTATION: lab_command(environment, settings.command)}
    else:
        container["env"] = [
            *({"name": k, "value": v} for k, v in environment.items()),
            _field_env(ENV_POD_NAME, "metadata.name"),
            _field_env(ENV_INSTANCE_IP, "status.podIP"),
            _field_env(ENV_NODE_NAME, "spec.nodeName"),
        ]
        container["readinessProbe"] = {
            "httpGet": {"path": READINESS_PATH, "port": READINESS_PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
        }
        container["volumeMounts"] = [
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "istio-ca-root-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
        ]
        pod_spec["volumes"] = [
            {
                "name": "istio-token",
                "projected": {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": TOKEN_AUDIENCE,
                                "expirationSeconds": TOKEN_SECONDS,
                                "path": TOKEN_FILE,
                            }
                        }
                    ]
                },
            },
            {"name": "istio-ca-root-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(gateway, gateway.name),
        "spec": {
            "replicas": settings.replicas,
            "selector": {"matchLabels": {LABEL_GATEWAY_NAME: gateway.name}},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


# ---------------------------------------------------------------------------------------------------
# readiness as the lab (and the controller's snapshot) shows it


def ready_pods(snapshot: ConfigSnapshot, namespace: str, gateway_name: str) -> int:
    """Running, ready pods of the waypoint's Deployment in `snapshot`."""
    return sum(
        1
        for pod in snapshot.of_kind(Pod)
        if pod.namespace == namespace
        and pod.meta.labels.get(LABEL_GATEWAY_NAME) == gateway_name
        and pod.owner_deployment == gateway_name
        and pod.phase == "Running"
        and pod.ready
    )


# ---------------------------------------------------------------------------------------------------
# status


def _condition(gateway: Gateway, type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "observedGeneration": gateway.meta.generation,
    }


def desired_conditions(gateway: Gateway, planned: Plan, seen: Observation | None) -> list[dict[str, Any]]:
    """Accepted and Programmed, without lastTransitionTime."""
    if isinstance(planned, Rejected):
        return [
            _condition(gateway, CONDITION_ACCEPTED, False, planned.reason, planned.message),
            _condition(
                gateway, CONDITION_PROGRAMMED, False, "Invalid", "not deployed: the Gateway is not accepted"
            ),
        ]
    accepted = _condition(gateway, CONDITION_ACCEPTED, True, "Accepted", "deployed by loom")
    seen = seen or Observation()
    service = f"{gateway.namespace}/{gateway.name}"
    traffic_note = "; traffic bound to this waypoint fails until it is ready (it is not sent around it)"
    if seen.conflict:
        programmed = _condition(gateway, CONDITION_PROGRAMMED, False, "Invalid", seen.conflict)
    elif seen.error:
        programmed = _condition(
            gateway, CONDITION_PROGRAMMED, False, "NoResources", f"cannot deploy: {seen.error}{traffic_note}"
        )
    elif not seen.addresses:
        programmed = _condition(
            gateway,
            CONDITION_PROGRAMMED,
            False,
            "AddressNotAssigned",
            f"Service {service} has no cluster IP yet{traffic_note}",
        )
    elif seen.ready_replicas < 1:
        programmed = _condition(
            gateway,
            CONDITION_PROGRAMMED,
            False,
            "Pending",
            f"Deployment {service} has no ready pod{traffic_note}",
        )
    else:
        programmed = _condition(
            gateway,
            CONDITION_PROGRAMMED,
            True,
            "Programmed",
            f"{seen.ready_replicas} ready replica(s) behind Service {service}",
        )
    return [accepted, programmed]


def _existing_status(gateway: Gateway) -> Mapping[str, Any]:
    status = gateway.raw.get("status")
    return status if isinstance(status, Mapping) else {}


def _existing_conditions(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    conditions = status.get("conditions")
    return [c for c in conditions if isinstance(c, Mapping)] if isinstance(conditions, list) else []


def _addresses(seen: Observation | None, planned: Plan) -> list[dict[str, str]]:
    if seen is None or isinstance(planned, Rejected):
        return []
    return [{"type": "IPAddress", "value": ip} for ip in seen.addresses]


def status_current(gateway: Gateway, planned: Plan, seen: Observation | None) -> bool:
    """Whether the Gateway already reports exactly this (ignoring lastTransitionTime)."""
    status = _existing_status(gateway)
    existing = {c.get("type"): c for c in _existing_conditions(status)}
    for wanted in desired_conditions(gateway, planned, seen):
        have = existing.get(wanted["type"])
        if have is None or any(have.get(k) != v for k, v in wanted.items()):
            return False
    return list(status.get("addresses") or []) == _addresses(seen, planned)


def gateway_status(gateway: Gateway, planned: Plan, seen: Observation | None, now: str) -> dict[str, Any]:
    """The complete status to write (a merge patch replaces lists whole: conditions of other types
    are kept as they are; ours keep their lastTransitionTime unless their status changed)."""
    status = _existing_status(gateway)
    conditions = _existing_conditions(status)
    by_type = {c.get("type"): c for c in conditions}
    ours: list[dict[str, Any]] = []
    for wanted in desired_conditions(gateway, planned, seen):
        before = by_type.get(wanted["type"])
        unchanged = before is not None and before.get("status") == wanted["status"]
        since = before.get("lastTransitionTime") if unchanged and before is not None else None
        ours.append({**wanted, "lastTransitionTime": since if isinstance(since, str) and since else now})
    others = [dict(c) for c in conditions if c.get("type") not in OUR_CONDITIONS]
    return {**status, "conditions": [*ours, *others], "addresses": _addresses(seen, planned)}
