"""The HBONE server against independent HTTP/2 implementations over TLS 1.3 with a client certificate.

curl (nghttp2) cannot send CONNECT over HTTP/2, so it exercises everything around it: ALPN, SETTINGS
and windows, HPACK from another encoder, requests refused with 400 on their stream while the
connection stays up for the next one. Node.js (its http2 module, also on nghttp2) opens real CONNECT
tunnels and moves megabytes both ways through them: the DATA frames the server frames itself (the
fast path of loom.hbone.connection, for payloads from 16 KiB) against another parser and another
flow-control implementation, with small windows that force many WINDOW_UPDATEs.

(No request body: when a final response comes before a request body is complete, the server ends the
stream with RST_STREAM(NO_ERROR) as RFC 9113 §8.1 allows, which curl 7.88 reports as error 92.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import h2.connection
import pytest
from hyperframe.frame import DataFrame

from loom.hbone import Decision, TunnelRequest
from tests.integration.hbone.hbone_harness import WAIT, Pki, echo_handler, running_server, start_echo

CURL = shutil.which("curl")
NODE = shutil.which("node")
if (CURL is None or NODE is None) and os.environ.get("CI"):
    # `make test` installs both; in CI the independent-peer tests must run, never skip.
    raise RuntimeError("curl or node is missing in CI: the HBONE interop tests cannot run")

needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (make test installs it)")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (make test installs it)")

# A CONNECT tunnel from Node's http2 client: sends the payload file once answered (respecting
# back-pressure), reads everything the tunnel returns, prints the status, byte count and SHA-256 of
# what came back.
NODE_CONNECT = r"""
const http2 = require("http2");
const fs = require("fs");
const crypto = require("crypto");
const [host, port, ca, cert, key, payloadPath, authority, windowSize] = process.argv.slice(2);
const client = http2.connect(`https://${host}:${port}`, {
  ca: fs.readFileSync(ca), cert: fs.readFileSync(cert), key: fs.readFileSync(key),
  minVersion: "TLSv1.3", servername: "", checkServerIdentity: () => undefined,
  settings: { initialWindowSize: parseInt(windowSize) },
});
client.on("error", (e) => { console.error("session error", e); process.exit(2); });
const stream = client.request({ ":method": "CONNECT", ":authority": authority });
let status = 0, received = 0;
const hash = crypto.createHash("sha256");
// Bytes go only after the 200, as an HBONE client sends them (early data is bounded by the server).
stream.on("response", (headers) => { status = headers[":status"]; pump(); });
stream.on("data", (d) => { hash.update(d); received += d.length; });
stream.on("end", () => {
  console.log(JSON.stringify({ status, received, sha256: hash.digest("hex") }));
  client.close();
});
stream.on("error", (e) => { console.error("stream error", e); process.exit(3); });
const payload = fs.readFileSync(payloadPath);
let offset = 0;
function pump() {
  while (offset < payload.length) {
    const piece = payload.subarray(offset, offset + 1048576);
    offset += piece.length;
    if (!stream.write(piece)) { stream.once("drain", pump); return; }
  }
  stream.end();
}
"""


@needs_curl
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


@needs_node
@pytest.mark.parametrize("window", [65535, 4 * 1024 * 1024])
async def test_node_connect_tunnel_carries_8_mib_both_ways(
    tmp_path: Path, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    framed_by_h2: list[int] = []  # payload bytes the server let h2 frame (the rest it framed itself)
    send_data = h2.connection.H2Connection.send_data

    def counting_send_data(self: h2.connection.H2Connection, stream_id: int, data: bytes, **kw: Any) -> None:
        framed_by_h2.append(len(data))
        send_data(self, stream_id, data, **kw)

    monkeypatch.setattr(h2.connection.H2Connection, "send_data", counting_send_data)
    received_by_h2: list[int] = []  # DATA frames the server let h2 process (the rest it took itself)
    receive_data_frame = h2.connection.H2Connection._receive_data_frame

    def counting_receive(self: h2.connection.H2Connection, frame: DataFrame) -> Any:
        received_by_h2.append(len(frame.data))
        return receive_data_frame(self, frame)

    monkeypatch.setattr(h2.connection.H2Connection, "_receive_data_frame", counting_receive)
    pki = Pki.create(tmp_path / "pki")
    server_cert, client_cert = pki.issue("ns1", "server"), pki.issue("ns2", "node")
    (tmp_path / "ca.pem").write_text(client_cert.roots_pem)
    (tmp_path / "client.pem").write_text("".join(client_cert.chain_pem))
    (tmp_path / "client.key").write_text(client_cert.key_pem)
    (tmp_path / "connect.js").write_text(NODE_CONNECT)
    payload = os.urandom(8 * 1024 * 1024)
    (tmp_path / "payload.bin").write_bytes(payload)
    echo = await start_echo()
    calls: list[TunnelRequest] = []
    try:
        async with running_server(server_cert, echo_handler(echo, calls)) as sut:
            host, port = sut.address
            assert NODE is not None
            process = await asyncio.create_subprocess_exec(
                NODE,
                str(tmp_path / "connect.js"),
                host,
                str(port),
                str(tmp_path / "ca.pem"),
                str(tmp_path / "client.pem"),
                str(tmp_path / "client.key"),
                str(tmp_path / "payload.bin"),
                "127.0.0.1:9",
                str(window),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(process.communicate(), 4 * WAIT)
            assert process.returncode == 0, stderr.decode()
            result = json.loads(stdout)
            assert result == {
                "status": 200,
                "received": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
            assert bytes(echo.received) == payload  # what reached the upstream, in order
            assert [c.peer_identity for c in calls] == [client_cert.identity]
            assert sut.server.stats.connections_opened == 1
            assert sum(framed_by_h2) < len(payload) // 4, "the large DATA frames did not take the fast path"
            # Only the frame ending the stream (and any padded one) goes through h2 on the way in.
            assert sum(received_by_h2) < len(payload) // 4, "received DATA did not take the fast path"
    finally:
        await echo.close()
