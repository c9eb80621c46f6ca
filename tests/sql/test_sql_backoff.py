"""queue_backoff(attempt, jitter): exponential, jittered, between a floor of 5 s and a cap of 1 h."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pg8000.native
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from handler.queue import connection
from tests.conftest import TEST_SEARCH_PATH

FLOOR, CAP = 5.0, 3600.0

attempts = st.integers(min_value=1, max_value=2**31 - 2)
small_attempts = st.integers(min_value=1, max_value=40)  # where the curve bends
jitters = st.floats(min_value=0.0, max_value=1.0)


@pytest.fixture(scope="module")
def session(database_url: str) -> Iterator[pg8000.native.Connection]:
    """One connection for every example (hypothesis runs many per test)."""
    conn = connection.connect(connection.parse_database_url(database_url))
    conn.run(TEST_SEARCH_PATH)
    yield conn
    conn.close()


def backoff(conn: pg8000.native.Connection, attempt: int, jitter: float) -> float:
    """The delay in seconds before the retry that follows failed attempt `attempt`."""
    return float(
        conn.run(
            "SELECT extract(epoch FROM queue_backoff(CAST(:a AS int), CAST(:j AS float8)))::float8",
            a=attempt,
            j=jitter,
        )[0][0]
    )


@settings(max_examples=150, deadline=None)
@given(attempt=attempts | small_attempts, jitter=jitters)
@example(attempt=1, jitter=5e-324)  # once failed: 0.5 * jitter underflowed
def test_the_backoff_is_never_below_the_floor_nor_above_the_cap(session, attempt, jitter) -> None:
    assert FLOOR <= backoff(session, attempt, jitter) <= CAP


@settings(max_examples=100, deadline=None)
@given(attempt=st.integers(min_value=-(2**31), max_value=2**31 - 1), jitter=st.floats())
def test_any_attempt_and_any_jitter_even_nan_or_infinite_stay_within_the_bounds(
    session, attempt, jitter
) -> None:
    assert FLOOR <= backoff(session, attempt, jitter) <= CAP


@settings(max_examples=150, deadline=None)
@given(attempt=attempts | small_attempts, jitter=jitters)
def test_for_a_fixed_jitter_the_backoff_never_decreases_with_the_attempt(
    session, attempt, jitter
) -> None:
    assert backoff(session, attempt, jitter) <= backoff(session, attempt + 1, jitter)


@settings(max_examples=100, deadline=None)
@given(attempt=attempts | small_attempts)
def test_the_expected_backoff_never_decreases_with_the_attempt(session, attempt) -> None:
    def expected(n: int) -> float:
        return (backoff(session, n, 0.0) + backoff(session, n, 1.0)) / 2

    assert backoff(session, attempt, 0.5) <= backoff(session, attempt + 1, 0.5)
    assert expected(attempt) <= expected(attempt + 1)
    assert expected(attempt) == pytest.approx(backoff(session, attempt, 0.5))


@pytest.mark.parametrize(
    ("attempt", "shortest", "longest"),
    [(1, 5, 10), (2, 10, 20), (3, 20, 40), (9, 1280, 2560), (10, 1800, 3600), (50, 1800, 3600)],
)
def test_the_documented_backoff_of_each_attempt(
    session, attempt: int, shortest: float, longest: float
) -> None:
    # base 10 s doubling per attempt, equal jitter (half fixed, half random), cap 1 hour
    assert (backoff(session, attempt, 0.0), backoff(session, attempt, 1.0)) == (shortest, longest)


@settings(max_examples=40, deadline=None)
@given(attempt=small_attempts)
def test_fail_job_schedules_the_retry_within_the_backoff_of_that_attempt(session, attempt) -> None:
    # Given a job on its attempt-th attempt (max_attempts is above it), in a transaction that is
    # rolled back afterwards, so that every example starts from the same table
    session.run("BEGIN")
    try:
        tenant = str(uuid.uuid4())
        job_id = session.run(
            "SELECT enqueue_job(CAST(:t AS uuid), 'ingest_slack', p_max_attempts => 100)",
            t=tenant,
        )[0][0]
        session.run("UPDATE queue_jobs SET attempts = :n WHERE id = :id", n=attempt - 1, id=job_id)
        claimed = session.run(
            "SELECT id, attempts FROM claim_jobs('worker-a', p_tenant_id => CAST(:t AS uuid))",
            t=tenant,
        )
        assert claimed == [[job_id, attempt]]

        # When it fails without a retry time
        assert session.run(
            "SELECT fail_job(:id, 'boom', p_worker_id => 'worker-a')", id=job_id
        ) == [["retry"]]

        # Then it is due within that attempt's backoff, and so within [now + 5 s, now + 1 h]
        delay = session.run(
            "SELECT scheduled_at - now() FROM queue_jobs WHERE id = :id", id=job_id
        )[0][0]
    finally:
        session.run("ROLLBACK")
    shortest, longest = backoff(session, attempt, 0.0), backoff(session, attempt, 1.0)
    assert timedelta(seconds=shortest) <= delay <= timedelta(seconds=longest)
    assert timedelta(seconds=FLOOR) <= delay <= timedelta(seconds=CAP)
