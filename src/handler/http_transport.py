"""A lean httpx2 transport: one keep-alive HTTP/1.1 connection, over a plain socket.

Each dispatch thread has its own client and so its own connection: no pool, no pool lock. The
worker only ever sends small POSTs and keeps at most MAX_BODY_BYTES of an answer, so this reads
the answer's head in one buffer and splits it in one call, where `http.client` would parse
headers through the `email` package: on the 2-core benchmark machine, at 50 requests in flight,
httpx2 over it costs 0.19 ms of CPU per request against 0.44 ms over httpx2's default transport
(bench/results/http_stacks.md), and CPU per request is what bounds a batch at high concurrency.
The httpx API above it is unchanged (timeouts, redirects off, TLS verified with the context
given); errors are raised as the httpx exceptions the default transport raises.

What it accepts of a server: HTTP/1.0 and 1.1 status lines, informational (1xx) answers skipped,
bodies framed by Content-Length, chunked, or the end of the connection. Anything else (a head
over MAX_HEAD_BYTES, a malformed status line, header or chunk, a body cut short) is a
RemoteProtocolError and the connection is dropped.
"""

from __future__ import annotations

import select
import socket
import ssl

import httpx2

# Read at most this much of an answer; a longer one leaves its connection unusable, so it is
# closed (the caller only keeps an excerpt anyway).
MAX_BODY_BYTES = 64 * 1024
# The status line and headers together; h11 and http.client allow about as much.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
_RECV_BYTES = 64 * 1024
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\x00")


class KeepAliveTransport(httpx2.BaseTransport):
    """Not thread-safe: one per thread."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self._conn: _Connection | None = None
        self._origin: tuple[str, str, int | None] | None = None

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout", {})
        message = _request_bytes(request)  # before connecting: a bad header costs no connection
        conn = self._connection(request.url, timeouts.get("connect"))
        try:
            conn.sock.settimeout(timeouts.get("read"))
            conn.sock.sendall(message)
            status, headers, body, keep_alive = conn.read_response()
        except Exception as exc:
            self.close()
            raise _as_httpx_error(exc, request, connecting=False) from exc
        if not keep_alive:
            self.close()
        # stream=: the headers stay as the server sent them, and the body is read once, by the
        # caller, rather than again on construction.
        return httpx2.Response(
            status, headers=headers, stream=httpx2.ByteStream(body), request=request
        )

    def _connection(self, url: httpx2.URL, connect_timeout: float | None) -> _Connection:
        origin = (url.scheme, url.host, url.port)
        if self._conn is not None and (origin != self._origin or self._conn.closed_by_peer()):
            self.close()  # a keep-alive connection the server has closed meanwhile
        if self._conn is None:
            if url.scheme not in ("http", "https"):
                raise httpx2.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}")
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                sock = socket.create_connection((url.host, port), timeout=connect_timeout)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if url.scheme == "https":
                        sock = self._ssl.wrap_socket(sock, server_hostname=url.host)
                except BaseException:
                    sock.close()
                    raise
            except Exception as exc:
                raise _as_httpx_error(exc, None, connecting=True) from exc
            self._conn, self._origin = _Connection(sock), origin
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.sock.close()
            self._conn = None


def _request_bytes(request: httpx2.Request) -> bytes:
    """The whole request, head and body, for one send. httpx2 has already added Host and
    Content-Length; it does not refuse CR or LF in a header, which here would split it."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if any(c in name or c in value for c in _FORBIDDEN_IN_HEADERS) or b":" in name:
            raise httpx2.LocalProtocolError(
                f"Invalid HTTP header {name.decode('latin-1')!r}: it contains a line break, NUL "
                "or colon",
                request=request,
            )
        lines.append(b"%s: %s" % (name, value))
    lines.append(b"\r\n")
    return b"\r\n".join(lines) + request.read()


