"""The exact account every fault test ends with: where each job is, and how often it was sent.

Time is never waited for: a lease "expires", a job becomes "due" or an invocation's in-progress
idempotency record "times out" by moving its timestamp into the past with an UPDATE.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import pg8000.native

from handler.dispatch.guard import IDEMPOTENCY_KEY_PREFIX
from handler.local.standin import ReceivedRequest, StandIn


def account(conn: pg8000.native.Connection, job_ids: Iterable[UUID | str]) -> Counter[str]:
    """How many of these jobs are completed, pending, processing, ... or dead (in the dead letter
    table). Fails when one of them is nowhere: a job may never be lost."""
    ids = sorted({str(job_id) for job_id in job_ids})
    rows = conn.run(
        "SELECT status, count(*) FROM queue_jobs WHERE id = ANY (CAST(:ids AS uuid[]))"
        " GROUP BY status",
        ids=ids,
    )
    counts: Counter[str] = Counter({str(status): int(n) for status, n in rows})
    [[dead]] = conn.run(
        "SELECT count(*) FROM queue_jobs_dead_letter WHERE id = ANY (CAST(:ids AS uuid[]))",
        ids=ids,
    )
    if dead:
        counts["dead"] = int(dead)
    assert sum(counts.values()) == len(ids), f"{len(ids) - sum(counts.values())} jobs lost"
    return counts


def statuses(conn: pg8000.native.Connection, job_ids: Iterable[UUID | str]) -> dict[str, str]:
    """Each job's status ('dead' when in the dead letter table)."""
    ids = sorted({str(job_id) for job_id in job_ids})
    rows = conn.run(
        "SELECT id::text, status FROM queue_jobs WHERE id = ANY (CAST(:ids AS uuid[]))"
        " UNION ALL SELECT id::text, 'dead' FROM queue_jobs_dead_letter"
        " WHERE id = ANY (CAST(:ids AS uuid[]))",
        ids=ids,
    )
    return {str(job_id): str(status) for job_id, status in rows}


def dispatches(requests: Iterable[ReceivedRequest]) -> Counter[str]:
    """How many times each job was POSTed, by Idempotency-Key. Every request must carry the key
    of the job in its body: a repeat is recognisable as one."""
    counts: Counter[str] = Counter()
    for request in requests:
        key = request.headers["idempotency-key"]
        assert request.body["job_id"] == key, f"Idempotency-Key {key} on another job's body"
        counts[key] += 1
    return counts


def sent(standin: StandIn) -> Counter[str]:
    return dispatches(standin.requests())


def attempts_sent(requests: Iterable[ReceivedRequest], job_id: UUID | str) -> list[int]:
    """The `attempt` of each POST of one job, in order."""
    return [r.body["attempt"] for r in requests if r.headers["idempotency-key"] == str(job_id)]


def enqueue_many(
    conn: pg8000.native.Connection,
    tenant_id: UUID | str,
    job_type: str,
    count: int,
    payload: dict[str, Any] | None = None,
) -> list[str]:
    """`count` jobs enqueued through the SQL API, in order."""
    rows = conn.run(
        "SELECT enqueue_job(CAST(:tenant AS uuid), :job_type,"
        " CAST(:payload AS jsonb) || jsonb_build_object('n', n))::text"
        " FROM generate_series(1, :count) n ORDER BY n",
        tenant=str(tenant_id),
        job_type=job_type,
        payload=json.dumps(payload or {}),
        count=count,
    )
    return [str(row[0]) for row in rows]


def expire_leases(conn: pg8000.native.Connection) -> int:
    """Every lease runs out (as if its worker's invocation had ended long ago)."""
    conn.run(
        "UPDATE queue_jobs SET locked_until = now() - interval '1 s' WHERE status = 'processing'"
    )
    return int(conn.row_count)


def make_due(conn: pg8000.native.Connection, job_ids: Iterable[UUID | str]) -> None:
    conn.run(
        "UPDATE queue_jobs SET scheduled_at = now() WHERE id = ANY (CAST(:ids AS uuid[]))",
        ids=[str(job_id) for job_id in job_ids],
    )


def idempotency_key(job_id: UUID | str) -> str:
    """The key of a job's dispatch record: Powertools hashes the `job_id` (md5 of its JSON)."""
    digest = hashlib.md5(json.dumps(str(job_id)).encode(), usedforsecurity=False).hexdigest()
    return f"{IDEMPOTENCY_KEY_PREFIX}#{digest}"


def idempotency_records(
    conn: pg8000.native.Connection, job_ids: Iterable[UUID | str]
) -> dict[str, str]:
    """Job id -> status of its dispatch record (INPROGRESS, COMPLETED), for jobs that have one."""
    by_key = {idempotency_key(job_id): str(job_id) for job_id in job_ids}
    rows = conn.run(
        "SELECT id, status FROM queue_idempotency WHERE id = ANY (:keys)", keys=list(by_key)
    )
    return {by_key[key]: str(status) for key, status in rows}


def expire_in_progress_records(conn: pg8000.native.Connection) -> int:
    """The invocation that wrote the in-progress records has reached its deadline."""
    conn.run(
        "UPDATE queue_idempotency"
        " SET in_progress_expiration = floor(extract(epoch FROM now()) * 1000)::bigint - 1000"
        " WHERE status = 'INPROGRESS'"
    )
    return int(conn.row_count)
