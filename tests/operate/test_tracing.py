"""X-Ray tracing: one subsegment per dispatch, under the batch's trace entity.

Deliveries run in dispatch threads (Powertools idempotency wraps synchronous functions only), and
the X-Ray SDK keeps its current entity per thread: a subsegment begun in a fresh thread has no
parent unless the batch hands it one. These specifications turn tracing on for one test at a
time (the suite runs with POWERTOOLS_TRACE_DISABLED, outside Lambda), record what the X-Ray SDK
would send to the daemon instead of sending it, and look at the parent of every dispatch
subsegment. tests/unit/test_observability.py holds when tracing is on.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aws_xray_sdk import global_sdk_config
from aws_xray_sdk.core.context import Context
from aws_xray_sdk.core.lambda_launcher import LambdaContext

from handler import app
from handler.dispatch.guard import DeliveryGuard
from handler.dispatch.routes import DEFAULT_ROUTES
from handler.dispatch.tracecontext import w3c_trace_id
from handler.local.standin import StandIn
from handler.operate import observability
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker

from .conftest import FakeLambdaContext

# The X-Ray recorder Powertools traces with (typed as Powertools' BaseProvider, which it extends).
tracer = observability.get_tracer()
recorder: Any = tracer.provider
TRACE_ROOT = "1-6650a1b2-0123456789abcdef01234567"
LAMBDA_PARENT = "53995c3f42cd8ad8"  # the id of the segment the Lambda service opened


class RecordingEmitter:
    """Stands in for the UDP emitter: keeps every document the SDK would send to the daemon."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send_entity(self, entity: Any) -> None:
        document = json.loads(entity.serialize())
        with self._lock:
            self.documents.append(document)

    def set_daemon_address(self, address: str | None) -> None:
        del address  # nothing is sent anywhere

    @property
    def ip(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return 2000

    def entities(self) -> list[dict[str, Any]]:
        """Every segment and subsegment sent, streamed on its own or nested in its parent."""
        found: list[dict[str, Any]] = []

        def walk(document: dict[str, Any]) -> None:
            found.append(document)
            for child in document.get("subsegments", []):
                walk(child)

        for document in self.documents:
            walk(document)
        return found

    def dispatches(self) -> list[dict[str, Any]]:
        return [e for e in self.entities() if e["name"].startswith("## dispatch ")]

    def named(self, name: str) -> dict[str, Any]:
        [entity] = [e for e in self.entities() if e["name"] == name]
        return entity


@pytest.fixture
def xray(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingEmitter]:
    """Tracing on for this test: the SDK enabled, every trace sampled, nothing sent anywhere."""
    monkeypatch.delenv("AWS_XRAY_SDK_ENABLED", raising=False)
    monkeypatch.delenv("AWS_XRAY_CONTEXT_MISSING", raising=False)
    emitter = RecordingEmitter()
    # As in Lambda with tracing on (the suite's environment turns it off).
    monkeypatch.setattr(observability, "tracing_enabled", lambda: True)
    monkeypatch.setattr(tracer, "disabled", False)
    monkeypatch.setattr(recorder, "context", Context())
    monkeypatch.setattr(recorder, "emitter", emitter)
    monkeypatch.setattr(recorder, "sampling", False)  # False: no sampling rules, trace everything
    monkeypatch.setattr(recorder, "streaming_threshold", recorder.streaming_threshold)
    was_enabled = global_sdk_config.sdk_enabled()
    global_sdk_config.set_sdk_enabled(True)
    yield emitter
    global_sdk_config.set_sdk_enabled(was_enabled)


@pytest.fixture
def delivery_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads each delivery ran in."""
    names: list[str] = []
    deliver = DeliveryGuard.deliver

    def spy(self: DeliveryGuard, *args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return deliver(self, *args, **kwargs)

    monkeypatch.setattr(DeliveryGuard, "deliver", spy)
    return names


def one_job_per_default_route(queue: QueueStore, failing: str) -> dict[str, str]:
    """Five jobs, one per default route; the `failing` type's function answers 500.
    Returns job type -> function."""
    tenant = uuid.uuid4()
    for job_type in DEFAULT_ROUTES:
        payload = {"simulate": {"status": 500}} if job_type == failing else {}
        queue.enqueue(tenant, job_type, payload)
    return dict(DEFAULT_ROUTES)


def assert_each_request_names_its_dispatch_subsegment_as_parent(
    xray: RecordingEmitter, standin: StandIn
) -> None:
    """The W3C traceparent and the X-Ray header of every POST name the call's own subsegment, in
    the batch's trace, so that the function's spans nest under it."""
    requests = {r.body["job_type"]: r.headers for r in standin.requests()}
    dispatches = xray.dispatches()
    assert len(requests) == len(dispatches) > 0
    for dispatch in dispatches:
        headers = requests[dispatch["annotations"]["job_type"]]
        trace_id = w3c_trace_id(dispatch["trace_id"])
        assert headers["traceparent"] == f"00-{trace_id}-{dispatch['id']}-01"
        assert headers["x-amzn-trace-id"] == (
            f"Root={dispatch['trace_id']};Parent={dispatch['id']};Sampled=1"
        )


def assert_one_dispatch_subsegment_per_job(
    xray: RecordingEmitter, routes: dict[str, str], *, parent_id: str, trace_id: str, failing: str
) -> None:
    dispatches = xray.dispatches()
    assert sorted(d["name"] for d in dispatches) == sorted(
        f"## dispatch {function}" for function in routes.values()
    )
    for dispatch in dispatches:
        assert dispatch["parent_id"] == parent_id, dispatch["name"]
        assert dispatch["trace_id"] == trace_id, dispatch["name"]
        assert "end_time" in dispatch, dispatch["name"]  # closed, not left in progress
    by_type = {d["annotations"]["job_type"]: d["annotations"] for d in dispatches}
    assert set(by_type) == set(routes)
    for job_type, annotated in by_type.items():
        assert annotated["function"] == routes[job_type]
        assert annotated["attempt"] == "1"
        assert annotated["status"] == ("500" if job_type == failing else "200")
        assert annotated["delivery"] == "sent"


@pytest.mark.parametrize(
    "streaming_threshold",
    [0, 30],
    ids=["each-subsegment-streamed-as-in-lambda", "subsegments-sent-inside-the-segment"],
)
def test_each_dispatch_gets_one_subsegment_under_the_batchs_segment_though_it_runs_in_a_dispatch_thread(
    xray: RecordingEmitter,
    streaming_threshold: int,
    queue: QueueStore,
    make_worker: Callable[..., Worker],
    delivery_threads: list[str],
    standin: StandIn,
) -> None:
    # Given tracing on, a segment open in this thread, and five due jobs, one per function,
    # one of which answers 500
    recorder.streaming_threshold = streaming_threshold
    routes = one_job_per_default_route(queue, failing="process_embeddings")
    worker = make_worker(max_concurrency="5")
    segment = recorder.begin_segment("test")
    # When a batch runs (in this thread; the deliveries in dispatch threads)
    summary, _ = worker.run(parse_event({}), remaining_seconds=30, request_id="trace-test")
    recorder.end_segment()
    # Then each delivery ran outside this thread, yet each has exactly one subsegment, a child of
    # this segment in this trace, annotated with what an operator searches by
    assert summary.claimed == 5
    assert len(delivery_threads) == 5
    assert threading.current_thread().name not in delivery_threads
    assert all(name.startswith("dispatch") for name in delivery_threads)
    assert_one_dispatch_subsegment_per_job(
        xray, routes, parent_id=segment.id, trace_id=segment.trace_id, failing="process_embeddings"
    )
    assert xray.named("test")["id"] == segment.id  # the segment itself was sent, complete
    assert_each_request_names_its_dispatch_subsegment_as_parent(xray, standin)


def test_under_the_lambda_handler_each_dispatch_subsegment_is_a_child_of_the_handlers_subsegment(
    xray: RecordingEmitter,
    lambda_env: dict[str, str],
    queue: QueueStore,
    capsys: pytest.CaptureFixture[str],
    standin: StandIn,
) -> None:
    # Given tracing on, a segment open in this thread, and five due jobs
    routes = one_job_per_default_route(queue, failing="ingest_slack")
    segment = recorder.begin_segment("test")
    # When the Lambda handler runs (it opens the "## handle_invocation" subsegment)
    result = app.lambda_handler({}, FakeLambdaContext())
    recorder.end_segment()
    # Then every dispatch subsegment hangs under the handler's subsegment, not beside it
    assert result["claimed"] == 5
    handler = xray.named("## handle_invocation")
    assert handler["parent_id"] == segment.id
    assert_one_dispatch_subsegment_per_job(
        xray, routes, parent_id=handler["id"], trace_id=segment.trace_id, failing="ingest_slack"
    )
    assert_each_request_names_its_dispatch_subsegment_as_parent(xray, standin)


def test_in_the_lambda_runtime_dispatch_subsegments_join_the_invocations_trace(
    xray: RecordingEmitter,
    lambda_env: dict[str, str],
    queue: QueueStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    standin: StandIn,
) -> None:
    # Given the X-Ray SDK as it runs in Lambda: the service's trace header in the environment,
    # its thread-local Lambda context (every thread starts from the service's segment) and
    # each closed subsegment streamed at once (what Powertools configures in Lambda)
    monkeypatch.setenv("_X_AMZN_TRACE_ID", f"Root={TRACE_ROOT};Parent={LAMBDA_PARENT};Sampled=1")
    monkeypatch.setattr(recorder, "context", LambdaContext())
    recorder.streaming_threshold = 0
    routes = one_job_per_default_route(queue, failing="generate_digest")
    # When the handler runs
    result = app.lambda_handler({}, FakeLambdaContext())
    # Then the handler's subsegment is a child of the service's segment, and every dispatch
    # subsegment a child of the handler's (not of a segment the dispatch thread made up)
    assert result["claimed"] == 5
    handler = xray.named("## handle_invocation")
    assert handler["parent_id"] == LAMBDA_PARENT
    assert handler["trace_id"] == TRACE_ROOT
    assert_one_dispatch_subsegment_per_job(
        xray, routes, parent_id=handler["id"], trace_id=TRACE_ROOT, failing="generate_digest"
    )
    assert_each_request_names_its_dispatch_subsegment_as_parent(xray, standin)


def test_in_the_lambda_runtime_a_trace_not_sampled_is_still_propagated_as_not_sampled(
    xray: RecordingEmitter,
    lambda_env: dict[str, str],
    queue: QueueStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    standin: StandIn,
) -> None:
    # Given tracing on in Lambda, for an invocation whose trace the service did not sample (the
    # SDK records nothing, and its subsegments' ids are all zero)
    monkeypatch.setenv("_X_AMZN_TRACE_ID", f"Root={TRACE_ROOT};Parent={LAMBDA_PARENT};Sampled=0")
    monkeypatch.setattr(recorder, "context", LambdaContext())
    one_job_per_default_route(queue, failing="none")
    # When the handler runs
    result = app.lambda_handler({}, FakeLambdaContext())
    # Then nothing is recorded, yet every POST carries the invocation's trace, marked not
    # sampled, under a span id of its own (W3C forbids an all-zero one)
    assert result["claimed"] == 5
    assert xray.dispatches() == []
    spans = set()
    for request in standin.requests():
        version, trace_id, span, flags = request.headers["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", w3c_trace_id(TRACE_ROOT), "00")
        assert len(span) == 16
        assert span != "0" * 16
        assert request.headers["x-amzn-trace-id"] == (f"Root={TRACE_ROOT};Parent={span};Sampled=0")
        spans.add(span)
    assert len(spans) == 5


def test_with_tracing_off_every_post_still_carries_the_invocations_trace(
    queue: QueueStore,
    make_worker: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
    standin: StandIn,
) -> None:
    # Given tracing off (the suite's default) in an invocation whose X-Ray header the runtime
    # set (it does so with tracing off too), and five due jobs
    monkeypatch.setenv("_X_AMZN_TRACE_ID", f"Root={TRACE_ROOT};Parent={LAMBDA_PARENT};Sampled=1")
    one_job_per_default_route(queue, failing="none")
    worker = make_worker(max_concurrency="5")
    # When a batch runs
    summary, _ = worker.run(parse_event({}), remaining_seconds=30, request_id="untraced")
    # Then every POST carries a W3C traceparent in that trace, each with a span of its own and
    # the upstream sampling decision, and no X-Ray header (the worker records no subsegment)
    assert summary.completed == 5
    parents = [request.headers["traceparent"] for request in standin.requests()]
    assert len(parents) == 5
    assert all(p.startswith(f"00-{w3c_trace_id(TRACE_ROOT)}-") for p in parents)
    assert all(p.endswith("-01") for p in parents)
    assert len({p.split("-")[2] for p in parents}) == 5
    assert all("x-amzn-trace-id" not in r.headers for r in standin.requests())


def test_a_batch_with_no_open_trace_delivers_every_job_and_sends_no_dispatch_subsegment(
    xray: RecordingEmitter,
    queue: QueueStore,
    make_worker: Callable[..., Worker],
    standin: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given tracing on, a worker whose dispatch threads already served a traced batch, and
    # then five more due jobs with no segment open in this thread any more
    worker = make_worker(max_concurrency="5")
    one_job_per_default_route(queue, failing="none")
    recorder.begin_segment("earlier")
    worker.run(parse_event({}), remaining_seconds=30, request_id="traced")
    recorder.end_segment()
    traced = len(xray.dispatches())
    standin.reset()
    one_job_per_default_route(queue, failing="none")
    # When the next batch runs
    summary, _ = worker.run(parse_event({}), remaining_seconds=30, request_id="untraced")
    # Then tracing costs no delivery: every job is sent and completed, and no subsegment is
    # sent, nor hung on the earlier (finished) trace
    assert traced == 5
    assert (summary.claimed, summary.completed, summary.released) == (5, 5, 0)
    assert len(standin.requests()) == 5
    assert len(xray.dispatches()) == traced
