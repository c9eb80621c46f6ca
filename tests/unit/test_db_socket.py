"""The database connection's TCP socket: Nagle's algorithm off (a statement written in more than
one segment would otherwise wait ~40 ms for the server's delayed ACK), keep-alive on."""

from __future__ import annotations

import socket

import pytest

from handler import db


def _options(sock: socket.socket) -> tuple[int, int]:
    return (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    )


def test_the_tcp_socket_has_nagle_off_and_keepalive_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        sock = db._tcp_socket(db.parse_database_url(f"postgresql://u@127.0.0.1:{port}/d"))
        try:
            nodelay, keepalive = _options(sock)
        finally:
            sock.close()
    assert nodelay != 0
    assert keepalive != 0


def test_a_connection_over_tcp_uses_such_a_socket(database_url: str) -> None:
    settings = db.parse_database_url(database_url)
    if settings.unix_socket is not None:
        pytest.skip(
            "the test database is on a unix socket; run with "
            "DATABASE_URL=postgresql://...@host:port/... to check a TCP connection"
        )
    conn = db.connect(settings)
    try:
        nodelay, keepalive = _options(conn._usock)  # pg8000's socket (TLS-wrapped or not)
    finally:
        conn.close()
    assert nodelay != 0
    assert keepalive != 0
