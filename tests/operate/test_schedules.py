"""Recurring jobs (handler.schedules, migration 0003, `queue-worker schedules`), on a real
PostgreSQL. The wall clock is never used: every call that needs a time gets `now=`."""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import pg8000.native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.local.schedules_command import add_schedule_commands
from handler.operate.schedules import (
    FireReport,
    ScheduleError,
    Schedules,
    due_fire_times,
    fire_due_schedules,
    next_fire_after,
    validate,
)

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2024, 5, 6, 10, 7, 30, tzinfo=UTC)  # a Monday
TENANT = UUID("00000000-0000-4000-8000-000000000001")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def berlin(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold)


@pytest.fixture
def schedules(conn: pg8000.native.Connection) -> Schedules:
    return Schedules(conn)


def jobs(conn: pg8000.native.Connection) -> list[dict[str, Any]]:
    rows = conn.run(
        "SELECT tenant_id, job_type, payload, priority, max_attempts, scheduled_at, unique_key,"
        " status FROM queue_jobs ORDER BY scheduled_at, unique_key"
    )
    keys = (
        "tenant_id",
        "job_type",
        "payload",
        "priority",
        "max_attempts",
        "scheduled_at",
        "unique_key",
        "status",
    )
    return [dict(zip(keys, row, strict=True)) for row in rows]


def every_15(schedules: Schedules, **kw: Any) -> UUID:
    """A schedule firing at :00, :15, :30, :45, created at T0 (next fire: 10:15 UTC)."""
    kw.setdefault("now", T0)
    return schedules.upsert(
        kw.pop("tenant_id", TENANT),
        kw.pop("name", "quarterly"),
        "ingest_slack",
        "*/15 * * * *",
        **kw,
    )


# The SQL API through Schedules -------------------------------------------------------------


def test_upsert_creates_then_replaces_by_tenant_and_name(schedules: Schedules) -> None:
    schedule_id = schedules.upsert(
        TENANT,
        "digest",
        "generate_digest",
        "0 9 * * MON-FRI",
        timezone="Europe/Berlin",
        payload={"kind": "daily"},
        priority=3,
        max_attempts=2,
        max_catch_up=4,
        now=T0,
    )
    created = schedules.get(schedule_id)
    assert created is not None
    assert (created.tenant_id, created.name, created.job_type) == (
        TENANT,
        "digest",
        "generate_digest",
    )
    assert (created.cron, created.timezone, created.payload) == (
        "0 9 * * MON-FRI",
        "Europe/Berlin",
        {"kind": "daily"},
    )
    assert (created.priority, created.max_attempts, created.max_catch_up) == (3, 2, 4)
    assert not created.paused
    assert created.next_fire_at == utc(2024, 5, 7, 7)  # Tue 09:00 CEST
    assert created.last_fired_at is None

    # Same tenant and name: replaced in place. Cron and time zone unchanged: next_fire_at kept.
    later = T0 + timedelta(days=3)
    assert schedules.upsert(
        TENANT, "digest", "generate_digest", "0 9 * * MON-FRI", timezone="Europe/Berlin", now=later
    ) == (schedule_id)
    replaced = schedules.get(schedule_id)
    assert replaced is not None
    assert (replaced.payload, replaced.priority, replaced.max_attempts) == ({}, 0, 5)
    assert replaced.next_fire_at == created.next_fire_at

    # A new cron: next_fire_at follows it.
    schedules.upsert(TENANT, "digest", "generate_digest", "30 6 * * *", now=T0)
    changed = schedules.get(schedule_id)
    assert changed is not None
    assert changed.next_fire_at == utc(2024, 5, 7, 6, 30)

    # Another tenant, same name: another schedule.
    other = schedules.upsert(uuid.uuid4(), "digest", "generate_digest", "0 9 * * *", now=T0)
    assert other != schedule_id
    assert [s.id for s in schedules.list(tenant_id=TENANT)] == [schedule_id]
    assert {s.id for s in schedules.list()} == {schedule_id, other}


