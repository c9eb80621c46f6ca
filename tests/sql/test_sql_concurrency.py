"""Concurrency: many workers, late settlements and racing transactions, on separate connections.

Interleavings are forced with explicit transactions: one connection takes a lock inside BEGIN,
the other runs its statement in a thread, the test waits until the server reports that statement
blocked on a lock (it polls pg_blocking_pids; it never sleeps), then lets the first one go on.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from handler.queue.store import Settlement
from tests.sql.conftest import wait_until_blocked


def _pid(session) -> int:
    return int(session.conn.run("SELECT pg_backend_pid()")[0][0])


def _wait_until_blocked(observer, pid: int) -> None:
    """Returns once backend `pid` waits for a lock that another session holds."""
    wait_until_blocked(observer.conn, pid)


def _blocked_call(
    pool: ThreadPoolExecutor, observer, session, call: Callable[[], Any]
) -> Future[Any]:
    """Starts `call` (a statement on `session`) in a thread; returns once it waits for a lock.

    A lock timeout keeps a failed test from hanging.
    """
    session.conn.run("SET lock_timeout = '20s'")
    pid = _pid(session)
    future = pool.submit(call)
    _wait_until_blocked(observer, pid)
    return future


@pytest.mark.slow
def test_eight_workers_claiming_at_once_get_each_of_5000_jobs_exactly_once(
    queue, other_queue
) -> None:
    # Given 5,000 due jobs of 20 tenants, and 8 workers, each with its own connection
    queue.conn.run(
        "SELECT enqueue_job(('00000000-0000-0000-0000-' || lpad((g % 20)::text, 12, '0'))::uuid,"
        " 'ingest_slack', jsonb_build_object('n', g)) FROM generate_series(1, 5000) g"
    )
    workers = 8
    start = threading.Barrier(workers)

    def work(n: int) -> list[uuid.UUID]:
        session, name, got = other_queue(), f"worker-{n}", []
        start.wait()
        while batch := session.claim(name, max_jobs=50, max_per_tenant=5):
            got += [job.id for job in batch]
            settled = session.store.settle(
                name, [Settlement(job.id, job.attempt, "completed") for job in batch]
            )
            assert settled == {"completed": len(batch)}
        return got

    # When they all claim (and complete) in batches until a claim comes back empty
    with ThreadPoolExecutor(workers) as pool:
        per_worker = list(pool.map(work, range(workers)))

    # Then every job was claimed by exactly one worker, exactly once, and none is left
    claimed = [job for jobs in per_worker for job in jobs]
    assert len(claimed) == len(set(claimed)) == 5000
    assert queue.conn.run("SELECT status, attempts, count(*) FROM queue_jobs GROUP BY 1, 2") == [
        ["completed", 1, 5000]
    ]
    assert sum(1 for jobs in per_worker if jobs) > 1, "the workers shared the work"


def test_a_late_complete_after_a_rescue_is_refused_and_the_rescuer_completes(
    queue, other_queue
) -> None:
    # Given worker A's job, whose lease expired, rescued by worker B
    a, b = other_queue(), other_queue()
    job_id = a.claimed("worker-a")
    a.expire_lease(job_id)
    assert [(c.id, c.rescued) for c in b.claim("worker-b")] == [(job_id, True)]

    # When A completes late, then it is refused; when B completes, then it succeeds
    assert a.complete(job_id, "worker-a") is False
    assert b.complete(job_id, "worker-b") is True

    # And the job was completed once, by B, on its second attempt
    job = queue.job(job_id)
    assert (job["status"], job["attempts"], job["locked_by"]) == ("completed", 2, "worker-b")


def test_a_late_complete_waiting_on_an_uncommitted_rescue_is_refused(queue, other_queue) -> None:
    # Given worker A's expired job, and worker B's rescue of it inside an open transaction
    a, b = other_queue(), other_queue()
    job_id = a.claimed("worker-a")
    a.expire_lease(job_id)
    b.conn.run("BEGIN")
    assert b.claim_ids("worker-b") == [job_id]

    with ThreadPoolExecutor(1) as pool:
        # When A's late complete runs, it waits for B's transaction
        late = _blocked_call(pool, queue, a, lambda: a.complete(job_id, "worker-a"))
        # And B commits
        b.conn.run("COMMIT")

        # Then A's complete is refused: the job is B's now
        assert late.result(timeout=30) is False
    assert (queue.status(job_id), queue.job(job_id)["locked_by"]) == ("processing", "worker-b")
    assert b.complete(job_id, "worker-b") is True


def test_a_rescue_skips_a_job_whose_late_complete_is_uncommitted_and_never_settles_it_twice(
    queue, other_queue
) -> None:
    # Given worker A's expired job, and A's late complete inside an open transaction
    a, b = other_queue(), other_queue()
    job_id = a.claimed("worker-a")
    a.expire_lease(job_id)
    a.conn.run("BEGIN")
    assert a.complete(job_id, "worker-a") is True

    # When worker B claims meanwhile, then it does not wait and does not get the job
    b.conn.run("SET lock_timeout = '5s'")
    assert b.claim_ids("worker-b") == []

    # When A commits, then the job is completed once, and no later claim takes it
    a.conn.run("COMMIT")
    assert b.claim_ids("worker-b") == []
    job = queue.job(job_id)
    assert (job["status"], job["attempts"], job["locked_by"]) == ("completed", 1, "worker-a")


def test_a_claim_skips_the_jobs_another_open_claim_holds_instead_of_waiting(
    queue, other_queue
) -> None:
    # Given 10 due jobs, 4 of them claimed by worker A in an open transaction
    a, b = other_queue(), other_queue()
    tenant = uuid.uuid4()
    jobs = {queue.enqueue(tenant) for _ in range(10)}
    a.conn.run("BEGIN")
    held = set(a.claim_ids("worker-a", max_jobs=4))

    # When worker B claims, then it gets the other 6 at once
    b.conn.run("SET lock_timeout = '5s'")
    assert set(b.claim_ids("worker-b")) == jobs - held
    a.conn.run("COMMIT")
    assert len(held) == 4


def test_an_open_claim_of_one_shard_does_not_hold_the_jobs_of_another_shard(
    queue, other_queue
) -> None:
    # Given due jobs of 20 tenants, and shard 0's claim inside an open transaction
    a, b = other_queue(), other_queue()
    tenants = [uuid.UUID(int=i * 7919 + 1) for i in range(20)]
    jobs = {queue.enqueue(t) for t in tenants for _ in range(2)}
    a.conn.run("BEGIN")
    shard0 = set(a.claim_ids("worker-a", shard=0, shards=2))

    # When shard 1 claims, then it gets every job shard 0 did not take
    b.conn.run("SET lock_timeout = '5s'")
    shard1 = set(b.claim_ids("worker-b", shard=1, shards=2))
    a.conn.run("COMMIT")
    assert shard0
    assert shard1
    assert shard0 | shard1 == jobs


@pytest.mark.parametrize("first_ends_with", ["COMMIT", "ROLLBACK"])
def test_two_enqueues_racing_on_a_unique_key_make_one_job(
    queue, other_queue, first_ends_with: str
) -> None:
    # Given an enqueue with a unique key inside an open transaction
    a, b = other_queue(), other_queue()
    tenant = uuid.uuid4()
    a.conn.run("BEGIN")
    first = a.enqueue(tenant, unique_key="k")

    with ThreadPoolExecutor(1) as pool:
        # When another session enqueues the same key, it waits for the first
        second = _blocked_call(pool, queue, b, lambda: b.enqueue(tenant, unique_key="k"))
        a.conn.run(first_ends_with)
        second_id = second.result(timeout=30)

    # Then it gets the first job if that committed, or makes its own if it rolled back
    assert (second_id == first) == (first_ends_with == "COMMIT")
    assert queue.count() == 1
    assert queue.status(second_id) == "pending"


def test_a_dependency_cancelled_while_a_dependent_is_being_enqueued_takes_it_along(
    queue, other_queue
) -> None:
    # Given job A, and an enqueue of C depending on A inside an open transaction
    a, b = other_queue(), other_queue()
    dependency = queue.enqueue()
    a.conn.run("BEGIN")
    dependent = a.enqueue(depends_on=[dependency])

    with ThreadPoolExecutor(1) as pool:
        # When A is cancelled meanwhile, the cancel waits for the enqueue
        cancel = _blocked_call(pool, queue, b, lambda: b.store.cancel(dependency))
        a.conn.run("COMMIT")
        assert cancel.result(timeout=30) is True

    # Then C, linked once the enqueue committed, is dead-lettered with A
    assert queue.dead_letter(dependent)["reason"] == f"Dependency {dependency} failed"


def test_an_enqueue_waiting_on_an_uncommitted_cancel_of_its_dependency_is_dead_lettered(
    queue, other_queue
) -> None:
    # Given job A, cancelled inside an open transaction
    a, b = other_queue(), other_queue()
    dependency = queue.enqueue()
    b.conn.run("BEGIN")
    assert b.store.cancel(dependency)

    with ThreadPoolExecutor(1) as pool:
        # When C is enqueued depending on A, the enqueue waits for the cancel
        enqueue = _blocked_call(pool, queue, a, lambda: a.enqueue(depends_on=[dependency]))
        b.conn.run("COMMIT")
        dependent = enqueue.result(timeout=30)

    # Then C sees A cancelled and goes straight to the dead letter table
    assert queue.dead_letter(dependent)["reason"] == f"Dependency {dependency} failed"


def test_a_dependency_completed_while_a_dependent_is_being_enqueued_releases_it(
    queue, other_queue
) -> None:
    # Given job A held by worker W, and an enqueue of C depending on A inside an open transaction
    a, b = other_queue(), other_queue()
    dependency = b.claimed("worker-w")
    a.conn.run("BEGIN")
    dependent = a.enqueue(depends_on=[dependency])

    with ThreadPoolExecutor(1) as pool:
        # When W completes A meanwhile, the completion waits for the enqueue
        complete = _blocked_call(pool, queue, b, lambda: b.complete(dependency, "worker-w"))
        a.conn.run("COMMIT")
        assert complete.result(timeout=30) is True

    # Then C does not wait forever: it is pending
    assert queue.status(dependent) == "pending"
