"""Readiness as a set of named blockers (what `:15021/healthz/ready` reports).

Theory of operation
-------------------
Each component that must finish something before the node proxy may receive traffic takes a blocker
when it starts (`block("xds")`, `block("inpod")`, ...) and releases it when done: the xDS client after
the first full configuration, the in-pod client after the node agent's snapshot, the proxy once its
listeners are bound. The proxy is ready exactly when no blocker is held. Tokens are released by
`token.release()`, `readiness.release(token)` or by leaving `with readiness.block(name):`; releasing
twice is harmless, so a component can release in both its success path and its `finally`.

Taking blockers is meant for start-up, before the readiness server answers; a process with no blocker
is ready. `wait()` lets start-up code (and tests) await readiness; `pending` names what is still
outstanding, which the 503 body lists so an operator sees what the proxy waits for.
"""

from __future__ import annotations

import asyncio
import itertools


class BlockToken:
    """One held blocker. Release it exactly when its component is ready; idempotent."""

    __slots__ = ("_id", "_readiness", "name")

    def __init__(self, readiness: Readiness, token_id: int, name: str) -> None:
        self._readiness = readiness
        self._id = token_id
        self.name = name

    @property
    def released(self) -> bool:
        return self._id not in self._readiness._blockers

    def release(self) -> None:
        self._readiness._release(self._id)

    def __enter__(self) -> BlockToken:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"BlockToken({self.name!r}, released={self.released})"


class Readiness:
    """The named blockers of one process (see the module docstring)."""

    def __init__(self) -> None:
        self._blockers: dict[int, str] = {}
        self._ids = itertools.count(1)
        self._ready_event = asyncio.Event()
        self._ready_event.set()

    def block(self, name: str) -> BlockToken:
        """Hold readiness back until the returned token is released."""
        if not name:
            raise ValueError("a readiness blocker needs a name (it is shown in the 503 body)")
        token = BlockToken(self, next(self._ids), name)
        self._blockers[token._id] = name
        self._ready_event.clear()
        return token

    def release(self, token: BlockToken) -> None:
        if token._readiness is not self:
            raise ValueError(f"{token!r} belongs to another Readiness")
        token.release()

    def _release(self, token_id: int) -> None:
        if self._blockers.pop(token_id, None) is not None and not self._blockers:
            self._ready_event.set()

    @property
    def ready(self) -> bool:
        return not self._blockers

    @property
    def pending(self) -> tuple[str, ...]:
        """The names of the blockers still held, sorted (a name held twice is listed twice)."""
        return tuple(sorted(self._blockers.values()))

    @property
    def event(self) -> asyncio.Event:
        """Set while ready (do not set or clear it yourself)."""
        return self._ready_event

    async def wait(self) -> None:
        """Wait until ready (bound it with `asyncio.timeout`)."""
        await self._ready_event.wait()
