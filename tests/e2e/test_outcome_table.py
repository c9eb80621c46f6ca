"""Every row of the outcome table (the README's "What each answer does"), end to end: a real batch, a real HTTP
server answering as told, the job's state read back from PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pg8000.native
import pytest

from handler.local.standin import StandIn
from handler.queue.store import QueueStore

from .conftest import SERVICE_ROLE_KEY, RunBatch, job_state

TENANT = uuid.UUID("11111111-1111-4111-8111-111111111111")


def simulate(**behaviour: Any) -> dict[str, Any]:
    return {"simulate": behaviour}


def test_a_2xx_answer_completes_the_job(
    queue: QueueStore, run_batch: RunBatch, conn: pg8000.native.Connection
) -> None:
    # Given a due job
    job = queue.enqueue(TENANT, "ingest_slack", simulate(status=204))
    # When a batch runs
    summary, _ = run_batch()
    # Then it is completed, and the summary says so
    assert job_state(conn, job)["status"] == "completed"
    assert (summary.claimed, summary.completed, summary.retried, summary.dead_lettered) == (
        1,
        1,
        0,
        0,
    )


def test_the_request_follows_the_dispatch_contract(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn
) -> None:
    job = queue.enqueue(TENANT, "generate_digest", {"day": "2026-11-29"})
    run_batch()
    [request] = standin.requests()
    assert request.method == "POST"
    assert request.path == "/daily-digest"
    assert request.headers["authorization"] == f"Bearer {SERVICE_ROLE_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == str(job)
    assert request.body == {
        "job_id": str(job),
        "tenant_id": str(TENANT),
        "job_type": "generate_digest",
        "attempt": 1,
        "payload": {"day": "2026-11-29"},
    }


@pytest.mark.parametrize("status", [400, 422])
def test_a_rejected_payload_is_dead_lettered_at_once(
    status: int, queue: QueueStore, run_batch: RunBatch, conn: pg8000.native.Connection
) -> None:
    job = queue.enqueue(
        TENANT, "process_embeddings", simulate(status=status, body="bad field: text")
    )
    summary, _ = run_batch()
    state = job_state(conn, job)
    assert state["dead"]
    assert state["reason"].startswith(f"Function rejected the job ({status})")
    assert "bad field: text" in state["last_error"]
    assert state["errors"][-1]["status"] == status
    assert summary.dead_lettered == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "Authorization failed. Check SUPABASE_SERVICE_ROLE_KEY configuration."),
        (403, "Authorization failed. Check SUPABASE_SERVICE_ROLE_KEY configuration."),
        (404, "Edge Function not found. Verify function deployment: ingest-microsoft"),
    ],
)
def test_an_auth_or_missing_function_answer_retries_and_opens_the_circuit(
    status: int,
    message: str,
    queue: QueueStore,
    run_batch: RunBatch,
    standin: StandIn,
    conn: pg8000.native.Connection,
) -> None:
    # Given three jobs for one function that answers `status`, sent one at a time,
    # and one job for another function
    standin.configure("ingest-microsoft", {"status": status})
    jobs = [queue.enqueue(TENANT, "ingest_microsoft", {"n": n}) for n in range(3)]
    other = queue.enqueue(TENANT, "ingest_slack")
    # When a batch runs
    summary, _ = run_batch(
        job_routes='{"ingest_microsoft": {"function": "ingest-microsoft", "max_concurrency": 1}}'
    )
    # Then the first is retried with the seed's message, the others are released untouched,
    # and the other function is not affected
    states = [job_state(conn, job) for job in jobs]
    failed = [s for s in states if s["attempts"] == 1]
    released = [s for s in states if s["attempts"] == 0]
    assert len(failed) == 1
    assert len(released) == 2
    assert failed[0]["status"] == "pending"
    assert failed[0]["last_error"] == message
    assert failed[0]["errors"][-1]["status"] == status
    assert failed[0]["scheduled_at"] > datetime.now(UTC)  # backoff
    assert all(s["status"] == "pending" and s["last_error"] is None for s in released)
    assert len([r for r in standin.requests() if r.function == "ingest-microsoft"]) == 1
    assert job_state(conn, other)["status"] == "completed"
    assert (summary.retried, summary.released, summary.completed) == (1, 2, 1)


@pytest.mark.parametrize(
    ("behaviour", "delay"),
    [
        ({"status": 429, "headers": {"Retry-After": "120"}}, 120),
        ({"status": 503, "headers": {"Retry-After": "90"}}, 90),
    ],
)
def test_rate_limiting_reschedules_at_retry_after_without_counting_the_attempt(
    behaviour: dict[str, Any],
    delay: int,
    queue: QueueStore,
    run_batch: RunBatch,
    conn: pg8000.native.Connection,
) -> None:
    job = queue.enqueue(TENANT, "ingest_slack", {"simulate": behaviour})
    before = datetime.now(UTC)
    summary, _ = run_batch()
    state = job_state(conn, job)
    assert state["status"] == "pending"
    assert state["attempts"] == 0
    assert state["last_error"] == "Rate limited by ingest-slack"
    assert state["errors"] == []
    assert (
        before + timedelta(seconds=delay - 1)
        <= state["scheduled_at"]
        <= datetime.now(UTC) + timedelta(seconds=delay + 1)
    )
    assert summary.retried == 1  # a 429 counts as retried in the summary


def test_a_429_without_retry_after_waits_for_the_backoff(
    queue: QueueStore, run_batch: RunBatch, conn: pg8000.native.Connection
) -> None:
    job = queue.enqueue(TENANT, "ingest_slack", simulate(status=429))
    before = datetime.now(UTC)
    run_batch()
    state = job_state(conn, job)
    assert state["attempts"] == 0
    assert state["scheduled_at"] >= before + timedelta(seconds=5)  # the backoff's floor


@pytest.mark.parametrize("status", [408, 500, 502, 503])
def test_a_server_error_is_retried_with_backoff(
    status: int, queue: QueueStore, run_batch: RunBatch, conn: pg8000.native.Connection
) -> None:
    job = queue.enqueue(TENANT, "ingest_slack", simulate(status=status, body="database is on fire"))
    before = datetime.now(UTC)
    summary, _ = run_batch()
    state = job_state(conn, job)
    assert state["status"] == "pending"
    assert state["attempts"] == 1
    assert (
        state["last_error"]
        == f"Function execution failed: {status} database is on fire. Check function logs."
    )
    assert state["errors"] == [
        {
            "attempt": 1,
            "at": state["errors"][0]["at"],
            "error": state["last_error"],
            "status": status,
        }
    ]
    assert state["scheduled_at"] >= before + timedelta(seconds=5)
    assert summary.retried == 1


@pytest.mark.parametrize("behaviour", [{"hang": True}, {"close": True}, {"garbage": True}])
def test_a_network_failure_is_retried_with_backoff(
    behaviour: dict[str, Any],
    queue: QueueStore,
    run_batch: RunBatch,
    conn: pg8000.native.Connection,
) -> None:
    job = queue.enqueue(TENANT, "ingest_microsoft", {"simulate": behaviour})
    summary, _ = run_batch(http_timeout_seconds="1")
    state = job_state(conn, job)
    assert state["status"] == "pending"
    assert state["attempts"] == 1
    assert state["last_error"].startswith("Network error calling ingest-microsoft: ")
    assert state["last_error"].endswith(". Check Supabase infrastructure status.")
    assert state["errors"][0]["status"] is None
    assert summary.retried == 1


def test_an_unknown_job_type_is_dead_lettered_without_a_call(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn, conn: pg8000.native.Connection
) -> None:
    job = queue.enqueue(TENANT, "send_fax", {})
    summary, _ = run_batch()
    state = job_state(conn, job)
    assert state["dead"]
    assert state["reason"] == "No route for job type 'send_fax'"
    assert standin.requests() == []
    assert summary.dead_lettered == 1


def test_the_last_failed_attempt_moves_the_job_to_the_dead_letter_table(
    queue: QueueStore, run_batch: RunBatch, conn: pg8000.native.Connection
) -> None:
    job = queue.enqueue(TENANT, "ingest_slack", simulate(status=500), max_attempts=2)
    for _ in range(2):
        run_batch()
        conn.run(
            "UPDATE queue_jobs SET scheduled_at = now() WHERE id = CAST(:id AS uuid)", id=str(job)
        )
    state = job_state(conn, job)
    assert state["dead"]
    assert state["attempts"] == 2
    assert state["reason"].startswith("Exhausted 2 attempts: Function execution failed: 500")
    assert [entry["attempt"] for entry in state["errors"]] == [1, 2]


def test_a_job_type_routed_by_job_routes_goes_to_that_function(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn
) -> None:
    queue.enqueue(TENANT, "send_invoice", {})
    summary, _ = run_batch(job_routes='{"send_invoice": "billing-send"}')
    assert [r.path for r in standin.requests()] == ["/billing-send"]
    assert summary.completed == 1


def test_an_answer_with_nul_and_control_bytes_is_recorded_without_breaking_the_batch(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn, conn: pg8000.native.Connection
) -> None:
    # PostgreSQL text cannot hold a NUL: an error excerpt carrying one must not fail the settle
    # of the whole batch (the garbage answer's first line carries NULs too).
    standin.configure("process-embeddings", {"status": 500, "body": "bad\x00\x07\x1bbytes"})
    binary = queue.enqueue(TENANT, "process_embeddings", {})
    garbage = queue.enqueue(TENANT, "ingest_slack", simulate(garbage=True))
    fine = queue.enqueue(TENANT, "ingest_slack", {})
    summary, _ = run_batch()
    assert summary.unsettled == 0
    assert job_state(conn, fine)["status"] == "completed"
    for job in (binary, garbage):
        state = job_state(conn, job)
        assert state["attempts"] == 1
        assert "\x00" not in state["last_error"]
    assert job_state(conn, binary)["last_error"].startswith("Function execution failed: 500 bad")


@pytest.mark.parametrize(("status", "outcome"), [(500, "pending"), (422, "dead")])
def test_without_an_idempotency_store_a_failed_answer_is_its_outcome_too(
    queue: QueueStore,
    run_batch: RunBatch,
    conn: pg8000.native.Connection,
    status: int,
    outcome: str,
) -> None:
    # (The guarded call raises for a failed answer so that Powertools forgets it; unguarded, the
    # answer must still be recorded as it is, not taken for an unexpected failure.)
    job = queue.enqueue(uuid.uuid4(), "ingest_slack", {"simulate": {"status": status}})
    summary, _ = run_batch(idempotency_store="off")
    assert (summary.released, summary.retried + summary.dead_lettered) == (0, 1)
    state = job_state(conn, job)
    assert ("dead" if state["dead"] else state["status"]) == outcome
    assert state["attempts"] == 1
