"""`queue-worker schedules`: list, create or replace, pause, resume, delete and fire schedules.

`add_schedule_commands(subparsers, store_factory)` registers the command on the main parser;
every handler takes the parsed arguments and returns the exit status (0 done, 1 no such
schedule, 2 bad input), opening its store with `store_factory` and closing it after.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from handler.local.arguments import INT_MIN, uuid_value, whole
from handler.operate.schedules import MAX_CATCH_UP, ScheduleError, Schedules, fire_due_schedules
from handler.queue.store import QueueStore

StoreFactory = Callable[[], QueueStore]


def add_schedule_commands(
    subparsers: argparse._SubParsersAction[Any],
    store_factory: StoreFactory,
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Adds `schedules` (list, set, pause, resume, delete, fire) to the main parser's commands;
    `parents` give every one of them options of the main parser's (such as --data-dir)."""
    p = subparsers.add_parser(
        "schedules",
        help="recurring jobs: list, set, pause, resume, delete, fire",
        description="Recurring jobs: each schedule enqueues a job at its cron's fire times.",
        parents=list(parents),
    )
    actions = p.add_subparsers(required=True, metavar="action")

    q = actions.add_parser(
        "list", help="the schedules, one JSON object a line", parents=list(parents)
    )
    q.add_argument("--tenant", type=uuid_value, help="only this tenant's (uuid)")
    q.set_defaults(command=cmd_schedules_list, store_factory=store_factory)

    q = actions.add_parser(
        "set",
        help="create a schedule, or replace the tenant's schedule of that name",
        description="Creates a schedule, or replaces the tenant's schedule of that name (options"
        " left out take their defaults). Prints its id.",
        parents=list(parents),
    )
    q.add_argument("tenant", type=uuid_value, help="tenant uuid")
    q.add_argument("name", help="the schedule's name (unique per tenant)")
    q.add_argument("job_type", help="the job type of the jobs it enqueues")
    q.add_argument("cron", help="five fields, e.g. '0 9 * * MON-FRI', or @hourly, @daily, ...")
    q.add_argument("--tz", default="UTC", help="IANA time zone of the cron (default UTC)")
    q.add_argument("--payload", default="{}", help="a JSON object (default {})")
    q.add_argument("--priority", type=whole(INT_MIN), default=0, help="of its jobs (default 0)")
    q.add_argument(
        "--max-attempts",
        type=whole(1),
        default=5,
        metavar="N",
        help="of its jobs (default 5)",
    )
    q.add_argument(
        "--catch-up",
        type=int,
        default=1,
        metavar="N",
        help="after an outage, enqueue at most the N newest missed fire times and skip the"
        f" rest (0-{MAX_CATCH_UP}; default 1: only the newest)",
    )
    q.set_defaults(command=cmd_schedules_set, store_factory=store_factory)

    for name, handler, text in (
        ("pause", cmd_schedules_pause, "stop firing (missed fire times are not caught up)"),
        ("resume", cmd_schedules_resume, "fire again, from the next fire time after now"),
        ("delete", cmd_schedules_delete, "delete (the jobs it enqueued stay)"),
    ):
        q = actions.add_parser(name, help=text, parents=list(parents))
        q.add_argument("id", type=uuid_value, help="schedule id")
        q.set_defaults(command=handler, store_factory=store_factory)

    q = actions.add_parser(
        "fire", help="enqueue the due fire times now, print the report", parents=list(parents)
    )
    q.add_argument(
        "--limit",
        type=whole(1),
        default=100,
        metavar="N",
        help="schedules at most (default 100)",
    )
    q.set_defaults(command=cmd_schedules_fire, store_factory=store_factory)


def cmd_schedules_list(args: argparse.Namespace) -> int:
    with _Session(args) as store:
        schedules = store.list(tenant_id=args.tenant)
    for schedule in schedules:
        print(json.dumps(schedule.as_json()))
    if not schedules:
        print("no schedules", file=sys.stderr)
    return 0


def cmd_schedules_set(args: argparse.Namespace) -> int:
    try:
        payload: Any = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        return _bad_input(f"--payload is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return _bad_input(f"--payload must be a JSON object, got {type(payload).__name__}")
    try:
        with _Session(args) as store:
            schedule_id = store.upsert(
                args.tenant,
                args.name,
                args.job_type,
                args.cron,
                timezone=args.tz,
                payload=payload,
                priority=args.priority,
                max_attempts=args.max_attempts,
                max_catch_up=args.catch_up,
            )
    except ScheduleError as exc:
        return _bad_input(str(exc))
    print(schedule_id)
    return 0


def cmd_schedules_pause(args: argparse.Namespace) -> int:
    with _Session(args) as store:
        return _done(store.pause(args.id), "paused", args.id)


def cmd_schedules_resume(args: argparse.Namespace) -> int:
    try:
        with _Session(args) as store:
            return _done(store.resume(args.id), "resumed", args.id)
    except ScheduleError as exc:  # a schedule stored from SQL with a cron we cannot read
        return _bad_input(str(exc))


def cmd_schedules_delete(args: argparse.Namespace) -> int:
    with _Session(args) as store:
        return _done(store.delete(args.id), "deleted", args.id)


def cmd_schedules_fire(args: argparse.Namespace) -> int:
    with _Session(args) as store:
        report = fire_due_schedules(store.store, limit=args.limit)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


# Plumbing -----------------------------------------------------------------------------------


class _Session:
    """The schedules, on a store from the factory, closed on exit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._factory: StoreFactory = args.store_factory
        self._store: QueueStore | None = None

    def __enter__(self) -> Schedules:
        self._store = self._factory()
        return Schedules(self._store)

    def __exit__(self, *exc: object) -> None:
        if self._store is not None:
            self._store.close()


def _done(found: bool, verb: str, schedule_id: UUID) -> int:
    if not found:
        print(f"queue-worker: no schedule {schedule_id}", file=sys.stderr)
        return 1
    print(f"{verb} {schedule_id}")
    return 0


def _bad_input(message: str) -> int:
    print(f"queue-worker: {message}", file=sys.stderr)
    return 2
