"""Claim, settle and rescue interleaved step by step on two connections (two workers), in the
SQL API itself: no threads, no timing. A lease "expires" by an UPDATE."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pg8000.native
import pytest

from .accounting import account, enqueue_many, expire_leases
from .conftest import job_state

Connect = Callable[[], pg8000.native.Connection]


def claim(conn: pg8000.native.Connection, worker: str, max_jobs: int = 10) -> list[Any]:
    """(id, attempts, rescued) of each job the worker claims."""
    rows = conn.run(
        "SELECT id::text, attempts, rescued FROM claim_jobs(p_worker_id => :worker,"
        " p_lease_seconds => 60, p_max_jobs => :n, p_max_per_tenant => :n) ORDER BY priority DESC",
        worker=worker,
        n=max_jobs,
    )
    return [tuple(row) for row in rows]


def settle(conn: pg8000.native.Connection, worker: str, **outcome: Any) -> str:
    [[result]] = conn.run(
        "SELECT result FROM settle_jobs(:worker, CAST(:outcomes AS jsonb))",
        worker=worker,
        outcomes=json.dumps([outcome]),
    )
    return str(result)


@pytest.fixture
def workers(
    conn: pg8000.native.Connection, connect: Connect
) -> tuple[pg8000.native.Connection, pg8000.native.Connection]:
    """Two connections, one per worker (`conn` has emptied the queue)."""
    return connect(), connect()


def test_a_late_settlement_after_a_rescue_is_stale_and_changes_nothing(
    conn: pg8000.native.Connection,
    workers: tuple[pg8000.native.Connection, pg8000.native.Connection],
) -> None:
    a, b = workers
    [job] = enqueue_many(conn, uuid.uuid4(), "ingest_slack", 1)

    assert claim(a, "A") == [(job, 1, False)]
    assert expire_leases(conn) == 1  # A's lease runs out, A has not settled
    assert claim(b, "B") == [(job, 2, True)]  # B rescues it: attempt 2
    held_by_b = job_state(conn, job)
    assert (held_by_b["status"], held_by_b["locked_by"], held_by_b["attempts"]) == (
        "processing",
        "B",
        2,
    )

    assert settle(a, "A", id=job, attempt=1, outcome="completed") == "stale"
    assert job_state(conn, job) == held_by_b  # nothing changed
    assert settle(b, "B", id=job, attempt=2, outcome="failed", error="boom", status=500) == "retry"
    assert a.run("SELECT complete_job(CAST(:id AS uuid), 'A')", id=job) == [[False]]

    state = job_state(conn, job)
    assert (state["status"], state["attempts"], state["last_error"]) == ("pending", 2, "boom")
    assert [e["attempt"] for e in state["errors"]] == [1, 2]  # the lost attempt, then B's
    assert state["errors"][0]["error"].startswith("Lease expired during attempt 1")
    assert account(conn, [job]) == {"pending": 1}


def test_a_settlement_before_the_rescue_leaves_nothing_to_claim(
    conn: pg8000.native.Connection,
    workers: tuple[pg8000.native.Connection, pg8000.native.Connection],
) -> None:
    a, b = workers
    [job] = enqueue_many(conn, uuid.uuid4(), "ingest_slack", 1)

    assert claim(a, "A") == [(job, 1, False)]
    assert settle(a, "A", id=job, attempt=1, outcome="completed") == "completed"
    assert expire_leases(conn) == 0
    assert claim(b, "B") == []
    assert settle(b, "B", id=job, outcome="failed", error="late") == "stale"

    state = job_state(conn, job)
    assert (state["status"], state["attempts"], state["locked_by"]) == ("completed", 1, "A")
    assert account(conn, [job]) == {"completed": 1}


def test_an_expired_lease_nobody_took_over_is_still_settled_by_its_worker(
    conn: pg8000.native.Connection,
    workers: tuple[pg8000.native.Connection, pg8000.native.Connection],
) -> None:
    a, b = workers
    [job] = enqueue_many(conn, uuid.uuid4(), "ingest_slack", 1)

    assert claim(a, "A") == [(job, 1, False)]
    assert expire_leases(conn) == 1
    assert settle(a, "A", id=job, attempt=1, outcome="completed") == "completed"
    assert claim(b, "B") == []

    assert account(conn, [job]) == {"completed": 1}


def test_a_claim_skips_rows_an_open_claim_holds_and_nothing_is_claimed_twice(
    conn: pg8000.native.Connection,
    workers: tuple[pg8000.native.Connection, pg8000.native.Connection],
) -> None:
    one, two = workers
    tenant = uuid.uuid4()
    jobs = [
        conn.run(
            "SELECT enqueue_job(CAST(:t AS uuid), 'ingest_slack', p_priority => :p)::text",
            t=str(tenant),
            p=priority,
        )[0][0]
        for priority in (4, 3, 2, 1)
    ]
    two.run("SET lock_timeout = '10s'")  # waiting on connection 1 would fail, not hang

    one.run("START TRANSACTION")
    first = claim(one, "W1", max_jobs=2)  # the two best, their rows locked until commit
    assert first == [(jobs[0], 1, False), (jobs[1], 1, False)]
    second = claim(two, "W2", max_jobs=2)  # skips the locked rows, takes the next two
    assert second == [(jobs[2], 1, False), (jobs[3], 1, False)]
    assert claim(two, "W3", max_jobs=4) == []  # all four are taken
    one.run("COMMIT")

    assert claim(two, "W3", max_jobs=4) == []
    holders = {job: job_state(conn, job)["locked_by"] for job in jobs}
    assert holders == {jobs[0]: "W1", jobs[1]: "W1", jobs[2]: "W2", jobs[3]: "W2"}
    assert {job_state(conn, job)["attempts"] for job in jobs} == {1}
    assert account(conn, jobs) == {"processing": 4}
