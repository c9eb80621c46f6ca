"""Helpers for the specifications of the queue's SQL (tests/sql).

Every test runs against a real PostgreSQL (see tests/conftest.py) and starts from an empty queue.
Time is never waited for: a lease "expires" or a job becomes "due" by moving `locked_until` or
`scheduled_at` into the past with an UPDATE.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

import pg8000.native
import pytest

from handler.errors import QueueRefusedError
from handler.queue import connection
from handler.queue.store import ClaimedJob, QueueStore
from tests.conftest import TEST_SEARCH_PATH

_TABLES = (
    "queue_jobs",
    "queue_jobs_dead_letter",
    "queue_job_dependencies",
    "queue_idempotency",
    "queue_tenants",
    "queue_tenant_limits",
    "queue_functions",
    "queue_routes",
)


@pytest.fixture(scope="session")
def _sql_session(database_url: str) -> Iterator[pg8000.native.Connection]:
    session = connection.connect(connection.parse_database_url(database_url))
    yield session
    session.close()


@pytest.fixture
def conn(_sql_session: pg8000.native.Connection) -> pg8000.native.Connection:
    """A connection to an empty queue (as in tests/conftest.py), reused across these tests.

    Connecting and TRUNCATE cost ~0.4 s per test; rolling back what a failed test left open and
    deleting the few rows a test makes costs milliseconds. A test that makes many rows empties
    the tables itself with TRUNCATE.
    """
    _sql_session.run("ROLLBACK")  # a no-op (a warning) unless a failed test left one open
    _sql_session.run("RESET ALL")
    _sql_session.run(TEST_SEARCH_PATH)
    for table in _TABLES:
        _sql_session.run(f"DELETE FROM {table}")
    return _sql_session


def wait_until_blocked(observer: pg8000.native.Connection, pid: int) -> None:
    """Returns once backend `pid` waits for a lock that another session holds (polling
    pg_blocking_pids from `observer`; it never sleeps)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if observer.run("SELECT cardinality(pg_blocking_pids(:pid)) > 0", pid=pid)[0][0]:
            return
    pytest.fail(f"backend {pid} never blocked")


# The tenant of a job enqueued without one: the same for every session, since a job may depend
# only on jobs of its own tenant.
DEFAULT_TENANT = UUID("00000000-0000-4000-8000-00000000000a")