def test_pause_resume_delete(schedules: Schedules) -> None:
    schedule_id = every_15(schedules)
    assert schedules.pause(schedule_id) is True
    paused = schedules.get(schedule_id)
    assert paused is not None
    assert paused.paused
    assert paused.next_fire_at is None
    assert schedules.pause(schedule_id) is True  # a no-op

    # Replacing a paused schedule keeps it paused.
    every_15(schedules, payload={"x": 1})
    replaced = schedules.get(schedule_id)
    assert replaced is not None
    assert replaced.paused
    assert replaced.next_fire_at is None

    assert schedules.resume(schedule_id, now=T0 + timedelta(hours=5)) is True
    resumed = schedules.get(schedule_id)
    assert resumed is not None
    assert not resumed.paused
    assert resumed.next_fire_at == utc(2024, 5, 6, 15, 15)  # from now, no catch-up of the pause
    assert schedules.resume(schedule_id, now=T0 + timedelta(days=9)) is True  # not paused: as is
    again = schedules.get(schedule_id)
    assert again is not None
    assert again.next_fire_at == resumed.next_fire_at

    assert schedules.delete(schedule_id) is True
    assert schedules.get(schedule_id) is None
    missing = uuid.uuid4()
    assert schedules.delete(schedule_id) is False
    assert schedules.pause(missing) is False
    assert schedules.resume(missing, now=T0) is False


# Cron math -------------------------------------------------------------------------------------


def test_next_fire_every_15_minutes() -> None:
    cron = "*/15 * * * *"
    assert next_fire_after(cron, "UTC", utc(2024, 5, 6, 10, 7, 30)) == utc(2024, 5, 6, 10, 15)
    assert next_fire_after(cron, "UTC", utc(2024, 5, 6, 10, 15)) == utc(2024, 5, 6, 10, 30)
    assert next_fire_after(cron, "UTC", utc(2024, 5, 6, 23, 59)) == utc(2024, 5, 7, 0, 0)
    # Any time zone, across the spring DST change: every 15 minutes of real time.
    times = [utc(2024, 3, 31, 0, 30)]
    for _ in range(4):
        times.append(next_fire_after(cron, "Europe/Berlin", times[-1]))
    assert [t - times[0] for t in times] == [timedelta(minutes=15 * i) for i in range(5)]
    assert all(t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in times)


def test_next_fire_weekdays_in_berlin_across_dst_changes() -> None:
    cron, zone = "0 9 * * MON-FRI", "Europe/Berlin"
    # Spring: Friday 29 March 09:00 CET (08:00 UTC); DST starts Sunday 31 March; Monday 1 April
    # 09:00 is CEST (07:00 UTC).
    friday = berlin(2024, 3, 29, 9)
    assert next_fire_after(cron, zone, berlin(2024, 3, 29, 8, 59)) == friday
    assert friday == utc(2024, 3, 29, 8)
    assert next_fire_after(cron, zone, friday) == utc(2024, 4, 1, 7)
    assert next_fire_after(cron, zone, friday) == berlin(2024, 4, 1, 9)
    # Autumn: Friday 25 October 09:00 CEST (07:00 UTC); DST ends Sunday 27 October; Monday 28
    # October 09:00 is CET (08:00 UTC).
    assert next_fire_after(cron, zone, utc(2024, 10, 25, 7)) == utc(2024, 10, 28, 8)
    # The result is UTC-aware whatever zone `after` is in.
    result = next_fire_after(cron, zone, berlin(2024, 10, 26, 12))
    assert result.utcoffset() == timedelta(0)
    assert result == berlin(2024, 10, 28, 9)


def test_next_fire_in_the_skipped_and_the_repeated_hour() -> None:
    cron, zone = "30 2 * * *", "Europe/Berlin"
    # 31 March 2024 has no 02:30 in Berlin: the fire time moves to the end of the gap, 03:00 CEST.
    assert next_fire_after(cron, zone, utc(2024, 3, 30, 12)) == utc(2024, 3, 31, 1)
    # 27 October 2024 has 02:30 twice: it fires once, at the first (00:30 UTC).
    first = next_fire_after(cron, zone, utc(2024, 10, 26, 12))
    assert first == utc(2024, 10, 27, 0, 30)
    assert next_fire_after(cron, zone, first) == utc(2024, 10, 28, 1, 30)
    # ... even asked from inside the second pass of the hour (02:10 CET = 01:10 UTC).
    assert next_fire_after(cron, zone, berlin(2024, 10, 27, 2, 10, fold=1)) == utc(
        2024, 10, 28, 1, 30
    )


