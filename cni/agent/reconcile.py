"""The node agent's reconcile decisions, without I/O: what to do with each pod the agent knows.

Theory of operation
-------------------
The agent knows every pod attachment the CNI plugin told it about (enrolled or not) and, for each, three
facts it observes: whether the pod's sandbox (network namespace) still exists, whether the agent has
*captured* it (redirection rules installed and the pod recorded for ztunnel's snapshots), and whether a
ztunnel has *acknowledged* it. The configuration gives the fourth: whether the pod should be enrolled
(`cni.agent.enrolment`). Reconciling is level-triggered: from these facts alone, `plan` decides

* sandbox gone                          -> FORGET  (release first when captured)
* should be enrolled, not captured      -> CAPTURE (rules + ztunnel add)
* should be enrolled, captured, no ack  -> RETRY   (ztunnel add again) once its backoff has elapsed
* should not be enrolled, captured      -> RELEASE (rules removed, ztunnel del)
* anything else                         -> nothing

so a pass that changes nothing plans nothing, and running it again after any change (a label, a
finished pod, a ztunnel that arrived) converges. Pending pods are retried on a bounded exponential
backoff (`RetrySchedule`), which takes the clock as an argument so it is deterministic under test.

The `ambient.istio.io/redirection` annotation follows from the same facts (`redirection_value`):
``enabled`` when captured and acknowledged, ``pending`` when captured without an ack, absent otherwise.
`annotation_writes` decides which pods need a write: the desired value differs from what the
configuration shows, and it is not the value the agent already wrote and is waiting to see come back
through its own configuration watch (which is what keeps the agent's own write from causing another).
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from cni.agent.enrolment import EnrolmentDecision
from loom.resources.model import ANNOTATION_REDIRECTION

REDIRECTION_ANNOTATION: Final = ANNOTATION_REDIRECTION
REDIRECTION_ENABLED: Final = "enabled"
REDIRECTION_PENDING: Final = "pending"

K = TypeVar("K", bound=Hashable)


class ActionKind(enum.Enum):
    CAPTURE = "capture"
    RETRY = "retry"
    RELEASE = "release"
    FORGET = "forget"


@dataclass(frozen=True, slots=True)
class PodView:
    """What the agent observes about one known pod attachment (keyed by container ID)."""

    container_id: str
    sandbox_exists: bool
    captured: bool
    acked: bool
    decision: EnrolmentDecision
    retry_due: bool = True


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    container_id: str
    reason: str


def plan_pod(view: PodView) -> Action | None:
    """The one step that moves this pod toward its desired state (see the module docstring)."""
    cid = view.container_id
    if not view.sandbox_exists:
        return Action(ActionKind.FORGET, cid, "its network namespace is gone")
    if view.decision.enrolled:
        if not view.captured:
            return Action(ActionKind.CAPTURE, cid, view.decision.reason)
        if not view.acked and view.retry_due:
            return Action(ActionKind.RETRY, cid, "ztunnel has not acknowledged it yet")
        return None
    if view.captured:
        return Action(ActionKind.RELEASE, cid, view.decision.reason)
    return None


def plan(views: Iterable[PodView]) -> list[Action]:
    """`plan_pod` for every pod, in the order given; pods needing nothing are left out."""
    return [action for view in views if (action := plan_pod(view)) is not None]


def redirection_value(captured: bool, acked: bool) -> str | None:
    """The pod's `ambient.istio.io/redirection` annotation value (None: no annotation)."""
    if not captured:
        return None
    return REDIRECTION_ENABLED if acked else REDIRECTION_PENDING


_UNSET: Final = object()


def annotation_writes(
    desired: Mapping[K, str | None], observed: Mapping[K, str | None], written: Mapping[K, str | None]
) -> dict[K, str | None]:
    """The annotation writes needed: every pod whose desired value differs from the observed one and
    that is not already waiting for a write of exactly that value to be observed."""
    return {
        key: value
        for key, value in desired.items()
        if observed.get(key) != value and written.get(key, _UNSET) != value
    }


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: `initial`, doubled per failure, capped at `maximum` (seconds)."""

    initial: float = 0.2
    maximum: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial ({self.initial}) <= maximum ({self.maximum})")

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th consecutive failure (1-based)."""
        exponent = min(max(failures - 1, 0), 32)
        return float(min(self.maximum, self.initial * (2.0**exponent)))


@dataclass
class _Retry:
    failures: int
    due: float


@dataclass
class RetrySchedule(Generic[K]):
    """Per-key backoff state. A key without state is due at once (it has not failed)."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    _state: dict[K, _Retry] = field(default_factory=dict)

    def failed(self, key: K, now: float) -> float:
        """Record a failure; returns when the key is due again."""
        failures = self._state[key].failures + 1 if key in self._state else 1
        due = now + self.policy.delay(failures)
        self._state[key] = _Retry(failures, due)
        return due

    def succeeded(self, key: K) -> None:
        self._state.pop(key, None)

    def forget(self, key: K) -> None:
        self._state.pop(key, None)

    def due(self, key: K, now: float) -> bool:
        state = self._state.get(key)
        return state is None or state.due <= now

    def failures(self, key: K) -> int:
        state = self._state.get(key)
        return state.failures if state is not None else 0

    def next_due(self) -> float | None:
        """The earliest time a failed key becomes due, or None when nothing waits."""
        return min((s.due for s in self._state.values()), default=None)

    def keep_only(self, keys: Iterable[K]) -> None:
        """Drop the state of every key not in `keys` (bounded memory)."""
        wanted = set(keys)
        for key in [k for k in self._state if k not in wanted]:
            del self._state[key]
