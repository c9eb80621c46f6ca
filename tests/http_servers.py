"""Small real servers for the HTTP client's tests: one that answers with bytes written by hand,
and a forward proxy. Both run in threads of the test process, on loopback."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Answer:
    data: bytes
    close: bool = False  # close the connection after writing (whatever the answer said)
    piece: int = 0  # write in pieces of this many bytes (0: all at once)
    pause: float = 0.0  # between pieces: a server that trickles, on purpose
    delay: float = 0.0  # before writing anything


OK = Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def read_head(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """(head, what came after it); None when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@dataclass
class ScriptedServer:
    """Reads each request whole, then writes the next scripted answer verbatim (OK when the
    script has run out). Counts connections; keeps every request, head and body."""

    answers: list[Answer] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    by_path: dict[bytes, Answer] = field(default_factory=dict)  # before the script, every time
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    unfinished: int = 0  # answers the client hung up on before taking them whole

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        host = "localhost" if self.tls else "127.0.0.1"
        self.url = f"{'https' if self.tls else 'http'}://{host}:{self.port}"
        self._closed = threading.Condition()
        self.closed_by_server = 0  # connections this server closed after answering
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        # OSError: the client hung up mid-answer, as some tests make it do on purpose.
        with contextlib.suppress(OSError):
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            with conn:
                if self._answer_all(conn):
                    with self._closed:
                        self.closed_by_server += 1
                        self._closed.notify_all()

    def _answer_all(self, conn: socket.socket) -> bool:
        """True when this server closed the connection after an answer."""
        buf = b""
        while True:
            parts = read_head(conn, buf)
            if parts is None:
                return False
            head, buf = parts
            length = content_length(head)
            while len(buf) < length:
                buf += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + buf[:length])
            buf = buf[length:]
            path = head.split(b" ", 2)[1]
            answer = self.by_path.get(path) or (self.answers.pop(0) if self.answers else OK)
            time.sleep(answer.delay)
            step = answer.piece or len(answer.data) or 1
            try:
                for start in range(0, len(answer.data), step):
                    conn.sendall(answer.data[start : start + step])
                    if answer.pause:
                        time.sleep(answer.pause)
            except OSError:
                self.unfinished += 1
                raise
            if answer.close:
                _end_when_seen(conn)
                return True

    def wait_closed(self, count: int, timeout: float = 10) -> None:
        """Until this server has closed `count` connections after answering."""
        with self._closed:
            assert self._closed.wait_for(lambda: self.closed_by_server >= count, timeout)

    def close(self) -> None:
        self._listener.close()


# Linux's TCP states (tcp_states.h) in which the peer has acknowledged our FIN.
_FIN_ACKNOWLEDGED = {5, 6, 7}  # FIN_WAIT2, TIME_WAIT, CLOSE


def _end_when_seen(conn: socket.socket) -> None:
    """Half-closes a plain connection and returns once the peer's kernel has acknowledged the
    FIN, so the client's socket is readable (at its end) before the test goes on. TCP_INFO's
    first byte is the connection's state; there is no event to wait on instead."""
    if isinstance(conn, ssl.SSLSocket):
        return
    conn.shutdown(socket.SHUT_WR)
    give_up = time.monotonic() + 10
    while conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] not in _FIN_ACKNOWLEDGED:
        assert time.monotonic() < give_up, "the client never acknowledged the FIN"
        time.sleep(0.001)


@dataclass
class ForwardProxy:
    """An HTTP forward proxy: CONNECT tunnels (for https://) and absolute-form requests (for
    http://, rewritten to origin form). Keeps the request line of everything it was asked."""

    asked: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            parts = read_head(client, b"")
            if parts is None:
                return
            head, rest = parts
            line, _, headers = head.partition(b"\r\n")
            self.asked.append(line)
            method, target, version = line.split(b" ")
            if method == b"CONNECT":
                host, _, port = target.rpartition(b":")
                upstream = socket.create_connection((host.decode(), int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                # http://host:port/path -> /path, to host:port
                authority, _, path = target.partition(b"://")[2].partition(b"/")
                host, _, port = authority.rpartition(b":")
                upstream = socket.create_connection((host.decode(), int(port or 80)))
                upstream.sendall(b"%s /%s %s\r\n%s\r\n\r\n" % (method, path, version, headers))
            with upstream:
                if rest:
                    upstream.sendall(rest)
                pump = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
                pump.start()
                _pump(client, upstream)
                pump.join()

    def close(self) -> None:
        self._listener.close()


@dataclass
class SlowLink:
    """A TCP relay to `port` on loopback that passes what the server sends one byte every
    `pause` seconds: a trickling network, under TLS as well as plain HTTP."""

    port: int
    pause: float = 0.1

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.relay_port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._trickle, args=(upstream, client), daemon=True).start()

    def _trickle(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError), source, sink:
            while data := source.recv(65536):
                for byte in data:
                    sink.sendall(bytes([byte]))
                    time.sleep(self.pause)

    def close(self) -> None:
        self._listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
