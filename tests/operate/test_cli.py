"""`queue-worker`, the command line: migrate, enqueue, stats, dead-letters, run and demo.

Each command is called as `handler.cli.main([...])` with DATABASE_URL pointing at the test
database; `run` posts to the stand-in functions. Output is what a person (or a script) reads,
so the tests read it as they would.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import pg8000.native
import pytest

from handler.dispatch.routes import DEFAULT_ROUTES
from handler.local.cli import main
from handler.local.demo import DEMO_DATABASE_PREFIX, FAILURES
from handler.local.standin import StandIn
from handler.queue import connection, migrations
from handler.queue.store import QueueStore

from .conftest import (
    SERVICE_ROLE_KEY,
    as_a_person_runs_it,
    cli_env_of,
    cli_process,
    job_state,
    printed_command,
    run_cli,
)

TENANT = uuid.UUID("0b7f3c52-9e61-4d2a-8f0e-5a1c2d3e4f60")


def dead_letter(queue: QueueStore, conn: pg8000.native.Connection, job_type: str) -> uuid.UUID:
    """A job of that type, already in the dead letter table (rejected by its function). Its
    priority puts it ahead of any other due job for the claim."""
    job = queue.enqueue(TENANT, job_type, {"made": "dead"}, max_attempts=1, priority=1000)
    [claimed] = queue.claim("cli-test", lease_seconds=60, max_jobs=1, max_per_tenant=1)
    assert claimed.id == job
    assert queue.fail(job, "Function rejected the job (422)", retryable=False) == "dead"
    assert job_state(conn, job)["dead"]
    return job


# migrate ----------------------------------------------------------------------------------------


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A database of its own with nothing in it, dropped afterwards."""
    name = f"queue_worker_cli_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(connection.parse_database_url(server_url))
    admin.run(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_url)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    admin.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_migrate_applies_every_migration_then_says_the_database_is_up_to_date(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an empty database
    monkeypatch.setenv("DATABASE_URL", empty_database_url)
    shipped = [migration.version for migration in migrations.available()]
    # When `migrate` runs twice
    first = run_cli(capsys, "migrate")
    second = run_cli(capsys, "migrate")
    # Then the first applies every shipped migration, in order, and the second nothing
    assert first == (0, f"applied: {', '.join(shipped)}\n", "")
    assert second == (0, "up to date: nothing to apply\n", "")
    conn = connection.connect(connection.parse_database_url(empty_database_url))
    try:
        assert migrations.pending(conn) == []
        assert conn.run("SELECT to_regclass('queue_worker.queue_jobs') IS NOT NULL") == [[True]]
    finally:
        conn.close()


def test_migrate_check_exits_1_while_migrations_are_pending_and_0_once_applied(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", empty_database_url)
    status, out, _ = run_cli(capsys, "migrate", "--check")
    assert status == 1
    assert out.startswith("pending: 0001_queue, ")
    assert "run `queue-worker migrate`" in out
    assert run_cli(capsys, "migrate")[0] == 0
    assert run_cli(capsys, "migrate", "--check") == (0, "up to date: nothing to apply\n", "")


def schema_objects(url: str) -> list[list[str]]:
    conn = connection.connect(connection.parse_database_url(url))
    try:
        return conn.run(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        ) + conn.run("SELECT nspname FROM pg_namespace WHERE nspname = 'queue_worker'")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["enqueue", str(TENANT), "ingest_slack"],
        ["dead-letters", "list"],
        ["schedules", "list"],
        ["run"],
    ],
    ids=["stats", "enqueue", "dead-letters", "schedules", "run"],
)
def test_every_command_but_migrate_refuses_an_unmigrated_database_and_changes_nothing(
    empty_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    # Given an empty database (and functions configured, for run)
    monkeypatch.setenv("DATABASE_URL", empty_database_url)
    monkeypatch.setenv("FUNCTIONS_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "k")
    # When a command other than migrate runs
    status, out, err = run_cli(capsys, *argv)
    # Then it fails with one line that names migrate, and creates nothing
    assert status != 0
    assert out == ""
    assert err.count("\n") == 1
    assert "queue-worker migrate" in err
    assert "Traceback" not in err
    assert schema_objects(empty_database_url) == []


# enqueue ----------------------------------------------------------------------------------------


def test_enqueue_prints_the_new_jobs_id_and_the_job_is_queued_as_asked(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # When a job is enqueued with a payload, a priority, a due time and an attempt budget
    at = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    status, out, _ = run_cli(
        capsys,
        "enqueue",
        str(TENANT),
        "ingest_slack",
        '{"channel": "C42"}',
        "--priority",
        "7",
        "--at",
        at.isoformat(),
        "--max-attempts",
        "3",
    )
    # Then it prints the job's id, and that job waits in the queue as asked
    assert status == 0
    job_id = uuid.UUID(out.strip())
    job = queue.get_job(job_id)
    assert job is not None
    assert (job.tenant_id, job.job_type, job.payload) == (
        TENANT,
        "ingest_slack",
        {"channel": "C42"},
    )
    assert (job.status, job.priority, job.max_attempts, job.attempts) == ("pending", 7, 3, 0)
    assert job.scheduled_at == at


def test_enqueue_with_a_unique_key_twice_prints_the_first_jobs_id(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ("enqueue", str(TENANT), "generate_digest", "--unique-key", "digest-2026-11-29")
    first = run_cli(capsys, *argv)
    second = run_cli(capsys, *argv)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]
    assert conn.run("SELECT count(*) FROM queue_jobs") == [[1]]


def test_enqueue_with_depends_on_waits_for_the_named_job(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    first = queue.enqueue(TENANT, "ingest_slack", {})
    status, out, _ = run_cli(
        capsys, "enqueue", str(TENANT), "generate_digest", "--depends-on", str(first)
    )
    assert status == 0
    dependent = uuid.UUID(out.strip())
    claimed = queue.claim("cli-test", lease_seconds=60, max_jobs=10, max_per_tenant=10)
    assert [job.id for job in claimed] == [first]
    assert dependent != first


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["not-a-uuid", "ingest_slack"], "tenant"),
        ([str(TENANT), "ingest_slack", "{not json"], "payload"),
        ([str(TENANT), "ingest_slack", "[1, 2]"], "payload"),
        ([str(TENANT), "ingest_slack", "--at", "tomorrow-ish"], "--at"),
        ([str(TENANT), "ingest_slack", "--depends-on", "nope"], "--depends-on"),
    ],
    ids=["bad-tenant", "payload-not-json", "payload-not-an-object", "bad-at", "bad-depends-on"],
)
def test_enqueue_with_bad_input_names_the_argument_and_enqueues_nothing(
    argv: list[str],
    names: str,
    cli_env: str,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["enqueue", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert names in err
    assert "Traceback" not in err
    assert conn.run("SELECT count(*) FROM queue_jobs") == [[0]]


# stats ------------------------------------------------------------------------------------------


def test_stats_prints_counts_by_status_and_job_type_and_the_backlog_as_json(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given two due jobs, one due later, one completed and one dead letter
    queue.enqueue(TENANT, "ingest_slack", {})
    queue.enqueue(TENANT, "ingest_slack", {})
    queue.enqueue(TENANT, "generate_digest", {}, scheduled_at=datetime.now(UTC) + timedelta(days=1))
    done = queue.enqueue(TENANT, "process_embeddings", {}, priority=9)
    [claimed] = queue.claim("cli-test", lease_seconds=60, max_jobs=1, max_per_tenant=1)
    assert claimed.id == done
    assert queue.complete(done, "cli-test")
    dead_letter(queue, conn, "ingest_microsoft")
    # When `stats` runs
    status, out, _ = run_cli(capsys, "stats")
    # Then it prints one JSON object with the counts
    assert status == 0
    stats = json.loads(out)
    assert stats["by_status"] == {"pending": 3, "completed": 1}
    assert stats["due_now"] == 2
    assert stats["dead_letters"] == 1
    assert stats["by_job_type"] == {
        "ingest_slack": {"pending": 2},
        "generate_digest": {"pending": 1},
        "process_embeddings": {"completed": 1},
    }
    assert stats["oldest_due_age_seconds"] >= 0


# dead-letters -----------------------------------------------------------------------------------


def test_dead_letters_list_prints_one_json_line_per_dead_letter_filtered_by_job_type(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slack = dead_letter(queue, conn, "ingest_slack")
    digest = dead_letter(queue, conn, "generate_digest")
    status, out, _ = run_cli(capsys, "dead-letters", "list")
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert {row["id"] for row in rows} == {str(slack), str(digest)}
    row = next(row for row in rows if row["id"] == str(slack))
    assert (row["tenant_id"], row["job_type"], row["attempts"]) == (str(TENANT), "ingest_slack", 1)
    assert row["last_error"].startswith("Function rejected the job (422)")
    assert row["reason"]
    datetime.fromisoformat(row["dead_at"])
    # filtered by job type
    status, out, _ = run_cli(capsys, "dead-letters", "list", "--job-type", "generate_digest")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [str(digest)]


def test_dead_letters_list_with_none_says_so_on_stderr(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "dead-letters", "list") == (0, "", "no dead letters\n")


def test_dead_letters_requeue_by_id_moves_the_job_back_due_now_with_its_history(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = dead_letter(queue, conn, "ingest_slack")
    other = dead_letter(queue, conn, "ingest_slack")
    status, out, _ = run_cli(capsys, "dead-letters", "requeue", str(job))
    assert (status, out) == (0, f"{job}\n")
    state = job_state(conn, job)
    assert (state["dead"], state["status"], state["attempts"]) == (False, "pending", 0)
    assert len(state["errors"]) == 1  # the failed attempt is still on record
    assert job_state(conn, other)["dead"]


def test_dead_letters_requeue_all_of_one_job_type_leaves_the_others_dead(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slack = [dead_letter(queue, conn, "ingest_slack") for _ in range(3)]
    digest = dead_letter(queue, conn, "generate_digest")
    status, out, _ = run_cli(
        capsys, "dead-letters", "requeue", "--all", "--job-type", "ingest_slack"
    )
    assert (status, out) == (0, "requeued 3\n")
    assert all(job_state(conn, job)["status"] == "pending" for job in slack)
    assert job_state(conn, digest)["dead"]


def test_dead_letters_requeue_with_neither_ids_nor_all_does_nothing_and_returns_2(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = dead_letter(queue, conn, "ingest_slack")
    status, out, err = run_cli(capsys, "dead-letters", "requeue")
    assert (status, out) == (2, "")
    assert "--all" in err
    assert job_state(conn, job)["dead"]


def test_dead_letters_requeue_of_a_job_that_is_not_dead_says_so_without_a_traceback(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pending = queue.enqueue(TENANT, "ingest_slack", {})
    status, out, err = run_cli(capsys, "dead-letters", "requeue", str(pending))
    assert status == 1
    assert out == ""
    assert str(pending) in err
    assert "not in the dead letter table" in err
    assert job_state(conn, pending)["status"] == "pending"


# run --------------------------------------------------------------------------------------------


def test_run_runs_one_batch_against_the_functions_and_prints_the_summary(
    functions_env: StandIn,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given five due jobs of one tenant
    jobs = [queue.enqueue(TENANT, "ingest_slack", {"n": n}) for n in range(5)]
    # When `run` is given an event capping the tenant at three jobs
    status, out, _ = run_cli(capsys, "run", "--event", '{"max_jobs": 3}')
    # Then it ran one batch of three through the functions and printed the summary as JSON
    assert status == 0
    summary = json.loads(out)
    assert (summary["claimed"], summary["completed"], summary["retried"]) == (3, 3, 0)
    assert summary["queue_depth"] == 2
    assert {"dead_lettered", "released", "duration_ms"} <= set(summary)
    requests = functions_env.requests()
    assert len(requests) == 3
    assert {r.headers["authorization"] for r in requests} == {f"Bearer {SERVICE_ROLE_KEY}"}
    states = [job_state(conn, job)["status"] for job in jobs]
    assert sorted(states) == ["completed"] * 3 + ["pending"] * 2


def test_run_with_tenant_and_max_jobs_options_takes_only_that_tenants_jobs(
    functions_env: StandIn, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    other = uuid.uuid4()
    for _ in range(3):
        queue.enqueue(TENANT, "ingest_slack", {})
        queue.enqueue(other, "ingest_slack", {})
    status, out, _ = run_cli(capsys, "run", "--tenant", str(TENANT), "--max-jobs", "2")
    assert status == 0
    assert json.loads(out)["claimed"] == 2
    assert {r.body["tenant_id"] for r in functions_env.requests()} == {str(TENANT)}


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--event", '{"max_jobs": "3"}'], "max_jobs"),
        (["--event", '{"max_jobs": true}'], "max_jobs"),
        (["--event", '{"tenant_id": "tenant-7"}'], "tenant_id"),
        (["--event", '{"colour": "blue"}'], "colour"),
        (
            ["--event", '{"detail-type": "Scheduled Event", "detail": {"max_jobs": 0}}'],
            "detail.max_jobs",
        ),
        (["--event", "{max_jobs: 3}"], "(event)"),
        (["--event", "[1, 2]"], "(event)"),
        (["--max-jobs", "0"], "max_jobs"),
        (["--tenant", "tenant-7"], "tenant_id"),
    ],
    ids=[
        "max-jobs-a-string",
        "max-jobs-a-boolean",
        "tenant-not-a-uuid",
        "unknown-key",
        "rule-detail-max-jobs-zero",
        "not-json",
        "not-an-object",
        "max-jobs-option-zero",
        "tenant-option-not-a-uuid",
    ],
)
def test_run_with_a_malformed_event_names_the_field_returns_2_and_touches_no_job(
    argv: list[str],
    field: str,
    functions_env: StandIn,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = queue.enqueue(TENANT, "ingest_slack", {})
    status, out, err = run_cli(capsys, "run", *argv)
    assert (status, out) == (2, "")
    assert f"'{field}'" in err
    assert err.startswith("queue-worker: event field")
    assert functions_env.requests() == []
    state = job_state(conn, job)
    assert (state["status"], state["attempts"]) == ("pending", 0)


def test_run_without_a_functions_url_names_the_variable_and_returns_2(
    cli_env: str,
    monkeypatch: pytest.MonkeyPatch,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    job = queue.enqueue(TENANT, "ingest_slack", {})
    status, out, err = run_cli(capsys, "run")
    assert (status, out) == (2, "")
    assert err.startswith("queue-worker: SUPABASE_URL is not set")
    assert job_state(conn, job)["attempts"] == 0


def test_run_prints_only_the_summary_on_stdout_and_its_log_lines_on_stderr(
    functions_env: StandIn, database_url: str, queue: QueueStore
) -> None:
    # Given a job that fails (so the worker logs a line about it)
    queue.enqueue(TENANT, "ingest_slack", {"simulate": {"status": 500}})
    env = dict(os.environ) | {
        "DATABASE_URL": database_url,
        "FUNCTIONS_BASE_URL": functions_env.base_url,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
    }
    # When `queue-worker run` runs in its own process
    result = cli_process("run", env=env, timeout=120)
    # Then stdout is the summary alone (a script can parse it), and the log line is on stderr
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["retried"] == 1
    log_lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [line["message"] for line in log_lines if line.get("job_type")] == ["Job not completed"]


# demo -------------------------------------------------------------------------------------------

DEMO_ROW = re.compile(
    r"(?P<job_type>[a-z_]+) +(?P<state>completed|pending|processing|cancelled|dead letter|\?)"
    r" +(?P<attempts>\d+)  (?P<note>.+)"
)
# What the demo's table must show for each failure kind: (state, attempts).
DEMO_OUTCOMES = {
    "500: retried with backoff": ("pending", 1),
    "422: dead-lettered": ("dead letter", 1),
    "429: rescheduled in 30 s, attempt not counted": ("pending", 0),
    "503 + Retry-After: rescheduled": ("pending", 0),
    "hangs: timed out, retried": ("pending", 1),
    "not HTTP: network error, retried": ("pending", 1),
    "unknown job type: dead-lettered": ("dead letter", 1),
    "401: retried; circuit opens for calendar-sync": ("pending", 1),
    "released by the open circuit (attempt not counted)": ("pending", 0),
    "404: function not deployed, retried": ("pending", 1),
}


@pytest.mark.slow
def test_demo_runs_the_whole_system_and_shows_what_became_of_every_kind_of_job(
    server_url: str,
) -> None:
    # Given only a PostgreSQL server (the demo makes its own database and stand-in functions)
    env = dict(os.environ) | {"DATABASE_URL": server_url}
    for name in ("FUNCTIONS_BASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "JOB_ROUTES"):
        env.pop(name, None)
    before = demo_databases(server_url)
    # When `queue-worker demo` runs
    result = cli_process("demo", env=env, timeout=240)
    # Then it succeeds and prints the summary and one row per job, every failure kind included
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # (the worker's log lines of the failure cases, expected, are not printed before the table:
    # they come after it, each as one short line, with what they are)
    before_table, table_and_after = out.split("job type ", 1)
    assert '"level"' not in before_table + result.stderr
    assert "ERROR" not in before_table + result.stderr
    after_table = table_and_after.split("\n\n", 1)[1]
    assert after_table.startswith("The worker logged ")
    assert "  ERROR    sync_calendar " in after_table
    assert "Summary (what the Lambda returns):" in out
    summary_text = out.split("Summary (what the Lambda returns):", 1)[1].split("\n\n", 1)[0]
    summary = json.loads(summary_text)
    seeded = 3 * len(DEFAULT_ROUTES) + len(FAILURES) + 1
    assert summary["claimed"] == seeded - 1  # the dependent job waits for the next batch
    assert summary["completed"] >= 3 * len(DEFAULT_ROUTES)
    assert summary["retried"] >= 1
    assert summary["dead_lettered"] == 2  # the 422 and the unknown type
    assert summary["released"] >= 1  # the circuit opened by the 401
    rows = [DEMO_ROW.fullmatch(line.rstrip()) for line in out.splitlines()]
    table = [(m["job_type"], m["state"], int(m["attempts"]), m["note"]) for m in rows if m]
    assert len(table) == seeded
    for job_type, _, note in FAILURES:
        [shown] = [(s, a) for t, s, a, n in table if (t, n) == (job_type, note)]
        assert shown == DEMO_OUTCOMES[note], note
    completed = [row for row in table if row[3] == "2xx: completed"]
    assert len(completed) == 3 * len(DEFAULT_ROUTES)
    assert {(state, attempts) for _, state, attempts, _ in completed} == {("completed", 1)}
    [waiting] = [row for row in table if row[3].startswith("waited on a dependency")]
    assert waiting[1:3] == ("pending", 0)
    # and it cleaned up after itself: the database it made is gone, no other was touched
    assert demo_databases(server_url) == before


def demo_databases(server_url: str) -> set[str]:
    """The databases on the server whose names the demo's have."""
    admin = connection.connect(connection.parse_database_url(server_url))
    try:
        rows = admin.run(
            "SELECT datname FROM pg_database WHERE starts_with(datname, :prefix)",
            prefix=DEMO_DATABASE_PREFIX,
        )
    finally:
        admin.close()
    return {row[0] for row in rows}


@pytest.fixture
def kept_demo_databases(server_url: str) -> Iterator[None]:
    """Drops, after the test, the demo databases it left (and only those)."""
    before = demo_databases(server_url)
    yield
    admin = connection.connect(connection.parse_database_url(server_url))
    try:
        for name in demo_databases(server_url) - before:
            admin.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.mark.slow
def test_demo_keep_on_a_server_keeps_only_its_own_database_and_prints_a_command_that_works(
    server_url: str, kept_demo_databases: None
) -> None:
    # Given a server with a database that has the demo's old fixed name (someone else's, say)
    admin = connection.connect(connection.parse_database_url(server_url))
    admin.run('DROP DATABASE IF EXISTS "queue_worker_demo"')
    admin.run('CREATE DATABASE "queue_worker_demo"')
    admin.close()
    before = demo_databases(server_url)
    env = cli_env_of(DATABASE_URL=server_url)
    try:
        # When the demo runs with --keep
        result = cli_process("demo", "--keep", env=env, timeout=240)
        assert result.returncode == 0, result.stderr
        # Then it made one database of its own, kept it, and dropped nothing else
        [made] = demo_databases(server_url) - before
        assert made.startswith(DEMO_DATABASE_PREFIX)
        admin = connection.connect(connection.parse_database_url(server_url))
        try:
            names = {row[0] for row in admin.run("SELECT datname FROM pg_database")}
        finally:
            admin.close()
        assert "queue_worker_demo" in names
        # and the command it printed, run as a person would, shows the demo's jobs
        command = printed_command(result.stdout)
        assert made in command
        looked = as_a_person_runs_it(command, cli_env_of())
        assert looked.returncode == 0, looked.stderr
        assert json.loads(looked.stdout)["dead_letters"] == 2
    finally:
        admin = connection.connect(connection.parse_database_url(server_url))
        admin.run('DROP DATABASE IF EXISTS "queue_worker_demo"')
        admin.close()
