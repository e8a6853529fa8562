"""Readiness as named blockers: ready exactly when none is held, names listed, idempotent release."""

from __future__ import annotations

import asyncio

import pytest

from ztunnel.readiness import Readiness

pytestmark = pytest.mark.timeout(30)


def test_ready_when_no_blocker_is_held() -> None:
    readiness = Readiness()
    assert readiness.ready and readiness.pending == ()
    xds = readiness.block("xds")
    inpod = readiness.block("inpod")
    second_xds = readiness.block("xds")
    assert not readiness.ready
    assert readiness.pending == ("inpod", "xds", "xds")
    xds.release()
    xds.release()  # idempotent: does not release the other "xds" blocker
    assert readiness.pending == ("inpod", "xds")
    assert xds.released and not second_xds.released
    readiness.release(second_xds)
    with inpod:
        assert not readiness.ready
    assert readiness.ready and inpod.released


async def test_wait_and_event_follow_the_blockers() -> None:
    readiness = Readiness()
    token = readiness.block("proxy")
    assert not readiness.event.is_set()
    waiter = asyncio.create_task(readiness.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    asyncio.get_running_loop().call_soon(token.release)
    async with asyncio.timeout(2):
        await waiter
    assert readiness.event.is_set()
    readiness.block("again")
    assert not readiness.event.is_set()


def test_misuse_is_refused() -> None:
    readiness, other = Readiness(), Readiness()
    with pytest.raises(ValueError, match="needs a name"):
        readiness.block("")
    token = other.block("xds")
    with pytest.raises(ValueError, match="belongs to another Readiness"):
        readiness.release(token)
    assert not other.ready
    assert repr(token) == "BlockToken('xds', released=False)"
