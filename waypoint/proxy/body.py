"""Message bodies between the two sides of the proxy: bounded, streaming, and replayable for retries.

Theory of operation
-------------------
A `BodyPipe` carries one body (request or response) from the side that receives it to the side that
sends it on, chunk by chunk, never whole. The producer either awaits `put()` (HTTP/1.1: the socket is
not read again until the pipe is under its high-water mark) or calls `feed()` with a flow-control
*credit* (HTTP/2: the bytes are acknowledged to the peer, reopening its window, only when the consumer
has taken them). Either way a slow consumer stops the producer's peer: memory per direction is the
high-water mark plus one read, or the HTTP/2 stream window.

`finish(trailers)` ends the body, `abort(error)` fails it (the consumer's read raises), `cancel()` is
the consumer saying it wants no more (pending credit is returned so the HTTP/2 connection window is
not lost, and a waiting producer is released).

`RequestBody` makes a request body replayable while it is small: each upstream attempt gets an
`AttemptBody` reader; the first reads from the pipe and records what it read until `limit` bytes, so a
retry can replay those and continue from the pipe. Once an attempt read past the limit the recording is
dropped and `attempt()` raises `BodyNotReplayable`: that request is not retried. `prefetch()` reads
that much before the first attempt starts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

Trailers = tuple[tuple[str, str], ...]


class BodyNotReplayable(Exception):
    """A retry needs the request body again, but more of it was sent than the retry buffer holds."""


class BodyAborted(ConnectionError):
    """The side producing a body failed before its end (reset, connection lost, protocol error)."""


class BodyPipe:
    """One body in flight (see the module docstring)."""

    __slots__ = (
        "_chunks",
        "_high_water",
        "_on_consumed",
        "_on_first_read",
        "_readable",
        "_writable",
        "cancelled",
        "consumed",
        "ended",
        "error",
        "size",
        "total",
        "trailers",
    )

    def __init__(
        self,
        high_water: int,
        *,
        on_consumed: Callable[[int], None] | None = None,
        on_first_read: Callable[[], None] | None = None,
    ) -> None:
        self._high_water = high_water
        self._on_consumed = on_consumed
        self._on_first_read = on_first_read
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._readable: asyncio.Event | None = None
        self._writable: asyncio.Event | None = None
        self.size = 0  # bytes held
        self.total = 0  # bytes fed so far
        self.consumed = 0  # bytes taken by the consumer
        self.ended = False
        self.cancelled = False
        self.error: BaseException | None = None
        self.trailers: Trailers = ()

    # ------------------------------------------------------------------ producer side

    def feed(self, data: bytes, credit: int | None = None) -> None:
        """Add a chunk; `credit` (default len(data)) is handed to on_consumed when it is taken."""
        owed = len(data) if credit is None else credit
        if self.cancelled or self.ended or self.error is not None:
            self._credit(owed)
            return
        if not data:
            self._credit(owed)
            return
        self._chunks.append((data, owed))
        self.size += len(data)
        self.total += len(data)
        self._wake_reader()

    async def put(self, data: bytes) -> None:
        """Feed, then wait while the pipe holds more than its high-water mark."""
        self.feed(data)
        while self.size > self._high_water and not self.cancelled and self.error is None:
            if self._writable is None:
                self._writable = asyncio.Event()
            self._writable.clear()
            await self._writable.wait()

    def finish(self, trailers: Trailers = ()) -> None:
        if self.ended or self.error is not None:
            return
        self.ended = True
        self.trailers = trailers
        self._wake_reader()

    def abort(self, error: BaseException) -> None:
        if self.ended or self.error is not None:
            return
        self.error = error
        self._drop()
        self._wake_reader()
        self._wake_writer()

    # ------------------------------------------------------------------ consumer side

    @property
    def done(self) -> bool:
        """Everything was read (or the body failed, or the consumer gave up)."""
        return self.cancelled or self.error is not None or (self.ended and not self._chunks)

    async def read(self) -> bytes:
        """The next chunk; b"" at the end; raises the producer's error."""
        if self._on_first_read is not None:
            hook, self._on_first_read = self._on_first_read, None
            hook()
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.ended or self.cancelled:
                return b""
            if self._readable is None:
                self._readable = asyncio.Event()
            self._readable.clear()
            await self._readable.wait()
        data, owed = self._chunks.popleft()
        self.size -= len(data)
        self.consumed += len(data)
        self._credit(owed)
        if self.size <= self._high_water:
            self._wake_writer()
        return data

    async def read_all(self, limit: int) -> bytes:
        """The whole body, for small ones only; ValueError when it exceeds `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while data := await self.read():
            size += len(data)
            if size > limit:
                self.cancel()
                raise ValueError(f"body larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def cancel(self) -> None:
        """The consumer wants nothing more: drop what is held, release the producer."""
        if self.cancelled:
            return
        self.cancelled = True
        self._drop()
        self._wake_reader()
        self._wake_writer()

    # ------------------------------------------------------------------ internals

    def _drop(self) -> None:
        owed = sum(credit for _, credit in self._chunks)
        self._chunks.clear()
        self.size = 0
        self._credit(owed)

    def _credit(self, owed: int) -> None:
        if owed and self._on_consumed is not None:
            self._on_consumed(owed)

    def _wake_reader(self) -> None:
        if self._readable is not None:
            self._readable.set()

    def _wake_writer(self) -> None:
        if self._writable is not None:
            self._writable.set()


class RequestBody:
    """A request body that can be read once per upstream attempt while it is small (module docstring)."""

    def __init__(self, pipe: BodyPipe | None, limit: int) -> None:
        self.pipe = pipe  # None: the request has no body
        self.limit = limit
        self._recorded: list[bytes] = []
        self._recorded_size = 0
        self._overflowed = False
        self._attempts = 0

    @property
    def replayable(self) -> bool:
        return not self._overflowed

    @property
    def received(self) -> int:
        """Body bytes received from the client so far."""
        return self.pipe.total if self.pipe is not None else 0

    def attempt(self) -> AttemptBody:
        """A reader for the next attempt; BodyNotReplayable when the recorded prefix was dropped."""
        if self._overflowed:
            raise BodyNotReplayable(f"more than {self.limit} request body bytes were already sent upstream")
        self._attempts += 1
        return AttemptBody(self, self._attempts)

    async def prefetch(self) -> None:
        """Read up to `limit` bytes (at most one chunk more) before the first attempt, so a small body
        is complete before anything is sent upstream: a request that turns out malformed in its body
        never reaches the backend, and a small body stays replayable. Raises the client's error."""
        pipe = self.pipe
        if pipe is None or self._attempts:
            return
        while self._recorded_size < self.limit:
            data = await pipe.read()
            if not data:
                return
            self._recorded.append(data)
            self._recorded_size += len(data)

    def _record(self, data: bytes) -> None:
        if self._overflowed:
            return
        if self._recorded_size + len(data) > self.limit:
            self._overflowed = True
            self._recorded = []
            self._recorded_size = 0
            return
        self._recorded.append(data)
        self._recorded_size += len(data)

    def cancel(self) -> None:
        if self.pipe is not None:
            self.pipe.cancel()


class AttemptBody:
    """One attempt's view of the request body: the recorded prefix, then the live pipe."""

    __slots__ = ("_body", "_generation", "_index", "sent")

    def __init__(self, body: RequestBody, generation: int) -> None:
        self._body = body
        self._generation = generation
        self._index = 0
        self.sent = 0

    @property
    def trailers(self) -> Trailers:
        pipe = self._body.pipe
        return pipe.trailers if pipe is not None else ()

    @property
    def empty(self) -> bool:
        return self._body.pipe is None

    async def read(self) -> bytes:
        body = self._body
        if body._attempts != self._generation:
            raise BodyNotReplayable("a newer attempt owns the request body")
        if self._index < len(body._recorded):
            data = body._recorded[self._index]
            self._index += 1
            self.sent += len(data)
            return data
        if body.pipe is None:
            return b""
        data = await body.pipe.read()
        if data:
            body._record(data)
            self._index = len(body._recorded)
            self.sent += len(data)
        return data