def test_due_fire_times_applies_the_catch_up_policy() -> None:
    first = utc(2024, 5, 6, 10, 15)
    due = due_fire_times("*/15 * * * *", "UTC", first, utc(2024, 5, 6, 12, 40), 3)
    assert due.fire_times == [
        utc(2024, 5, 6, 12, 0),
        utc(2024, 5, 6, 12, 15),
        utc(2024, 5, 6, 12, 30),
    ]
    assert due.skipped == 7
    assert due.next_fire_at == utc(2024, 5, 6, 12, 45)
    # 0 and 1: only the newest.
    for keep in (0, 1):
        due = due_fire_times("*/15 * * * *", "UTC", first, utc(2024, 5, 6, 12, 40), keep)
        assert (due.fire_times, due.skipped) == ([utc(2024, 5, 6, 12, 30)], 9)
    # Exactly on time: now equals the fire time.
    due = due_fire_times("*/15 * * * *", "UTC", first, first, 1)
    assert (due.fire_times, due.skipped, due.next_fire_at) == ([first], 0, utc(2024, 5, 6, 10, 30))


def test_due_fire_times_after_a_very_long_outage_stays_bounded() -> None:
    # Two weeks of a per-minute schedule (20,160 fire times): the newest are still exact, the
    # count of skipped ones is a lower bound.
    first = utc(2024, 5, 1)
    now = first + timedelta(days=14, seconds=30)
    due = due_fire_times("* * * * *", "Europe/Berlin", first, now, 2)
    assert due.fire_times == [utc(2024, 5, 14, 23, 59), utc(2024, 5, 15)]
    assert 10_000 <= due.skipped <= 20_159
    assert due.next_fire_at == utc(2024, 5, 15, 0, 1)


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("61 * * * *", "UTC", "invalid cron expression '61 * * * *'"),
        ("* * *", "UTC", "expected 5 fields"),
        ("0 0 * * * *", "UTC", "expected 5 fields"),
        ("every day", "UTC", "expected 5 fields"),
        ("0 9 * * FUNDAY", "UTC", "invalid cron expression"),
        ("@sometimes", "UTC", "unknown macro"),
        ("", "UTC", "must not be blank"),
        ("0 9 * * *", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("0 9 * * *", "../../etc/passwd", "unknown time zone"),
        ("0 9 * * *", "", "time zone must not be blank"),
    ],
)
def test_validate_gives_clear_errors(cron: str, timezone: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("*", r"\*")):
        validate(cron, timezone)
    assert issubclass(ScheduleError, ValueError)


def test_validate_accepts_macros_and_names() -> None:
    validate("@daily", "UTC")
    validate("0 9 * * mon-fri", "America/New_York")
    validate("0 0 L * *", "Asia/Kolkata")
    assert next_fire_after("@hourly", "UTC", T0) == utc(2024, 5, 6, 11)


