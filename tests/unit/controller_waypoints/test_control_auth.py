"""Waypoint credentials (controller/waypoints/auth.py) and what the CA grants a waypoint
(controller/ca/service.py `authorize`): its own identity and nothing else, fail closed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import gateway, pod, snapshot_of

from controller.auth import AuthenticationError, LabNodeAuthenticator, NodeIdentity
from controller.ca.service import NodeIndex, Refusal, authorize
from controller.waypoints.auth import (
    KubernetesMeshAuthenticator,
    LabMeshAuthenticator,
    kubernetes_waypoint_caller,
)
from loom.resources.model import ConfigSnapshot

TD = "cluster.local"
GATEWAY_LABEL = {"gateway.networking.k8s.io/gateway-name": "waypoint"}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def nodes(tmp_path: Path) -> LabNodeAuthenticator:
    return LabNodeAuthenticator.load_or_create(tmp_path)


def lab(nodes: LabNodeAuthenticator, *manifests: Mapping[str, Any]) -> LabMeshAuthenticator:
    snapshot = snapshot_of(*manifests)
    return LabMeshAuthenticator(nodes, lambda: snapshot)


# ---------------------------------------------------------------------------------------------------
# lab credentials


async def test_lab_waypoint_credential_names_the_waypoint_and_its_account(
    nodes: LabNodeAuthenticator,
) -> None:
    auth = lab(nodes, gateway("default", "waypoint"), gateway("bookinfo", "reviews-wp", for_sa="reviews"))
    identity = await auth.authenticate(bearer(auth.issue_waypoint_token("default", "waypoint")))
    assert identity == NodeIdentity(
        node_name="",
        subject="waypoint/default/waypoint",
        waypoint="default/waypoint",
        waypoint_service_account="waypoint",
    )
    per_sa = await auth.authenticate(bearer(auth.issue_waypoint_token("bookinfo", "reviews-wp")))
    assert per_sa.waypoint_service_account == "reviews-wp-istio-waypoint"


async def test_node_credentials_still_work_through_the_mesh_authenticator(
    nodes: LabNodeAuthenticator,
) -> None:
    auth = lab(nodes, gateway())
    identity = await auth.authenticate(bearer(auth.issue_node_token("node-a")))
    assert identity == NodeIdentity(node_name="node-a", subject="node/node-a")
    assert not identity.waypoint


async def test_waypoint_of_a_deleted_or_foreign_gateway_is_refused(nodes: LabNodeAuthenticator) -> None:
    auth = lab(nodes, gateway("default", "ingress", gateway_class="istio"))
    for name in ("waypoint", "ingress"):
        with pytest.raises(AuthenticationError) as refused:
            await auth.authenticate(bearer(auth.issue_waypoint_token("default", name)))
        assert refused.value.reason == "waypoint-not-found"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        pytest.param(lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "bad-credential", id="mac"),
        pytest.param(
            lambda t: t.replace("default/waypoint", "default/other"), "bad-credential", id="subject"
        ),
        pytest.param(
            lambda t: t.replace("default/waypoint", "default"), "malformed-credential", id="no name"
        ),
        pytest.param(lambda t: t.rsplit(".", 1)[0] + ".", "malformed-credential", id="empty mac"),
        pytest.param(lambda t: t.replace("default/", "Default/"), "malformed-credential", id="bad namespace"),
    ],
)
async def test_tampered_waypoint_credentials_are_refused(
    nodes: LabNodeAuthenticator, mutate: Any, reason: str
) -> None:
    auth = lab(nodes, gateway(), gateway("default", "other"))
    token = mutate(auth.issue_waypoint_token("default", "waypoint"))
    with pytest.raises(AuthenticationError) as refused:
        await auth.authenticate(bearer(token))
    assert refused.value.reason == reason


async def test_node_and_waypoint_credentials_do_not_cross(nodes: LabNodeAuthenticator) -> None:
    auth = lab(nodes, gateway())
    # The same subject text under the other kind's prefix never verifies (separate purposes).
    node_token = nodes.issue_node_token("default")
    forged = "loom-waypoint.v1.default/waypoint." + node_token.rsplit(".", 1)[1]
    with pytest.raises(AuthenticationError):
        await auth.authenticate(bearer(forged))
    waypoint_mac = auth.issue_waypoint_token("default", "waypoint").rsplit(".", 1)[1]
    with pytest.raises(AuthenticationError):
        await auth.authenticate(bearer(f"loom-node.v1.default.{waypoint_mac}"))


def test_invalid_waypoint_names_get_no_credential(nodes: LabNodeAuthenticator) -> None:
    auth = lab(nodes)
    for namespace, name in (("default", "a/b"), ("", "w"), ("default", "x.y"), ("UPPER", "w")):
        with pytest.raises(ValueError):
            auth.issue_waypoint_token(namespace, name)


# ---------------------------------------------------------------------------------------------------
# Kubernetes: the waypoint pod's own token


def cluster(**pod_overrides: Any) -> ConfigSnapshot:
    labels = pod_overrides.pop("labels", GATEWAY_LABEL)
    manifest = pod("default", "waypoint-abc", labels=labels, service_account="waypoint", **pod_overrides)
    manifest["metadata"]["uid"] = "pod-uid"
    return snapshot_of(
        gateway("default", "waypoint"), gateway("default", "plain", gateway_class="istio"), manifest
    )


def caller(snapshot: ConfigSnapshot, **overrides: str) -> NodeIdentity:
    fields = {
        "namespace": "default",
        "service_account": "waypoint",
        "username": "system:serviceaccount:default:waypoint",
        "pod_name": "waypoint-abc",
        "pod_uid": "pod-uid",
        "node_name": "node-a",
        **overrides,
    }
    return kubernetes_waypoint_caller(snapshot, **fields)


def test_kubernetes_waypoint_pod_is_its_waypoint() -> None:
    assert caller(cluster()) == NodeIdentity(
        node_name="node-a",
        subject="system:serviceaccount:default:waypoint",
        pod="default/waypoint-abc",
        waypoint="default/waypoint",
        waypoint_service_account="waypoint",
    )


@pytest.mark.parametrize(
    ("snapshot_args", "overrides", "reason"),
    [
        pytest.param({}, {"pod_name": ""}, "unbound-token", id="token not bound to a pod"),
        pytest.param({}, {"pod_name": "gone"}, "caller-pod-not-found", id="pod gone"),
        pytest.param({}, {"pod_uid": "old"}, "caller-pod-uid-mismatch", id="pod replaced"),
        pytest.param(
            {}, {"service_account": "other"}, "caller-pod-account-mismatch", id="token of another SA"
        ),
        pytest.param({"phase": "Succeeded"}, {}, "caller-pod-not-running", id="pod finished"),
        pytest.param({}, {"node_name": "node-b"}, "caller-node-mismatch", id="token bound to another node"),
        pytest.param({"labels": {"app": "x"}}, {}, "untrusted-account", id="not a waypoint pod"),
        pytest.param(
            {"labels": {"gateway.networking.k8s.io/gateway-name": "gone"}},
            {},
            "waypoint-not-found",
            id="its Gateway is gone",
        ),
        pytest.param(
            {"labels": {"gateway.networking.k8s.io/gateway-name": "plain"}},
            {},
            "waypoint-not-found",
            id="its Gateway is not a waypoint",
        ),
    ],
)
def test_kubernetes_waypoint_refusals(
    snapshot_args: dict[str, Any], overrides: dict[str, str], reason: str
) -> None:
    with pytest.raises(AuthenticationError) as refused:
        caller(cluster(**snapshot_args), **overrides)
    assert refused.value.reason == reason


def test_a_pod_labelled_as_a_waypoint_but_running_as_another_account_is_refused() -> None:
    manifest = pod("default", "impostor", labels=GATEWAY_LABEL, service_account="reviews")
    manifest["metadata"]["uid"] = "u"
    snapshot = snapshot_of(gateway("default", "waypoint"), manifest)
    with pytest.raises(AuthenticationError) as refused:
        caller(snapshot, pod_name="impostor", pod_uid="u", service_account="reviews")
    assert refused.value.reason == "waypoint-account-mismatch"


class Reviewer:
    """TokenReview answers by token (what the API server would say)."""

    def __init__(self, users: Mapping[str, tuple[str, str, str]]) -> None:
        self.users = users  # token -> (username, pod name, pod uid)
        self.asked = 0

    async def token_review(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        self.asked += 1
        if token not in self.users:
            return {"authenticated": False, "error": "invalid bearer token"}
        username, pod_name, pod_uid = self.users[token]
        extra = {
            "authentication.kubernetes.io/pod-name": [pod_name],
            "authentication.kubernetes.io/pod-uid": [pod_uid],
            "authentication.kubernetes.io/node-name": ["node-a"],
        }
        return {"authenticated": True, "audiences": audiences, "user": {"username": username, "extra": extra}}


async def test_kubernetes_mesh_authenticator_tells_node_proxies_and_waypoints_apart() -> None:
    ztunnel = pod("istio-system", "ztunnel-a", service_account="ztunnel")
    ztunnel["metadata"]["uid"] = "zt-uid"
    waypoint_pod = pod("default", "waypoint-abc", labels=GATEWAY_LABEL, service_account="waypoint")
    waypoint_pod["metadata"]["uid"] = "pod-uid"
    snapshot = snapshot_of(gateway(), ztunnel, waypoint_pod)
    reviewer = Reviewer(
        {
            "zt": ("system:serviceaccount:istio-system:ztunnel", "ztunnel-a", "zt-uid"),
            "wp": ("system:serviceaccount:default:waypoint", "waypoint-abc", "pod-uid"),
        }
    )
    auth = KubernetesMeshAuthenticator(reviewer, lambda: snapshot, [("istio-system", "ztunnel")])
    node = await auth.authenticate(bearer("zt"))
    assert (node.node_name, node.waypoint) == ("node-a", "")
    waypoint = await auth.authenticate(bearer("wp"))
    assert (waypoint.waypoint, waypoint.waypoint_service_account) == ("default/waypoint", "waypoint")
    assert reviewer.asked == 2  # one TokenReview per token, shared by both paths
    with pytest.raises(AuthenticationError) as refused:
        await auth.authenticate(bearer("junk"))
    assert refused.value.reason == "not-authenticated"


# ---------------------------------------------------------------------------------------------------
# the CA


WAYPOINT = NodeIdentity(
    "", "waypoint/default/waypoint", waypoint="default/waypoint", waypoint_service_account="waypoint"
)
# Pods of other accounts run on node-a, and the waypoint's "node" is empty: none of that may count.
INDEX = NodeIndex(frozenset({("node-a", "default", "reviews"), ("", "default", "reviews")}))


def test_ca_issues_a_waypoint_its_own_identity() -> None:
    granted = authorize(WAYPOINT, f"spiffe://{TD}/ns/default/sa/waypoint", INDEX, TD)
    assert str(granted) == f"spiffe://{TD}/ns/default/sa/waypoint"


@pytest.mark.parametrize(
    ("caller_identity", "requested", "reason"),
    [
        pytest.param(
            WAYPOINT, "spiffe://cluster.local/ns/default/sa/reviews", "not-waypoint-identity", id="other SA"
        ),
        pytest.param(
            WAYPOINT, "spiffe://cluster.local/ns/other/sa/waypoint", "not-waypoint-identity", id="other ns"
        ),
        pytest.param(
            WAYPOINT, "spiffe://evil.example/ns/default/sa/waypoint", "foreign-trust-domain", id="other TD"
        ),
        pytest.param(WAYPOINT, None, "missing-identity", id="no identity"),
        pytest.param(
            NodeIdentity("", "waypoint/default/waypoint", waypoint="default/waypoint"),
            "spiffe://cluster.local/ns/default/sa/",
            "bad-identity",
            id="empty SA",
        ),
        pytest.param(
            NodeIdentity("", "waypoint/default/waypoint", waypoint="default/waypoint"),
            "spiffe://cluster.local/ns/default/sa/waypoint",
            "not-waypoint-identity",
            id="waypoint without a known account",
        ),
        pytest.param(
            NodeIdentity("node-a", "x", waypoint="default/waypoint", waypoint_service_account="waypoint"),
            "spiffe://cluster.local/ns/default/sa/reviews",
            "not-waypoint-identity",
            id="a waypoint's node does not widen it",
        ),
    ],
)
def test_ca_refuses_a_waypoint_anything_else(
    caller_identity: NodeIdentity, requested: str | None, reason: str
) -> None:
    with pytest.raises(Refusal) as refused:
        authorize(caller_identity, requested, INDEX, TD)
    assert refused.value.reason == reason


def test_node_proxies_are_authorized_as_before() -> None:
    node = NodeIdentity("node-a", "node/node-a")
    assert authorize(node, f"spiffe://{TD}/ns/default/sa/reviews", INDEX, TD).service_account == "reviews"
    with pytest.raises(Refusal):
        authorize(node, f"spiffe://{TD}/ns/default/sa/waypoint", INDEX, TD)
