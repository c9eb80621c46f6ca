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

import re
import select
import socket
import ssl
import time

import httpx2

# Read at most this much of an answer; a longer one leaves its connection unusable, so it is
# closed (the caller only keeps an excerpt anyway).
MAX_BODY_BYTES = 64 * 1024
# The status line and headers together; h11 and http.client allow about as much.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_INFORMATIONAL = 10  # 1xx answers skipped before the real one
_RECV_BYTES = 64 * 1024
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\x00")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_LENGTH_DIGITS = 18


class KeepAliveTransport(httpx2.BaseTransport):
    """Not thread-safe: one per thread."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self._conn: _Connection | None = None
        self._origin: tuple[str, str, int | None] | None = None

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout", {})
        message = _request_bytes(request)  # before connecting: a bad header costs no connection
        conn = self._connection(request, timeouts.get("connect"))
        writing = True
        try:
            conn.sock.settimeout(timeouts.get("write"))
            conn.sock.sendall(message)
            writing = False
            # The read timeout bounds the whole answer, not each read: a server that trickles
            # bytes cannot hold a call past the time budget the caller gave it.
            read_timeout = timeouts.get("read")
            if read_timeout is None:
                conn.sock.settimeout(None)
                conn.deadline = None
            else:
                conn.deadline = time.monotonic() + read_timeout
            status, headers, body, keep_alive = conn.read_response()
        except Exception as exc:
            self.close()
            raise _as_httpx_error(exc, request, writing=writing) from exc
        if not keep_alive:
            self.close()
        # stream=: the headers stay as the server sent them, and the body is read once, by the
        # caller, rather than again on construction.
        return httpx2.Response(
            status, headers=headers, stream=httpx2.ByteStream(body), request=request
        )

    def _connection(self, request: httpx2.Request, connect_timeout: float | None) -> _Connection:
        url = request.url
        # raw_host: the name as httpx2 wrote it in the Host header (IDNA 2008), to connect to
        # and to check the certificate against.
        host = url.raw_host.decode("ascii")
        origin = (url.scheme, host, url.port)
        if self._conn is not None and (origin != self._origin or self._conn.closed_by_peer()):
            self.close()  # a keep-alive connection the server has closed meanwhile
        if self._conn is None:
            if url.scheme not in ("http", "https"):
                raise httpx2.UnsupportedProtocol(
                    f"Unsupported URL scheme {url.scheme!r}", request=request
                )
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                sock = socket.create_connection((host, port), timeout=connect_timeout)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if url.scheme == "https":
                        sock = self._ssl.wrap_socket(sock, server_hostname=host)
                except BaseException:
                    sock.close()
                    raise
            except Exception as exc:
                raise _as_httpx_error(exc, request, connecting=True) from exc
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
    if "Transfer-Encoding" in request.headers:
        # Only whole bodies are written, framed by Content-Length; a streamed one would not be.
        raise httpx2.LocalProtocolError(
            "Streamed request bodies are not supported", request=request
        )
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

    __slots__ = ("_idle", "buf", "deadline", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.deadline: float | None = None  # time.monotonic() by which the answer must be in
        self._idle = select.poll()
        self._idle.register(sock, select.POLLIN)

    def closed_by_peer(self) -> bool:
        """An idle keep-alive socket that is readable has been closed (or written to) by the
        peer; so has one with bytes left over from the last answer. poll, not select: select
        cannot watch a descriptor numbered 1024 or above."""
        if self.buf:
            return True
        try:
            return bool(self._idle.poll(0))
        except (OSError, ValueError):
            return True  # cannot tell: a new connection is the safe choice

    def _fill(self) -> bool:
        """Reads what has arrived (waiting for something, up to the deadline); False at the
        end of the stream."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the answer did not arrive within the read timeout")
            self.sock.settimeout(left)
        data = self.sock.recv(_RECV_BYTES)
        self.buf += data
        return bool(data)

    def read_response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """(status, headers, body up to MAX_BODY_BYTES, whether the connection can be reused)."""
        for _ in range(MAX_INFORMATIONAL + 1):
            version, status, headers = self._read_head()
            if status == 101:
                raise _ProtocolError("101 Switching Protocols, which was not asked for")
            if not 100 <= status < 200:
                break  # 1xx: informational, the real answer follows
        else:
            raise _ProtocolError(f"more than {MAX_INFORMATIONAL} informational (1xx) answers")
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
                # Only "chunked" alone: a body also gzip-ed in transit would reach the caller
                # still encoded (Content-Encoding, which httpx2 decodes, is another matter).
                if chunked or value.strip().lower() != b"chunked":
                    raise _ProtocolError(f"unsupported Transfer-Encoding {value[:40]!r}")
                chunked = True
            elif key == b"connection":
                connection += value.lower()
        # Both framings at once is how response smuggling looks: chunked wins (RFC 9112 6.3),
        # and the connection is not trusted afterwards.
        keep_alive = (
            version == b"HTTP/1.1"
            and b"close" not in connection
            and not (chunked and length is not None)
        )
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
            if buf.find(b"\n\n") >= 0:
                raise _ProtocolError("the answer's lines end in LF alone, not CRLF")
            start = max(0, len(buf) - 3)
            if not self._fill():
                raise _ProtocolError(
                    "the connection closed before an answer"
                    if not buf
                    else "the connection closed in the middle of the answer's headers"
                )
        if end > MAX_HEAD_BYTES:
            raise _ProtocolError("the answer's headers exceed 64 KiB")
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        parts = lines[0].split(None, 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
            or parts[1][0] == ord("0")
            or b"\n" in lines[0]
        ):
            raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
        if len(lines) > MAX_HEADERS + 1:
            raise _ProtocolError(f"more than {MAX_HEADERS} headers")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            # A lone LF is refused, not read as a line end: it could hide a header.
            if not colon or not name or name != name.strip() or line[0] in b" \t" or b"\n" in line:
                raise _ProtocolError(f"malformed header line {line[:40]!r}")
            headers.append((name, value.strip(b" \t")))
        return parts[0], int(parts[1]), headers

    def _read_length(self, length: bytes) -> tuple[bytes, bool]:
        if not length.isdigit() or len(length) > _MAX_LENGTH_DIGITS:
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
            size_field = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise _ProtocolError(f"invalid chunk size {line[:40]!r}")
            size = int(size_field, 16)
            if size == 0:
                trailers = 0
                while trailer := self._read_line():  # up to the empty line
                    trailers += len(trailer) + 2
                    if trailers > MAX_HEAD_BYTES:
                        raise _ProtocolError("the answer's trailers exceed 64 KiB")
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
        if end > MAX_HEAD_BYTES:
            raise _ProtocolError("a chunk line exceeds 64 KiB")
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
    exc: Exception, request: httpx2.Request, *, connecting: bool = False, writing: bool = False
) -> Exception:
    message = str(exc) or type(exc).__name__
    kind: type[httpx2.TransportError]
    if isinstance(exc, TimeoutError | socket.timeout):
        if connecting:
            kind = httpx2.ConnectTimeout
        else:
            kind = httpx2.WriteTimeout if writing else httpx2.ReadTimeout
    elif connecting:
        kind = httpx2.ConnectError  # refused, unreachable, or the TLS handshake failed
    elif isinstance(exc, _ProtocolError):
        kind = httpx2.RemoteProtocolError  # not HTTP, cut short, or closed without an answer
    elif isinstance(exc, OSError):  # ssl.SSLError included
        kind = httpx2.WriteError if writing else httpx2.ReadError
    else:
        return exc
    return kind(message, request=request)