class Queue:
    """Direct SQL on the queue's tables and functions, for givens and thens."""

    def __init__(self, conn: pg8000.native.Connection, store: QueueStore) -> None:
        self.conn = conn
        self.store = store

    # Givens -------------------------------------------------------------------------------

    def enqueue(
        self, tenant: UUID | None = None, job_type: str = "ingest_slack", **kw: Any
    ) -> UUID:
        return self.store.enqueue(tenant or DEFAULT_TENANT, job_type, kw.pop("payload", {}), **kw)

    def claim(self, worker: str = "worker-a", **kw: Any) -> list[ClaimedJob]:
        kw.setdefault("lease_seconds", 300)
        kw.setdefault("max_jobs", 1000)
        kw.setdefault("max_per_tenant", 1000)
        return self.store.claim(worker, **kw)

    def claim_ids(self, worker: str = "worker-a", **kw: Any) -> list[UUID]:
        return [job.id for job in self.claim(worker, **kw)]

    def claimed(self, worker: str = "worker-a", **kw: Any) -> UUID:
        """Enqueues one job and claims it for `worker`; returns its id."""
        job_id = self.enqueue(**kw)
        assert self.claim_ids(worker, tenant_id=self.job(job_id)["tenant_id"]) == [job_id]
        return job_id

    def expire_lease(self, job_id: UUID) -> None:
        self.conn.run(
            "UPDATE queue_jobs SET locked_until = now() - interval '1 second'"
            " WHERE id = CAST(:id AS uuid)",
            id=str(job_id),
        )

    def make_due(self, job_id: UUID) -> None:
        self.conn.run(
            "UPDATE queue_jobs SET scheduled_at = now() - interval '1 second'"
            " WHERE id = CAST(:id AS uuid)",
            id=str(job_id),
        )

    def complete(self, job_id: UUID, worker: str | None) -> bool:
        return self.store.complete(job_id, worker)

    def fail(self, job_id: UUID, worker: str | None, error: str = "boom", **kw: Any) -> str:
        return self.store.fail(job_id, error, worker_id=worker, **kw)

    def settle(self, worker: str | None, outcomes: Any) -> dict[UUID, str]:
        """settle_jobs with `outcomes` sent as JSON, whatever it is."""
        rows = self.conn.run(
            "SELECT job_id, result FROM settle_jobs(:worker, CAST(:outcomes AS jsonb))",
            worker=worker,
            outcomes=json.dumps(outcomes, default=str),
        )
        return {row[0]: row[1] for row in rows}

    # Thens --------------------------------------------------------------------------------

    def _row(self, table: str, job_id: UUID) -> dict[str, Any] | None:
        rows = self.conn.run(f"SELECT * FROM {table} WHERE id = CAST(:id AS uuid)", id=str(job_id))
        if not rows:
            return None
        names = [c["name"] for c in self.conn.columns]
        return dict(zip(names, rows[0], strict=True))

    def job(self, job_id: UUID) -> dict[str, Any]:
        row = self._row("queue_jobs", job_id)
        assert row is not None, f"job {job_id} is not in queue_jobs"
        return row

    def dead_letter(self, job_id: UUID) -> dict[str, Any]:
        row = self._row("queue_jobs_dead_letter", job_id)
        assert row is not None, f"job {job_id} is not in queue_jobs_dead_letter"
        return row

    @staticmethod
    def history(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`errors` entries with "at" read as a datetime (its JSON text depends on TimeZone)."""
        return [{**e, "at": datetime.fromisoformat(e["at"])} for e in errors]

    def in_queue(self, job_id: UUID) -> bool:
        return self._row("queue_jobs", job_id) is not None

    def in_dead_letter(self, job_id: UUID) -> bool:
        return self._row("queue_jobs_dead_letter", job_id) is not None

    def status(self, job_id: UUID) -> str:
        return str(self.job(job_id)["status"])

    def count(self, table: str = "queue_jobs") -> int:
        return int(self.conn.run(f"SELECT count(*) FROM {table}")[0][0])

    def snapshot(self) -> list[tuple[Any, ...]]:
        """Every row of the queue's tables: equal snapshots mean nothing changed."""
        return [
            tuple(row)
            for table in ("queue_jobs", "queue_jobs_dead_letter", "queue_job_dependencies")
            for row in self.conn.run(f"SELECT '{table}', t::text FROM {table} t ORDER BY 2")
        ]

    def now(self) -> datetime:
        return self.conn.run("SELECT now()")[0][0]

    @contextmanager
    def rejects(self, code: str, words: str) -> Iterator[None]:
        """The block fails with SQLSTATE `code`, a message containing `words`, and changes nothing."""
        before = self.snapshot()
        with pytest.raises((pg8000.native.DatabaseError, QueueRefusedError)) as info:
            yield
        if isinstance(info.value, QueueRefusedError):
            error = {"C": info.value.sqlstate, "M": str(info.value)}
        else:
            error = info.value.args[0]
        assert (error["C"], words in error["M"]) == (code, True), error
        assert self.snapshot() == before

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction: now() is the same in every statement inside it."""
        self.conn.run("BEGIN")
        try:
            yield
        except BaseException:
            self.conn.run("ROLLBACK")
            raise
        self.conn.run("COMMIT")


@pytest.fixture
def queue(conn: pg8000.native.Connection, store: QueueStore) -> Queue:
    return Queue(conn, store)


@pytest.fixture
def other_queue(connect: Callable[[], pg8000.native.Connection]) -> Callable[[], Queue]:
    """A Queue on a connection of its own (another worker, another session)."""

    def _open() -> Queue:
        conn = connect()
        return Queue(conn, QueueStore(conn))

    return _open
