"""Mutation fuzzing of the waypoint's client-facing HTTP/1.1 side, through the real proxy on loopback.

Valid requests (bodiless, Content-Length, chunked with trailers, pipelined, HTTP/1.0, Expect:
100-continue) get one to three mutations each (a byte replaced or inserted from the characters parsers
disagree about, a few bytes deleted, a line duplicated, a framing header inserted), then a clean
request that closes the connection. Seeded, so every run sends the same cases. Whatever arrives:

* the waypoint answers with a well-formed sequence of HTTP/1.1 responses (read back by h11) and closes;
* the backend's parser (h11) never refuses what the waypoint forwarded to it;
* no request fails inside the proxy (no 500, no "request pipeline failed" in the log);
* afterwards a clean request is served as usual.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import h11
import pytest

from tests.integration.waypoint_proxy.waypoint_harness import VIP, WEB, exchange_until_close, mesh, status_of
from waypoint.proxy import ProxyLimits

H = b"Host: web\r\n"
SEEDS = [
    b"GET /a?x=1 HTTP/1.1\r\n" + H + b"User-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /b HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n",
    b"GET /d HTTP/1.1\r\n" + H + b"\r\nGET /e HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /f HTTP/1.0\r\n\r\n",
    b"PUT /g HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"DELETE /h HTTP/1.1\r\n" + H + b"Connection: keep-alive\r\nX-A: a, b\r\n\r\n",
]
CLOSING = b"GET /last HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
# The bytes parsers disagree about: line ends, NUL, whitespace, separators, DEL, obs-text, digits.
INTERESTING = b'\r\n\x00 \t:;,"\x7f\xff0a9-'
INSERTIONS = (b"\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: evil\r\n", b" ")
CASES = 300


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 3)):
        operation = rng.randrange(5)
        position = rng.randrange(len(data) + 1)
        if operation == 0 and position < len(data):
            data[position] = rng.choice(INTERESTING)
        elif operation == 1:
            data[position:position] = bytes([rng.choice(INTERESTING)])
        elif operation == 2:
            del data[position : position + rng.randint(1, 4)]
        elif operation == 3:
            lines = bytes(data).split(b"\r\n")
            line = rng.randrange(len(lines))
            lines.insert(line, lines[line])
            data = bytearray(b"\r\n".join(lines))
        else:
            data[position:position] = rng.choice(INSERTIONS)
    return bytes(data)


def read_back(answer: bytes) -> list[int]:
    """The statuses of the responses in `answer`, read by h11 as a client that sent GETs; raises
    h11.RemoteProtocolError if the bytes are not a complete sequence of responses ending in a close."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(answer)
    client.receive_data(b"")
    statuses: list[int] = []
    for _ in range(100):  # bounded: at most one response per request the case can hold
        if client.our_state is h11.IDLE:
            client.send(h11.Request(method="GET", target="/", headers=[("host", "web")]))
            client.send(h11.EndOfMessage())
        event = client.next_event()
        if isinstance(event, h11.InformationalResponse | h11.Response):
            statuses.append(event.status_code)
        elif isinstance(event, h11.EndOfMessage):
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return statuses
        elif event is h11.NEED_DATA:
            raise h11.RemoteProtocolError("the answer ends inside a response")
    raise AssertionError("more responses than any case holds")


async def test_mutated_requests_get_well_formed_answers_and_reach_the_backend_well_formed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(20261121)
    limits = ProxyLimits(request_head_timeout=1.0, idle_timeout=1.0)
    seen: Counter[int] = Counter()
    async with mesh(tmp_path, limits=limits) as m:
        backend = await m.add_backend("10.5.0.1", scripted=True)
        m.serve(WEB, VIP, backend)
        for case in range(CASES):
            sent = mutate(rng, rng.choice(SEEDS)) + CLOSING
            answer, closed = await exchange_until_close(await m.tunnel(), sent, within=5.0)
            assert closed, f"case {case}: no close within 5 s after {sent!r}"
            try:
                statuses = read_back(answer)
            except h11.RemoteProtocolError as e:
                raise AssertionError(f"case {case}: {e} in {answer[:300]!r} for {sent!r}") from e
            assert 500 not in statuses, f"case {case}: {sent!r} -> {answer[:300]!r}"
            seen.update(statuses)
        assert backend.scripted is not None
        assert [e for e in backend.scripted.protocol_errors if not e.startswith("peer closed")] == []
        clean, closed = await exchange_until_close(await m.tunnel(), CLOSING)
        assert status_of(clean) == 200 and closed
    # The cases exercised both sides: requests served and requests refused.
    assert seen[200] > 40 and seen[400] > 40, seen
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("waypoint")]
    assert failures == []
