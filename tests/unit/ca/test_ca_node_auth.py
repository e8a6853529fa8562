"""Node-proxy authentication (controller/auth.py) and node authorization (controller/ca/service.py)."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from controller.auth import (
    LAB_KEY_FILE,
    AuthenticationError,
    KubernetesNodeAuthenticator,
    LabNodeAuthenticator,
    NodeIdentity,
    bearer_token,
    parse_trusted_account,
)
from controller.ca.service import NodeIndex, Refusal, authorize, impersonated_identity
from loom.identity import Identity
from loom.resources.model import ConfigSnapshot, ObjectMeta, Pod, PodTemplate

TD = "cluster.local"


def pod(ns: str, name: str, sa: str, node: str, *, uid: str = "", phase: str = "Running") -> Pod:
    return Pod(
        meta=ObjectMeta(name=name, namespace=ns, uid=uid or f"uid-{ns}-{name}"),
        spec=PodTemplate(service_account=sa, node_name=node),
        phase=phase,
    )


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# ----------------------------------------------------------------------------------- bearer parsing


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        pytest.param([], "missing-credential", id="no header"),
        pytest.param([("x-other", "1")], "missing-credential", id="other headers only"),
        pytest.param([("authorization", "Basic abc")], "malformed-credential", id="basic scheme"),
        pytest.param([("authorization", "Bearer ")], "malformed-credential", id="empty token"),
        pytest.param(auth("a") + auth("b"), "malformed-credential", id="two credentials"),
        pytest.param(auth("x" * 10000), "malformed-credential", id="oversized"),
    ],
)
def test_bearer_token_refusals(metadata: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(AuthenticationError) as e:
        bearer_token(metadata)
    assert e.value.reason == reason


def test_bearer_token_accepts_bytes_and_case() -> None:
    assert bearer_token([("Authorization", b"bearer tok")]) == "tok"


# ----------------------------------------------------------------------------------- lab credentials


async def test_lab_credentials_round_trip(tmp_path: Path) -> None:
    lab = LabNodeAuthenticator.load_or_create(tmp_path)
    token = lab.issue_node_token("node-1.lab.local")
    assert token.startswith("loom-node.v1.node-1.lab.local.")
    identity = await lab.authenticate(auth(token))
    assert identity == NodeIdentity(node_name="node-1.lab.local", subject="node/node-1.lab.local")
    key_file = tmp_path / LAB_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # Reloading keeps the key: old credentials stay valid across restarts.
    again = LabNodeAuthenticator.load_or_create(tmp_path)
    assert again.issue_node_token("node-1.lab.local") == token
    assert sorted(p.name for p in await asyncio.to_thread(lambda: list(tmp_path.iterdir()))) == [LAB_KEY_FILE]


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        pytest.param(
            lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "bad-credential", id="tampered mac"
        ),
        pytest.param(lambda t: t.replace("node-a", "node-b"), "bad-credential", id="other node same mac"),
        pytest.param(
            lambda t: "loom-node.v2." + t[len("loom-node.v1.") :], "malformed-credential", id="version"
        ),
        pytest.param(lambda t: "loom-node.v1.", "malformed-credential", id="empty body"),
        pytest.param(lambda t: "loom-node.v1.NODE.abc", "malformed-credential", id="invalid node name"),
        pytest.param(
            lambda t: LabNodeAuthenticator(b"k" * 32).issue_node_token("node-a"),
            "bad-credential",
            id="other key",
        ),
    ],
)
async def test_lab_forged_credentials_are_refused(tmp_path: Path, forge: Any, reason: str) -> None:
    lab = LabNodeAuthenticator.load_or_create(tmp_path)
    with pytest.raises(AuthenticationError) as e:
        await lab.authenticate(auth(forge(lab.issue_node_token("node-a"))))
    assert e.value.reason == reason


def test_lab_refuses_to_issue_for_invalid_names(tmp_path: Path) -> None:
    lab = LabNodeAuthenticator.load_or_create(tmp_path)
    for bad in ("", "Node", "a/b", "-a", "a" * 254):
        with pytest.raises(ValueError, match="not a valid node name"):
            lab.issue_node_token(bad)


def test_lab_key_of_wrong_size_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / LAB_KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="must be 32 bytes"):
        LabNodeAuthenticator.load_or_create(tmp_path)


# ----------------------------------------------------------------------------------- Kubernetes tokens

ZTUNNEL_A = pod("istio-system", "ztunnel-a", "ztunnel", "node-a", uid="uid-zt-a")
ZTUNNEL_B = pod("istio-system", "ztunnel-b", "ztunnel", "node-b", uid="uid-zt-b")


def review(
    username: str = "system:serviceaccount:istio-system:ztunnel",
    pod_name: str = "ztunnel-a",
    pod_uid: str = "uid-zt-a",
    node: str = "",
    audiences: tuple[str, ...] = ("istio-ca",),
) -> dict[str, Any]:
    extra: dict[str, list[str]] = {}
    if pod_name:
        extra["authentication.kubernetes.io/pod-name"] = [pod_name]
    if pod_uid:
        extra["authentication.kubernetes.io/pod-uid"] = [pod_uid]
    if node:
        extra["authentication.kubernetes.io/node-name"] = [node]
    return {
        "authenticated": True,
        "user": {"username": username, "extra": extra},
        "audiences": list(audiences),
    }


class FakeReviewer:
    """TokenReview by table; counts calls; optionally slow or failing."""

    def __init__(self, table: Mapping[str, Mapping[str, Any]]) -> None:
        self.table = dict(table)
        self.calls: list[tuple[str, list[str]]] = []
        self.delay = 0.0
        self.fail: Exception | None = None

    async def token_review(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        self.calls.append((token, audiences))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return self.table.get(token, {"authenticated": False, "error": "unknown token"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kube(
    reviewer: FakeReviewer, pods: list[Pod], clock: Clock | None = None
) -> tuple[KubernetesNodeAuthenticator, list[ConfigSnapshot]]:
    holder = [ConfigSnapshot.of(tuple(pods))]
    authenticator = KubernetesNodeAuthenticator(
        reviewer,
        lambda: holder[0],
        [("istio-system", "ztunnel")],
        clock=clock or Clock(),
    )
    return authenticator, holder


async def test_kubernetes_caller_is_identified_by_its_pod() -> None:
    reviewer = FakeReviewer({"t": review(node="node-a")})
    authenticator, _ = kube(reviewer, [ZTUNNEL_A, ZTUNNEL_B])
    identity = await authenticator.authenticate(auth("t"))
    assert identity == NodeIdentity(
        node_name="node-a", subject="system:serviceaccount:istio-system:ztunnel", pod="istio-system/ztunnel-a"
    )
    assert reviewer.calls == [("t", ["istio-ca"])]


KUBE_REFUSALS = [
    pytest.param(
        review(username="system:serviceaccount:default:sleep"),
        [ZTUNNEL_A],
        "untrusted-account",
        id="not a node account",
    ),
    pytest.param(review(username="jane@example.com"), [ZTUNNEL_A], "untrusted-account", id="a user"),
    pytest.param(
        review(pod_name="", pod_uid=""), [ZTUNNEL_A], "unbound-token", id="token not bound to a pod"
    ),
    pytest.param(review(), [ZTUNNEL_B], "caller-pod-not-found", id="caller pod gone"),
    pytest.param(review(pod_uid="stale-uid"), [ZTUNNEL_A], "caller-pod-uid-mismatch", id="stale pod uid"),
    pytest.param(
        review(),
        [pod("istio-system", "ztunnel-a", "other", "node-a", uid="uid-zt-a")],
        "caller-pod-account-mismatch",
        id="pod runs as another account",
    ),
    pytest.param(
        review(),
        [pod("istio-system", "ztunnel-a", "ztunnel", "node-a", uid="uid-zt-a", phase="Failed")],
        "caller-pod-not-running",
        id="caller pod failed",
    ),
    pytest.param(
        review(),
        [pod("istio-system", "ztunnel-a", "ztunnel", "", uid="uid-zt-a")],
        "caller-pod-not-running",
        id="caller pod unscheduled",
    ),
    pytest.param(
        review(node="node-b"), [ZTUNNEL_A], "caller-node-mismatch", id="token bound to another node"
    ),
    pytest.param(
        {"authenticated": False, "error": "expired"}, [ZTUNNEL_A], "not-authenticated", id="rejected"
    ),
    pytest.param(review(audiences=("other",)), [ZTUNNEL_A], "wrong-audience", id="wrong audience"),
    pytest.param(review(audiences=()), [ZTUNNEL_A], "wrong-audience", id="audience not confirmed"),
    pytest.param(
        {k: v for k, v in review().items() if k != "audiences"},
        [ZTUNNEL_A],
        "wrong-audience",
        id="audiences missing from the review",
    ),
]


@pytest.mark.parametrize(("status", "pods", "reason"), KUBE_REFUSALS)
async def test_kubernetes_refusals(status: dict[str, Any], pods: list[Pod], reason: str) -> None:
    authenticator, _ = kube(FakeReviewer({"t": status}), pods)
    with pytest.raises(AuthenticationError) as e:
        await authenticator.authenticate(auth("t"))
    assert e.value.reason == reason


async def test_token_review_failure_fails_closed_and_is_not_cached() -> None:
    reviewer = FakeReviewer({"t": review()})
    reviewer.fail = ConnectionError("apiserver down")
    authenticator, _ = kube(reviewer, [ZTUNNEL_A])
    with pytest.raises(AuthenticationError) as e:
        await authenticator.authenticate(auth("t"))
    assert e.value.reason == "token-review-failed"
    reviewer.fail = None
    assert (await authenticator.authenticate(auth("t"))).node_name == "node-a"
    assert len(reviewer.calls) == 2


async def test_reviews_are_cached_but_pods_are_checked_every_time() -> None:
    reviewer = FakeReviewer({"t": review()})
    clock = Clock()
    authenticator, holder = kube(reviewer, [ZTUNNEL_A], clock)
    for _ in range(3):
        await authenticator.authenticate(auth("t"))
    assert len(reviewer.calls) == 1
    # The pod is replaced (new uid): refused at once, cache or not.
    holder[0] = ConfigSnapshot.of([pod("istio-system", "ztunnel-a", "ztunnel", "node-a", uid="new")])
    with pytest.raises(AuthenticationError) as e:
        await authenticator.authenticate(auth("t"))
    assert e.value.reason == "caller-pod-uid-mismatch"
    holder[0] = ConfigSnapshot.of([ZTUNNEL_A])
    clock.now += 61
    await authenticator.authenticate(auth("t"))
    assert len(reviewer.calls) == 2


async def test_concurrent_reconnects_share_one_review() -> None:
    reviewer = FakeReviewer({"t": review()})
    reviewer.delay = 0.02
    authenticator, _ = kube(reviewer, [ZTUNNEL_A])
    results = await asyncio.gather(*(authenticator.authenticate(auth("t")) for _ in range(20)))
    assert {r.node_name for r in results} == {"node-a"}
    assert len(reviewer.calls) == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_review() -> None:
    reviewer = FakeReviewer({"t": review()})
    reviewer.delay = 0.05
    authenticator, _ = kube(reviewer, [ZTUNNEL_A])
    first = asyncio.create_task(authenticator.authenticate(auth("t")))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(authenticator.authenticate(auth("t")))
    first.cancel()
    assert (await second).node_name == "node-a"
    assert len(reviewer.calls) == 1


def test_parse_trusted_account() -> None:
    assert parse_trusted_account("istio-system/ztunnel") == ("istio-system", "ztunnel")
    for bad in ("ztunnel", "/x", "x/", "a/b/c"):
        with pytest.raises(ValueError, match="expected"):
            parse_trusted_account(bad)


# ----------------------------------------------------------------------------------- node authorization

PODS = [
    pod("default", "alice-1", "alice", "node-a"),
    pod("default", "bob-1", "bob", "node-b"),
    pod("default", "done-1", "done", "node-a", phase="Succeeded"),
    pod("default", "failed-1", "failed", "node-a", phase="Failed"),
    pod("default", "pending-1", "pending", ""),
]
INDEX = NodeIndex.from_snapshot(ConfigSnapshot.of(tuple(PODS)))
NODE_A = NodeIdentity("node-a", "node/node-a")


def test_node_index_skips_terminated_and_unscheduled_pods() -> None:
    assert INDEX.entries == frozenset({("node-a", "default", "alice"), ("node-b", "default", "bob")})


@pytest.mark.parametrize(
    ("requested", "reason"),
    [
        pytest.param(None, "missing-identity", id="no impersonated identity"),
        pytest.param("", "missing-identity", id="empty impersonated identity"),
        pytest.param("default/alice", "bad-identity", id="not spiffe"),
        pytest.param("spiffe://cluster.local/ns/default", "bad-identity", id="truncated spiffe"),
        pytest.param(
            "spiffe://other.td/ns/default/sa/alice", "foreign-trust-domain", id="other trust domain"
        ),
        pytest.param(
            "spiffe://cluster.local/ns/default/sa/bob", "no-pod-on-node", id="pod only on another node"
        ),
        pytest.param("spiffe://cluster.local/ns/default/sa/nobody", "no-pod-on-node", id="no pods at all"),
        pytest.param(
            "spiffe://cluster.local/ns/default/sa/done", "no-pod-on-node", id="only a succeeded pod"
        ),
        pytest.param("spiffe://cluster.local/ns/default/sa/failed", "no-pod-on-node", id="only a failed pod"),
        pytest.param("spiffe://cluster.local/ns/default/sa/pending", "no-pod-on-node", id="only unscheduled"),
        pytest.param(
            "spiffe://cluster.local/ns/other/sa/alice", "no-pod-on-node", id="same sa other namespace"
        ),
    ],
)
def test_authorize_refusals(requested: str | None, reason: str) -> None:
    with pytest.raises(Refusal) as e:
        authorize(NODE_A, requested, INDEX, TD)
    assert e.value.reason == reason


def test_authorize_grants_identities_of_local_pods() -> None:
    assert authorize(NODE_A, "spiffe://cluster.local/ns/default/sa/alice", INDEX, TD) == Identity(
        TD, "default", "alice"
    )


def test_impersonated_identity_from_struct() -> None:
    s = struct_pb2.Struct()
    assert impersonated_identity(s) is None
    s.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"})
    assert impersonated_identity(s) == "spiffe://cluster.local/ns/a/sa/b"
    s.update({"ImpersonatedIdentity": 3})
    with pytest.raises(Refusal) as e:
        impersonated_identity(s)
    assert e.value.reason == "bad-identity"


def test_node_names_are_matched_whole() -> None:
    from controller.auth import valid_node_name

    assert valid_node_name("node-a.example")
    assert not valid_node_name("node-a\n")  # a regex "$" would accept the trailing newline
    assert not valid_node_name("Node_A")
