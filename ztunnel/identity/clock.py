"""Wall-clock time for certificate lifetimes, injectable so tests can move time by hand.

Certificates live in wall-clock time (not_before/not_after), so the identity manager sleeps until a
wall-clock instant rather than for a duration. `SystemClock` naps in short steps and re-reads the
clock after each, so a suspended machine or a stepped clock delays a refresh by at most one nap.
`ManualClock` only moves when told to (`advance`), waking exactly the sleepers whose instant passed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware (UTC)."""
        ...

    async def sleep_until(self, deadline: dt.datetime) -> None:
        """Return once `now() >= deadline`."""
        ...


class SystemClock:
    # Longest single sleep: bounds how late a refresh can be after a suspend or a clock step.
    MAX_NAP_SECONDS = 30.0

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def sleep_until(self, deadline: dt.datetime) -> None:
        while True:
            remaining = (deadline - self.now()).total_seconds()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, self.MAX_NAP_SECONDS))


class ManualClock:
    """A clock for tests: time stands still until `advance` (or `set`) moves it."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime.now(dt.UTC)
        self._sleepers: list[tuple[dt.datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> dt.datetime:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many sleep_until calls are waiting (cancelled ones excluded)."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    def next_deadline(self) -> dt.datetime | None:
        live = [deadline for deadline, _, future in self._sleepers if not future.done()]
        return min(live) if live else None

    def advance(self, delta: dt.timedelta) -> None:
        self.set(self._now + delta)

    def set(self, when: dt.datetime) -> None:
        if when < self._now:
            raise ValueError("a ManualClock never goes back")
        self._now = when
        while self._sleepers and self._sleepers[0][0] <= when:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    async def sleep_until(self, deadline: dt.datetime) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), future))
        await future
