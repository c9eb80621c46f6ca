"""requeue_dead_letter(s) and cancel_job."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest


def _dead(
    queue, tenant: uuid.UUID | None = None, job_type: str = "ingest_slack", **kw
) -> uuid.UUID:
    """A job that failed twice and was then dead-lettered."""
    job_id = queue.enqueue(tenant or uuid.uuid4(), job_type, max_attempts=2, **kw)
    tenant_id = queue.job(job_id)["tenant_id"]
    for error in ("first", "second"):
        assert queue.claim_ids("worker-a", tenant_id=tenant_id) == [job_id]
        queue.fail(job_id, "worker-a", error)
        if queue.in_queue(job_id):
            queue.make_due(job_id)
    assert queue.in_dead_letter(job_id)
    return job_id


# requeue_dead_letter ----------------------------------------------------------------------------


def test_requeue_brings_the_same_job_back_pending_due_now_with_attempts_reset(queue) -> None:
    # Given a job dead-lettered after two failed attempts
    job_id = _dead(queue, payload={"p": 1}, priority=4)
    dead = queue.dead_letter(job_id)

    # When it is requeued
    with queue.transaction():
        requeued = queue.store.requeue_dead_letter(job_id)
        now = queue.now()

    # Then the same id is back in the queue: pending, due now, attempts 0, history kept
    assert requeued == job_id
    assert not queue.in_dead_letter(job_id)
    job = queue.job(job_id)
    assert (job["status"], job["scheduled_at"], job["attempts"]) == ("pending", now, 0)
    assert (job["payload"], job["priority"], job["max_attempts"]) == ({"p": 1}, 4, 2)
    assert job["errors"] == dead["errors"]
    assert len(job["errors"]) == 2
    assert job["last_error"] == "second"
    assert (job["locked_until"], job["locked_by"], job["completed_at"]) == (None, None, None)
    assert job["created_at"] == dead["created_at"]
    # And the next claim takes it as a first attempt
    assert [(c.id, c.attempt) for c in queue.claim()] == [(job_id, 1)]


@pytest.mark.parametrize("where", ["nowhere", "in the queue"])
def test_requeue_of_a_job_not_in_the_dead_letter_table_fails_clearly(queue, where: str) -> None:
    # Given a job id that is not in the dead letter table
    job_id = uuid.uuid4() if where == "nowhere" else queue.enqueue()

    # When it is requeued, then it fails clearly and changes nothing
    with queue.rejects("P0002", "is not in the dead letter table"):
        queue.store.requeue_dead_letter(job_id)


def test_requeue_of_a_job_whose_unique_key_is_taken_again_fails_clearly(queue) -> None:
    # Given a dead-lettered job with a unique key, and a new job holding that key now
    tenant = uuid.uuid4()
    job_id = _dead(queue, tenant, unique_key="sync:1")
    holder = queue.enqueue(tenant, unique_key="sync:1")

    # When the dead job is requeued, then it fails clearly, naming the key and its holder,
    # and the job stays in the dead letter table
    with queue.rejects("23505", f"unique key sync:1 is held by unfinished job {holder}"):
        queue.store.requeue_dead_letter(job_id)
    assert queue.in_dead_letter(job_id)


def test_a_requeued_job_takes_its_unique_key_again(queue) -> None:
    # Given a dead-lettered job with a unique key, requeued
    tenant = uuid.uuid4()
    job_id = _dead(queue, tenant, unique_key="sync:1")
    queue.store.requeue_dead_letter(job_id)

    # When the same key is enqueued again, then the requeued job is returned
    assert queue.enqueue(tenant, unique_key="sync:1") == job_id


# requeue_dead_letters ---------------------------------------------------------------------------


def test_requeue_dead_letters_requeues_what_the_filters_select_and_counts_it(queue) -> None:
    # Given dead letters of two tenants and two job types, one dead long ago
    a, b = uuid.uuid4(), uuid.uuid4()
    a_slack = [_dead(queue, a, "ingest_slack") for _ in range(3)]
    a_digest = _dead(queue, a, "generate_digest")
    b_slack = _dead(queue, b, "ingest_slack")
    queue.conn.run(
        "UPDATE queue_jobs_dead_letter SET dead_at = now() - interval '2 days'"
        " WHERE id = CAST(:id AS uuid)",
        id=str(a_slack[0]),
    )
    yesterday = queue.now() - timedelta(days=1)

    # When tenant A's slack jobs that died since yesterday are requeued
    count = queue.store.requeue_dead_letters(
        tenant_id=a, job_type="ingest_slack", dead_after=yesterday
    )

    # Then exactly those two are back, and the others are still dead letters
    assert count == 2
    assert [queue.in_queue(j) for j in a_slack] == [False, True, True]
    assert all(queue.in_dead_letter(j) for j in (a_slack[0], a_digest, b_slack))

    # When the rest are requeued with a limit of two, oldest first
    assert queue.store.requeue_dead_letters(limit=2) == 2
    assert queue.in_queue(a_slack[0])  # the oldest
    assert queue.count("queue_jobs_dead_letter") == 1
    # And without a limit, all that is left
    assert queue.store.requeue_dead_letters() == 1
    assert queue.count("queue_jobs_dead_letter") == 0


def test_requeue_dead_letters_leaves_a_job_whose_unique_key_is_taken_and_requeues_the_rest(
    queue,
) -> None:
    # Given two dead letters, one of whose unique key is held by a new job
    tenant = uuid.uuid4()
    blocked = _dead(queue, tenant, unique_key="k")
    free = _dead(queue, tenant)
    queue.enqueue(tenant, unique_key="k")

    # When all are requeued
    count = queue.store.requeue_dead_letters()

    # Then the free one is back, the blocked one stays where it was
    assert count == 1
    assert queue.in_queue(free)
    assert queue.in_dead_letter(blocked)


# cancel_job -------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["pending", "processing", "waiting"])
def test_cancel_job_cancels_an_unfinished_job(queue, state: str) -> None:
    # Given an unfinished job
    tenant = uuid.uuid4()
    blocker = queue.enqueue(tenant, scheduled_at=queue.now().replace(year=2999))
    job_id = queue.enqueue(tenant, depends_on=[blocker] if state == "waiting" else None)
    if state == "processing":
        assert queue.claim_ids("worker-a", tenant_id=tenant) == [job_id]
    assert queue.status(job_id) == state

    # When it is cancelled
    cancelled = queue.store.cancel(job_id)

    # Then it is cancelled, its lease (if any) cleared
    assert cancelled is True
    job = queue.job(job_id)
    assert (job["status"], job["locked_by"], job["locked_until"]) == ("cancelled", None, None)
    # And a worker that held it finds it gone; no claim takes it
    assert queue.complete(job_id, "worker-a") is False
    assert queue.claim_ids("worker-b") == []
    # And it no longer waits for anything
    assert queue.conn.run("SELECT count(*) FROM queue_job_dependencies")[0][0] == 0


@pytest.mark.parametrize("state", ["completed", "cancelled", "dead-lettered", "unknown"])
def test_cancel_job_of_a_finished_job_returns_false_and_changes_nothing(queue, state: str) -> None:
    # Given a finished job (or none)
    if state == "unknown":
        job_id = uuid.uuid4()
    elif state == "dead-lettered":
        job_id = _dead(queue)
    else:
        job_id = queue.enqueue()
        if state == "completed":
            queue.claim_ids("worker-a")
            assert queue.complete(job_id, "worker-a")
        else:
            assert queue.store.cancel(job_id)
    before = queue.snapshot()

    # When it is cancelled, then nothing happens
    assert queue.store.cancel(job_id) is False
    assert queue.snapshot() == before
