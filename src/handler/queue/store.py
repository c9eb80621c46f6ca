"""The queue's SQL API from Python: the only module that sends SQL about jobs.

Every method is one call of a SQL function (one round trip, one atomic statement); the functions
live in handler/sql/migrations and are documented there and in the README.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import pg8000.native

OutcomeKind = Literal["completed", "failed", "dead", "rate_limited", "released"]
SettleResult = Literal["completed", "retry", "dead", "released", "stale"]


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job leased to this worker. `attempt` is 1 on the first dispatch."""

    id: UUID
    tenant_id: UUID
    job_type: str
    # The payload as PostgreSQL renders jsonb (always valid JSON): it goes into the request body
    # as is, so a batch never parses and re-serialises thousands of payloads.
    payload_json: str
    priority: int
    attempt: int
    max_attempts: int
    scheduled_at: datetime
    locked_until: datetime
    created_at: datetime
    rescued: bool  # taken over from a worker whose lease expired


@dataclass(frozen=True, slots=True)
class Settlement:
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


@dataclass(frozen=True, slots=True)
class Job:
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


@dataclass(frozen=True, slots=True)
class DeadLetter:
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


@dataclass(frozen=True, slots=True)
class QueueStats:
    by_status: dict[str, int]
    due_now: int  # pending and due: the backlog
    oldest_due_age_seconds: float  # how long the oldest due job has waited (0 when none)
    dead_letters: int
    by_job_type: dict[str, dict[str, int]] = field(default_factory=dict)


_JOB_COLUMNS = (
    "id, tenant_id, job_type, payload, status, priority, attempts, max_attempts, scheduled_at,"
    " locked_until, locked_by, last_error, errors, unique_key, depends_on, created_at, updated_at,"
    " completed_at"
)


