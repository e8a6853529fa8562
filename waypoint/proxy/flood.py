"""Sliding-window event counting for the HTTP/2 flood limits (rapid reset, PING/SETTINGS floods).

`WindowedCounter.add(now, n)` records `n` events at time `now` and says whether more than `limit`
happened within the last `window` seconds. It keeps at most `limit + 1` timestamps, so its memory is
bounded whatever a peer sends, and it is pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import deque


class WindowedCounter:
    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be at least 1 and window positive")
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque(maxlen=limit + 1)

    def add(self, now: float, count: int = 1) -> bool:
        """Record `count` events at `now`; True once more than `limit` fall within the window."""
        for _ in range(min(count, self.limit + 1)):
            self._times.append(now)
        horizon = now - self.window
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        return len(self._times) > self.limit

    def __len__(self) -> int:
        return len(self._times)
