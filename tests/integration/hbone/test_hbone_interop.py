"""The HBONE server against an independent HTTP/2 implementation: curl (nghttp2) over TLS 1.3 with a
client certificate. curl cannot send CONNECT over HTTP/2, so it exercises everything around it: ALPN,
SETTINGS and windows, HPACK from another encoder, requests refused with 400 on their stream while the
connection stays up for the next one.

(No request body: when a final response comes before a request body is complete, the server ends the
stream with RST_STREAM(NO_ERROR) as RFC 9113 §8.1 allows, which curl 7.88 reports as error 92.)"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from loom.hbone import Decision, TunnelRequest
from tests.integration.hbone.hbone_harness import WAIT, Pki, running_server

CURL = shutil.which("curl")
if CURL is None and os.environ.get("CI"):
    # `make test` installs curl; in CI the independent-peer test must run, never skip.
    raise RuntimeError("curl is missing in CI: the HBONE interop test cannot run")

pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed (make test installs it)")


async def test_curl_http2_request_is_answered_400(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "curl")
    (tmp_path / "client.pem").write_text("".join(client_cert.chain_pem))
    (tmp_path / "client.key").write_text(client_cert.key_pem)
    calls: list[TunnelRequest] = []

    async def handler(request: TunnelRequest) -> Decision:
        calls.append(request)
        return Decision(503)

    async with running_server(server_cert, handler) as sut:
        host, port = sut.address
        assert CURL is not None
        process = await asyncio.create_subprocess_exec(
            CURL,
            "--silent",
            "--show-error",
            "--http2",
            "--tlsv1.3",
            "--insecure",  # only the hostname check: our certificates carry SPIFFE URIs, no DNS names
            "--cert",
            str(tmp_path / "client.pem"),
            "--key",
            str(tmp_path / "client.key"),
            "--write-out",
            "%{http_version} %{http_code}",
            "--output",
            "/dev/null",
            f"https://{host}:{port}/some/path",
            f"https://{host}:{port}/again",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), WAIT)
        assert process.returncode == 0, stderr.decode()
        assert stdout.decode() == "2 4002 400"
        assert sut.server.stats.requests_rejected["not_connect"] == 2
        assert sut.server.stats.connections_opened == 1  # both requests on one connection
        assert calls == []