class QueueStore:
    """Typed calls of the queue's SQL functions over one pg8000 connection (not thread-safe)."""

    def __init__(self, conn: pg8000.native.Connection) -> None:
        self.conn = conn

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
    ) -> list[ClaimedJob]:
        rows = self.conn.run(
            "SELECT id, tenant_id, job_type, payload::text, priority, attempts, max_attempts,"
            " scheduled_at, locked_until, created_at, rescued"
            " FROM claim_jobs(p_worker_id => :worker, p_lease_seconds => :lease,"
            " p_max_jobs => :max_jobs, p_max_per_tenant => :per_tenant,"
            " p_tenant_id => CAST(:tenant AS uuid), p_shard => :shard, p_shards => :shards)",
            worker=worker_id,
            lease=lease_seconds,
            max_jobs=max_jobs,
            per_tenant=max_per_tenant,
            tenant=str(tenant_id) if tenant_id else None,
            shard=shard,
            shards=shards,
        )
        return [ClaimedJob(*row) for row in rows]

    def settle(
        self, worker_id: str | None, settlements: Sequence[Settlement]
    ) -> dict[UUID, SettleResult]:
        if not settlements:
            return {}
        rows = self.conn.run(
            "SELECT job_id, result FROM settle_jobs(:worker, CAST(:outcomes AS jsonb))",
            worker=worker_id,
            outcomes=json.dumps([s.as_json() for s in settlements]),
        )
        return {row[0]: row[1] for row in rows}

    def settle_summary(
        self, worker_id: str | None, settlements: Sequence[Settlement]
    ) -> dict[SettleResult, int]:
        """As settle, in the same one statement, but only how many jobs got each result: the
        worker's path, where parsing thousands of result rows would cost more than the SQL."""
        if not settlements:
            return {}
        rows = self.conn.run(
            "SELECT result, count(*)::int FROM settle_jobs(:worker, CAST(:outcomes AS jsonb))"
            " GROUP BY result",
            worker=worker_id,
            outcomes=json.dumps([s.as_json() for s in settlements]),
        )
        return {row[0]: row[1] for row in rows}

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
        rows = self.conn.run(
            "SELECT enqueue_job(p_tenant_id => CAST(:tenant AS uuid), p_job_type => :job_type,"
            " p_payload => CAST(:payload AS jsonb), p_priority => :priority,"
            " p_scheduled_at => coalesce(CAST(:scheduled_at AS timestamptz), now()),"
            " p_max_attempts => :max_attempts, p_unique_key => :unique_key,"
            " p_depends_on => CAST(:depends_on AS uuid[]))",
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
        rows = self.conn.run("SELECT complete_job(:id, :worker)", id=str(job_id), worker=worker_id)
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
        rows = self.conn.run(
            "SELECT fail_job(CAST(:id AS uuid), :error, :retryable, CAST(:retry_at AS timestamptz),"
            " :worker)",
            id=str(job_id),
            error=error,
            retryable=retryable,
            retry_at=retry_at,
            worker=worker_id,
        )
        return str(rows[0][0])

    def cancel(self, job_id: UUID) -> bool:
        return bool(self.conn.run("SELECT cancel_job(CAST(:id AS uuid))", id=str(job_id))[0][0])

    def requeue_dead_letter(self, job_id: UUID) -> UUID:
        rows = self.conn.run("SELECT requeue_dead_letter(CAST(:id AS uuid))", id=str(job_id))
        return UUID(str(rows[0][0]))

    def requeue_dead_letters(
        self,
        *,
        tenant_id: UUID | None = None,
        job_type: str | None = None,
        dead_after: datetime | None = None,
        limit: int = 1000,
    ) -> int:
        rows = self.conn.run(
            "SELECT requeue_dead_letters(CAST(:tenant AS uuid), :job_type,"
            " CAST(:dead_after AS timestamptz), :limit)",
            tenant=str(tenant_id) if tenant_id else None,
            job_type=job_type,
            dead_after=dead_after,
            limit=limit,
        )
        return int(rows[0][0])

    # Reading ------------------------------------------------------------------------------

    def get_job(self, job_id: UUID) -> Job | None:
        rows = self.conn.run(
            f"SELECT {_JOB_COLUMNS} FROM queue_jobs WHERE id = CAST(:id AS uuid)", id=str(job_id)
        )
        return Job(*rows[0]) if rows else None

    def dead_letters(
        self, *, tenant_id: UUID | None = None, job_type: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        rows = self.conn.run(
            "SELECT id, tenant_id, job_type, payload, attempts, max_attempts, last_error, errors,"
            " reason, dead_at FROM queue_jobs_dead_letter"
            " WHERE (CAST(:tenant AS uuid) IS NULL OR tenant_id = CAST(:tenant AS uuid))"
            "   AND (CAST(:job_type AS text) IS NULL OR job_type = :job_type)"
            " ORDER BY dead_at DESC LIMIT :limit",
            tenant=str(tenant_id) if tenant_id else None,
            job_type=job_type,
            limit=limit,
        )
        return [DeadLetter(*row) for row in rows]

    def get_dead_letter(self, job_id: UUID) -> DeadLetter | None:
        rows = self.conn.run(
            "SELECT id, tenant_id, job_type, payload, attempts, max_attempts, last_error, errors,"
            " reason, dead_at FROM queue_jobs_dead_letter WHERE id = CAST(:id AS uuid)",
            id=str(job_id),
        )
        return DeadLetter(*rows[0]) if rows else None

    def stats(self) -> QueueStats:
        rows = self.conn.run(
            "SELECT job_type, status, count(*)::int FROM queue_jobs GROUP BY job_type, status"
        )
        by_status: dict[str, int] = {}
        by_type: dict[str, dict[str, int]] = {}
        for job_type, status, count in rows:
            by_status[status] = by_status.get(status, 0) + count
            by_type.setdefault(job_type, {})[status] = count
        due, oldest = self.backlog()
        dead = int(self.conn.run("SELECT count(*) FROM queue_jobs_dead_letter")[0][0])
        return QueueStats(by_status, due, oldest, dead, by_type)

    def backlog(self) -> tuple[int, float]:
        """(jobs due now, age in seconds of the oldest due job), read from the claim index."""
        row = self.conn.run(
            "SELECT count(*)::int,"
            " coalesce(extract(epoch FROM now() - min(scheduled_at)), 0)::float8"
            " FROM queue_jobs WHERE status IN ('pending', 'processing') AND scheduled_at <= now()"
            " AND (status = 'pending' OR locked_until < now())"
        )[0]
        return int(row[0]), float(row[1])

    # Maintenance ----------------------------------------------------------------------------

    def prune_chunk(
        self, *, completed_before: datetime, dead_before: datetime, chunk: int = 500
    ) -> tuple[int, int, int] | None:
        """Deletes one chunk of old history: (jobs, dead letters, idempotency records), or None
        when another invocation holds the pruning lock."""
        rows = self.conn.run(
            "SELECT jobs_pruned, dead_letters_pruned, idempotency_pruned"
            " FROM queue_prune(CAST(:completed AS timestamptz), CAST(:dead AS timestamptz), :chunk)",
            completed=completed_before,
            dead=dead_before,
            chunk=chunk,
        )
        if not rows:
            return None
        jobs, dead, idempotency = rows[0]
        return int(jobs), int(dead), int(idempotency)
