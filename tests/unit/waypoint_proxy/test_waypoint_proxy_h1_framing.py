"""The client-facing HTTP/1.1 framing helpers: the chunked request-body decoder (where a body ends, its
trailers, framing errors, any split of the bytes) and the response bytes written to clients, checked
against h11 as an independent reader."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.proxy.downstream_h1 import ChunkedDecoder, chunk, last_chunk, response_head_bytes

BODY = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: w\r\n\r\n"


def decode(pieces: list[bytes]) -> tuple[bytes, list[tuple[str, str]], bytes]:
    """Feed the pieces one by one as a socket would deliver them, only while the body needs bytes;
    body, trailers, and what follows the body (its leftover, then the pieces never fed)."""
    decoder = ChunkedDecoder()
    body = bytearray()
    pending = list(pieces)
    while True:
        item = decoder.next()
        if item is None:
            decoder.feed(pending.pop(0))
        elif isinstance(item, bytes):
            body += item
        else:
            return bytes(body), item, decoder.leftover + b"".join(pending)


def test_a_chunked_body_its_trailers_and_the_bytes_after_it() -> None:
    assert decode([BODY + NEXT]) == (b"abcde", [("x-trailer", "t")], NEXT)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(BODY + NEXT) - 1), unique=True, max_size=8))
def test_any_split_of_the_bytes_decodes_the_same(cuts: list[int]) -> None:
    data = BODY + NEXT
    bounds = [0, *sorted(cuts), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode(pieces) == (b"abcde", [("x-trailer", "t")], NEXT)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not a hex size
        b"5\r\nhelloXX0\r\n\r\n",  # garbage after the chunk data
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the chunk data
        b"5;a=b\nX\r\nhello\r\n0\r\n\r\n",  # bare LF in a chunk extension
    ],
)
def test_chunk_framing_errors_raise(body: bytes) -> None:
    decoder = ChunkedDecoder()
    decoder.feed(body)
    with pytest.raises(h11.RemoteProtocolError):
        while decoder.next() is not None:
            pass


def test_responses_read_back_by_h11() -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "w")]))
    client.send(h11.EndOfMessage())
    client.receive_data(
        response_head_bytes(200, [("content-type", "text/plain"), ("transfer-encoding", "chunked")])
        + chunk(b"hello ")
        + chunk(b"world")
        + last_chunk([("x-checksum", "abc")])
    )
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason) == (200, b"OK")
    assert (b"content-type", b"text/plain") in response.headers
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert body == b"hello world"
    assert isinstance(event, h11.EndOfMessage) and event.headers == [(b"x-checksum", b"abc")]


def test_a_status_without_a_standard_phrase_gets_an_empty_reason() -> None:
    assert response_head_bytes(599, []) == b"HTTP/1.1 599 \r\n\r\n"
