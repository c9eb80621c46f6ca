"""The queue's SQL API from Python: the only module that sends SQL about jobs and schedules.

`QueueStore` is the data-access layer: one typed method per SQL function of the queue (migrations
0001-0005, schema `queue_worker`), each one statement, atomic, named by its schema. It holds one
connection (given, or opened on first use from a provider) and sends every call in a transaction
of its own with `SET LOCAL statement_timeout` when a deadline is set: nothing outlives the
transaction, so the store works through a transaction pooler (docs/adr/0005-connections.md).

After a lost connection a call is sent again on a new one only when it provably did not run (the
connection broke before the statement was sent) or when it is safe to repeat by construction:
reads, a settle (fenced by worker and attempt), a claim keyed by worker id, pruning, a schedule's
compare-and-set. Anything else (an enqueue, a requeue) reports the loss instead of guessing.

A store opened from a provider checks the schema version once, on its first connection.
"""

import contextlib
import json
import math
import select
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NamedTuple
from uuid import UUID

import pg8000.native

from handler.errors import DatabaseUnavailableError, QueueRefusedError
from handler.queue import migrations

OutcomeKind = Literal[
    "completed", "failed", "dead", "rate_limited", "released", "deferred", "expired"
]
SettleResult = Literal["completed", "retry", "dead", "released", "stale"]
ConnectionProvider = Callable[[], pg8000.native.Connection]


class ClaimedJob(NamedTuple):
    """A job leased to this worker. `attempt` is 1 on the first dispatch."""

    id: UUID
    tenant_id: UUID
    job_type: str
    # The payload as PostgreSQL renders jsonb (always valid JSON): it goes into the request body
    # as is, so a batch never parses and re-serialises thousands of payloads.
    payload_json: str
    attempt: int
    rescued: bool  # taken over from a worker whose lease expired
    # Its last attempt's lease expired: leased again, with no new attempt, so that the worker asks
    # the idempotency store whether that attempt succeeded (claim with defer_exhausted).
    exhausted: bool = False


class Settlement(NamedTuple):
    """What to record for one claimed job (see settle_jobs in the SQL)."""

    job_id: UUID
    attempt: int
    outcome: OutcomeKind
    error: str | None = None
    status: int | None = None  # the HTTP status, when there was a response
    retry_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.job_id),
            "attempt": self.attempt,
            "outcome": self.outcome,
            # PostgreSQL text cannot hold a NUL; one in an error must not sink the whole settle.
            "error": self.error.replace("\x00", "\N{REPLACEMENT CHARACTER}")
            if self.error
            else None,
            "status": self.status,
            "retry_at": self.retry_at.isoformat() if self.retry_at else None,
        }


class Job(NamedTuple):
    """A row of queue_jobs, as an operator sees it."""

    id: UUID
    tenant_id: UUID
    job_type: str
    payload: dict[str, Any]
    status: str
    priority: int
    attempts: int
    max_attempts: int
    scheduled_at: datetime
    locked_until: datetime | None
    locked_by: str | None
    last_error: str | None
    errors: list[dict[str, Any]]
    unique_key: str | None
    depends_on: list[UUID] | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class DeadLetter(NamedTuple):
    id: UUID
    tenant_id: UUID
    job_type: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    last_error: str | None
    errors: list[dict[str, Any]]
    reason: str
    dead_at: datetime


class QueueStats(NamedTuple):
    by_status: dict[str, int]
    due_now: int  # pending and due: the backlog
    oldest_due_age_seconds: float  # how long the oldest due job has waited (0 when none)
    dead_letters: int
    by_job_type: dict[str, dict[str, int]]


class DueSchedule(NamedTuple):
    """A schedule a firing run should look at, with the clock it was read by."""

    id: UUID
    cron: str
    timezone: str
    max_catch_up: int
    next_fire_at: datetime | None
    clock: datetime


