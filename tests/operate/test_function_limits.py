"""A function's own concurrency limit (JOB_ROUTES `max_concurrency`), end to end.

How many calls are in flight is counted by instrumentation, not timed: `Dispatcher.post` (which
sends one job's POST and reads its answer, in a dispatch thread) is wrapped by a thread-safe counter
of concurrent calls per function. The stand-in holds each answer for a while (`delay_ms`), so that calls the
worker lets overlap do overlap; the assertions are about counts, never durations.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from typing import Any

import pg8000.native
import pytest

from handler.dispatch.client import Delivery, Dispatcher
from handler.dispatch.routes import Route
from handler.dispatch.tracecontext import TraceContext
from handler.local.standin import StandIn
from handler.queue.store import ClaimedJob, QueueStore

from .conftest import RunBatch

HOLD_MS = 300  # how long the stand-in holds each answer: long enough for calls to overlap


class InFlight:
    """Concurrent Dispatcher.post calls, per function and in all: now and at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        self.total_now = 0
        self.total_most = 0
        self.calls: Counter[str] = Counter()

    def enter(self, function: str) -> None:
        with self._lock:
            self._now[function] += 1
            self.calls[function] += 1
            self.most[function] = max(self.most[function], self._now[function])
            self.total_now += 1
            self.total_most = max(self.total_most, self.total_now)

    def leave(self, function: str) -> None:
        with self._lock:
            self._now[function] -= 1
            self.total_now -= 1


@pytest.fixture
def in_flight(monkeypatch: pytest.MonkeyPatch) -> InFlight:
    counter = InFlight()
    original = Dispatcher.post

    def counted_post(
        self: Dispatcher,
        job: ClaimedJob,
        route: Route,
        timeout: float,
        trace: TraceContext | None = None,
    ) -> Delivery:
        counter.enter(route.function)
        try:
            return original(self, job, route, timeout, trace)
        finally:
            counter.leave(route.function)

    monkeypatch.setattr(Dispatcher, "post", counted_post)
    return counter


@pytest.fixture
def slow_functions(standin: StandIn) -> StandIn:
    for function in ("ingest-slack", "process-embeddings"):
        standin.configure(function, {"delay_ms": HOLD_MS})
    return standin


def enqueue(queue: QueueStore, job_type: str, n: int) -> set[uuid.UUID]:
    tenant = uuid.uuid4()
    return {queue.enqueue(tenant, job_type, {"n": i}) for i in range(n)}


def requests_per_function(standin: StandIn) -> Counter[str]:
    return Counter(request.function for request in standin.requests())


def statuses(conn: pg8000.native.Connection) -> dict[str, int]:
    return dict(conn.run("SELECT status, count(*)::int FROM queue_jobs GROUP BY status"))


def routes(**job_types: Any) -> str:
    return json.dumps(job_types)


SLACK_LIMITED = routes(ingest_slack={"function": "ingest-slack", "max_concurrency": 2})


def test_a_function_limited_to_2_never_has_more_than_2_calls_in_flight(
    run_batch: RunBatch,
    queue: QueueStore,
    slow_functions: StandIn,
    in_flight: InFlight,
    conn: pg8000.native.Connection,
) -> None:
    # Given ingest-slack limited to 2 calls at once, MAX_CONCURRENCY 20, and both functions
    # holding each answer 300 ms
    slack = enqueue(queue, "ingest_slack", 12)
    other = enqueue(queue, "process_embeddings", 12)
    # When one batch takes the 12 slack jobs and 12 jobs of another type
    summary, _ = run_batch(job_routes=SLACK_LIMITED, max_concurrency="20")
    # Then ingest-slack never had more than 2 calls in flight, and did use both
    assert in_flight.calls["ingest-slack"] == 12
    assert in_flight.most["ingest-slack"] == 2
    # And the other function was not held to that limit: its calls overlapped beyond 2
    assert in_flight.calls["process-embeddings"] == 12
    assert in_flight.most["process-embeddings"] > 2
    # And every job of both types was delivered once and completed
    assert requests_per_function(slow_functions) == {"ingest-slack": 12, "process-embeddings": 12}
    delivered = {uuid.UUID(r.headers["idempotency-key"]) for r in slow_functions.requests()}
    assert delivered == slack | other
    assert summary.claimed == summary.completed == 24
    assert statuses(conn) == {"completed": 24}


def test_without_a_limit_only_max_concurrency_bounds_a_function(
    run_batch: RunBatch, queue: QueueStore, slow_functions: StandIn, in_flight: InFlight
) -> None:
    # Given the same jobs and slow functions, and no limit of ingest-slack's own
    enqueue(queue, "ingest_slack", 12)
    enqueue(queue, "process_embeddings", 12)
    # When one batch runs with MAX_CONCURRENCY 20
    summary, _ = run_batch(max_concurrency="20")
    # Then ingest-slack's calls overlapped beyond 2 (what the limit above prevents)
    assert in_flight.most["ingest-slack"] > 2
    assert summary.completed == 24


def test_max_concurrency_bounds_all_calls_together(
    run_batch: RunBatch, queue: QueueStore, slow_functions: StandIn, in_flight: InFlight
) -> None:
    # Given 24 jobs of two functions that each hold their answers, and MAX_CONCURRENCY 4
    enqueue(queue, "ingest_slack", 12)
    enqueue(queue, "process_embeddings", 12)
    # When one batch runs (ingest-slack limited to 2 of the 4)
    summary, _ = run_batch(job_routes=SLACK_LIMITED, max_concurrency="4")
    # Then never more than 4 calls were in flight in all, nor 2 to ingest-slack
    assert in_flight.total_most <= 4
    assert in_flight.most["ingest-slack"] <= 2
    assert summary.completed == 24


def test_job_types_routed_to_one_limited_function_share_its_limit(
    run_batch: RunBatch,
    queue: QueueStore,
    slow_functions: StandIn,
    in_flight: InFlight,
    conn: pg8000.native.Connection,
) -> None:
    # Given ingest-slack limited to 2, and a second job type routed to the same function
    enqueue(queue, "ingest_slack", 6)
    enqueue(queue, "slack_backfill", 6)
    job_routes = routes(
        ingest_slack={"function": "ingest-slack", "max_concurrency": 2},
        slack_backfill="ingest-slack",
    )
    # When one batch takes both types
    summary, _ = run_batch(job_routes=job_routes, max_concurrency="20")
    # Then the function (not each job type) had at most 2 calls in flight
    assert in_flight.calls["ingest-slack"] == 12
    assert in_flight.most["ingest-slack"] == 2
    assert summary.completed == 12
    assert statuses(conn) == {"completed": 12}
