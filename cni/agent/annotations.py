"""The `ambient.istio.io/redirection` pod annotation: written off the enrolment path, retried on failure.

Theory of operation
-------------------
The agent marks each pod it captures, as Istio's node agent does (reference §4.2, §5.1): ``enabled``
once ztunnel acknowledged it, ``pending`` while the rules are in place but no ztunnel has, and no
annotation once released. Where the annotation lands is behind `PodAnnotator`; `StoreAnnotator` writes
into the lab's object store (`loom.lab.store`), a Kubernetes implementation would patch the Pod.

Writing must never hold up enrolment (the redirection is what protects the pod; the annotation only
reports it), so the reconcile pass only hands the desired values to `AnnotationSync`, and its own task
does the writes: for each pod whose desired value differs from what the configuration shows
(`cni.agent.reconcile.annotation_writes`), one `annotate` call. A failure is logged, counted and retried
with backoff per pod; a later desired value replaces an older one that has not been written yet.

No feedback loop: the agent watches the same store it writes, so its own write comes back as a changed
Pod, which triggers a reconcile. That pass decides the same enrolment (the annotation is not an input
of the decision) and finds the observed value equal to the desired one, so it writes nothing, and the
churn ends after one extra pass. `written` remembers values written but not yet seen, so a pass that
runs before the watch catches up does not write the same value again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cni.agent.reconcile import REDIRECTION_ANNOTATION, RetryPolicy, RetrySchedule, annotation_writes
from controller.sources.kubernetes import KubernetesApiError, KubernetesError, KubernetesSource
from loom.resources.model import ResourceKey

log = logging.getLogger(__name__)

PodRef = tuple[str, str]  # (namespace, name)


class AnnotationError(RuntimeError):
    """An annotation could not be written; the message names the pod and the cause."""


class PodAnnotator(Protocol):
    """Where the agent's pod annotations go."""

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        """Set (value) or remove (None) annotations of a pod; False when the pod does not exist (there is
        nothing to annotate). Raises AnnotationError when the write failed and may be retried."""
        ...


class StoreAnnotator:
    """`PodAnnotator` writing into the lab's object store (`loom.lab.store.LabStore(root).annotate`).

    The store module is imported on first use: the agent runs without the lab, and only this annotator
    needs it. Store writes are file I/O under an fcntl lock, so they run on a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._store: Any = None
        self._key: Callable[..., Any] | None = None

    def _open(self) -> tuple[Any, Callable[..., Any]]:
        if self._store is None or self._key is None:
            try:
                store_module = importlib.import_module("loom.lab.store")
            except ImportError as exc:
                raise AnnotationError(f"the lab store is not available: {exc}") from None
            self._store = store_module.LabStore(self.root)
            self._key = store_module.StoredKey
        return self._store, self._key

    def _annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        store, stored_key = self._open()
        try:
            result = store.annotate(stored_key(kind="Pod", namespace=namespace, name=name), dict(changes))
        except Exception as exc:  # StoreError, OSError, a validation error: all retried, named here
            raise AnnotationError(
                f"annotating pod {namespace}/{name} in the store {self.root}: {exc}"
            ) from None
        return result is not None

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        return await asyncio.to_thread(self._annotate, namespace, name, changes)


class KubernetesAnnotator:
    """`PodAnnotator` patching pods through the Kubernetes API (a JSON merge patch of the annotations,
    as Istio's node agent does), with the client of the agent's Kubernetes source."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        try:
            await self.source.patch_annotations(ResourceKey("Pod", namespace, name), changes)
        except KubernetesApiError as exc:
            if exc.status == 404:
                return False  # the pod is gone: nothing to annotate
            raise AnnotationError(f"annotating pod {namespace}/{name}: {exc}") from None
        except KubernetesError as exc:
            raise AnnotationError(f"annotating pod {namespace}/{name}: {exc}") from None
        return True


class AnnotationSync:
    """Writes the redirection annotation toward the desired values (see the module docstring)."""

    def __init__(
        self,
        annotator: PodAnnotator,
        *,
        retry: RetryPolicy | None = None,
        on_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.annotator = annotator
        self._on_error = on_error
        self._clock = clock
        self._retry: RetrySchedule[PodRef] = RetrySchedule(retry or RetryPolicy(initial=0.5, maximum=30.0))
        self._desired: dict[PodRef, str | None] = {}
        self._observed: dict[PodRef, str | None] = {}
        self._written: dict[PodRef, str | None] = {}
        self._wake = asyncio.Event()
        self.writes = 0
        self.errors = 0

    def update(self, desired: Mapping[PodRef, str | None], observed: Mapping[PodRef, str | None]) -> None:
        """The values the pods should carry and what the configuration shows now."""
        self._desired = dict(desired)
        self._observed = dict(observed)
        # A write is "seen" once the configuration shows it (or the pod is no longer managed).
        self._written = {
            ref: value
            for ref, value in self._written.items()
            if ref in self._desired and self._observed.get(ref) != value
        }
        self._retry.keep_only(self._desired)
        self._wake.set()

    def pending(self) -> dict[PodRef, str | None]:
        """Writes still needed, whether or not their retry is due."""
        return annotation_writes(self._desired, self._observed, self._written)

    async def write_due(self) -> int:
        """One pass: every needed write whose retry is due; returns how many were attempted."""
        attempted = 0
        for ref, value in sorted(self.pending().items()):
            if not self._retry.due(ref, self._clock()):
                continue
            attempted += 1
            namespace, name = ref
            try:
                exists = await self.annotator.annotate(namespace, name, {REDIRECTION_ANNOTATION: value})
            except AnnotationError as exc:
                self._failed(ref, str(exc))
                continue
            except Exception as exc:  # an annotator bug must not stop the writer
                log.exception("annotator failed for pod %s/%s", namespace, name)
                self._failed(ref, repr(exc))
                continue
            self.writes += 1
            self._retry.succeeded(ref)
            if self._desired.get(ref, value) == value:
                self._written[ref] = value
            if not exists:
                log.debug("pod %s/%s is gone; nothing to annotate", namespace, name)
        return attempted

    def _failed(self, ref: PodRef, error: str) -> None:
        self.errors += 1
        due = self._retry.failed(ref, self._clock())
        log.warning(
            "cannot set %s on pod %s/%s (retrying in %.1fs): %s",
            REDIRECTION_ANNOTATION,
            ref[0],
            ref[1],
            max(0.0, due - self._clock()),
            error,
        )
        if self._on_error is not None:
            self._on_error()

    async def run(self) -> None:
        """Write whenever the desired values change or a retry falls due, until cancelled."""
        while True:
            self._wake.clear()
            await self.write_due()
            timeout: float | None = None  # nothing to write: sleep until the next update
            pending = self.pending()
            if pending:
                now = self._clock()
                if any(self._retry.due(ref, now) for ref in pending):
                    timeout = 0.0
                else:
                    next_due = self._retry.next_due()
                    timeout = max(0.0, next_due - now) if next_due is not None else 0.0
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
