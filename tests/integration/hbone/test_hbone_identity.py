"""mTLS identity rules: expected server identities, same-trust-domain clients, client certificates
required."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from pathlib import Path

import pytest

from loom.hbone import HboneConnectionError, IdentityMismatch, TunnelRequest
from loom.identity import Identity
from loom.testing.waiting import eventually
from tests.integration.hbone.hbone_harness import (
    WAIT,
    Pki,
    RawH2Client,
    echo_handler,
    pool,
    raw_client_context,
    running_server,
    start_echo,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "mesh", "cluster.local")


@pytest.fixture
def foreign(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "foreign", "evil.local")


async def test_client_rejects_unexpected_server_identity(pki: Pki) -> None:
    server_cert, client_cert = pki.issue("ns1", "impostor"), pki.issue("ns2", "client")
    echo = await start_echo()
    calls: list[TunnelRequest] = []
    try:
        async with running_server(server_cert, echo_handler(echo, calls)) as sut, pool() as p:
            expected = [Identity("cluster.local", "ns1", "server")]
            with pytest.raises(IdentityMismatch) as caught:
                await p.connect(client_cert, expected, sut.address, "127.0.0.1:9")
            assert caught.value.actual == server_cert.identity
            assert "ns1/sa/impostor" in str(caught.value)
            assert p.stats.dial_failures["identity_mismatch"] == 1
            assert p.connections() == []
            # Any of several expected identities will do (destination identity + service SANs).
            tunnel = await p.connect(
                client_cert, [*expected, server_cert.identity], sut.address, "127.0.0.1:9"
            )
            tunnel.close()
        assert len(calls) == 1
    finally:
        await echo.close()


async def test_server_rejects_client_of_another_trust_domain(pki: Pki, foreign: Pki) -> None:
    """Even when the foreign root is trusted (chain valid), the trust domain must match."""
    pki.extra_roots.append(foreign.ca.trust_bundle_pem)
    foreign.extra_roots.append(pki.ca.trust_bundle_pem)
    server_cert, client_cert = pki.issue("ns1", "server"), foreign.issue("ns2", "client")
    echo = await start_echo()
    calls: list[TunnelRequest] = []
    try:
        async with running_server(server_cert, echo_handler(echo, calls)) as sut, pool() as p:
            with pytest.raises(HboneConnectionError):
                await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await eventually(
                lambda: sut.server.stats.connections_refused["trust_domain_mismatch"] == 1, within=WAIT
            )
        assert calls == []
        assert echo.connections == 0
    finally:
        await echo.close()


async def test_server_rejects_client_from_untrusted_ca(pki: Pki, foreign: Pki) -> None:
    server_cert = pki.issue("ns1", "server")
    # The client trusts the server's root, but its own certificate comes from a CA the server does not know.
    client_cert = replace(foreign.issue("ns2", "client"), roots_pem=pki.roots_pem)
    echo = await start_echo()
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            with pytest.raises(HboneConnectionError):
                await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            await eventually(
                lambda: sut.server.stats.connections_refused["handshake_failed"] == 1, within=WAIT
            )
        assert echo.connections == 0
    finally:
        await echo.close()


async def test_client_rejects_server_from_untrusted_ca(pki: Pki, foreign: Pki) -> None:
    server_cert = foreign.issue("ns1", "server")
    client_cert = pki.issue("ns2", "client")
    echo = await start_echo()
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut, pool() as p:
            with pytest.raises(HboneConnectionError, match="TLS handshake failed"):
                await p.connect(client_cert, [server_cert.identity], sut.address, "127.0.0.1:9")
            assert p.stats.dial_failures["handshake_failed"] == 1
    finally:
        await echo.close()


async def test_client_without_certificate_fails_handshake(pki: Pki, tmp_path: Path) -> None:
    server_cert = pki.issue("ns1", "server")
    echo = await start_echo()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=server_cert.roots_pem)
    context.set_alpn_protocols(["h2"])
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut:
            # TLS 1.3: the client finishes its side before the server checks the (missing) certificate;
            # the refusal arrives as an alert on the first read.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                client = await RawH2Client.connect(sut.address, context)
                await client.request([(":method", "CONNECT"), (":authority", "127.0.0.1:9")])
                await asyncio.wait_for(client.reader.read(1), WAIT)
                if client.reader.at_eof():
                    raise ConnectionResetError("closed without a response")
            await eventually(
                lambda: sut.server.stats.connections_refused["handshake_failed"] == 1, within=WAIT
            )
            # a proper client still gets through
            good = await RawH2Client.connect(sut.address, raw_client_context(pki.issue("ns2", "c"), tmp_path))
            stream = await good.request([(":method", "CONNECT"), (":authority", "127.0.0.1:9")])
            assert await good.response_status(stream) == 200
            good.close()
    finally:
        await echo.close()


async def test_client_without_alpn_h2_is_refused(pki: Pki, tmp_path: Path) -> None:
    server_cert = pki.issue("ns1", "server")
    context = raw_client_context(pki.issue("ns2", "client"), tmp_path)
    context.set_alpn_protocols(["http/1.1"])
    echo = await start_echo()
    try:
        async with running_server(server_cert, echo_handler(echo)) as sut:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                client = await RawH2Client.connect(sut.address, context)
                await asyncio.wait_for(client.reader.read(1), WAIT)
                if client.reader.at_eof():
                    raise ConnectionResetError("closed")
            assert sut.server.stats.connections_opened == 0
    finally:
        await echo.close()
