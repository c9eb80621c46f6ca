"""complete_job, fail_job and settle_jobs: what settling a job does, and only for its holder."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

# complete_job -----------------------------------------------------------------------------------


def test_the_holder_completes_its_job(queue) -> None:
    # Given a job leased to worker A
    job_id = queue.claimed("worker-a")

    # When A completes it
    with queue.transaction():
        done = queue.complete(job_id, "worker-a")
        now = queue.now()

    # Then the job is completed, its lease cleared
    assert done is True
    job = queue.job(job_id)
    assert (job["status"], job["attempts"], job["completed_at"]) == ("completed", 1, now)
    assert job["locked_until"] is None


@pytest.mark.parametrize("holder", ["worker-b", "nobody (pending)", "nobody (completed)"])
def test_complete_job_by_a_worker_that_does_not_hold_the_job_is_refused_and_changes_nothing(
    queue, holder: str
) -> None:
    # Given a job that worker A does not hold
    if holder == "worker-b":
        job_id = queue.claimed("worker-b")
    else:
        job_id = queue.enqueue()
        if holder == "nobody (completed)":
            queue.claim_ids("worker-a")
            assert queue.complete(job_id, "worker-a")
    before = queue.snapshot()

    # When A tries to complete it (or to fail it)
    done = queue.complete(job_id, "worker-a")
    failed = queue.fail(job_id, "worker-a")

    # Then both are refused and nothing changed
    assert (done, failed) == (False, "stale")
    assert queue.snapshot() == before


def test_settling_a_job_that_does_not_exist_is_refused(queue) -> None:
    # Given no such job
    missing = uuid.uuid4()

    # When it is completed or failed, then both are refused
    assert queue.complete(missing, "worker-a") is False
    assert queue.fail(missing, "worker-a") == "stale"
    assert queue.complete(missing, None) is False


def test_a_worker_still_holds_a_job_whose_lease_expired_while_nobody_claimed_it(queue) -> None:
    # Given worker A's job whose lease has expired, not claimed by anyone since
    job_id = queue.claimed("worker-a")
    queue.expire_lease(job_id)

    # When A completes it late, then it succeeds
    assert queue.complete(job_id, "worker-a") is True
    assert queue.status(job_id) == "completed"


def test_a_late_settlement_after_another_worker_claimed_the_job_is_stale(queue) -> None:
    # Given worker A's expired job, rescued by worker B
    job_id = queue.claimed("worker-a")
    queue.expire_lease(job_id)
    assert queue.claim_ids("worker-b") == [job_id]
    before = queue.snapshot()

    # When A fails it late, then it is stale and nothing changed
    assert queue.fail(job_id, "worker-a") == "stale"
    assert queue.snapshot() == before


def test_without_a_worker_id_complete_and_fail_skip_the_holder_check(queue) -> None:
    # Given two jobs leased to worker A
    first = queue.claimed("worker-a")
    second = queue.claimed("worker-a")

    # When an operator settles them without a worker id
    done = queue.complete(first, None)
    failed = queue.fail(second, None, "stopped by an operator")

    # Then both take effect
    assert (done, failed) == (True, "retry")
    assert (queue.status(first), queue.status(second)) == ("completed", "pending")


# fail_job ---------------------------------------------------------------------------------------


def test_a_retryable_failure_puts_the_job_back_at_retry_at_and_records_the_attempt(queue) -> None:
    # Given a job leased to worker A
    job_id = queue.claimed("worker-a")
    retry_at = queue.now() + timedelta(minutes=7)

    # When A fails it, asking for a retry at a given time
    with queue.transaction():
        result = queue.fail(job_id, "worker-a", "Function execution failed: 502", retry_at=retry_at)
        now = queue.now()

    # Then it is pending again at that time, its attempt and error recorded
    assert result == "retry"
    job = queue.job(job_id)
    assert (job["status"], job["attempts"], job["scheduled_at"]) == ("pending", 1, retry_at)
    assert (job["locked_until"], job["locked_by"]) == (None, None)
    assert job["last_error"] == "Function execution failed: 502"
    assert queue.history(job["errors"]) == [
        {"attempt": 1, "at": now, "error": "Function execution failed: 502", "status": None}
    ]
    assert set(job["errors"][0]) == {"attempt", "at", "error", "status"}


def test_a_retryable_failure_without_retry_at_waits_the_backoff_of_its_attempt(queue) -> None:
    # Given a job on its first attempt
    job_id = queue.claimed("worker-a")

    # When it fails without a retry time
    with queue.transaction():
        assert queue.fail(job_id, "worker-a") == "retry"
        now = queue.now()

    # Then it is due after the first backoff: 5 to 10 seconds
    delay = queue.job(job_id)["scheduled_at"] - now
    assert timedelta(seconds=5) <= delay <= timedelta(seconds=10)


def test_a_failure_of_the_last_attempt_moves_the_job_to_the_dead_letter_table(queue) -> None:
    # Given a job with two attempts, the first failed, the second leased to worker A
    job_id = queue.enqueue(max_attempts=2, payload={"p": 1}, unique_key="k")
    queue.claim_ids("worker-a")
    queue.fail(job_id, "worker-a", "first")
    queue.make_due(job_id)
    queue.claim_ids("worker-a")

    # When A fails it again
    with queue.transaction():
        result = queue.fail(job_id, "worker-a", "second")
        now = queue.now()

    # Then it has moved to the dead letter table, whole, with a reason and the time
    assert result == "dead"
    assert not queue.in_queue(job_id)
    dead = queue.dead_letter(job_id)
    assert dead["reason"] == "Exhausted 2 attempts: second"
    assert dead["dead_at"] == now
    assert (dead["payload"], dead["unique_key"], dead["attempts"]) == ({"p": 1}, "k", 2)
    assert dead["last_error"] == "second"
    assert [(e["attempt"], e["error"]) for e in dead["errors"]] == [(1, "first"), (2, "second")]


def test_the_move_to_the_dead_letter_table_is_part_of_the_failing_transaction(queue) -> None:
    # Given a job on its only attempt
    job_id = queue.claimed("worker-a", max_attempts=1)
    before = queue.snapshot()

    # When it fails in a transaction that is then rolled back
    queue.conn.run("BEGIN")
    assert queue.fail(job_id, "worker-a") == "dead"
    moved_inside = (queue.in_queue(job_id), queue.in_dead_letter(job_id))
    queue.conn.run("ROLLBACK")

    # Then inside it the job had moved (not copied), and after it nothing changed
    assert moved_inside == (False, True)
    assert queue.snapshot() == before


def test_a_failure_that_no_retry_can_fix_dead_letters_the_job_at_once(queue) -> None:
    # Given a job on its first of five attempts
    job_id = queue.claimed("worker-a")

    # When it fails as not retryable
    result = queue.fail(job_id, "worker-a", "Function rejected the job (422)", retryable=False)

    # Then it is dead-lettered with that error as the reason
    assert result == "dead"
    dead = queue.dead_letter(job_id)
    assert (dead["reason"], dead["attempts"]) == ("Function rejected the job (422)", 1)
    assert [e["error"] for e in dead["errors"]] == ["Function rejected the job (422)"]


# settle_jobs ------------------------------------------------------------------------------------


def test_settle_jobs_applies_every_outcome_of_a_batch(queue) -> None:
    # Given jobs leased to worker A; one of them had failed once before, with an error
    tenant = uuid.uuid4()
    names = ["completed", "failed", "dead", "rate_limited", "rate_limited_backoff", "released"]
    names += ["released_retry_at", "last"]
    jobs = {n: queue.enqueue(tenant, max_attempts=1 if n == "last" else 5) for n in names}
    queue.claim_ids("worker-a")
    queue.fail(jobs["released"], "worker-a", "earlier error", retry_at=queue.now())
    queue.claim_ids("worker-a")
    released_before = queue.job(jobs["released"])
    other = queue.claimed("worker-b")
    later = queue.now() + timedelta(minutes=30)

    def outcome(name: str, kind: str, attempt: int = 1, **extra: object) -> dict[str, object]:
        return {"id": jobs[name], "attempt": attempt, "outcome": kind, **extra}

    # When A settles the batch (and one job it does not hold)
    with queue.transaction():
        results = queue.settle(
            "worker-a",
            [
                outcome("completed", "completed"),
                outcome("failed", "failed", error="e500", status=500),
                outcome("dead", "dead", error="e422", status=422),
                outcome("rate_limited", "rate_limited", error="Rate limited by f", retry_at=later),
                outcome("rate_limited_backoff", "rate_limited", error="Rate limited by f"),
                outcome("released", "released", attempt=2),
                outcome("released_retry_at", "released", retry_at=later),
                outcome("last", "failed", error="e503"),
                {"id": other, "attempt": 1, "outcome": "completed"},
            ],
        )
        now = queue.now()

    # Then each job got its outcome
    assert results == {
        jobs["completed"]: "completed",
        jobs["failed"]: "retry",
        jobs["dead"]: "dead",
        jobs["rate_limited"]: "retry",
        jobs["rate_limited_backoff"]: "retry",
        jobs["released"]: "released",
        jobs["released_retry_at"]: "released",
        jobs["last"]: "dead",
        other: "stale",
    }
    assert queue.status(jobs["completed"]) == "completed"

    failed = queue.job(jobs["failed"])
    assert (failed["status"], failed["attempts"], failed["last_error"]) == ("pending", 1, "e500")
    assert queue.history(failed["errors"]) == [
        {"attempt": 1, "at": now, "error": "e500", "status": 500}
    ]

    dead = queue.dead_letter(jobs["dead"])
    assert (dead["reason"], dead["errors"][0]["status"]) == ("e422", 422)
    assert queue.dead_letter(jobs["last"])["reason"] == "Exhausted 1 attempts: e503"

    # A rate limit does not count the attempt and records no error entry
    limited = queue.job(jobs["rate_limited"])
    assert (limited["status"], limited["attempts"], limited["errors"]) == ("pending", 0, [])
    assert (limited["scheduled_at"], limited["last_error"]) == (later, "Rate limited by f")
    limited = queue.job(jobs["rate_limited_backoff"])
    assert (limited["attempts"], limited["errors"]) == (0, [])
    delay = limited["scheduled_at"] - now
    assert timedelta(seconds=5) <= delay <= timedelta(seconds=10)

    # A release gives the attempt back and leaves last_error and scheduled_at as they were
    released = queue.job(jobs["released"])
    assert (released["status"], released["attempts"]) == ("pending", 1)
    assert released["last_error"] == released_before["last_error"] == "earlier error"
    assert released["scheduled_at"] == released_before["scheduled_at"]
    assert released["errors"] == released_before["errors"]
    assert (released["locked_by"], released["locked_until"]) == (None, None)
    released = queue.job(jobs["released_retry_at"])
    assert (released["attempts"], released["scheduled_at"]) == (0, later)

    assert queue.job(other)["locked_by"] == "worker-b"


def test_a_settlement_for_an_earlier_attempt_is_stale(queue) -> None:
    # Given worker A's job whose lease expired and which A then claimed again (attempt 2)
    job_id = queue.claimed("worker-a")
    queue.expire_lease(job_id)
    assert queue.claim_ids("worker-a") == [job_id]
    before = queue.snapshot()

    # When a settlement for attempt 1 arrives, then it is stale and changes nothing
    assert queue.settle("worker-a", [{"id": job_id, "attempt": 1, "outcome": "completed"}]) == {
        job_id: "stale"
    }
    assert queue.snapshot() == before

    # When the settlement for attempt 2 arrives, then it applies
    assert queue.settle("worker-a", [{"id": job_id, "attempt": 2, "outcome": "completed"}]) == {
        job_id: "completed"
    }


@pytest.mark.parametrize(
    ("outcomes", "code", "words"),
    [
        pytest.param({"id": "x"}, "22023", "JSON array", id="object"),
        pytest.param("completed", "22023", "JSON array", id="string"),
        pytest.param(None, "22023", "JSON array", id="json null"),
        pytest.param([{"outcome": "completed"}], "22023", "needs an id", id="no id"),
        pytest.param([{"id": "{job}"}], "22023", "outcome", id="no outcome"),
        pytest.param([{"id": "{job}", "outcome": "done"}], "22023", "outcome", id="bad outcome"),
        pytest.param([{"id": "{job}", "outcome": None}], "22023", "outcome", id="null outcome"),
        pytest.param([42], "22023", "needs an id", id="element not an object"),
        pytest.param([{"id": "not-a-uuid", "outcome": "completed"}], "22P02", "uuid", id="id"),
        pytest.param(
            [{"id": "{job}", "attempt": "one", "outcome": "completed"}],
            "22P02",
            "integer",
            id="attempt",
        ),
        pytest.param(
            [{"id": "{job}", "outcome": "failed", "retry_at": "soon"}],
            "22007",
            "timestamp",
            id="retry_at",
        ),
    ],
)
def test_settle_jobs_rejects_a_malformed_batch_and_changes_nothing(
    queue, outcomes, code: str, words: str
) -> None:
    # Given a job leased to worker A, settled correctly in the same batch as a malformed outcome
    job_id = queue.claimed("worker-a")
    good = {"id": str(job_id), "attempt": 1, "outcome": "completed"}
    if isinstance(outcomes, list):
        outcomes = [good] + [
            {k: str(job_id) if v == "{job}" else v for k, v in o.items()}
            if isinstance(o, dict)
            else o
            for o in outcomes
        ]

    # When the batch is sent, then it fails clearly and nothing is settled
    with queue.rejects(code, words):
        queue.settle("worker-a", outcomes)


def test_settle_jobs_rejects_null_outcomes(queue) -> None:
    # Given a job leased to worker A
    queue.claimed("worker-a")

    # When settle_jobs gets SQL NULL, then it fails clearly and changes nothing
    with queue.rejects("22023", "JSON array"):
        queue.conn.run("SELECT * FROM settle_jobs('worker-a', NULL)")
