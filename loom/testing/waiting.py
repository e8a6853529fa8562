"""Bounded waiting for tests: every wait has a deadline and says what it was waiting for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(
    predicate: Callable[[], bool], within: float = 5.0, interval: float = 0.005, what: str = ""
) -> None:
    """Return as soon as `predicate()` holds, checking every `interval` seconds; raise TimeoutError
    (naming `what`, when given) if it still does not hold after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() >= deadline:
            raise TimeoutError(f"{what or 'condition'} not reached within {within} s")
        await asyncio.sleep(interval)
