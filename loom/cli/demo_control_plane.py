"""`loomctl demo --control-plane`: the control plane alone, on loopback, with evidence a person can read.

No root and no network namespaces needed: the controller runs in this process and a node proxy's xDS
stream and CA calls are made directly. (`loomctl demo` without the flag runs the main job in the lab,
loom/cli/demo.py.) Every step prints what happened and checks it; exit 0 only if every check held.

  1. The Istio Bookinfo sample and the ambient steps validate cleanly.
  2. Bookinfo is scheduled on two nodes and a loom-controller starts on loopback (TLS gRPC).
  3. node-1's proxy subscribes (per-node credential) and receives every workload: not yet meshed.
  4. Labelling the namespace `istio.io/dataplane-mode=ambient` pushes only the changed workloads,
     now HBONE.
  5. The L4 AuthorizationPolicies and STRICT PeerAuthentication arrive; the node proxy's policy
     engine allows productpage -> reviews, denies plaintext and callers from namespace legacy.
  6. A per-service-account waypoint binds the reviews workloads and service to it.
  7. The CA issues node-1 a certificate for an identity running on node-1 (SAN checked, chain
     verified) and refuses node-2 the same identity with the opaque error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from controller.app import ControllerApp
from controller.config import Config
from controller.translate import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, MeshConfig
from loom.api import authorization_pb2, ca_pb2, discovery_pb2, workload_pb2
from loom.cli import validate
from loom.cli.table import render_table
from loom.policy.rbac import Connection, applicable_policies, decide
from loom.resources.loader import expand_deployment, load_paths, pod_to_manifest
from loom.resources.model import Deployment

XDS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
NODES = ("node-1", "node-2")
STEP_TIMEOUT = 20.0  # seconds; every wait in the demo is bounded by it


class DemoFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


def default_samples() -> Path:
    """../shared/samples beside the checkout (where the project keeps Istio's sample YAML)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "samples"


def run(args: argparse.Namespace) -> int:
    # The controller runs in this process: show its warnings (e.g. the refused certificate in step 7)
    # as what they are, indented under the step that caused them.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    controller %(levelname)s: %(message)s"))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers, root.level = [handler], logging.WARNING
    try:
        asyncio.run(Demo(args.samples).run())
    except DemoFailed as failed:
        print(f"\n✘ demo failed: {failed}", file=sys.stderr)
        return 1
    finally:
        root.handlers, root.level = saved
    print("\n✔ every check held")
    return 0


def check(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailed(what)
    print(f"  ✔ {what}")


def schedule(deployments: list[Deployment]) -> Iterator[dict[str, Any]]:
    """Pods of the deployments, round-robin on the nodes, with addresses from each node's range."""
    index = 0
    for dep in deployments:
        for pod in expand_deployment(dep):
            node = NODES[index % len(NODES)]
            index += 1
            manifest = pod_to_manifest(pod)
            manifest["spec"]["nodeName"] = node
            ip = f"10.244.{NODES.index(node) + 1}.{10 + index}"
            manifest["status"] = {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
            yield manifest


class NodeProxyStream:
    """A node proxy's delta xDS stream, reduced to what the demo shows: what it holds, per type."""

    def __init__(self, app: ControllerApp, node: str) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=app.root_cert_pem.encode())
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials)
        self.call = self.channel.stream_stream(
            XDS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )(metadata=(("authorization", f"Bearer {app.issue_node_token(node)}"),))
        self.node = node
        self.addresses: dict[str, workload_pb2.Address] = {}
        self.policies: dict[str, authorization_pb2.Authorization] = {}
        self.last_changed: set[str] = set()

    async def subscribe(self) -> None:
        metadata = struct_pb2.Struct()
        metadata.update({"NODE_NAME": self.node})
        node = discovery_pb2.Node(id=f"ztunnel~127.0.0.1~ztunnel-{self.node}.istio-system", metadata=metadata)
        await self.call.write(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=AUTHORIZATION_TYPE_URL))
        await self.call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))

    async def receive_until(self, done: Callable[[], bool]) -> None:
        """Apply and ACK responses until `done()` holds."""
        self.last_changed = set()
        async with asyncio.timeout(STEP_TIMEOUT):
            while not done():
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    raise DemoFailed("the controller ended the xDS stream")
                assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
                held: dict[str, Any] = (
                    self.addresses if response.type_url == ADDRESS_TYPE_URL else self.policies
                )
                message_type = (
                    workload_pb2.Address
                    if response.type_url == ADDRESS_TYPE_URL
                    else authorization_pb2.Authorization
                )
                for name in response.removed_resources:
                    held.pop(name, None)
                for resource in response.resources:
                    message = message_type()
                    resource.resource.Unpack(message)
                    held[resource.name] = message
                    self.last_changed.add(resource.name)
                await self.call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=response.type_url, response_nonce=response.nonce
                    )
                )

    def workloads(self) -> list[workload_pb2.Workload]:
        return sorted(
            (a.workload for a in self.addresses.values() if a.HasField("workload")), key=lambda w: w.name
        )

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def workload_table(workloads: list[workload_pb2.Workload]) -> str:
    rows = []
    for w in workloads:
        ip = ".".join(str(b) for b in w.addresses[0]) if w.addresses else "None"
        waypoint = w.waypoint.hostname.hostname.split(".")[0] if w.HasField("waypoint") else "None"
        protocol = "HBONE" if w.tunnel_protocol == workload_pb2.HBONE else "TCP"
        rows.append([w.namespace, w.name, ip, w.node, waypoint, protocol])
    return render_table(["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], rows)


async def request_certificate(app: ControllerApp, node: str, identity: str) -> list[str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=24 * 3600)
    request.metadata.update({"ImpersonatedIdentity": identity})
    credentials = grpc.ssl_channel_credentials(root_certificates=app.root_cert_pem.encode())
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials) as channel:
        call = channel.unary_unary(
            CA_METHOD,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        metadata = (("authorization", f"Bearer {app.issue_node_token(node)}"),)
        response = await call(request, metadata=metadata, timeout=STEP_TIMEOUT)
    return list(response.cert_chain)


class Demo:
    def __init__(self, samples: Path) -> None:
        self.samples = samples

    async def run(self) -> None:
        if not (self.samples / "istio" / "bookinfo.yaml").is_file():
            raise DemoFailed(f"the Istio samples are not at {self.samples} (pass --samples DIR)")
        work = Path(tempfile.mkdtemp(prefix="loom-demo-"))
        try:
            await self.steps(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def steps(self, work: Path) -> None:
        istio, ambient = self.samples / "istio", self.samples / "ambient"
        print("1. Validate the Istio Bookinfo sample and the ambient-mode steps (loomctl validate)")
        diagnostics = validate.validate([istio, ambient], MeshConfig())
        check(not diagnostics, f"{len(diagnostics)} errors or warnings in {istio} and {ambient}")

        print("\n2. Schedule Bookinfo on two nodes; start loom-controller on loopback")
        config, state = work / "config", work / "state"
        config.mkdir()
        shutil.copy(istio / "bookinfo.yaml", config / "bookinfo.yaml")
        deployments = load_paths([istio / "bookinfo.yaml"]).snapshot.of_kind(Deployment)
        pods = list(schedule(deployments))
        (config / "pods.yaml").write_text(yaml.safe_dump_all(pods, sort_keys=False))
        app = ControllerApp(
            Config.from_args(
                [
                    *("--config-dir", str(config), "--state-dir", str(state)),
                    *("--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--log-level", "error"),
                ],
                {},
            )
        )
        await app.start()
        stream = NodeProxyStream(app, "node-1")
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while not app.ready:  # noqa: ASYNC110 - readiness is a property, polled briefly
                    await asyncio.sleep(0.02)
            check(
                True, f"controller ready: gRPC (xDS + CA, TLS) on 127.0.0.1:{app.grpc_port}, {len(pods)} pods"
            )
            await self.mesh_steps(app, stream, config, ambient, len(pods))
        finally:
            await stream.close()
            await app.stop()

    async def mesh_steps(
        self, app: ControllerApp, stream: NodeProxyStream, config: Path, ambient: Path, pod_count: int
    ) -> None:
        print("\n3. node-1's proxy subscribes with its node credential")
        await stream.subscribe()
        await stream.receive_until(lambda: len(stream.workloads()) == pod_count)
        print(workload_table(stream.workloads()))
        check(
            all(w.tunnel_protocol == workload_pb2.NONE for w in stream.workloads()),
            f"{pod_count} workloads received, none meshed yet (PROTOCOL TCP)",
        )

        print("\n4. kubectl label namespace default istio.io/dataplane-mode=ambient")
        shutil.copy(ambient / "namespace.yaml", config / "namespace.yaml")
        await stream.receive_until(
            lambda: all(w.tunnel_protocol == workload_pb2.HBONE for w in stream.workloads())
        )
        print(workload_table(stream.workloads()))
        check(True, "every Bookinfo workload is now HBONE (mTLS through the node tunnel), no pod restarted")

        print("\n5. Apply L4 AuthorizationPolicies and STRICT PeerAuthentication")
        for name in ("l4-policy.yaml", "peer-authentication.yaml"):
            shutil.copy(ambient / name, config / name)
        # Policies are pushed before the workloads that list them; wait for both.
        await stream.receive_until(
            lambda: (
                "default/ratings-deny-legacy" in stream.policies
                and all(
                    "default/reviews-from-productpage" in w.authorization_policies
                    for w in self.reviews(stream)
                )
            )
        )
        rows = [
            [p.namespace, p.name, authorization_pb2.Action.Name(p.action).title(), scope_name(p.scope)]
            for p in sorted(stream.policies.values(), key=lambda p: (p.namespace, p.name))
        ]
        print(render_table(["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], rows))
        self.check_policies(stream)

        print("\n6. Create the waypoint for service account bookinfo-reviews (per-SA model)")
        shutil.copy(ambient / "waypoint-reviews-sa.yaml", config / "waypoint.yaml")
        await stream.receive_until(lambda: all(w.HasField("waypoint") for w in self.reviews(stream)))
        print(workload_table(stream.workloads()))
        check(
            all(w.waypoint.hostname.hostname.startswith("bookinfo-reviews.") for w in self.reviews(stream)),
            "the three reviews workloads are bound to waypoint bookinfo-reviews; the others are not",
        )
        check(
            not any(
                w.HasField("waypoint") for w in stream.workloads() if w.service_account != "bookinfo-reviews"
            ),
            "workloads of other service accounts keep going direct",
        )

        print("\n7. Certificates: the CA signs only identities running on the caller's node")
        await self.check_certificates(app, stream)

    @staticmethod
    def reviews(stream: NodeProxyStream) -> list[workload_pb2.Workload]:
        return [w for w in stream.workloads() if w.service_account == "bookinfo-reviews"]

    @staticmethod
    def check_policies(stream: NodeProxyStream) -> None:
        by_sa = {w.service_account: w for w in stream.workloads()}
        reviews, ratings = by_sa["bookinfo-reviews"], by_sa["bookinfo-ratings"]
        reviews_ip = ".".join(str(b) for b in reviews.addresses[0])
        ratings_ip = ".".join(str(b) for b in ratings.addresses[0])

        def allowed(workload: workload_pb2.Workload, source: str | None, ip: str, port: int) -> bool:
            conn = Connection.of(source, "10.244.1.99", ip, port)
            return decide(applicable_policies(workload, stream.policies), conn).allowed

        productpage = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        check(allowed(reviews, productpage, reviews_ip, 9080), "productpage -> reviews:9080 is allowed")
        check(
            not allowed(reviews, "spiffe://cluster.local/ns/default/sa/bookinfo-details", reviews_ip, 9080),
            "details -> reviews:9080 is denied (only productpage may call reviews)",
        )
        check(not allowed(reviews, None, reviews_ip, 9080), "plaintext -> reviews is denied (STRICT mTLS)")
        check(
            not allowed(ratings, "spiffe://cluster.local/ns/legacy/sa/default", ratings_ip, 9080),
            "a caller from namespace legacy -> ratings is denied",
        )
        check(allowed(ratings, productpage, ratings_ip, 9080), "productpage -> ratings is allowed")

    @staticmethod
    async def check_certificates(app: ControllerApp, stream: NodeProxyStream) -> None:
        productpage = next(w for w in stream.workloads() if w.service_account == "bookinfo-productpage")
        identity = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        home = productpage.node
        other = next(n for n in NODES if n != home)
        chain = await request_certificate(app, home, identity)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        root = x509.load_pem_x509_certificate(chain[-1].encode())
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        # not_before is backdated a minute for clock skew, so round to whole hours.
        hours = round((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() / 3600)
        print(f"  {home} asked for {identity}: serial {leaf.serial_number:x}, valid {hours}h")
        check(uris == [identity], f"issued to {home}: the only SAN is {identity}")
        leaf.verify_directly_issued_by(root)
        check(True, "the certificate chains to the controller's root")
        try:
            await request_certificate(app, other, identity)
        except grpc.aio.AioRpcError as refused:
            check(
                refused.code() == grpc.StatusCode.UNAUTHENTICATED,
                f"{other} (no productpage pod there) is refused: {refused.details()}",
            )
        else:
            raise DemoFailed(f"{other} was issued a certificate for an identity it does not run")


def scope_name(scope: int) -> str:
    names: dict[int, str] = {
        authorization_pb2.GLOBAL: "Global",
        authorization_pb2.NAMESPACE: "Namespace",
        authorization_pb2.WORKLOAD_SELECTOR: "WorkloadSelector",
    }
    return names.get(scope, "Unknown")
