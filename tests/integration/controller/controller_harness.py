"""Shared helpers for the controller's in-process integration tests: a controller on loopback with port 0,
a real grpc.aio xDS client over TLS verified with the controller's root, CSR and CA-call helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import aiohttp
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from controller.app import ControllerApp
from controller.translate import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from loom.api import ca_pb2, discovery_pb2
from loom.testing.controller import (  # noqa: F401 - re-exported for the tests
    WAIT,
    controller_config,
    metric_value,
    running_controller,
    write_manifests,
)

ADDR = ADDRESS_TYPE_URL
AUTHZ = AUTHORIZATION_TYPE_URL
XDS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


def channel(app: ControllerApp) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=app.root_cert_pem.encode())
    return grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials)


def node_struct(node: str) -> discovery_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"NODE_NAME": node, "NAME": f"ztunnel-{node}", "NAMESPACE": "istio-system"})
    return discovery_pb2.Node(
        id=f"ztunnel~10.0.0.1~ztunnel-{node}.istio-system~istio-system.svc.cluster.local", metadata=metadata
    )


class XdsClient:
    """A node proxy's delta xDS stream, driven step by step by a test."""

    def __init__(self, app: ControllerApp, token: str | None, node: str) -> None:
        self.channel = channel(app)
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        call_factory = self.channel.stream_stream(
            XDS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        self.call = call_factory(metadata=metadata)
        self.node = node
        self.sent_node = False
        # What this client holds, per type: name -> version (like ztunnel's cache).
        self.held: dict[str, dict[str, str]] = {ADDR: {}, AUTHZ: {}}

    async def send(
        self,
        type_url: str,
        *,
        subscribe: Sequence[str] = (),
        unsubscribe: Sequence[str] = (),
        initial: Mapping[str, str] | None = None,
        nonce: str = "",
        error: str | None = None,
        node: str | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe,
            initial_resource_versions=initial or {},
            response_nonce=nonce,
        )
        if not self.sent_node or node is not None:
            request.node.CopyFrom(node_struct(node or self.node))
            self.sent_node = True
        if error is not None:
            request.error_detail.code = 3
            request.error_detail.message = error
        try:
            await self.call.write(request)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            # The server already ended the call (e.g. refused it on connect); `status()` says why.
            if not self.call.done():
                raise

    async def recv(self, within: float = WAIT) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), within)
        if response is grpc.aio.EOF:
            raise EOFError("stream ended")
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
        held = self.held[response.type_url]
        for name in response.removed_resources:
            held.pop(name, None)
        for resource in response.resources:
            held[resource.name] = resource.version
        return response

    async def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.send(response.type_url, nonce=response.nonce)

    async def recv_acked(self, within: float = WAIT) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await self.recv(within)
        await self.ack(response)
        return response

    async def expect_silence(self, seconds: float) -> None:
        """Nothing arrives for `seconds` (the stream stays open)."""
        read = asyncio.ensure_future(self.call.read())
        done, _ = await asyncio.wait({read}, timeout=seconds)
        if done:
            raise AssertionError(f"unexpected message: {read.result()}")
        self.pending_read = read

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """Read until the stream ends; its final status."""
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    if await self.call.read() is grpc.aio.EOF:
                        break
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details() or ""
        return await self.call.code(), await self.call.details()

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def make_csr(*uris: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def create_certificate(
    app: ControllerApp,
    token: str | None,
    csr: str,
    impersonate: str | None,
    ttl_seconds: int = 0,
) -> list[str]:
    """Call CreateCertificate; the chain, or AioRpcError."""
    request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl_seconds)
    if impersonate is not None:
        request.metadata.update({"ImpersonatedIdentity": impersonate})
    metadata = [("clusterid", "Kubernetes")]
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    async with channel(app) as ch:
        call = ch.unary_unary(
            CA_METHOD,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        response = await call(request, metadata=metadata, timeout=WAIT)
    return list(response.cert_chain)


async def http_get(app: ControllerApp, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.http_port}{path}") as r,
    ):
        return r.status, await r.text()
