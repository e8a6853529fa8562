"""Bodies between the two sides: back-pressure, flow-control credit, abort and cancel, replay for retries."""

from __future__ import annotations

import asyncio

import pytest

from waypoint.proxy.body import BodyAborted, BodyNotReplayable, BodyPipe, RequestBody


async def test_put_waits_while_the_pipe_is_over_its_high_water_mark() -> None:
    pipe = BodyPipe(high_water=10)
    await pipe.put(b"12345")
    blocked = asyncio.ensure_future(pipe.put(b"678901234567"))
    await asyncio.sleep(0)
    assert not blocked.done() and pipe.size == 17
    assert await pipe.read() == b"12345"
    await asyncio.sleep(0)
    assert not blocked.done()  # 12 bytes still held
    assert await pipe.read() == b"678901234567"
    await asyncio.wait_for(blocked, 1)
    pipe.finish((("grpc-status", "0"),))
    assert await pipe.read() == b"" and pipe.trailers == (("grpc-status", "0"),)
    assert (pipe.total, pipe.consumed, pipe.done) == (17, 17, True)


async def test_credit_is_returned_when_consumed_or_dropped() -> None:
    credited: list[int] = []
    pipe = BodyPipe(high_water=100, on_consumed=credited.append)
    pipe.feed(b"abc", credit=12)  # padding counts for flow control
    pipe.feed(b"def")
    assert credited == []
    assert await pipe.read() == b"abc" and credited == [12]
    pipe.cancel()  # the consumer gave up: what is held is returned at once
    assert credited == [12, 3]
    pipe.feed(b"late", credit=4)  # arriving after the cancel: credited straight away
    assert credited == [12, 3, 4] and await pipe.read() == b""


async def test_abort_fails_the_reader_and_releases_the_writer() -> None:
    pipe = BodyPipe(high_water=1)
    writer = asyncio.ensure_future(pipe.put(b"xx"))
    await asyncio.sleep(0)
    pipe.abort(BodyAborted("client reset"))
    await asyncio.wait_for(writer, 1)
    with pytest.raises(BodyAborted, match="client reset"):
        await pipe.read()


async def test_first_read_hook_runs_once() -> None:
    calls: list[str] = []
    pipe = BodyPipe(high_water=10, on_first_read=lambda: calls.append("continue"))
    pipe.feed(b"a")
    pipe.finish()
    assert await pipe.read_all(10) == b"a" and calls == ["continue"]


async def test_read_all_refuses_large_bodies() -> None:
    pipe = BodyPipe(high_water=100)
    pipe.feed(b"x" * 20)
    pipe.finish()
    with pytest.raises(ValueError, match="larger than 10"):
        await pipe.read_all(10)
    assert pipe.cancelled


async def test_small_body_is_replayed_for_a_retry() -> None:
    pipe = BodyPipe(high_water=100)
    body = RequestBody(pipe, limit=10)
    for part in (b"ab", b"cd"):
        pipe.feed(part)
    first = body.attempt()
    assert await first.read() == b"ab"
    second = body.attempt()  # a retry after the first attempt read part of the body
    with pytest.raises(BodyNotReplayable):
        await first.read()  # the old attempt lost the body to the new one
    pipe.feed(b"ef")
    pipe.finish()
    assert [await second.read() for _ in range(4)] == [b"ab", b"cd", b"ef", b""]
    assert body.replayable and body.received == 6 and second.sent == 6


async def test_body_beyond_the_limit_is_not_replayable() -> None:
    pipe = BodyPipe(high_water=100)
    body = RequestBody(pipe, limit=4)
    pipe.feed(b"abc")
    pipe.feed(b"def")
    pipe.finish()
    attempt = body.attempt()
    assert await attempt.read() == b"abc" and await attempt.read() == b"def"
    assert not body.replayable
    with pytest.raises(BodyNotReplayable):
        body.attempt()


async def test_prefetch_reads_up_to_the_limit_before_the_first_attempt() -> None:
    pipe = BodyPipe(high_water=100)
    body = RequestBody(pipe, limit=4)
    for part in (b"ab", b"cd", b"ef"):
        pipe.feed(part)
    await body.prefetch()
    assert pipe.consumed == 4  # stops at the limit: ef is still in the pipe
    pipe.finish()
    attempt = body.attempt()
    assert [await attempt.read() for _ in range(4)] == [b"ab", b"cd", b"ef", b""]


async def test_prefetch_raises_a_failed_body() -> None:
    pipe = BodyPipe(high_water=100)
    pipe.abort(BodyAborted("malformed chunk"))
    with pytest.raises(BodyAborted):
        await RequestBody(pipe, limit=4).prefetch()


async def test_no_body() -> None:
    body = RequestBody(None, limit=10)
    await body.prefetch()
    attempt = body.attempt()
    assert attempt.empty and await attempt.read() == b"" and body.received == 0
