"""TimeBudget: how long a call may take and how long a lease lasts, from the invocation's
remaining time. Time is made deterministic by starting the budget in the past, not by waiting."""

from __future__ import annotations

import time

import pytest

from handler.batch.budget import (
    LEASE_MARGIN_SECONDS,
    MIN_CALL_SECONDS,
    MIN_SAFETY_MARGIN_SECONDS,
    SAFETY_MARGIN_FRACTION,
    TimeBudget,
)

# The few microseconds between building a budget and asking it: far below any value compared.
SLACK = 0.5


def budget_started_ago(seconds_ago: float, remaining_at_start: float) -> TimeBudget:
    return TimeBudget(remaining_at_start=remaining_at_start, started=time.monotonic() - seconds_ago)


def test_safety_margin_is_at_least_the_minimum() -> None:
    assert TimeBudget(remaining_at_start=10).safety_margin == MIN_SAFETY_MARGIN_SECONDS


def test_safety_margin_grows_with_a_long_invocation() -> None:
    budget = TimeBudget(remaining_at_start=900)

    assert budget.safety_margin == pytest.approx(900 * SAFETY_MARGIN_FRACTION)
    assert budget.safety_margin > MIN_SAFETY_MARGIN_SECONDS


def test_call_timeout_is_the_http_timeout_when_plenty_of_time_is_left() -> None:
    budget = budget_started_ago(0, remaining_at_start=900)

    assert budget.call_timeout(30.0) == 30.0


def test_call_timeout_is_capped_by_remaining_time_minus_the_margin() -> None:
    # 60 s at start, 50 s spent: 10 s left, 3 s of them kept back.
    budget = budget_started_ago(50, remaining_at_start=60)

    timeout = budget.call_timeout(30.0)

    assert timeout is not None
    assert 7.0 - SLACK < timeout <= 7.0


def test_call_timeout_never_reaches_past_the_send_deadline() -> None:
    budget = budget_started_ago(120, remaining_at_start=900)
    asked_at = time.monotonic()

    timeout = budget.call_timeout(10_000.0)

    assert timeout is not None
    assert asked_at + timeout <= budget.send_until
    assert timeout > budget.send_until - asked_at - SLACK


def test_no_call_starts_when_less_than_the_minimum_is_left() -> None:
    # 60 s at start, 56.5 s spent: 3.5 s left, 3 s kept back, 0.5 s usable < MIN_CALL_SECONDS.
    budget = budget_started_ago(56.5, remaining_at_start=60)

    assert budget.call_timeout(30.0) is None


def test_no_call_starts_inside_the_safety_margin() -> None:
    budget = budget_started_ago(58, remaining_at_start=60)

    assert budget.call_timeout(30.0) is None


def test_no_call_starts_after_the_deadline() -> None:
    budget = budget_started_ago(100, remaining_at_start=60)

    assert budget.call_timeout(30.0) is None
    assert budget.remaining() < 0


def test_a_call_starts_with_just_over_the_minimum_left() -> None:
    usable = MIN_CALL_SECONDS + 2 * SLACK
    budget = budget_started_ago(60 - MIN_SAFETY_MARGIN_SECONDS - usable, remaining_at_start=60)

    timeout = budget.call_timeout(30.0)

    assert timeout is not None
    assert MIN_CALL_SECONDS <= timeout <= usable


def test_lease_is_the_configured_value_when_set() -> None:
    assert TimeBudget(remaining_at_start=900).lease_seconds(45) == 45


def test_lease_defaults_to_remaining_time_plus_margin() -> None:
    assert TimeBudget(remaining_at_start=900).lease_seconds(None) == 900 + LEASE_MARGIN_SECONDS


def test_default_lease_rounds_the_remaining_time_up() -> None:
    assert TimeBudget(remaining_at_start=59.2).lease_seconds(None) == 60 + LEASE_MARGIN_SECONDS


def test_default_lease_outlives_the_invocation() -> None:
    budget = TimeBudget(remaining_at_start=12.5)

    assert budget.lease_seconds(None) > budget.remaining_at_start


def test_remaining_and_elapsed_follow_the_start() -> None:
    budget = budget_started_ago(20, remaining_at_start=60)

    assert 40 - SLACK < budget.remaining() <= 40
    assert 20_000 <= budget.elapsed_ms() < 20_000 + SLACK * 1000
