"""Helpers for the controller-waypoint integration tests: a raw delta xDS stream with any Node (to try
what a well-behaved client never would), and waypoint settings for a controller on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc

from controller.app import ControllerApp
from loom.api import discovery_pb2
from loom.testing.controller import WAIT
from waypoint.xds import WaypointXdsSettings

XDS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def waypoint_settings(
    app: ControllerApp, tmp: Path, namespace: str, name: str, account: str
) -> WaypointXdsSettings:
    """Settings as the reconciler would give them, with the credential and root written under `tmp`."""
    token = tmp / f"{namespace}.{name}.token"
    token.write_text(app.issue_waypoint_token(namespace, name))
    root = tmp / "root-cert.pem"
    root.write_text(app.root_cert_pem)
    return WaypointXdsSettings.from_env(
        {
            "WAYPOINT_NAMESPACE": namespace,
            "WAYPOINT_NAME": name,
            "SERVICE_ACCOUNT": account,
            "XDS_ADDRESS": f"127.0.0.1:{app.grpc_port}",
            "ROOT_CERT": str(root),
            "WORKLOAD_TOKEN_FILE": str(token),
        }
    )


class RawStream:
    """One DeltaAggregatedResources call, driven request by request."""

    def __init__(self, app: ControllerApp, token: str, node: discovery_pb2.Node) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=app.root_cert_pem.encode())
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials)
        self.call = self.channel.stream_stream(
            XDS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )(metadata=(("authorization", f"Bearer {token}"),))
        self.node = node
        self.sent_node = False

    async def send(self, type_url: str, subscribe: Sequence[str] = (), nonce: str = "") -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribe, response_nonce=nonce
        )
        if not self.sent_node:
            request.node.CopyFrom(self.node)
            self.sent_node = True
        try:
            await self.call.write(request)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            if not self.call.done():
                raise

    async def recv(self) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        if response is grpc.aio.EOF:
            raise EOFError("stream ended")
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
        await self.send(response.type_url, nonce=response.nonce)
        return response

    async def status(self) -> grpc.StatusCode:
        """Read until the stream ends; its final status code."""
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    if await self.call.read() is grpc.aio.EOF:
                        break
                except grpc.aio.AioRpcError as e:
                    return e.code()
        code: grpc.StatusCode = await self.call.code()
        return code

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
