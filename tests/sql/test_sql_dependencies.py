"""Dependencies: a job waits for the jobs it depends on, and dies with them."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest


def _links(queue) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """(depends_on, job_id) rows of queue_job_dependencies."""
    rows = queue.conn.run("SELECT depends_on, job_id FROM queue_job_dependencies")
    return {(d, j) for d, j in rows}


def _run_to_completion(queue, job_id: uuid.UUID) -> None:
    """Claims and completes one job; the tenant's other jobs it claimed go back untouched."""
    claimed = queue.claim("runner", tenant_id=queue.job(job_id)["tenant_id"])
    assert job_id in [c.id for c in claimed]
    assert queue.complete(job_id, "runner")
    others = [{"id": c.id, "outcome": "released"} for c in claimed if c.id != job_id]
    if others:
        queue.settle("runner", others)


def test_a_job_is_not_claimed_until_every_dependency_has_completed(queue) -> None:
    # Given a job that depends on two others
    tenant = uuid.uuid4()
    a, b = queue.enqueue(tenant), queue.enqueue(tenant)
    c = queue.enqueue(tenant, depends_on=[a, b])
    assert (queue.status(c), queue.job(c)["waiting_on"]) == ("waiting", 2)

    # When workers claim, then only the dependencies are taken
    assert set(queue.claim_ids("worker-a")) == {a, b}

    # When the first dependency completes, then the job still waits
    assert queue.complete(a, "worker-a")
    assert (queue.status(c), queue.job(c)["waiting_on"]) == ("waiting", 1)
    assert queue.claim_ids("worker-a") == []

    # When the second completes, then the job is pending and the next claim takes it
    assert queue.complete(b, "worker-a")
    assert queue.status(c) == "pending"
    assert queue.claim_ids("worker-a") == [c]
    assert _links(queue) == set()


def test_a_released_dependent_keeps_its_own_later_scheduled_at(queue) -> None:
    # Given a job scheduled for tomorrow that depends on a job due now
    a = queue.enqueue()
    tomorrow = queue.now() + timedelta(days=1)
    c = queue.enqueue(depends_on=[a], scheduled_at=tomorrow)

    # When the dependency completes
    _run_to_completion(queue, a)

    # Then the job is pending, but not due before its own time
    assert (queue.status(c), queue.job(c)["scheduled_at"]) == ("pending", tomorrow)
    assert queue.claim_ids() == []


def test_enqueue_depending_on_a_completed_job_is_pending_at_once(queue) -> None:
    # Given a completed job
    a = queue.enqueue()
    _run_to_completion(queue, a)

    # When a job is enqueued that depends on it
    c = queue.enqueue(depends_on=[a])

    # Then it is pending: nothing to wait for
    assert (queue.status(c), queue.job(c)["waiting_on"]) == ("pending", 0)
    assert _links(queue) == set()


@pytest.mark.parametrize("how", ["dead-lettered", "cancelled"])
def test_a_failed_dependency_dead_letters_its_dependents_transitively(queue, how: str) -> None:
    # Given a chain c -> b -> a (c depends on b, b on a), and d, which depends on a and on x
    tenant = uuid.uuid4()
    a, x = queue.enqueue(tenant), queue.enqueue(tenant)
    b = queue.enqueue(tenant, depends_on=[a])
    c = queue.enqueue(tenant, depends_on=[b])
    d = queue.enqueue(tenant, depends_on=[a, x])
    bystander = queue.enqueue(tenant, depends_on=[x])

    # When a is dead-lettered (or cancelled)
    with queue.transaction():
        if how == "cancelled":
            assert queue.store.cancel(a)
        else:
            assert queue.claim_ids(tenant_id=tenant, max_per_tenant=1) == [a]
            assert queue.fail(a, "worker-a", retryable=False) == "dead"
        now = queue.now()

    # Then its dependents, and theirs, are dead-lettered in the same transaction, each with
    # the reason naming the dependency it waited for
    assert queue.dead_letter(b)["reason"] == f"Dependency {a} failed"
    assert queue.dead_letter(c)["reason"] == f"Dependency {b} failed"
    assert queue.dead_letter(d)["reason"] == f"Dependency {a} failed"
    assert {queue.dead_letter(j)["dead_at"] for j in (b, c, d)} == {now}
    assert not any(queue.in_queue(j) for j in (b, c, d))
    # And jobs that depend only on healthy jobs still wait; no link of a dead job is left over
    assert queue.status(bystander) == "waiting"
    assert _links(queue) == {(x, bystander)}