def test_bad_input_gives_clear_errors_and_changes_nothing(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    schedule_id = every_15(schedules)
    before = schedules.get(schedule_id)
    with pytest.raises(ScheduleError, match="invalid cron expression"):
        schedules.upsert(TENANT, "quarterly", "x", "99 * * * *", now=T0)
    with pytest.raises(ScheduleError, match="unknown time zone 'Nowhere/Town'"):
        every_15(schedules, timezone="Nowhere/Town")
    with pytest.raises(ScheduleError, match="payload must be a JSON object"):
        every_15(schedules, payload=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="max_catch_up must be between 0 and 1000"):
        every_15(schedules, max_catch_up=-1)
    with pytest.raises(ScheduleError, match="p_job_type must not be blank"):
        schedules.upsert(TENANT, "quarterly", "  ", "*/15 * * * *", now=T0)
    with pytest.raises(ScheduleError, match="p_tenant_id must not be null"):
        schedules.upsert(None, "quarterly", "x", "*/15 * * * *", now=T0)  # type: ignore[arg-type]
    assert schedules.get(schedule_id) == before
    assert [s.id for s in schedules.list()] == [schedule_id]

    # The SQL API checks on its own too (for callers that bypass Python).
    def rejects(sql: str, message: str) -> None:
        with pytest.raises(pg8000.native.DatabaseError, match=message):
            conn.run(sql, tenant=str(TENANT))

    base = "SELECT upsert_schedule(CAST(:tenant AS uuid), 'quarterly', 'ingest_slack', '0 * * * *'"
    rejects(base + ", p_payload => '[1]')", "p_payload must be a JSON object, got array")
    rejects(base + ", p_payload => '\"text\"')", "p_payload must be a JSON object, got string")
    rejects(base + ", p_max_catch_up => -1)", "p_max_catch_up must be between 0 and 1000")
    rejects(base + ", p_max_attempts => 0)", "p_max_attempts must be at least 1")
    rejects(base + ", p_timezone => 'Nowhere/Town')", "unknown time zone 'Nowhere/Town'")
    rejects(
        "SELECT upsert_schedule(NULL, 'n', 'ingest_slack', '0 * * * *')",
        "p_tenant_id must not be null",
    )
    rejects(
        "SELECT upsert_schedule(CAST(:tenant AS uuid), 'n', '', '0 * * * *')",
        "p_job_type must not be blank",
    )
    rejects(
        "INSERT INTO queue_schedules (tenant_id, name, job_type, cron, timezone)"
        " VALUES (CAST(:tenant AS uuid), 'n', 'x', '0 * * * *', 'Nowhere/Town')",
        "queue_schedules_timezone_known",
    )
    assert schedules.get(schedule_id) == before
    assert len(schedules.list()) == 1


@pytest.mark.parametrize(
    "cron",
    [
        "61 25 * * *",
        "0 24 * * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "5-1 * * * *",
        "*/0 * * * *",
        "0 0 * *",
        "0 0 * * * *",
        "every day",
        "@sometimes",
        "0 9 * * FUNDAY",
    ],
)
def test_upsert_schedule_in_sql_refuses_a_cron_expression_out_of_range(
    conn: pg8000.native.Connection, cron: str
) -> None:
    with pytest.raises(pg8000.native.DatabaseError, match="invalid cron expression"):
        conn.run(
            "SELECT upsert_schedule(CAST(:tenant AS uuid), 'bad', 'ingest_slack', :cron)",
            tenant=str(TENANT),
            cron=cron,
        )
    assert conn.run("SELECT count(*) FROM queue_schedules") == [[0]]


_FIELD_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


@st.composite
def cron_fields(draw: st.DrawFn) -> str:
    """Five fields of the syntax both sides read: *, numbers, ranges, steps, lists; numbers
    drawn a little past each field's range, so that both valid and invalid ones come up."""
    fields = []
    for low, high in _FIELD_RANGES:
        items = []
        for _ in range(draw(st.integers(1, 3))):
            number = st.integers(max(0, low - 1), high + 2)
            kind = draw(st.sampled_from(["*", "n", "range", "step", "range-step"]))
            if kind == "*":
                item = "*"
            elif kind == "n":
                item = str(draw(number))
            elif kind == "range":
                item = f"{draw(number)}-{draw(number)}"
            elif kind == "step":
                item = f"*/{draw(st.integers(0, 61))}"
            else:
                item = f"{draw(number)}-{draw(number)}/{draw(st.integers(0, 61))}"
            items.append(item)
        fields.append(",".join(items))
    return " ".join(fields)


@given(cron=cron_fields())
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_sql_check_of_cron_agrees_with_the_cron_library(
    conn: pg8000.native.Connection, cron: str
) -> None:
    [[valid_in_sql]] = conn.run("SELECT queue_cron_is_valid(:cron)", cron=cron)
    try:
        validate(cron, "UTC")
        valid_in_python = True
    except ScheduleError:
        valid_in_python = False
    assert valid_in_sql == valid_in_python, cron


def test_a_schedule_whose_cron_the_worker_cannot_read_pauses_itself_with_its_error(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    # Given a schedule stored from SQL whose cron expression passes the SQL check but not the
    # cron library (day 31 of February never comes), due now
    conn.run(
        "INSERT INTO queue_schedules (tenant_id, name, job_type, cron, next_fire_at)"
        " VALUES (CAST(:tenant AS uuid), 'never', 'generate_digest', '0 0 31 2 *', :at)",
        tenant=str(TENANT),
        at=utc(2024, 5, 6, 10),
    )
    fine = every_15(schedules)
    # When due schedules fire, twice
    first = fire_due_schedules(conn, now=utc(2024, 5, 6, 10, 16))
    second = fire_due_schedules(conn, now=utc(2024, 5, 6, 10, 31))
    # Then the bad one is reported once, pauses itself with the error kept, and the good one
    # goes on firing
    assert (first.errors, first.paused, first.fired) == (1, 1, 1)
    assert (second.errors, second.paused, second.fired) == (0, 0, 1)
    [bad] = [s for s in schedules.list() if s.name == "never"]
    assert bad.paused is True
    assert bad.next_fire_at is None
    assert bad.last_error is not None
    assert "invalid cron expression '0 0 31 2 *'" in bad.last_error
    assert schedules.get(fine).paused is False  # type: ignore[union-attr]
    # And resuming it clears the error (a fixed schedule starts clean)
    conn.run("UPDATE queue_schedules SET cron = '0 0 * * *' WHERE name = 'never'")
    assert schedules.resume(bad.id, now=utc(2024, 5, 6, 11))
    resumed = schedules.get(bad.id)
    assert resumed is not None
    assert (resumed.paused, resumed.last_error) == (False, None)


# Firing ----------------------------------------------------------------------------------------


def test_fire_creates_the_due_job_with_scheduled_for(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    schedule_id = every_15(schedules, payload={"channel": "general"}, priority=7, max_attempts=2)
    report = fire_due_schedules(conn, now=utc(2024, 5, 6, 10, 14, 59))
    assert report == FireReport()  # not due yet
    assert jobs(conn) == []

    report = fire_due_schedules(conn, now=utc(2024, 5, 6, 10, 16))
    assert (report.fired, report.jobs_created, report.skipped, report.conflicts) == (1, 1, 0, 0)
    assert jobs(conn) == [
        {
            "tenant_id": TENANT,
            "job_type": "ingest_slack",
            "payload": {"channel": "general", "scheduled_for": "2024-05-06T10:15:00Z"},
            "priority": 7,
            "max_attempts": 2,
            "scheduled_at": utc(2024, 5, 6, 10, 15),
            "unique_key": f"schedule:{schedule_id}:{int(utc(2024, 5, 6, 10, 15).timestamp())}",
            "status": "pending",
        }
    ]
    schedule = schedules.get(schedule_id)
    assert schedule is not None
    assert schedule.next_fire_at == utc(2024, 5, 6, 10, 30)
    assert schedule.last_fired_at == utc(2024, 5, 6, 10, 15)


def test_firing_twice_with_the_same_now_creates_nothing_more(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    every_15(schedules)
    every_15(schedules, name="other", tenant_id=uuid.uuid4())
    now = utc(2024, 5, 6, 10, 20)
    assert fire_due_schedules(conn, now=now).jobs_created == 2
    assert fire_due_schedules(conn, now=now) == FireReport()
    assert len(jobs(conn)) == 2


def test_fire_schedule_is_a_compare_and_set(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    schedule_id = every_15(schedules)
    fire_time, following = utc(2024, 5, 6, 10, 15), utc(2024, 5, 6, 10, 30)

    def fire(expected: datetime, times: list[datetime], next_at: datetime) -> int:
        return int(
            conn.run(
                "SELECT fire_schedule(CAST(:id AS uuid), CAST(:expected AS timestamptz),"
                " CAST(:times AS timestamptz[]), CAST(:next AS timestamptz))",
                id=str(schedule_id),
                expected=expected.isoformat(),
                times=[t.isoformat() for t in times],
                next=next_at.isoformat(),
            )[0][0]
        )

    assert fire(utc(2024, 5, 6, 10, 0), [fire_time], following) == 0  # stale expectation
    assert jobs(conn) == []
    assert fire(fire_time, [fire_time], following) == 1
    assert fire(fire_time, [fire_time], following) == 0  # the same call again: CAS fails
    # A caller that passes the CAS with a fire time already enqueued: the unique key holds.
    assert fire(following, [fire_time], utc(2024, 5, 6, 10, 45)) == 0
    assert len(jobs(conn)) == 1
    with pytest.raises(pg8000.native.DatabaseError, match="must be later than every fire time"):
        fire(utc(2024, 5, 6, 10, 45), [utc(2024, 5, 6, 11)], utc(2024, 5, 6, 11))


def test_concurrent_runs_fire_each_fire_time_exactly_once(
    schedules: Schedules, conn: pg8000.native.Connection, connect: Callable[[], Any]
) -> None:
    ids = {
        every_15(schedules, name=f"s{i:02d}", tenant_id=uuid.uuid4(), max_catch_up=3)
        for i in range(50)
    }
    now = utc(2024, 5, 6, 10, 50)  # due: 10:15, 10:30, 10:45
    threads_n = 8
    connections = [connect() for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    reports: list[FireReport] = []
    failures: list[BaseException] = []

    def run(worker_conn: pg8000.native.Connection) -> None:
        try:
            barrier.wait(timeout=30)
            reports.append(fire_due_schedules(worker_conn, now=now, time_limit_s=60))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert len(reports) == threads_n

    created = jobs(conn)
    per_fire_time = Counter((job["unique_key"]) for job in created)
    assert len(created) == 150
    assert set(per_fire_time.values()) == {1}
    assert {UUID(key.split(":")[1]) for key in per_fire_time} == ids
    assert Counter(job["scheduled_at"] for job in created) == {
        utc(2024, 5, 6, 10, 15): 50,
        utc(2024, 5, 6, 10, 30): 50,
        utc(2024, 5, 6, 10, 45): 50,
    }
    assert sum(r.fired for r in reports) == 50
    assert sum(r.jobs_created for r in reports) == 150
    assert sum(r.errors for r in reports) == 0
    assert all(s.next_fire_at == utc(2024, 5, 6, 11) for s in schedules.list())


def test_an_outage_catches_up_max_catch_up_fire_times_and_skips_the_rest(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    schedule_id = every_15(schedules, max_catch_up=3)
    # Ten fire times pass without a run: 10:15, 10:30, ..., 12:30.
    report = fire_due_schedules(conn, now=utc(2024, 5, 6, 12, 40))
    assert (report.fired, report.jobs_created, report.skipped) == (1, 3, 7)
    assert [job["payload"]["scheduled_for"] for job in jobs(conn)] == [
        "2024-05-06T12:00:00Z",
        "2024-05-06T12:15:00Z",
        "2024-05-06T12:30:00Z",
    ]
    schedule = schedules.get(schedule_id)
    assert schedule is not None
    assert schedule.next_fire_at == utc(2024, 5, 6, 12, 45)
    assert schedule.last_fired_at == utc(2024, 5, 6, 12, 30)
    # The skipped fire times are never enqueued later.
    assert fire_due_schedules(conn, now=utc(2024, 5, 6, 12, 44)) == FireReport()


def test_a_paused_schedule_never_fires(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    paused = every_15(schedules, name="paused")
    every_15(schedules, name="active")
    schedules.pause(paused)
    report = fire_due_schedules(conn, now=T0 + timedelta(days=30))
    assert (report.fired, report.conflicts) == (1, 0)
    assert {job["unique_key"].split(":")[1] for job in jobs(conn)} != {str(paused)}
    assert len(jobs(conn)) == 1
    # Resumed: from the next fire time after the resume, nothing from the pause.
    schedules.resume(paused, now=T0 + timedelta(days=40))
    report = fire_due_schedules(conn, now=T0 + timedelta(days=40, minutes=10))
    assert (report.fired, report.jobs_created) == (2, 2)
    assert [job["scheduled_at"] for job in jobs(conn) if str(paused) in job["unique_key"]] == [
        utc(2024, 6, 15, 10, 15)
    ]


def test_a_schedule_created_from_sql_without_next_fire_at_is_initialised(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    schedule_id = UUID(
        str(
            conn.run(
                "SELECT upsert_schedule(CAST(:tenant AS uuid), 'from_sql', 'ingest_slack',"
                " '0 * * * *', p_timezone => 'Europe/Berlin')",
                tenant=str(TENANT),
            )[0][0]
        )
    )
    report = fire_due_schedules(conn, now=T0)
    assert (report.initialized, report.fired, report.jobs_created) == (1, 0, 0)
    schedule = schedules.get(schedule_id)
    assert schedule is not None
    assert schedule.next_fire_at == utc(2024, 5, 6, 11)
    assert fire_due_schedules(conn, now=utc(2024, 5, 6, 11, 1)).jobs_created == 1


def test_limit_time_limit_and_broken_schedules(
    schedules: Schedules, conn: pg8000.native.Connection
) -> None:
    for i in range(3):
        every_15(schedules, name=f"s{i}")
    now = utc(2024, 5, 6, 10, 20)
    report = fire_due_schedules(conn, now=now, time_limit_s=0)
    assert (report.fired, report.remaining) == (0, 3)
    report = fire_due_schedules(conn, now=now, limit=2)
    assert report.fired == 2
    # A schedule written by SQL with a cron the library rejects: reported, the others fire.
    conn.run(
        "INSERT INTO queue_schedules (tenant_id, name, job_type, cron, next_fire_at)"
        " VALUES (CAST(:tenant AS uuid), 'broken', 'x', 'not a cron', CAST(:at AS timestamptz))",
        tenant=str(TENANT),
        at=T0.isoformat(),
    )
    report = fire_due_schedules(conn, now=now)
    assert (report.fired, report.errors) == (1, 1)
    assert "invalid cron expression 'not a cron'" in report.error_messages[0]
    assert len(jobs(conn)) == 3


# The command line ------------------------------------------------------------------------------


def test_cli(
    database_url: str,
    conn: pg8000.native.Connection,
    connect: Callable[[], pg8000.native.Connection],
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="queue-worker")
    add_schedule_commands(parser.add_subparsers(required=True), connect)

    def run(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(argv)
        code = int(args.command(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run(
        "schedules", "set", str(TENANT), "digest", "generate_digest", "0 9 * * MON-FRI",
        "--tz", "Europe/Berlin", "--payload", '{"kind": "daily"}', "--priority", "2",
        "--max-attempts", "3", "--catch-up", "2",
    )  # fmt: skip
    assert (code, err) == (0, "")
    schedule_id = UUID(out.strip())

    code, out, _ = run("schedules", "list", "--tenant", str(TENANT))
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert len(listed) == 1
    assert listed[0] | {"next_fire_at": None, "created_at": None, "updated_at": None} == {
        "id": str(schedule_id),
        "tenant_id": str(TENANT),
        "name": "digest",
        "job_type": "generate_digest",
        "payload": {"kind": "daily"},
        "cron": "0 9 * * MON-FRI",
        "timezone": "Europe/Berlin",
        "priority": 2,
        "max_attempts": 3,
        "paused": False,
        "max_catch_up": 2,
        "next_fire_at": None,
        "last_fired_at": None,
        "last_error": None,
        "last_error_at": None,
        "created_at": None,
        "updated_at": None,
    }
    assert run("schedules", "list", "--tenant", str(uuid.uuid4()))[2] == "no schedules\n"

    assert run("schedules", "pause", str(schedule_id))[:2] == (0, f"paused {schedule_id}\n")
    assert run("schedules", "resume", str(schedule_id))[:2] == (0, f"resumed {schedule_id}\n")
    missing = str(uuid.uuid4())
    assert run("schedules", "pause", missing) == (1, "", f"queue-worker: no schedule {missing}\n")

    # Bad input: exit status 2 and a message that says what is wrong.
    code, _, err = run("schedules", "set", str(TENANT), "x", "ingest_slack", "0 25 * * *")
    assert code == 2
    assert "invalid cron expression '0 25 * * *'" in err
    code, _, err = run("schedules", "set", str(TENANT), "x", "j", "@daily", "--tz", "Atlantis")
    assert (code, err) == (
        2,
        "queue-worker: unknown time zone 'Atlantis' (use an IANA name such as 'Europe/Berlin'"
        " or 'UTC')\n",
    )
    code, _, err = run("schedules", "set", str(TENANT), "x", "j", "@daily", "--payload", "[1]")
    assert (code, err) == (2, "queue-worker: --payload must be a JSON object, got list\n")
    code, _, err = run("schedules", "set", str(TENANT), "x", "j", "@daily", "--catch-up", "-1")
    assert code == 2
    assert "max_catch_up must be between 0 and 1000" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["schedules", "pause", "not-a-uuid"])
    capsys.readouterr()

    # fire: due schedules become jobs (made due by moving next_fire_at into the past).
    conn.run(
        "UPDATE queue_schedules SET next_fire_at = now() - interval '1 minute'"
        " WHERE id = CAST(:id AS uuid)",
        id=str(schedule_id),
    )
    code, out, _ = run("schedules", "fire")
    assert code == 0
    assert json.loads(out)["jobs_created"] == 1
    assert [job["job_type"] for job in jobs(conn)] == ["generate_digest"]

    assert run("schedules", "delete", str(schedule_id))[:2] == (0, f"deleted {schedule_id}\n")
    assert run("schedules", "delete", str(schedule_id))[0] == 1
    assert database_url  # the factory connects to the test database
