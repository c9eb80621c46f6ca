"""`queue-worker`: the command line (DESIGN section 8).

With no DATABASE_URL, every command uses the embedded PostgreSQL in `.queue-worker/pgdata`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from handler.errors import EXIT_STATUS, EventError, QueueRefusedError, UserError
from handler.local import embedded
from handler.local.schedules_command import add_schedule_commands
from handler.queue import connection, migrations
from handler.queue.store import QueueStore


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.command(args)
    except UserError as exc:
        print(f"queue-worker: {exc}", file=sys.stderr)
        return EXIT_STATUS[exc.kind]
    return result


def database_url() -> str:
    """DATABASE_URL, or the embedded server's (started on first use)."""
    return os.environ.get("DATABASE_URL") or embedded.start()


def _open_store() -> QueueStore:
    """A store on the database, its schema checked (not changed) on first use."""
    settings = connection.parse_database_url(database_url())
    return QueueStore(lambda: connection.connect(settings))


@contextlib.contextmanager
def _store() -> Iterator[QueueStore]:
    """A store whose connection is closed when the command is done. Only `migrate` changes
    the schema: a database that is not migrated, or is behind, is refused with one line."""
    store = _open_store()
    try:
        yield store
    finally:
        store.close()


# Commands ---------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    conn = connection.connect(connection.parse_database_url(database_url()))
    try:
        if args.check:
            missing = migrations.pending(conn)
            changed = migrations.changed_since_applied(conn)
        else:
            applied = migrations.migrate(conn)
            changed = migrations.changed_since_applied(conn)
    finally:
        conn.close()
    if args.check:
        if missing:
            print(f"pending: {', '.join(missing)} (run `queue-worker migrate`)")
            return 1
        print("up to date: nothing to apply")
        return 0
    print(f"applied: {', '.join(applied)}" if applied else "up to date: nothing to apply")
    if changed:
        print(
            f"warning: {', '.join(changed)} changed since applied (not re-run); "
            "put schema changes in a new migration",
            file=sys.stderr,
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One batch through the same code path as the Lambda, printing the summary."""
    from handler.runtime.events import parse_event
    from handler.runtime.settings import parse_settings
    from handler.runtime.worker import Worker, local_request_id, report

    env = dict(os.environ)
    env.setdefault("DATABASE_URL", database_url())
    settings = parse_settings(env)
    event: Any = _event_argument(args.event) if args.event is not None else {}
    if isinstance(event, dict):  # anything else: parse_event names what is wrong with it
        # `is not None`: a 0 or an empty tenant is a mistake parse_event names, not "unset".
        if args.tenant is not None:
            event["tenant_id"] = args.tenant
        if args.max_jobs is not None:
            event["max_jobs"] = args.max_jobs
    invocation = parse_event(event)
    worker = Worker(settings)
    try:
        # stdout carries the summary (and the EMF documents with --metrics); log lines go to
        # stderr, so that a script can read the summary.
        with _logs_to_stderr():
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
    with _store() as store:
        job_id = store.enqueue(
            args.tenant,
            args.job_type,
            args.payload,
            priority=args.priority,
            scheduled_at=args.at,
            max_attempts=args.max_attempts,
            unique_key=args.unique_key,
            depends_on=args.depends_on or None,
        )
    print(job_id)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _store() as store:
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
    with _store() as store:
        rows = store.dead_letters(tenant_id=args.tenant, job_type=args.job_type, limit=args.limit)
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
    if not args.ids and not args.all:
        print(
            "queue-worker: name job ids, or --all (with optional --tenant/--job-type)",
            file=sys.stderr,
        )
        return 2
    with _store() as store:
        for job_id in args.ids:
            try:
                print(store.requeue_dead_letter(job_id))
            except QueueRefusedError as exc:
                # The SQL function's own message: not a dead letter, or its unique key is taken.
                print(f"queue-worker: {exc}", file=sys.stderr)
                return 1
        if args.ids:
            return 0
        count = store.requeue_dead_letters(
            tenant_id=args.tenant, job_type=args.job_type, limit=args.limit
        )
    print(f"requeued {count}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from handler.local.demo import run_demo

    return run_demo(keep_database=args.keep, verbose=args.verbose)


# Plumbing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    from handler.operate.observability import logger

    handler = logger.registered_handler
    if not isinstance(handler, logging.StreamHandler):
        yield
        return
    previous = handler.stream
    handler.stream = sys.stderr
    try:
        yield
    finally:
        handler.stream = previous


def _event_argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EventError("(event)", f"is not valid JSON: {exc.msg} at position {exc.pos}") from None


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uuid: {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at position {exc.pos})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {type(value).__name__}")
    return value


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queue-worker", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="command")

    p = sub.add_parser("migrate", help="apply missing migrations (safe to run twice)")
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 when migrations are pending (for a deploy pipeline)",
    )
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
    p.add_argument("tenant", type=_uuid, help="tenant uuid")
    p.add_argument("job_type")
    p.add_argument(
        "payload", nargs="?", type=_json_object, default="{}", help="a JSON object (default {})"
    )
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--at", type=_timestamp, help="ISO-8601 time it becomes due (default now)")
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--unique-key")
    p.add_argument("--depends-on", type=_uuid, nargs="*", metavar="JOB_ID")
    p.set_defaults(command=cmd_enqueue)

    p = sub.add_parser("stats", help="counts by status and job type, backlog, dead letters")
    p.set_defaults(command=cmd_stats)

    p = sub.add_parser("dead-letters", help="list or requeue dead letters")
    dead = p.add_subparsers(required=True, metavar="action")
    q = dead.add_parser("list", help="newest first")
    q.add_argument("--tenant", type=_uuid)
    q.add_argument("--job-type")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(command=cmd_dead_letters_list)
    q = dead.add_parser("requeue", help="move back to the queue: ids, or --all with filters")
    q.add_argument("ids", type=_uuid, nargs="*", metavar="JOB_ID")
    q.add_argument("--all", action="store_true")
    q.add_argument("--tenant", type=_uuid)
    q.add_argument("--job-type")
    q.add_argument("--limit", type=int, default=1000)
    q.set_defaults(command=cmd_dead_letters_requeue)

    add_schedule_commands(sub, _open_store)

    p = sub.add_parser(
        "demo", help="the whole system on an embedded PostgreSQL and stand-in functions"
    )
    p.add_argument("--keep", action="store_true", help="keep the demo database afterwards")
    p.add_argument("--verbose", action="store_true", help="show the worker's JSON log lines")
    p.set_defaults(command=cmd_demo)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
