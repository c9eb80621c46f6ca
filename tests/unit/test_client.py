"""The dispatcher's HTTP call (stock httpx) against real servers on loopback that answer with
bytes written by hand: what it sends, how it reads answers of every framing, the 64 KiB read
limit, redirects, keep-alive, and the one deadline that bounds a whole call."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import httpx
import pytest
import trustme

from handler.dispatch import client as client_module
from handler.dispatch.client import MAX_RESPONSE_BYTES, Delivery, Dispatcher, _read_bounded
from handler.dispatch.routes import Route
from handler.dispatch.tracecontext import TraceContext
from handler.queue.store import ClaimedJob
from tests.http_servers import OK, Answer, ScriptedServer, SlowLink

ROUTE = Route("fn")
# Far longer than any timeout below: a call that waited for the whole of it would show.
TRICKLE = 1000


def a_job(payload: str = "{}") -> ClaimedJob:
    return ClaimedJob(uuid.uuid4(), uuid.uuid4(), "ingest_slack", payload, 1, False)


class Authority(NamedTuple):
    server: ssl.SSLContext  # a certificate for localhost, signed by a CA of the test's own
    client: ssl.SSLContext  # trusts that CA


@pytest.fixture(scope="module")
def ca() -> Authority:
    authority = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return Authority(server, client)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    raw = ScriptedServer()
    yield raw
    raw.close()


@contextlib.contextmanager
def dispatcher_for(url: str, ssl_context: ssl.SSLContext | None = None) -> Iterator[Dispatcher]:
    dispatcher = Dispatcher(url, "the-key", ssl_context=ssl_context)
    try:
        yield dispatcher
    finally:
        dispatcher.close()


def post(url: str, *, timeout: float = 5, calls: int = 1) -> list[Delivery]:
    with dispatcher_for(url) as dispatcher:
        return [dispatcher.post(a_job(), ROUTE, timeout) for _ in range(calls)]


def error_of(delivery: Delivery) -> str:
    assert delivery.outcome.kind == "failed"
    assert delivery.outcome.error is not None
    return delivery.outcome.error


def test_the_request_is_the_dispatch_contract_and_nothing_more(server: ScriptedServer) -> None:
    job = a_job('{"n": 1}')
    with dispatcher_for(f"{server.url}/functions/v1/") as dispatcher:
        assert dispatcher.post(job, ROUTE, 5).outcome.kind == "completed"
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    request_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert request_line == "POST /functions/v1/fn HTTP/1.1"
    # A call given no trace context starts a trace of its own, not recorded here (flags 00)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers.pop("traceparent"))
    assert headers == {
        "Host": f"127.0.0.1:{server.port}",
        "Content-Length": str(len(body)),
        "Authorization": "Bearer the-key",
        "Content-Type": "application/json",
        "Idempotency-Key": str(job.id),
        "User-Agent": "queue-worker",
    }
    assert body == client_module.request_body(job)


@pytest.mark.parametrize(
    "job_type", ["ingest_slack", 'quote"d', "back\\slash", "new\nline", "näive", "emoji \U0001f600"]
)
def test_the_body_is_the_compact_json_envelope_whatever_the_job_type(job_type: str) -> None:
    job = ClaimedJob(uuid.uuid4(), uuid.uuid4(), job_type, '{"a": [1, "x"]}', 3, False)
    envelope = {
        "job_id": str(job.id),
        "tenant_id": str(job.tenant_id),
        "job_type": job_type,
        "attempt": 3,
        "payload": {"a": [1, "x"]},
    }
    body = client_module.request_body(job)
    assert json.loads(body) == envelope
    # Byte for byte what json.dumps makes of it (ASCII, compact), but the payload's own spacing
    expected = json.dumps(envelope | {"payload": None}, separators=(",", ":"))
    assert body == expected.replace("null}", '{"a": [1, "x"]}}').encode()


def test_the_calls_trace_context_is_sent_as_given(server: ScriptedServer) -> None:
    trace = TraceContext("5759e988bd862e3fe1be46a994272793", "53995c3f42cd8ad8", True, xray=True)
    with dispatcher_for(server.url) as dispatcher:
        assert dispatcher.post(a_job(), ROUTE, 5, trace).outcome.kind == "completed"
    head = server.requests[0].partition(b"\r\n\r\n")[0].decode()
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    assert headers["traceparent"] == "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
    assert headers["X-Amzn-Trace-Id"] == (
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    )


def test_calls_from_one_thread_reuse_one_connection(server: ScriptedServer) -> None:
    deliveries = post(server.url, calls=3)
    assert [d.outcome.kind for d in deliveries] == ["completed"] * 3
    assert server.connections == 1


def test_each_dispatch_thread_has_a_connection_of_its_own(server: ScriptedServer) -> None:
    # Each of 4 threads holds its call until all 4 are in flight: one shared connection could
    # not carry them at once.
    server.answers = [Answer(OK.data, delay=0.2) for _ in range(4)]
    barrier = threading.Barrier(4)
    kinds: list[str] = []
    with dispatcher_for(server.url) as dispatcher:

        def call() -> None:
            barrier.wait()
            kinds.append(dispatcher.post(a_job(), ROUTE, 10).outcome.kind)
            kinds.append(dispatcher.post(a_job(), ROUTE, 10).outcome.kind)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert kinds == ["completed"] * 8
    assert server.connections == 4


@pytest.mark.parametrize(
    ("answer", "excerpt"),
    [
        (Answer(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nhello"), "hello"),
        (
            Answer(
                b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
            ),
            "hello world",
        ),
        (
            Answer(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nend"
            ),
            "end",
        ),
        (Answer(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"), "(empty body)"),
    ],
    ids=["content-length", "chunked", "informational-first", "empty"],
)
def test_answers_of_each_framing_are_read_and_keep_their_connection(
    server: ScriptedServer, answer: Answer, excerpt: str
) -> None:
    server.answers = [answer]
    first, second = post(server.url, calls=2)
    assert error_of(first) == f"Function execution failed: 500 {excerpt}. Check function logs."
    assert second.outcome.kind == "completed"
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        Answer(b"HTTP/1.0 500 Oops\r\n\r\nuntil the end", close=True),
        Answer(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nuntil the end", close=True),
        Answer(
            b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 13\r\n\r\nuntil the end"
        ),
    ],
    ids=["http-1.0", "close-without-length", "close-with-length"],
)
def test_an_answer_that_ends_its_connection_is_read_and_the_next_call_reconnects(
    server: ScriptedServer, answer: Answer
) -> None:
    server.answers = [answer]
    first, second = post(server.url, calls=2)
    assert "500 until the end." in error_of(first)
    assert second.outcome.kind == "completed"
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        Answer(b"", close=True),
        Answer(b"SSH-2.0-OpenSSH\r\n\r\n", close=True),
        Answer(b"HTTP/1.1 200 OK\r\nContent-Len", close=True),
        Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", close=True),
        Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", close=True),
        Answer(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 200_000 + b"\r\n\r\n"),
    ],
    ids=["nothing", "not-http", "cut-head", "cut-body", "two-lengths", "bad-chunk", "huge-head"],
)
def test_a_malformed_or_cut_answer_is_a_network_error_and_the_next_call_reconnects(
    server: ScriptedServer, answer: Answer
) -> None:
    server.answers = [answer]
    first, second = post(server.url, calls=2)
    assert error_of(first).startswith("Network error calling fn: RemoteProtocolError: ")
    assert first.outcome.status is None
    assert second.outcome.kind == "completed"
    assert server.connections == 2


def huge(framing: str) -> bytes:
    body = b"x" * (64 * 1024 * 1024)  # far more than the sockets' buffers hold
    if framing == "length":
        return b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    if framing == "chunked":
        chunk = b"x" * 65536
        return b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (
            len(chunk),
            chunk,
        ) * (len(body) // len(chunk))
    return b"HTTP/1.0 500 Oops\r\n\r\n" + body


@pytest.mark.parametrize("framing", ["length", "chunked", "end"])
def test_an_answer_past_the_read_limit_is_not_read_further_and_its_connection_is_dropped(
    server: ScriptedServer, framing: str
) -> None:
    server.answers = [Answer(huge(framing), piece=1 << 20)]
    first, second = post(server.url, calls=2)
    assert re.fullmatch(
        r"Function execution failed: 500 x{300}…\. Check function logs\.", error_of(first)
    )
    assert second.outcome.kind == "completed"
    assert server.connections == 2
    assert server.unfinished == 1  # the client hung up on the rest


def test_the_body_is_read_up_to_the_limit_and_no_further() -> None:
    pulled = 0

    def chunks() -> Iterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"y" * 1000

    text = _read_bounded(httpx.Response(500, content=chunks()))
    assert text == "y" * MAX_RESPONSE_BYTES
    assert pulled == -(-MAX_RESPONSE_BYTES // 1000)


def test_a_redirect_is_not_followed(server: ScriptedServer) -> None:
    elsewhere = ScriptedServer()
    try:
        server.answers = [
            Answer(
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s/stolen\r\n"
                b"Content-Length: 0\r\n\r\n" % elsewhere.url.encode()
            )
        ]
        [delivery] = post(server.url)
    finally:
        elsewhere.close()
    assert delivery.outcome.status == 307
    assert delivery.outcome.kind == "failed"
    assert elsewhere.connections == 0


def test_a_refused_connection_is_a_network_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    [delivery] = post(f"http://127.0.0.1:{port}")
    assert error_of(delivery).startswith("Network error calling fn: ConnectError: ")


def test_a_connection_the_server_closed_while_idle_is_replaced_and_the_request_sent_once(
    server: ScriptedServer,
) -> None:
    # The server answers as if keeping the connection, then closes it while it is idle.
    server.answers = [Answer(OK.data, close=True)]
    with dispatcher_for(server.url) as dispatcher:
        first_job, second_job = a_job(), a_job()
        first = dispatcher.post(first_job, ROUTE, 5)
        server.wait_closed(1)
        second = dispatcher.post(second_job, ROUTE, 5)
    assert [first.outcome.kind, second.outcome.kind] == ["completed", "completed"]
    assert server.connections == 2
    keys = [re.search(rb"Idempotency-Key: (\S+)", r)[1] for r in server.requests]  # type: ignore[index]
    assert keys == [str(first_job.id).encode(), str(second_job.id).encode()]


def test_an_idle_connection_is_given_up_after_the_keepalive_expiry(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "KEEPALIVE_S", 0.05)
    with dispatcher_for(server.url) as dispatcher:
        assert dispatcher.post(a_job(), ROUTE, 5).outcome.kind == "completed"
        assert dispatcher.post(a_job(), ROUTE, 5).outcome.kind == "completed"
        assert server.connections == 1
        time.sleep(0.5)  # idle for ten times the expiry: the thing under test is time itself
        assert dispatcher.post(a_job(), ROUTE, 5).outcome.kind == "completed"
    assert server.connections == 2


def test_a_key_that_cannot_go_in_a_header_fails_the_call_without_sending_it(
    server: ScriptedServer,
) -> None:
    for key in ("clé-secrète", "key\r\nX-Evil: 1", "key\x00"):
        dispatcher = Dispatcher(server.url, key)
        try:
            delivery = dispatcher.post(a_job(), ROUTE, 5)
        finally:
            dispatcher.close()
        error = error_of(delivery)
        assert "SUPABASE_SERVICE_ROLE_KEY" in error
        assert "secrète" not in error
        assert "Evil" not in error
    assert server.connections == 0


# --- One deadline for the whole call -------------------------------------------------------

TIMED_OUT = re.compile(
    r"Network error calling fn: (Connect|Write|Read)Timeout: .*timed out.*\. "
    r"Check Supabase infrastructure status\."
)
# Generous: the calls below are cut at 1 s; without the deadline they would take 100 s or more.
SANITY_S = 15


@pytest.mark.parametrize(
    "answer",
    [
        # A byte of the status line every 100 ms (h11 takes a reason phrase of up to 100 KiB).
        Answer(b"HTTP/1.1 200 O" + b"K" * TRICKLE + b"\r\n\r\n", piece=1, pause=0.1),
        # A header line every 100 ms, and no end to them.
        Answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * TRICKLE, piece=6, pause=0.1),
        Answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000, piece=1, pause=0.1
        ),
    ],
    ids=["status-line-trickles", "head-never-ends", "body-trickles"],
)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_server_that_trickles_its_answer_cannot_hold_a_call_past_its_timeout(
    answer: Answer, tls: bool, ca: Authority
) -> None:
    server = ScriptedServer(answers=[answer, OK], tls=ca.server if tls else None)
    try:
        with dispatcher_for(server.url, ssl_context=ca.client if tls else None) as dispatcher:
            started = time.monotonic()
            cut = dispatcher.post(a_job(), ROUTE, 1)
            elapsed = time.monotonic() - started
            after = dispatcher.post(a_job(), ROUTE, 5)
    finally:
        server.close()
    assert TIMED_OUT.fullmatch(error_of(cut)), cut.outcome.error
    assert elapsed < SANITY_S
    assert after.outcome.kind == "completed"  # on a new connection
    assert server.connections == 2


def test_a_tls_handshake_that_trickles_cannot_hold_a_call_past_its_timeout(
    ca: Authority,
) -> None:
    server = ScriptedServer(tls=ca.server)
    slow = SlowLink(server.port, pause=0.1)  # the server's certificate alone takes minutes
    try:
        with dispatcher_for(
            f"https://localhost:{slow.relay_port}", ssl_context=ca.client
        ) as dispatcher:
            started = time.monotonic()
            delivery = dispatcher.post(a_job(), ROUTE, 1)
            elapsed = time.monotonic() - started
    finally:
        slow.close()
        server.close()
    assert TIMED_OUT.fullmatch(error_of(delivery)), delivery.outcome.error
    assert elapsed < SANITY_S


def test_the_deadline_of_a_finished_call_never_cuts_the_next_call_on_its_connection(
    server: ScriptedServer,
) -> None:
    # The first call (0.3 s timeout) is answered at once; the second, on the same connection,
    # is answered 1.5 s later: well past the first one's deadline.
    server.answers = [OK, Answer(OK.data, delay=1.5)]
    with dispatcher_for(server.url) as dispatcher:
        first = dispatcher.post(a_job(), ROUTE, 0.3)
        second = dispatcher.post(a_job(), ROUTE, 10)
    assert [first.outcome.kind, second.outcome.kind] == ["completed", "completed"]
    assert server.connections == 1


def test_a_call_cut_at_its_deadline_leaves_other_threads_calls_alone(
    server: ScriptedServer,
) -> None:
    server.by_path = {
        b"/trickle": Answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * TRICKLE, piece=6, pause=0.1),
        b"/slow": Answer(OK.data, delay=2),  # answered after the other call's deadline
    }
    results: dict[str, Delivery] = {}
    with dispatcher_for(server.url) as dispatcher:

        def call(function: str, timeout: float) -> None:
            results[function] = dispatcher.post(a_job(), Route(function), timeout)

        threads = [
            threading.Thread(target=call, args=("slow", 10)),
            threading.Thread(target=call, args=("trickle", 1)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results["slow"].outcome.kind == "completed"
    assert results["trickle"].outcome.error is not None
    assert "ReadTimeout: timed out after 1 s" in results["trickle"].outcome.error
