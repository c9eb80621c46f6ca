"""`queue-worker`: the command line (DESIGN section 8).

With no DATABASE_URL, every command uses the embedded PostgreSQL in `.queue-worker/pgdata`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import pg8000.native

from handler import db, embedded, migrations
from handler.errors import ConfigurationError, EventError
from handler.schedules_cli import add_schedule_commands
from handler.store import QueueStore


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.command(args)
    except (ConfigurationError, EventError) as exc:
        print(f"queue-worker: {exc}", file=sys.stderr)
        return 2
    except db.DatabaseUnavailableError as exc:
        print(f"queue-worker: {exc}", file=sys.stderr)
        return 3
    return result


def database_url() -> str:
    """DATABASE_URL, or the embedded server's (started on first use)."""
    return os.environ.get("DATABASE_URL") or embedded.start()


def _store() -> QueueStore:
    conn = db.connect(db.parse_database_url(database_url()))
    return QueueStore(conn)


# Commands ---------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    conn = db.connect(db.parse_database_url(database_url()))
    applied = migrations.migrate(conn)
    print(f"applied: {', '.join(applied)}" if applied else "up to date: nothing to apply")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One batch through the same code path as the Lambda, printing the summary."""
    from handler.config import parse_settings
    from handler.events import parse_event
    from handler.worker import Worker, local_request_id, report

    env = dict(os.environ)
    env.setdefault("DATABASE_URL", database_url())
    settings = parse_settings(env)
    event: dict[str, Any] = json.loads(args.event) if args.event else {}
    if args.tenant:
        event["tenant_id"] = args.tenant
    if args.max_jobs:
        event["max_jobs"] = args.max_jobs
    invocation = parse_event(event)
    _ensure_migrated(settings.database_settings())
    worker = Worker(settings)
    try:
        summary, backlog = worker.run(
            invocation, remaining_seconds=args.budget, request_id=local_request_id()
        )
        if args.metrics:
            report(summary, backlog)
    finally:
        worker.close()
    print(json.dumps(summary.as_dict() | {"queue_depth": backlog.due_now}, indent=2))
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    store = _store()
    _ensure_migrated_conn(store)
    payload = json.loads(args.payload)
    job_id = store.enqueue(
        UUID(args.tenant),
        args.job_type,
        payload,
        priority=args.priority,
        scheduled_at=datetime.fromisoformat(args.at) if args.at else None,
        max_attempts=args.max_attempts,
        unique_key=args.unique_key,
        depends_on=[UUID(d) for d in args.depends_on] if args.depends_on else None,
    )
    print(job_id)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = _store()
    _ensure_migrated_conn(store)
    stats = store.stats()
    print(
        json.dumps(
            {
                "by_status": stats.by_status,
                "due_now": stats.due_now,
                "oldest_due_age_seconds": round(stats.oldest_due_age_seconds, 3),
                "dead_letters": stats.dead_letters,
                "by_job_type": stats.by_job_type,
            },
            indent=2,
        )
    )
    return 0


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    store = _store()
    _ensure_migrated_conn(store)
    rows = store.dead_letters(
        tenant_id=UUID(args.tenant) if args.tenant else None,
        job_type=args.job_type,
        limit=args.limit,
    )
    for row in rows:
        print(
            json.dumps(
                {
                    "id": str(row.id),
                    "tenant_id": str(row.tenant_id),
                    "job_type": row.job_type,
                    "attempts": row.attempts,
                    "dead_at": row.dead_at.isoformat(),
                    "reason": row.reason,
                    "last_error": row.last_error,
                }
            )
        )
    if not rows:
        print("no dead letters", file=sys.stderr)
    return 0


def cmd_dead_letters_requeue(args: argparse.Namespace) -> int:
    store = _store()
    _ensure_migrated_conn(store)
    if args.ids:
        for job_id in args.ids:
            print(store.requeue_dead_letter(UUID(job_id)))
        return 0
    if not args.all:
        print(
            "queue-worker: name job ids, or --all (with optional --tenant/--job-type)",
            file=sys.stderr,
        )
        return 2
    count = store.requeue_dead_letters(
        tenant_id=UUID(args.tenant) if args.tenant else None,
        job_type=args.job_type,
        limit=args.limit,
    )
    print(f"requeued {count}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from handler.demo import run_demo

    return run_demo(keep_database=args.keep, verbose=args.verbose)


# Plumbing ---------------------------------------------------------------------------------


def _ensure_migrated(settings: db.ConnectionSettings) -> None:
    conn = db.connect(settings)
    try:
        migrations.migrate(conn)
    finally:
        conn.close()


def _migrated_connection() -> pg8000.native.Connection:
    conn = db.connect(db.parse_database_url(database_url()))
    migrations.migrate(conn)
    return conn


def _ensure_migrated_conn(store: QueueStore) -> None:
    migrations.migrate(store.conn)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queue-worker", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="command")

    p = sub.add_parser("migrate", help="apply missing migrations (safe to run twice)")
    p.set_defaults(command=cmd_migrate)

    p = sub.add_parser("run", help="run one batch, as the Lambda would, and print the summary")
    p.add_argument("--tenant", help="only this tenant (uuid)")
    p.add_argument("--max-jobs", type=int, help="per-tenant cap for this run")
    p.add_argument("--event", help="a JSON event, as the Lambda would receive it")
    p.add_argument(
        "--budget", type=float, default=60.0, help="seconds this run may take (default 60)"
    )
    p.add_argument("--metrics", action="store_true", help="print the EMF metrics too")
    p.set_defaults(command=cmd_run)

    p = sub.add_parser("enqueue", help="add a job")
    p.add_argument("tenant", help="tenant uuid")
    p.add_argument("job_type")
    p.add_argument("payload", nargs="?", default="{}", help="a JSON object (default {})")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--at", help="ISO-8601 time it becomes due (default now)")
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--unique-key")
    p.add_argument("--depends-on", nargs="*", metavar="JOB_ID")
    p.set_defaults(command=cmd_enqueue)

    p = sub.add_parser("stats", help="counts by status and job type, backlog, dead letters")
    p.set_defaults(command=cmd_stats)

    p = sub.add_parser("dead-letters", help="list or requeue dead letters")
    dead = p.add_subparsers(required=True, metavar="action")
    q = dead.add_parser("list", help="newest first")
    q.add_argument("--tenant")
    q.add_argument("--job-type")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(command=cmd_dead_letters_list)
    q = dead.add_parser("requeue", help="move back to the queue: ids, or --all with filters")
    q.add_argument("ids", nargs="*", metavar="JOB_ID")
    q.add_argument("--all", action="store_true")
    q.add_argument("--tenant")
    q.add_argument("--job-type")
    q.add_argument("--limit", type=int, default=1000)
    q.set_defaults(command=cmd_dead_letters_requeue)

    add_schedule_commands(sub, _migrated_connection)

    p = sub.add_parser(
        "demo", help="the whole system on an embedded PostgreSQL and stand-in functions"
    )
    p.add_argument("--keep", action="store_true", help="keep the demo database afterwards")
    p.add_argument("--verbose", action="store_true", help="show the worker's JSON log lines")
    p.set_defaults(command=cmd_demo)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
