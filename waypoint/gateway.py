"""The waypoint Gateway manifest, and how to read a stored one's state. Pure: no I/O.

A waypoint is declared as a Gateway API Gateway of class ``istio-waypoint`` with one listener named
``mesh`` on port 15008, protocol HBONE (reference §5.2); the controller runs a waypoint for each such
Gateway and binds traffic to it (controller/translate/waypoints.py):

* Istio's current model: the label ``istio.io/waypoint-for`` (service, workload, all, none) says which
  traffic the waypoint takes; objects opt in with ``istio.io/use-waypoint``. As ``istioctl waypoint
  generate`` does, the label is written only when a traffic type is asked for; unlabelled, the
  controller treats the waypoint as ``service``.
* loom's per-service-account model: the annotation ``istio.io/for-service-account: <sa>`` makes the
  waypoint serve the pods of its namespace that run as that account (no use-waypoint label needed).
  Unlabelled, such a waypoint takes both service and workload traffic; a label narrows it.

``istio.io/rev`` carries the revision (``istioctl -r``). The name ``none`` is refused: Istio reserves it
(``istio.io/use-waypoint: none`` opts out, so a waypoint of that name could never be used).

Reading state: the controller reports on a waypoint in the Gateway's ``status.conditions``, as Istio
does: ``Accepted`` and ``Programmed`` (True once the waypoint is deployed and ready). `waypoint_state`
reads them from a stored manifest, tolerating any shape, since status is written by another process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loom.resources.model import (
    ANNOTATION_FOR_SERVICE_ACCOUNT,
    HBONE_PORT,
    LABEL_WAYPOINT_FOR,
    WAYPOINT_GATEWAY_CLASS,
)

WaypointFor = Literal["service", "workload", "all", "none"]
WAYPOINT_FOR_VALUES: tuple[WaypointFor, ...] = ("service", "workload", "all", "none")
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
DEFAULT_WAYPOINT_NAME = "waypoint"
RESERVED_NAMES = frozenset({"none"})
LISTENER_NAME = "mesh"
LISTENER_PROTOCOL = "HBONE"
LABEL_REVISION = "istio.io/rev"
DEFAULT_REVISION = "default"
CONDITION_ACCEPTED = "Accepted"
CONDITION_PROGRAMMED = "Programmed"
REPORTED_CONDITIONS = (CONDITION_ACCEPTED, CONDITION_PROGRAMMED)

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\Z")
_DNS_1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*\Z")
# A label value: at most 63 characters, alphanumeric at both ends, "-", "_" and "." inside.
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)\Z")


class WaypointSpecError(ValueError):
    """A waypoint that cannot be declared; the message names the argument and why."""


def _check_dns_label(what: str, value: str) -> None:
    if not (len(value) <= 63 and _DNS_LABEL.match(value)):
        raise WaypointSpecError(
            f"{what} {value!r} is not valid: it must be at most 63 lower-case letters, digits or '-', "
            "starting and ending with a letter or digit"
        )


def _check_dns_subdomain(what: str, value: str) -> None:
    if not (len(value) <= 253 and _DNS_SUBDOMAIN.match(value)):
        raise WaypointSpecError(
            f"{what} {value!r} is not valid: it must be lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )


def waypoint_gateway(
    namespace: str,
    name: str = DEFAULT_WAYPOINT_NAME,
    *,
    service_account: str | None = None,
    for_: WaypointFor | str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """The waypoint Gateway manifest (see the module docstring). `for_` None writes no
    ``istio.io/waypoint-for`` label (the controller's default applies: service, or both kinds of
    traffic for a per-service-account waypoint). Raises WaypointSpecError for a bad argument."""
    _check_dns_label("namespace", namespace)
    # The waypoint's Service is named after the Gateway, so the name must be a valid Service name.
    if not (len(name) <= 63 and _DNS_1035_LABEL.match(name)):
        raise WaypointSpecError(
            f"waypoint name {name!r} is not valid: the waypoint's Service takes this name, so it must be "
            "at most 63 lower-case letters, digits or '-', starting with a letter and ending with a "
            "letter or digit"
        )
    if name in RESERVED_NAMES:
        raise WaypointSpecError(
            f"waypoint name {name!r} is reserved: istio.io/use-waypoint={name} means 'no waypoint'"
        )
    if for_ is not None and for_ not in WAYPOINT_FOR_VALUES:
        raise WaypointSpecError(f"traffic type {for_!r} is not one of {', '.join(WAYPOINT_FOR_VALUES)}")
    if service_account is not None:
        _check_dns_subdomain("service account", service_account)
    if revision is not None and not _LABEL_VALUE.match(revision):
        raise WaypointSpecError(
            f"revision {revision!r} is not a valid label value (at most 63 letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit)"
        )
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    labels: dict[str, str] = {}
    if for_ is not None:
        labels[LABEL_WAYPOINT_FOR] = for_
    if revision is not None:
        labels[LABEL_REVISION] = revision
    if labels:
        metadata["labels"] = labels
    if service_account is not None:
        metadata["annotations"] = {ANNOTATION_FOR_SERVICE_ACCOUNT: service_account}
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": WAYPOINT_GATEWAY_CLASS,
            "listeners": [{"name": LISTENER_NAME, "port": HBONE_PORT, "protocol": LISTENER_PROTOCOL}],
        },
    }


# ---------------------------------------------------------------------------------------------------
# Reading a stored waypoint


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class WaypointState:
    """What a stored waypoint Gateway says about itself."""

    namespace: str
    name: str
    revision: str  # istio.io/rev, "default" when unset
    traffic_type: str  # the effective traffic type the controller applies
    service_account: str  # "" unless per-service-account
    conditions: tuple[Condition, ...]  # as reported, in the manifest's order

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def programmed(self) -> bool:
        """Ready: the controller reported Programmed=True."""
        found = self.condition(CONDITION_PROGRAMMED)
        return found is not None and found.status == "True"


def _mapping(value: object) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def is_waypoint_manifest(manifest: Mapping[str, Any]) -> bool:
    """A Gateway (of the Gateway API) whose class is istio-waypoint."""
    api_version = _text(manifest.get("apiVersion"))
    return (
        manifest.get("kind") == "Gateway"
        and api_version.startswith("gateway.networking.k8s.io/")
        and _mapping(manifest.get("spec")).get("gatewayClassName") == WAYPOINT_GATEWAY_CLASS
    )


def waypoint_state(manifest: Mapping[str, Any]) -> WaypointState:
    """Read a stored waypoint Gateway; conditions of any malformed shape are skipped."""
    meta = _mapping(manifest.get("metadata"))
    labels = _mapping(meta.get("labels"))
    annotations = _mapping(meta.get("annotations"))
    account = _text(annotations.get(ANNOTATION_FOR_SERVICE_ACCOUNT))
    declared = _text(labels.get(LABEL_WAYPOINT_FOR))
    traffic = declared or ("all" if account else "service")
    conditions: list[Condition] = []
    raw_conditions = _mapping(manifest.get("status")).get("conditions")
    if isinstance(raw_conditions, list):
        for raw in raw_conditions:
            entry = _mapping(raw)
            kind = _text(entry.get("type"))
            if not kind:
                continue
            conditions.append(
                Condition(
                    type=kind,
                    status=_text(entry.get("status")) or "Unknown",
                    reason=_text(entry.get("reason")),
                    message=_text(entry.get("message")),
                )
            )
    return WaypointState(
        namespace=_text(meta.get("namespace")),
        name=_text(meta.get("name")),
        revision=_text(labels.get(LABEL_REVISION)) or DEFAULT_REVISION,
        traffic_type=traffic,
        service_account=account,
        conditions=tuple(conditions),
    )


__all__ = [
    "CONDITION_ACCEPTED",
    "CONDITION_PROGRAMMED",
    "DEFAULT_REVISION",
    "DEFAULT_WAYPOINT_NAME",
    "GATEWAY_API_VERSION",
    "LABEL_REVISION",
    "REPORTED_CONDITIONS",
    "WAYPOINT_FOR_VALUES",
    "Condition",
    "WaypointFor",
    "WaypointSpecError",
    "WaypointState",
    "is_waypoint_manifest",
    "waypoint_gateway",
    "waypoint_state",
]
