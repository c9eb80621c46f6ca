"""Recurring jobs: schedules (cron expression + time zone) turned into jobs, once per fire time.

Catch-up policy: when a firing run finds several fire times of a schedule due at once (after an
outage, or a pause of the worker), it enqueues only the newest `max_catch_up` of them (at least
the newest one, so 0 and 1 both mean "no catch-up") and skips the older ones, counting them in
the report. The schedule then moves on to its first fire time after now, so a skipped fire time
is never enqueued later, and neither is a fire time that passed while the schedule was paused.

The cron math runs here, with cronsim (Debian cron semantics, five fields, or one of the macros
`@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`) in the
schedule's IANA time zone: a fire time that falls into the hour skipped by a DST change runs at
the end of that gap, one in the repeated hour runs once (an expression with a `*` in its minute
or hour field fires by the clock of UTC instead, every time it matches). The SQL (migration
0003) trusts the fire times it is given, and guarantees, by compare-and-set on `next_fire_at`,
that concurrent firing runs enqueue each fire time exactly once.
"""

import json
import logging
import random
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pg8000.native
from cronsim import CronSim, CronSimError

from handler.errors import QueueRefusedError
from handler.queue.store import QueueStore

logger = logging.getLogger(__name__)

MAX_CATCH_UP = 1000  # the largest max_catch_up a schedule may have (a CHECK in the SQL too)
# How many missed fire times of one schedule a firing counts one by one; past that, the skipped
# count in the report is a lower bound (the newest fire times are still found exactly).
_MAX_COUNTED = 10_000
_MAX_MESSAGES = 10  # error messages a FireReport keeps (the count of errors is complete)

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# The instant validate() starts looking for a fire time from (any fixed instant will do).
_VALIDATION_START = datetime(2000, 1, 1, tzinfo=UTC)


class ScheduleError(ValueError):
    """A schedule that cannot be created or fired: bad cron, time zone, payload or bounds."""


class Schedule(NamedTuple):
    """A row of queue_schedules."""

    id: UUID
    tenant_id: UUID
    name: str
    job_type: str
    payload: dict[str, Any]
    cron: str
    timezone: str
    priority: int
    max_attempts: int
    paused: bool
    max_catch_up: int
    next_fire_at: datetime | None  # None while paused (or not computed yet)
    last_fired_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_error: str | None = None  # why it paused itself, if it did
    last_error_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready: uuids and datetimes (ISO-8601) as strings."""
        return {key: _jsonable(value) for key, value in self._asdict().items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class FireReport:
    """What one fire_due_schedules() run did. (A plain class: a dataclass costs a compile at
    import, on every cold start: docs/adr/0012-value-classes.md.)"""

    # The report's keys, in order.
    FIELDS = (
        "fired",
        "jobs_created",
        "skipped",
        "conflicts",
        "initialized",
        "errors",
        "paused",
        "remaining",
        "error_messages",
    )
    __slots__ = FIELDS

    def __init__(self) -> None:
        self.fired = 0  # schedules that enqueued their due fire times
        self.jobs_created = 0
        self.skipped = 0  # fire times left out by the catch-up policy (see the module docstring)
        self.conflicts = 0  # compare-and-set lost: another run fired (or someone changed) it
        self.initialized = 0  # schedules whose next fire time was not computed yet: computed now
        self.errors = 0  # schedules that could not be fired (logged)
        self.paused = 0  # of those, schedules that cannot fire at all: paused, error recorded
        self.remaining = 0  # due schedules left for the next run (limit or time limit reached)
        self.error_messages: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FireReport) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable: compared by value, not hashable

    def __repr__(self) -> str:
        return f"FireReport({self.as_dict()})"


# Cron math -----------------------------------------------------------------------------------


def validate(cron: str, timezone: str) -> None:
    """Raises ScheduleError, with a message that says what is wrong, unless both are usable."""
    zone = _zone(timezone)
    expr = _expression(cron)
    start = _VALIDATION_START.astimezone(zone)
    try:
        iterator = CronSim(expr, start)
    except CronSimError as exc:
        raise ScheduleError(f"invalid cron expression {cron!r}: {_reason(exc)}") from None
    except (ValueError, TypeError, IndexError) as exc:  # defensive: cronsim's own checks missed it
        raise ScheduleError(f"invalid cron expression {cron!r}: {exc}") from None
    try:
        next(iterator)
    except StopIteration:
        raise ScheduleError(f"cron expression {cron!r} never fires") from None


def next_fire_after(cron: str, timezone: str, after: datetime) -> datetime:
    """The schedule's first fire time strictly after `after` (timezone-aware), in UTC."""
    validate(cron, timezone)
    result = _next_after(_expression(cron), _zone(timezone), _aware(after, "after"))
    if result is None:
        raise ScheduleError(f"cron expression {cron!r} never fires after {after.isoformat()}")
    return result


class DueFireTimes(NamedTuple):
    """The fire times one firing of a schedule enqueues, what it skips, and where it goes next."""

    fire_times: list[datetime]  # ascending, UTC
    skipped: int
    next_fire_at: datetime  # UTC, after now


