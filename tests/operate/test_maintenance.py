"""Pruning of old history (maintenance.prune over queue_prune), on a real PostgreSQL.

Ages are set in SQL (updated_at, dead_at, expiration moved into the past): nothing waits. Where a
test checks that something does not block, the connection that could block has a lock_timeout, so
that a block fails the test with an error instead of hanging it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pg8000.native
import pytest

from handler import app
from handler.errors import QueueRefusedError
from handler.operate import maintenance
from handler.operate.maintenance import PruneReport
from handler.queue.store import QueueStore, Settlement

from .conftest import FakeLambdaContext, RunBatch, emf_documents

PRUNE_LOCK = 7261400917338130  # queue_prune's advisory lock
COMPLETED_RETENTION = timedelta(days=7)
DEAD_LETTER_RETENTION = timedelta(days=30)
NOT_WAITING = "SET lock_timeout = '5s'"  # a block becomes an error, not a hang


def prune(store: QueueStore, **overrides: Any) -> PruneReport:
    arguments: dict[str, Any] = {
        "completed_retention": COMPLETED_RETENTION,
        "dead_letter_retention": DEAD_LETTER_RETENTION,
        "time_limit_s": 3600.0,  # never the limit here: only rows and chunks are
    }
    return maintenance.prune(store, **(arguments | overrides))


class History:
    """Builds jobs in every state through the SQL API, then ages them in SQL."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.conn = store.conn

    def _claimed(self, n: int) -> list[Any]:
        tenant = uuid.uuid4()  # a tenant of its own: the claim takes only these jobs
        for _ in range(n):
            self.store.enqueue(tenant, "ingest_slack", {})
        jobs = self.store.claim(
            "history", lease_seconds=300, max_jobs=10_000, max_per_tenant=10_000, tenant_id=tenant
        )
        assert len(jobs) == n
        return jobs

    def _settled(self, n: int, outcome: str) -> list[uuid.UUID]:
        jobs = self._claimed(n)
        results = self.store.settle(
            "history",
            [Settlement(job.id, job.attempt, outcome, error="x") for job in jobs],  # type: ignore[arg-type]
        )
        assert set(results) <= {"completed", "dead"}
        return [job.id for job in jobs]

    def age_jobs(self, ids: list[uuid.UUID], days: float) -> None:
        self.conn.run(
            "UPDATE queue_jobs SET updated_at = now() - CAST(:days AS float8) * interval '1 day',"
            " created_at = now() - CAST(:days AS float8) * interval '1 day'"
            " WHERE id = ANY (CAST(:ids AS uuid[]))",
            days=days,
            ids=[str(i) for i in ids],
        )

    def completed(self, n: int, days_ago: float) -> list[uuid.UUID]:
        ids = self._settled(n, "completed")
        self.age_jobs(ids, days_ago)
        return ids

    def cancelled(self, n: int, days_ago: float) -> list[uuid.UUID]:
        ids = [self.store.enqueue(uuid.uuid4(), "ingest_slack", {}) for _ in range(n)]
        assert all(self.store.cancel(i) for i in ids)
        self.age_jobs(ids, days_ago)
        return ids

    def dead(self, n: int, days_ago: float) -> list[uuid.UUID]:
        ids = self._settled(n, "dead")
        self.age_dead_letters(ids, days_ago)
        return ids

    def age_dead_letters(self, ids: list[uuid.UUID], days: float) -> None:
        self.conn.run(
            "UPDATE queue_jobs_dead_letter SET dead_at = now() - CAST(:days AS float8) * interval '1 day'"
            " WHERE id = ANY (CAST(:ids AS uuid[]))",
            days=days,
            ids=[str(i) for i in ids],
        )

    def idempotency_records(self, n: int, *, expired: bool) -> list[str]:
        keys = [f"queue-worker.dispatch#{uuid.uuid4().hex}" for _ in range(n)]
        self.conn.run(
            "INSERT INTO queue_idempotency (id, status, expiration, data)"
            " SELECT k, 'COMPLETED', extract(epoch FROM now())::bigint + :offset, '{}'"
            " FROM unnest(CAST(:keys AS text[])) AS k",
            keys=keys,
            offset=-60 if expired else 3600,
        )
        return keys

    def live(self, days_ago: float) -> dict[str, uuid.UUID]:
        """One pending, one processing and one waiting job, all last changed long ago."""
        processing = self._claimed(1)[0].id
        tenant = uuid.uuid4()  # a job depends only on jobs of its own tenant
        pending = self.store.enqueue(tenant, "ingest_slack", {})
        waiting = self.store.enqueue(tenant, "ingest_slack", {}, depends_on=[pending])
        jobs = {"pending": pending, "processing": processing, "waiting": waiting}
        self.age_jobs(list(jobs.values()), days_ago)
        return jobs


