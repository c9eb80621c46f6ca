"""The database connection's socket on the session's server: Nagle's algorithm off (a
statement written in more than one segment would otherwise wait ~40 ms for the server's delayed
ACK), keep-alive on, and no limit of the connect timeout on statements. TLS, authentication and
retries are specified against servers of their own in tests/connection/."""

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


def test_a_statement_longer_than_connect_timeout_completes(database_url: str) -> None:
    # Given a connection (over TCP or a unix socket) made with a connect timeout of one second
    settings = connection.parse_database_url(database_url).replace(connect_timeout=1.0)
    conn = connection.connect(settings)
    try:
        # When a statement takes longer than that, Then it completes
        assert conn.run("SELECT pg_sleep(1.5), 'done'") == [["", "done"]]
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("sslmode", "answer"),
    [
        ("disable", b"\xff"),
        ("prefer", b"\xff"),
        ("require", b"\xff"),
        ("disable", b"N"),
        ("prefer", b"N"),
        # ("require", b"N") is a TLS setting to fix: the next test
    ],
)
def test_a_server_that_is_not_postgresql_is_reported_as_unreachable(
    sslmode: str, answer: bytes
) -> None:
    """It answers one byte to whatever it is sent, then hangs up: nonsense, or the "N" with
    which PostgreSQL refuses TLS (prefer then goes on without TLS on the same connection; under
    require, see the next test)."""
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


def test_a_server_refusing_tls_under_require_is_a_configuration_error() -> None:
    """The "N" with which PostgreSQL refuses TLS, when sslmode=require: libpq's "server does
    not support SSL, but SSL was required"; nothing is tried without TLS."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        asked: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                asked.append(conn.recv(1024))
                conn.sendall(b"N")
                try:
                    asked.append(conn.recv(1024))  # b"": the client hung up, sent nothing
                except OSError as exc:
                    asked.append(repr(exc).encode())

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        settings = connection.parse_database_url(
            f"postgresql://u:s3cret@127.0.0.1:{port}/d?sslmode=require&connect_timeout=5"
        )
        with pytest.raises(connection.DatabaseConfigurationError) as e:
            connection.connect(settings)
        server.join(timeout=10)
    assert "the server does not offer TLS, but sslmode=require requires it" in str(e.value)
    assert e.value.kind == "configuration"
    assert asked == [bytes.fromhex("0000000804d2162f"), b""]  # SSLRequest, then nothing
    assert "s3cret" not in str(e.value)
