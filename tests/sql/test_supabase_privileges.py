"""Least privilege on a database shaped like Supabase's (migration 0005).

The database gets Supabase's API roles (anon, authenticated, service_role, authenticator) and its
default privileges (everything created in public is granted to the API roles), and, to be
hostile, the same default privileges for every schema. Then `queue-worker migrate` runs, and every
table and every function of the queue is tried as anon and as authenticated: each attempt must be
refused. The opt-in wrapper for signed-in users takes the tenant from the JWT only; the worker's
role runs a batch's calls and nothing else; the operator's role does the rest.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pg8000.native
import pytest

from handler.local.standin import StandIn
from handler.queue import connection, migrations
from handler.runtime.events import parse_event
from handler.runtime.settings import parse_settings
from handler.runtime.worker import Worker

API_ROLES = ("anon", "authenticated")
WORKER_LOGIN = "queue_worker_test_worker"
OPERATOR_LOGIN = "queue_worker_test_operator"

SUPABASE_ROLES = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
        CREATE ROLE authenticator NOLOGIN NOINHERIT;
    END IF;
END
$$;
GRANT anon, authenticated, service_role TO authenticator;
"""

# What Supabase's setup grants in every project (for the role that runs migrations), and the same
# for all schemas: the lockdown must not depend on the queue's schema being left alone.
SUPABASE_DEFAULT_PRIVILEGES = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
"""

LOGINS = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{WORKER_LOGIN}') THEN
        CREATE ROLE {WORKER_LOGIN} LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OPERATOR_LOGIN}') THEN
        CREATE ROLE {OPERATOR_LOGIN} LOGIN;
    END IF;
END
$$;
GRANT queue_worker_runtime TO {WORKER_LOGIN};
GRANT queue_worker_operator TO {OPERATOR_LOGIN};
"""

USER_WRAPPER = "public.enqueue_job_as_user(text, jsonb, timestamptz, text, uuid[])"
SCHEDULED_EVENT = Path(__file__).parents[2] / "events" / "scheduled-event.json"
SIMULATE_503 = json.dumps({"simulate": {"status": 503, "headers": {"Retry-After": "600"}}})


