"""The lean keep-alive transport against real servers: TLS verified (a certificate the system
does not trust is refused), keep-alive reuse, a peer that closes, bodies past the read limit."""

from __future__ import annotations

import http.server
import ssl
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import trustme

from handler.dispatch.client import Dispatcher
from handler.dispatch.http_transport import MAX_BODY_BYTES
from handler.dispatch.routes import Route
from handler.local.standin import StandIn
from handler.queue.store import ClaimedJob


def a_job() -> ClaimedJob:
    now = datetime.now(UTC)
    return ClaimedJob(
        uuid.uuid4(), uuid.uuid4(), "ingest_slack", "{}", 0, 1, 5, now, now, now, False
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b'{"ok": true}'

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def https_server(ca: trustme.CA) -> Iterator[str]:
    """An HTTPS server on localhost whose certificate only the test's CA signed."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_certificate_the_system_does_not_trust_is_refused(https_server: str) -> None:
    dispatcher = Dispatcher(https_server, "key")
    try:
        delivery = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
    finally:
        dispatcher.close()
    assert delivery.outcome.kind == "failed"
    assert delivery.outcome.status is None
    assert "CERTIFICATE_VERIFY_FAILED" in (delivery.outcome.error or "")


def test_a_certificate_signed_by_a_trusted_ca_is_accepted(
    ca: trustme.CA, https_server: str
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    dispatcher = Dispatcher(https_server, "key", ssl_context=context)
    try:
        deliveries = [dispatcher.post(a_job(), Route("ingest-slack"), timeout=5) for _ in range(3)]
    finally:
        dispatcher.close()
    assert [d.outcome.kind for d in deliveries] == ["completed"] * 3


def test_a_hostname_that_does_not_match_the_certificate_is_refused(
    ca: trustme.CA, https_server: str
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    dispatcher = Dispatcher(
        https_server.replace("localhost", "127.0.0.1"), "key", ssl_context=context
    )
    try:
        delivery = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
    finally:
        dispatcher.close()
    assert delivery.outcome.kind == "failed"
    assert "CERTIFICATE_VERIFY_FAILED" in (delivery.outcome.error or "") or "match" in (
        delivery.outcome.error or ""
    )


def test_calls_from_one_thread_reuse_one_connection(standin: StandIn) -> None:
    dispatcher = Dispatcher(standin.base_url, "key")
    try:
        for _ in range(5):
            assert (
                dispatcher.post(a_job(), Route("ingest-slack"), timeout=5).outcome.kind
                == "completed"
            )
        transport = dispatcher._client()._transport  # type: ignore[attr-defined]
        first_socket = transport._conn.sock
        dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
        assert transport._conn.sock is first_socket
    finally:
        dispatcher.close()


def test_a_connection_the_peer_closed_is_replaced_before_the_next_call(standin: StandIn) -> None:
    # The stand-in closes without answering: that call fails, the next one opens a new connection.
    dispatcher = Dispatcher(standin.base_url, "key")
    try:
        standin.configure("ingest-slack", {"close": True, "fail_times": 1})
        job = a_job()
        first = dispatcher.post(job, Route("ingest-slack"), timeout=5)
        second = dispatcher.post(job, Route("ingest-slack"), timeout=5)
    finally:
        dispatcher.close()
    assert first.outcome.kind == "failed"
    assert first.outcome.error is not None
    assert first.outcome.error.startswith("Network error calling ingest-slack: RemoteProtocolError")
    assert second.outcome.kind == "completed"


def test_an_answer_longer_than_the_read_limit_is_cut_and_its_connection_dropped(
    standin: StandIn,
) -> None:
    standin.configure("ingest-slack", {"status": 500, "body": "x" * (MAX_BODY_BYTES * 3)})
    dispatcher = Dispatcher(standin.base_url, "key")
    try:
        delivery = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
        transport = dispatcher._client()._transport  # type: ignore[attr-defined]
        assert transport._conn is None
        standin.configure("ingest-slack", None)
        assert (
            dispatcher.post(a_job(), Route("ingest-slack"), timeout=5).outcome.kind == "completed"
        )
    finally:
        dispatcher.close()
    assert delivery.outcome.status == 500
    assert delivery.outcome.error is not None
    assert len(delivery.outcome.error) < 1000


def test_a_key_that_cannot_go_in_a_header_fails_the_call_without_raising(standin: StandIn) -> None:
    dispatcher = Dispatcher(standin.base_url, "clé-secrète")
    try:
        delivery = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
    finally:
        dispatcher.close()
    assert delivery.outcome.kind == "failed"
    assert "secrète" not in (delivery.outcome.error or "")
    assert standin.requests() == []
