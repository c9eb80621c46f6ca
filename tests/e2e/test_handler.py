"""The Lambda entry point with the sample events in events/, its return value and its EMF output."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from handler import app
from handler.errors import ConfigurationError, EventError
from handler.queue.store import QueueStore
from handler.runtime import settings

from .conftest import FakeLambdaContext, emf_documents

EVENTS = Path(__file__).resolve().parents[2] / "events"
SUMMARY_KEYS = {"claimed", "completed", "retried", "dead_lettered", "released", "duration_ms"}


def event_files() -> list[Path]:
    # env.json is the environment file for `sam local invoke --env-vars`, not an event.
    return sorted(p for p in EVENTS.glob("*.json") if p.name != "env.json")


def test_there_are_sample_events_for_each_invocation_form() -> None:
    names = {p.name for p in event_files()}
    assert len(names) >= 3
    kinds = {json.loads(p.read_text()).get("detail-type", "direct") for p in event_files()}
    assert "Scheduled Event" in kinds


@pytest.mark.parametrize("path", event_files(), ids=lambda p: p.name)
def test_every_sample_event_is_a_valid_invocation(
    path: Path, lambda_env: dict[str, str], queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    event = json.loads(path.read_text())
    tenant = uuid.UUID(event["tenant_id"]) if "tenant_id" in event else uuid.uuid4()
    queue.enqueue(tenant, "ingest_slack", {})
    result = app.lambda_handler(event, FakeLambdaContext())
    assert set(result) >= SUMMARY_KEYS
    assert result["claimed"] == result["completed"] == 1


def test_the_handler_emits_the_batch_metrics_as_emf(
    lambda_env: dict[str, str], queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = uuid.uuid4()
    queue.enqueue(tenant, "ingest_slack", {})
    queue.enqueue(tenant, "process_embeddings", {"simulate": {"status": 500}})
    queue.enqueue(tenant, "send_fax", {})
    app.lambda_handler({}, FakeLambdaContext())
    documents = emf_documents(capsys.readouterr().out)
    batch = next(d for d in documents if "JobsClaimed" in d)
    directive = batch["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "QueueWorker"
    assert directive["Dimensions"] == [["service"]]
    assert batch["service"] == "queue-worker"
    assert (
        batch["JobsClaimed"],
        batch["JobsCompleted"],
        batch["JobsRetried"],
        batch["JobsDeadLettered"],
    ) == (
        3.0,
        1.0,
        1.0,
        1.0,
    )
    for name in (
        "JobsReleased",
        "JobsRescued",
        "BatchDuration",
        "QueueDepth",
        "OldestJobAgeSeconds",
    ):
        assert name in batch
    latency = {d["function"]: d for d in documents if "DispatchLatency" in d}
    assert set(latency) == {"ingest-slack", "process-embeddings"}
    assert latency["ingest-slack"]["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [
        ["function", "service"]
    ]
    responses = {
        (d["function"], d["status_class"]): d["DispatchResponses"]
        for d in documents
        if "DispatchResponses" in d
    }
    assert responses == {("ingest-slack", "2xx"): 1.0, ("process-embeddings", "5xx"): 1.0}
    # No dimension may carry a tenant or a job id.
    for document in documents:
        for dimension_set in document["_aws"]["CloudWatchMetrics"][0]["Dimensions"]:
            assert set(dimension_set) <= {"service", "function", "status_class"}


def test_a_bad_event_fails_before_any_job_is_touched(
    lambda_env: dict[str, str], queue: QueueStore, standin: object
) -> None:
    job = queue.enqueue(uuid.uuid4(), "ingest_slack", {})
    with pytest.raises(EventError, match="max_jobs"):
        app.lambda_handler({"max_jobs": "5"}, FakeLambdaContext())
    state = queue.get_job(job)
    assert state is not None
    assert state.status == "pending"
    assert state.attempts == 0


def test_bad_configuration_fails_the_invocation_naming_the_variable(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_CONCURRENCY", "lots")
    settings.reset_settings_cache()
    with pytest.raises(ConfigurationError, match="MAX_CONCURRENCY"):
        app.lambda_handler({}, FakeLambdaContext())
