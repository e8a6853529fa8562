"""The CA end to end, in process: node-bound issuance and identical opaque refusals (hardening item 29),
with lab credentials (YAML directory) and with Kubernetes service-account tokens (FakeApiServer)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from controller_harness import (
    ADDR,
    XdsClient,
    controller_config,
    create_certificate,
    http_get,
    make_csr,
    metric_value,
    running_controller,
    write_manifests,
)
from cryptography import x509
from cryptography.x509 import verification

from controller.app import ControllerApp
from controller.sources.kubernetes import KubernetesSource, KubernetesSourceSettings
from loom.resources.model import ResourceKey
from loom.testing import manifests as m
from loom.testing.fake_apiserver import FakeApiServer, FakeToken
from loom.testing.waiting import eventually

pytestmark = pytest.mark.timeout(60)

ALICE = "spiffe://cluster.local/ns/default/sa/alice"
BOB = "spiffe://cluster.local/ns/default/sa/bob"
NOBODY = "spiffe://cluster.local/ns/default/sa/nobody"
OPAQUE = (grpc.StatusCode.UNAUTHENTICATED, "request authentication failure")
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def workloads() -> list[dict[str, object]]:
    return [
        m.namespace("default", AMBIENT),
        m.pod("default", "alice-1", service_account="alice", node="node-a", ip="10.244.1.10"),
        m.pod("default", "bob-1", service_account="bob", node="node-b", ip="10.244.2.10"),
    ]


def verify_leaf(chain_pem: list[str], root_pem: str, expected_uri: str) -> x509.Certificate:
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pem]
    roots = x509.load_pem_x509_certificates(root_pem.encode())
    assert chain[-1] in roots  # root last
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:-1])
    assert verified.subjects == [x509.UniformResourceIdentifier(expected_uri)]
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(expected_uri)]
    return chain[0]


async def refusal(
    app: ControllerApp, token: str | None, csr: str, impersonate: str | None
) -> tuple[object, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create_certificate(app, token, csr, impersonate)
    return e.value.code(), e.value.details() or ""


# ----------------------------------------------------------------------------------- lab credentials


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[ControllerApp]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_manifests(config_dir / "workloads.yaml", *workloads())
    config = controller_config(tmp_path / "state", [config_dir], extra=["--max-cert-ttl", "48h"])
    async with running_controller(config) as app:
        yield app


async def test_node_gets_certificates_for_its_pods_only_with_that_identity(lab: ControllerApp) -> None:
    token = lab.issue_node_token("node-a")
    chain = await create_certificate(lab, token, make_csr(ALICE), ALICE)
    leaf = verify_leaf(chain, lab.root_cert_pem, ALICE)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=24, minutes=1)  # default TTL plus the clock-skew allowance

    # (d) a CSR that lists another identity (and more) yields a certificate for the authorized one only.
    chain = await create_certificate(lab, token, make_csr(BOB, "spiffe://evil/ns/x/sa/y"), ALICE)
    verify_leaf(chain, lab.root_cert_pem, ALICE)

    # A requested lifetime beyond --max-cert-ttl is clamped.
    chain = await create_certificate(lab, token, make_csr(), ALICE, ttl_seconds=365 * 86400)
    leaf = verify_leaf(chain, lab.root_cert_pem, ALICE)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=48, minutes=1)


@pytest.mark.parametrize(
    ("token_for", "csr", "impersonate", "reason"),
    [
        pytest.param("node-a", "good", BOB, "no-pod-on-node", id="(a) SA whose pod is only on another node"),
        pytest.param("node-a", "good", NOBODY, "no-pod-on-node", id="(b) SA with no pods"),
        pytest.param("node-a", "good", None, "missing-identity", id="no ImpersonatedIdentity"),
        pytest.param("node-a", "good", "default/alice", "bad-identity", id="identity not SPIFFE"),
        pytest.param(
            "node-a",
            "good",
            "spiffe://other.td/ns/default/sa/alice",
            "foreign-trust-domain",
            id="foreign trust domain",
        ),
        pytest.param("node-a", "garbage", ALICE, "bad-csr", id="malformed CSR"),
        pytest.param(None, "good", ALICE, "missing-credential", id="no credential"),
        pytest.param("forged", "good", ALICE, "bad-credential", id="forged credential"),
    ],
)
async def test_lab_refusals_are_identical_and_counted(
    lab: ControllerApp, token_for: str | None, csr: str, impersonate: str | None, reason: str
) -> None:
    token = None
    if token_for == "forged":
        token = "loom-node.v1.node-a." + "A" * 43
    elif token_for is not None:
        token = lab.issue_node_token(token_for)
    request_csr = make_csr(ALICE) if csr == "good" else "-----BEGIN CERTIFICATE REQUEST-----\nxx\n"
    assert await refusal(lab, token, request_csr, impersonate) == OPAQUE
    _, body = await http_get(lab, "/metrics")
    assert metric_value(body, "loom_ca_certificates_refused_total", {"reason": reason}) == 1
    assert metric_value(body, "loom_ca_certificates_issued_total") == 0


async def test_pod_deletion_revokes_issuance_at_once(lab: ControllerApp, tmp_path: Path) -> None:
    token = lab.issue_node_token("node-a")
    await create_certificate(lab, token, make_csr(), ALICE)
    write_manifests(tmp_path / "config" / "workloads.yaml", *workloads()[:1], *workloads()[2:])
    await eventually(
        lambda: not lab.node_index.has("node-a", "default", "alice"), within=10, what="alice gone"
    )
    assert await refusal(lab, token, make_csr(), ALICE) == OPAQUE


# ----------------------------------------------------------------------------------- Kubernetes tokens


@dataclass
class Cluster:
    api: FakeApiServer
    app: ControllerApp


ZTUNNEL_USER = "system:serviceaccount:istio-system:ztunnel"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with FakeApiServer() as api:
        api.add(m.namespace("istio-system"))
        for manifest in workloads():
            api.add(manifest)
        api.add(m.pod("default", "sleep-1", service_account="sleep", node="node-a", ip="10.244.1.20"))
        ztunnel = api.add(
            m.pod("istio-system", "ztunnel-a", service_account="ztunnel", node="node-a", ip="10.0.0.1")
        )
        uid = ztunnel["metadata"]["uid"]
        api.tokens["zt-a"] = FakeToken(ZTUNNEL_USER, ("istio-ca",), "ztunnel-a", uid, "node-a")
        api.tokens["zt-stale"] = FakeToken(
            ZTUNNEL_USER, ("istio-ca",), "ztunnel-a", "uid-of-a-deleted-pod", "node-a"
        )
        api.tokens["zt-wrong-audience"] = FakeToken(ZTUNNEL_USER, ("kubernetes",), "ztunnel-a", uid, "node-a")
        sleep = api.get("Pod", "default", "sleep-1")
        assert sleep is not None
        api.tokens["sleep"] = FakeToken(
            "system:serviceaccount:default:sleep",
            ("istio-ca",),
            "sleep-1",
            sleep["metadata"]["uid"],
            "node-a",
        )
        settings = KubernetesSourceSettings(debounce=0.005, backoff_initial=0.01, backoff_max=0.1)
        source = KubernetesSource.from_url(api.url, settings=settings)
        config = controller_config(tmp_path / "state", kubernetes=True)
        async with running_controller(config, source=source) as app:
            yield Cluster(api, app)


async def test_kubernetes_node_proxy_gets_certificates_for_its_node(cluster: Cluster) -> None:
    app = cluster.app
    chain = await create_certificate(app, "zt-a", make_csr(BOB), ALICE)
    verify_leaf(chain, app.root_cert_pem, ALICE)  # (d) only the authorized SAN


@pytest.mark.parametrize(
    ("token", "impersonate", "reason"),
    [
        pytest.param("zt-a", BOB, "no-pod-on-node", id="(a) SA whose pod is only on another node"),
        pytest.param("zt-a", NOBODY, "no-pod-on-node", id="(b) SA with no pods"),
        pytest.param("zt-stale", ALICE, "caller-pod-uid-mismatch", id="(c) stale pod UID"),
        pytest.param("sleep", ALICE, "untrusted-account", id="(e) non-node-agent SA impersonating"),
        pytest.param("zt-wrong-audience", ALICE, "not-authenticated", id="token for another audience"),
        pytest.param("unknown", ALICE, "not-authenticated", id="unknown token"),
    ],
)
async def test_kubernetes_refusals_are_identical_and_counted(
    cluster: Cluster, token: str, impersonate: str, reason: str
) -> None:
    assert await refusal(cluster.app, token, make_csr(ALICE), impersonate) == OPAQUE
    _, body = await http_get(cluster.app, "/metrics")
    assert metric_value(body, "loom_ca_certificates_refused_total", {"reason": reason}) == 1


async def test_replaced_node_proxy_pod_loses_access(cluster: Cluster) -> None:
    app = cluster.app
    await create_certificate(app, "zt-a", make_csr(), ALICE)
    cluster.api.delete("Pod", "istio-system", "ztunnel-a")
    cluster.api.add(
        m.pod("istio-system", "ztunnel-a", service_account="ztunnel", node="node-a", ip="10.0.0.1")
    )
    key = ResourceKey("Pod", "istio-system", "ztunnel-a")

    def replaced() -> bool:
        pod = app.snapshot.get(key)
        return pod is not None and pod.meta.uid != cluster.api.tokens["zt-a"].pod_uid

    await eventually(replaced, within=10, what="the replacement ztunnel pod")
    # The cached TokenReview is still fresh, but the pod it names is gone: refused.
    assert await refusal(app, "zt-a", make_csr(), ALICE) == OPAQUE


async def test_kubernetes_xds_stream_is_bound_to_the_token_node(cluster: Cluster) -> None:
    app = cluster.app
    good = XdsClient(app, "zt-a", "node-a")
    wrong = XdsClient(app, "zt-a", "node-b")
    untrusted = XdsClient(app, "sleep", "node-a")
    try:
        await good.send(ADDR)
        response = await good.recv_acked()
        assert {r.name.rsplit("/", 1)[-1] for r in response.resources} >= {"alice-1", "bob-1"}
        await wrong.send(ADDR)
        assert (await wrong.status())[0] == grpc.StatusCode.PERMISSION_DENIED
        # Refused on connect, before any request is read. (Not writing here also avoids a grpc-python
        # client quirk: a write racing the server's refusal turns the status into INTERNAL.)
        assert await untrusted.status() == OPAQUE
    finally:
        for client in (good, wrong, untrusted):
            await client.close()


async def test_policy_warnings_become_status_conditions(cluster: Cluster) -> None:
    policy = m.authorization_policy("default", "l7-only", match_labels={"app": "alice"})
    policy["spec"]["rules"][0]["to"] = [{"operation": {"methods": ["GET"]}}]
    cluster.api.add(policy)
    clean = m.authorization_policy("default", "l4", match_labels={"app": "alice"})
    cluster.api.add(clean)

    def condition(name: str) -> dict[str, object] | None:
        obj = cluster.api.get("AuthorizationPolicy", "default", name) or {}
        for c in obj.get("status", {}).get("conditions", []):
            if c.get("type") == "ZtunnelAccepted":
                return dict(c)
        return None

    await eventually(lambda: condition("l7-only") is not None and condition("l4") is not None, within=10)
    warned = condition("l7-only")
    assert warned is not None and warned["reason"] == "UnsupportedValue"
    assert "methods" in str(warned["message"])
    accepted = condition("l4")
    assert accepted is not None and (accepted["status"], accepted["reason"]) == ("True", "Accepted")

    # Later snapshots do not rewrite unchanged conditions (no write loop with our own status updates).
    def status_writes() -> int:
        return sum(1 for r in cluster.api.requests if r.method == "PATCH" and r.path.endswith("/status"))

    writes = status_writes()
    assert writes == 2
    cluster.api.add(m.pod("default", "late-1", service_account="late", node="node-b", ip="10.244.2.30"))
    xds = cluster.app.xds
    assert xds is not None
    await eventually(lambda: any(n.endswith("/late-1") for n in xds.served.versions(ADDR)), within=10)
    await asyncio.sleep(0.1)  # a status write would have been sent right after that translation
    assert status_writes() == writes