def due_fire_times(
    cron: str, timezone: str, first: datetime, now: datetime, max_catch_up: int
) -> DueFireTimes:
    """The fire times from `first` (a fire time, due: <= now) up to `now` under the catch-up
    policy: the newest max(max_catch_up, 1) of them, the number of older ones skipped, and the
    first fire time after now."""
    validate(cron, timezone)
    expr, zone = _expression(cron), _zone(timezone)
    first, now = _aware(first, "first").astimezone(UTC), _aware(now, "now").astimezone(UTC)
    keep = max(1, max_catch_up)
    newest: deque[datetime] = deque(maxlen=keep)
    counted = 0
    following: datetime | None = first
    iterator = _forward(expr, zone, first)
    while following is not None and following <= now and counted < _MAX_COUNTED:
        newest.append(following)
        counted += 1
        following = _advance(iterator, newest[-1])
    if following is not None and following <= now:
        # A gap too long to count: take the newest fire times from the end of it.
        tail = _newest_before(expr, zone, now, after=newest[-1], count=keep)
        kept = (list(newest) + tail)[-keep:]
        skipped = counted + len(tail) - len(kept)  # a lower bound
        following = _next_after(expr, zone, now)
    else:
        kept = list(newest)
        skipped = counted - len(kept)
    if following is None:
        raise ScheduleError(f"cron expression {cron!r} never fires after {now.isoformat()}")
    return DueFireTimes(kept, skipped, following)


def _zone(timezone: str) -> ZoneInfo:
    if not isinstance(timezone, str) or not timezone.strip():
        raise ScheduleError("time zone must not be blank (use an IANA name such as 'UTC')")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(
            f"unknown time zone {timezone!r} (use an IANA name such as 'Europe/Berlin' or 'UTC')"
        ) from None


def _expression(cron: str) -> str:
    if not isinstance(cron, str) or not cron.strip():
        raise ScheduleError("cron expression must not be blank")
    text = " ".join(cron.split())
    if text.startswith("@"):
        expanded = _MACROS.get(text.lower())
        if expanded is None:
            raise ScheduleError(
                f"invalid cron expression {cron!r}: unknown macro (use one of {', '.join(_MACROS)})"
            )
        return expanded
    fields = len(text.split(" "))
    if fields != 5:
        raise ScheduleError(
            f"invalid cron expression {cron!r}: expected 5 fields"
            f" (minute hour day-of-month month day-of-week), got {fields}"
        )
    return text


def _reason(exc: CronSimError) -> str:
    text = str(exc).strip()
    return text[0].lower() + text[1:] if text else "not a cron expression"


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value


def _forward(expr: str, zone: ZoneInfo, start: datetime) -> CronSim:
    return CronSim(expr, start.astimezone(zone))


def _advance(iterator: CronSim, after: datetime) -> datetime | None:
    """The iterator's next fire time strictly after `after`, in UTC (None: no more).

    cronsim iterates by wall clock for fixed-time expressions: started inside a repeated DST hour
    it may yield the first pass of a time that is already behind us; those are skipped here."""
    for _ in range(1000):
        try:
            candidate = next(iterator).astimezone(UTC)
        except StopIteration:
            return None
        if candidate > after:
            return candidate
    return None  # pragma: no cover - cronsim yields ascending times


def _next_after(expr: str, zone: ZoneInfo, after: datetime) -> datetime | None:
    return _advance(_forward(expr, zone, after), after.astimezone(UTC))


def _newest_before(
    expr: str, zone: ZoneInfo, now: datetime, *, after: datetime, count: int
) -> list[datetime]:
    """Up to `count` newest fire times in (after, now], ascending, in UTC."""
    # Reverse iteration starts one tick before its start: start one second after now (floored).
    start = now.replace(microsecond=0) + timedelta(seconds=1)
    iterator = CronSim(expr, start.astimezone(zone), reverse=True)
    found: list[datetime] = []
    while len(found) < count:
        try:
            candidate = next(iterator).astimezone(UTC)
        except StopIteration:
            break
        if candidate <= after:
            break
        if candidate <= now and (not found or candidate < found[-1]):
            found.append(candidate)
    return found[::-1]


# The schedules, through the queue's store -----------------------------------------------------


def _store(source: QueueStore | pg8000.native.Connection) -> QueueStore:
    return source if isinstance(source, QueueStore) else QueueStore(source)


