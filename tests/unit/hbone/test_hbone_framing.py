"""The copy-light inbound frame reader and the bounded DATA frame repr behave exactly like h2's and
hyperframe's originals, whatever the frames and however the bytes are cut."""

from __future__ import annotations

import itertools

import h2.exceptions
import pytest
from h2.frame_buffer import FrameBuffer
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.hbone.connection import FrameReader, bounded_data_frame_repr
from loom.hbone.protocol import CLIENT_PREFACE

MAX_FRAME = 1 << 20


def frames_strategy() -> st.SearchStrategy[list[Frame]]:
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    data = st.builds(
        lambda n, padded, pad, end: DataFrame(
            1,
            data=b"d" * n,
            flags=(["PADDED"] if padded else []) + (["END_STREAM"] if end else []),
            pad_length=pad if padded else 0,
        ),
        st.integers(0, 70_000),
        st.booleans(),
        st.integers(0, 255),
        st.booleans(),
    )
    split_headers = st.just(
        [HeadersFrame(3, data=block[:4]), ContinuationFrame(3, data=block[4:], flags=["END_HEADERS"])]
    )
    single = st.one_of(
        data,
        st.just(HeadersFrame(1, data=block, flags=["END_HEADERS"])),
        st.just(SettingsFrame(0, settings={0x4: 1 << 22})),
        st.just(PingFrame(0, opaque_data=b"12345678")),
        st.just(WindowUpdateFrame(0, window_increment=99)),
        st.just(RstStreamFrame(1, error_code=8)),
        st.just(GoAwayFrame(0, last_stream_id=1, additional_data=b"x")),
    )
    return st.lists(st.one_of(single.map(lambda f: [f]), split_headers), max_size=8).map(
        lambda groups: list(itertools.chain.from_iterable(groups))
    )


def parse_all(buffer: FrameBuffer, data: bytes, cuts: list[int]) -> list[tuple[str, bytes]]:
    buffer.max_frame_size = MAX_FRAME
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    parsed: list[tuple[str, bytes]] = []
    for start, end in itertools.pairwise(points):
        buffer.add_data(data[start:end])
        for frame in buffer:
            parsed.append((repr(frame), frame.serialize()))
    return parsed


@given(frames_strategy(), st.lists(st.integers(min_value=0, max_value=400_000), max_size=20), st.booleans())
@settings(max_examples=150, deadline=None)
def test_frame_reader_matches_h2(frames: list[Frame], cuts: list[int], server: bool) -> None:
    data = (CLIENT_PREFACE if server else b"") + b"".join(f.serialize() for f in frames)
    expected = parse_all(FrameBuffer(server=server), data, cuts)
    assert parse_all(FrameReader(server=server), data, cuts) == expected
    assert len(expected) == len(frames) - sum(isinstance(f, ContinuationFrame) for f in frames)


def test_frame_reader_keeps_h2_errors() -> None:
    reader = FrameReader(server=True)
    reader.max_frame_size = MAX_FRAME
    with pytest.raises(h2.exceptions.ProtocolError, match="preamble"):
        reader.add_data(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10)
    reader = FrameReader(server=False)
    reader.max_frame_size = 16384
    reader.add_data(DataFrame(1, data=b"x" * 20000).serialize()[:9])
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        list(reader)
    reader = FrameReader(server=False)
    reader.max_frame_size = MAX_FRAME
    reader.add_data(bytes([0, 0, 3, 0x6, 0, 0, 0, 0, 0]) + b"abc")  # PING must be 8 bytes
    with pytest.raises(h2.exceptions.ProtocolError):
        list(reader)


@given(st.binary(max_size=40), st.booleans(), st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_bounded_data_frame_repr_is_hyperframes(data: bytes, padded: bool, pad: int) -> None:
    frame = DataFrame(1, data=data, flags=["PADDED"] if padded else [], pad_length=pad if padded else 0)
    assert bounded_data_frame_repr(frame) == Frame._body_repr(frame)
