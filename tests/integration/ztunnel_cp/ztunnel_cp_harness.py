"""Helpers for the node proxy's control-plane integration tests: an in-process controller on loopback
(port 0, or a fixed port to restart it in place), and a scriptable fake control plane over TLS for the
cases a correct controller never produces (malformed resources, a CA that signs the wrong identity)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from controller.ca.authority import CertificateAuthority
from loom.api import ca_pb2, discovery_pb2
from loom.identity import Identity
from loom.testing.controller import (  # noqa: F401 - re-exported for the tests
    WAIT,
    controller_config,
    metric_value,
    running_controller,
    start_controller,
    write_manifests,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


# ---------------------------------------------------------------------------------------------------
# fake control plane


XDS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CA_SERVICE = "istio.v1.auth.IstioCertificateService"


class FakeControlPlane:
    """A TLS gRPC server on 127.0.0.1 speaking delta xDS and the CA API, driven by the test.

    xDS: every request received is recorded in `requests`; responses put in `responses` are written
    to the current stream in order. CA: CSRs are signed by its own CertificateAuthority for
    `sign_as(requested identity)` (the requested identity by default)."""

    def __init__(self, state_dir: Path) -> None:
        self.authority = CertificateAuthority.load_or_create(state_dir, "cluster.local")
        self.requests: list[discovery_pb2.DeltaDiscoveryRequest] = []
        self.responses: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse] = asyncio.Queue()
        self.sign_as: Callable[[Identity], Identity] = lambda identity: identity
        self.csr_metadata: list[dict[str, str]] = []
        self.csr_requests: list[ca_pb2.IstioCertificateRequest] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def root_pem(self) -> str:
        return self.authority.trust_bundle_pem

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        serving = self.authority.issue_serving_certificate(
            Identity("cluster.local", "istio-system", "fake"), ips=["127.0.0.1"], ttl=dt.timedelta(hours=1)
        )
        chain = "".join(serving.chain_pem[:-1]).encode("ascii")
        credentials = grpc.ssl_server_credentials([(serving.key_pem, chain)])
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    XDS_SERVICE,
                    {
                        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                            self._xds,
                            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                            response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    CA_SERVICE,
                    {
                        "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                            self._ca,
                            request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
                            response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        self.port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(0)

    async def _xds(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        async def read() -> None:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                self.requests.append(request)

        reader = asyncio.create_task(read())
        try:
            while not reader.done():
                response = await self.responses.get()
                await context.write(response)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _ca(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        self.csr_metadata.append({k: str(v) for k, v in (context.invocation_metadata() or ())})
        self.csr_requests.append(request)
        requested = Identity.parse(request.metadata.fields["ImpersonatedIdentity"].string_value)
        chain = self.authority.sign(request.csr, self.sign_as(requested), dt.timedelta(hours=1))
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)
