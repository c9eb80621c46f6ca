"""The stand-in for the HTTP functions: a real server in its own process, real sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import httpx
import pytest

from handler.local.standin import FunctionStats, ReceivedRequest, StandIn

TIMEOUT_S = 10.0
# Only for "never answers" checks: how long we listen for an answer that must not come.
SILENCE_S = 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[StandIn]:
    with StandIn() as standin:
        yield standin


@pytest.fixture
def standin(server: StandIn) -> StandIn:
    server.reset()
    return server


def job(job_id: str = "job-1", **payload: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "tenant_id": "tenant-a",
        "job_type": "resize",
        "attempt": 1,
        "payload": payload,
    }


def job_headers(job_id: str = "job-1") -> dict[str, str]:
    return {
        "Authorization": "Bearer secret-key",
        "Content-Type": "application/json",
        "Idempotency-Key": job_id,
    }


def post(
    standin: StandIn,
    function: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT_S,
) -> tuple[int, dict[str, str], bytes]:
    """One POST on a fresh connection: (status, lower-cased headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", f"/{function}", body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw_exchange(standin: StandIn, request: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", standin.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def control(standin: StandIn, path: str) -> tuple[int, Any]:
    """GET a control document on a fresh connection: (status, parsed JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", f"/__standin/{path}")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_post(function: str, body: dict[str, Any], extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /{function} HTTP/1.1\r\nHost: functions\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {body['job_id']}\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
    )
    return head.encode() + data


# -- defaults and recording ------------------------------------------------------------------


def test_default_answer_is_200_ok_and_the_request_is_recorded(standin: StandIn) -> None:
    status, headers, body = post(standin, "resize", job(size=3), job_headers())

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"ok": True}
    [received] = standin.requests()
    assert received.method == "POST"
    assert received.path == "/resize"
    assert received.function == "resize"
    assert received.body == job(size=3)
    assert received.headers["authorization"] == "Bearer secret-key"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["idempotency-key"] == "job-1"
    assert all(name == name.lower() for name in received.headers)


def test_base_url_points_at_the_server(standin: StandIn) -> None:
    assert standin.base_url == f"http://127.0.0.1:{standin.port}"
    response = httpx.post(
        f"{standin.base_url}/resize", json=job(), headers=job_headers(), timeout=TIMEOUT_S
    )
    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_requests_come_back_in_order_and_reset_forgets_them(standin: StandIn) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        for n in range(20):
            body = json.dumps(job(f"job-{n}", n=n)).encode()
            connection.request("POST", f"/fn-{n % 3}", body=body, headers=job_headers(f"job-{n}"))
            response = connection.getresponse()
            response.read()
            assert response.status == 200
    finally:
        connection.close()

    received = standin.requests()
    assert [r.body["payload"]["n"] for r in received] == list(range(20))
    assert [r.path for r in received] == [f"/fn-{n % 3}" for n in range(20)]

    standin.reset()
    assert standin.requests() == []
    post(standin, "after", job())
    assert [r.path for r in standin.requests()] == ["/after"]


def test_control_requests_are_not_recorded(standin: StandIn) -> None:
    standin.configure_default({"status": 200})
    standin.requests()
    assert standin.requests() == []


def test_bodies_that_are_not_json_are_recorded_as_text(standin: StandIn) -> None:
    post(standin, "text", b"plain words, not JSON")
    post(standin, "empty", b"")

    text, empty = standin.requests()
    assert text.body == "plain words, not JSON"
    assert empty.body == ""
    assert isinstance(text, ReceivedRequest)


def test_keep_alive_serves_many_requests_on_one_connection(standin: StandIn) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", "/one", body=b"{}")
        connection.getresponse().read()
        first_socket = connection.sock
        for _ in range(5):
            connection.request("POST", "/one", body=b"{}")
            assert connection.getresponse().read() == b'{"ok": true}'
        assert connection.sock is first_socket  # never reconnected
    finally:
        connection.close()


def test_connection_close_is_honoured(standin: StandIn) -> None:
    answer = raw_exchange(standin, raw_post("fn", job(), extra="Connection: close\r\n"))

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b'{"ok": true}')  # and then the server closed: we read to EOF


def test_many_concurrent_clients(standin: StandIn) -> None:
    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{standin.base_url}/fan-out",
                        json=job(f"job-{n}"),
                        headers=job_headers(f"job-{n}"),
                    )
                    for n in range(200)
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * 200
    keys = {r.headers["idempotency-key"] for r in standin.requests()}
    assert keys == {f"job-{n}" for n in range(200)}


def test_pipelined_requests_are_answered_in_order(standin: StandIn) -> None:
    requests = raw_post("first", job("job-1")) + raw_post(
        "second", job("job-2"), extra="Connection: close\r\n"
    )

    answer = raw_exchange(standin, requests)  # both at once, before any answer

    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert [r.path for r in standin.requests()] == ["/first", "/second"]


def test_head_gets_the_headers_of_a_post_and_no_body(standin: StandIn) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        connection.request("HEAD", "/fn")
        response = connection.getresponse()
        assert response.read() == b""
        connection.request("POST", "/fn", body=b"{}")  # the connection is still in step
        assert connection.getresponse().read() == b'{"ok": true}'
    finally:
        connection.close()
    assert response.status == 200
    assert response.getheader("content-length") == str(len(b'{"ok": true}'))


def test_chunked_request_body_is_recorded_whole(standin: StandIn) -> None:
    data = json.dumps(job(n=7)).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (data[:5], data[5:]))
    request = (
        b"POST /chunked HTTP/1.1\r\nHost: functions\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
    )

    answer = raw_exchange(standin, request)

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    [received] = standin.requests()
    assert received.body == job(n=7)


def test_expect_100_continue_gets_a_100_before_the_body(standin: StandIn) -> None:
    data = json.dumps(job()).encode()
    head = (
        f"POST /careful HTTP/1.1\r\nHost: functions\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", standin.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head)
        interim = sock.recv(65536)  # the server asks for the body before it is sent
        sock.sendall(data)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk

    assert interim.startswith(b"HTTP/1.1 100 ")
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [r.body for r in standin.requests()] == [job()]


def test_a_client_gone_mid_request_gets_no_answer_and_breaks_nothing(standin: StandIn) -> None:
    partial = raw_post("fn", job())[:-5]  # the body is 5 bytes short
    with socket.create_connection(("127.0.0.1", standin.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(partial)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536) == b""  # closed, nothing said

    assert post(standin, "fn", job())[0] == 200
    assert [r.path for r in standin.requests()] == ["/fn"]  # the torn request was never one


# -- behaviours ------------------------------------------------------------------------------


def test_simulate_status_body_and_headers(standin: StandIn) -> None:
    simulate = {"status": 429, "body": {"error": "slow down"}, "headers": {"Retry-After": "5"}}
    status, headers, body = post(standin, "fn", job(simulate=simulate), job_headers())

    assert status == 429
    assert headers["retry-after"] == "5"
    assert json.loads(body) == {"error": "slow down"}


def test_error_status_without_body_gets_an_error_document(standin: StandIn) -> None:
    status, _, body = post(standin, "fn", job(simulate={"status": 500}))

    assert status == 500
    assert json.loads(body) == {"error": "simulated 500"}


def test_string_body_is_sent_as_text(standin: StandIn) -> None:
    status, headers, body = post(standin, "fn", job(simulate={"status": 502, "body": "<html>"}))

    assert status == 502
    assert headers["content-type"].startswith("text/plain")
    assert body == b"<html>"


def test_content_type_can_be_overridden(standin: StandIn) -> None:
    simulate = {"body": "<p>hi</p>", "headers": {"Content-Type": "text/html"}}
    _, headers, body = post(standin, "fn", job(simulate=simulate))

    assert headers["content-type"] == "text/html"
    assert body == b"<p>hi</p>"


def test_no_content_has_no_body(standin: StandIn) -> None:
    status, headers, body = post(standin, "fn", job(simulate={"status": 204}))

    assert status == 204
    assert body == b""
    assert "content-length" not in headers


def test_configure_applies_to_one_function_only(standin: StandIn) -> None:
    standin.configure("broken", {"status": 503})

    assert post(standin, "broken", job())[0] == 503
    assert post(standin, "healthy", job())[0] == 200


def test_precedence_simulate_then_function_then_default(standin: StandIn) -> None:
    standin.configure_default({"status": 404})
    standin.configure("special", {"status": 500})

    assert post(standin, "special", job(simulate={"status": 201}))[0] == 201
    assert post(standin, "special", job())[0] == 500
    assert post(standin, "other", job())[0] == 404
    assert post(standin, "other", job(simulate={"status": 202}))[0] == 202


def test_configure_none_clears(standin: StandIn) -> None:
    standin.configure_default({"status": 404})
    standin.configure("fn", {"status": 500})

    standin.configure("fn", None)
    assert post(standin, "fn", job())[0] == 404
    standin.configure_default(None)
    assert post(standin, "fn", job())[0] == 200


def test_reset_forgets_configuration(standin: StandIn) -> None:
    standin.configure_default({"status": 404})
    standin.configure("fn", {"status": 500})

    standin.reset()

    assert post(standin, "fn", job())[0] == 200
    assert post(standin, "other", job())[0] == 200


def test_fail_times_fails_n_times_per_idempotency_key_then_succeeds(standin: StandIn) -> None:
    simulate = {"status": 503, "headers": {"Retry-After": "1"}, "fail_times": 2}

    def attempt(job_id: str) -> int:
        return post(standin, "fn", job(job_id, simulate=simulate), job_headers(job_id))[0]

    assert [attempt("job-a"), attempt("job-a")] == [503, 503]
    assert attempt("job-b") == 503  # counted per key
    assert [attempt("job-a"), attempt("job-a")] == [200, 200]
    assert [attempt("job-b"), attempt("job-b")] == [503, 200]


def test_fail_times_from_configuration(standin: StandIn) -> None:
    standin.configure("flaky", {"status": 500, "fail_times": 1})

    statuses = [post(standin, "flaky", job(), job_headers("job-x"))[0] for _ in range(3)]

    assert statuses == [500, 200, 200]


def test_fail_times_zero_always_succeeds(standin: StandIn) -> None:
    assert post(standin, "fn", job(simulate={"status": 500, "fail_times": 0}))[0] == 200


def test_reset_restarts_fail_times_counters(standin: StandIn) -> None:
    standin.configure("flaky", {"status": 500, "fail_times": 1})
    assert post(standin, "flaky", job(), job_headers("job-x"))[0] == 500

    standin.reset()
    standin.configure("flaky", {"status": 500, "fail_times": 1})

    assert post(standin, "flaky", job(), job_headers("job-x"))[0] == 500


def test_close_closes_without_answering(standin: StandIn) -> None:
    assert raw_exchange(standin, raw_post("fn", job(simulate={"close": True}))) == b""

    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{standin.base_url}/fn", json=job(simulate={"close": True}), timeout=TIMEOUT_S)


def test_garbage_is_not_http(standin: StandIn) -> None:
    answer = raw_exchange(standin, raw_post("fn", job(simulate={"garbage": True})))

    assert answer  # something came back, then the server closed
    assert not answer.startswith(b"HTTP/")

    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(
            f"{standin.base_url}/fn", json=job(simulate={"garbage": True}), timeout=TIMEOUT_S
        )


def test_hang_never_answers_and_keeps_the_connection_open(standin: StandIn) -> None:
    with socket.create_connection(("127.0.0.1", standin.port), timeout=SILENCE_S) as sock:
        sock.sendall(raw_post("stuck", job(simulate={"hang": True})))
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # not EOF: the server keeps the socket open
            sock.recv(1)

    # The hanging connection blocks nothing else, and the request was recorded.
    assert post(standin, "fine", job())[0] == 200
    assert [r.path for r in standin.requests()] == ["/stuck", "/fine"]


def test_hang_with_a_client_timeout(standin: StandIn) -> None:
    standin.configure("stuck", {"hang": True})

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{standin.base_url}/stuck", json=job(), timeout=SILENCE_S)


def test_delay_ms_in_a_behaviour_delays_the_answer(standin: StandIn) -> None:
    with pytest.raises(TimeoutError):
        post(standin, "slow", job(simulate={"delay_ms": 600_000}), timeout=SILENCE_S)
    assert post(standin, "fast", job(simulate={"delay_ms": 0}))[0] == 200


def test_behaviour_delay_overrides_the_server_delay() -> None:
    with StandIn(delay_ms=600_000) as slow:
        with pytest.raises(TimeoutError):
            post(slow, "fn", job(), timeout=SILENCE_S)

        assert post(slow, "fn", job(simulate={"delay_ms": 0}))[0] == 200
        slow.configure_default({"delay_ms": 0})
        assert post(slow, "fn", job())[0] == 200


# -- waiting for requests and holding answers ----------------------------------------------


def test_wait_for_requests_blocks_until_the_count_arrives(standin: StandIn) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(standin.wait_for_requests, 3, TIMEOUT_S)
        for n in range(2):
            assert post(standin, "fn", job(f"job-{n}"), job_headers(f"job-{n}"))[0] == 200
        with pytest.raises(FutureTimeoutError):  # two of three: still waiting
            waiting.result(timeout=SILENCE_S)
        post(standin, "fn", job("job-2"), job_headers("job-2"))
        received = waiting.result(timeout=TIMEOUT_S)

    assert [r.headers["idempotency-key"] for r in received] == ["job-0", "job-1", "job-2"]
    assert all(isinstance(r, ReceivedRequest) for r in received)


def test_wait_for_requests_already_received_returns_them(standin: StandIn) -> None:
    post(standin, "a", job())
    post(standin, "b", job())

    assert [r.function for r in standin.wait_for_requests(2)] == ["a", "b"]
    assert [r.function for r in standin.wait_for_requests(0)] == ["a", "b"]
    assert [r.function for r in standin.requests()] == ["a", "b"]  # waits are not recorded


def test_wait_for_requests_times_out_with_408(standin: StandIn) -> None:
    post(standin, "fn", job())

    with pytest.raises(TimeoutError, match="1 of 2 requests"):
        standin.wait_for_requests(2, timeout=SILENCE_S)

    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/__standin/wait?count=5&timeout=0.1")
        response = connection.getresponse()
        document = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 408
    assert document["received"] == 1


def test_wait_for_requests_counts_since_the_last_reset(standin: StandIn) -> None:
    post(standin, "fn", job())
    post(standin, "fn", job())
    standin.reset()

    with pytest.raises(TimeoutError, match="0 of 1 requests"):
        standin.wait_for_requests(1, timeout=SILENCE_S)
    post(standin, "after", job())
    assert [r.function for r in standin.wait_for_requests(1)] == ["after"]


@pytest.mark.parametrize(
    "query", ["count=x", "count=-1", "count=1&timeout=0", "count=1&timeout=nan", "timeout=inf"]
)
def test_wait_with_bad_parameters_is_400(standin: StandIn, query: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", f"/__standin/wait?{query}")
        response = connection.getresponse()
        document = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400
    assert "count" in document["error"]


def test_hold_answers_only_once_released(standin: StandIn) -> None:
    standin.configure("held", {"hold": True, "status": 503})

    with ThreadPoolExecutor(max_workers=2) as pool:
        calls = [pool.submit(post, standin, "held", job(f"job-{n}")) for n in range(2)]
        standin.wait_for_requests(2)  # both arrived, neither answered
        for call in calls:
            with pytest.raises(FutureTimeoutError):
                call.result(timeout=SILENCE_S)
        assert post(standin, "free", job())[0] == 200  # holding blocks nothing else
        standin.release()
        statuses = [call.result(timeout=TIMEOUT_S)[0] for call in calls]

    assert statuses == [503, 503]  # then answered as the rest of the behaviour says
    assert post(standin, "held", job())[0] == 503  # released until the next reset


def test_reset_releases_held_calls_and_holds_again(standin: StandIn) -> None:
    standin.configure("held", {"hold": True})
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(post, standin, "held", job())
        standin.wait_for_requests(1)
        standin.reset()
        assert call.result(timeout=TIMEOUT_S)[0] == 200

    standin.configure("held", {"hold": True})
    with pytest.raises(TimeoutError):
        post(standin, "held", job(), timeout=SILENCE_S)
    standin.release()


def test_hold_must_be_a_boolean(standin: StandIn) -> None:
    with pytest.raises(ValueError, match="hold must be true or false"):
        standin.configure("fn", {"hold": 1})


# -- flow control: requests in flight, when they came and went -------------------------------


def test_max_in_flight_answers_429_beyond_the_limit(standin: StandIn) -> None:
    standin.configure(
        "limited",
        {"max_in_flight": 2, "hold": True, "status": 202, "headers": {"Retry-After": "7"}},
    )

    with ThreadPoolExecutor(max_workers=2) as pool:
        calls = [pool.submit(post, standin, "limited", job(f"job-{n}")) for n in range(2)]
        standin.wait_for_requests(2)  # two in flight, held
        status, headers, body = post(standin, "limited", job("job-3"))  # the third: refused
        assert post(standin, "other", job())[0] == 200  # other functions have their own count
        standin.release()
        answered = [call.result(timeout=TIMEOUT_S) for call in calls]

    assert status == 429
    assert headers["retry-after"] == "7"
    assert "more than 2 requests in flight" in json.loads(body)["error"]
    assert [a[0] for a in answered] == [202, 202]  # within the limit: the rest of the behaviour
    assert [a[1]["retry-after"] for a in answered] == ["7", "7"]
    assert post(standin, "limited", job("job-4"))[0] == 202  # back within the limit


def test_max_in_flight_counts_this_request(standin: StandIn) -> None:
    standin.configure("single", {"max_in_flight": 1, "hold": True})

    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(post, standin, "single", job("job-1"))
        standin.wait_for_requests(1)
        refused = post(standin, "single", job("job-2"))[0]
        standin.release()
        first = held.result(timeout=TIMEOUT_S)[0]

    assert (first, refused) == (200, 429)
    assert post(standin, "single", job("job-3"))[0] == 200  # alone in flight: within the limit


def test_max_in_flight_from_simulate(standin: StandIn) -> None:
    simulate = {"max_in_flight": 1, "status": 201}

    assert post(standin, "fn", job(simulate=simulate))[0] == 201


def test_requests_carry_when_they_were_received_and_answered(standin: StandIn) -> None:
    before = time.time()
    post(standin, "fn", job())
    after = time.time()

    [received] = standin.requests()
    assert isinstance(received.received_at, float)
    assert isinstance(received.answered_at, float)
    assert before <= received.received_at <= received.answered_at <= after


def test_answered_at_is_after_the_delay(standin: StandIn) -> None:
    post(standin, "slow", job(simulate={"delay_ms": 200}))

    [received] = standin.requests()
    assert received.answered_at is not None
    assert received.answered_at - received.received_at >= 0.2


def test_answered_at_is_none_until_answered_and_for_hang(standin: StandIn) -> None:
    standin.configure("held", {"hold": True})
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(post, standin, "held", job())
        [pending] = standin.wait_for_requests(1)
        standin.release()
        call.result(timeout=TIMEOUT_S)
    [answered] = standin.requests()

    assert pending.answered_at is None
    assert answered.answered_at is not None
    assert answered.answered_at >= answered.received_at

    standin.reset()
    with socket.create_connection(("127.0.0.1", standin.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(raw_post("stuck", job(simulate={"hang": True})))
        [hanging] = standin.wait_for_requests(1)
    assert hanging.answered_at is None


def test_close_and_garbage_count_as_answered(standin: StandIn) -> None:
    raw_exchange(standin, raw_post("fn", job(simulate={"close": True})))
    raw_exchange(standin, raw_post("fn", job(simulate={"garbage": True})))

    closed, garbage = standin.requests()
    assert closed.answered_at is not None
    assert garbage.answered_at is not None


def test_stats_count_requests_and_in_flight_per_function(standin: StandIn) -> None:
    standin.configure("held", {"hold": True})
    for _ in range(3):
        post(standin, "quick", job())

    with ThreadPoolExecutor(max_workers=3) as pool:
        calls = [pool.submit(post, standin, "held", job(f"job-{n}")) for n in range(3)]
        standin.wait_for_requests(6)
        during = standin.stats()
        standin.release()
        for call in calls:
            call.result(timeout=TIMEOUT_S)
    after = standin.stats()

    assert during["held"] == FunctionStats(requests=3, in_flight=3, peak_in_flight=3)
    assert during["quick"] == FunctionStats(requests=3, in_flight=0, peak_in_flight=1)
    assert after["held"] == FunctionStats(requests=3, in_flight=0, peak_in_flight=3)


def test_stats_peak_counts_requests_refused_by_max_in_flight(standin: StandIn) -> None:
    standin.configure("limited", {"max_in_flight": 1, "hold": True})
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(post, standin, "limited", job())
        standin.wait_for_requests(1)
        assert post(standin, "limited", job())[0] == 429
        standin.release()
        held.result(timeout=TIMEOUT_S)

    # The client had two in flight at once: that is what the peak tells.
    assert standin.stats()["limited"] == FunctionStats(requests=2, in_flight=0, peak_in_flight=2)


def test_stats_document_and_reset(standin: StandIn) -> None:
    post(standin, "counted", job())
    status, document = control(standin, "stats")
    assert status == 200
    assert document["functions"]["counted"] == {"requests": 1, "in_flight": 0, "peak_in_flight": 1}

    with socket.create_connection(("127.0.0.1", standin.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(raw_post("stuck", job(simulate={"hang": True})))
        standin.wait_for_requests(2)
        standin.reset()
        stats = standin.stats()

    # Forgotten, except the call still in flight: it is still there.
    assert "counted" not in stats
    assert stats["stuck"] == FunctionStats(requests=0, in_flight=1, peak_in_flight=1)


def test_control_requests_are_not_counted(standin: StandIn) -> None:
    standin.requests()
    standin.configure_default(None)
    standin.wait_for_requests(0)

    # Only calls of earlier tests that are still in flight (delayed past their client) remain.
    assert all(s.requests == 0 and s.in_flight > 0 for s in standin.stats().values())


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        {"stauts": 500},
        {"status": "500"},
        {"status": 99},
        {"status": True},
        {"headers": ["Retry-After", "5"]},
        {"headers": {"Content-Length": "3"}},
        {"headers": {"X-Evil": "a\r\nb"}},
        {"delay_ms": -1},
        {"hang": "yes"},
        {"hang": True, "close": True},
        {"fail_times": -1},
        {"fail_times": 1.5},
        {"max_in_flight": 0},
        {"max_in_flight": True},
        {"max_in_flight": 2.5},
        {"headers": {"X-Name": "caf\u00e9"}},
        {"headers": {"Bad Name": "1"}},
    ],
)
def test_invalid_behaviours_are_rejected(standin: StandIn, behaviour: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="stand-in"):
        standin.configure("fn", behaviour)
    with pytest.raises(ValueError, match="stand-in"):
        standin.configure_default(behaviour)


def test_invalid_simulate_is_answered_with_400(standin: StandIn) -> None:
    status, _, body = post(standin, "fn", job(simulate={"stauts": 500}))

    assert status == 400
    assert "stauts" in json.loads(body)["error"]


def test_unknown_control_path_is_404(standin: StandIn) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/__standin/nope")
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 404


def test_malformed_request_gets_400(standin: StandIn) -> None:
    answer = raw_exchange(standin, b"NONSENSE\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 ")


# -- lifecycle -------------------------------------------------------------------------------


def test_stop_ends_the_process_and_is_idempotent() -> None:
    standin = StandIn()
    with standin:
        pid = standin.pid
        assert post(standin, "fn", job())[0] == 200
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    standin.stop()
    with pytest.raises(RuntimeError):
        _ = standin.base_url


def test_stop_with_a_hanging_connection_open() -> None:
    with StandIn() as standin, socket.create_connection(("127.0.0.1", standin.port)) as sock:
        # One ordinary exchange first, so the server certainly holds this connection.
        sock.sendall(raw_post("fine", job()))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        sock.sendall(raw_post("stuck", job(simulate={"hang": True})))
        pid = standin.pid
        standin.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_command_line_runs_in_the_foreground() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "handler.local.standin", "--port", "0", "--delay-ms", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match[1])
        response = httpx.post(f"http://127.0.0.1:{port}/fn", json=job(), timeout=TIMEOUT_S)
        assert response.json() == {"ok": True}
    finally:
        process.terminate()
        returncode = process.wait(TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()
    assert returncode == 0  # SIGTERM is a clean shutdown
