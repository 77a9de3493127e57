"""``set_condition`` moves lastTransitionTime only on a status flip and never mutates its input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_operator.api import conditions as c

pytestmark = pytest.mark.timeout(10)

T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5, microseconds=123)


def _cond(type_: c.ConditionType, status: c.ConditionStatus, reason: c.Reason, at: datetime) -> c.Condition:
    return c.Condition(
        type=type_.value, status=status, reason=reason.value, message="m", last_transition_time=at
    )


READY_FALSE = _cond(c.ConditionType.READY, c.ConditionStatus.FALSE, c.Reason.ENGINES_NOT_READY, T0)
DEGRADED_FALSE = _cond(c.ConditionType.DEGRADED, c.ConditionStatus.FALSE, c.Reason.AS_EXPECTED, T0)


@pytest.mark.parametrize(
    ("name", "before", "type_", "status", "reason", "expected_time"),
    [
        (
            "new condition stamped now",
            [],
            c.ConditionType.READY,
            c.ConditionStatus.TRUE,
            c.Reason.ALL_READY,
            T1,
        ),
        (
            "flip moves the time",
            [READY_FALSE],
            c.ConditionType.READY,
            c.ConditionStatus.TRUE,
            c.Reason.ALL_READY,
            T1,
        ),
        (
            "same status keeps the time",
            [READY_FALSE],
            c.ConditionType.READY,
            c.ConditionStatus.FALSE,
            c.Reason.SCHEDULER_NOT_READY,
            T0,
        ),
        (
            "unknown to false is a flip",
            [_cond(c.ConditionType.READY, c.ConditionStatus.UNKNOWN, c.Reason.PENDING, T0)],
            c.ConditionType.READY,
            c.ConditionStatus.FALSE,
            c.Reason.ENGINES_NOT_READY,
            T1,
        ),
        (
            "other types do not count",
            [DEGRADED_FALSE],
            c.ConditionType.READY,
            c.ConditionStatus.FALSE,
            c.Reason.ENGINES_NOT_READY,
            T1,
        ),
    ],
)
def test_last_transition_time_moves_only_on_flip(
    name: str,
    before: list[c.Condition],
    type_: c.ConditionType,
    status: c.ConditionStatus,
    reason: c.Reason,
    expected_time: datetime,
) -> None:
    after = c.set_condition(before, type_, status, reason, "new message", T1, observed_generation=7)
    got = c.find_condition(after, type_)
    assert got is not None, name
    assert got.last_transition_time == expected_time.replace(microsecond=0), name
    assert (got.status, got.reason, got.message, got.observed_generation) == (
        status,
        reason.value,
        "new message",
        7,
    )


def test_input_is_not_modified_and_order_is_kept() -> None:
    before = [DEGRADED_FALSE, READY_FALSE]
    snapshot = list(before)
    after = c.set_condition(before, c.ConditionType.READY, c.ConditionStatus.TRUE, c.Reason.ALL_READY, "", T1)
    assert before == snapshot
    assert [x.type for x in after] == ["Degraded", "Ready"]
    assert after[0] is DEGRADED_FALSE


def test_new_conditions_are_appended() -> None:
    after = c.set_condition(
        [READY_FALSE], c.ConditionType.RDMA_READY, c.ConditionStatus.TRUE, c.Reason.NICS_ALLOCATED, "", T1
    )
    assert [x.type for x in after] == ["Ready", "RDMAReady"]


def test_setting_the_same_condition_twice_is_idempotent() -> None:
    once = c.set_condition([], c.ConditionType.READY, c.ConditionStatus.TRUE, c.Reason.ALL_READY, "ok", T0)
    twice = c.set_condition(once, c.ConditionType.READY, c.ConditionStatus.TRUE, c.Reason.ALL_READY, "ok", T1)
    assert twice == once


def test_time_is_stored_in_utc_whole_seconds() -> None:
    plus_two = datetime(2026, 11, 28, 14, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=2)))
    got = c.set_condition(
        [], c.ConditionType.READY, c.ConditionStatus.TRUE, c.Reason.ALL_READY, "", plus_two
    )[0]
    assert got.last_transition_time == datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    assert got.model_dump(mode="json", by_alias=True)["lastTransitionTime"] == "2026-11-28T12:00:00Z"


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        c.set_condition(
            [], c.ConditionType.READY, c.ConditionStatus.TRUE, c.Reason.ALL_READY, "", datetime(2026, 1, 1)
        )


def test_is_true() -> None:
    conds = c.set_condition(
        [READY_FALSE], c.ConditionType.DEGRADED, c.ConditionStatus.TRUE, c.Reason.UNSCHEDULABLE, "", T1
    )
    assert c.is_true(conds, c.ConditionType.DEGRADED)
    assert not c.is_true(conds, c.ConditionType.READY)
    assert not c.is_true(conds, c.ConditionType.REBALANCING)


def test_every_reason_is_upper_camel_case() -> None:
    import re

    from dualpath_operator.api.v1alpha1 import common

    for reason in c.Reason:
        assert re.fullmatch(common.REASON_PATTERN, reason.value) and reason.value[0].isupper(), reason


_STATUSES = st.sampled_from(list(c.ConditionStatus))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_STATUSES, st.integers(min_value=0, max_value=10**6)), min_size=1, max_size=30))
def test_transition_time_is_the_time_of_the_last_flip(steps: list[tuple[c.ConditionStatus, int]]) -> None:
    """Over any sequence of updates, lastTransitionTime is when the current status was first set."""
    conds: list[c.Condition] = []
    now = T0
    flipped_at = T0
    previous: c.ConditionStatus | None = None
    for status, advance_s in steps:
        now = now + timedelta(seconds=advance_s)
        if status is not previous:
            flipped_at = now
        previous = status
        conds = c.set_condition(conds, c.ConditionType.READY, status, c.Reason.PENDING, "", now)
        (only,) = conds
        assert only.last_transition_time == flipped_at
