"""The database connection's TCP socket: Nagle's algorithm off (a statement written in more than
one segment would otherwise wait ~40 ms for the server's delayed ACK), keep-alive on."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from handler.queue import connection


def _options(sock: socket.socket) -> tuple[int, int]:
    return (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    )


def test_the_tcp_socket_has_nagle_off_and_keepalive_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        sock = connection._tcp_socket(
            connection.parse_database_url(f"postgresql://u@127.0.0.1:{port}/d")
        )
        try:
            nodelay, keepalive = _options(sock)
        finally:
            sock.close()
    assert nodelay != 0
    assert keepalive != 0


def test_a_connection_over_tcp_uses_such_a_socket(database_url: str) -> None:
    settings = connection.parse_database_url(database_url)
    if settings.unix_socket is not None:
        pytest.skip(
            "the test database is on a unix socket; run with "
            "DATABASE_URL=postgresql://...@host:port/... to check a TCP connection"
        )
    conn = connection.connect(settings)
    try:
        nodelay, keepalive = _options(conn._usock)  # pg8000's socket (TLS-wrapped or not)
    finally:
        conn.close()
    assert nodelay != 0
    assert keepalive != 0


@pytest.mark.parametrize("answer", [b"\xff", b"N"], ids=["nonsense", "refuses-tls"])
@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require"])
def test_a_server_that_is_not_postgresql_is_reported_as_unreachable(
    sslmode: str, answer: bytes
) -> None:
    """It answers one byte to whatever it is sent, then hangs up: nonsense, or the "N" with
    which PostgreSQL refuses TLS (pg8000 then closes the socket itself)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            # Until the listener closes (prefer makes two attempts: TLS, then plain).
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = listener.accept()
                    with conn:
                        conn.recv(1024)
                        conn.sendall(answer)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        settings = connection.parse_database_url(
            f"postgresql://u:s3cret@127.0.0.1:{port}/d?sslmode={sslmode}&connect_timeout=5"
        )
        with pytest.raises(
            connection.DatabaseUnavailableError, match="cannot connect to PostgreSQL"
        ) as e:
            connection.connect(settings)
    assert "s3cret" not in str(e.value)
