"""`settle_heap()` freezes the start-up heap and raises the collection thresholds."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from loom.runtime import GC_THRESHOLDS, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settle_heap_freezes_what_exists_and_raises_the_thresholds(restored_gc: None) -> None:
    survivor = [object() for _ in range(1000)]
    settle_heap()
    assert gc.get_freeze_count() >= len(survivor)  # start-up objects are out of the collector's walks
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[2] > 10  # rarer full collections than CPython's default


def test_cycles_made_after_settling_are_still_collected(restored_gc: None) -> None:
    settle_heap()

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2  # the collector still runs on everything allocated after start-up
