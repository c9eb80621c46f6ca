"""`queue-worker`: the queue's command line, for operators and for local runs.

Every command works on the database that DATABASE_URL or DATABASE_SECRET_ARN names (with
DATABASE_SSLROOTCERT), read as the Lambda reads them; with neither set, on an embedded
PostgreSQL in the user's data folder (handler/local/embedded.py). Only `migrate` changes the
schema of a database the user names. Output goes to stdout, in the formats scripts rely on;
every error is one line on stderr, and the exit status says its kind (EXIT_STATUS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from handler.errors import (
    EXIT_STATUS,
    ConfigurationError,
    EventError,
    UsageError,
    UserError,
)
from handler.local import database, embedded
from handler.local.arguments import (
    INT_MIN,
    OneLineParser,
    json_object,
    number,
    timestamp,
    uuid_value,
    whole,
)
from handler.local.schedules_command import add_schedule_commands
from handler.queue import connection, migrations
from handler.queue.store import QueueStore, server_error

DESCRIPTION = """\
The command line of queue-worker: migrate the queue's database, enqueue jobs, run one batch as
the Lambda would, look at the backlog, dead letters, schedules and flow control.

Where: DATABASE_URL (a libpq URL) or DATABASE_SECRET_ARN (a Secrets Manager secret in the RDS
shape), with DATABASE_SSLROOTCERT for TLS, as the Lambda reads them. With neither set, an
embedded PostgreSQL in the user's data folder (~/.local/share/queue-worker/pgdata on Linux);
--data-dir or QUEUE_WORKER_DATA_DIR moves it."""

EPILOG = """\
exit status: 0 done; 1 refused (by the queue, or nothing found to act on); 2 bad usage or
configuration; 3 the database could not be reached; 130 interrupted."""

# 128 + SIGINT, as a shell reports a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
# 128 + SIGPIPE: what a Unix tool whose reader went away (`| head`) exits with.
EXIT_BROKEN_PIPE = 141
# What `run` sends as the service role key to the stand-in functions it starts.
LOCAL_SERVICE_ROLE_KEY = "local-service-role-key"
# Lambda's longest invocation: a local run gets no more.
MAX_BUDGET_SECONDS = 900.0


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point (`queue-worker`). Bad usage exits through argparse (status 2, one line);
    everything else returns the exit status."""
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        args.store_factory = lambda: _open_store(args)  # for the schedules commands
        status: int = args.command(args)
        sys.stdout.flush()  # a closed pipe shows here, while it can still be told quietly
    except UserError as exc:
        database.say(_one_line(str(exc)))
        return EXIT_STATUS[exc.kind]
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as Unix tools do.
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:
        if not isinstance(exc, _Interrupted):  # that one said so when it happened
            database.say("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        refused = server_error(exc)
        if refused is None:
            raise  # a bug of ours: its traceback is what a report needs
        # PostgreSQL refused a statement in a way the queue's API does not name (a value it
        # cannot store, a permission): its own message, in one line.
        database.say(f"PostgreSQL refused the request: {_one_line(refused[1])} [{refused[0]}]")
        return EXIT_STATUS["refused"]
    return status


# The database of a command ----------------------------------------------------------------


def _open_store(args: argparse.Namespace) -> QueueStore:
    """A store on the command's database, its schema checked (not changed) on first use."""
    settings = database.resolve(args.data_dir).connection_settings()
    return QueueStore(lambda: connection.connect(settings))


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[QueueStore]:
    """A store whose connection is closed when the command is done. Only `migrate` changes
    the schema: a database that is not migrated, or is behind, is refused with one line."""
    store = _open_store(args)
    try:
        yield store
    finally:
        store.close()


# Commands ---------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    conn = database.resolve(args.data_dir, migrate_new=False).connect()
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

    event: Any = _event_argument(args.event) if args.event is not None else {}
    if isinstance(event, dict):  # anything else: parse_event names what is wrong with it
        # `is not None`: a 0 or an empty tenant is a mistake parse_event names, not "unset".
        if args.tenant is not None:
            event["tenant_id"] = args.tenant
        if args.max_jobs is not None:
            event["max_jobs"] = args.max_jobs
    invocation = parse_event(event)

    where = database.resolve(args.data_dir)
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        if where.embedded is not None:
            env["DATABASE_URL"] = where.embedded.url
            if not _is_set(env, "SUPABASE_URL") and not _is_set(env, "FUNCTIONS_BASE_URL"):
                # Only on the embedded database, which holds nobody's real jobs: a database the
                # user names gets no stand-in (its jobs would be "completed" without running).
                env["FUNCTIONS_BASE_URL"] = stack.enter_context(_standin())
                if not _is_set(env, "SUPABASE_SERVICE_ROLE_KEY") and not _is_set(
                    env, "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"
                ):
                    env["SUPABASE_SERVICE_ROLE_KEY"] = LOCAL_SERVICE_ROLE_KEY
        settings = parse_settings(env)
        worker = Worker(settings)
        try:
            # stdout carries the summary (and the EMF documents with --metrics); log lines go
            # to stderr, so that a script can read the summary.
            with _logs_to_stderr(), _settling_interrupt():
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
    with _store(args) as store:
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
    with _store(args) as store:
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
    with _store(args) as store:
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
        raise UsageError("name job ids, or --all (with optional --tenant/--job-type)")
    with _store(args) as store:
        for job_id in args.ids:
            # A refusal (not a dead letter, its unique key taken) stops here: the SQL
            # function's own message, exit status 1.
            print(store.requeue_dead_letter(job_id))
        if args.ids:
            return 0
        count = store.requeue_dead_letters(
            tenant_id=args.tenant, job_type=args.job_type, limit=args.limit
        )
    print(f"requeued {count}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    with _store(args) as store:
        reason, message, detail = store.explain(args.job_id)
    if args.json:
        print(json.dumps({"reason": reason, "message": message, "detail": detail}))
    else:
        print(message)
    return 0


def cmd_tenants_set(args: argparse.Namespace) -> int:
    if args.burst is not None and args.rate is None:
        raise UsageError("--burst needs --rate (the burst is the rate limit's bucket size)")
    with _store(args) as store:
        store.set_tenant_limits(args.tenant, weight=args.weight, rate=args.rate, burst=args.burst)
    rate = "no rate limit" if args.rate is None else f"rate {args.rate:g}/s"
    burst = "" if args.burst is None else f", burst {args.burst:g}"
    print(f"set {_whose(args.tenant)}: weight {args.weight:g}, {rate}{burst}")
    return 0


def cmd_tenants_clear(args: argparse.Namespace) -> int:
    with _store(args) as store:
        cleared = store.clear_tenant_limits(args.tenant)
    if not cleared:
        print(f"queue-worker: {_whose(args.tenant)}: none were set", file=sys.stderr)
        return 1
    print(f"cleared {_whose(args.tenant)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from handler.local.demo import run_demo

    return run_demo(keep_database=args.keep, verbose=args.verbose, data_dir=args.data_dir)


# Plumbing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _standin() -> Iterator[str]:
    """The stand-in functions for one run: their base URL, said on stderr."""
    from handler.local.standin import StandIn

    with StandIn() as functions:
        database.say(
            f"no SUPABASE_URL or FUNCTIONS_BASE_URL: calling stand-in functions at "
            f"{functions.base_url} for this run (they answer 200 unless a job's payload says "
            "otherwise)"
        )
        yield functions.base_url


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, already told on stderr."""


@contextlib.contextmanager
def _settling_interrupt() -> Iterator[None]:
    """Ctrl-C during a batch: the calls in flight finish and are settled before the command
    exits (the runner waits for them, each bounded by its timeout), and the user is told at
    once; a second Ctrl-C ends the process there and then, its jobs left to their leases."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal pressed
        if pressed:
            embedded.release_all()  # the exit handlers will not run: stop the server now
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        pressed = True
        database.say(
            "interrupted: letting the calls in flight finish and settling them (Ctrl-C again"
            " stops at once; their jobs then come back when their leases expire)"
        )
        raise _Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _is_set(env: dict[str, str], name: str) -> bool:
    return bool(env.get(name, "").strip())


def _whose(tenant: UUID | None) -> str:
    return f"limits of tenant {tenant}" if tenant is not None else "the default limits"


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


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _drop_stdout() -> None:
    """Points stdout at /dev/null, so that the flush at exit does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _event_argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EventError("(event)", f"is not valid JSON: {exc.msg} at position {exc.pos}") from None


def _rate(text: str) -> float:
    from handler.dispatch.routes import parse_rate

    try:
        rate = parse_rate(text, "--rate")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--rate ")) from None
    assert rate is not None  # only None for None
    return rate


def _parser() -> argparse.ArgumentParser:
    # --data-dir is taken before the command and after it; after it, only when given, so that
    # it does not undo the one given before.
    data_dir_help = (
        "the embedded database's folder when neither DATABASE_URL nor DATABASE_SECRET_ARN is "
        f"set (default: ${embedded.DATA_DIR_VARIABLE}, else the user's data folder, e.g. "
        "~/.local/share/queue-worker/pgdata)"
    )
    common = OneLineParser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR", help=data_dir_help
    )

    parser = OneLineParser(
        prog="queue-worker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help=data_dir_help)
    sub = parser.add_subparsers(required=True, metavar="command")

    def command(name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=text, description=kwargs.pop("description", text), parents=[common]
        )

    p = command(
        "migrate",
        "apply missing migrations (safe to run twice)",
        description="Applies the migrations the database lacks, in order, under an advisory "
        "lock; the only command that changes the schema.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 when migrations are pending (for a deploy pipeline)",
    )
    p.set_defaults(command=cmd_migrate)

    p = command(
        "run",
        "run one batch, as the Lambda would, and print the summary",
        description="Runs one batch through the Lambda's code path and prints its summary as "
        "JSON (log lines go to stderr). The functions are SUPABASE_URL's or FUNCTIONS_BASE_URL's"
        "; on the embedded database with neither set, stand-in functions started for the run.",
    )
    # --tenant and --max-jobs are checked as the event's fields are, with the same messages.
    p.add_argument("--tenant", metavar="UUID", help="only this tenant's jobs")
    p.add_argument(
        "--max-jobs",
        type=int,
        metavar="N",
        help="per-tenant cap for this run (default MAX_JOBS_PER_TENANT)",
    )
    p.add_argument("--event", metavar="JSON", help="a JSON event, as the Lambda would receive it")
    p.add_argument(
        "--budget",
        type=number(0, MAX_BUDGET_SECONDS, above_low=True),
        default=60.0,
        metavar="SECONDS",
        help=f"how long this run may take, as a Lambda's remaining time (default 60, at most "
        f"{MAX_BUDGET_SECONDS:g})",
    )
    p.add_argument("--metrics", action="store_true", help="print the EMF metrics too")
    p.set_defaults(command=cmd_run)

    p = command("enqueue", "add a job; prints its id")
    p.add_argument("tenant", type=uuid_value, help="tenant uuid")
    p.add_argument("job_type", help="what the job is (its route names the function)")
    p.add_argument(
        "payload", nargs="?", type=json_object, default="{}", help="a JSON object (default {})"
    )
    p.add_argument(
        "--priority",
        type=whole(INT_MIN),
        default=0,
        help="higher runs first (default 0)",
    )
    p.add_argument("--at", type=timestamp, help="ISO-8601 time it becomes due (default now)")
    p.add_argument(
        "--max-attempts",
        type=whole(1),
        default=5,
        metavar="N",
        help="attempts before it is dead-lettered (default 5)",
    )
    p.add_argument(
        "--unique-key",
        metavar="KEY",
        help="while a job of this tenant with this key is unfinished, print its id instead",
    )
    p.add_argument(
        "--depends-on",
        type=uuid_value,
        nargs="*",
        metavar="JOB_ID",
        help="jobs that must complete first",
    )
    p.set_defaults(command=cmd_enqueue)

    p = command("stats", "counts by status and job type, backlog, dead letters (JSON)")
    p.set_defaults(command=cmd_stats)

    p = command("dead-letters", "list or requeue dead letters")
    dead = p.add_subparsers(required=True, metavar="action")
    q = dead.add_parser("list", help="newest first, one JSON object a line", parents=[common])
    q.add_argument("--tenant", type=uuid_value, help="only this tenant's (uuid)")
    q.add_argument("--job-type", help="only this job type's")
    q.add_argument("--limit", type=whole(1), default=50, metavar="N", help="at most N (default 50)")
    q.set_defaults(command=cmd_dead_letters_list)
    q = dead.add_parser(
        "requeue", help="move back to the queue: ids, or --all with filters", parents=[common]
    )
    q.add_argument(
        "ids", type=uuid_value, nargs="*", metavar="JOB_ID", help="dead letters to requeue"
    )
    q.add_argument("--all", action="store_true", help="every dead letter the filters match")
    q.add_argument("--tenant", type=uuid_value, help="with --all: only this tenant's (uuid)")
    q.add_argument("--job-type", help="with --all: only this job type's")
    q.add_argument(
        "--limit",
        type=whole(1),
        default=1000,
        metavar="N",
        help="with --all: at most N (default 1000)",
    )
    q.set_defaults(command=cmd_dead_letters_requeue)

    p = command(
        "explain",
        "say why a job is not running (held back, waiting, dead-lettered, ...)",
        description="Says what holds a job back: not due yet, a dependency, its tenant's or "
        "function's rate limit or share, an open circuit, or what became of it.",
    )
    p.add_argument("job_id", type=uuid_value, help="the job's id")
    p.add_argument(
        "--json", action="store_true", help="print reason, message and detail as one JSON object"
    )
    p.set_defaults(command=cmd_explain)

    p = command("tenants", "flow control per tenant: weight, rate limit")
    actions = p.add_subparsers(required=True, metavar="action")
    rate_help = (
        'jobs this tenant may start, e.g. "10/min", "20/s", "1000/h" or a number per second, as '
        "in JOB_ROUTES (default: no rate limit)"
    )
    q = actions.add_parser(
        "set",
        help="set a tenant's (or the default) weight and rate limit",
        description="Sets a tenant's limits, or with --default those of every tenant without "
        "its own; options left out take their defaults (weight 1, no rate limit).",
        parents=[common],
    )
    _tenant_argument(q)
    q.add_argument(
        "--weight",
        type=number(0, 100, above_low=True),
        default=1.0,
        help="its share of each claim against other due tenants (more than 0, at most 100; "
        "default 1)",
    )
    q.add_argument("--rate", type=_rate, help=rate_help)
    q.add_argument(
        "--burst",
        type=number(1, 1e6),
        help="with --rate: jobs it may start at once (default: half a second's worth, at least 1)",
    )
    q.set_defaults(command=cmd_tenants_set)
    q = actions.add_parser(
        "clear",
        help="drop a tenant's (or the default) limits",
        description="Drops a tenant's own limits (it then has the default ones), or with "
        "--default the default ones. Exits 1 when none were set.",
        parents=[common],
    )
    _tenant_argument(q)
    q.set_defaults(command=cmd_tenants_clear)

    add_schedule_commands(sub, _store_set_by_main, parents=[common])

    p = command(
        "demo",
        "the whole system on one machine: a database, stand-in functions, one batch",
        description="Seeds jobs of every kind, some failing, runs one batch through the "
        "Lambda's code path against stand-in functions, and shows what became of each job. "
        "On DATABASE_URL's server it works in a database of its own, created and dropped; "
        "without it, in an embedded PostgreSQL of its own (with --keep, in a new folder beside "
        "the data folder).",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo's database afterwards, and print a command that looks at it",
    )
    p.add_argument("--verbose", action="store_true", help="show the worker's log lines as written")
    p.set_defaults(command=cmd_demo)
    return parser


def _tenant_argument(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("tenant", nargs="?", type=uuid_value, help="the tenant (uuid)")
    which.add_argument(
        "--default",
        action="store_true",
        help="the default limits, of every tenant without its own",
    )


def _store_set_by_main() -> QueueStore:
    """Stands in until main() knows the arguments (the store needs --data-dir)."""
    raise AssertionError("main() sets the store factory")


if __name__ == "__main__":
    raise SystemExit(main())
