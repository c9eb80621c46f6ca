"""A connection that fails says so in one line of ours (never pg8000's dict, never the
password), with a `kind` the command line maps to an exit status: "configuration" (the
password, the user, the database, TLS settings) or "unreachable" (nothing answered, or a server
not accepting connections yet, which is tried again a few times first)."""

from __future__ import annotations

import select
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pg8000.core
import pytest

from handler.errors import (
    EXIT_STATUS,
    ConfigurationError,
    DatabaseConfigurationError,
    DatabaseUnavailableError,
)
from handler.local import cli, embedded
from handler.queue import connection

from .clusters import ADMIN, SECRET_PASSWORD, SECRET_USER, Cluster, ServerCertificate


def failure(
    settings: connection.ConnectionSettings, sleep: Callable[[float], None] | None = None
) -> DatabaseConfigurationError | DatabaseUnavailableError:
    """The error connecting raises; pauses before another attempt go to `sleep`, and none is
    expected unless it is given."""

    def unexpected(seconds: float) -> None:
        pytest.fail(f"tried again (after {seconds} s) where no second attempt was expected")

    with pytest.raises((DatabaseConfigurationError, DatabaseUnavailableError)) as caught:
        connection.connect(settings, sleep=sleep or unexpected)
    message = str(caught.value)
    assert "\n" not in message
    assert "{" not in message  # never pg8000's dict
    if settings.password:
        assert settings.password not in message
        assert settings.password not in repr(caught.value)
    return caught.value


def parse(url: str) -> connection.ConnectionSettings:
    return connection.parse_database_url(url)


@pytest.fixture(params=["tls", "plain"])
def server(request: pytest.FixtureRequest) -> Cluster:
    """Each server in turn: over TLS (require) and without."""
    cluster: Cluster = request.getfixturevalue(f"{request.param}_server")
    return cluster


def mode(server: Cluster) -> str:
    return "require" if server.tls else "disable"


# --- the server answers and refuses ----------------------------------------------------------


def test_the_right_password_connects(server: Cluster) -> None:
    url = server.url(SECRET_USER, password=SECRET_PASSWORD, sslmode=mode(server))

    conn = connection.connect(parse(url))
    try:
        assert conn.run("SELECT current_user") == [[SECRET_USER]]
    finally:
        conn.close()


def test_a_wrong_password_is_a_configuration_error(server: Cluster) -> None:
    settings = parse(server.url(SECRET_USER, password="wrong-Pa55word", sslmode=mode(server)))

    error = failure(settings)

    assert isinstance(error, DatabaseConfigurationError)
    assert isinstance(error, ConfigurationError)
    assert EXIT_STATUS[error.kind] == 2
    assert (error.kind, error.sqlstate, error.variable) == (
        "configuration",
        "28P01",
        "DATABASE_URL",
    )
    assert str(error) == (
        f"cannot connect to PostgreSQL at {SECRET_USER}@127.0.0.1:{server.port}/postgres: "
        f'password authentication failed for user "{SECRET_USER}"; check the password in '
        "DATABASE_URL"
    )


def test_no_password_where_one_is_needed_says_none_was_given(tls_server: Cluster) -> None:
    error = failure(parse(tls_server.url(SECRET_USER, sslmode="require")))

    assert (error.kind, error.sqlstate) == ("configuration", "28P01")
    assert "check the password (none was given) in DATABASE_URL" in str(error)


def test_a_role_that_does_not_exist_is_a_configuration_error(server: Cluster) -> None:
    error = failure(parse(server.url("nobody_here", sslmode=mode(server))))

    assert (error.kind, error.sqlstate) == ("configuration", "28000")
    assert 'role "nobody_here" does not exist' in str(error)
    assert "check the user name in DATABASE_URL" in str(error)


