"""The dispatcher's HTTP stack against real servers: TLS verified (a certificate the CAs do not
vouch for is refused) with one context for every thread, the proxy environment honoured (through
a real forward proxy), a peer that closes, bodies past the read limit."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import trustme

from handler.dispatch.client import MAX_RESPONSE_BYTES, Dispatcher
from handler.dispatch.routes import Route
from handler.local.standin import StandIn
from handler.queue.store import ClaimedJob
from tests.http_servers import Answer, ForwardProxy, ScriptedServer


def a_job() -> ClaimedJob:
    return ClaimedJob(uuid.uuid4(), uuid.uuid4(), "ingest_slack", "{}", 1, False)


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


def test_an_answer_longer_than_the_read_limit_is_cut_and_the_next_call_still_works(
    standin: StandIn,
) -> None:
    standin.configure("ingest-slack", {"status": 500, "body": "x" * (MAX_RESPONSE_BYTES * 3)})
    dispatcher = Dispatcher(standin.base_url, "key")
    try:
        delivery = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
        standin.configure("ingest-slack", None)
        after = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
    finally:
        dispatcher.close()
    assert delivery.outcome.status == 500
    assert delivery.outcome.error is not None
    assert len(delivery.outcome.error) < 1000
    assert after.outcome.kind == "completed"


def test_a_key_that_cannot_go_in_a_header_fails_the_call_without_raising(standin: StandIn) -> None:
    dispatcher = Dispatcher(standin.base_url, "clé-secrète")
    try:
        delivery = dispatcher.post(a_job(), Route("ingest-slack"), timeout=5)
    finally:
        dispatcher.close()
    assert delivery.outcome.kind == "failed"
    assert "secrète" not in (delivery.outcome.error or "")
    assert standin.requests() == []


def test_one_tls_context_serves_every_dispatch_thread(ca: trustme.CA, https_server: str) -> None:
    # Only the given context trusts the test's CA: a thread whose client loaded another one
    # (httpx's default, say) would fail verification. Four calls in flight at once, on four
    # threads, so that each thread makes its own client.
    context = ssl.create_default_context()
    ca.configure_trust(context)
    dispatcher = Dispatcher(https_server, "key", ssl_context=context)
    barrier = threading.Barrier(4)
    kinds: list[str] = []

    def call() -> None:
        barrier.wait()
        kinds.append(dispatcher.post(a_job(), Route("ingest-slack"), timeout=5).outcome.kind)

    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        dispatcher.close()
    assert kinds == ["completed"] * 4


# --- The proxy environment -------------------------------------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardProxy]:
    """A forward proxy on loopback, and an environment that names no other proxy."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    forward = ForwardProxy()
    yield forward
    forward.close()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[ScriptedServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    server = ScriptedServer(tls=context)
    yield server
    server.close()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def two_calls(url: str, context: ssl.SSLContext | None = None) -> list[str]:
    dispatcher = Dispatcher(url, "key", ssl_context=context)
    try:
        return [dispatcher.post(a_job(), Route("fn"), timeout=5).outcome.kind for _ in range(2)]
    finally:
        dispatcher.close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_plain_http_calls_go_through_the_proxy_the_environment_names(
    proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    server = ScriptedServer()
    monkeypatch.setenv(variable, proxy.url)
    try:
        kinds = two_calls(server.url)
    finally:
        server.close()
    assert kinds == ["completed", "completed"]
    # One connection to the proxy, kept alive: it was asked once, in absolute form.
    assert proxy.asked == [f"POST {server.url}/fn HTTP/1.1".encode()]
    assert len(server.requests) == 2


def test_https_calls_tunnel_through_the_proxy_with_tls_verified_end_to_end(
    proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch, ca: trustme.CA, tls_server: ScriptedServer
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    assert two_calls(tls_server.url, trusting(ca)) == ["completed", "completed"]
    assert proxy.asked == [f"CONNECT localhost:{tls_server.port} HTTP/1.1".encode()]
    assert len(tls_server.requests) == 2
    assert b"Authorization: Bearer key" in tls_server.requests[0]
    # Without the test's CA, the certificate the tunnel leads to is refused as it would be
    # without a proxy.
    [refused, _] = two_calls(tls_server.url)
    assert refused == "failed"


def test_no_proxy_bypasses_the_proxy(proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ScriptedServer()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")
    try:
        kinds = two_calls(server.url)
    finally:
        server.close()
    assert kinds == ["completed", "completed"]
    assert proxy.asked == []
    assert len(server.requests) == 2


def test_the_deadline_holds_through_a_proxy_tunnel(
    proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch, ca: trustme.CA, tls_server: ScriptedServer
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    tls_server.answers = [
        Answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 1000, piece=6, pause=0.1)  # 100 s of head
    ]
    dispatcher = Dispatcher(tls_server.url, "key", ssl_context=trusting(ca))
    try:
        started = time.monotonic()
        delivery = dispatcher.post(a_job(), Route("fn"), timeout=1)
        elapsed = time.monotonic() - started
    finally:
        dispatcher.close()
    assert "ReadTimeout: timed out after 1 s" in (delivery.outcome.error or "")
    assert elapsed < 15  # generous: without the deadline it would take 100 s
