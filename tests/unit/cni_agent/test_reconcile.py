"""The reconcile decisions (pure): per-pod plan, backoff, annotation values and writes."""

from __future__ import annotations

import pytest

from cni.agent.enrolment import EnrolmentDecision
from cni.agent.reconcile import (
    Action,
    ActionKind,
    PodView,
    RetryPolicy,
    RetrySchedule,
    annotation_writes,
    plan,
    plan_pod,
    redirection_value,
)

YES = EnrolmentDecision(True, "namespace is labelled")
NO = EnrolmentDecision(False, "label removed")


@pytest.mark.parametrize(
    ("exists", "captured", "acked", "decision", "retry_due", "expected"),
    [
        # sandbox gone: forgotten whatever else holds
        (False, True, True, YES, True, ActionKind.FORGET),
        (False, False, False, NO, True, ActionKind.FORGET),
        # should be enrolled
        (True, False, False, YES, False, ActionKind.CAPTURE),  # capture is not held back by backoff
        (True, True, False, YES, True, ActionKind.RETRY),
        (True, True, False, YES, False, None),  # pending, backoff not elapsed
        (True, True, True, YES, True, None),  # enrolled: nothing to do
        # should not be enrolled
        (True, True, True, NO, False, ActionKind.RELEASE),
        (True, True, False, NO, False, ActionKind.RELEASE),
        (True, False, False, NO, True, None),
    ],
)
def test_plan_pod(
    exists: bool,
    captured: bool,
    acked: bool,
    decision: EnrolmentDecision,
    retry_due: bool,
    expected: ActionKind | None,
) -> None:
    view = PodView("c1", exists, captured, acked, decision, retry_due)
    action = plan_pod(view)
    assert (action.kind if action is not None else None) is expected
    if action is not None:
        assert action.container_id == "c1" and action.reason


def test_plan_keeps_order_and_skips_settled_pods() -> None:
    views = [
        PodView("a", True, False, False, YES),
        PodView("b", True, True, True, YES),
        PodView("c", True, True, True, NO),
    ]
    assert plan(views) == [
        Action(ActionKind.CAPTURE, "a", YES.reason),
        Action(ActionKind.RELEASE, "c", NO.reason),
    ]
    # Reconciling a converged state plans nothing (idempotence).
    assert plan([PodView("a", True, True, True, YES), PodView("c", True, False, False, NO)]) == []


def test_redirection_value() -> None:
    assert redirection_value(captured=True, acked=True) == "enabled"
    assert redirection_value(captured=True, acked=False) == "pending"
    assert redirection_value(captured=False, acked=False) is None


@pytest.mark.parametrize(
    ("desired", "observed", "written", "expected"),
    [
        ({"p": "enabled"}, {"p": None}, {}, {"p": "enabled"}),
        ({"p": "enabled"}, {"p": "enabled"}, {}, {}),  # already there
        ({"p": "enabled"}, {"p": None}, {"p": "enabled"}, {}),  # written, not observed yet: no rewrite
        ({"p": "enabled"}, {"p": "pending"}, {"p": "pending"}, {"p": "enabled"}),  # a newer value
        ({"p": None}, {"p": "enabled"}, {}, {"p": None}),  # release removes it
        ({"p": None}, {}, {}, {}),  # nothing to remove
    ],
)
def test_annotation_writes(
    desired: dict[str, str | None],
    observed: dict[str, str | None],
    written: dict[str, str | None],
    expected: dict[str, str | None],
) -> None:
    assert annotation_writes(desired, observed, written) == expected


def test_retry_schedule_backs_off_boundedly() -> None:
    schedule: RetrySchedule[str] = RetrySchedule(RetryPolicy(initial=1.0, maximum=4.0))
    assert schedule.due("a", 0.0) and schedule.next_due() is None
    assert schedule.failed("a", 10.0) == 11.0
    assert not schedule.due("a", 10.5) and schedule.due("a", 11.0)
    assert schedule.failed("a", 11.0) == 13.0
    assert schedule.failed("a", 13.0) == 17.0
    assert schedule.failed("a", 17.0) == 21.0  # capped at 4 s
    assert schedule.failures("a") == 4
    schedule.failed("b", 0.0)
    assert schedule.next_due() == 1.0
    schedule.keep_only(["a"])
    assert schedule.next_due() == 21.0
    schedule.succeeded("a")
    assert schedule.due("a", 0.0) and schedule.next_due() is None


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="initial"):
        RetryPolicy(initial=0.0)
    with pytest.raises(ValueError, match="maximum"):
        RetryPolicy(initial=2.0, maximum=1.0)
    assert RetryPolicy(initial=0.5, maximum=3.0).delay(100) == 3.0
