"""The enrolment decision (pure): pod label wins, `none` opts out, exclusions never captured."""

from __future__ import annotations

import pytest

from cni.agent.enrolment import decide_enrolment
from loom.resources.model import LABEL_DATAPLANE_MODE, Namespace, ObjectMeta, Pod, PodTemplate

AMBIENT = {LABEL_DATAPLANE_MODE: "ambient"}
NONE = {LABEL_DATAPLANE_MODE: "none"}
SIDECAR = {"sidecar.istio.io/status": "{}"}


def make_pod(
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    *,
    host_network: bool = False,
    phase: str = "Running",
) -> Pod:
    meta = ObjectMeta("p", namespace, labels=labels or {}, annotations=annotations or {})
    return Pod(meta=meta, spec=PodTemplate(host_network=host_network), phase=phase)


def make_namespace(name: str = "default", labels: dict[str, str] | None = None) -> Namespace:
    return Namespace(meta=ObjectMeta(name, "", labels=labels or {}))


@pytest.mark.parametrize(
    ("pod", "namespace", "enrolled", "reason_part"),
    [
        (make_pod(), make_namespace(labels=AMBIENT), True, "namespace default is labelled"),
        (make_pod(labels=AMBIENT), make_namespace(), True, "pod default/p is labelled"),
        (make_pod(labels=AMBIENT), None, True, "is labelled"),
        (make_pod(labels=NONE), make_namespace(labels=AMBIENT), False, "opted out"),
        (make_pod(), make_namespace(), False, "neither"),
        (make_pod(), None, False, "neither"),
        (
            make_pod(labels={LABEL_DATAPLANE_MODE: "sidecar"}),
            make_namespace(labels=AMBIENT),
            True,
            "namespace",
        ),
        (make_pod(labels={LABEL_DATAPLANE_MODE: "bogus"}), make_namespace(), False, "neither"),
        (make_pod(annotations=SIDECAR, labels=AMBIENT), make_namespace(labels=AMBIENT), False, "sidecar"),
        (make_pod("kube-system", AMBIENT), make_namespace("kube-system", AMBIENT), False, "excluded"),
        (make_pod(labels=AMBIENT, host_network=True), make_namespace(labels=AMBIENT), False, "host network"),
        (make_pod(labels=AMBIENT, phase="Succeeded"), make_namespace(), False, "Succeeded"),
        (make_pod(labels=AMBIENT, phase="Failed"), make_namespace(), False, "Failed"),
        (make_pod(labels=AMBIENT, phase="Pending"), make_namespace(), True, "labelled"),
    ],
)
def test_decide_enrolment(pod: Pod, namespace: Namespace | None, enrolled: bool, reason_part: str) -> None:
    decision = decide_enrolment(pod, namespace)
    assert decision.enrolled is enrolled
    assert reason_part in decision.reason
