"""Leases: a worker that stops leaves its jobs processing until the lease expires."""

from __future__ import annotations

import uuid


def test_a_job_with_a_live_lease_is_not_claimed_by_another_worker(queue) -> None:
    # Given a job leased to worker A
    queue.claimed("worker-a")
    before = queue.snapshot()

    # When worker B claims
    claimed = queue.claim_ids("worker-b")

    # Then it gets nothing and the job is still A's
    assert claimed == []
    assert queue.snapshot() == before


def test_an_expired_lease_hands_the_job_to_the_next_claim_with_the_attempt_counted(queue) -> None:
    # Given a job leased to worker A, which crashed: its lease has expired
    job_id = queue.claimed("worker-a")
    queue.expire_lease(job_id)

    # When worker B claims
    with queue.transaction():
        claimed = queue.claim("worker-b")
        now = queue.now()

    # Then B gets it as a rescue, as its second attempt
    assert [(c.id, c.attempt, c.rescued) for c in claimed] == [(job_id, 2, True)]
    job = queue.job(job_id)
    assert (job["status"], job["attempts"], job["locked_by"]) == ("processing", 2, "worker-b")
    # And the lost attempt is recorded like any failed attempt
    lost = "Lease expired during attempt 1 (worker worker-a stopped)"
    assert queue.history(job["errors"]) == [
        {"attempt": 1, "at": now, "error": lost, "status": None}
    ]
    assert job["last_error"] == lost


def test_a_rescue_keeps_the_claim_order_and_caps(queue) -> None:
    # Given a tenant with an expired job (old, urgent) and two pending ones
    tenant = uuid.uuid4()
    urgent = queue.enqueue(tenant, priority=5)
    queue.claim_ids(tenant_id=tenant)
    queue.expire_lease(urgent)
    pending = [queue.enqueue(tenant) for _ in range(2)]

    # When a worker claims one job of that tenant
    claimed = queue.claim(max_per_tenant=1)

    # Then the rescue competes like any due job: the urgent one comes first
    assert [(c.id, c.rescued) for c in claimed] == [(urgent, True)]
    assert [queue.status(p) for p in pending] == ["pending", "pending"]


def test_a_job_whose_lease_expired_during_its_last_attempt_is_dead_lettered_by_the_next_claim(
    queue,
) -> None:
    # Given a job on its last attempt (the first failed), leased to worker A, which crashed,
    # and a job that depends on it
    job_id = queue.enqueue(max_attempts=2)
    assert queue.claim_ids("worker-a") == [job_id]
    assert queue.fail(job_id, "worker-a", "HTTP 500") == "retry"
    queue.make_due(job_id)
    assert queue.claim_ids("worker-a") == [job_id]
    dependent = queue.enqueue(depends_on=[job_id])
    queue.expire_lease(job_id)

    # When worker B claims
    with queue.transaction():
        claimed = queue.claim_ids("worker-b")
        now = queue.now()

    # Then B does not get it: it is in the dead letter table, with both attempts recorded
    assert claimed == []
    assert not queue.in_queue(job_id)
    dead = queue.dead_letter(job_id)
    assert dead["reason"] == "Exhausted 2 attempts: the lease expired during the last one"
    assert dead["dead_at"] == now
    assert [e["attempt"] for e in dead["errors"]] == [1, 2]
    assert dead["errors"][1]["error"] == "Lease expired during attempt 2 (worker worker-a stopped)"
    assert dead["attempts"] == 2
    # And its dependent followed it in the same transaction
    assert queue.dead_letter(dependent)["reason"] == f"Dependency {job_id} failed"
    assert queue.dead_letter(dependent)["dead_at"] == now
    # And worker A's late completion is refused
    assert queue.complete(job_id, "worker-a") is False


def test_an_expired_last_attempt_of_another_tenant_is_left_to_that_tenants_claims(queue) -> None:
    # Given tenant A's job whose lease expired during its last attempt
    a = uuid.uuid4()
    job_id = queue.enqueue(a, max_attempts=1)
    queue.claim_ids(tenant_id=a)
    queue.expire_lease(job_id)

    # When a claim for tenant B runs, then A's job is untouched
    queue.claim_ids(tenant_id=uuid.uuid4())
    assert queue.status(job_id) == "processing"

    # When a claim for every tenant runs, then it is dead-lettered
    queue.claim_ids()
    assert queue.in_dead_letter(job_id)
