"""End-to-end fixtures: the real worker, a real PostgreSQL, and the stand-in functions (a real
HTTP server in its own process)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pg8000.native
import pytest

from handler import app
from handler.batch.runner import Summary
from handler.local.standin import StandIn
from handler.operate.observability import logger, metrics
from handler.queue.store import QueueStore
from handler.runtime import settings
from handler.runtime.events import parse_event
from handler.runtime.settings import Settings, parse_settings
from handler.runtime.worker import Backlog, Worker

SERVICE_ROLE_KEY = "test-service-role-key-5f1c9b"

RunBatch = Callable[..., tuple[Summary, Backlog]]


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


@pytest.fixture
def standin(standin_server: StandIn) -> StandIn:
    standin_server.reset()
    return standin_server


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads to run invocations on while the test watches them."""
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def worker_env(database_url: str, standin: StandIn) -> dict[str, str]:
    """The environment a deployed worker would have, pointed at the test database and stand-in."""
    return {
        "DATABASE_URL": database_url,
        "FUNCTIONS_BASE_URL": standin.base_url,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
        "MAX_JOBS_PER_TENANT": "1000",
        "IDEMPOTENCY_STORE": "postgres",
        "HTTP_TIMEOUT_SECONDS": "5",
    }


@pytest.fixture
def make_worker(worker_env: dict[str, str]) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def _make(**overrides: str) -> Worker:
        worker = Worker(settings_for(worker_env, **overrides))
        workers.append(worker)
        return worker

    yield _make
    for worker in workers:
        worker.close()


@pytest.fixture
def run_batch(make_worker: Callable[..., Worker]) -> RunBatch:
    """Runs one batch on a new worker: run_batch(event={}, remaining=30, **env overrides)."""

    def _run(
        event: dict[str, Any] | None = None, remaining: float = 30.0, **overrides: str
    ) -> tuple[Summary, Backlog]:
        worker = make_worker(**overrides)
        return worker.run(parse_event(event or {}), remaining_seconds=remaining, request_id="test")

    return _run


def settings_for(env: dict[str, str], **overrides: str) -> Settings:
    return parse_settings(env | {key.upper(): value for key, value in overrides.items()})


@pytest.fixture
def queue(store: QueueStore) -> QueueStore:
    return store


def job_state(conn: pg8000.native.Connection, job_id: object) -> dict[str, Any]:
    """The job's row in queue_jobs, or in the dead letter table (with "dead": True)."""
    for table, dead in (("queue_jobs", False), ("queue_jobs_dead_letter", True)):
        rows = conn.run(
            f"SELECT status, attempts, last_error, errors, scheduled_at, locked_by, "
            f"{'reason' if dead else 'NULL'} FROM {table} WHERE id = CAST(:id AS uuid)",
            id=str(job_id),
        )
        if rows:
            status, attempts, last_error, errors, scheduled_at, locked_by, reason = rows[0]
            return {
                "dead": dead,
                "status": status,
                "attempts": attempts,
                "last_error": last_error,
                "errors": errors,
                "scheduled_at": scheduled_at,
                "locked_by": locked_by,
                "reason": reason,
            }
    raise AssertionError(f"job {job_id} is nowhere: lost")


@dataclass
class FakeLambdaContext:
    """The attributes Powertools reads from a Lambda context."""

    timeout_seconds: float = 60.0
    function_name: str = "queue-worker-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:queue-worker-test"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return int((self.timeout_seconds - (time.monotonic() - self.started)) * 1000)


@pytest.fixture
def lambda_env(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    settings.reset_settings_cache()
    app._worker = None
    metrics.clear_metrics()
    yield worker_env
    if app._worker is not None:
        app._worker.close()
    app._worker = None
    settings.reset_settings_cache()
    metrics.clear_metrics()


def emf_documents(output: str) -> list[dict[str, Any]]:
    """The EMF documents printed, each metric value as one number (Powertools prints lists)."""
    documents = []
    for line in output.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            document = json.loads(line)
            for key, value in document.items():
                if isinstance(value, list) and len(value) == 1:
                    document[key] = value[0]
            documents.append(document)
    return documents


def log_lines(output: str) -> list[dict[str, Any]]:
    """The JSON log lines printed (the EMF metric documents left out)."""
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            document = json.loads(line)
            if "level" in document and "message" in document:
                lines.append(document)
    return lines


class CurrentStdout:
    """Writes to whatever sys.stdout is when a line is logged (capsys swaps it per test phase)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture
def logs_to_captured_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logger's handler kept the stdout of import time; make it write where capsys reads."""
    handler = logger.registered_handler
    assert isinstance(handler, logging.StreamHandler)
    monkeypatch.setattr(handler, "stream", CurrentStdout())


os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