class _Connection:
    """A socket and the bytes read from it that no answer has consumed yet."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def closed_by_peer(self) -> bool:
        """An idle keep-alive socket that is readable has been closed (or written to) by the
        peer; so has one with bytes left over from the last answer."""
        if self.buf:
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _fill(self) -> bool:
        """Reads what has arrived (waiting for something); False at the end of the stream."""
        data = self.sock.recv(_RECV_BYTES)
        self.buf += data
        return bool(data)

    def read_response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """(status, headers, body up to MAX_BODY_BYTES, whether the connection can be reused)."""
        while True:
            version, status, headers = self._read_head()
            if not 100 <= status < 200:
                break  # 1xx: informational, the real answer follows
        connection = b""
        length: bytes | None = None
        chunked = False
        for name, value in headers:
            key = name.lower()
            if key == b"content-length":
                if length is not None and value != length:
                    raise _ProtocolError("conflicting Content-Length headers")
                length = value
            elif key == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                if not chunked:
                    raise _ProtocolError(f"unsupported Transfer-Encoding {value[:40]!r}")
            elif key == b"connection":
                connection += value.lower()
        keep_alive = version == b"HTTP/1.1" and b"close" not in connection
        if status in (204, 304):
            body, complete = b"", True
        elif chunked:
            body, complete = self._read_chunked()
        elif length is not None:
            body, complete = self._read_length(length)
        else:
            body, complete = self._read_to_end()
        return status, headers, body, keep_alive and complete and not self.buf

    def _read_head(self) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
        buf = self.buf
        start = 0
        while (end := buf.find(b"\r\n\r\n", start)) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _ProtocolError("the answer's headers exceed 64 KiB")
            start = max(0, len(buf) - 3)
            if not self._fill():
                raise _ProtocolError(
                    "the connection closed before an answer"
                    if not buf
                    else "the connection closed in the middle of the answer's headers"
                )
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        parts = lines[0].split(None, 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
        if len(lines) > MAX_HEADERS + 1:
            raise _ProtocolError(f"more than {MAX_HEADERS} headers")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or line[0] in b" \t":
                raise _ProtocolError(f"malformed header line {line[:40]!r}")
            headers.append((name, value.strip(b" \t")))
        return parts[0], int(parts[1]), headers

    def _read_length(self, length: bytes) -> tuple[bytes, bool]:
        if not length.strip().isdigit():
            raise _ProtocolError(f"invalid Content-Length {length[:40]!r}")
        size = int(length)
        wanted = min(size, MAX_BODY_BYTES)
        while len(self.buf) < wanted:
            if not self._fill():
                raise _ProtocolError("the connection closed in the middle of the body")
        return self._take(wanted), size <= MAX_BODY_BYTES

    def _read_chunked(self) -> tuple[bytes, bool]:
        parts: list[bytes] = []
        kept = 0
        while True:
            line = self._read_line()
            size_field = line.split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise _ProtocolError(f"invalid chunk size {line[:40]!r}") from None
            if size == 0:
                while self._read_line():  # trailers, up to the empty line
                    pass
                return b"".join(parts), True
            if kept + size > MAX_BODY_BYTES:
                wanted = MAX_BODY_BYTES - kept
                while len(self.buf) < wanted:
                    if not self._fill():
                        raise _ProtocolError("the connection closed in the middle of the body")
                parts.append(self._take(wanted))
                return b"".join(parts), False
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise _ProtocolError("the connection closed in the middle of the body")
            parts.append(self._take(size))
            kept += size
            if self._take(2) != b"\r\n":
                raise _ProtocolError("a chunk does not end with CRLF")

    def _read_line(self) -> bytes:
        start = 0
        while (end := self.buf.find(b"\r\n", start)) < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                raise _ProtocolError("a chunk line exceeds 64 KiB")
            start = max(0, len(self.buf) - 1)
            if not self._fill():
                raise _ProtocolError("the connection closed in the middle of the body")
        line = self._take(end)
        del self.buf[:2]
        return line

    def _read_to_end(self) -> tuple[bytes, bool]:
        """A body framed by the end of the connection: up to the limit; never reusable."""
        while len(self.buf) < MAX_BODY_BYTES and self._fill():
            pass
        return self._take(min(len(self.buf), MAX_BODY_BYTES)), False

    def _take(self, size: int) -> bytes:
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data


class _ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.x answer we can read."""


def _as_httpx_error(
    exc: Exception, request: httpx2.Request | None, *, connecting: bool
) -> Exception:
    message = str(exc) or type(exc).__name__
    kind: type[httpx2.TransportError]
    if isinstance(exc, TimeoutError | socket.timeout):
        kind = httpx2.ConnectTimeout if connecting else httpx2.ReadTimeout
    elif isinstance(exc, ssl.SSLError | ssl.CertificateError) or connecting:
        kind = httpx2.ConnectError
    elif isinstance(exc, _ProtocolError):
        kind = httpx2.RemoteProtocolError  # not HTTP, cut short, or closed without an answer
    elif isinstance(exc, OSError):
        kind = httpx2.ReadError
    else:
        return exc
    return kind(message, request=request) if request is not None else kind(message)
