"""Ten invocations at once over 5,000 jobs: every job is sent exactly once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pg8000.native
import pytest

from handler.batch.runner import Summary
from handler.local.standin import StandIn
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker

from .accounting import account, enqueue_many, sent

INVOCATIONS = 10
TENANTS = 10
JOBS_PER_TENANT = 500
PER_TENANT_CAP = 100
DRAIN_BATCHES = 10


def invoke_all_at_once(workers: list[Worker], name: str) -> list[Summary]:
    """Runs one invocation on each worker, all starting at the same moment; their summaries
    (fails the test if any raised)."""
    start = threading.Barrier(len(workers))
    summaries: list[Summary | BaseException] = [RuntimeError("did not run")] * len(workers)

    def invoke(n: int) -> None:
        try:
            start.wait()
            summaries[n], _ = workers[n].run(
                parse_event({}), remaining_seconds=120, request_id=f"{name}-{n}"
            )
        except BaseException as exc:
            summaries[n] = exc

    threads = [threading.Thread(target=invoke, args=(n,)) for n in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [s for s in summaries if not isinstance(s, Summary)]
    assert failed == []
    return [s for s in summaries if isinstance(s, Summary)]


@pytest.mark.slow
def test_ten_invocations_at_once_send_each_job_exactly_once(
    conn: pg8000.native.Connection, standin: StandIn, make_worker: Callable[..., Worker]
) -> None:
    jobs = [
        job
        for _ in range(TENANTS)
        for job in enqueue_many(conn, uuid.uuid4(), "process_embeddings", JOBS_PER_TENANT)
    ]
    # The idempotency store is off: with it on, a job claimed twice could be answered from its
    # record instead of being sent again, and the count of calls would hide the double claim.
    # (It would also take 8 connections per invocation: 90 in all, a whole default server.)
    env = {"max_jobs_per_tenant": str(PER_TENANT_CAP), "idempotency_store": "off"}
    workers = [make_worker(**env) for _ in range(INVOCATIONS)]

    # When 10 invocations start at the same moment
    concurrent = invoke_all_at_once(workers, "invocation")
    # (more than one of them took jobs: one batch takes 1,000 at most)
    assert sum(s.claimed for s in concurrent) > TENANTS * PER_TENANT_CAP
    for summary in concurrent:
        assert summary.claimed <= TENANTS * PER_TENANT_CAP
        assert summary.completed == summary.claimed
        assert (summary.rescued, summary.stale, summary.unsettled) == (0, 0, 0)

    # ... and then batches drain what is left
    drained = []
    for _ in range(DRAIN_BATCHES):
        summary, _ = workers[0].run(parse_event({}), remaining_seconds=120, request_id="drain")
        if summary.claimed == 0:
            break
        drained.append(summary)
    else:
        pytest.fail(f"{DRAIN_BATCHES} batches did not drain the queue")

    # Then every job was claimed once, sent once and completed
    claimed = sum(s.claimed for s in concurrent) + sum(s.claimed for s in drained)
    assert claimed == len(jobs)
    assert all(s.completed == s.claimed for s in drained)
    assert account(conn, jobs) == {"completed": len(jobs)}
    assert sent(standin) == dict.fromkeys(jobs, 1)


@pytest.mark.slow
def test_ten_invocations_in_rounds_at_once_send_each_job_exactly_once(
    conn: pg8000.native.Connection, standin: StandIn, make_worker: Callable[..., Worker]
) -> None:
    jobs = [
        job
        for _ in range(TENANTS)
        for job in enqueue_many(conn, uuid.uuid4(), "process_embeddings", JOBS_PER_TENANT)
    ]
    env = {
        "max_jobs_per_tenant": str(PER_TENANT_CAP),
        "idempotency_store": "off",
        "run_mode": "rounds",
        "max_concurrency": "20",
    }
    workers = [make_worker(**env) for _ in range(INVOCATIONS)]

    # When 10 invocations in rounds start at the same moment (each runs until nothing is due)
    done = invoke_all_at_once(workers, "rounds")

    # (a job may be released unsent, due a second later, when a function's adaptive limit fell
    # under the load of ten invocations and its queue in one of them overflowed: those are
    # made due now, as if that second had passed, and one more invocation takes them)
    released = sum(s.released for s in done)
    if released:
        conn.run("UPDATE queue_worker.queue_jobs SET scheduled_at = now() WHERE status = 'pending'")
        done.append(workers[0].run(parse_event({}), remaining_seconds=120, request_id="drain")[0])

    # Then they shared the work, and every job was sent once and completed; a job was claimed
    # twice only when it had been released unsent in between
    assert sum(1 for s in done if s.claimed) > 1
    assert sum(s.claimed for s in done) - sum(s.released for s in done) == len(jobs)
    for summary in done:
        assert summary.completed + summary.released == summary.claimed
        assert (summary.rescued, summary.stale, summary.unsettled) == (0, 0, 0)
    assert account(conn, jobs) == {"completed": len(jobs)}
    assert sent(standin) == dict.fromkeys(jobs, 1)
