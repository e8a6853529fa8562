"""`Deadline`: asyncio.timeout() for code that knows its event loop.

Python 3.11's asyncio.timeout() looks up the running loop twice and the current task once on every
use, and each lookup costs a getpid() system call there (the running-loop holder checks the pid).
The waypoint bounds every read, write and upstream attempt, several per request: in a profile at
1,000 requests/s those lookups were 8% of the process's CPU. A `Deadline` is handed the loop once
and finds the current task through it (`asyncio.current_task(loop)` needs no lookup), with
asyncio.timeout()'s semantics otherwise: the task is cancelled at the deadline, and the
cancellation leaves the block as TimeoutError only when it was the deadline's own (a cancellation
from outside stays a cancellation)."""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """``async with Deadline(loop, when):`` bounds the block by loop time `when` (None: unbounded)."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        self._loop = loop
        self._when = when
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._expired = False
        self._cancelling = 0

    @classmethod
    def within(cls, loop: asyncio.AbstractEventLoop, seconds: float) -> Deadline:
        return cls(loop, loop.time() + seconds)

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        if self._when is not None:
            if self._when <= self._loop.time():
                self._expire()
            else:
                self._handle = self._loop.call_at(self._when, self._expire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # Undo our own cancel; the error is a timeout only if nobody else cancelled meanwhile.
        if (
            self._expired
            and self._task is not None
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    @property
    def expired(self) -> bool:
        return self._expired

    def _expire(self) -> None:
        self._handle = None
        if self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()
