"""Hostile input cannot reach another URL, change other rows, or turn TLS verification off."""

from __future__ import annotations

import json
import ssl
import uuid
from datetime import UTC, datetime, timedelta

import pg8000.native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.dispatch.client import Dispatcher, request_body
from handler.dispatch.routes import Route, parse_routes
from handler.errors import ConfigurationError
from handler.local.standin import StandIn
from handler.queue.store import QueueStore

from .conftest import RunBatch, job_state

HOSTILE_JOB_TYPES = [
    "../admin",
    "ingest_slack/../../admin",
    "http://evil.example/steal",
    "//evil.example",
    "%2e%2e%2fadmin",
    "ingest_slack?x=1",
    "ingest_slack#frag",
    "ingest_slack'; DROP TABLE queue_jobs; --",
    "ingest_slack\r\nX-Injected: 1",
]

HOSTILE_PAYLOADS = [
    {"q": "'; DELETE FROM queue_jobs; --"},
    {"q": "\"); UPDATE queue_jobs SET status='completed'; --"},
    {"path": "../../etc/passwd", "url": "http://evil.example/"},
    {"nested": {"$where": "1 = 1", "x": ["' OR '1'='1"]}},
]


@pytest.mark.parametrize("job_type", HOSTILE_JOB_TYPES)
def test_a_hostile_job_type_reaches_no_url_and_is_dead_lettered(
    job_type: str,
    queue: QueueStore,
    run_batch: RunBatch,
    standin: StandIn,
    conn: pg8000.native.Connection,
) -> None:
    # Given a hostile job next to an ordinary one of another tenant
    bystander = queue.enqueue(uuid.uuid4(), "ingest_slack", {"n": 1})
    hostile = queue.enqueue(uuid.uuid4(), job_type, {})
    # When a batch runs
    run_batch()
    # Then only the ordinary job was sent, to its own function; the hostile one has no route
    assert [r.path for r in standin.requests()] == ["/ingest-slack"]
    assert job_state(conn, hostile)["reason"] == f"No route for job type '{job_type}'"
    assert job_state(conn, bystander)["status"] == "completed"
    assert conn.run("SELECT count(*) FROM queue_jobs")[0][0] == 1


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS)
def test_a_hostile_payload_is_sent_verbatim_and_changes_no_other_row(
    payload: dict[str, object],
    queue: QueueStore,
    run_batch: RunBatch,
    standin: StandIn,
    conn: pg8000.native.Connection,
) -> None:
    later = queue.enqueue(
        uuid.uuid4(), "ingest_slack", {"n": 2}, scheduled_at=datetime.now(UTC) + timedelta(hours=1)
    )
    job = queue.enqueue(uuid.uuid4(), "process_embeddings", payload)
    run_batch()
    [request] = standin.requests()
    assert request.path == "/process-embeddings"
    assert request.body["payload"] == payload
    assert job_state(conn, job)["status"] == "completed"
    assert job_state(conn, later)["status"] == "pending"  # untouched


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=40))
def test_a_route_can_only_name_one_plain_path_segment(name: str) -> None:
    try:
        routes = parse_routes(json.dumps({"job": name}))
    except ConfigurationError:
        return
    dispatcher = Dispatcher("https://project.example/functions/v1", "key")
    try:
        url = str(dispatcher.url_for(routes["job"]))
    finally:
        dispatcher.close()
    assert url == f"https://project.example/functions/v1/{name}"
    assert all(c.isalnum() or c in "-_" for c in name)


def test_tls_verification_stays_on() -> None:
    # The context every dispatch thread's client is given (test_transport.py shows that they
    # use it): httpx's default, verifying.
    dispatcher = Dispatcher("https://project.example/functions/v1", "key")
    try:
        context = dispatcher.ssl_context
    finally:
        dispatcher.close()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert dispatcher.url_for(Route("ingest-slack")).scheme == "https"
    assert context.cert_store_stats()["x509_ca"] > 0  # the CAs are loaded


def test_a_plain_http_dispatcher_loads_no_ca_and_its_context_would_refuse() -> None:
    # Plain HTTP (the stand-in, local runs) makes no TLS connection; the context it holds is
    # still a verifying one, trusting nobody.
    dispatcher = Dispatcher("http://127.0.0.1:1/functions/v1", "key")
    try:
        context = dispatcher.ssl_context
    finally:
        dispatcher.close()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.cert_store_stats()["x509_ca"] == 0


# Text PostgreSQL's jsonb can hold: no NUL, no lone surrogate.
JSON_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
    | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.dictionaries(JSON_TEXT, JSON_VALUES))
def test_any_json_payload_reaches_the_request_body_as_it_was_enqueued(
    payload: dict[str, object], queue: QueueStore, conn: pg8000.native.Connection
) -> None:
    # The payload is spliced into the body as PostgreSQL renders it, never re-serialised.
    conn.run("DELETE FROM queue_jobs")
    job_id = queue.enqueue(uuid.uuid4(), "ingest_slack", payload)
    [job] = queue.claim("w", lease_seconds=60, max_jobs=1, max_per_tenant=1)
    body = json.loads(request_body(job))
    assert body == {
        "job_id": str(job_id),
        "tenant_id": str(job.tenant_id),
        "job_type": "ingest_slack",
        "attempt": 1,
        "payload": payload,
    }