@pytest.fixture
def history(store: QueueStore) -> History:
    return History(store)


def job_ids(conn: pg8000.native.Connection) -> set[uuid.UUID]:
    return {row[0] for row in conn.run("SELECT id FROM queue_jobs")}


def dead_letter_ids(conn: pg8000.native.Connection) -> set[uuid.UUID]:
    return {row[0] for row in conn.run("SELECT id FROM queue_jobs_dead_letter")}


def idempotency_keys(conn: pg8000.native.Connection) -> set[str]:
    return {row[0] for row in conn.run("SELECT id FROM queue_idempotency")}


class ChunkSpy:
    """Wraps store.prune_chunk and records what each chunk deleted."""

    def __init__(self, store: QueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[tuple[int, int, int] | None] = []
        original = store.prune_chunk

        def spy(**kwargs: Any) -> tuple[int, int, int] | None:
            result = original(**kwargs)
            self.results.append(result)
            return result

        monkeypatch.setattr(store, "prune_chunk", spy)


# --------------------------------------------------------------------------------------------
# What is pruned, and what is kept
# --------------------------------------------------------------------------------------------


def test_prune_deletes_history_past_its_retention_and_keeps_everything_else(
    history: History, store: QueueStore, conn: pg8000.native.Connection
) -> None:
    # Given finished jobs, dead letters and idempotency records on both sides of their retention
    old_completed = history.completed(3, days_ago=8)
    old_cancelled = history.cancelled(2, days_ago=8)
    young_finished = history.completed(2, days_ago=6) + history.cancelled(1, days_ago=6)
    old_dead = history.dead(4, days_ago=31)
    young_dead = history.dead(2, days_ago=29)
    expired = history.idempotency_records(3, expired=True)
    unexpired = history.idempotency_records(2, expired=False)
    # And pending, processing and waiting jobs last changed 100 days ago
    live = history.live(days_ago=100)
    # When pruning with retentions of 7 days (finished jobs) and 30 days (dead letters)
    report = prune(store)
    # Then the old finished jobs, the old dead letters and the expired records are gone
    assert report == PruneReport(jobs=5, dead_letters=4, idempotency_records=3)
    assert report.total == 12
    # And the young ones, every live job whatever its age, and unexpired records are kept
    assert job_ids(conn) == set(young_finished) | set(live.values())
    assert dead_letter_ids(conn) == set(young_dead)
    assert idempotency_keys(conn) == set(unexpired)
    assert not (set(old_completed) | set(old_cancelled)) & job_ids(conn)
    assert not set(old_dead) & dead_letter_ids(conn)
    assert not set(expired) & idempotency_keys(conn)
    # And the live jobs are untouched
    states = dict(
        conn.run(
            "SELECT id, status FROM queue_jobs WHERE id = ANY (CAST(:ids AS uuid[]))",
            ids=[str(i) for i in live.values()],
        )
    )
    assert states == {job: status for status, job in live.items()}


def test_nothing_to_prune_is_one_chunk_that_finds_nothing(
    history: History, store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given only young history
    history.completed(2, days_ago=1)
    history.dead(1, days_ago=1)
    spy = ChunkSpy(store, monkeypatch)
    # When pruning
    report = prune(store)
    # Then one chunk looked, deleted nothing, and pruning stopped there
    assert spy.results == [(0, 0, 0)]
    assert report == PruneReport()


@pytest.mark.parametrize("kind", ["jobs", "dead_letters", "idempotency_records"])
def test_prune_deletes_in_chunks_35_rows_in_chunks_of_10_is_4_chunks(
    kind: str,
    history: History,
    store: QueueStore,
    conn: pg8000.native.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given 35 old rows of one kind
    if kind == "jobs":
        history.completed(35, days_ago=8)
    elif kind == "dead_letters":
        history.dead(35, days_ago=31)
    else:
        history.idempotency_records(35, expired=True)
    spy = ChunkSpy(store, monkeypatch)
    # When pruning 10 rows per chunk
    report = prune(store, chunk=10)
    # Then it took 4 chunks (10, 10, 10, then 5: fewer than a chunk, so nothing is left)
    position = ["jobs", "dead_letters", "idempotency_records"].index(kind)
    deleted = [result[position] for result in spy.results if result is not None]
    assert len(spy.results) == 4
    assert deleted == [10, 10, 10, 5]
    assert getattr(report, kind) == report.total == 35
    # And nothing of that kind is left
    assert not job_ids(conn)
    assert not dead_letter_ids(conn)
    assert not idempotency_keys(conn)


def test_prune_stops_after_max_chunks_and_the_next_run_takes_the_rest(
    history: History, store: QueueStore, conn: pg8000.native.Connection
) -> None:
    # Given 35 old completed jobs
    history.completed(35, days_ago=8)
    # When pruning at most 2 chunks of 10
    first = prune(store, chunk=10, max_chunks=2)
    # Then 20 are gone and 15 are left for the next run, which takes them
    assert first.jobs == 20
    assert len(job_ids(conn)) == 15
    assert prune(store, chunk=10).jobs == 15
    assert not job_ids(conn)


def test_prune_with_no_time_left_deletes_nothing(
    history: History, store: QueueStore, conn: pg8000.native.Connection
) -> None:
    # Given old completed jobs
    old = history.completed(3, days_ago=8)
    # When pruning with no time left
    report = prune(store, time_limit_s=0)
    # Then no chunk ran
    assert report == PruneReport()
    assert job_ids(conn) == set(old)


# --------------------------------------------------------------------------------------------
# Locks: one pruner at a time, and never in a claim's way
# --------------------------------------------------------------------------------------------


def test_while_another_connection_holds_the_pruning_lock_prune_deletes_nothing(
    history: History,
    store: QueueStore,
    conn: pg8000.native.Connection,
    connect: Callable[[], pg8000.native.Connection],
) -> None:
    # Given old history, and another invocation pruning (holding the lock in an open transaction)
    jobs = history.completed(3, days_ago=8)
    dead = history.dead(2, days_ago=31)
    keys = history.idempotency_records(2, expired=True)
    other = connect()
    other.run("BEGIN")
    other.run("SELECT pg_advisory_xact_lock(:key)", key=PRUNE_LOCK)
    conn.run(NOT_WAITING)
    try:
        # When this one prunes
        report = prune(store)
        # Then it says so at once and deletes nothing
        assert report.locked_elsewhere
        assert report.total == 0
        assert job_ids(conn) == set(jobs)
        assert dead_letter_ids(conn) == set(dead)
        assert idempotency_keys(conn) == set(keys)
    finally:
        other.run("ROLLBACK")
    # And once the other transaction ends, pruning works again
    after = prune(store)
    assert not after.locked_elsewhere
    assert after == PruneReport(jobs=3, dead_letters=2, idempotency_records=2)


def test_prune_and_a_claim_in_an_open_transaction_do_not_block_each_other(
    history: History,
    store: QueueStore,
    conn: pg8000.native.Connection,
    connect: Callable[[], pg8000.native.Connection],
) -> None:
    # Given old completed jobs and due jobs of the same tenants' queue
    old = history.completed(4, days_ago=8)
    tenant = uuid.uuid4()
    due = {store.enqueue(tenant, "ingest_slack", {}) for _ in range(5)}
    # And a claim holding its row locks in an open transaction on another connection
    claimer = connect()
    claimer.run(NOT_WAITING)
    claiming = QueueStore(claimer)
    claimer.run("BEGIN")
    try:
        claimed = claiming.claim("claimer", lease_seconds=60, max_jobs=100, max_per_tenant=100)
        assert {job.id for job in claimed} == due
        # When pruning on this connection meanwhile
        conn.run(NOT_WAITING)
        report = prune(store)
        # Then pruning returns, having deleted the old jobs
        assert report == PruneReport(jobs=4)
    finally:
        claimer.run("COMMIT")
    # And the claim committed: its jobs are leased to it, nothing else is left
    leased = dict(conn.run("SELECT id, locked_by FROM queue_jobs"))
    assert leased == dict.fromkeys(due, "claimer")
    assert not set(old) & set(leased)


def test_a_claim_is_not_blocked_by_a_prune_chunk_in_an_open_transaction(
    history: History,
    store: QueueStore,
    conn: pg8000.native.Connection,
    connect: Callable[[], pg8000.native.Connection],
) -> None:
    # Given old completed jobs and due jobs
    history.completed(4, days_ago=8)
    tenant = uuid.uuid4()
    due = {store.enqueue(tenant, "ingest_slack", {}) for _ in range(5)}
    # And a prune chunk that has deleted them in a transaction still open on another connection
    pruner = connect()
    pruner.run("BEGIN")
    try:
        chunk = QueueStore(pruner).prune_chunk(
            completed_before=_days_ago(conn, 7), dead_before=_days_ago(conn, 30)
        )
        assert chunk == (4, 0, 0)
        # When a claim runs on this connection meanwhile
        conn.run(NOT_WAITING)
        claimed = store.claim("claimer", lease_seconds=60, max_jobs=100, max_per_tenant=100)
        # Then it returns with every due job
        assert {job.id for job in claimed} == due
    finally:
        pruner.run("COMMIT")


def test_a_row_someone_else_has_locked_is_skipped_not_waited_for(
    history: History,
    store: QueueStore,
    conn: pg8000.native.Connection,
    connect: Callable[[], pg8000.native.Connection],
) -> None:
    # Given three old completed jobs, one of them locked by another transaction
    old = history.completed(3, days_ago=8)
    other = connect()
    other.run("BEGIN")
    other.run("SELECT id FROM queue_jobs WHERE id = CAST(:id AS uuid) FOR UPDATE", id=str(old[0]))
    conn.run(NOT_WAITING)
    try:
        # When pruning
        report = prune(store)
        # Then the two others are deleted and the locked one is left, without waiting for it
        assert report.jobs == 2
        assert job_ids(conn) == {old[0]}
    finally:
        other.run("ROLLBACK")
    # And the next run deletes it
    assert prune(store).jobs == 1
    assert not job_ids(conn)


def _days_ago(conn: pg8000.native.Connection, days: int) -> Any:
    return conn.run("SELECT now() - CAST(:d AS float8) * interval '1 day'", d=days)[0][0]


# --------------------------------------------------------------------------------------------
# History that still decides something is kept
# --------------------------------------------------------------------------------------------


def test_a_cancelled_dependency_is_kept_while_a_dead_letter_depends_on_it(
    history: History, store: QueueStore, conn: pg8000.native.Connection
) -> None:
    # Given job A, job B that depends on it, and A cancelled 8 days ago (so B was dead-lettered)
    tenant = uuid.uuid4()
    a = store.enqueue(tenant, "ingest_slack", {})
    b = store.enqueue(tenant, "ingest_slack", {}, depends_on=[a])
    assert store.cancel(a)
    history.age_jobs([a], 8)
    other_cancelled = history.cancelled(1, days_ago=8)
    # When pruning
    report = prune(store)
    # Then A is kept (B still names it) while the other old cancelled job goes
    assert report.jobs == 1
    assert a in job_ids(conn)
    assert not set(other_cancelled) & job_ids(conn)
    # And requeueing B is still refused: its dependency can never complete
    with pytest.raises(QueueRefusedError, match="was cancelled"):
        store.requeue_dead_letter(b)
    # And once B's dead letter is past its retention and pruned, A goes too
    history.age_dead_letters([b], 31)
    prune(store)
    prune(store)
    assert b not in dead_letter_ids(conn)
    assert a not in job_ids(conn)


def test_a_dead_letter_a_requeued_job_waits_for_is_kept(
    history: History, store: QueueStore, conn: pg8000.native.Connection
) -> None:
    # Given A dead-lettered (and B with it), then B requeued: B waits for A to be requeued
    tenant = uuid.uuid4()
    a = store.enqueue(tenant, "ingest_slack", {})
    b = store.enqueue(tenant, "ingest_slack", {}, depends_on=[a])
    (job,) = store.claim("w", lease_seconds=60, max_jobs=10, max_per_tenant=10)
    assert job.id == a
    assert store.settle("w", [Settlement(a, job.attempt, "dead", error="boom")]) == {"dead": 1}
    assert store.requeue_dead_letter(b) == b
    assert conn.run("SELECT status FROM queue_jobs WHERE id = CAST(:b AS uuid)", b=str(b)) == [
        ["waiting"]
    ]
    # And A's dead letter is 31 days old, next to another dead letter that old
    other = history.dead(1, days_ago=31)
    history.age_dead_letters([a], 31)
    # When pruning
    report = prune(store)
    # Then A is kept (B would wait forever without it) and the other goes
    assert report.dead_letters == 1
    assert dead_letter_ids(conn) == {a}
    assert not set(other) & dead_letter_ids(conn)
    # And requeueing A still lets B run after it
    assert store.requeue_dead_letter(a) == a
    assert dict(conn.run("SELECT id, status FROM queue_jobs")) == {a: "pending", b: "waiting"}


# --------------------------------------------------------------------------------------------
# In the invocation
# --------------------------------------------------------------------------------------------


def test_the_handler_prunes_after_its_batch_and_reports_it_in_the_summary_and_emf(
    lambda_env: dict[str, str],
    history: History,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given 5 old completed jobs, 2 old dead letters, 1 expired idempotency record and a due job
    history.completed(5, days_ago=8)
    history.dead(2, days_ago=31)
    history.idempotency_records(1, expired=True)
    due = queue.enqueue(uuid.uuid4(), "ingest_slack", {})
    capsys.readouterr()
    # When the Lambda handler runs (default retentions: 7 and 30 days)
    result = app.lambda_handler({}, FakeLambdaContext())
    # Then the batch ran, and the old history was pruned and counted
    assert result["claimed"] == result["completed"] == 1
    assert result["pruned"] == 8
    assert job_ids(conn) == {due}
    assert not dead_letter_ids(conn)
    # And the batch's EMF document carries JobsPruned
    documents = emf_documents(capsys.readouterr().out)
    batch = next(d for d in documents if "JobsPruned" in d)
    assert batch["JobsPruned"] == 8
    directive = batch["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "QueueWorker"
    assert "JobsPruned" in {m["Name"] for m in directive["Metrics"]}


def test_the_retentions_come_from_the_environment(
    run_batch: RunBatch, history: History, conn: pg8000.native.Connection
) -> None:
    # Given completed jobs 2 days old and dead letters 3 days old (young for the defaults)
    history.completed(2, days_ago=2)
    history.dead(3, days_ago=3)
    # When a worker with a 1-day retention for both runs a batch
    summary, _ = run_batch(completed_retention="1d", dead_letter_retention="24h")
    # Then it pruned them all
    assert summary.pruned == 5
    assert not job_ids(conn)
    assert not dead_letter_ids(conn)


def test_a_worker_with_default_retentions_keeps_the_same_history(
    run_batch: RunBatch, history: History, conn: pg8000.native.Connection
) -> None:
    # Given completed jobs 2 days old and dead letters 3 days old
    jobs = history.completed(2, days_ago=2)
    dead = history.dead(3, days_ago=3)
    # When a worker with the default retentions runs a batch
    summary, _ = run_batch()
    # Then it pruned nothing
    assert summary.pruned == 0
    assert job_ids(conn) == set(jobs)
    assert dead_letter_ids(conn) == set(dead)
