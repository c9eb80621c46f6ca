"""A lean httpx2 transport: one keep-alive HTTP/1.1 connection, over the standard library.

Each dispatch thread has its own client and so its own connection: no pool, no pool lock. On
the 2-core benchmark machine it costs ~0.8 ms of CPU per request against ~1.2 ms for httpx2's
default transport (bench/results/http_stacks.md), which is what bounds a batch at high
concurrency. The httpx API above it is unchanged (timeouts, redirects off, TLS verified with
the context given); errors are raised as the httpx exceptions the default transport raises.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl

import httpx2

# Read at most this much of an answer; a longer one leaves its connection unusable, so it is
# closed (the caller only keeps an excerpt anyway).
MAX_BODY_BYTES = 64 * 1024


class KeepAliveTransport(httpx2.BaseTransport):
    """Not thread-safe: one per thread."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self._conn: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int | None] | None = None

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout", {})
        conn = self._connection(request.url, timeouts.get("connect"))
        conn.timeout = timeouts.get("read")
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in request.headers.raw
        }
        try:
            conn.request(
                request.method, request.url.raw_path.decode("ascii"), request.read(), headers
            )
            response = conn.getresponse()
            body = response.read(MAX_BODY_BYTES)
            if not response.isclosed():
                response.read(1)  # the end of a chunked body, or proof there is more
            if not response.isclosed() or response.will_close:
                self.close()
        except Exception as exc:
            self.close()
            raise _as_httpx_error(exc, request, connecting=False) from exc
        return httpx2.Response(
            response.status, headers=response.getheaders(), content=body, request=request
        )

    def _connection(
        self, url: httpx2.URL, connect_timeout: float | None
    ) -> http.client.HTTPConnection:
        origin = (url.scheme, url.host, url.port)
        if self._conn is not None and (origin != self._origin or _closed_by_peer(self._conn)):
            self.close()  # a keep-alive connection the server has closed meanwhile
        if self._conn is None:
            conn: http.client.HTTPConnection
            if url.scheme == "https":
                conn = http.client.HTTPSConnection(
                    url.host, url.port, timeout=connect_timeout, context=self._ssl
                )
            elif url.scheme == "http":
                conn = http.client.HTTPConnection(url.host, url.port, timeout=connect_timeout)
            else:
                raise httpx2.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}")
            try:
                conn.connect()
            except Exception as exc:
                conn.close()
                raise _as_httpx_error(exc, None, connecting=True) from exc
            self._conn, self._origin = conn, origin
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive socket that is readable has been closed (or written to) by the peer."""
    if conn.sock is None:
        return True
    readable, _, _ = select.select([conn.sock], [], [], 0)
    return bool(readable)


def _as_httpx_error(
    exc: Exception, request: httpx2.Request | None, *, connecting: bool
) -> Exception:
    message = str(exc) or type(exc).__name__
    kind: type[httpx2.TransportError]
    if isinstance(exc, TimeoutError | socket.timeout):
        kind = httpx2.ConnectTimeout if connecting else httpx2.ReadTimeout
    elif isinstance(exc, ssl.SSLError | ssl.CertificateError) or connecting:
        kind = httpx2.ConnectError
    elif isinstance(exc, http.client.HTTPException):
        kind = httpx2.RemoteProtocolError  # not HTTP, cut short, or closed without an answer
    elif isinstance(exc, OSError):
        kind = httpx2.ReadError
    else:
        return exc
    return kind(message, request=request) if request is not None else kind(message)
