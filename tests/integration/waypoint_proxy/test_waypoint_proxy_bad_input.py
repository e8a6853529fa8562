"""Hostile input at the waypoint (hardening checklist items 1-10): each case gets a 4xx, a RST_STREAM or a
GOAWAY, nothing reaches the backend (its workload counts requests), the observer counts the reason, and
the waypoint serves the next good request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)

from loom.hbone.protocol import CLIENT_PREFACE
from tests.integration.hbone.hbone_harness import RawH2Client, raw_client_context
from tests.integration.waypoint_proxy.waypoint_harness import (
    DB,
    TCP_VIP,
    VIP,
    WEB,
    Backend,
    H1Client,
    H2Client,
    Mesh,
    exchange_until_close,
    mesh,
    request_headers,
    status_of,
)
from waypoint.proxy import Destination, ProxyLimits

H = b"Host: web\r\n"

# (case id, raw request, expected status, expected refusal reason)
SMUGGLING = [
    (
        "cl-te",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        400,
        "te_and_cl",
    ),
    (
        "te-cl",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST",
        400,
        "te_and_cl",
    ),
    (
        "te-tab",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_transfer_encoding",
    ),
    (
        "te-space-name",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-identity-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_transfer_encoding",
    ),
    (
        "te-xchunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_transfer_encoding",
    ),
    (
        "te-te",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-encoding: cow\r\n\r\n0\r\n\r\n",
        400,
        "bad_transfer_encoding",
    ),
    (
        "te-http10",
        b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "te_http10",
    ),
    (
        "cl-differ",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
        "bad_content_length",
    ),
    (
        "cl-duplicate",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
        "bad_content_length",
    ),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400, "bad_content_length"),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400, "bad_content_length"),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400, "bad_content_length"),
    (
        "chunk-garbage",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        400,
        "bad_body",
    ),
    (
        "chunk-size",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_body",
    ),
    (
        "chunk-size-0x",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_body",
    ),
    (
        "chunk-ext-bare-lf",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a=b\nX\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_body",
    ),
    (
        "chunk-ext-quoted-crlf",
        b"POST / HTTP/1.1\r\n" + H + b'Transfer-Encoding: chunked\r\n\r\n5;a="b\r\nc"\r\nhello\r\n0\r\n\r\n',
        400,
        "bad_body",
    ),
    ("bare-lf-head", b"GET / HTTP/1.1\nHost: web\nContent-Length: 0\n\n", 400, "bare_lf"),
    ("bare-lf-one-line", b"GET / HTTP/1.1\r\nHost: web\nX: y\r\n\r\n", 400, "bare_lf"),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: web\rX: y\r\n\r\n", 400, "bare_cr"),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: y\r\n z\r\n\r\n", 400, "obs_fold"),
    ("nul-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: y\x00z\r\n\r\n", 400, "control_char"),
    ("ctl-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: y\x01z\r\n\r\n", 400, "control_char"),
    ("http-2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, "http_version"),
    ("connect", b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n", 405, "connect_method"),
    ("absolute-form", b"GET http://evil/admin HTTP/1.1\r\n" + H + b"\r\n", 400, "target_form"),
    ("no-host", b"GET / HTTP/1.1\r\n\r\n", 400, "missing_host"),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + b"Host: evil\r\n\r\n", 400, "multiple_host"),
    ("unknown-method", b"FROB / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_request"),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_request"),
    ("bad-header-name", b"GET / HTTP/1.1\r\n" + H + b"X(A): y\r\n\r\n", 400, "bad_request"),
    (
        "chunk-lf-after-data",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
        400,
        "bad_body",
    ),
    (
        "many-headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X%d: a\r\n" % i for i in range(5000)) + b"\r\n",
        431,
        "too_many_headers",
    ),
    (
        "huge-header",
        b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        431,
        "head_too_large",
    ),
]


async def serves_next_request(m: Mesh, backend: Backend) -> None:
    """The waypoint still works for a well-behaved client after the bad one."""
    before = backend.requests
    response = await H1Client(await m.tunnel()).request("GET", "/after")
    assert response.status == 200 and json.loads(response.body)["path"] == "/after"
    assert backend.requests == before + 1


@pytest.mark.parametrize(
    ("raw", "status", "reason"), [c[1:] for c in SMUGGLING], ids=[c[0] for c in SMUGGLING]
)
async def test_http1_smuggling_corpus(tmp_path: Path, raw: bytes, status: int, reason: str) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.4.0.1")
        m.serve(WEB, VIP, backend)
        answer, closed = await exchange_until_close(await m.tunnel(), raw)
        assert status_of(answer) == status, answer[:200]
        assert b"connection: close" in answer.lower() and closed
        assert answer.count(b"HTTP/1.1 ") == 1  # nothing after the refusal was parsed as a request
        assert m.observer.refusals == {reason: 1}
        # The refused request gets its access log record: the answer, the reason, who and where.
        [refused] = m.observer.refused_requests
        assert (refused.status, refused.details, refused.protocol) == (status, f"http1.{reason}", "HTTP/1.1")
        assert refused.destination == f"{VIP}:80" and refused.peer_address.startswith("127.")
        assert backend.requests == 0 and backend.tunnels == []
        await serves_next_request(m, backend)


async def test_http1_head_split_across_reads_and_slow_head(tmp_path: Path) -> None:
    limits = ProxyLimits(request_head_timeout=0.3)
    async with mesh(tmp_path, limits=limits) as m:
        backend = await m.add_backend("10.4.0.2")
        m.serve(WEB, VIP, backend)
        tunnel = await m.tunnel()
        for piece in (b"GET /split HTTP/1.1\r\nHo", b"st: web\r\nX-A: 1", b"\r\n\r\n"):
            tunnel.write(piece)
            await asyncio.sleep(0.01)
        response = await H1Client(tunnel).response()
        assert response.status == 200
        # A head that never completes: 408 once the head timeout passed.
        answer, closed = await exchange_until_close(await m.tunnel(), b"GET /slow HTTP/1.1\r\nHost: web\r\n")
        assert status_of(answer) == 408 and closed
        assert m.observer.refusals == {"head_timeout": 1} and backend.requests == 1


# --------------------------------------------------------------------------------------------- HTTP/2

# (case id, extra or replaced headers, expected status or None for RST_STREAM, expected reason)
INJECTION: list[tuple[str, list[tuple[str, str]], int | None, str]] = [
    ("crlf-in-value", [("x-a", "b\r\nx-injected: 1")], None, "header_injection"),
    ("lf-in-value", [("x-a", "b\nGET /admin HTTP/1.1")], None, "header_injection"),
    ("nul-in-value", [("x-a", "b\x00c")], None, "header_injection"),
    ("uppercase-name", [("X-Upper", "1")], None, "uppercase_header"),
    ("connection-header", [("connection", "keep-alive")], None, "connection_header"),
    ("transfer-encoding", [("transfer-encoding", "chunked")], None, "connection_header"),
    ("upgrade-header", [("upgrade", "websocket")], None, "connection_header"),
    ("te-gzip", [("te", "gzip")], None, "bad_te"),
    ("space-in-value-edge", [("x-a", " padded")], None, "header_whitespace"),
]

# Requests with broken pseudo-headers, whole header lists.
PSEUDO: list[tuple[str, list[tuple[str, str]], int | None, str]] = [
    (
        "method-with-target",
        [(":method", "GET /admin HTTP/1.1"), (":scheme", "http"), (":authority", "web"), (":path", "/")],
        None,
        "bad_method",
    ),
    (
        "duplicate-path",
        [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/"), (":path", "/admin")],
        None,
        "pseudo_header",
    ),
    (
        "path-without-slash",
        [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "admin")],
        None,
        "bad_path",
    ),
    (
        "path-with-space",
        [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/a HTTP/1.1")],
        None,
        "bad_path",
    ),
    (
        "pseudo-after-regular",
        [(":method", "GET"), (":scheme", "http"), ("x-a", "1"), (":authority", "web"), (":path", "/")],
        None,
        "pseudo_header",
    ),
    (
        "unknown-pseudo",
        [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/"), (":foo", "x")],
        None,
        "pseudo_header",
    ),
    (
        "status-in-request",
        [(":status", "200"), (":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/")],
        None,
        "pseudo_header",
    ),
    ("missing-path", [(":method", "GET"), (":scheme", "http"), (":authority", "web")], None, "pseudo_header"),
    (
        "authority-host-mismatch",
        [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/"), ("host", "admin")],
        None,
        "authority_mismatch",
    ),
    ("connect", [(":method", "CONNECT"), (":authority", "evil:443")], 405, "connect_method"),
    (
        "too-many-headers",
        [*request_headers("/"), *((f"x-{i}", "a") for i in range(150))],
        431,
        "too_many_headers",
    ),
    ("header-list-too-large", [*request_headers("/"), ("x-big", "a" * 70_000)], 431, "header_list_too_large"),
]


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [(request_headers("/") + c[1], c[2], c[3]) for c in INJECTION] + [c[1:] for c in PSEUDO],
    ids=[c[0] for c in INJECTION] + [c[0] for c in PSEUDO],
)
async def test_http2_malformed_requests_are_refused_per_stream(
    tmp_path: Path, headers: list[tuple[str, str]], status: int | None, reason: str
) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.4.0.3")
        m.serve(WEB, VIP, backend)
        client = await H2Client(await m.tunnel()).start()
        bad = await client.response(client.send(headers))
        if status is None:
            assert bad.reset == ErrorCodes.PROTOCOL_ERROR and bad.headers == []
        else:
            assert bad.status == status
        # The connection survives: the next stream on it is served.
        good = await client.response(client.send(request_headers("/good")))
        assert good.status == 200 and json.loads(good.body)["path"] == "/good"
        assert client.goaway is None
        await client.close()
        assert m.observer.refusals == {reason: 1}
        if status is None:  # a reset stream was never answered: no access log record
            assert m.observer.refused_requests == []
        else:
            [refused] = m.observer.refused_requests
            assert (refused.status, refused.details, refused.protocol) == (
                status,
                f"http2.{reason}",
                "HTTP/2",
            )
        assert backend.requests == 1


async def test_rapid_reset_gets_goaway_enhance_your_calm(tmp_path: Path) -> None:
    async with mesh(tmp_path, limits=ProxyLimits(rapid_reset_limit=20, rapid_reset_window=10.0)) as m:
        backend = await m.add_backend("10.4.0.4")
        m.serve(WEB, VIP, backend)
        client = await H2Client(await m.tunnel()).start()
        for _ in range(50):
            stream_id = client.send(request_headers("/upload", "POST"), end_stream=False)
            client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            client.flush()
        await client.wait(lambda: client.goaway is not None)
        assert client.goaway is not None and client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await client.close()
        assert m.observer.refusals["rapid_reset"] == 1
        assert backend.requests == 0 and backend.tunnels == []
        await serves_next_request(m, backend)


async def flood_goaway(m: Mesh, frames: bytes) -> int:
    """Send the preface, empty SETTINGS and `frames` on a fresh inner HTTP/2 connection, read until the
    waypoint closes it; the error code of its GOAWAY."""
    tunnel = await m.tunnel()
    answer, closed = await exchange_until_close(
        tunnel, CLIENT_PREFACE + SettingsFrame(0).serialize() + frames
    )
    assert closed
    goaways = [f for f in parse_frames(answer) if isinstance(f, GoAwayFrame)]
    assert len(goaways) == 1, goaways
    return goaways[0].error_code


def parse_frames(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


FLOODS = [
    (
        "settings-flood",
        lambda: b"".join(SettingsFrame(0).serialize() for _ in range(1500)),
        "control_frame_flood",
    ),
    (
        "ping-flood",
        lambda: b"".join(PingFrame(0, opaque_data=b"12345678").serialize() for _ in range(1500)),
        "control_frame_flood",
    ),
    (
        "empty-data-flood",
        lambda: _open_stream(1) + b"".join(DataFrame(1).serialize() for _ in range(500)),
        "empty_frame_flood",
    ),
    ("continuation-flood", lambda: _continuation_flood(), "continuation_flood"),
]


def _open_stream(stream_id: int) -> bytes:
    block = Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":authority", "web"), (":path", "/")]
    )
    frame = HeadersFrame(stream_id, data=block, flags=["END_HEADERS"])
    return frame.serialize()


def _continuation_flood() -> bytes:
    frames = [HeadersFrame(1, data=b"\x82", flags=[]).serialize()]
    frames += [ContinuationFrame(1, data=b"\x84").serialize() for _ in range(50)]
    return b"".join(frames)


@pytest.mark.parametrize(("frames", "reason"), [c[1:] for c in FLOODS], ids=[c[0] for c in FLOODS])
async def test_http2_floods_get_goaway(tmp_path: Path, frames: Callable[[], bytes], reason: str) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.4.0.5")
        m.serve(WEB, VIP, backend)
        code = await flood_goaway(m, frames())
        assert code == ErrorCodes.ENHANCE_YOUR_CALM
        assert m.observer.refusals == {reason: 1}
        assert backend.requests == 0
        await serves_next_request(m, backend)


HPACK_ABUSE = [
    # A dynamic table size update to 64 KiB: above our SETTINGS_HEADER_TABLE_SIZE of 4096.
    ("table-size-update", b"\x3f\xe1\xff\x03" + b"\x82\x86\x84"),
    # An integer that never ends (the 0xFF run of the checklist).
    ("endless-integer", b"\x7f" + b"\xff" * 10_000),
    # An index beyond both tables.
    ("bad-index", b"\xff\xff\x7f"),
]


@pytest.mark.parametrize("block", [c[1] for c in HPACK_ABUSE], ids=[c[0] for c in HPACK_ABUSE])
async def test_hpack_abuse_closes_the_connection(tmp_path: Path, block: bytes) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.4.0.6")
        m.serve(WEB, VIP, backend)
        frame = HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        code = await flood_goaway(m, frame)
        assert code in (ErrorCodes.COMPRESSION_ERROR, ErrorCodes.PROTOCOL_ERROR)
        assert m.observer.refusals == {"hpack_error": 1}
        assert backend.requests == 0
        await serves_next_request(m, backend)


async def test_a_huge_advertised_hpack_table_is_not_used_in_full(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.4.0.9")
        m.serve(WEB, VIP, backend)
        client = await H2Client(await m.tunnel()).start()
        client.h2.update_settings({SettingCodes.HEADER_TABLE_SIZE: 1 << 30})
        client.flush()
        for i in range(3):
            stream = await client.response(client.send(request_headers(f"/t{i}")))
            assert stream.status == 200 and json.loads(stream.body)["path"] == f"/t{i}"
        # Our encoder announced (and keeps to) at most its own cap, whatever the client allows.
        assert client.h2.decoder.header_table_size <= ProxyLimits().h2_encoder_table_size
        await client.close()


async def test_streams_beyond_the_concurrency_limit_are_refused(tmp_path: Path) -> None:
    async with mesh(tmp_path, limits=ProxyLimits(h2_max_concurrent_streams=2)) as m:
        backend = await m.add_backend("10.4.0.7")
        m.serve(WEB, VIP, backend)
        client = await H2Client(await m.tunnel()).start()
        # Stop h2 on our side from enforcing the server's limit, so the excess stream is sent.
        client.h2.remote_settings.max_concurrent_streams = 100
        open_ids = [client.send(request_headers("/wait", "POST"), end_stream=False) for _ in range(2)]
        extra = client.send(request_headers("/extra"))
        refused = await client.response(extra)
        assert refused.reset == ErrorCodes.REFUSED_STREAM
        for stream_id in open_ids:
            client.h2.end_stream(stream_id)
        client.flush()
        assert [(await client.response(i)).status for i in open_ids] == [200, 200]
        await client.close()
        assert m.observer.refusals == {"too_many_streams": 1}


async def test_early_data_on_a_refused_connect_never_reaches_the_backend(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backend = await m.add_backend("10.4.0.8")
        m.resolver.destinations[(TCP_VIP, 5432)] = Destination(DB)
        m.picker.endpoints[DB.hostname] = [backend.endpoint(5432)]
        m.l4_allow = False
        client = await RawH2Client.connect(m.address, raw_client_context(m.client_cert, tmp_path))
        try:
            for authority in (f"{TCP_VIP}:5432", "10.96.99.99:80"):
                stream_id = await client.request([(":method", "CONNECT"), (":authority", authority)])
                client.h2.send_data(stream_id, b"GET /early HTTP/1.1\r\nHost: web\r\n\r\n")
                await client.flush()
                assert await client.response_status(stream_id) in (401, 404)
        finally:
            client.close()
        assert backend.tunnels == [] and backend.requests == 0
        assert backend.workload is not None and backend.workload.stats.connections == 0
        assert m.observer.refusals == {"unknown_destination": 1}
        assert m.observer.tunnels[0].response_flags == "DENY"
        m.serve(WEB, VIP, backend)
        await serves_next_request(m, backend)
