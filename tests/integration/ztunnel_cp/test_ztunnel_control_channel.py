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

import h2.config
import h2.connection
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
async def silent_controller(
    authority: CertificateAuthority, directory: Path, answer_pings_for: float = 0.0
) -> AsyncIterator[int]:
    """A TLS server that completes the handshake (ALPN h2) and then never sends a byte: a controller
    whose process hangs, or a path that drops everything after the handshake. With
    `answer_pings_for`, it first speaks HTTP/2 for that many seconds (settings, PING acknowledgements;
    never a response), then goes silent the same way."""
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
        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        silent_at = asyncio.get_running_loop().time() + answer_pings_for
        if answer_pings_for:
            h2conn.initiate_connection()
            writer.write(h2conn.data_to_send())
        while data := await reader.read(65536):
            if asyncio.get_running_loop().time() < silent_at:
                h2conn.receive_data(data)  # h2 acknowledges PINGs itself
                writer.write(h2conn.data_to_send())

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


async def test_keepalive_pings_continue_while_no_data_moves(tmp_path: Path) -> None:
    # The stream stays up while the controller answers pings (many more than two, with no data
    # moving), and the silence after that is found: pings never stop on an idle stream.
    authority = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    async with silent_controller(authority, tmp_path, answer_pings_for=1.5) as port:
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = await asyncio.wait_for(
            open_xds_stream(port, authority.trust_bundle_pem, keepalive=0.2), timeout=10
        )
        assert loop.time() - started >= 1.5
        unreachable, text = describe_call_error(error)
        assert unreachable, text


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
