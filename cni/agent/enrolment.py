"""Whether a pod on this node is captured by the mesh: a pure decision from the Pod and its Namespace.

The rule is Istio's (reference §5.1) and the same one the controller applies when it decides a
workload's tunnel protocol (controller/translate/workloads.py), so the agent never captures a pod the
controller does not announce as HBONE-capable, and vice versa:

* host-network pods are never captured (their "netns" is the node's);
* pods in kube-system are never captured;
* pods with a sidecar (annotation sidecar.istio.io/status) are never captured;
* terminal pods (phase Succeeded/Failed) have nothing left to capture;
* otherwise the pod's label istio.io/dataplane-mode decides when it is `ambient` or `none`, and the
  namespace's label decides when the pod has no (or an unknown) value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from loom.resources.model import LABEL_DATAPLANE_MODE, Namespace, Pod

DATAPLANE_MODE_AMBIENT: Final = "ambient"
DATAPLANE_MODE_NONE: Final = "none"
ANNOTATION_SIDECAR_STATUS: Final = "sidecar.istio.io/status"
EXCLUDED_NAMESPACES: Final = frozenset({"kube-system"})
TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class EnrolmentDecision:
    enrolled: bool
    reason: str  # for logs and plugin replies: why the pod is (not) captured


def decide_enrolment(pod: Pod, namespace: Namespace | None) -> EnrolmentDecision:
    """Whether `pod` is captured; `namespace` is its Namespace object, or None when it is unknown."""
    where = f"pod {pod.namespace}/{pod.meta.name}"
    if pod.spec.host_network:
        return EnrolmentDecision(False, f"{where} uses the host network")
    if pod.namespace in EXCLUDED_NAMESPACES:
        return EnrolmentDecision(False, f"{where} is in excluded namespace {pod.namespace}")
    if ANNOTATION_SIDECAR_STATUS in pod.meta.annotations:
        return EnrolmentDecision(False, f"{where} has a sidecar ({ANNOTATION_SIDECAR_STATUS})")
    if pod.phase in TERMINAL_PHASES:
        return EnrolmentDecision(False, f"{where} is {pod.phase}")
    mode = pod.meta.labels.get(LABEL_DATAPLANE_MODE)
    if mode == DATAPLANE_MODE_AMBIENT:
        return EnrolmentDecision(True, f"{where} is labelled {LABEL_DATAPLANE_MODE}={mode}")
    if mode == DATAPLANE_MODE_NONE:
        return EnrolmentDecision(False, f"{where} opted out with {LABEL_DATAPLANE_MODE}={mode}")
    namespace_mode = namespace.meta.labels.get(LABEL_DATAPLANE_MODE) if namespace is not None else None
    if namespace_mode == DATAPLANE_MODE_AMBIENT:
        return EnrolmentDecision(
            True, f"namespace {pod.namespace} is labelled {LABEL_DATAPLANE_MODE}=ambient"
        )
    return EnrolmentDecision(
        False, f"neither {where} nor its namespace is labelled {LABEL_DATAPLANE_MODE}=ambient"
    )
