"""Upgrade in place: a database migrated by version 0.1 (its objects in public, as its migrate
created them) upgrades with `queue-worker migrate`, and nothing is lost.

Version 0.1's migrate ran 0001-0004 with the session's search_path (public) and recorded them in
public.queue_worker_migrations; those files are unchanged in this version, so the test builds
that database with them, the way 0.1 did, on a Supabase-shaped database (whose default
privileges granted the API roles everything in public). It fills it with jobs in every state, a
dead letter, a dependency, a schedule and idempotency records, migrates, and checks every row is
in the queue's schema, still works, and is out of the API roles' reach.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pg8000.native
import pytest

from handler.errors import SchemaError
from handler.operate.schedules import Schedules, fire_due_schedules
from handler.queue import connection, migrations
from handler.queue.store import QueueStore, Settlement
from tests.sql.test_supabase_privileges import (
    SUPABASE_DEFAULT_PRIVILEGES,
    SUPABASE_ROLES,
    attempt_as,
)

RELEASED = ("0001_queue", "0002_idempotency", "0003_schedules", "0004_maintenance")
TABLES = (
    "queue_jobs",
    "queue_jobs_dead_letter",
    "queue_job_dependencies",
    "queue_idempotency",
    "queue_schedules",
)


def migrate_as_version_0_1(conn: pg8000.native.Connection) -> None:
    """What version 0.1's `queue-worker migrate` did: its table, then each file in public."""
    conn.run(
        "CREATE TABLE IF NOT EXISTS queue_worker_migrations ("
        " version text PRIMARY KEY, checksum text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    by_version = {m.version: m for m in migrations.available()}
    for version in RELEASED:
        migration = by_version[version]
        conn.run("BEGIN")
        conn.execute_simple(migration.sql)
        conn.run(
            "INSERT INTO queue_worker_migrations (version, checksum) VALUES (:v, :c)",
            v=migration.version,
            c=migration.checksum,
        )
        conn.run("COMMIT")


@pytest.fixture
def old_database(server_url: str) -> Iterator[pg8000.native.Connection]:
    admin_settings = connection.parse_database_url(server_url)
    name = f"queue_worker_upgrade_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(admin_settings)
    admin.run(f'CREATE DATABASE "{name}"')
    conn = connection.connect(admin_settings.replace(database=name))
    try:
        conn.execute_simple(SUPABASE_ROLES)
        conn.execute_simple(SUPABASE_DEFAULT_PRIVILEGES)
        migrate_as_version_0_1(conn)
        yield conn
    finally:
        conn.close()
        admin.run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name",
            name=name,
        )
        admin.run(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def fill(conn: pg8000.native.Connection) -> dict[str, Any]:
    """Jobs in every state through version 0.1's SQL API (in public)."""
    tenant = uuid.uuid4()

    def enqueue(**kw: Any) -> uuid.UUID:
        args = ", ".join(f"p_{k} => :{k}" for k in kw)
        sql = f"SELECT public.enqueue_job(p_tenant_id => CAST(:tenant AS uuid), p_job_type => 'ingest_slack'{', ' if kw else ''}{args})"
        rows = conn.run(sql, tenant=str(tenant), **kw)
        return uuid.UUID(str(rows[0][0]))

    def claim(worker: str, n: int) -> list[list[Any]]:
        return conn.run(
            "SELECT id, attempts FROM public.claim_jobs(:w, 300, :n, 100, CAST(:tenant AS uuid))",
            w=worker,
            n=n,
            tenant=str(tenant),
        )

    jobs: dict[str, Any] = {"tenant": tenant}
    jobs["completed"] = enqueue()
    [[completed_id, _]] = claim("old-worker", 1)
    assert completed_id == jobs["completed"]
    conn.run("SELECT public.complete_job(CAST(:id AS uuid), 'old-worker')", id=str(completed_id))
    jobs["dead"] = enqueue(max_attempts=1)
    [[dead_id, _]] = claim("old-worker", 1)
    conn.run(
        "SELECT public.fail_job(CAST(:id AS uuid), 'boom', false, NULL, 'old-worker')",
        id=str(dead_id),
    )
    jobs["processing"] = enqueue(unique_key="sync:1")
    [[processing_id, attempt]] = claim("old-worker", 1)
    assert processing_id == jobs["processing"]
    jobs["processing_attempt"] = attempt
    jobs["cancelled"] = enqueue()
    conn.run("SELECT public.cancel_job(CAST(:id AS uuid))", id=str(jobs["cancelled"]))
    jobs["pending"] = enqueue(payload=json.dumps({"token": "secret"}))
    jobs["later"] = enqueue(scheduled_at="2100-01-01T00:00:00Z")
    jobs["waiting"] = enqueue(depends_on=[str(jobs["pending"])])
    [[jobs["schedule"]]] = conn.run(
        "SELECT public.upsert_schedule(CAST(:t AS uuid), 'nightly', 'generate_digest',"
        " '0 6 * * *', 'Europe/Berlin', '{}', 0, 5, 1, now() - interval '1 minute')",
        t=str(tenant),
    )
    conn.run(
        "INSERT INTO public.queue_idempotency (id, status, expiration, in_progress_expiration, data)"
        " VALUES ('queue-worker.dispatch#a', 'COMPLETED', 4102444800, NULL, '{\"status\": 200}'),"
        "        ('queue-worker.dispatch#b', 'INPROGRESS', 4102444800, 4102444800000, NULL)"
    )
    return jobs


def columns_of(conn: pg8000.native.Connection, schema: str) -> dict[str, list[str]]:
    return {
        table: [
            row[0]
            for row in conn.run(
                "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass)"
                " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                t=f"{schema}.{table}",
            )
        ]
        for table in TABLES
    }


def rows_of(
    conn: pg8000.native.Connection, schema: str, columns: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Every row of every table, the given columns (version 0.1's), as text."""
    result = {}
    for table in TABLES:
        listed = ", ".join(columns[table])
        result[table] = [
            row[0]
            for row in conn.run(f"SELECT ROW({listed})::text FROM {schema}.{table} ORDER BY 1")
        ]
    return result


def test_a_database_of_version_0_1_upgrades_in_place_and_loses_nothing(
    old_database: pg8000.native.Connection,
) -> None:
    conn = old_database
    # Given a database migrated and used by version 0.1
    jobs = fill(conn)
    columns = columns_of(conn, "public")
    before = rows_of(conn, "public", columns)
    assert all(before[table] for table in TABLES)
    assert migrations.pending(conn) == [
        m.version for m in migrations.available() if m.version not in RELEASED
    ]
    with pytest.raises(SchemaError, match=r"earlier version .* run `queue-worker migrate`"):
        migrations.check_schema(conn)

    # When this version's migrate runs
    applied = migrations.migrate(conn)

    # Then it applies only the new files, and every row is in the queue's schema, unchanged
    assert applied == [m.version for m in migrations.available() if m.version not in RELEASED]
    assert rows_of(conn, "queue_worker", columns) == before
    left_in_public = conn.run(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relname LIKE 'queue%'"
    )
    assert left_in_public == []
    assert migrations.pending(conn) == []
    assert migrations.check_schema(conn) == migrations.latest_version()

    # And the API roles, which version 0.1's tables were granted to, reach none of it
    for role in ("anon", "authenticated"):
        assert attempt_as(conn, role, "SELECT * FROM queue_worker.queue_jobs") == "42501"
        assert attempt_as(conn, role, "SELECT * FROM queue_worker.queue_idempotency") == "42501"
        sql = "SELECT public.enqueue_job(gen_random_uuid(), 'x')"
        assert attempt_as(conn, role, sql) == "42501"

    # And the queue works on: the old worker settles the job it still holds, the pending job is
    # claimed and completed, which releases the job waiting on it, and the schedule fires
    store = QueueStore(conn)
    assert store.settle(
        "old-worker",
        [Settlement(jobs["processing"], jobs["processing_attempt"], "completed")],
    ) == {"completed": 1}
    claimed = store.claim(
        "new-worker", lease_seconds=60, max_jobs=10, max_per_tenant=10, tenant_id=jobs["tenant"]
    )
    assert [job.id for job in claimed] == [jobs["pending"]]
    assert json.loads(claimed[0].payload_json) == {"token": "secret"}
    store.settle("new-worker", [Settlement(jobs["pending"], 1, "completed")])
    [job] = store.claim(
        "new-worker", lease_seconds=60, max_jobs=10, max_per_tenant=10, tenant_id=jobs["tenant"]
    )
    assert job.id == jobs["waiting"]
    assert store.requeue_dead_letter(jobs["dead"]) == jobs["dead"]
    assert fire_due_schedules(store).jobs_created == 1
    schedule = Schedules(store).get(jobs["schedule"])
    assert schedule is not None
    assert schedule.paused is False
    assert store.idempotency_get("queue-worker.dispatch#a") is not None

    # And a second migrate has nothing to do
    assert migrations.migrate(conn) == []