@pytest.fixture(scope="module")
def supabase(server_url: str) -> Iterator[dict[str, Any]]:
    """A new database with Supabase's roles and default privileges, migrated."""
    admin_settings = connection.parse_database_url(server_url)
    name = f"queue_worker_supabase_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(admin_settings)
    admin.run(f'CREATE DATABASE "{name}"')
    settings = admin_settings.replace(database=name)
    owner = connection.connect(settings)
    owner.execute_simple(SUPABASE_ROLES)
    owner.execute_simple(SUPABASE_DEFAULT_PRIVILEGES)
    migrations.migrate(owner)
    owner.execute_simple(LOGINS)
    try:
        yield {"settings": settings, "owner": owner}
    finally:
        owner.close()
        admin.run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name",
            name=name,
        )
        admin.run(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture
def owner(supabase: dict[str, Any]) -> pg8000.native.Connection:
    conn: pg8000.native.Connection = supabase["owner"]
    conn.run("ROLLBACK")  # a no-op (a warning) unless a failed test left one open
    conn.run(
        "TRUNCATE queue_worker.queue_jobs, queue_worker.queue_jobs_dead_letter,"
        " queue_worker.queue_job_dependencies, queue_worker.queue_user_enqueue_rules,"
        " queue_worker.queue_schedules"
    )
    conn.run(f"REVOKE ALL ON FUNCTION {USER_WRAPPER} FROM authenticated")
    return conn


def queue_tables(conn: pg8000.native.Connection) -> list[str]:
    rows = conn.run(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'queue_worker'::regnamespace"
        " AND c.relkind = 'r' ORDER BY 1"
    )
    return [f"queue_worker.{row[0]}" for row in rows]


def queue_functions(conn: pg8000.native.Connection) -> list[tuple[str, int]]:
    """(schema.name, number of arguments) of every function of the queue: those in its schema,
    and the entry points in public."""
    rows = conn.run(
        "SELECT p.pronamespace::regnamespace::text || '.' || p.proname, p.pronargs"
        " FROM pg_proc p"
        " WHERE p.pronamespace = 'queue_worker'::regnamespace"
        "    OR (p.pronamespace = 'public'::regnamespace"
        "        AND p.proname IN ('enqueue_job', 'enqueue_job_as_user'))"
        " ORDER BY 1"
    )
    return [(str(name), int(args)) for name, args in rows]


def attempt_as(
    conn: pg8000.native.Connection, role: str, sql: str, claims: dict[str, Any] | None = None
) -> str | None:
    """Runs `sql` as `role` in a transaction that is rolled back: the SQLSTATE of the error, or
    None when it went through."""
    conn.run("BEGIN")
    try:
        conn.run(f"SET LOCAL ROLE {role}")
        if claims is not None:
            conn.run("SELECT set_config('request.jwt.claims', :c, true)", c=json.dumps(claims))
        conn.run(sql)
    except pg8000.native.DatabaseError as exc:
        return str(exc.args[0]["C"])
    finally:
        conn.run("ROLLBACK")
    return None


def call_with_nulls(name: str, args: int) -> str:
    return f"SELECT {name}({', '.join(['NULL'] * args)})"


@pytest.mark.parametrize("role", API_ROLES)
def test_every_table_of_the_queue_is_refused_to_the_api_roles(
    owner: pg8000.native.Connection, role: str
) -> None:
    # Given a migrated Supabase-shaped database, whose tables all exist
    tables = queue_tables(owner)
    assert {
        "queue_worker.queue_jobs",
        "queue_worker.queue_idempotency",
        "queue_worker.queue_worker_migrations",
    } <= set(tables)

    # When the role tries to read, write, change and delete every table, then each is refused
    for table in tables:
        for sql in (
            f"SELECT * FROM {table}",
            f"INSERT INTO {table} DEFAULT VALUES",
            f"UPDATE {table} SET id = id",
            f"DELETE FROM {table}",
            f"TRUNCATE {table}",
        ):
            assert attempt_as(owner, role, sql) == "42501", (role, sql)


@pytest.mark.parametrize("role", API_ROLES)
def test_every_function_of_the_queue_is_refused_to_the_api_roles(
    owner: pg8000.native.Connection, role: str
) -> None:
    functions = queue_functions(owner)
    names = {name for name, _ in functions}
    assert {
        "queue_worker.enqueue_job",
        "queue_worker.claim_jobs",
        "queue_worker.settle_jobs",
        "queue_worker.complete_job",
        "queue_worker.queue_prune",
        "public.enqueue_job",
        "public.enqueue_job_as_user",
        "queue_worker.idempotency_put",
    } <= names
    for name, args in functions:
        assert attempt_as(owner, role, call_with_nulls(name, args)) == "42501", (role, name)


def test_no_privilege_is_left_to_public_anon_or_authenticated_and_rls_is_on_everywhere(
    owner: pg8000.native.Connection,
) -> None:
    # The catalog's view of the same: no ACL entry names PUBLIC (grantee 0), anon or
    # authenticated on any table, function or the schema; every table has row-level security.
    leaks = owner.run(
        """
        WITH objects AS (
            SELECT c.oid::regclass::text AS object,
                   coalesce(c.relacl, acldefault('r', c.relowner)) AS acl
            FROM pg_class c
            WHERE c.relnamespace = 'queue_worker'::regnamespace AND c.relkind IN ('r', 'S', 'v')
            UNION ALL
            SELECT p.oid::regprocedure::text, coalesce(p.proacl, acldefault('f', p.proowner))
            FROM pg_proc p
            WHERE p.pronamespace = 'queue_worker'::regnamespace
               OR p.proname IN ('enqueue_job', 'enqueue_job_as_user')
            UNION ALL
            SELECT 'schema ' || n.nspname, coalesce(n.nspacl, acldefault('n', n.nspowner))
            FROM pg_namespace n
            WHERE n.nspname = 'queue_worker'
        )
        SELECT o.object, a.grantee::regrole::text, a.privilege_type
        FROM objects o
        CROSS JOIN LATERAL aclexplode(o.acl) a
        WHERE a.grantee = 0
           OR a.grantee IN (SELECT oid FROM pg_roles WHERE rolname IN ('anon', 'authenticated'))
        """
    )
    assert leaks == []
    without_rls = owner.run(
        "SELECT relname FROM pg_class WHERE relnamespace = 'queue_worker'::regnamespace"
        " AND relkind = 'r' AND NOT relrowsecurity"
    )
    assert without_rls == []
    definers_with_a_search_path = owner.run(
        "SELECT p.oid::regprocedure::text FROM pg_proc p"
        " WHERE p.prosecdef AND (p.pronamespace = 'queue_worker'::regnamespace"
        "                        OR p.proname IN ('enqueue_job', 'enqueue_job_as_user'))"
        "   AND NOT coalesce('search_path=\"\"' = ANY (p.proconfig), false)"
    )
    assert definers_with_a_search_path == []


def test_the_rpc_entry_point_enqueues_for_service_role(owner: pg8000.native.Connection) -> None:
    tenant = uuid.uuid4()
    owner.run("BEGIN")
    try:
        owner.run("SET LOCAL ROLE service_role")
        [[job_id]] = owner.run(
            "SELECT public.enqueue_job(CAST(:t AS uuid), 'ingest_slack', '{\"channel\": \"C1\"}')",
            t=str(tenant),
        )
        owner.run("RESET ROLE")
        [[found]] = owner.run(
            "SELECT tenant_id FROM queue_worker.queue_jobs WHERE id = CAST(:id AS uuid)",
            id=str(job_id),
        )
    finally:
        owner.run("ROLLBACK")
    assert found == tenant


def enable_user_enqueue(owner: pg8000.native.Connection, job_type: str, max_bytes: int) -> None:
    owner.run("SELECT queue_worker.allow_user_enqueue(:t, :n)", t=job_type, n=max_bytes)
    owner.run(f"GRANT EXECUTE ON FUNCTION {USER_WRAPPER} TO authenticated")


def user(tenant: uuid.UUID | str | None, **extra: Any) -> dict[str, Any]:
    """The JWT claims PostgREST sets for a signed-in user of `tenant`."""
    claims: dict[str, Any] = {"role": "authenticated", "sub": str(uuid.uuid4()), **extra}
    if tenant is not None:
        claims["app_metadata"] = {"tenant_id": str(tenant)}
    return claims


def test_without_the_opt_in_the_user_wrapper_is_refused(owner: pg8000.native.Connection) -> None:
    owner.run("SELECT queue_worker.allow_user_enqueue('ingest_slack', 1024)")
    sql = "SELECT public.enqueue_job_as_user('ingest_slack', '{}')"
    assert attempt_as(owner, "authenticated", sql, user(uuid.uuid4())) == "42501"


def test_a_user_enqueues_only_for_the_tenant_of_their_jwt(owner: pg8000.native.Connection) -> None:
    # Given the wrapper enabled for ingest_slack (payloads up to 100 bytes)
    enable_user_enqueue(owner, "ingest_slack", 100)
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    [[job_of_b]] = owner.run(
        "SELECT queue_worker.enqueue_job(CAST(:t AS uuid), 'ingest_slack')", t=str(tenant_b)
    )

    # When a user of tenant A enqueues, the job is A's, whatever else the token says
    owner.run("BEGIN")
    try:
        owner.run("SET LOCAL ROLE authenticated")
        claims = user(tenant_a, user_metadata={"tenant_id": str(tenant_b)}, tenant_id=str(tenant_b))
        owner.run("SELECT set_config('request.jwt.claims', :c, true)", c=json.dumps(claims))
        [[job_id]] = owner.run("SELECT public.enqueue_job_as_user('ingest_slack', '{\"x\": 1}')")
        owner.run("RESET ROLE")
        [[tenant]] = owner.run(
            "SELECT tenant_id FROM queue_worker.queue_jobs WHERE id = CAST(:id AS uuid)",
            id=str(job_id),
        )
    finally:
        owner.run("ROLLBACK")
    assert tenant == tenant_a

    # And anything else is refused: another job type, a payload over the limit, a dependency on
    # tenant B's job, no tenant in the token, a tenant that is not a uuid, and anon altogether
    refused = {
        "job type": ("SELECT public.enqueue_job_as_user('generate_digest', '{}')", user(tenant_a)),
        "size": (
            f"SELECT public.enqueue_job_as_user('ingest_slack', '{{\"x\": \"{'y' * 200}\"}}')",
            user(tenant_a),
        ),
        "dependency": (
            f"SELECT public.enqueue_job_as_user('ingest_slack', '{{}}', NULL, NULL,"
            f" ARRAY['{job_of_b}']::uuid[])",
            user(tenant_a),
        ),
        "no tenant": ("SELECT public.enqueue_job_as_user('ingest_slack', '{}')", user(None)),
        "bad tenant": ("SELECT public.enqueue_job_as_user('ingest_slack', '{}')", user("b; x")),
    }
    for what, (sql, claims) in refused.items():
        assert attempt_as(owner, "authenticated", sql, claims) is not None, what
    assert (
        attempt_as(
            owner, "anon", "SELECT public.enqueue_job_as_user('ingest_slack', '{}')", user(tenant_a)
        )
        is not None
    )
    # And the user still reaches nothing else of the queue
    sql = "SELECT * FROM queue_worker.claim_jobs('x')"
    assert attempt_as(owner, "authenticated", sql, user(tenant_a)) == "42501"


@pytest.fixture
def login(supabase: dict[str, Any]) -> Iterator[Callable[[str], pg8000.native.Connection]]:
    opened: list[pg8000.native.Connection] = []

    def _login(role: str) -> pg8000.native.Connection:
        conn = connection.connect(supabase["settings"].replace(user=role, password=None))
        opened.append(conn)
        return conn

    yield _login
    for conn in opened:
        conn.close()


def refused(conn: pg8000.native.Connection, sql: str, **params: Any) -> str | None:
    try:
        conn.run(sql, **params)
    except pg8000.native.DatabaseError as exc:
        return str(exc.args[0]["C"])
    return None


def test_the_worker_role_calls_what_a_batch_needs_and_nothing_else(
    owner: pg8000.native.Connection, login: Callable[[str], pg8000.native.Connection]
) -> None:
    worker = login(WORKER_LOGIN)
    tenant = uuid.uuid4()
    # What a batch needs: the schema version, enqueue, claim, settle, the backlog
    assert refused(worker, "SELECT queue_worker.queue_schema_version()") is None
    [[job_id]] = worker.run(
        "SELECT queue_worker.enqueue_job(CAST(:t AS uuid), 'ingest_slack')", t=str(tenant)
    )
    claimed = worker.run("SELECT id, attempts FROM queue_worker.claim_jobs('w1', 60, 10, 10)")
    assert claimed == [[job_id, 1]]
    settled = worker.run(
        "SELECT result FROM queue_worker.settle_jobs('w1', CAST(:o AS jsonb))",
        o=json.dumps([{"id": str(job_id), "attempt": 1, "outcome": "completed"}]),
    )
    assert settled == [["completed"]]
    assert refused(worker, "SELECT * FROM queue_worker.queue_backlog()") is None
    # And nothing an operator does, nor any table directly
    for sql in (
        "SELECT queue_worker.requeue_dead_letter(gen_random_uuid())",
        "SELECT queue_worker.cancel_job(gen_random_uuid())",
        "SELECT * FROM queue_worker.queue_prune(now(), now(), 10)",
        "SELECT queue_worker.upsert_schedule(gen_random_uuid(), 'n', 't', '0 * * * *')",
        "SELECT * FROM queue_worker.queue_stats()",
        "SELECT * FROM queue_worker.queue_jobs",
        "DELETE FROM queue_worker.queue_worker_migrations",
    ):
        assert refused(worker, sql) == "42501", sql


def test_the_operator_role_requeues_cancels_prunes_and_manages_schedules(
    owner: pg8000.native.Connection, login: Callable[[str], pg8000.native.Connection]
) -> None:
    operator = login(OPERATOR_LOGIN)
    tenant = uuid.uuid4()
    [[job_id]] = operator.run(
        "SELECT queue_worker.enqueue_job(CAST(:t AS uuid), 'ingest_slack')", t=str(tenant)
    )
    assert operator.run("SELECT queue_worker.cancel_job(CAST(:id AS uuid))", id=str(job_id)) == [
        [True]
    ]
    for sql in (
        "SELECT * FROM queue_worker.queue_prune(now() - interval '1 day', now(), 10)",
        "SELECT queue_worker.requeue_dead_letters()",
        "SELECT queue_worker.upsert_schedule(gen_random_uuid(), 'n', 't', '0 * * * *')",
        "SELECT * FROM queue_worker.queue_stats()",
        "SELECT * FROM queue_worker.list_dead_letters()",
    ):
        assert refused(operator, sql) is None, sql
    # Row-level security: not even an operator reads a table directly
    assert refused(operator, "SELECT * FROM queue_worker.queue_jobs") == "42501"


def url_of_login(server_url: str, database: str, role: str) -> str:
    """The server's URL for `role` (trust, no password) and `database`."""
    parts = urlsplit(server_url)
    where = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{where}", path=f"/{database}"))


@pytest.mark.parametrize(
    ("run_mode", "event"),
    [("batch", {}), ("rounds", json.loads(SCHEDULED_EVENT.read_text()))],
    ids=["batch", "rounds-lingering"],
)
def test_the_worker_role_runs_a_whole_invocation_through_the_lambdas_code_path(
    owner: pg8000.native.Connection,
    supabase: dict[str, Any],
    server_url: str,
    run_mode: str,
    event: dict[str, Any],
) -> None:
    # Given jobs that complete, one the function refuses for now (503), one with no route, and a
    # worker that logs in as a role granted queue_worker_runtime only
    tenant = str(uuid.uuid4())
    enqueue = "SELECT queue_worker.enqueue_job(CAST(:t AS uuid), :type, CAST(:p AS jsonb))"
    done = [
        owner.run(enqueue, t=tenant, type=job_type, p="{}")[0][0]
        for job_type in ("ingest_slack", "process_embeddings", "generate_digest")
    ]
    [[busy]] = owner.run(enqueue, t=tenant, type="ingest_microsoft", p=SIMULATE_503)
    [[lost]] = owner.run(enqueue, t=tenant, type="no_such_type", p="{}")
    # and two recurring schedules: one whose first fire time is not computed yet, one due now
    schedule = (
        "SELECT queue_worker.upsert_schedule(CAST(:t AS uuid), :name, 'ingest_slack',"
        " '0 * * * *', p_next_fire_at => CAST(:at AS timestamptz))"
    )
    owner.run(schedule, t=tenant, name="new", at=None)
    owner.run(schedule, t=tenant, name="due", at="2000-01-01T00:00:00Z")
    database = supabase["settings"].database
    with StandIn() as functions:
        env = {
            "DATABASE_URL": url_of_login(server_url, database, WORKER_LOGIN),
            "FUNCTIONS_BASE_URL": functions.base_url,
            "SUPABASE_SERVICE_ROLE_KEY": "k",
            "IDEMPOTENCY_STORE": "postgres",
            "RUN_MODE": run_mode,
        }
        worker = Worker(parse_settings(env))
        try:
            # When it runs one invocation (in rounds, a scheduled one, which lingers when idle)
            summary, backlog = worker.run(parse_event(event), remaining_seconds=8, request_id="w")
        finally:
            worker.close()
    # Then every step had the privileges it needed: the schedules fired (the due one enqueued
    # its job), every job claimed, sent and settled every way
    assert summary.scheduled_jobs_created == 1
    assert (summary.claimed, summary.completed, summary.unsettled) == (6, 4, 0)
    assert (summary.retried, summary.dead_lettered) == (1, 1)
    statuses = dict(owner.run("SELECT id, status FROM queue_worker.queue_jobs"))
    assert {statuses[job] for job in done} == {"completed"}
    unset = owner.run("SELECT name FROM queue_worker.queue_schedules WHERE next_fire_at IS NULL")
    assert unset == []
    assert statuses[busy] == "pending"
    [[reason]] = owner.run(
        "SELECT reason FROM queue_worker.queue_jobs_dead_letter WHERE id = :id", id=lost
    )
    assert "No route" in reason
    assert backlog.due_now == 0
    # and the idempotency records, function limits and routes it keeps were written
    assert owner.run("SELECT count(*) FROM queue_worker.queue_idempotency")[0][0] >= 3
    assert owner.run("SELECT count(*) FROM queue_worker.queue_routes")[0][0] >= 5