_JOB_COLUMNS = (
    "id, tenant_id, job_type, payload, status, priority, attempts, max_attempts, scheduled_at,"
    " locked_until, locked_by, last_error, errors, unique_key, depends_on, created_at, updated_at,"
    " completed_at"
)
_DEAD_LETTER_COLUMNS = (
    "id, tenant_id, job_type, payload, attempts, max_attempts, last_error, errors, reason, dead_at"
)
SCHEDULE_COLUMNS = (
    "id, tenant_id, name, job_type, payload, cron, timezone, priority, max_attempts, paused,"
    " max_catch_up, next_fire_at, last_fired_at, created_at, updated_at, last_error, last_error_at"
)

# Statement timeouts below this are not worth starting a statement for.
_MIN_STATEMENT_MS = 100

# SQLSTATEs our SQL functions raise for bad requests (and the constraint violations that guard
# the same rules): the function's own message is the answer.
_REFUSED_SQLSTATES = frozenset(
    {"22023", "23502", "23503", "23505", "23514", "22P02", "P0001", "P0002", "02000", "54000"}
)


def server_error(exc: BaseException) -> tuple[str, str] | None:
    """(SQLSTATE, message) of an error the server sent, None for anything else."""
    if isinstance(exc, pg8000.native.DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return str(exc.args[0].get("C", "")), str(exc.args[0].get("M", ""))
    return None


def is_connection_lost(exc: BaseException) -> bool:
    """True when the connection is gone (not when the SQL was refused)."""
    if isinstance(exc, (pg8000.native.InterfaceError, OSError, DatabaseUnavailableError)):
        return True
    error = server_error(exc)
    # 08: connection exception; 57P01-57P03: terminated, crashed, restarting.
    return error is not None and (
        error[0].startswith("08") or error[0] in ("57P01", "57P02", "57P03")
    )


class QueueStore:
    """Typed calls of the queue's SQL functions over one pg8000 connection (not thread-safe).

    Give it a connection (used as is: never reopened, never closed by the store, and a call
    made while that connection is inside a transaction of the caller's joins it), or a provider
    that opens one (the store then reconnects after a loss and checks the schema version on each
    new connection)."""

    def __init__(self, source: pg8000.native.Connection | ConnectionProvider) -> None:
        if isinstance(source, pg8000.native.Connection):
            self._conn: pg8000.native.Connection | None = source
            self._provider: ConnectionProvider | None = None
        else:
            self._conn = None
            self._provider = source
        self._deadline: float | None = None  # time.monotonic() by which statements must end
        self._listening: pg8000.native.Connection | None = None  # the connection that LISTENs

    # Connection ------------------------------------------------------------------------------

    @property
    def conn(self) -> pg8000.native.Connection:
        """The connection (opened and checked now if need be)."""
        if self._conn is None:
            assert self._provider is not None
            conn = self._provider()
            try:
                migrations.check_schema(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            self._conn = conn
        return self._conn

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def limit_statements(self, deadline: float | None) -> None:
        """From now on every statement must end by `deadline` (time.monotonic()); the server
        cancels it otherwise (statement_timeout). None: no limit of ours."""
        self._deadline = deadline

    def close(self) -> None:
        if self._provider is not None and self._conn is not None:
            with contextlib.suppress(Exception):  # it may be broken already
                self._conn.close()
            self._conn = None

    def _discard(self) -> None:
        self.close()

    def _run(self, sql: str, *, idempotent: bool, **params: Any) -> list[list[Any]]:
        """One statement in a transaction of its own, sent again after a lost connection only
        when that is safe (see the module docstring)."""
        try:
            return self._attempt(sql, params)
        except _LostBeforeSending:
            pass
        except Exception as exc:
            if self._provider is None or not idempotent or not is_connection_lost(exc):
                raise self._translated(exc) from None
        self._discard()
        try:
            return self._attempt(sql, params)
        except _LostBeforeSending as lost:
            raise DatabaseUnavailableError(f"lost the connection to PostgreSQL: {lost}") from None
        except Exception as exc:
            raise self._translated(exc) from None

    def _attempt(self, sql: str, params: dict[str, Any]) -> list[list[Any]]:
        conn = self.conn
        if _in_transaction(conn):  # the caller's transaction: join it
            return _rows(conn.run(sql, **params))
        timeout_ms = self._timeout_ms()
        try:
            if timeout_ms is None:
                conn.run("BEGIN")
            else:
                conn.execute_simple(f"BEGIN; SET LOCAL statement_timeout = {timeout_ms}")
        except Exception as exc:
            if is_connection_lost(exc) and self._provider is not None:
                raise _LostBeforeSending(str(exc)) from exc
            raise
        try:
            rows = _rows(conn.run(sql, **params))
            conn.run("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                if _in_transaction(conn):
                    conn.run("ROLLBACK")
            raise
        return rows

    def _timeout_ms(self) -> int | None:
        if self._deadline is None:
            return None
        left = (self._deadline - time.monotonic()) * 1000
        return max(_MIN_STATEMENT_MS, math.floor(left))

    def _translated(self, exc: Exception) -> Exception:
        """A server's refusal as QueueRefusedError, a lost connection as
        DatabaseUnavailableError (the connection is dropped), anything else as it is."""
        if is_connection_lost(exc):
            self._discard()
            if isinstance(exc, DatabaseUnavailableError):
                return exc
            return DatabaseUnavailableError(
                f"lost the connection to PostgreSQL ({type(exc).__name__}); the statement may or"
                " may not have been applied: check before repeating it"
            )
        error = server_error(exc)
        if error is not None and error[0] == "57014":
            return DatabaseUnavailableError(
                "a statement ran past the invocation's time budget and PostgreSQL cancelled it"
                " (statement_timeout)"
            )
        if error is not None and error[0] in _REFUSED_SQLSTATES:
            return QueueRefusedError(error[1], error[0])
        return exc

    # The worker's calls ------------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: int,
        max_jobs: int,
        max_per_tenant: int,
        tenant_id: UUID | None = None,
        shard: int = 0,
        shards: int = 1,
        claim_round: int | None = None,
        defer_exhausted: bool = False,
        room: Mapping[str, int] | None = None,
    ) -> list[ClaimedJob]:
        """Leases due jobs (claim_jobs). With `claim_round` the claim is keyed by worker and round,
        so it is sent again after a lost connection: a repeat returns the same jobs. `room`:
        at most so many jobs of each function named."""
        rows = self._run(
            # Only what a dispatch uses, in claim order, as one JSON array in one value
            # (docs/adr/0013-claim-as-one-json-value.md): pg8000 converts each value of each
            # row in Python, json.loads reads the array in C. The payload stays the text
            # PostgreSQL renders (a JSON string here), never decoded and encoded again.
            "SELECT coalesce(json_agg(json_build_array(c.id, c.tenant_id, c.job_type,"
            " c.payload::text, c.attempts, c.rescued, c.exhausted) ORDER BY c.ordinality),"
            " '[]')::text"
            " FROM queue_worker.claim_jobs(p_worker_id => :worker, p_lease_seconds => :lease,"
            " p_max_jobs => :max_jobs, p_max_per_tenant => :per_tenant,"
            " p_tenant_id => CAST(:tenant AS uuid), p_shard => :shard, p_shards => :shards,"
            " p_round => CAST(:round AS int), p_defer_exhausted => :defer,"
            " p_room => CAST(:room AS jsonb)) WITH ORDINALITY AS c",
            idempotent=claim_round is not None,
            worker=worker_id,
            lease=lease_seconds,
            max_jobs=max_jobs,
            per_tenant=max_per_tenant,
            tenant=str(tenant_id) if tenant_id else None,
            shard=shard,
            shards=shards,
            round=claim_round,
            defer=defer_exhausted,
            room=json.dumps(dict(room)) if room is not None else None,
        )
        return [
            ClaimedJob(UUID(job_id), UUID(tenant), job_type, payload, attempt, rescued, exhausted)
            for job_id, tenant, job_type, payload, attempt, rescued, exhausted in json.loads(
                rows[0][0]
            )
        ]

    def settle(
        self, worker_id: str | None, settlements: Sequence[Settlement]
    ) -> dict[SettleResult, int]:
        """Settles the outcomes in one statement; how many jobs got each result. Safe to send
        again: a settle is fenced by worker and attempt (a repeated one reports 'stale')."""
        if not settlements:
            return {}
        rows = self._run(
            "SELECT result, count(*)::int"
            " FROM queue_worker.settle_jobs(:worker, CAST(:outcomes AS jsonb)) GROUP BY result",
            idempotent=True,
            worker=worker_id,
            outcomes=json.dumps([s.as_json() for s in settlements]),
        )
        return {row[0]: row[1] for row in rows}

    def backlog(self) -> tuple[int, float]:
        """(jobs due now, age in seconds of the oldest due job)."""
        row = self._run(
            "SELECT due_now, oldest_age_seconds FROM queue_worker.queue_backlog()",
            idempotent=True,
        )[0]
        return int(row[0]), float(row[1])

    # The SQL API one job at a time (admin, CLI, compatibility) ------------------------------

    def enqueue(
        self,
        tenant_id: UUID,
        job_type: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        scheduled_at: datetime | None = None,
        max_attempts: int = 5,
        unique_key: str | None = None,
        depends_on: Iterable[UUID] | None = None,
    ) -> UUID:
        rows = self._run(
            "SELECT queue_worker.enqueue_job(p_tenant_id => CAST(:tenant AS uuid),"
            " p_job_type => :job_type, p_payload => CAST(:payload AS jsonb),"
            " p_priority => :priority,"
            " p_scheduled_at => coalesce(CAST(:scheduled_at AS timestamptz), now()),"
            " p_max_attempts => :max_attempts, p_unique_key => :unique_key,"
            " p_depends_on => CAST(:depends_on AS uuid[]))",
            # With a unique key a repeat returns the first job's id and inserts nothing.
            idempotent=unique_key is not None,
            tenant=str(tenant_id),
            job_type=job_type,
            payload=json.dumps(payload if payload is not None else {}),
            priority=priority,
            scheduled_at=scheduled_at,
            max_attempts=max_attempts,
            unique_key=unique_key,
            depends_on=[str(d) for d in depends_on] if depends_on is not None else None,
        )
        return UUID(str(rows[0][0]))

    def complete(self, job_id: UUID, worker_id: str | None) -> bool:
        rows = self._run(
            "SELECT queue_worker.complete_job(CAST(:id AS uuid), :worker)",
            idempotent=worker_id is not None,
            id=str(job_id),
            worker=worker_id,
        )
        return bool(rows[0][0])

    def fail(
        self,
        job_id: UUID,
        error: str,
        *,
        retryable: bool = True,
        retry_at: datetime | None = None,
        worker_id: str | None = None,
    ) -> str:
        rows = self._run(
            "SELECT queue_worker.fail_job(CAST(:id AS uuid), :error, :retryable,"
            " CAST(:retry_at AS timestamptz), :worker)",
            idempotent=False,
            id=str(job_id),
            error=error,
            retryable=retryable,
            retry_at=retry_at,
            worker=worker_id,
        )
        return str(rows[0][0])

    def cancel(self, job_id: UUID) -> bool:
        rows = self._run(
            "SELECT queue_worker.cancel_job(CAST(:id AS uuid))", idempotent=False, id=str(job_id)
        )
        return bool(rows[0][0])

    def requeue_dead_letter(self, job_id: UUID) -> UUID:
        rows = self._run(
            "SELECT queue_worker.requeue_dead_letter(CAST(:id AS uuid))",
            idempotent=False,
            id=str(job_id),
        )
        return UUID(str(rows[0][0]))

    def requeue_dead_letters(
        self,
        *,
        tenant_id: UUID | None = None,
        job_type: str | None = None,
        dead_after: datetime | None = None,
        limit: int = 1000,
    ) -> int:
        rows = self._run(
            "SELECT queue_worker.requeue_dead_letters(CAST(:tenant AS uuid), :job_type,"
            " CAST(:dead_after AS timestamptz), :limit)",
            idempotent=False,
            tenant=str(tenant_id) if tenant_id else None,
            job_type=job_type,
            dead_after=dead_after,
            limit=limit,
        )
        return int(rows[0][0])

    # Reading ------------------------------------------------------------------------------

    def get_job(self, job_id: UUID) -> Job | None:
        rows = self._run(
            f"SELECT {_JOB_COLUMNS} FROM queue_worker.get_job(CAST(:id AS uuid))",
            idempotent=True,
            id=str(job_id),
        )
        return Job(*rows[0]) if rows else None

    def dead_letters(
        self, *, tenant_id: UUID | None = None, job_type: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        rows = self._run(
            f"SELECT {_DEAD_LETTER_COLUMNS} FROM queue_worker.list_dead_letters("
            "CAST(:tenant AS uuid), CAST(:job_type AS text), :limit)",
            idempotent=True,
            tenant=str(tenant_id) if tenant_id else None,
            job_type=job_type,
            limit=limit,
        )
        return [DeadLetter(*row) for row in rows]

    def get_dead_letter(self, job_id: UUID) -> DeadLetter | None:
        rows = self._run(
            f"SELECT {_DEAD_LETTER_COLUMNS} FROM queue_worker.get_dead_letter(CAST(:id AS uuid))",
            idempotent=True,
            id=str(job_id),
        )
        return DeadLetter(*rows[0]) if rows else None

    def stats(self) -> QueueStats:
        rows = self._run(
            "SELECT job_type, status, jobs FROM queue_worker.queue_stats()", idempotent=True
        )
        by_status: dict[str, int] = {}
        by_type: dict[str, dict[str, int]] = {}
        dead = 0
        for job_type, status, count in rows:
            if status == "dead letter":
                dead += count
                continue
            by_status[status] = by_status.get(status, 0) + count
            by_type.setdefault(job_type, {})[status] = count
        due, oldest = self.backlog()
        return QueueStats(by_status, due, oldest, dead, by_type)

    # Maintenance ----------------------------------------------------------------------------

    def prune_chunk(
        self, *, completed_before: datetime, dead_before: datetime, chunk: int = 500
    ) -> tuple[int, int, int] | None:
        """Deletes one chunk of old history: (jobs, dead letters, idempotency records), or None
        when another invocation holds the pruning lock."""
        rows = self._run(
            "SELECT jobs_pruned, dead_letters_pruned, idempotency_pruned"
            " FROM queue_worker.queue_prune(CAST(:completed AS timestamptz),"
            " CAST(:dead AS timestamptz), :chunk)",
            idempotent=True,
            completed=completed_before,
            dead=dead_before,
            chunk=chunk,
        )
        if not rows:
            return None
        jobs, dead, idempotency = rows[0]
        return int(jobs), int(dead), int(idempotency)

    def may_prune(self) -> bool:
        """Whether the role connected may prune (operators may; the worker role may not)."""
        rows = self._run(
            "SELECT has_function_privilege("
            "'queue_worker.queue_prune(timestamptz, timestamptz, int)', 'EXECUTE')",
            idempotent=True,
        )
        return bool(rows[0][0])

    # Schedules ------------------------------------------------------------------------------

    def upsert_schedule(
        self,
        tenant_id: UUID,
        name: str,
        job_type: str,
        cron: str,
        *,
        timezone: str,
        payload_json: str,
        priority: int,
        max_attempts: int,
        max_catch_up: int,
        next_fire_at: datetime | None,
    ) -> UUID:
        rows = self._run(
            "SELECT queue_worker.upsert_schedule(p_tenant_id => CAST(:tenant AS uuid),"
            " p_name => :name, p_job_type => :job_type, p_cron => :cron, p_timezone => :timezone,"
            " p_payload => CAST(:payload AS jsonb), p_priority => :priority,"
            " p_max_attempts => :max_attempts, p_max_catch_up => :max_catch_up,"
            " p_next_fire_at => CAST(:next_fire_at AS timestamptz))",
            idempotent=True,  # by tenant and name: a repeat replaces with the same values
            tenant=str(tenant_id) if tenant_id is not None else None,
            name=name,
            job_type=job_type,
            cron=cron,
            timezone=timezone,
            payload=payload_json,
            priority=priority,
            max_attempts=max_attempts,
            max_catch_up=max_catch_up,
            next_fire_at=next_fire_at.isoformat() if next_fire_at else None,
        )
        return UUID(str(rows[0][0]))

    def pause_schedule(self, schedule_id: UUID) -> bool:
        rows = self._run(
            "SELECT queue_worker.pause_schedule(CAST(:id AS uuid))",
            idempotent=True,
            id=str(schedule_id),
        )
        return bool(rows[0][0])

    def resume_schedule(self, schedule_id: UUID, next_fire_at: datetime | None) -> bool:
        rows = self._run(
            "SELECT queue_worker.resume_schedule(CAST(:id AS uuid),"
            " CAST(:next_fire_at AS timestamptz))",
            idempotent=True,
            id=str(schedule_id),
            next_fire_at=next_fire_at.isoformat() if next_fire_at else None,
        )
        return bool(rows[0][0])

    def delete_schedule(self, schedule_id: UUID) -> bool:
        rows = self._run(
            "SELECT queue_worker.delete_schedule(CAST(:id AS uuid))",
            idempotent=False,
            id=str(schedule_id),
        )
        return bool(rows[0][0])

    def schedule_rows(
        self, *, schedule_id: UUID | None = None, tenant_id: UUID | None = None
    ) -> list[list[Any]]:
        """Rows of SCHEDULE_COLUMNS: one schedule by id, or all (of one tenant) by tenant, name."""
        if schedule_id is not None:
            return self._run(
                f"SELECT {SCHEDULE_COLUMNS} FROM queue_worker.get_schedule(CAST(:id AS uuid))",
                idempotent=True,
                id=str(schedule_id),
            )
        return self._run(
            f"SELECT {SCHEDULE_COLUMNS} FROM queue_worker.list_schedules(CAST(:tenant AS uuid))",
            idempotent=True,
            tenant=str(tenant_id) if tenant_id is not None else None,
        )

    def due_schedules(self, *, now: datetime | None, limit: int) -> list[DueSchedule]:
        rows = self._run(
            "SELECT id, cron, timezone, max_catch_up, next_fire_at, clock"
            " FROM queue_worker.queue_due_schedules(CAST(:now AS timestamptz), :limit)",
            idempotent=True,
            now=now.isoformat() if now is not None else None,
            limit=limit,
        )
        return [DueSchedule(*row) for row in rows]

    def fire_schedule(
        self,
        schedule_id: UUID,
        *,
        expected_next: datetime | None,
        fire_times: Sequence[datetime],
        next_fire_at: datetime,
    ) -> tuple[int, datetime]:
        """(jobs created, the firing transaction's time: the schedule's updated_at if its
        compare-and-set won)."""
        row = self._run(
            "SELECT queue_worker.fire_schedule(CAST(:id AS uuid),"
            " CAST(:expected AS timestamptz), CAST(:times AS timestamptz[]),"
            " CAST(:next AS timestamptz)), now()",
            # A compare-and-set on next_fire_at, and unique keys per fire time: a repeat is a no-op.
            idempotent=True,
            id=str(schedule_id),
            expected=expected_next.isoformat() if expected_next is not None else None,
            times=[t.isoformat() for t in fire_times],
            next=next_fire_at.isoformat(),
        )[0]
        return int(row[0]), row[1]

    def schedule_updated_at(self, schedule_id: UUID) -> datetime | None:
        rows = self._run(
            "SELECT queue_worker.queue_schedule_updated_at(CAST(:id AS uuid))",
            idempotent=True,
            id=str(schedule_id),
        )
        return rows[0][0] if rows else None

    def schedule_failed(
        self, schedule_id: UUID, *, expected_next: datetime | None, error: str
    ) -> bool:
        rows = self._run(
            "SELECT queue_worker.queue_schedule_failed(CAST(:id AS uuid),"
            " CAST(:expected AS timestamptz), :error)",
            idempotent=True,
            id=str(schedule_id),
            expected=expected_next.isoformat() if expected_next is not None else None,
            error=error,
        )
        return bool(rows[0][0])

    def now(self) -> datetime:
        """The database's clock."""
        value: datetime = self._run("SELECT now()", idempotent=True)[0][0]
        return value

    # Flow control: routes, functions, tenants, lingering, explain --------------------------

    def record_routes(self, routes: dict[str, dict[str, Any]]) -> None:
        """The worker's routes, for the functions' rate limits and for explain_job:
        {job_type: {"function", "rate", "burst", "max_concurrency"}}."""
        self._run(
            "SELECT queue_worker.record_routes(CAST(:routes AS jsonb))",
            idempotent=True,
            routes=json.dumps(routes),
        )

    def function_states(self) -> dict[str, float]:
        """The adaptive limits of calls in flight the last invocations left, by function."""
        rows = self._run(
            "SELECT function, concurrency_limit FROM queue_worker.function_states()",
            idempotent=True,
        )
        return {str(row[0]): float(row[1]) for row in rows}

    def record_function_states(self, states: Sequence[dict[str, Any]]) -> None:
        """[{"function", "concurrency_limit", "circuit_status", "circuit_error"}]."""
        if not states:
            return
        self._run(
            "SELECT queue_worker.record_function_states(CAST(:states AS jsonb))",
            idempotent=True,
            states=json.dumps(list(states)),
        )

    def set_tenant_limits(
        self,
        tenant_id: UUID | None,
        *,
        weight: float = 1.0,
        rate: float | None = None,
        burst: float | None = None,
    ) -> None:
        """A tenant's weight and rate (jobs/s); tenant None: the default of every tenant."""
        self._run(
            "SELECT queue_worker.set_tenant_limits(CAST(:tenant AS uuid), CAST(:weight AS float8),"
            " CAST(:rate AS float8), CAST(:burst AS float8))",
            idempotent=True,
            tenant=str(tenant_id) if tenant_id else None,
            weight=weight,
            rate=rate,
            burst=burst,
        )

    def clear_tenant_limits(self, tenant_id: UUID | None) -> bool:
        rows = self._run(
            "SELECT queue_worker.clear_tenant_limits(CAST(:tenant AS uuid))",
            idempotent=True,
            tenant=str(tenant_id) if tenant_id else None,
        )
        return bool(rows[0][0])

    def take_linger(self, worker_id: str, started_at: datetime, seconds: float) -> bool:
        """This worker lingers from now, unless an invocation that started later does."""
        rows = self._run(
            "SELECT queue_worker.queue_linger_take(:worker, CAST(:started AS timestamptz),"
            " CAST(:seconds AS float8))",
            idempotent=True,
            worker=worker_id,
            started=started_at.isoformat(),
            seconds=seconds,
        )
        return bool(rows[0][0])

    def listen(self, channel: str) -> None:
        """LISTEN on this store's connection (a session's: not through a transaction pooler);
        again after a reconnect, since a new connection listens to nothing."""
        conn = self.conn
        if self._listening is not conn:
            self._run(f"LISTEN {pg8000.native.identifier(channel)}", idempotent=True)
            self._listening = conn

    def wait_for_notification(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for the server to send something (a notification, which
        the next statement reads); True when something came."""
        sock = getattr(self.conn, "_usock", None)  # pg8000 keeps no public handle on it
        if sock is None:
            time.sleep(max(0.0, timeout))
            return False
        readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
        return bool(readable)

    def take_notifications(self) -> int:
        """How many notifications the connection received since the last call (read by the
        statements run meanwhile), forgotten."""
        if self._conn is None:
            return 0
        notifications = self._conn.notifications
        count = len(notifications)
        notifications.clear()
        return count

    def linger_poll(self, worker_id: str) -> tuple[bool, float | None]:
        """(whether this worker still lingers, seconds until the next job is due or None)."""
        row = self._run(
            "SELECT lingering, next_due_in FROM queue_worker.queue_linger_poll(:worker)",
            idempotent=True,
            worker=worker_id,
        )[0]
        return bool(row[0]), float(row[1]) if row[1] is not None else None

    def release_linger(self, worker_id: str) -> None:
        self._run(
            "SELECT queue_worker.queue_linger_release(:worker)", idempotent=True, worker=worker_id
        )

    def explain(self, job_id: UUID) -> tuple[str, str, dict[str, Any]]:
        """(reason, message, detail) of what holds the job back."""
        row = self._run(
            "SELECT reason, message, detail FROM queue_worker.explain_job(CAST(:id AS uuid))",
            idempotent=True,
            id=str(job_id),
        )[0]
        return str(row[0]), str(row[1]), dict(row[2] or {})

    # Idempotency records (the PostgreSQL store of the dispatch guard) -----------------------

    def idempotency_get(self, key: str) -> list[Any] | None:
        """(id, status, expiration, in_progress_expiration, data, validation), or None."""
        rows = self._run(
            "SELECT id, status, expiration, in_progress_expiration, data, validation"
            " FROM queue_worker.idempotency_get(:id)",
            idempotent=True,
            id=key,
        )
        return rows[0] if rows else None

    def idempotency_put(
        self,
        key: str,
        *,
        status: str,
        expiration: int | None,
        in_progress_expiration: int | None,
        validation: str | None,
        now: int,
        now_ms: int,
    ) -> list[list[Any]]:
        """Takes the key (rows [[True, ...]]), or returns the record in the way ([[False,
        status, ...]]), or nothing when the record exists but is not visible yet."""
        return self._run(
            "SELECT taken, status, expiration, in_progress_expiration, data, validation"
            " FROM queue_worker.idempotency_put(:id, :status, :expiration, :in_progress,"
            " :validation, :now, :now_ms)",
            # Sent twice, the second would find the first's record and refuse: no double call.
            idempotent=False,
            id=key,
            status=status,
            expiration=expiration,
            in_progress=in_progress_expiration,
            validation=validation,
            now=now,
            now_ms=now_ms,
        )

    def idempotency_update(
        self, key: str, *, status: str, expiration: int | None, data: str, validation: str | None
    ) -> None:
        self._run(
            "SELECT queue_worker.idempotency_update(:id, :status, :expiration, :data, :validation)",
            idempotent=True,
            id=key,
            status=status,
            expiration=expiration,
            data=data,
            validation=validation,
        )

    def idempotency_delete(self, key: str) -> None:
        self._run("SELECT queue_worker.idempotency_delete(:id)", idempotent=True, id=key)


class _LostBeforeSending(Exception):
    """The connection broke before the statement was sent: sending it again is safe."""


def _in_transaction(conn: pg8000.native.Connection) -> bool:
    # pg8000 keeps the server's last ReadyForQuery status (b"I" idle, b"T"/b"E" in a
    # transaction) but has no public accessor for it.
    return getattr(conn, "_transaction_status", b"I") not in (b"I", None)


def _rows(result: Any) -> list[list[Any]]:
    return list(result) if result is not None else []