def test_no_pg_hba_entry_is_a_configuration_error(tls_server: Cluster) -> None:
    error = failure(parse(tls_server.url(sslmode="disable")))

    assert (error.kind, error.sqlstate) == ("configuration", "28000")
    assert "no pg_hba.conf entry" in str(error)
    assert "pg_hba.conf admits this user, database and address with sslmode=disable" in str(error)


def test_a_database_that_does_not_exist_is_a_configuration_error(server: Cluster) -> None:
    error = failure(parse(server.url(database="no_such_db", sslmode=mode(server))))

    assert (error.kind, error.sqlstate) == ("configuration", "3D000")
    assert 'database "no_such_db" does not exist' in str(error)
    assert "check the database name in DATABASE_URL, or create it" in str(error)


@pytest.mark.parametrize("sslmode", ["allow", "prefer"])
def test_when_both_ways_fail_the_telling_error_is_reported(
    tls_server: Cluster, sslmode: str
) -> None:
    # Given a wrong password to a server that refuses plain: one attempt gets "password
    # authentication failed", the other "no pg_hba.conf entry" (allow: plain first; prefer: last)
    settings = parse(tls_server.url(SECRET_USER, password="wrong-Pa55word", sslmode=sslmode))

    error = failure(settings)

    assert error.sqlstate == "28P01"
    assert "check the password" in str(error)


def test_an_error_from_the_secret_path_names_the_secret(tls_server: Cluster) -> None:
    settings = parse(
        tls_server.url(SECRET_USER, password="wrong-Pa55word", sslmode="require")
    ).replace(source="DATABASE_SECRET_ARN")

    error = failure(settings)

    assert isinstance(error, DatabaseConfigurationError)
    assert error.variable == "DATABASE_SECRET_ARN"
    assert str(error).endswith("check the password in the DATABASE_SECRET_ARN secret")


@pytest.fixture(scope="module")
def unix_socket_url(server_url: str) -> str:
    """A server reached over a Unix socket: the session's, when it is the embedded one; else an
    embedded server of this module's own."""
    if connection.parse_database_url(server_url).unix_socket:
        return server_url
    return embedded.start(
        Path(tempfile.mkdtemp(prefix="queue-worker-unix-")) / "pgdata", temporary=True
    )


@pytest.mark.parametrize(
    ("database", "user", "sqlstate"),
    [("no_such_db", None, "3D000"), (None, "nobody_here", "28000")],
    ids=["a missing database", "a missing role"],
)
def test_a_refusal_the_server_closed_on_is_reported_as_the_servers_refusal(
    unix_socket_url: str,
    monkeypatch: pytest.MonkeyPatch,
    database: str | None,
    user: str | None,
    sqlstate: str,
) -> None:
    # Given pg8000 closing a refused startup only once the server has closed its end: pg8000
    # sends Terminate then, and on a Unix socket that write fails with a broken pipe (left to
    # the scheduler, the server wins that race about one time in ten)
    closing = pg8000.core.CoreConnection.close

    def close_after_the_server(self: pg8000.core.CoreConnection) -> None:
        # Readable once the server's end is closed (the refusal has been read already)
        select.select([self._usock], [], [], 30)
        closing(self)

    monkeypatch.setattr(pg8000.core.CoreConnection, "close", close_after_the_server)
    settings = parse(unix_socket_url)
    settings = settings.replace(database=database or settings.database, user=user or settings.user)

    # When connecting, then the error is the server's refusal, not a connection lost
    error = failure(settings)

    assert (error.kind, error.sqlstate) == ("configuration", sqlstate)
    assert "closed the connection" not in str(error)


# --- a server not accepting connections yet (57P03): tried again, a few times ----------------


def test_a_server_not_accepting_connections_is_tried_again_then_reported(
    standby_server: Cluster,
) -> None:
    pauses: list[float] = []

    error = failure(parse(standby_server.url(ADMIN, sslmode="disable")), sleep=pauses.append)

    assert isinstance(error, DatabaseUnavailableError)
    assert (error.kind, error.sqlstate) == ("unreachable", "57P03")
    assert "the database system is not accepting connections" in str(error)
    assert "(tried 5 times over" in str(error)
    assert pauses == list(connection.RETRY_DELAYS_S)
    assert sum(pauses) <= 3.0  # the bound docs/database-tls.md states


