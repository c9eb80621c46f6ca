"""The keep-alive transport's HTTP/1.1 reading, against a real socket server that answers with
bytes written by hand: framing (Content-Length, chunked, end of connection), informational
answers, connection reuse, and every way an answer can be malformed or cut short."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.dispatch.http_transport import MAX_BODY_BYTES, KeepAliveTransport


@dataclass
class Answer:
    data: bytes
    close: bool = False  # close the connection after writing
    piece: int = 0  # write in pieces of this many bytes (0: all at once)
    pause: float = 0.0  # between pieces


@dataclass
class RawServer:
    """Reads each request whole, then writes the next scripted answer verbatim."""

    answers: list[Answer] = field(default_factory=list)
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/fn"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            # OSError: the client hung up mid-answer, as some tests make it do on purpose.
            with conn, contextlib.suppress(OSError):
                self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(buf) < length:
                buf += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + buf[:length])
            buf = buf[length:]
            answer = self.answers.pop(0)
            step = answer.piece or len(answer.data) or 1
            for start in range(0, len(answer.data), step):
                conn.sendall(answer.data[start : start + step])
                if answer.pause:
                    time.sleep(answer.pause)  # a server that trickles, on purpose
            if answer.close:
                return

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def server() -> Iterator[RawServer]:
    raw = RawServer()
    yield raw
    raw.close()


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(transport=KeepAliveTransport(ssl.create_default_context())) as c:
        yield c


def post(client: httpx2.Client, url: str) -> httpx2.Response:
    return client.post(url, content=b'{"job": 1}', timeout=5)


OK = Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_content_length_answers_reuse_one_connection(
    server: RawServer, client: httpx2.Client
) -> None:
    server.answers = [OK, OK, OK]
    assert [post(client, server.url).text for _ in range(3)] == ["ok"] * 3
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /fn HTTP/1.1\r\n")
    assert server.requests[0].endswith(b'\r\n\r\n{"job": 1}')


def test_a_chunked_answer_with_extensions_and_trailers(
    server: RawServer, client: httpx2.Client
) -> None:
    server.answers = [
        Answer(
            b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
        ),
        OK,
    ]
    response = post(client, server.url)
    assert (response.status_code, response.text) == (500, "hello world")
    assert post(client, server.url).text == "ok"
    assert server.connections == 1


def test_informational_answers_are_skipped(server: RawServer, client: httpx2.Client) -> None:
    server.answers = [
        Answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        )
    ]
    assert post(client, server.url).status_code == 202


def test_no_content_has_no_body_and_keeps_the_connection(
    server: RawServer, client: httpx2.Client
) -> None:
    server.answers = [Answer(b"HTTP/1.1 204 No Content\r\n\r\n"), OK]
    assert post(client, server.url).content == b""
    assert post(client, server.url).text == "ok"
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        Answer(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", close=True),
        Answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", close=True),
        Answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 13\r\n\r\nuntil the end"),
    ],
    ids=["http-1.0", "close-without-length", "close-with-length"],
)
def test_an_answer_that_ends_its_connection_is_read_and_the_next_call_reconnects(
    server: RawServer, client: httpx2.Client, answer: Answer
) -> None:
    server.answers = [answer, OK]
    assert post(client, server.url).text == "until the end"
    assert post(client, server.url).text == "ok"
    assert server.connections == 2


def test_bytes_after_the_answer_make_the_connection_unusable(
    server: RawServer, client: httpx2.Client
) -> None:
    server.answers = [Answer(OK.data + b"HTTP/1.1 200 OK\r\n"), OK]
    assert post(client, server.url).text == "ok"
    assert post(client, server.url).text == "ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(b"", close=True), "closed before an answer"),
        (Answer(b"SSH-2.0-OpenSSH\r\n\r\n", close=True), "not an HTTP/1.x status line"),
        (Answer(b"HTTP/2 200\r\n\r\n", close=True), "not an HTTP/1.x status line"),
        (Answer(b"HTTP/1.1 2000 OK\r\n\r\n", close=True), "not an HTTP/1.x status line"),
        (Answer(b"HTTP/1.1 200 OK\r\nContent-Len", close=True), "middle of the answer's headers"),
        (
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", close=True),
            "middle of the body",
        ),
        (
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
            "conflicting Content-Length",
        ),
        (Answer(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"), "invalid Content-Length"),
        (Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"), "Transfer-Encoding"),
        (Answer(b"HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n"), "malformed header line"),
        (Answer(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"), "malformed header line"),
        (Answer(b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n"), "malformed header line"),
        (
            Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", close=True),
            "invalid chunk size",
        ),
        (
            Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n"),
            "does not end with CRLF",
        ),
        (
            Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nok", close=True),
            "middle of the body",
        ),
        (
            Answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n"),
            "more than 100 headers",
        ),
        (Answer(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000, close=True), "exceed 64 KiB"),
        (Answer(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100_000 + b"\r\n\r\n"), "exceed 64 KiB"),
        (Answer(b"HTTP/1.1 099 Early\r\n\r\n"), "not an HTTP/1.x status line"),
        (Answer(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), "101 Switching Protocols"),
        (Answer(b"HTTP/1.1 100 Continue\r\n\r\n" * 11), "more than 10 informational"),
        (Answer(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"), "LF alone"),
        (Answer(b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 2\r\n\r\nok"), "malformed header"),
        (
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"),
            "invalid Content-Length",
        ),
        (
            Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
            "Transfer-Encoding",
        ),
        (
            Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "Transfer-Encoding",
        ),
        (
            Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
                + (b"X-Trailer: " + b"t" * 1000 + b"\r\n") * 70
            ),
            "trailers exceed 64 KiB",
        ),
        *[
            (
                Answer(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\n" % size,
                    close=True,
                ),
                "invalid chunk size",
            )
            for size in (b"-ffffffff", b"0x10", b"1_0", b"+5", b"")
        ],
    ],
)
def test_a_malformed_or_cut_answer_is_a_protocol_error_and_the_connection_is_dropped(
    server: RawServer, client: httpx2.Client, answer: Answer, message: str
) -> None:
    server.answers = [answer, OK]
    with pytest.raises(httpx2.RemoteProtocolError, match=message):
        post(client, server.url)
    assert post(client, server.url).text == "ok"
    assert server.connections == 2


@pytest.mark.parametrize("framing", ["length", "chunked", "end"])
def test_a_body_past_the_limit_is_cut_there_and_its_connection_dropped(
    server: RawServer, client: httpx2.Client, framing: str
) -> None:
    body = b"x" * (MAX_BODY_BYTES * 2)
    if framing == "length":
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    elif framing == "chunked":
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (1000, body[i : i + 1000]) for i in range(0, len(body), 1000)
        )
    else:
        data = b"HTTP/1.0 200 OK\r\n\r\n" + body
    server.answers = [Answer(data, close=True), OK]
    assert len(post(client, server.url).content) == MAX_BODY_BYTES
    assert post(client, server.url).text == "ok"
    assert server.connections == 2


def test_both_framings_at_once_read_as_chunked_and_the_connection_is_not_reused(
    server: RawServer, client: httpx2.Client
) -> None:
    server.answers = [
        Answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        ),
        OK,
    ]
    assert post(client, server.url).text == "ok"
    assert post(client, server.url).text == "ok"
    assert server.connections == 2


def test_a_streamed_request_body_is_refused(server: RawServer, client: httpx2.Client) -> None:
    with pytest.raises(httpx2.LocalProtocolError, match="Streamed request bodies"):
        client.post(server.url, content=iter([b"{}"]))
    assert server.connections == 0


def test_the_read_timeout_bounds_the_whole_answer_not_each_read(
    server: RawServer, client: httpx2.Client
) -> None:
    # A byte every 20 ms never lets one read wait 0.3 s; the call still ends at its timeout.
    server.answers = [Answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10_000, piece=1, pause=0.02)]
    with pytest.raises(httpx2.ReadTimeout):
        client.post(server.url, content=b"{}", timeout=0.3)


def test_a_header_that_would_split_the_request_is_refused_before_connecting(
    server: RawServer, client: httpx2.Client
) -> None:
    with pytest.raises(httpx2.LocalProtocolError, match="Invalid HTTP header 'Authorization'"):
        client.post(server.url, content=b"{}", headers={"Authorization": "Bearer k\r\nX-Evil: 1"})
    assert server.connections == 0


def test_a_server_that_does_not_answer_in_time_is_a_read_timeout(
    server: RawServer, client: httpx2.Client
) -> None:
    server.answers = [Answer(b"HTTP/1.1 200 OK\r\n")]  # never finishes its headers
    with pytest.raises(httpx2.ReadTimeout):
        client.post(server.url, content=b"{}", timeout=0.2)


def test_a_refused_connection_is_a_connect_error(client: httpx2.Client) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    with pytest.raises(httpx2.ConnectError):
        client.post(f"http://127.0.0.1:{port}/fn", content=b"{}", timeout=5)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    piece=st.integers(min_value=1, max_value=40),
    chunked=st.booleans(),
    body=st.binary(max_size=300),
)
def test_an_answer_arriving_in_pieces_of_any_size_reads_the_same(
    server: RawServer, client: httpx2.Client, piece: int, chunked: bool, body: bytes
) -> None:
    if chunked:
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
                for i in range(0, len(body), 7)
            )
            + b"0\r\n\r\n"
        )
    else:
        data = b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    server.answers = [Answer(data, piece=piece)]
    response = post(client, server.url)
    assert response.content == body
    assert response.headers.get("x-a") == (None if chunked else "b")
