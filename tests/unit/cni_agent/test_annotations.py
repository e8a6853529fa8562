"""The redirection annotation writer: writes what differs, retries failures with backoff, never rewrites
a value it is waiting to observe; and the lab-store annotator against the store's stated API."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni.agent.annotations import AnnotationError, AnnotationSync, StoreAnnotator
from cni.agent.reconcile import REDIRECTION_ANNOTATION, RetryPolicy
from loom.lab.store import LabStore, StoredKey
from loom.testing.waiting import eventually


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingAnnotator:
    """Records every call; the first `failures` calls fail; `missing` pods do not exist."""

    def __init__(self, failures: int = 0, missing: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.calls: list[tuple[str, str, dict[str, str | None]]] = []
        self.failures = failures
        self.missing = missing

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        self.calls.append((namespace, name, dict(changes)))
        if self.failures > 0:
            self.failures -= 1
            raise AnnotationError(f"store locked (pod {namespace}/{name})")
        return (namespace, name) not in self.missing


P = ("shop", "web")
Q = ("shop", "db")


async def test_writes_only_differences_and_waits_to_observe_its_own_write() -> None:
    annotator = RecordingAnnotator()
    sync = AnnotationSync(annotator, clock=FakeClock())
    sync.update({P: "enabled", Q: None}, {P: None, Q: None})
    assert await sync.write_due() == 1
    assert annotator.calls == [("shop", "web", {REDIRECTION_ANNOTATION: "enabled"})]
    # The configuration has not caught up yet: no second write of the same value.
    sync.update({P: "enabled", Q: None}, {P: None, Q: None})
    assert await sync.write_due() == 0
    # Caught up; then changed by somebody else: written again.
    sync.update({P: "enabled"}, {P: "enabled"})
    assert sync.pending() == {}
    sync.update({P: "enabled"}, {P: "pending"})
    assert await sync.write_due() == 1
    assert sync.writes == 2


async def test_failures_are_counted_and_retried_with_backoff() -> None:
    clock = FakeClock()
    errors: list[int] = []
    annotator = RecordingAnnotator(failures=2)
    sync = AnnotationSync(
        annotator, retry=RetryPolicy(initial=1.0, maximum=8.0), on_error=lambda: errors.append(1), clock=clock
    )
    sync.update({P: "pending"}, {P: None})
    assert await sync.write_due() == 1 and len(errors) == 1
    assert await sync.write_due() == 0  # not due yet
    clock.now += 1.0
    assert await sync.write_due() == 1 and len(errors) == 2
    clock.now += 1.5
    assert await sync.write_due() == 0  # the second failure doubled the wait to 2 s
    clock.now += 0.5
    # A newer desired value replaces the one that failed.
    sync.update({P: "enabled"}, {P: None})
    assert await sync.write_due() == 1
    assert annotator.calls[-1] == ("shop", "web", {REDIRECTION_ANNOTATION: "enabled"})
    assert (sync.errors, sync.writes, len(errors)) == (2, 1, 2)


async def test_a_pod_that_is_gone_is_not_retried() -> None:
    annotator = RecordingAnnotator(missing=frozenset({P}))
    sync = AnnotationSync(annotator, clock=FakeClock())
    sync.update({P: None}, {P: "enabled"})
    assert await sync.write_due() == 1
    assert await sync.write_due() == 0


async def test_run_loop_writes_and_retries_in_real_time() -> None:
    annotator = RecordingAnnotator(failures=1)
    sync = AnnotationSync(annotator, retry=RetryPolicy(initial=0.01, maximum=0.02))
    task = asyncio.create_task(sync.run())
    try:
        sync.update({P: "enabled"}, {P: None})
        await eventually(lambda: sync.writes >= 1, within=5, what="the retried write")
        assert sync.errors == 1 and len(annotator.calls) == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class FakeStoredKey:
    kind: str
    namespace: str
    name: str


class FakeLabStore:
    """The API `loom.lab.store.LabStore` is specified with (annotate returns None for a missing object)."""

    instances: list[FakeLabStore] = []

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects: dict[FakeStoredKey, dict[str, Any]] = {
            FakeStoredKey("Pod", "shop", "web"): {"metadata": {"name": "web", "annotations": {}}}
        }
        FakeLabStore.instances.append(self)

    def annotate(self, key: FakeStoredKey, changes: Mapping[str, str | None]) -> dict[str, Any] | None:
        if key.name == "broken":
            raise OSError("disk full")
        obj = self.objects.get(key)
        if obj is None:
            return None
        annotations = obj["metadata"]["annotations"]
        for name, value in changes.items():
            if value is None:
                annotations.pop(name, None)
            else:
                annotations[name] = value
        return obj


async def test_store_annotator_uses_the_lab_store_api(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module = types.ModuleType("loom.lab.store")
    module.LabStore = FakeLabStore  # type: ignore[attr-defined]
    module.StoredKey = FakeStoredKey  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "loom.lab.store", module)
    FakeLabStore.instances.clear()
    annotator = StoreAnnotator(tmp_path)
    assert await annotator.annotate("shop", "web", {REDIRECTION_ANNOTATION: "enabled"})
    store = FakeLabStore.instances[0]
    assert store.root == tmp_path
    pod = store.objects[FakeStoredKey("Pod", "shop", "web")]
    assert pod["metadata"]["annotations"] == {REDIRECTION_ANNOTATION: "enabled"}
    assert await annotator.annotate("shop", "web", {REDIRECTION_ANNOTATION: None})
    assert pod["metadata"]["annotations"] == {}
    assert not await annotator.annotate("shop", "gone", {REDIRECTION_ANNOTATION: None})
    with pytest.raises(AnnotationError, match=r"shop/broken.*disk full"):
        await annotator.annotate("shop", "broken", {REDIRECTION_ANNOTATION: "enabled"})
    assert len(FakeLabStore.instances) == 1  # one store object for the annotator's lifetime


async def test_store_annotator_without_the_lab_is_a_retryable_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "loom.lab.store", None)  # makes the import fail
    with pytest.raises(AnnotationError, match="lab store is not available"):
        await StoreAnnotator(tmp_path).annotate("shop", "web", {REDIRECTION_ANNOTATION: "enabled"})


async def test_store_annotator_with_the_lab_store(tmp_path: Path) -> None:
    store = LabStore(tmp_path)
    key = store.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"keep": "me"}},
            "spec": {"containers": [{"name": "app", "image": "x"}]},
        }
    )
    assert key == StoredKey("Pod", "shop", "web")
    annotator = StoreAnnotator(tmp_path)
    assert await annotator.annotate("shop", "web", {REDIRECTION_ANNOTATION: "enabled"})
    stored = store.get(key)
    assert stored is not None
    assert stored["metadata"]["annotations"] == {"keep": "me", REDIRECTION_ANNOTATION: "enabled"}
    assert await annotator.annotate("shop", "web", {REDIRECTION_ANNOTATION: None})
    stored = store.get(key)
    assert stored is not None and stored["metadata"]["annotations"] == {"keep": "me"}
    assert not await annotator.annotate("shop", "gone", {REDIRECTION_ANNOTATION: None})
