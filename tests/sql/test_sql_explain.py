"""explain_job: the one thing holding a job back, in words, with the numbers (migration 0006)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.sql.conftest import Queue


def explain(queue: Queue, job_id: uuid.UUID) -> tuple[str, str, dict[str, Any]]:
    return queue.store.explain(job_id)


def claim(queue: Queue, worker: str = "w", **kw: Any) -> list[Any]:
    kw.setdefault("lease_seconds", 60)
    kw.setdefault("max_jobs", 100)
    kw.setdefault("max_per_tenant", 100)
    return queue.store.claim(worker, **kw)


def routes(queue: Queue, **functions: dict[str, Any]) -> None:
    queue.store.record_routes(
        {
            job_type: {"function": job_type.replace("_", "-"), **extra}
            for job_type, extra in functions.items()
        }
    )


def test_a_job_that_does_not_exist(queue: Queue) -> None:
    reason, message, _ = explain(queue, uuid.uuid4())
    assert reason == "not_found"
    assert "pruned" in message


def test_a_dead_letter_says_why(queue: Queue) -> None:
    job = queue.enqueue(uuid.uuid4(), max_attempts=1)
    claim(queue)
    queue.fail(job, "w", "Function rejected the job (422): bad", retryable=False)
    reason, message, detail = explain(queue, job)
    assert reason == "dead_lettered"
    assert "Function rejected the job (422): bad" in message
    assert detail["attempts"] == 1


def test_completed_and_cancelled_jobs(queue: Queue) -> None:
    done, gone = queue.enqueue(uuid.uuid4()), queue.enqueue(uuid.uuid4())
    claim(queue, tenant_id=queue.job(done)["tenant_id"])
    queue.complete(done, "w")
    queue.store.cancel(gone)
    assert explain(queue, done)[0] == "completed"
    assert explain(queue, gone)[0] == "cancelled"


def test_a_job_held_by_a_worker_and_one_whose_lease_expired(queue: Queue) -> None:
    tenant = uuid.uuid4()
    held, expired = queue.enqueue(tenant), queue.enqueue(tenant)
    claim(queue, "worker-7")
    reason, message, detail = explain(queue, held)
    assert reason == "held_by_worker"
    assert "worker-7" in message
    assert detail["attempt"] == 1
    queue.expire_lease(expired)
    reason, message, _ = explain(queue, expired)
    assert reason == "lease_expired"
    assert "the next claim takes it over" in message


def test_a_job_waiting_on_a_dependency_says_what_that_one_waits_on(queue: Queue) -> None:
    tenant = uuid.uuid4()
    first = queue.enqueue(tenant, scheduled_at=queue.now().replace(year=2100))
    second = queue.enqueue(tenant, depends_on=[first])
    third = queue.enqueue(tenant, depends_on=[second])
    reason, message, detail = explain(queue, third)
    assert reason == "waiting_on_dependency"
    assert detail["dependency"] == str(second)
    assert f"Waiting on dependency {second}" in message
    assert f"Waiting on dependency {first}" in message  # and what that one waits on
    assert "Scheduled for 2100" in message


def test_pending_jobs_due_later_say_why(queue: Queue) -> None:
    tenant = uuid.uuid4()
    later = queue.enqueue(tenant, scheduled_at=queue.now().replace(year=2100))
    assert explain(queue, later)[0] == "scheduled"

    snoozed, failing = queue.enqueue(tenant), queue.enqueue(tenant)
    jobs = {j.id: j for j in claim(queue, tenant_id=tenant)}
    in_an_hour = queue.now().replace(year=2100).isoformat()
    queue.settle(
        "w",
        [
            {
                "id": str(snoozed),
                "attempt": jobs[snoozed].attempt,
                "outcome": "rate_limited",
                "error": "Rate limited by ingest-slack",
                "retry_at": in_an_hour,
            },
            {
                "id": str(failing),
                "attempt": jobs[failing].attempt,
                "outcome": "failed",
                "error": "Function execution failed: 500 boom. Check function logs.",
                "status": 500,
            },
        ],
    )
    reason, message, _ = explain(queue, snoozed)
    assert reason == "retry_after"
    assert "Retry-After" in message
    reason, message, detail = explain(queue, failing)
    assert reason == "backoff"
    assert "500 boom" in message
    assert detail["attempts"] == 1


def test_a_job_held_back_by_its_functions_rate(queue: Queue) -> None:
    routes(queue, ingest_slack={"rate": 1, "burst": 1})
    tenant = uuid.uuid4()
    first, second = queue.enqueue(tenant), queue.enqueue(tenant)
    assert [j.id for j in claim(queue)] == [first]
    reason, message, detail = explain(queue, second)
    assert reason == "function_rate_limit"
    assert "rate limit of ingest-slack (1/s)" in message
    assert detail["function"] == "ingest-slack"


def test_a_due_job_of_a_function_at_its_rate(queue: Queue) -> None:
    routes(queue, ingest_slack={"rate": 2, "burst": 1})
    queue.conn.run(
        "UPDATE queue_functions SET tokens = 0.2, refilled_at = now() WHERE function = 'ingest-slack'"
    )
    job = queue.enqueue(uuid.uuid4())
    reason, message, detail = explain(queue, job)
    assert reason == "function_rate_limit"
    assert "at its rate limit (2/s)" in message
    assert detail["tokens"] < 1


def test_a_due_job_of_a_tenant_at_its_rate(queue: Queue) -> None:
    routes(queue, ingest_slack={})
    tenant = uuid.uuid4()
    queue.store.set_tenant_limits(tenant, rate=1, burst=1)
    queue.enqueue(tenant)
    second = queue.enqueue(tenant)
    assert len(claim(queue)) == 1
    reason, message, _ = explain(queue, second)
    assert reason == "tenant_rate_limit"
    assert f"Its tenant {tenant} is at its rate limit (1/s)" in message


def test_a_due_job_whose_function_refused_the_key(queue: Queue) -> None:
    routes(queue, ingest_slack={})
    queue.store.record_function_states(
        [
            {
                "function": "ingest-slack",
                "concurrency_limit": 5,
                "circuit_status": 401,
                "circuit_error": "Authorization failed. Check SUPABASE_SERVICE_ROLE_KEY configuration.",
            }
        ]
    )
    job = queue.enqueue(uuid.uuid4())
    reason, message, detail = explain(queue, job)
    assert reason == "circuit_open"
    assert "answered 401" in message
    assert detail["status"] == 401


def test_a_due_job_without_a_route(queue: Queue) -> None:
    routes(queue, ingest_slack={})
    job = queue.enqueue(uuid.uuid4(), job_type="send_fax")
    reason, message, _ = explain(queue, job)
    assert reason == "no_route"
    assert "send_fax" in message


@pytest.mark.parametrize("ahead", [0, 3])
def test_a_due_job_behind_its_tenants_own_or_first_in_line(queue: Queue, ahead: int) -> None:
    routes(queue, ingest_slack={})
    tenant = uuid.uuid4()
    for _ in range(ahead):
        queue.enqueue(tenant, priority=5)
    job = queue.enqueue(tenant)
    reason, message, detail = explain(queue, job)
    if ahead:
        assert reason == "tenant_share"
        assert detail["ahead"] == ahead
        assert f"behind {ahead} due jobs of its own tenant" in message
    else:
        assert reason == "ready"
        assert json.dumps(detail)
