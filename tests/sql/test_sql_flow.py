"""Flow control in the claim (migration 0006): rounds, checks of expired last attempts, weighted
fair shares, tenant and function rate limits, the tenants' next due times, lingering.

Time is never waited for: a bucket "refills" by moving its refilled_at into the past.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from tests.sql.conftest import Queue


def claim(queue: Queue, worker: str = "w", **kw: Any) -> list[Any]:
    kw.setdefault("lease_seconds", 60)
    kw.setdefault("max_jobs", 1000)
    kw.setdefault("max_per_tenant", 1000)
    return queue.store.claim(worker, **kw)


def enqueue_many(queue: Queue, tenant: uuid.UUID, n: int, job_type: str = "ingest_slack") -> None:
    queue.conn.run(
        "SELECT enqueue_job(CAST(:t AS uuid), :type, jsonb_build_object('n', g))"
        " FROM generate_series(1, :n) g",
        t=str(tenant),
        type=job_type,
        n=n,
    )


def complete_all(queue: Queue, worker: str, jobs: list[Any]) -> None:
    queue.settle(
        worker, [{"id": str(j.id), "attempt": j.attempt, "outcome": "completed"} for j in jobs]
    )


# Rounds ---------------------------------------------------------------------------------------


def test_a_claim_repeated_with_the_same_round_returns_the_same_jobs_and_takes_no_more(
    queue: Queue,
) -> None:
    tenant = uuid.uuid4()
    enqueue_many(queue, tenant, 10)
    first = claim(queue, "w", max_jobs=4, claim_round=7)
    again = claim(queue, "w", max_jobs=4, claim_round=7)
    assert {j.id for j in again} == {j.id for j in first}
    assert len(first) == 4
    assert queue.count() == 10
    [[processing]] = queue.conn.run("SELECT count(*) FROM queue_jobs WHERE status = 'processing'")
    assert processing == 4
    # the next round takes new ones
    nxt = claim(queue, "w", max_jobs=4, claim_round=8)
    assert not {j.id for j in nxt} & {j.id for j in first}


# Expired last attempts, checked ---------------------------------------------------------------


def exhausted_job(queue: Queue) -> uuid.UUID:
    job_id = queue.enqueue(uuid.uuid4(), max_attempts=1)
    assert [j.id for j in claim(queue, "dead-worker")] == [job_id]
    queue.expire_lease(job_id)
    return job_id


def test_with_defer_exhausted_an_expired_last_attempt_is_leased_for_a_check_not_dead_lettered(
    queue: Queue,
) -> None:
    job_id = exhausted_job(queue)
    [job] = claim(queue, "checker", defer_exhausted=True)
    assert (job.id, job.exhausted, job.attempt) == (job_id, True, 1)
    row = queue.job(job_id)
    assert (row["status"], row["locked_by"], row["attempts"]) == ("processing", "checker", 1)
    assert row["last_error"] == "Lease expired during attempt 1 (worker dead-worker stopped)"


@pytest.mark.parametrize(
    ("answer", "where", "result"),
    [
        ("completed", "completed", "completed"),
        ("expired", "dead", "dead"),
        ("deferred", "processing", "released"),
    ],
)
def test_the_answer_to_a_check_completes_dead_letters_or_defers_the_job(
    queue: Queue, answer: str, where: str, result: str
) -> None:
    job_id = exhausted_job(queue)
    [job] = claim(queue, "checker", defer_exhausted=True)
    later = queue.now().isoformat()
    outcome = {"id": str(job_id), "attempt": job.attempt, "outcome": answer, "retry_at": later}
    assert queue.settle("checker", [outcome]) == {job_id: result}
    if where == "dead":
        dead = queue.dead_letter(job_id)
        assert dead["reason"] == "Exhausted 1 attempts: the lease expired during the last one"
        assert [e["error"] for e in dead["errors"]] == [
            "Lease expired during attempt 1 (worker dead-worker stopped)"
        ]
    else:
        assert queue.status(job_id) == where
    if answer == "deferred":  # the next check asks again once retry_at has passed
        queue.expire_lease(job_id)
        assert [j.id for j in claim(queue, "checker-2", defer_exhausted=True)] == [job_id]


def test_deferred_and_expired_answer_only_a_check(queue: Queue) -> None:
    tenant = uuid.uuid4()
    job_id = queue.enqueue(tenant)
    [job] = claim(queue, "w")
    for answer in ("deferred", "expired"):
        outcome = {"id": str(job_id), "attempt": job.attempt, "outcome": answer}
        assert queue.settle("w", [outcome]) == {job_id: "stale"}
    assert queue.status(job_id) == "processing"


# Weighted fair shares ---------------------------------------------------------------------------


def test_weights_1_and_3_share_claims_25_and_75_percent(queue: Queue) -> None:
    light, heavy = uuid.uuid4(), uuid.uuid4()
    queue.store.set_tenant_limits(heavy, weight=3)
    enqueue_many(queue, light, 1000)
    enqueue_many(queue, heavy, 1000)
    shares: Counter[uuid.UUID] = Counter()
    for n in range(40):  # claims of 20 jobs (smaller than either tenant's cap)
        jobs = claim(queue, f"w{n}", max_jobs=20, max_per_tenant=10)
        shares.update(j.tenant_id for j in jobs)
        complete_all(queue, f"w{n}", jobs)
    total = shares[light] + shares[heavy]
    assert total == 800
    assert abs(shares[heavy] / total - 0.75) <= 0.05, shares


def test_with_equal_weights_each_tenant_takes_its_cap_and_a_larger_weight_takes_more(
    queue: Queue,
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    enqueue_many(queue, a, 100)
    enqueue_many(queue, b, 100)
    counts = Counter(j.tenant_id for j in claim(queue, max_per_tenant=10))
    assert counts == {a: 10, b: 10}
    queue.conn.run("UPDATE queue_jobs SET status = 'pending', locked_by = NULL, attempts = 0")
    queue.store.set_tenant_limits(b, weight=2.5)
    counts = Counter(j.tenant_id for j in claim(queue, "w2", max_per_tenant=10))
    assert counts == {a: 10, b: 25}


def test_a_large_backlog_never_delays_another_tenants_first_job_past_one_claim(
    queue: Queue,
) -> None:
    big, small = uuid.uuid4(), uuid.uuid4()
    enqueue_many(queue, big, 3000)
    for n in range(5):  # the big tenant has been served for a while
        complete_all(queue, f"w{n}", claim(queue, f"w{n}", max_jobs=50, max_per_tenant=50))
    newcomer = queue.enqueue(small)
    jobs = claim(queue, "next", max_jobs=50, max_per_tenant=50)
    assert newcomer in {j.id for j in jobs}


def test_a_tenant_back_from_idle_gets_at_most_one_claims_worth_of_credit(queue: Queue) -> None:
    busy, idle = uuid.uuid4(), uuid.uuid4()
    enqueue_many(queue, busy, 2000)
    for n in range(10):
        complete_all(queue, f"w{n}", claim(queue, f"w{n}", max_jobs=100, max_per_tenant=100))
    enqueue_many(queue, idle, 2000)
    counts: Counter[uuid.UUID] = Counter()
    for n in range(4):
        jobs = claim(queue, f"x{n}", max_jobs=20, max_per_tenant=10)
        counts.update(j.tenant_id for j in jobs)
        complete_all(queue, f"x{n}", jobs)
    # the returning tenant leads by one claim's cap at most, then they share evenly
    assert counts[idle] - counts[busy] <= 10 + 2, counts
    assert counts[busy] > 0


# Rate limits --------------------------------------------------------------------------------------


def refill(queue: Queue, table: str, seconds: float) -> None:
    """As if `seconds` had passed for every bucket of the table."""
    queue.conn.run(
        f"UPDATE {table} SET refilled_at = refilled_at - make_interval(secs => CAST(:s AS float8))"
        " WHERE refilled_at IS NOT NULL",
        s=seconds,
    )


def test_a_tenant_rate_limits_every_claim_together(
    queue: Queue, other_queue: Callable[[], Queue]
) -> None:
    # Given a tenant limited to 10 jobs/s with a bucket of 5, and 100 due jobs
    tenant = uuid.uuid4()
    queue.store.set_tenant_limits(tenant, rate=10, burst=5)
    enqueue_many(queue, tenant, 100)
    # When two workers claim, then together they take the bucket, no more
    first = claim(queue, "a")
    second = claim(other_queue(), "b")
    assert len(first) + len(second) == 5
    # And the tenant waits for its next token (its next due time says when)
    [[next_due_in]] = queue.conn.run(
        "SELECT extract(epoch FROM next_due_at - now()) FROM queue_tenants WHERE tenant_id = CAST(:t AS uuid)",
        t=str(tenant),
    )
    assert 0 < next_due_in <= 0.1 + 1e-6
    # And half a second later, 5 more (and never more than the bucket)
    refill(queue, "queue_tenants", 0.5)
    queue.conn.run("UPDATE queue_tenants SET next_due_at = now()")
    assert len(claim(queue, "c")) == 5
    refill(queue, "queue_tenants", 100)
    queue.conn.run("UPDATE queue_tenants SET next_due_at = now()")
    assert len(claim(queue, "d")) == 5


def test_a_function_rate_holds_back_the_jobs_over_it_without_an_attempt(queue: Queue) -> None:
    # Given ingest_slack's function limited to 10/s (bucket 4), 30 due jobs of two tenants, and
    # 5 jobs of an unlimited function
    queue.store.record_routes(
        {
            "ingest_slack": {"function": "ingest-slack", "rate": 10, "burst": 4},
            "process_embeddings": {"function": "process-embeddings"},
        }
    )
    a, b = uuid.uuid4(), uuid.uuid4()
    enqueue_many(queue, a, 15)
    enqueue_many(queue, b, 15)
    enqueue_many(queue, a, 5, job_type="process_embeddings")
    # When a worker claims
    jobs = claim(queue)
    # Then it takes the bucket's 4 of ingest_slack and every other job
    kinds = Counter(j.job_type for j in jobs)
    assert kinds == {"ingest_slack": 4, "process_embeddings": 5}
    # And the others are pushed back to when their tokens come (counted from the claim's time,
    # their updated_at), no attempt counted
    held = queue.conn.run(
        "SELECT extract(epoch FROM scheduled_at - updated_at), attempts, held_reason FROM queue_jobs"
        " WHERE status = 'pending' ORDER BY scheduled_at"
    )
    assert len(held) == 26
    waits = [float(h[0]) for h in held]
    assert waits == sorted(waits)
    assert 0 < waits[0] <= 0.1 + 1e-6
    assert abs(waits[-1] - 2.6) < 0.001  # the 26th token is 2.6 s away at 10/s
    assert {(h[1], h[2]) for h in held} == {(0, "rate limit of ingest-slack (10/s)")}


# Next due times ---------------------------------------------------------------------------------


def next_due(queue: Queue, tenant: uuid.UUID) -> Any:
    rows = queue.conn.run(
        "SELECT next_due_at FROM queue_tenants WHERE tenant_id = CAST(:t AS uuid)", t=str(tenant)
    )
    return rows[0][0] if rows else "no row"


def test_a_tenants_next_due_time_follows_its_pending_jobs(queue: Queue) -> None:
    tenant = uuid.uuid4()
    later = queue.enqueue(tenant, scheduled_at=queue.now().replace(year=2100))
    assert next_due(queue, tenant).year == 2100
    soon = queue.enqueue(tenant)
    assert next_due(queue, tenant) <= queue.now()
    [job] = claim(queue, tenant_id=tenant)  # takes the due one: next due is 2100 again
    assert job.id == soon
    assert next_due(queue, tenant).year == 2100
    assert queue.fail(soon, "w", "boom") == "retry"  # back to pending after its backoff
    assert next_due(queue, tenant) < later_time(queue, later)


def later_time(queue: Queue, job_id: uuid.UUID) -> Any:
    return queue.job(job_id)["scheduled_at"]


def test_a_job_enqueued_while_a_claim_corrects_its_tenant_is_not_missed(
    queue: Queue, other_queue: Callable[[], Queue]
) -> None:
    # Given a tenant with one due job, and an enqueue of a second one not committed yet
    tenant = uuid.uuid4()
    queue.enqueue(tenant)
    app = other_queue()
    app.conn.run("BEGIN")
    second = app.enqueue(tenant)
    # When a claim takes the first job (and would find no other pending job of the tenant)
    taken = claim(other_queue(), "w1", tenant_id=tenant)
    app.conn.run("COMMIT")
    # Then the next claim finds the second one
    assert len(taken) == 1
    assert [j.id for j in claim(queue, "w2", tenant_id=tenant)] == [second]


def test_a_tenant_that_becomes_due_is_notified_on_queue_worker_due(
    queue: Queue, other_queue: Callable[[], Queue]
) -> None:
    listener = other_queue().conn
    listener.run("LISTEN queue_worker_due")
    tenant = uuid.uuid4()
    queue.enqueue(tenant, scheduled_at=queue.now().replace(year=2100))
    listener.run("SELECT 1")
    assert [n[1] for n in listener.notifications] == []
    queue.enqueue(tenant)  # now due
    listener.run("SELECT 1")
    assert [n[1] for n in listener.notifications] == ["queue_worker_due"]
    listener.notifications.clear()
    queue.enqueue(tenant)  # already due: nobody needs waking
    listener.run("SELECT 1")
    assert list(listener.notifications) == []


def test_a_job_its_dependency_releases_is_notified_on_queue_worker_due(
    queue: Queue, other_queue: Callable[[], Queue]
) -> None:
    # Given a tenant whose only due job is claimed, and a job waiting on it
    listener = other_queue().conn
    listener.run("LISTEN queue_worker_due")
    tenant = uuid.uuid4()
    first = queue.enqueue(tenant)
    [claimed] = claim(queue, tenant_id=tenant)
    queue.enqueue(tenant, depends_on=[first])
    listener.run("SELECT 1")
    listener.notifications.clear()
    # When the first completes, releasing the second, a lingering worker is woken
    complete_all(queue, "w", [claimed])
    listener.run("SELECT 1")
    assert [n[1] for n in listener.notifications] == ["queue_worker_due"]


# Lingering ---------------------------------------------------------------------------------------


def test_one_invocation_lingers_at_a_time_the_newest(queue: Queue) -> None:
    store = queue.store
    t0 = queue.now()
    assert store.take_linger("first", t0, 60)
    assert store.linger_poll("first")[0] is True
    assert store.take_linger("second", t0 + timedelta(minutes=1), 60)  # the next tick takes over
    assert store.linger_poll("first")[0] is False
    assert store.linger_poll("second")[0] is True
    assert not store.take_linger("first", t0, 60)  # the older one never takes it back
    store.release_linger("first")  # nor lets go of what it no longer holds
    assert store.linger_poll("second")[0] is True
    store.release_linger("second")
    assert store.linger_poll("second")[0] is False


def test_the_linger_poll_says_when_the_next_job_is_due(queue: Queue) -> None:
    store = queue.store
    store.take_linger("w", queue.now(), 60)
    assert store.linger_poll("w")[1] is None
    queue.enqueue(uuid.uuid4(), scheduled_at=queue.now().replace(year=2100))
    _, due_in = store.linger_poll("w")
    assert due_in is not None
    assert due_in > 86400
    queue.enqueue(uuid.uuid4())
    _, due_in = store.linger_poll("w")
    assert due_in is not None
    assert due_in <= 0


def test_routes_and_function_states_are_recorded(queue: Queue) -> None:
    store = queue.store
    store.record_routes({"a": {"function": "fa", "rate": 5}, "b": {"function": "fa", "rate": 2}})
    store.record_function_states([{"function": "fa", "concurrency_limit": 7.5}])
    assert store.function_states() == {"fa": 7.5}
    rows = queue.conn.run("SELECT function, rate FROM queue_functions")
    assert rows == [["fa", 2.0]]  # two job types of one function: the lower rate
    assert json.loads(
        json.dumps(sorted(queue.conn.run("SELECT job_type, function FROM queue_routes")))
    ) == [
        ["a", "fa"],
        ["b", "fa"],
    ]


def test_tenant_limits_are_checked(queue: Queue) -> None:
    for kwargs, words in (
        ({"weight": 0}, "p_weight must be more than 0"),
        ({"weight": 101}, "at most 100"),
        ({"rate": -1}, "p_rate must be more than 0"),
        ({"burst": 0.5}, "p_burst must be at least 1"),
    ):
        with queue.rejects("22023", words):
            queue.store.set_tenant_limits(uuid.uuid4(), **kwargs)


def test_a_claim_takes_no_more_of_a_function_than_its_room_and_the_others_instead(
    queue: Queue,
) -> None:
    queue.store.record_routes(
        {"ingest_slack": {"function": "ingest-slack"}, "process_embeddings": {"function": "emb"}}
    )
    tenant = uuid.uuid4()
    enqueue_many(queue, tenant, 20)
    enqueue_many(queue, tenant, 5, job_type="process_embeddings")
    jobs = claim(queue, room={"ingest-slack": 3})
    assert Counter(j.job_type for j in jobs) == {"ingest_slack": 3, "process_embeddings": 5}
    # the rest are left as they were: due, no attempt, not held
    rows = queue.conn.run(
        "SELECT count(*) FROM queue_jobs WHERE status = 'pending' AND scheduled_at <= now()"
        " AND held_reason IS NULL AND attempts = 0"
    )
    assert rows == [[17]]
