"""The Lambda entry point with the sample events in events/, its return value and its EMF output."""

from __future__ import annotations

import json
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from handler import app
from handler.errors import ConfigurationError, EventError, SchemaError
from handler.queue import connection
from handler.queue.store import QueueStore
from handler.runtime import settings

from .conftest import FakeLambdaContext, emf_documents, log_lines

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


def test_an_unmigrated_database_fails_the_invocation_with_one_line_naming_migrate(
    lambda_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    server_url: str,
    capsys: pytest.CaptureFixture[str],
    logs_to_captured_stdout: None,
) -> None:
    # Given a database nobody has migrated
    name = f"queue_worker_empty_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(connection.parse_database_url(server_url))
    admin.run(f'CREATE DATABASE "{name}"')
    try:
        parts = urlsplit(server_url)
        monkeypatch.setenv("DATABASE_URL", urlunsplit(parts._replace(path=f"/{name}")))
        settings.reset_settings_cache()
        # When the Lambda is invoked, then it fails with the schema's one-line error
        with pytest.raises(SchemaError, match="run `queue-worker migrate`") as failure:
            app.lambda_handler({}, FakeLambdaContext())
        # whose report has no traceback through the libraries, and one structured log line
        frames = traceback.extract_tb(failure.value.__traceback__)
        assert [frame.name for frame in frames[1:]] == ["lambda_handler"]
        errors = [line for line in log_lines(capsys.readouterr().out) if line["level"] == "ERROR"]
        assert len(errors) == 1
        assert "queue-worker migrate" in errors[0]["message"]
        assert errors[0]["error_kind"] == "configuration"
    finally:
        admin.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _with_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.mark.parametrize(
    ("point_at", "says"),
    [
        pytest.param(
            lambda url: _with_database(url, "no_such_database_here"),
            "no_such_database_here",
            id="a missing database",
        ),
        pytest.param(
            lambda url: _with_role(url, "no_such_role_here"),
            "no_such_role_here",
            id="a missing role",
        ),
    ],
)
def test_a_database_the_driver_refuses_fails_the_invocation_with_one_structured_line(
    lambda_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    server_url: str,
    capsys: pytest.CaptureFixture[str],
    logs_to_captured_stdout: None,
    point_at: Callable[[str], str],
    says: str,
) -> None:
    # Given DATABASE_URL naming a database or a role the server does not have
    monkeypatch.setenv("DATABASE_URL", point_at(server_url))
    settings.reset_settings_cache()

    # When the Lambda is invoked, then it fails with a configuration error naming it, raised
    # from the handler itself (no traceback through pg8000), and logs one structured line
    with pytest.raises(ConfigurationError, match=says) as failure:
        app.lambda_handler({}, FakeLambdaContext())
    frames = traceback.extract_tb(failure.value.__traceback__)
    assert [frame.name for frame in frames[1:]] == ["lambda_handler"]
    assert "{" not in str(failure.value)  # not pg8000's dict of fields
    errors = [line for line in log_lines(capsys.readouterr().out) if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert says in errors[0]["message"]
    assert errors[0]["error_kind"] == "configuration"
