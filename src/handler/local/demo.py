"""`queue-worker demo`: the whole system on one machine, in seconds.

A database of the demo's own (on DATABASE_URL's server, or in an embedded PostgreSQL of its
own), the stand-in functions, jobs of every type for three tenants plus one of each failure
kind, one batch through the Lambda's code path, and what became of every job. It drops or
deletes only what it created, and with --keep prints a command that looks at what it kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from handler.dispatch.routes import DEFAULT_ROUTES
from handler.errors import UsageError
from handler.local import embedded
from handler.local.database import say
from handler.local.standin import StandIn
from handler.operate.observability import logger
from handler.queue import connection, migrations
from handler.queue.connection import ConnectionSettings, parse_database_url
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.settings import parse_database_settings, parse_settings
from handler.runtime.worker import Worker, local_request_id

# The demo's databases on a server: this prefix and a random suffix, one per run.
DEMO_DATABASE_PREFIX = "queue_worker_demo_"
DEMO_KEY = "demo-service-role-key"

# (job type, payload, what the stand-in is told to do, what the demo expects to see)
FAILURES: list[tuple[str, dict[str, Any], str]] = [
    (
        "ingest_slack",
        {"simulate": {"status": 500, "body": "upstream exploded"}},
        "500: retried with backoff",
    ),
    (
        "process_embeddings",
        {"simulate": {"status": 422, "body": '{"error":"text too long"}'}},
        "422: dead-lettered",
    ),
    (
        "ingest_microsoft",
        {"simulate": {"status": 429, "headers": {"Retry-After": "30"}}},
        "429: rescheduled in 30 s, attempt not counted",
    ),
    (
        "generate_digest",
        {"simulate": {"status": 503, "headers": {"Retry-After": "60"}}},
        "503 + Retry-After: rescheduled",
    ),
    ("prioritize_activities", {"simulate": {"hang": True}}, "hangs: timed out, retried"),
    ("ingest_slack", {"simulate": {"garbage": True}}, "not HTTP: network error, retried"),
    ("send_fax", {}, "unknown job type: dead-lettered"),
    ("sync_calendar", {}, "401: retried; circuit opens for calendar-sync"),
    ("sync_calendar", {}, "released by the open circuit (attempt not counted)"),
    ("legacy_export", {}, "404: function not deployed, retried"),
]


def run_demo(
    *, keep_database: bool = False, verbose: bool = False, data_dir: Path | None = None
) -> int:
    config = parse_database_settings(os.environ)
    if config is not None and data_dir is not None:
        raise UsageError(
            "--data-dir names where the demo's embedded database goes, but DATABASE_URL (or "
            "DATABASE_SECRET_ARN) is set and names the server to use: drop one of them"
        )
    with contextlib.ExitStack() as cleanup:
        if config is None:
            where = _embedded_database(data_dir, keep=keep_database, cleanup=cleanup)
        else:
            where = _server_database(
                config.connection_settings(), keep=keep_database, cleanup=cleanup
            )
        print(f"PostgreSQL: {where.settings.describe()}")
        tenants = [uuid.uuid4() for _ in range(3)]
        with StandIn() as standin:
            standin.configure("calendar-sync", {"status": 401, "body": "invalid JWT"})
            standin.configure("legacy-export", {"status": 404, "body": "Function not found"})
            print(f"Stand-in functions: {standin.base_url}")
            env = {
                # parse_settings wants a database; the demo's own replaces it below.
                "DATABASE_URL": "postgresql://demo@localhost/demo",
                "FUNCTIONS_BASE_URL": standin.base_url,
                "SUPABASE_SERVICE_ROLE_KEY": DEMO_KEY,
                "HTTP_TIMEOUT_SECONDS": "2",
                "IDEMPOTENCY_STORE": "postgres",
                "JOB_ROUTES": json.dumps(
                    {
                        "sync_calendar": {"function": "calendar-sync", "max_concurrency": 1},
                        "legacy_export": "legacy-export",
                    }
                ),
            }
            settings = parse_settings(env).replace(database=where.settings)
            store = QueueStore(connection.connect(where.settings))
            cleanup.callback(store.conn.close)
            expected = _seed(store, tenants)
            print(f"Enqueued {len(expected)} jobs for {len(tenants)} tenants.\n")

            worker = Worker(settings)
            with _worker_logs(verbose=verbose) as logged:
                try:
                    summary, backlog = worker.run(
                        parse_event({"max_jobs": 100}),
                        remaining_seconds=60,
                        request_id=local_request_id(),
                    )
                finally:
                    worker.close()
            received = len(standin.requests())

        print("Summary (what the Lambda returns):")
        print(json.dumps(summary.as_dict(), indent=2))
        print(
            f"\nThe stand-in received {received} calls; {backlog.due_now} jobs are still due now.\n"
        )
        print(f"{'job type':<22} {'now':<12} {'attempts':>8}  expected")
        for job_id, (job_type, note) in expected.items():
            job = store.get_job(job_id)
            dead = None if job else store.get_dead_letter(job_id)
            state = job.status if job else ("dead letter" if dead else "?")
            attempts = job.attempts if job else (dead.attempts if dead else 0)
            print(f"{job_type:<22} {state:<12} {attempts:>8}  {note}")
        _show_logged(logged)
        if keep_database:
            print(f"\n{where.kept}")
    return 0


@dataclass(frozen=True)
class _DemoDatabase:
    settings: ConnectionSettings = field(repr=False)  # where the demo's jobs go
    kept: str  # what to say when it is kept: where it is and a command that looks at it


def _embedded_database(
    data_dir: Path | None, *, keep: bool, cleanup: contextlib.ExitStack
) -> _DemoDatabase:
    """An embedded cluster of the demo's own, new: in a temporary folder deleted at exit, or
    (keep) in a new folder beside the data folder, which the printed command starts again."""
    if keep:
        parent = embedded.data_dir(data_dir)[0].parent
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="demo-", dir=parent))
        server = embedded.open_server(folder)
    else:
        folder = Path(tempfile.mkdtemp(prefix="queue-worker-demo-"))
        server = embedded.open_server(folder, temporary=True)
    fate = "kept" if keep else "deleted afterwards"
    say(f"the demo's own embedded PostgreSQL in {server.data_dir} ({fate})")
    settings = parse_database_url(server.url, variable="the embedded server's URL")
    conn = connection.connect(settings)
    try:
        migrations.migrate(conn)
    finally:
        conn.close()
    folder_arg = shlex.quote(str(server.data_dir))
    return _DemoDatabase(
        settings,
        f"Database kept in {server.data_dir}; look at it with:\n"
        f"  queue-worker --data-dir {folder_arg} stats\n"
        f"(other commands take --data-dir {folder_arg} too; delete the folder when done)",
    )


def _server_database(
    server: ConnectionSettings, *, keep: bool, cleanup: contextlib.ExitStack
) -> _DemoDatabase:
    """A database of the demo's own on the user's server, under a name no one else uses:
    created now and, unless kept, dropped at the end (whatever happens in between). No other
    database is ever dropped."""
    name = f"{DEMO_DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    admin = connection.connect(server)
    try:
        admin.run(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    if not keep:
        cleanup.callback(_drop_database, server, name)
    settings = server.replace(database=name)
    conn = connection.connect(settings)
    try:
        migrations.migrate(conn)
    finally:
        conn.close()
    note = "" if settings.password is None else " (with your password: it is not printed)"
    return _DemoDatabase(
        settings,
        f"Database kept: {name} on {server.describe()}; look at it with{note}:\n"
        f"  DATABASE_URL={shlex.quote(_url_without_password(settings))} queue-worker stats\n"
        f'(drop it when done: DROP DATABASE "{name}")',
    )


def _seed(store: QueueStore, tenants: list[uuid.UUID]) -> dict[uuid.UUID, tuple[str, str]]:
    expected: dict[uuid.UUID, tuple[str, str]] = {}
    first_ingest = None
    for tenant in tenants:
        for job_type in DEFAULT_ROUTES:
            job_id = store.enqueue(tenant, job_type, {"demo": True})
            first_ingest = first_ingest or job_id
            expected[job_id] = (job_type, "2xx: completed")
    for job_type, payload, note in FAILURES:
        expected[store.enqueue(tenants[0], job_type, payload, max_attempts=3)] = (job_type, note)
    assert first_ingest is not None
    waiting = store.enqueue(
        tenants[0], "generate_digest", {"after": str(first_ingest)}, depends_on=[first_ingest]
    )
    expected[waiting] = ("generate_digest", "waited on a dependency; pending for the next batch")
    return expected


def _drop_database(server: ConnectionSettings, name: str) -> None:
    assert name.startswith(DEMO_DATABASE_PREFIX)  # only the demo's own
    admin = connection.connect(server)
    try:
        admin.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def _url_without_password(settings: ConnectionSettings) -> str:
    """A libpq URL to these settings (host or socket, user, database, TLS), the password left
    out."""
    query: dict[str, str] = {}
    if settings.unix_socket is not None:
        netloc = quote(settings.user, safe="") + "@"
        query["host"] = settings.unix_socket.rsplit("/", 1)[0]
        query["port"] = str(settings.port)
    else:
        host = f"[{settings.host}]" if settings.host and ":" in settings.host else settings.host
        netloc = f"{quote(settings.user, safe='')}@{host}:{settings.port}"
        query["sslmode"] = settings.sslmode
        if settings.sslrootcert is not None:
            query["sslrootcert"] = settings.sslrootcert
    path = quote(settings.database, safe="")
    return f"postgresql://{netloc}/{path}?{urlencode(query, safe='/')}"


@contextlib.contextmanager
def _worker_logs(*, verbose: bool) -> Iterator[list[dict[str, Any]]]:
    """The worker's JSON log lines: on stderr as written (verbose), else kept for after the
    table, where the failure cases' expected errors are shown as what they are."""
    logged: list[dict[str, Any]] = []
    handler = logger.registered_handler
    if not isinstance(handler, logging.StreamHandler):
        yield logged
        return
    buffer = io.StringIO()
    previous = handler.stream
    handler.stream = sys.stderr if verbose else buffer
    try:
        yield logged
    finally:
        handler.stream = previous
        for line in buffer.getvalue().splitlines():
            with contextlib.suppress(ValueError):
                logged.append(json.loads(line))


def _show_logged(logged: list[dict[str, Any]]) -> None:
    serious = [line for line in logged if line.get("level") in ("WARNING", "ERROR", "CRITICAL")]
    if not serious:
        return
    print(
        f"\nThe worker logged {len(serious)} warnings and errors; each is one of the failure "
        "cases above, as it\nwould appear in CloudWatch (--verbose shows every log line as it "
        "is written):"
    )
    for line in serious:
        error = str(line.get("error") or line.get("last_error") or "")
        text = f"{line.get('message', '')}: {error}" if error else str(line.get("message", ""))
        if len(text) > 90:
            text = text[:87] + "..."
        print(f"  {line.get('level', '?'):<8} {line.get('job_type', '-'):<22} {text}")
