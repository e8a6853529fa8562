"""Process-wide runtime settings shared by the long-running data-plane processes (ztunnel, waypoint).

`settle_heap()` is called once a process has started (configuration loaded, listeners up): it moves
every object alive at that point (modules, protobuf descriptors, compiled regexes, the state) out of
the garbage collector's reach with `gc.freeze()`, and raises the collection thresholds. A proxy
allocates a few hundred short-lived objects per request; with CPython's default thresholds (700, 10,
10) that is several young collections per request and, every hundred or so, a full one that walks the
whole start-up heap while requests wait: a latency spike of milliseconds. After freezing, the full
collections only walk what was allocated since, and the higher young threshold makes collections rarer
without letting garbage grow much (reference counting frees nearly everything at once; only cycles wait
for the collector)."""

from __future__ import annotations

import gc
from typing import Final

# (young, middle, old) collection thresholds after start-up.
GC_THRESHOLDS: Final = (50_000, 20, 100)


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
