"""enqueue_job: new jobs, unique keys, and the input it refuses."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest


def test_enqueue_with_defaults_creates_a_pending_job_due_now(queue) -> None:
    # Given a tenant
    tenant = uuid.uuid4()

    # When it enqueues a job with only the required arguments
    with queue.transaction():
        job_id = queue.conn.run(
            "SELECT enqueue_job(CAST(:t AS uuid), 'ingest_slack')", t=str(tenant)
        )[0][0]
        now = queue.now()

    # Then the job is pending, due now, with the documented defaults and no history
    job = queue.job(job_id)
    assert job["tenant_id"] == tenant
    assert (job["status"], job["payload"], job["priority"]) == ("pending", {}, 0)
    assert (job["attempts"], job["max_attempts"]) == (0, 5)
    assert job["scheduled_at"] == now
    assert (job["locked_until"], job["locked_by"], job["last_error"]) == (None, None, None)
    assert job["errors"] == []
    assert job["completed_at"] is None


def test_enqueue_stores_what_it_is_given(queue) -> None:
    # Given a job scheduled for tomorrow, with a priority, a payload and a unique key
    tenant = uuid.uuid4()
    tomorrow = queue.now() + timedelta(days=1)

    # When it is enqueued
    job_id = queue.enqueue(
        tenant,
        "generate_digest",
        payload={"day": "2024-05-01", "nested": {"a": [1, 2]}},
        priority=7,
        scheduled_at=tomorrow,
        max_attempts=2,
        unique_key="digest:2024-05-01",
    )

    # Then every value is stored as given
    job = queue.job(job_id)
    assert job["job_type"] == "generate_digest"
    assert job["payload"] == {"day": "2024-05-01", "nested": {"a": [1, 2]}}
    assert (job["priority"], job["max_attempts"]) == (7, 2)
    assert job["scheduled_at"] == tomorrow
    assert job["unique_key"] == "digest:2024-05-01"
    assert job["status"] == "pending"


@pytest.mark.parametrize("first_state", ["pending", "processing", "waiting"])
def test_a_second_enqueue_with_a_taken_unique_key_returns_the_first_job_and_inserts_nothing(
    queue, first_state: str
) -> None:
    # Given an unfinished job holding a unique key
    tenant = uuid.uuid4()
    blocker = queue.enqueue(tenant, "ingest_slack")
    first = queue.enqueue(
        tenant,
        "ingest_slack",
        unique_key="sync:channel-1",
        depends_on=[blocker] if first_state == "waiting" else None,
    )
    if first_state == "processing":
        queue.claim_ids(tenant_id=tenant, max_per_tenant=2)
    assert queue.status(first) == first_state
    before = queue.snapshot()

    # When the same tenant enqueues again with the same key (and a different payload)
    second = queue.enqueue(tenant, "ingest_slack", payload={"x": 1}, unique_key="sync:channel-1")

    # Then it gets the first job's id and nothing was inserted or changed
    assert second == first
    assert queue.snapshot() == before


def test_the_same_unique_key_in_another_tenant_is_another_job(queue) -> None:
    # Given tenant A holds a unique key
    first = queue.enqueue(uuid.uuid4(), unique_key="k")

    # When tenant B uses the same key
    second = queue.enqueue(uuid.uuid4(), unique_key="k")

    # Then B gets a job of its own
    assert second != first
    assert queue.count() == 2


@pytest.mark.parametrize("finish", ["completed", "cancelled", "dead-lettered"])
def test_a_finished_job_frees_its_unique_key(queue, finish: str) -> None:
    # Given a job with a unique key that then finishes
    tenant = uuid.uuid4()
    first = queue.enqueue(tenant, unique_key="k")
    if finish == "cancelled":
        assert queue.store.cancel(first)
    else:
        assert queue.claim_ids(tenant_id=tenant) == [first]
        if finish == "completed":
            assert queue.complete(first, "worker-a")
        else:
            assert queue.fail(first, "worker-a", retryable=False) == "dead"

    # When the tenant enqueues with the same key again
    second = queue.enqueue(tenant, unique_key="k")

    # Then a new pending job is created
    assert second != first
    assert queue.status(second) == "pending"


# Bad input: a clear error, and nothing changes -----------------------------------------------

_GOOD = "gen_random_uuid(), 'ingest_slack'"


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        pytest.param("enqueue_job(NULL, 'ingest_slack')", "23502", "p_tenant_id", id="null tenant"),
        pytest.param("enqueue_job(gen_random_uuid(), NULL)", "23502", "p_job_type", id="null type"),
        pytest.param("enqueue_job(gen_random_uuid(), '')", "22023", "p_job_type", id="empty type"),
        pytest.param("enqueue_job(gen_random_uuid(), ' \t ')", "22023", "p_job_type", id="blank"),
        pytest.param(f"enqueue_job({_GOOD}, p_max_attempts => 0)", "22023", "p_max_attempts"),
        pytest.param(f"enqueue_job({_GOOD}, p_max_attempts => -3)", "22023", "p_max_attempts"),
        pytest.param(f"enqueue_job({_GOOD}, p_max_attempts => NULL)", "22023", "p_max_attempts"),
        pytest.param(f"enqueue_job({_GOOD}, '[1, 2]')", "22023", "JSON object", id="array"),
        pytest.param(f"enqueue_job({_GOOD}, '\"text\"')", "22023", "JSON object", id="string"),
        pytest.param(f"enqueue_job({_GOOD}, '42')", "22023", "JSON object", id="number"),
        pytest.param(f"enqueue_job({_GOOD}, 'null')", "22023", "JSON object", id="json null"),
        pytest.param(f"enqueue_job({_GOOD}, NULL)", "22023", "JSON object", id="sql null"),
        pytest.param(
            f"enqueue_job({_GOOD}, p_depends_on => ARRAY[gen_random_uuid()])",
            "23503",
            "does not exist",
            id="missing dependency",
        ),
    ],
)
def test_enqueue_rejects_bad_input_and_changes_nothing(
    queue, call: str, code: str, words: str
) -> None:
    # Given a queue with a job in it
    queue.enqueue()

    # When a bad enqueue is sent, then it fails clearly and changes nothing
    with queue.rejects(code, words):
        queue.conn.run(f"SELECT {call}")


def test_enqueue_with_one_missing_dependency_among_real_ones_inserts_nothing(queue) -> None:
    # Given an existing job
    real = queue.enqueue()
    missing = uuid.uuid4()

    # When a job is enqueued depending on it and on a job that does not exist
    # Then the error names the missing one; no job and no dependency link were added
    with queue.rejects("23503", str(missing)):
        queue.enqueue(depends_on=[real, missing])
