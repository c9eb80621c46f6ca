"""Structured logs: every line about a job names the job, and every line of an invocation carries
its correlation id (the EventBridge event id for a rule event, else the Lambda request id)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest

from handler import app
from handler.dispatch.idempotency import PostgresPersistenceLayer
from handler.operate.observability import logger
from handler.queue.store import QueueStore

from .conftest import FakeLambdaContext, log_lines

JOB_FIELDS = ("job_id", "tenant_id", "job_type", "attempt")
RULE_EVENT_ID = "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa"
RULE_EVENT = {
    "version": "0",
    "id": RULE_EVENT_ID,
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": "123456789012",
    "time": "2026-11-29T12:00:00Z",
    "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/queue-worker-every-minute"],
    "detail": {},
}


def about_a_job(line: dict[str, Any], job_ids: set[str]) -> bool:
    """A line is about a job when it carries any job field, or names a known job anywhere."""
    text = json.dumps(line)
    return any(key in line for key in ("job_id", "job_type", "attempt")) or any(
        job_id in text for job_id in job_ids
    )


@pytest.fixture(autouse=True)
def _logs_to_capsys(logs_to_captured_stdout: None) -> None:
    """Every test here reads the log lines with capsys."""


@pytest.fixture
def debug_logs() -> Iterator[None]:
    """The logger at DEBUG, so that the line about each completed job is printed too."""
    level = logger.log_level
    logger.setLevel(logging.DEBUG)
    yield
    logger.setLevel(level)


def seed_every_kind(queue: QueueStore) -> dict[UUID, tuple[UUID, str]]:
    """Jobs that complete, fail with a 500, are rejected with a 422, find no route, and open the
    circuit with a 401: job id -> (tenant, job type)."""
    jobs: dict[UUID, tuple[UUID, str]] = {}
    for job_type, payload in (
        ("ingest_slack", {}),
        ("process_embeddings", {"simulate": {"status": 500, "body": "boom"}}),
        ("generate_digest", {"simulate": {"status": 422, "body": "bad payload"}}),
        ("send_fax", {}),
        ("ingest_microsoft", {"simulate": {"status": 401, "body": "invalid JWT"}}),
    ):
        tenant = uuid.uuid4()
        jobs[queue.enqueue(tenant, job_type, payload)] = (tenant, job_type)
    return jobs


def test_every_log_line_about_a_job_names_the_job_its_tenant_type_and_attempt(
    lambda_env: dict[str, str],
    debug_logs: None,
    queue: QueueStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given jobs that complete, fail, are rejected, have no route, or are refused (401)
    jobs = seed_every_kind(queue)
    job_ids = {str(job_id) for job_id in jobs}
    # When the handler runs a batch
    result = app.lambda_handler({}, FakeLambdaContext())
    # Then every line about a job carries all four job fields, with that job's values
    assert result["claimed"] == len(jobs)
    lines = [line for line in log_lines(capsys.readouterr().out) if about_a_job(line, job_ids)]
    for line in lines:
        missing = [key for key in JOB_FIELDS if key not in line]
        assert not missing, f"{line['message']!r} lacks {missing}"
        tenant, job_type = jobs[UUID(line["job_id"])]
        assert (line["tenant_id"], line["job_type"], line["attempt"]) == (str(tenant), job_type, 1)
    # and every job, whatever became of it, has its line
    messages = {(line["job_type"], line["message"]) for line in lines}
    assert ("ingest_slack", "Job completed") in messages
    assert ("process_embeddings", "Job not completed") in messages
    assert ("generate_digest", "Job not completed") in messages
    assert ("send_fax", "Job dead-lettered: no route") in messages
    assert ("ingest_microsoft", "Circuit opened: no more jobs to this function in this batch") in (
        messages
    )
    assert {line["job_id"] for line in lines} == job_ids


@pytest.mark.parametrize(
    ("failing_call", "message", "outcome"),
    [
        ("_put_record", "Idempotency store failed before dispatch; job released", "released"),
        ("_update_record", "Idempotency record not saved after dispatch", "completed"),
    ],
    ids=["store-down-before-the-call", "store-down-after-the-call"],
)
def test_a_line_logged_from_a_dispatch_thread_names_the_job_and_the_invocation(
    failing_call: str,
    message: str,
    outcome: str,
    lambda_env: dict[str, str],
    queue: QueueStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a due job and an idempotency store that fails before or after the call (the
    # delivery guard, in the dispatch thread, logs it)
    def store_down(self: PostgresPersistenceLayer, data_record: object) -> None:
        raise ConnectionError("idempotency store down")

    monkeypatch.setattr(PostgresPersistenceLayer, failing_call, store_down)
    tenant = uuid.uuid4()
    job = queue.enqueue(tenant, "ingest_slack", {})
    context = FakeLambdaContext()
    # When the handler runs a batch
    result = app.lambda_handler({}, context)
    # Then the guard's line names the job and carries the invocation's correlation id
    assert result[outcome] == 1
    [line] = [line for line in log_lines(capsys.readouterr().out) if line["message"] == message]
    assert (line["job_id"], line["tenant_id"], line["job_type"], line["attempt"]) == (
        str(job),
        str(tenant),
        "ingest_slack",
        1,
    )
    assert line["correlation_id"] == context.aws_request_id


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (RULE_EVENT, "event id"),
        ({}, "request id"),
        ({"scheduled_time": "2026-11-29T12:00:00Z"}, "request id"),
    ],
    ids=["eventbridge-rule-event", "direct-invoke", "scheduler-input"],
)
def test_the_correlation_id_is_the_rule_events_id_or_else_the_request_id(
    event: dict[str, Any],
    expected: str,
    lambda_env: dict[str, str],
    queue: QueueStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a due job that fails (so the batch logs a line about it)
    queue.enqueue(uuid.uuid4(), "process_embeddings", {"simulate": {"status": 500}})
    context = FakeLambdaContext()
    # When the handler is invoked with this event
    app.lambda_handler(event, context)
    # Then every line from the batch's start to its end carries the correlation id
    correlation_id = RULE_EVENT_ID if expected == "event id" else context.aws_request_id
    lines = log_lines(capsys.readouterr().out)
    messages = [line["message"] for line in lines]
    assert "Batch starting" in messages
    assert "Job not completed" in messages
    assert "Batch finished" in messages
    for line in lines:
        assert line.get("correlation_id") == correlation_id, line["message"]
        assert line["function_request_id"] == context.aws_request_id


def test_the_correlation_id_of_one_invocation_does_not_leak_into_the_next(
    lambda_env: dict[str, str],
    queue: QueueStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a rule event's invocation, then a direct invoke on the same container
    app.lambda_handler(RULE_EVENT, FakeLambdaContext())
    capsys.readouterr()
    queue.enqueue(uuid.uuid4(), "process_embeddings", {"simulate": {"status": 500}})
    context = FakeLambdaContext()
    # When the second invocation runs
    app.lambda_handler({}, context)
    # Then its lines carry its own request id, never the earlier event's id
    lines = log_lines(capsys.readouterr().out)
    assert len(lines) >= 3
    assert {line.get("correlation_id") for line in lines} == {context.aws_request_id}
