"""Functions that misbehave, in one batch next to a healthy one: one hangs, one answers with
bytes that are not HTTP, one answers 429 to everything."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pg8000.native

from handler.local.standin import StandIn

from .accounting import account, enqueue_many, make_due, sent
from .conftest import RunBatch, job_state

ROUTES = {"hangs": "fn-hang", "garbage": "fn-garbage", "limited": "fn-429", "healthy": "fn-ok"}
RATE_LIMITED_BATCHES = 4


def test_hanging_garbage_and_rate_limited_functions_next_to_a_healthy_one(
    conn: pg8000.native.Connection, standin: StandIn, run_batch: RunBatch
) -> None:
    tenant, limited_tenant = uuid.uuid4(), uuid.uuid4()
    hangs = enqueue_many(conn, tenant, "hangs", 3)
    garbage = enqueue_many(conn, tenant, "garbage", 3)
    healthy = enqueue_many(conn, tenant, "healthy", 3)
    limited = enqueue_many(conn, limited_tenant, "limited", 3)
    jobs = hangs + garbage + healthy + limited
    standin.configure("fn-hang", {"hang": True})
    standin.configure("fn-garbage", {"garbage": True})
    standin.configure("fn-429", {"status": 429})
    env = {"job_routes": json.dumps(ROUTES), "http_timeout_seconds": "1"}

    # When one batch runs all of them
    summary, _ = run_batch(**env)

    # Then the healthy jobs complete; the hung and garbled calls are network errors, retried
    # with backoff (the attempt counts); the rate-limited ones are rescheduled, uncounted
    assert (summary.claimed, summary.completed, summary.retried) == (12, 3, 9)
    assert (summary.dead_lettered, summary.released, summary.unsettled) == (0, 0, 0)
    assert account(conn, jobs) == {"completed": 3, "pending": 9}
    now = datetime.now(UTC)
    for job_id, function in [(j, "fn-hang") for j in hangs] + [(j, "fn-garbage") for j in garbage]:
        state = job_state(conn, job_id)
        assert (state["status"], state["attempts"]) == ("pending", 1)
        assert state["last_error"].startswith(f"Network error calling {function}: ")
        assert [(e["attempt"], e["status"]) for e in state["errors"]] == [(1, None)]
        assert state["scheduled_at"] > now  # backoff
    for job_id in healthy:
        assert job_state(conn, job_id)["status"] == "completed"

    # When the rate-limited jobs come due again, batch after batch
    for batch in range(2, RATE_LIMITED_BATCHES + 1):
        for job_id in limited:
            state = job_state(conn, job_id)
            assert (state["status"], state["attempts"]) == ("pending", 0), batch
            assert state["last_error"] == "Rate limited by fn-429"
            assert state["errors"] == []  # not a failed attempt
            assert state["scheduled_at"] > datetime.now(UTC)
        make_due(conn, limited)
        again, _ = run_batch(event={"tenant_id": str(limited_tenant)}, **env)
        assert (again.claimed, again.retried, again.completed, again.unsettled) == (3, 3, 0, 0)

    # Then they are still pending with no attempt counted, never dead-lettered
    for job_id in limited:
        state = job_state(conn, job_id)
        assert (state["status"], state["attempts"], state["errors"]) == ("pending", 0, [])
    assert account(conn, jobs) == {"completed": 3, "pending": 9}
    calls = sent(standin)
    assert calls == {j: RATE_LIMITED_BATCHES if j in limited else 1 for j in jobs}
