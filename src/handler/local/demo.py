"""`queue-worker demo`: the whole system on one machine, in seconds.

An embedded PostgreSQL (or DATABASE_URL), a fresh database, the stand-in functions, jobs of every
type for three tenants plus one of each failure kind, one batch through the Lambda's code path,
and what became of every job.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from handler.dispatch.routes import DEFAULT_ROUTES
from handler.local import embedded
from handler.local.standin import StandIn
from handler.operate.observability import logger
from handler.queue import connection, migrations
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.settings import parse_settings
from handler.runtime.worker import Worker, local_request_id

DEMO_DATABASE = "queue_worker_demo"
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


def run_demo(*, keep_database: bool = False, verbose: bool = False) -> int:
    if not verbose:
        logger.setLevel("ERROR")  # the job lines would drown the table below; --verbose shows them
    server_url = os.environ.get("DATABASE_URL") or embedded.start()
    print(f"PostgreSQL: {connection.parse_database_url(server_url).describe()}")
    url = _fresh_database(server_url)
    tenants = [uuid.uuid4() for _ in range(3)]
    with StandIn() as standin:
        standin.configure("calendar-sync", {"status": 401, "body": "invalid JWT"})
        standin.configure("legacy-export", {"status": 404, "body": "Function not found"})
        print(f"Stand-in functions: {standin.base_url}")
        env = {
            "DATABASE_URL": url,
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
        settings = parse_settings(env)
        store = QueueStore(connection.connect(settings.database_settings()))
        expected = _seed(store, tenants)
        print(f"Enqueued {len(expected)} jobs for {len(tenants)} tenants.\n")

        worker = Worker(settings)
        try:
            summary, backlog = worker.run(
                parse_event({"max_jobs": 100}), remaining_seconds=60, request_id=local_request_id()
            )
        finally:
            worker.close()
        received = len(standin.requests())

    print("Summary (what the Lambda returns):")
    print(json.dumps(summary.as_dict(), indent=2))
    print(f"\nThe stand-in received {received} calls; {backlog.due_now} jobs are still due now.\n")
    print(f"{'job type':<22} {'now':<12} {'attempts':>8}  expected")
    for job_id, (job_type, note) in expected.items():
        job = store.get_job(job_id)
        dead = None if job else store.get_dead_letter(job_id)
        state = job.status if job else ("dead letter" if dead else "?")
        attempts = job.attempts if job else (dead.attempts if dead else 0)
        print(f"{job_type:<22} {state:<12} {attempts:>8}  {note}")
    store.conn.close()
    if keep_database:
        print(f"\nDatabase kept: DATABASE_URL={_redacted(url)} queue-worker stats")
    else:
        _drop_database(server_url)
    return 0


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


def _fresh_database(server_url: str) -> str:
    _drop_database(server_url)
    admin = connection.connect(connection.parse_database_url(server_url))
    admin.run(f'CREATE DATABASE "{DEMO_DATABASE}"')
    admin.close()
    settings = replace(connection.parse_database_url(server_url), database=DEMO_DATABASE)
    conn = connection.connect(settings)
    migrations.migrate(conn)
    conn.close()
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{DEMO_DATABASE}"))


def _drop_database(server_url: str) -> None:
    admin = connection.connect(connection.parse_database_url(server_url))
    admin.run(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
    admin.close()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
