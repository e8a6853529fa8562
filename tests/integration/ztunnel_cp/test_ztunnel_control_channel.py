"""The node proxy's channel to the controller (grpclib over TLS): a controller that stops answering is
found by keepalive pings, the controller's certificate must carry the expected name, and malformed
controller addresses are refused with the address named."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ztunnel_cp_harness import FakeControlPlane

from controller.ca.authority import CertificateAuthority
from loom.api import discovery_pb2
from loom.identity import Identity
from ztunnel.identity import CaClient, CaUnavailable
from ztunnel.xds.channel import CALL_ERRORS, describe_call_error, secure_channel, split_address
from ztunnel.xds.client import xds_stream

CONTROLLER = Identity("cluster.local", "istio-system", "istiod")


@contextlib.asynccontextmanager
async def silent_controller(authority: CertificateAuthority, directory: Path) -> AsyncIterator[int]:
    """A TLS server that completes the handshake (ALPN h2) and then never sends a byte: a controller
    whose process hangs, or a path that drops everything after the handshake."""
    serving = authority.issue_serving_certificate(CONTROLLER, ips=["127.0.0.1"], ttl=dt.timedelta(hours=1))
    chain, key = directory / "chain.pem", directory / "key.pem"
    chain.write_text("".join(serving.chain_pem))
    key.write_bytes(serving.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(chain, key)
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def open_xds_stream(port: int, root: str, keepalive: float | None) -> BaseException:
    """Open the xDS stream as the client does and wait for its first response; the error it ends with."""
    channel = secure_channel(
        f"127.0.0.1:{port}", root, keepalive_seconds=keepalive, keepalive_timeout_seconds=0.3
    )
    try:
        async with xds_stream(channel) as call:
            await call.send_message(discovery_pb2.DeltaDiscoveryRequest(type_url="t"))
            await call.recv_message()
    except CALL_ERRORS as e:
        return e
    finally:
        channel.close()
    raise AssertionError("the silent controller answered")


async def test_a_controller_that_stops_answering_is_found_by_keepalive(tmp_path: Path) -> None:
    authority = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    async with silent_controller(authority, tmp_path) as port:
        # Without pings the stream would wait for as long as TCP holds (hours on a silent path).
        without = asyncio.create_task(open_xds_stream(port, authority.trust_bundle_pem, keepalive=None))
        error = await asyncio.wait_for(
            open_xds_stream(port, authority.trust_bundle_pem, keepalive=0.2), timeout=10
        )
        unreachable, text = describe_call_error(error)
        assert unreachable, text
        assert text.startswith("UNAVAILABLE"), text
        assert not without.done()
        without.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await without


async def test_the_controller_certificate_must_carry_the_expected_name(tmp_path: Path) -> None:
    fake = FakeControlPlane(tmp_path)  # its certificate names 127.0.0.1 only
    await fake.start()
    try:
        alice = Identity("cluster.local", "default", "alice")
        right = CaClient(fake.address, fake.root_pem, lambda: "token")
        wrong = CaClient(fake.address, fake.root_pem, lambda: "token", server_name="istiod.istio-system.svc")
        try:
            assert (await right.fetch_certificate(alice)).identity == alice
            with pytest.raises(
                CaUnavailable, match="the controller's certificate was refused: Hostname mismatch"
            ):
                await wrong.fetch_certificate(alice)
            assert len(fake.csr_requests) == 1  # the refused handshake never reached the CA
        finally:
            await right.close()
            await wrong.close()
    finally:
        await fake.stop()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:15012", ("127.0.0.1", 15012)),
        ("[::1]:15012", ("::1", 15012)),
        ("istiod.istio-system.svc:15012", ("istiod.istio-system.svc", 15012)),
    ],
)
def test_controller_addresses(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["istiod", ":15012", "istiod:", "istiod:0", "istiod:70000", "istiod:x"])
def test_malformed_controller_addresses_are_named(address: str) -> None:
    with pytest.raises(ValueError, match=f"controller address '{address}' is not host:port"):
        split_address(address)


async def test_a_root_that_cannot_be_loaded_is_named(tmp_path: Path) -> None:
    root = tmp_path / "root-cert.pem"
    root.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    client = CaClient("127.0.0.1:1", root, lambda: "token")
    try:
        with pytest.raises(CaUnavailable, match=f"{root} cannot be loaded"):
            await client.fetch_certificate(Identity("cluster.local", "default", "alice"))
    finally:
        await client.close()
