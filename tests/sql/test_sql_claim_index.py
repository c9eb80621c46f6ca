"""The claim reads indexes, so its cost does not grow with the finished history or the backlog."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pg8000.native
import pytest

from handler.queue import connection
from tests.conftest import TEST_SEARCH_PATH

# The statements claim_jobs runs, copied from its SQL with literal values. {tenant} is filled in.
PER_TENANT_READ = """
    SELECT q.id, q.tenant_id, q.job_type, q.priority, q.scheduled_at
    FROM queue_jobs q
    WHERE q.tenant_id = '{tenant}' AND q.status = 'pending' AND q.scheduled_at <= now()
      AND NOT (q.id = ANY ('{{}}'::uuid[]))
    ORDER BY q.priority DESC, q.scheduled_at
    LIMIT 10
"""
NEXT_DUE = """
    SELECT min(j.scheduled_at) FROM queue_jobs j
    WHERE j.tenant_id = '{tenant}' AND j.status = 'pending'
"""
EXPIRED_LAST_ATTEMPTS = """
    SELECT q.id, q.max_attempts FROM queue_jobs q
    WHERE q.status = 'processing' AND q.locked_until < now() AND q.attempts >= q.max_attempts
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
"""

TENANTS = [uuid.UUID(int=i + 1) for i in range(20)]
HISTORY = 100_000  # completed jobs
BACKLOG = 50_000  # pending jobs


def _insert_history(conn: pg8000.native.Connection, status: str) -> None:
    """Jobs of the 20 tenants in one statement: 100,000 completed, or 50,000 due (a backlog)."""
    conn.run(
        "INSERT INTO queue_jobs (tenant_id, job_type, status, priority, attempts, scheduled_at,"
        " completed_at)"
        " SELECT (CAST(:tenants AS uuid[]))[1 + g % 20], 'ingest_slack', CAST(:status AS text), -1,"
        "  CASE WHEN :status = 'completed' THEN 1 ELSE 0 END, now() - interval '1 day',"
        "  CASE WHEN :status = 'completed' THEN now() END"
        " FROM generate_series(1, :n) g",
        tenants=[str(t) for t in TENANTS],
        status=status,
        n=HISTORY if status == "completed" else BACKLOG,
    )


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain(conn: pg8000.native.Connection, sql: str) -> list[dict[str, Any]]:
    return list(_nodes(conn.run(f"EXPLAIN (FORMAT JSON) {sql}")[0][0][0]["Plan"]))


@pytest.fixture(scope="module")
def history(database_url: str) -> Iterator[pg8000.native.Connection]:
    """100,000 completed jobs and a few due ones, analysed, on a connection of this module."""
    conn = connection.connect(connection.parse_database_url(database_url))
    conn.run(TEST_SEARCH_PATH)
    try:
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies, queue_tenants"
        )
        _insert_history(conn, "completed")
        conn.run(
            "SELECT enqueue_job(t, 'ingest_slack', p_priority => p)"
            " FROM unnest(CAST(:tenants AS uuid[])) t, generate_series(0, 2) p",
            tenants=[str(t) for t in TENANTS[:3]],
        )
        conn.run("ANALYZE queue_jobs")
        yield conn
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies, queue_tenants"
        )
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("sql", "index"),
    [(PER_TENANT_READ, "queue_jobs_pending_idx"), (NEXT_DUE, "queue_jobs_pending_due_idx")],
    ids=["per-tenant read", "next due time"],
)
def test_the_claims_per_tenant_statements_read_an_index_of_pending_jobs_not_the_table(
    history: pg8000.native.Connection, sql: str, index: str
) -> None:
    # Given 100,000 completed jobs and a few pending ones, analysed
    # When the claim's statement is explained
    nodes = _explain(history, sql.format(tenant=TENANTS[0]))

    # Then it reads the index of pending jobs, and never scans the table
    assert index in {n.get("Index Name") for n in nodes}
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"]


def test_the_search_for_expired_last_attempts_reads_expired_leases_not_the_backlog(
    database_url: str,
) -> None:
    # Given a backlog of 50,000 due pending jobs, analysed
    conn = connection.connect(connection.parse_database_url(database_url))
    conn.run(TEST_SEARCH_PATH)
    try:
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies, queue_tenants"
        )
        _insert_history(conn, "pending")
        conn.run("ANALYZE queue_jobs")

        # When the claim's search for jobs whose worker died on their last attempt is explained
        nodes = _explain(conn, EXPIRED_LAST_ATTEMPTS)
    finally:
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies, queue_tenants"
        )
        conn.close()

    # Then it reads queue_jobs_lease_idx (processing jobs by lease), not the claim index (the
    # whole backlog) nor the table
    assert {n.get("Index Name") for n in nodes} - {None} == {"queue_jobs_lease_idx"}
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"]


def _claim_blocks(conn: pg8000.native.Connection) -> int:
    """Shared blocks (hit or read) one claim_jobs call touches, all its statements included."""
    plan = conn.run(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)"
        " SELECT * FROM claim_jobs('worker-a', p_max_jobs => 10, p_max_per_tenant => 2)"
    )[0][0][0]["Plan"]
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


def _steady_claim_blocks(conn: pg8000.native.Connection) -> int:
    """The least of three claims after one warm-up (its plans are cached from then on)."""
    _claim_blocks(conn)
    return min(_claim_blocks(conn) for _ in range(3))


def _table_blocks(conn: pg8000.native.Connection) -> int:
    return int(
        conn.run("SELECT pg_relation_size('queue_jobs') / current_setting('block_size')::int")[0][0]
    )


@pytest.mark.parametrize(
    ("history_status", "analysed"),
    [("completed", True), ("pending", True), ("completed", False)],
    ids=["history", "backlog", "history the statistics have not seen"],
)
def test_a_claim_reads_about_as_many_blocks_with_a_large_history_or_backlog(
    database_url: str, history_status: str, analysed: bool
) -> None:
    # Given 20 tenants with 20 due jobs each, and the blocks a claim reads then
    conn = connection.connect(connection.parse_database_url(database_url))
    conn.run(TEST_SEARCH_PATH)
    try:
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies, queue_tenants"
        )
        conn.run(
            "SELECT enqueue_job(t, 'ingest_slack', p_priority => 1)"
            " FROM unnest(CAST(:tenants AS uuid[])) t, generate_series(1, 20)",
            tenants=[str(t) for t in TENANTS],
        )
        conn.run("ANALYZE queue_jobs")
        table_before, claim_before = _table_blocks(conn), _steady_claim_blocks(conn)

        # When the same tenants get 100,000 completed jobs (history), or 50,000 pending ones due
        # now, of a lower priority (a backlog); analysed, or not yet: statistics that still say
        # no job has finished make the index of finished jobs look empty, and a statement by an
        # empty list of ids could be answered from any partial index (ADR 0015)
        _insert_history(conn, history_status)
        if analysed:
            conn.run("ANALYZE queue_jobs")
        table_after, claim_after = _table_blocks(conn), _steady_claim_blocks(conn)
    finally:
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies, queue_tenants"
        )
        conn.close()

    # Then the table has grown by a thousand blocks or more, and a claim reads only a few more
    # (its index descents are a level deeper), nowhere near what a scan of the table would read
    grown = table_after - table_before
    assert grown > 1000
    assert claim_after - claim_before < grown / 5, (claim_before, claim_after, grown)
