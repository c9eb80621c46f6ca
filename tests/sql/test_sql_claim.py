"""claim_jobs and claim_next_job: which jobs a claim takes, in which order, and the lease."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest


def test_a_claim_leases_a_due_pending_job_to_the_worker(queue) -> None:
    # Given a pending job, due now
    tenant = uuid.uuid4()
    job_id = queue.enqueue(tenant, "ingest_slack", payload={"channel": "c1"}, priority=3)

    # When a worker claims with a lease of 120 s
    with queue.transaction():
        claimed = queue.claim("worker-a", lease_seconds=120)
        now = queue.now()

    # Then it gets the job, as its first attempt, leased to it for 120 s
    assert [c.id for c in claimed] == [job_id]
    job = claimed[0]
    assert (job.tenant_id, job.job_type) == (tenant, "ingest_slack")
    assert json.loads(job.payload_json) == {"channel": "c1"}
    assert (job.attempt, job.rescued, job.exhausted) == (1, False, False)
    row = queue.job(job_id)
    assert (row["status"], row["attempts"], row["locked_by"]) == ("processing", 1, "worker-a")
    assert row["locked_until"] == now + timedelta(seconds=120)


def test_claim_jobs_returns_each_job_with_its_lease(queue) -> None:
    # Given a pending job (the worker reads only some of what claim_jobs returns: the rest is
    # the SQL contract's, for other callers)
    tenant = uuid.uuid4()
    job_id = queue.enqueue(tenant, "ingest_slack", payload={"channel": "c1"}, priority=3)

    # When claim_jobs is called directly with a lease of 120 s
    with queue.transaction():
        rows = queue.conn.run(
            "SELECT id, tenant_id, job_type, payload, priority, attempts, max_attempts,"
            " scheduled_at, locked_until, created_at, rescued, exhausted"
            " FROM queue_worker.claim_jobs(p_worker_id => 'worker-a', p_lease_seconds => 120)"
        )
        now = queue.now()

    # Then its row says all of it
    [(got_id, got_tenant, job_type, payload, priority, attempts, max_attempts, *rest)] = rows
    scheduled_at, locked_until, created_at, rescued, exhausted = rest
    assert (got_id, got_tenant, job_type, payload) == (
        job_id,
        tenant,
        "ingest_slack",
        {"channel": "c1"},
    )
    assert (priority, attempts, max_attempts, rescued, exhausted) == (3, 1, 5, False, False)
    assert scheduled_at <= now
    assert created_at <= now
    assert locked_until == now + timedelta(seconds=120)


def test_a_claim_hands_over_each_payload_as_postgresql_renders_it(queue) -> None:
    # Given payloads whose text needs escaping in JSON (quotes, backslashes, control
    # characters, non-ASCII, a string that looks like JSON, a number past 64 bits)
    payloads = [
        {"quote": 'say "hi"', "backslash": "a\\b", "newline": "one\ntwo", "tab": "\t"},
        {"unicode": "Zoë ☃ 𝄞", "nested": {"list": [1, 2.5, None, True], "empty": {}}},
        {"looks_like_json": '{"a": 1}', "big": 12345678901234567890},
    ]
    ids = [queue.enqueue(payload=payload) for payload in payloads]

    # When a worker claims them
    claimed = {job.id: job for job in queue.claim()}

    # Then each one's payload is the text PostgreSQL renders for it, character for character,
    # and reads back as what was enqueued
    assert set(claimed) == set(ids)
    for job_id, payload in zip(ids, payloads, strict=True):
        [(rendered,)] = queue.conn.run(
            "SELECT payload::text FROM queue_jobs WHERE id = :id", id=job_id
        )
        assert claimed[job_id].payload_json == rendered
        assert json.loads(claimed[job_id].payload_json) == payload


def test_a_claim_leaves_jobs_scheduled_in_the_future_until_they_are_due(queue) -> None:
    # Given a job scheduled for later
    later = queue.enqueue(scheduled_at=queue.now() + timedelta(minutes=5))

    # When a worker claims, then it does not get it
    assert queue.claim_ids() == []
    assert queue.status(later) == "pending"

    # When its time has come, then the next claim takes it
    queue.make_due(later)
    assert queue.claim_ids() == [later]


def test_a_claim_takes_the_highest_priority_first_then_the_oldest_scheduled_at(queue) -> None:
    # Given one tenant's jobs of different priorities and due times
    tenant = uuid.uuid4()
    now = queue.now()

    def job(priority: int, hours_ago: int) -> uuid.UUID:
        at = now - timedelta(hours=hours_ago)
        return queue.enqueue(tenant, priority=priority, scheduled_at=at)

    p0_old, p0_new = job(0, 4), job(0, 3)
    p5_new, p5_old = job(5, 1), job(5, 2)
    low = job(-1, 10)

    # When workers claim one job at a time
    order = [queue.claim_ids(max_jobs=1, max_per_tenant=1) for _ in range(6)]

    # Then the jobs come by priority, then by scheduled_at, and then there is none left
    assert order == [[p5_old], [p5_new], [p0_old], [p0_new], [low], []]


def test_a_claim_takes_at_most_max_per_tenant_jobs_of_each_tenant(queue) -> None:
    # Given two tenants with five due jobs each, of rising priority
    a, b = uuid.uuid4(), uuid.uuid4()
    jobs = {t: [queue.enqueue(t, priority=p) for p in range(5)] for t in (a, b)}

    # When a worker claims with max_per_tenant = 2
    claimed = queue.claim(max_per_tenant=2)

    # Then it gets the two best jobs of each tenant
    got = {c.id for c in claimed}
    assert got == {jobs[a][4], jobs[a][3], jobs[b][4], jobs[b][3]}


def test_a_claim_shares_max_jobs_between_tenants_each_tenants_best_jobs_first(queue) -> None:
    # Given tenant A with three low-priority jobs and tenant B with two urgent ones
    a, b = uuid.uuid4(), uuid.uuid4()
    now = queue.now()
    a_jobs = [queue.enqueue(a, scheduled_at=now - timedelta(minutes=m)) for m in (3, 2, 1)]
    b_jobs = [queue.enqueue(b, priority=9), queue.enqueue(b, priority=5)]

    # When a worker claims three jobs in all
    claimed = queue.claim(max_jobs=3, max_per_tenant=10)

    # Then the tenants share them (equal weights: two for the one that has waited longest, one
    # for the other), and each tenant's share is its best jobs: B's most urgent, A's oldest
    assert {c.id for c in claimed} == {b_jobs[0], a_jobs[0], a_jobs[1]}
    assert queue.status(a_jobs[2]) == queue.status(b_jobs[1]) == "pending"


def test_a_claim_for_one_tenant_takes_only_that_tenants_jobs(queue) -> None:
    # Given due jobs of two tenants
    a, b = uuid.uuid4(), uuid.uuid4()
    a_jobs = {queue.enqueue(a) for _ in range(3)}
    b_job = queue.enqueue(b, priority=100)

    # When a worker claims for tenant A
    claimed = queue.claim_ids(tenant_id=a)

    # Then it gets A's jobs only
    assert set(claimed) == a_jobs
    assert queue.status(b_job) == "pending"


def _tenants(n: int) -> list[uuid.UUID]:
    # Fixed ids, so that no shard is empty by chance.
    return [uuid.UUID(int=i * 7919 + 1) for i in range(n)]


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_split_the_tenants_into_disjoint_parts_whose_union_is_every_tenant(
    queue, shards: int
) -> None:
    # Given due jobs of 40 tenants
    jobs = {queue.enqueue(t): t for t in _tenants(40)}

    # When each shard claims in a transaction that is rolled back (so each sees every job)
    parts = []
    for shard in range(shards):
        queue.conn.run("BEGIN")
        parts.append(set(queue.claim_ids(shard=shard, shards=shards)))
        queue.conn.run("ROLLBACK")

    # Then no job is in two shards, every job is in one, and a tenant stays in its shard
    assert sum(len(p) for p in parts) == len(jobs)
    assert set().union(*parts) == set(jobs)
    assert all(parts), "with 40 tenants every shard has some"
    # And a claim for one tenant in a shard finds its jobs only in that tenant's shard
    job_id, tenant = next(iter(jobs.items()))
    home = next(i for i, part in enumerate(parts) if job_id in part)
    for shard in range(shards):
        queue.conn.run("BEGIN")
        found = queue.claim_ids(tenant_id=tenant, shard=shard, shards=shards)
        queue.conn.run("ROLLBACK")
        assert found == ([job_id] if shard == home else [])


def test_claim_next_job_returns_the_job_as_claimed(queue) -> None:
    # Given a pending job
    job_id = queue.enqueue(payload={"k": "v"})

    # When the seed's single-job claim is called
    with queue.transaction():
        rows = queue.conn.run(
            "SELECT id, status, attempts, locked_by, locked_until, payload"
            " FROM claim_next_job(p_lease_seconds => 60, p_worker_id => 'seed-worker')"
        )
        now = queue.now()

    # Then it returns that job as it is now: processing, first attempt, leased to the worker
    assert rows == [
        [job_id, "processing", 1, "seed-worker", now + timedelta(seconds=60), {"k": "v"}]
    ]


def test_claim_next_job_takes_one_job_at_a_time_and_none_from_an_empty_queue(queue) -> None:
    # Given two pending jobs of one tenant and one of another
    tenant = uuid.uuid4()
    first = queue.enqueue(tenant, priority=1)
    second = queue.enqueue(tenant)
    queue.enqueue()

    # When claim_next_job is called for that tenant three times (without a worker id)
    taken = [
        queue.conn.run("SELECT id, locked_by FROM claim_next_job(CAST(:t AS uuid))", t=str(tenant))
        for _ in range(3)
    ]

    # Then it gets the tenant's jobs in order, then nothing
    assert taken == [[[first, "claim_next_job"]], [[second, "claim_next_job"]], []]


# Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        pytest.param("NULL", "23502", "p_worker_id", id="null worker"),
        pytest.param("''", "23502", "p_worker_id", id="empty worker"),
        pytest.param("'w', p_lease_seconds => 0", "22023", "p_lease_seconds", id="lease 0"),
        pytest.param("'w', p_lease_seconds => NULL", "22023", "p_lease_seconds", id="lease null"),
        pytest.param("'w', p_max_jobs => 0", "22023", "p_max_jobs", id="max_jobs 0"),
        pytest.param("'w', p_max_jobs => -1", "22023", "p_max_jobs", id="max_jobs -1"),
        pytest.param("'w', p_max_jobs => NULL", "22023", "p_max_jobs", id="max_jobs null"),
        pytest.param("'w', p_max_per_tenant => 0", "22023", "p_max_per_tenant", id="per_tenant 0"),
        pytest.param("'w', p_shard => -1", "22023", "p_shard", id="shard -1"),
        pytest.param("'w', p_shard => 2, p_shards => 2", "22023", "p_shard", id="shard = shards"),
        pytest.param("'w', p_shard => 0, p_shards => 0", "22023", "p_shards", id="shards 0"),
        pytest.param("'w', p_shard => NULL", "22023", "p_shard", id="shard null"),
        pytest.param("'w', p_shards => NULL", "22023", "p_shards", id="shards null"),
    ],
)
def test_claim_jobs_rejects_bad_limits_and_changes_nothing(
    queue, args: str, code: str, words: str
) -> None:
    # Given a due job, and a job whose lease expired during its last attempt (which a valid
    # claim would dead-letter)
    queue.enqueue(uuid.uuid4())
    exhausted = queue.claimed("worker-a", max_attempts=1)
    queue.expire_lease(exhausted)

    # When a claim with a bad argument is sent, then it fails clearly and changes nothing
    with queue.rejects(code, words):
        queue.conn.run(f"SELECT * FROM claim_jobs({args})")