class Schedules:
    """The recurring schedules: cron and time zone checked here, the SQL (upsert_schedule and
    friends, migrations 0003 and 0005) through the queue's store.

    `now` arguments default to the database's clock, the one the firing run uses too."""

    def __init__(self, store: QueueStore | pg8000.native.Connection) -> None:
        self.store = _store(store)

    def upsert(
        self,
        tenant_id: UUID,
        name: str,
        job_type: str,
        cron: str,
        *,
        timezone: str = "UTC",
        payload: dict[str, Any] | None = None,
        priority: int = 0,
        max_attempts: int = 5,
        max_catch_up: int = 1,
        now: datetime | None = None,
    ) -> UUID:
        """Creates the tenant's schedule `name`, or replaces it (same id; pause state kept).

        Raises ScheduleError for a bad cron expression, time zone, payload or bound."""
        validate(cron, timezone)
        if payload is not None and not isinstance(payload, dict):
            raise ScheduleError(f"payload must be a JSON object, got {type(payload).__name__}")
        if not isinstance(max_catch_up, int) or not 0 <= max_catch_up <= MAX_CATCH_UP:
            raise ScheduleError(f"max_catch_up must be between 0 and {MAX_CATCH_UP}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ScheduleError("max_attempts must be at least 1")
        next_fire = next_fire_after(cron, timezone, self._now(now))
        try:
            payload_json = json.dumps(payload if payload is not None else {}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ScheduleError(f"payload is not JSON-serialisable: {exc}") from None
        try:
            return self.store.upsert_schedule(
                tenant_id,
                name,
                job_type,
                cron,
                timezone=timezone,
                payload_json=payload_json,
                priority=priority,
                max_attempts=max_attempts,
                max_catch_up=max_catch_up,
                next_fire_at=next_fire,
            )
        except QueueRefusedError as exc:
            raise ScheduleError(str(exc)) from None

    def pause(self, schedule_id: UUID) -> bool:
        """False when there is no such schedule."""
        return self.store.pause_schedule(schedule_id)

    def resume(self, schedule_id: UUID, *, now: datetime | None = None) -> bool:
        """Resumes from the first fire time after now (the paused time is not caught up).

        False when there is no such schedule."""
        schedule = self.get(schedule_id)
        if schedule is None:
            return False
        next_fire = next_fire_after(schedule.cron, schedule.timezone, self._now(now))
        return self.store.resume_schedule(schedule_id, next_fire)

    def delete(self, schedule_id: UUID) -> bool:
        """False when there is no such schedule. The jobs it enqueued stay."""
        return self.store.delete_schedule(schedule_id)

    def get(self, schedule_id: UUID) -> Schedule | None:
        rows = self.store.schedule_rows(schedule_id=schedule_id)
        return Schedule(*rows[0]) if rows else None

    def list(self, tenant_id: UUID | None = None) -> list[Schedule]:
        """All schedules (or one tenant's), by tenant and name."""
        return [Schedule(*row) for row in self.store.schedule_rows(tenant_id=tenant_id)]

    def _now(self, now: datetime | None) -> datetime:
        if now is not None:
            return _aware(now, "now")
        return self.store.now()


# Firing ----------------------------------------------------------------------------------------


def fire_due_schedules(
    source: QueueStore | pg8000.native.Connection,
    *,
    now: datetime | None = None,
    limit: int = 100,
    time_limit_s: float = 5.0,
) -> FireReport:
    """Turns the due fire times of due schedules into jobs (see the catch-up policy above).

    Reads at most `limit` due schedules (not paused, next_fire_at <= now, oldest first; also those
    whose next fire time was never computed) in one statement, then fires them one call each,
    starting no call after `time_limit_s` seconds. `now` defaults to the database's clock. Safe
    to run from many invocations at once: each fire time is enqueued exactly once. A schedule
    whose cron expression or time zone cannot be read pauses itself with the error recorded
    (queue_schedule_failed), so it is reported once, not by every invocation."""
    store = _store(source)
    deadline = time.monotonic() + time_limit_s
    report = FireReport()
    if limit < 1:
        return report
    due = store.due_schedules(now=_aware(now, "now") if now is not None else None, limit=limit)
    # Concurrent runs read the same rows: in different orders they fire different schedules at
    # the same time instead of queueing on one row lock after another.
    random.shuffle(due)
    for index, schedule in enumerate(due):
        if time.monotonic() >= deadline:
            report.remaining = len(due) - index
            break
        expected = schedule.next_fire_at
        try:
            if expected is None:
                times = DueFireTimes(
                    [], 0, next_fire_after(schedule.cron, schedule.timezone, schedule.clock)
                )
            else:
                times = due_fire_times(
                    schedule.cron,
                    schedule.timezone,
                    expected,
                    schedule.clock,
                    schedule.max_catch_up,
                )
        except ScheduleError as exc:
            _note_error(report, schedule.id, str(exc))
            if store.schedule_failed(schedule.id, expected_next=expected, error=str(exc)):
                report.paused += 1
            continue
        try:
            created, fired_at = store.fire_schedule(
                schedule.id,
                expected_next=expected,
                fire_times=times.fire_times,
                next_fire_at=times.next_fire_at,
            )
        except QueueRefusedError as exc:
            _note_error(report, schedule.id, str(exc))
            continue
        if not created and store.schedule_updated_at(schedule.id) != fired_at:
            report.conflicts += 1  # another run fired (or someone changed) it first
            continue
        if expected is None:
            report.initialized += 1
            continue
        report.fired += 1
        report.jobs_created += created
        report.skipped += times.skipped
    return report


def _note_error(report: FireReport, schedule_id: UUID, error: str) -> None:
    report.errors += 1
    message = f"schedule {schedule_id}: {error}"
    if len(report.error_messages) < _MAX_MESSAGES:
        report.error_messages.append(message)
    logger.warning("could not fire %s", message)
