"""Workload certificates end to end: the identity manager and CA client against a real in-process
controller (node-bound issuance, half-life renewal, a controller outage, recovery), and against a fake
CA that signs the wrong identity (the SAN check)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from grpclib.const import Status
from ztunnel_cp_harness import (
    AMBIENT,
    WAIT,
    FakeControlPlane,
    controller_config,
    metric_value,
    start_controller,
    write_manifests,
)

from controller.app import ControllerApp
from loom.identity import Identity, WorkloadCertificate
from loom.testing import manifests as m
from loom.testing.waiting import eventually
from ztunnel.identity import (
    CaClient,
    CertificateManager,
    CertificateRefused,
    CertificateUnavailable,
    CertState,
    InvalidCertificate,
)
from ztunnel.state import ProxyState
from ztunnel.xds import Backoff, XdsClient

pytestmark = pytest.mark.timeout(60)

ALICE = Identity("cluster.local", "default", "alice")
BOB = Identity("cluster.local", "default", "bob")
SHORT_TTL = dt.timedelta(seconds=3)


@dataclass
class Node:
    tmp: Path
    config_dir: Path
    state_dir: Path
    app: ControllerApp
    token: str
    state: ProxyState
    xds: XdsClient
    ca: CaClient
    manager: CertificateManager

    def controller_metric(self, name: str) -> float:
        return metric_value(self.app.metrics.exposition().decode(), name)


async def make_node(tmp_path: Path, ttl: dt.timedelta) -> Node:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_manifests(
        config_dir / "pods.yaml",
        m.namespace("default", AMBIENT),
        m.pod("default", "alice-1", service_account="alice", node="node-a", ip="10.244.1.10"),
        m.pod("default", "bob-1", service_account="bob", node="node-b", ip="10.244.2.10"),
    )
    state_dir = tmp_path / "state"
    app = await start_controller(controller_config(state_dir, [config_dir]))
    token = app.issue_node_token("node-a")
    address, root = f"127.0.0.1:{app.grpc_port}", state_dir / "root-cert.pem"
    state = ProxyState("node-a")
    xds = XdsClient(address, root, lambda: token, "node-a", state, backoff=Backoff(0.01, 0.2))
    ca = CaClient(address, root, lambda: token, ttl=ttl)
    manager = CertificateManager(ca)
    return Node(tmp_path, config_dir, state_dir, app, token, state, xds, ca, manager)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await make_node(tmp_path, SHORT_TTL)
    try:
        yield n
    finally:
        await n.manager.close()
        await n.xds.close()
        await n.ca.close()
        await n.app.stop()


def check_certificate(cert: WorkloadCertificate, identity: Identity, root_pem: str) -> None:
    leaf = x509.load_pem_x509_certificate(cert.chain_pem[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(str(identity))]
    roots = x509.load_pem_x509_certificates(root_pem.encode())
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).build_client_verifier()
    verifier.verify(leaf, [x509.load_pem_x509_certificate(p.encode()) for p in cert.chain_pem[1:]])
    key = serialization.load_pem_private_key(cert.key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*der) == leaf.public_key().public_bytes(*der)
    assert cert.roots_pem == root_pem
    assert (cert.not_before, cert.not_after, cert.serial) == (
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        leaf.serial_number,
    )


async def test_local_workload_certificate_is_prefetched(node: Node) -> None:
    node.manager.track(node.state)
    node.xds.start()
    await eventually(lambda: node.manager.certificate(ALICE) is not None, within=WAIT, what="prefetch")
    cert = await node.manager.fetch(ALICE)
    check_certificate(cert, ALICE, node.app.root_cert_pem)
    assert node.manager.identities == (ALICE,)
    assert node.controller_metric("loom_ca_certificates_issued_total") == 1
    # An identity with no pod on this node is refused here, without asking the CA.
    with pytest.raises(CertificateUnavailable, match="no workload on node 'node-a' runs as"):
        await node.manager.fetch(BOB)
    assert node.controller_metric("loom_ca_certificates_issued_total") == 1
    assert "loom_ca_certificates_refused_total{" not in node.app.metrics.exposition().decode()
    (status,) = node.manager.snapshot()
    assert status.state is CertState.AVAILABLE
    assert status.to_json()["cert_chain"][0]["serialNumber"] == format(cert.serial, "x")


async def test_ca_refuses_an_identity_without_a_pod_on_the_node(node: Node) -> None:
    with pytest.raises(CertificateRefused) as refused:
        await node.ca.fetch_certificate(BOB)
    assert refused.value.code is Status.UNAUTHENTICATED
    assert "request authentication failure" in str(refused.value)
    exposition = node.app.metrics.exposition().decode()
    assert metric_value(exposition, "loom_ca_certificates_refused_total", {"reason": "no-pod-on-node"}) == 1
    # Alice has a pod on node-a: issued, with the requested lifetime.
    cert = await node.ca.fetch_certificate(ALICE)
    check_certificate(cert, ALICE, node.app.root_cert_pem)
    lifetime = cert.not_after - cert.not_before
    assert lifetime - SHORT_TTL == dt.timedelta(minutes=1)  # the CA back-dates not_before by a minute


async def test_renewal_outage_expiry_and_recovery(node: Node) -> None:
    node.manager.track(node.state)
    node.xds.start()
    first = await asyncio.wait_for(_fetch_when_local(node, ALICE), WAIT)
    # Renewed at half-life (1.5 s of a 3 s certificate), in the background.
    await eventually(
        lambda: (c := node.manager.certificate(ALICE)) is not None and c.serial != first.serial,
        within=WAIT,
        what="renewal",
    )
    second = await node.manager.fetch(ALICE)
    assert second.not_after > first.not_after
    check_certificate(second, ALICE, node.app.root_cert_pem)

    port = node.app.grpc_port
    await node.app.stop()
    # Renewal fails while the controller is down; the valid certificate stays in use.
    await eventually(lambda: node.manager.snapshot()[0].error != "", within=WAIT, what="failed renewal")
    assert dt.datetime.now(dt.UTC) < second.not_after
    assert await node.manager.fetch(ALICE) is second
    assert node.manager.snapshot()[0].state is CertState.AVAILABLE
    # After expiry, connections needing the identity fail closed.
    await eventually(
        lambda: dt.datetime.now(dt.UTC) >= second.not_after + dt.timedelta(milliseconds=50),
        within=WAIT,
        what="expiry",
    )
    await eventually(lambda: node.manager.certificate(ALICE) is None, within=WAIT, what="dropped")
    with pytest.raises(CertificateUnavailable):
        await node.manager.fetch(ALICE)
    assert node.manager.snapshot()[0].state is CertState.UNAVAILABLE
    assert node.state.workload_by_ip("10.244.1.10") is not None  # the xDS state is still served

    # The controller comes back (same state dir and port): everything heals without a restart.
    node.app = await start_controller(controller_config(node.state_dir, [node.config_dir], grpc_port=port))
    await eventually(lambda: node.manager.certificate(ALICE) is not None, within=WAIT, what="recovered")
    third = await node.manager.fetch(ALICE)
    check_certificate(third, ALICE, node.app.root_cert_pem)


async def _fetch_when_local(node: Node, identity: Identity) -> WorkloadCertificate:
    await eventually(lambda: node.state.workload_by_ip("10.244.1.10") is not None, within=WAIT, what="xDS")
    return await node.manager.fetch(identity)


async def test_the_issued_san_is_checked(tmp_path: Path) -> None:
    fake = FakeControlPlane(tmp_path / "fake")
    await fake.start()
    ca = CaClient(fake.address, fake.root_pem, lambda: "node-credential", ttl=dt.timedelta(hours=1))
    try:
        fake.sign_as = lambda requested: BOB
        with pytest.raises(
            InvalidCertificate, match=r"the leaf names spiffe://cluster\.local/ns/default/sa/bob"
        ):
            await ca.fetch_certificate(ALICE)
        # What the request looked like: Istio's CSR, impersonation metadata, bearer credential.
        request = fake.csr_requests[-1]
        assert request.metadata.fields["ImpersonatedIdentity"].string_value == str(ALICE)
        assert request.validity_duration == 3600
        csr = x509.load_pem_x509_csr(request.csr.encode())
        assert csr.subject == x509.Name([])
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(str(ALICE))]
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        )
        metadata = fake.csr_metadata[-1]
        assert metadata["authorization"] == "Bearer node-credential"
        assert metadata["clusterid"] == "Kubernetes"
        # A CA that signs what was asked: accepted.
        fake.sign_as = lambda requested: requested
        cert = await ca.fetch_certificate(ALICE)
        check_certificate(cert, ALICE, fake.root_pem)
    finally:
        await ca.close()
        await fake.stop()
