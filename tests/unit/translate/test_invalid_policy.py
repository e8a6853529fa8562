"""An AuthorizationPolicy that fails validation is enforced fail-closed, never dropped.

Dropping it would silently remove a DENY, or turn "allow only X" into "allow everything" when it was
the only ALLOW policy. Instead it stands in as a DENY of every connection in its best-known scope.
"""

from __future__ import annotations

from controller.translate import MeshConfig, translate
from loom.api import authorization_pb2
from loom.policy.rbac import Connection, applicable_policies, decide
from loom.resources.loader import load_text

NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings, namespace: default, labels: {app: ratings}}
spec: {serviceAccountName: ratings, nodeName: n1, containers: [{name: app}]}
status: {phase: Running, podIP: 10.0.0.7, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {serviceAccountName: other, nodeName: n1, containers: [{name: app}]}
status: {phase: Running, podIP: 10.0.0.8, conditions: [{type: Ready, status: "True"}]}
"""

# The DENY has a typo in a value (namespaces must be strings); everything else is fine.
BROKEN_DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-deny-legacy, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - from:
    - source: {namespaces: 7}
"""

# The selector itself is malformed: the scope widens to the whole namespace.
BROKEN_SELECTOR = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken-selector, namespace: default}
spec:
  selector: {matchLabels: [app, ratings]}
  action: ALLOW
  rules: [{}]
"""


def decision_for(text: str, pod_ip: str, workload_name: str) -> tuple[bool, list[str]]:
    loaded = load_text(NAMESPACE + "---" + text, "policy.yaml")
    translation = translate(loaded.snapshot, MeshConfig())
    workload = translation.addresses[f"Kubernetes//Pod/default/{workload_name}"].workload
    policies = applicable_policies(workload, translation.authorizations)
    conn = Connection.of("spiffe://cluster.local/ns/default/sa/productpage", "10.0.0.9", pod_ip, 9080)
    errors = [str(d) for d in loaded.diagnostics if d.is_error]
    return decide(policies, conn).allowed, errors


def test_invalid_deny_is_reported_and_denies_its_selected_workloads() -> None:
    allowed, errors = decision_for(BROKEN_DENY, "10.0.0.7", "ratings")
    assert errors == [
        "policy.yaml doc 4 AuthorizationPolicy default/ratings-deny-legacy: "
        "spec.rules[0].from[0].source.namespaces: expected a list of strings, got int"
    ]
    assert not allowed
    # ... and only those: the other pod is not selected.
    allowed_other, _ = decision_for(BROKEN_DENY, "10.0.0.8", "other")
    assert allowed_other


def test_invalid_selector_widens_to_the_namespace() -> None:
    loaded = load_text(NAMESPACE + "---" + BROKEN_SELECTOR, "policy.yaml")
    translation = translate(loaded.snapshot, MeshConfig())
    compiled = translation.authorizations["default/broken-selector"]
    assert compiled.scope == authorization_pb2.NAMESPACE
    assert compiled.action == authorization_pb2.DENY
    for name, ip in (("ratings", "10.0.0.7"), ("other", "10.0.0.8")):
        allowed, _ = decision_for(BROKEN_SELECTOR, ip, name)
        assert not allowed, name


def test_validate_names_the_fail_closed_enforcement() -> None:
    loaded = load_text(NAMESPACE + "---" + BROKEN_DENY, "policy.yaml")
    translation = translate(loaded.snapshot, MeshConfig())
    warnings = [str(d) for d in translation.diagnostics if not d.is_error]
    assert any("ratings-deny-legacy" in w and "fail closed" in w for w in warnings), warnings
