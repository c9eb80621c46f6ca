"""The connection once made: no hidden limit on how long a statement may take (connect_timeout
bounds connecting only), TCP keep-alive as libpq's parameters say, with our defaults otherwise,
Nagle's algorithm off, and libpq's `options` sent to the server; over TLS and without."""

from __future__ import annotations

import socket

import pg8000.native
import pytest

from handler.queue import connection

from .clusters import Cluster

linux_tcp = pytest.mark.skipif(
    not all(hasattr(socket, name) for name in ("TCP_KEEPIDLE", "TCP_USER_TIMEOUT")),
    reason="TCP_KEEPIDLE and TCP_USER_TIMEOUT are Linux socket options",
)


@pytest.fixture(params=["tls", "plain"])
def server(request: pytest.FixtureRequest) -> Cluster:
    cluster: Cluster = request.getfixturevalue(f"{request.param}_server")
    return cluster


def open_(server: Cluster, **params: str) -> pg8000.native.Connection:
    params.setdefault("sslmode", "require" if server.tls else "disable")
    return connection.connect(connection.parse_database_url(server.url(**params)))


def tcp_options(conn: pg8000.native.Connection) -> dict[str, int]:
    sock = conn._usock  # pg8000's socket: the one connect() made (TLS-wrapped or not)
    tcp = socket.IPPROTO_TCP
    return {
        "nodelay": sock.getsockopt(tcp, socket.TCP_NODELAY),
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
        "count": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
        "user_timeout": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
    }


def test_a_statement_longer_than_connect_timeout_completes(server: Cluster) -> None:
    # Given a connection made with a connect timeout of one second
    settings = connection.parse_database_url(
        server.url(sslmode="require" if server.tls else "disable")
    )
    conn = connection.connect(settings.replace(connect_timeout=1.0))
    try:
        # When a statement takes longer than that, Then it completes
        assert conn.run("SELECT pg_sleep(1.5), 'done'") == [["", "done"]]
        assert conn.run("SELECT 1") == [[1]]  # and the connection is still in order
    finally:
        conn.close()


@linux_tcp
def test_keepalive_defaults_are_set_on_the_socket(server: Cluster) -> None:
    conn = open_(server)
    try:
        options = tcp_options(conn)
    finally:
        conn.close()

    assert options["nodelay"] != 0
    assert options["keepalive"] != 0
    assert (options["idle"], options["interval"], options["count"]) == (60, 10, 6)
    assert options["user_timeout"] == 120_000


@linux_tcp
def test_libpqs_keepalive_parameters_are_honoured(server: Cluster) -> None:
    conn = open_(
        server,
        keepalives_idle="7",
        keepalives_interval="3",
        keepalives_count="4",
        tcp_user_timeout="19000",
    )
    try:
        options = tcp_options(conn)
    finally:
        conn.close()

    assert (options["idle"], options["interval"], options["count"]) == (7, 3, 4)
    assert options["user_timeout"] == 19_000


def test_keepalives_0_turns_keepalive_off(server: Cluster) -> None:
    conn = open_(server, keepalives="0")
    try:
        keepalive = conn._usock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        conn.close()

    assert keepalive == 0


def test_options_reach_the_server(server: Cluster) -> None:
    conn = open_(server, options="-c search_path=queue_test -c statement_timeout=1234")
    try:
        settings = conn.run(
            "SELECT current_setting('search_path'), current_setting('statement_timeout')"
        )
    finally:
        conn.close()

    assert settings == [["queue_test", "1234ms"]]