def test_a_server_that_starts_accepting_while_retried_is_connected_to(
    standby_server: Cluster,
) -> None:
    # Given a standby that is promoted during the first pause (the pause is where it happens)
    pauses: list[float] = []

    def promote_during_pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:
            standby_server.promote()

    # When connecting
    conn = connection.connect(
        parse(standby_server.url(ADMIN, sslmode="disable")), sleep=promote_during_pause
    )
    # Then the second attempt got in
    try:
        assert conn.run("SELECT pg_is_in_recovery()") == [[False]]
    finally:
        conn.close()
    assert pauses == [connection.RETRY_DELAYS_S[0]]


# --- nothing answers --------------------------------------------------------------------------


def test_a_refused_port_is_tried_again_then_reported_as_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    pauses: list[float] = []  # (nothing listens on the port once the listener is closed)

    error = failure(parse(f"postgresql://u:s3cret@127.0.0.1:{port}/d"), sleep=pauses.append)

    assert isinstance(error, DatabaseUnavailableError)
    assert error.kind == "unreachable"
    assert "connection refused" in str(error)
    assert pauses == list(connection.RETRY_DELAYS_S)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never says a word."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    held.append(listener.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        stop.set()
        thread.join()
        for sock in held:
            sock.close()


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_a_server_that_never_answers_times_out_as_unreachable(
    silent_server: int, sslmode: str
) -> None:
    settings = parse(
        f"postgresql://u:s3cret@127.0.0.1:{silent_server}/d?sslmode={sslmode}"
    ).replace(
        connect_timeout=0.5,
    )
    error = failure(settings)  # and not tried again: it waited long enough already

    assert error.kind == "unreachable"
    assert "no answer within connect_timeout=0.5 s" in str(error)


def test_a_missing_unix_socket_is_unreachable(tmp_path: Path) -> None:
    pauses: list[float] = []

    error = failure(parse(f"postgresql://u@/d?host={tmp_path}"), sleep=pauses.append)

    assert error.kind == "unreachable"
    assert "connection refused" in str(error)


# --- the command line maps the kind to its exit status -------------------------------------


def test_the_command_line_exits_2_for_a_wrong_password(
    tls_server: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL", tls_server.url(SECRET_USER, password="wrong-Pa55word", sslmode="require")
    )

    assert cli.main(["stats"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "password authentication failed" in err
    assert "wrong-Pa55word" not in err


def test_the_command_line_exits_3_when_nothing_answers(
    silent_server: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql://u:s3cret@127.0.0.1:{silent_server}/d?connect_timeout=2"
    )

    assert cli.main(["stats"]) == 3
    err = capsys.readouterr().err
    assert "no answer within connect_timeout=2 s" in err
    assert "s3cret" not in err


def test_the_command_line_verifies_the_server_against_database_sslrootcert(
    tls_server: Cluster,
    certificate: ServerCertificate,
    other_ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given verify-full in DATABASE_URL and the CA in DATABASE_SSLROOTCERT, not in the URL
    monkeypatch.setenv("DATABASE_URL", tls_server.url(host="localhost", sslmode="verify-full"))
    monkeypatch.setenv("DATABASE_SSLROOTCERT", str(certificate.ca_file))
    # When `migrate --check` runs, Then it connected (and found no queue schema there)
    assert cli.main(["migrate", "--check"]) == 1
    assert capsys.readouterr().out.startswith("pending: 0001_queue")
    # and with a CA that did not sign the server's certificate, it refuses in one line
    monkeypatch.setenv("DATABASE_SSLROOTCERT", other_ca_file)
    assert cli.main(["migrate", "--check"]) == EXIT_STATUS["configuration"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "certificate" in err
