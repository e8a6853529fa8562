"""Label-selector lookup that scales with the number of labels on an object, not with the selectors.

Translation asks "which Services / policies select this pod?" for every pod. Testing all 1,000 service
selectors against all 10,000 pods would be 10 million comparisons, so each selector is filed under one
of its matchLabels pairs (a pod can only match it if the pod carries that exact pair) and only
selectors without matchLabels are tested against every pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

from loom.resources.model import LabelSelector

T = TypeVar("T")


class SelectorIndex(Generic[T]):
    """Items keyed by a label selector; `matching(labels)` returns the items whose selector matches."""

    __slots__ = ("_by_pair", "_scan")

    def __init__(self) -> None:
        self._by_pair: dict[tuple[str, str], list[tuple[LabelSelector, T]]] = {}
        self._scan: list[tuple[LabelSelector, T]] = []

    def add(self, selector: LabelSelector, item: T) -> None:
        if selector.match_labels:
            # Any pair will do; the smallest keeps the index deterministic.
            pair = min(selector.match_labels.items())
            self._by_pair.setdefault(pair, []).append((selector, item))
        else:
            self._scan.append((selector, item))

    def matching(self, labels: Mapping[str, str]) -> list[T]:
        found = [item for selector, item in self._scan if selector.matches(labels)]
        by_pair = self._by_pair
        if by_pair:
            for pair in labels.items():
                bucket = by_pair.get(pair)
                if bucket:
                    found.extend(item for selector, item in bucket if selector.matches(labels))
        return found

    def __bool__(self) -> bool:
        return bool(self._by_pair or self._scan)