@pytest.mark.parametrize("how", ["dead-lettered", "cancelled"])
def test_enqueue_depending_on_a_failed_job_is_dead_lettered_at_once(queue, how: str) -> None:
    # Given a job that was dead-lettered (or cancelled), and a healthy one
    tenant = uuid.uuid4()
    a, ok = queue.enqueue(tenant), queue.enqueue(tenant)
    if how == "cancelled":
        assert queue.store.cancel(a)
    else:
        queue.claim_ids(tenant_id=tenant, max_per_tenant=1)
        assert queue.fail(a, "worker-a", retryable=False) == "dead"

    # When a job is enqueued that depends on both
    c = queue.enqueue(tenant, depends_on=[ok, a])

    # Then it goes straight to the dead letter table, naming the failed dependency
    assert not queue.in_queue(c)
    assert queue.dead_letter(c)["reason"] == f"Dependency {a} failed"
    assert _links(queue) == set()


def test_a_dependent_dead_lettered_by_one_dependency_can_be_requeued_and_waits_again(
    queue,
) -> None:
    # Given c depending on a and b; a was dead-lettered, which dead-lettered c
    tenant = uuid.uuid4()
    a, b = queue.enqueue(tenant, priority=1), queue.enqueue(tenant)
    c = queue.enqueue(tenant, depends_on=[a, b])
    queue.claim_ids(tenant_id=tenant, max_per_tenant=1)
    assert queue.fail(a, "worker-a", retryable=False) == "dead"
    assert queue.in_dead_letter(c)

    # When both are requeued (a first)
    queue.store.requeue_dead_letter(a)
    queue.store.requeue_dead_letter(c)

    # Then c waits for a and b again
    assert (queue.status(c), queue.job(c)["waiting_on"]) == ("waiting", 2)
    assert _links(queue) == {(a, c), (b, c)}
    # And runs once both have completed
    _run_to_completion(queue, a)
    _run_to_completion(queue, b)
    assert queue.claim_ids() == [c]


def test_a_requeued_job_waits_for_a_dependency_still_in_the_dead_letter_table(queue) -> None:
    # Given c depending on a; a was dead-lettered, and c with it
    a = queue.enqueue()
    c = queue.enqueue(depends_on=[a])
    queue.claim_ids()
    assert queue.fail(a, "worker-a", retryable=False) == "dead"

    # When c alone is requeued
    queue.store.requeue_dead_letter(c)

    # Then c waits (a has not completed): no claim takes it
    assert queue.status(c) == "waiting"
    assert queue.claim_ids() == []

    # When a is requeued too and completes, then c runs
    queue.store.requeue_dead_letter(a)
    _run_to_completion(queue, a)
    assert queue.claim_ids() == [c]


def test_a_requeued_job_follows_its_requeued_dependency_if_that_fails_again(queue) -> None:
    # Given c and a requeued after a was dead-lettered
    a = queue.enqueue()
    c = queue.enqueue(depends_on=[a])
    queue.claim_ids()
    queue.fail(a, "worker-a", retryable=False)
    queue.store.requeue_dead_letter(c)
    queue.store.requeue_dead_letter(a)

    # When a fails for good again
    queue.claim_ids()
    assert queue.fail(a, "worker-a", retryable=False) == "dead"

    # Then c is dead-lettered again
    assert queue.dead_letter(c)["reason"] == f"Dependency {a} failed"


def test_requeue_of_a_job_whose_dependency_was_cancelled_is_refused(queue) -> None:
    # Given c, dead-lettered because its dependency a was cancelled
    a = queue.enqueue()
    c = queue.enqueue(depends_on=[a])
    assert queue.store.cancel(a)
    assert queue.in_dead_letter(c)

    # When c is requeued, then the requeue fails clearly (a can never complete): nothing changes
    with queue.rejects("23503", f"dependency {a} of job {c} was cancelled"):
        queue.store.requeue_dead_letter(c)


@pytest.mark.parametrize("where", ["queue", "dead letter table"])
def test_a_job_may_not_depend_on_another_tenants_job(queue, where: str) -> None:
    # Given a job of tenant B (live, or dead-lettered)
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    other = queue.enqueue(tenant_b)
    if where == "dead letter table":
        queue.claim_ids(tenant_id=tenant_b)
        queue.fail(other, "worker-a", retryable=False)
        assert queue.in_dead_letter(other)
    own = queue.enqueue(tenant_a)

    # When tenant A enqueues a job depending on it (among its own), then it is refused as if the
    # job did not exist, and nothing is inserted
    with queue.rejects("23503", f"dependency {other} does not exist for this tenant"):
        queue.enqueue(tenant_a, depends_on=[own, other])
