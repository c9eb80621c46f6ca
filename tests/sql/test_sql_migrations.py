"""`queue-worker migrate` (handler.migrations.migrate) on brand-new databases."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pg8000.native
import pytest

from handler.queue import connection, migrations


@pytest.fixture
def new_database(server_url: str) -> Iterator[Callable[[], pg8000.native.Connection]]:
    """A brand-new empty database; yields a function that opens connections to it."""
    admin_settings = connection.parse_database_url(server_url)
    name = f"queue_worker_migrate_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(admin_settings)
    admin.run(f'CREATE DATABASE "{name}"')
    opened: list[pg8000.native.Connection] = []

    def _connect() -> pg8000.native.Connection:
        conn = connection.connect(admin_settings.replace(database=name))
        opened.append(conn)
        return conn

    try:
        yield _connect
    finally:
        for conn in opened:
            conn.close()
        admin.run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name",
            name=name,
        )
        admin.run(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def fingerprint(conn: pg8000.native.Connection) -> list[tuple[str, ...]]:
    """The schema as pg_catalog describes it: tables, columns, indexes, constraints, functions."""
    rows = conn.run(
        """
        SELECT 'relation', c.relname, c.relkind::text, ''
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'queue_worker'
        UNION ALL
        SELECT 'column', c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'queue_worker' AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind = 'r'
        UNION ALL
        SELECT 'index', indexname, indexdef, '' FROM pg_indexes WHERE schemaname = 'queue_worker'
        UNION ALL
        SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'queue_worker'::regnamespace
        UNION ALL
        SELECT 'function', p.oid::regprocedure::text, md5(p.prosrc), ''
        FROM pg_proc p WHERE p.pronamespace = 'queue_worker'::regnamespace
        UNION ALL
        SELECT 'migration', version, checksum, applied_at::text FROM queue_worker.queue_worker_migrations
        ORDER BY 1, 2, 3, 4
        """
    )
    return [tuple(row) for row in rows]


def test_migrate_applies_every_migration_to_a_new_database_then_has_nothing_to_do(
    new_database,
) -> None:
    # Given a brand-new empty database
    conn = new_database()
    versions = [m.version for m in migrations.available()]
    assert migrations.pending(conn) == versions

    # When migrate runs the first time
    applied = migrations.migrate(conn)

    # Then it applies every migration, records each, and the queue's API exists
    assert applied == versions
    assert migrations.pending(conn) == []
    schema = fingerprint(conn)
    names = {row[1] for row in schema}
    assert {"queue_jobs", "queue_jobs_dead_letter", "queue_job_dependencies"} <= names
    assert {"queue_jobs_pending_idx", "queue_jobs_lease_idx", "queue_tenants"} <= names
    functions = {
        row[1].split("(")[0].removeprefix("queue_worker.") for row in schema if row[0] == "function"
    }
    assert {
        "enqueue_job",
        "claim_next_job",
        "claim_jobs",
        "complete_job",
        "fail_job",
        "settle_jobs",
        "requeue_dead_letter",
        "requeue_dead_letters",
        "cancel_job",
        "queue_backoff",
    } <= functions
    recorded = conn.run(
        "SELECT version, checksum FROM queue_worker.queue_worker_migrations ORDER BY 1"
    )
    assert recorded == [[m.version, m.checksum] for m in migrations.available()]

    # When migrate runs again
    again = migrations.migrate(conn)

    # Then it applies nothing and changes nothing
    assert again == []
    assert fingerprint(conn) == schema


def test_two_migrations_at_once_on_a_new_database_both_succeed_and_one_applies(
    new_database,
) -> None:
    # Given a brand-new database, two sessions about to migrate it, and a third session holding
    # migrate's advisory lock so that both are sure to be waiting at the same time
    holder, first, second = new_database(), new_database(), new_database()
    holder.run("SELECT pg_advisory_lock(:key)", key=migrations._LOCK_KEY)
    pids = [int(c.run("SELECT pg_backend_pid()")[0][0]) for c in (first, second)]
    start = threading.Barrier(2)

    def run(conn: pg8000.native.Connection) -> list[str]:
        start.wait()
        return migrations.migrate(conn)

    # When both migrate at once, and the lock is released once both wait for it
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, conn) for conn in (first, second)]
        deadline = time.monotonic() + 20
        try:
            while not all(
                holder.run("SELECT cardinality(pg_blocking_pids(:pid)) > 0", pid=pid)[0][0]
                for pid in pids
            ):
                assert time.monotonic() < deadline, "both migrations should wait for the lock"
        finally:
            holder.run("SELECT pg_advisory_unlock(:key)", key=migrations._LOCK_KEY)
        results = [future.result(timeout=60) for future in futures]

    # Then both succeed: exactly one applied every migration, the other found nothing to do
    versions = [m.version for m in migrations.available()]
    assert sorted(results) == [[], versions]
    assert holder.run("SELECT count(*) FROM queue_worker.queue_worker_migrations")[0][0] == len(
        versions
    )
    assert migrations.pending(holder) == []
