"""The time budget holds when functions are slower than the invocation, and secrets never leak."""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlsplit, urlunsplit

import pg8000.native
import pytest

from handler import app
from handler.local.standin import StandIn
from handler.queue.store import QueueStore

from .conftest import SERVICE_ROLE_KEY, FakeLambdaContext, RunBatch

DB_PASSWORD = "db-pass-73e1a9c0d2"


def test_the_batch_returns_before_its_deadline_when_functions_are_slower_than_it(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn, conn: pg8000.native.Connection
) -> None:
    # Given 20 jobs whose function answers after 60 s, five calls at a time
    standin.configure("ingest-slack", {"delay_ms": 60_000})
    tenant = uuid.uuid4()
    jobs = [queue.enqueue(tenant, "ingest_slack", {"n": n}) for n in range(20)]
    # When a batch runs with 5 s left in the invocation
    summary, _ = run_batch(remaining=5.0, max_concurrency="5")
    # Then it returns before the deadline: the calls in flight were cut at the budget's edge
    # (retried), the jobs never sent were released without an attempt, and no job is left held
    assert summary.duration_ms < 5000
    assert summary.retried == 5
    assert summary.released == 15
    assert summary.claimed == summary.retried + summary.released
    rows = conn.run("SELECT status, attempts, count(*) FROM queue_jobs GROUP BY 1, 2 ORDER BY 2")
    assert rows == [["pending", 0, 15], ["pending", 1, 5]]
    assert len(jobs) == 20


@pytest.fixture
def url_with_password(database_url: str) -> str:
    """The test database's URL with a password in it (the test servers trust local users)."""
    parts = urlsplit(database_url)
    user = parts.username or "postgres"
    host = parts.netloc.split("@")[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{DB_PASSWORD}@{host}"))


def test_no_secret_appears_in_logs_errors_metrics_or_the_database(
    lambda_env: dict[str, str],
    url_with_password: str,
    monkeypatch: pytest.MonkeyPatch,
    queue: QueueStore,
    standin: StandIn,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given the worker configured with a database password and a service role key, and
    # functions that fail in every way, one of them echoing the Authorization header back
    monkeypatch.setenv("DATABASE_URL", url_with_password)
    monkeypatch.setenv("HTTP_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    caplog.set_level(logging.DEBUG)
    tenant = uuid.uuid4()
    echo = f"invalid token: Bearer {SERVICE_ROLE_KEY}"
    for behaviour in (
        {"status": 500, "body": echo},
        {"status": 400, "body": echo},
        {"status": 401, "body": echo},
        {"status": 429, "body": echo},
        {"hang": True},
        {"garbage": True},
        {"status": 200, "body": echo},
    ):
        queue.enqueue(tenant, "ingest_slack", {"simulate": behaviour})
    queue.enqueue(tenant, "unknown_type", {})
    # When the handler runs a batch
    result = app.lambda_handler({}, FakeLambdaContext())
    # Then neither secret appears anywhere a person or a system could read it
    assert result["claimed"] == 8
    out = capsys.readouterr()
    everything = out.out + out.err + caplog.text + repr(result)
    everything += repr(conn.run("SELECT last_error, errors::text FROM queue_jobs"))
    everything += repr(
        conn.run("SELECT last_error, errors::text, reason FROM queue_jobs_dead_letter")
    )
    everything += repr(conn.run("SELECT data FROM queue_idempotency"))
    assert SERVICE_ROLE_KEY not in everything
    assert DB_PASSWORD not in everything
    assert "***" in everything  # the echoed key was scrubbed, not merely absent
