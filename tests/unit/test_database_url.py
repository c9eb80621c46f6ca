"""DATABASE_URL, DATABASE_SSLROOTCERT and the RDS secret turned into connection settings: libpq's
URL forms and parameters, libpq's meaning of sslmode and sslrootcert (and the configurations
libpq refuses before connecting), and URLs that cannot be what was meant, refused without
quoting any piece of them. Connecting itself is specified in tests/connection/."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from handler.errors import ConfigurationError
from handler.queue import connection
from handler.queue.connection import (
    ConnectionSettings,
    parse_database_url,
    settings_from_rds_secret,
)
from handler.runtime.settings import parse_settings

PASSWORD = "Pa55-word-that-must-not-leak"
ENV = {
    "DATABASE_URL": f"postgresql://worker:{PASSWORD}@db.example.com:6543/queue",
    "SUPABASE_URL": "https://xyz.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": "service-role-key",
}
SECRET = {"username": "worker", "password": PASSWORD, "host": "db.example.com", "port": 5432}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of the test's own: libpq's default root file (~/.postgresql/root.crt)
    counts when it exists, so the machine's must not."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "root.crt"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def url_error(url: str, **kwargs: str | None) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        parse_database_url(url, **kwargs)
    assert PASSWORD not in str(caught.value)
    return caught.value


def env_error(**changes: str | None) -> ConfigurationError:
    env = {k: v for k, v in {**ENV, **changes}.items() if v is not None}
    with pytest.raises(ConfigurationError) as caught:
        parse_settings(env)
    assert PASSWORD not in str(caught.value)
    return caught.value


# --- sslmode and sslrootcert, as libpq means them --------------------------------------------


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_a_verifying_sslmode_without_a_root_certificate_is_refused(mode: str) -> None:
    error = url_error(f"postgresql://worker:{PASSWORD}@db/queue?sslmode={mode}")

    assert error.variable == "DATABASE_URL"
    assert f"has sslmode={mode}, which verifies the server's certificate" in str(error)
    assert "sslrootcert=" in str(error)
    assert "DATABASE_SSLROOTCERT" in str(error)


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_a_verifying_sslmode_takes_the_root_certificate_from_the_url(
    mode: str, ca_file: str
) -> None:
    result = parse_database_url(f"postgresql://u@db/q?sslmode={mode}&sslrootcert={ca_file}")

    assert (result.sslmode, result.sslrootcert) == (mode, ca_file)


def test_libpqs_default_root_file_counts_when_it_exists(home: Path, ca_file: str) -> None:
    default = home / ".postgresql" / "root.crt"
    default.parent.mkdir()
    default.write_bytes(Path(ca_file).read_bytes())

    # verify-full is accepted without a root in the URL, and require verifies the chain with it
    assert parse_database_url("postgresql://u@db/q?sslmode=verify-full").sslrootcert == str(default)
    assert parse_database_url("postgresql://u@db/q?sslmode=require").sslrootcert == str(default)


def test_without_a_root_certificate_nothing_is_to_be_verified() -> None:
    assert parse_database_url("postgresql://u@db/q?sslmode=require").sslrootcert is None
    assert parse_database_url("postgresql://u@db/q").sslrootcert is None


def test_a_root_certificate_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "global-bundle.pem"

    error = url_error(f"postgresql://u:{PASSWORD}@db/q?sslmode=require&sslrootcert={missing}")

    assert error.variable == "DATABASE_URL"
    assert f"names the root certificate file '{missing}', which does not exist" in str(error)


def test_a_root_certificate_file_that_holds_no_certificate_is_refused(tmp_path: Path) -> None:
    not_pem = tmp_path / "root.crt"
    not_pem.write_text("this is not a certificate\n")

    error = url_error(f"postgresql://u@db/q?sslmode=verify-ca&sslrootcert={not_pem}")

    assert "holds no PEM certificate that can be loaded" in str(error)


def test_sslrootcert_system_makes_verify_full_the_default() -> None:
    result = parse_database_url("postgresql://u@db/q?sslrootcert=system")

    assert (result.sslmode, result.sslrootcert) == ("verify-full", "system")


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require", "verify-ca"])
def test_sslrootcert_system_with_a_weaker_sslmode_is_refused_as_libpq_does(mode: str) -> None:
    error = url_error(f"postgresql://u:{PASSWORD}@db/q?sslmode={mode}&sslrootcert=system")

    assert error.variable == "DATABASE_URL"
    assert f"has sslmode={mode} with sslrootcert=system, which libpq refuses" in str(error)
    assert "verify-full" in str(error)


def test_a_unix_socket_is_never_tls_so_verification_needs_no_root() -> None:
    result = parse_database_url("postgresql://u@/q?host=/run/postgresql&sslmode=verify-full")

    assert (result.unix_socket, result.sslmode) == ("/run/postgresql/.s.PGSQL.5432", "disable")


# --- DATABASE_SSLROOTCERT --------------------------------------------------------------------


def test_database_sslrootcert_applies_to_a_url_that_names_none(ca_file: str) -> None:
    result = parse_settings(
        ENV
        | {
            "DATABASE_URL": "postgresql://worker@db.example.com/queue?sslmode=verify-full",
            "DATABASE_SSLROOTCERT": ca_file,
        }
    )

    assert result.database is not None
    assert (result.database.sslmode, result.database.sslrootcert) == ("verify-full", ca_file)


def test_the_urls_own_sslrootcert_wins_over_database_sslrootcert(
    ca_file: str, tmp_path: Path
) -> None:
    other = tmp_path / "other.crt"
    trustme.CA().cert_pem.write_to_path(str(other))

    result = parse_settings(
        ENV
        | {
            "DATABASE_URL": f"postgresql://worker@db/queue?sslmode=verify-ca&sslrootcert={other}",
            "DATABASE_SSLROOTCERT": ca_file,
        }
    )

    assert result.database is not None
    assert result.database.sslrootcert == str(other)


def test_database_sslrootcert_naming_a_missing_file_is_named(tmp_path: Path) -> None:
    error = env_error(DATABASE_SSLROOTCERT=str(tmp_path / "global-bundle.pem"))

    assert error.variable == "DATABASE_SSLROOTCERT"
    assert "which does not exist" in str(error)


def test_database_sslrootcert_system_with_a_weaker_url_sslmode_names_both() -> None:
    error = env_error(
        DATABASE_URL=f"postgresql://worker:{PASSWORD}@db/queue?sslmode=require",
        DATABASE_SSLROOTCERT="system",
    )

    assert error.variable == "DATABASE_URL"
    assert "sslmode=require with sslrootcert=system (from DATABASE_SSLROOTCERT)" in str(error)


def test_a_relative_database_sslrootcert_is_made_absolute(
    ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(ca_file).parent)

    result = parse_settings(ENV | {"DATABASE_SSLROOTCERT": "root.crt"})

    assert result.database_sslrootcert == ca_file
    assert result.database is not None
    assert result.database.sslrootcert == ca_file


# --- the RDS secret --------------------------------------------------------------------------


def test_an_rds_secret_is_verify_full_against_database_sslrootcert(ca_file: str) -> None:
    result = settings_from_rds_secret(SECRET, variable="DATABASE_SECRET_ARN", sslrootcert=ca_file)

    assert result == ConnectionSettings(
        host="db.example.com",
        port=5432,
        database="postgres",
        user="worker",
        password=PASSWORD,
        sslmode="verify-full",
        sslrootcert=ca_file,
    )
    assert result.source == "DATABASE_SECRET_ARN"


def test_an_rds_secret_without_a_root_certificate_names_database_sslrootcert() -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from_rds_secret(SECRET, variable="DATABASE_SECRET_ARN")

    error = caught.value
    assert error.variable == "DATABASE_SSLROOTCERT"
    assert "sslmode=verify-full (the default for a secret)" in str(error)
    assert "global-bundle.pem" in str(error)
    assert PASSWORD not in str(error)


def test_an_rds_secret_with_system_roots_is_verify_full() -> None:
    result = settings_from_rds_secret(SECRET, variable="DATABASE_SECRET_ARN", sslrootcert="system")

    assert (result.sslmode, result.sslrootcert) == ("verify-full", "system")


def test_an_rds_secret_may_name_its_own_sslmode() -> None:
    result = settings_from_rds_secret(
        SECRET | {"sslmode": "require"}, variable="DATABASE_SECRET_ARN"
    )

    assert (result.sslmode, result.sslrootcert) == ("require", None)


def test_an_rds_secret_with_an_unknown_sslmode_is_named() -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings_from_rds_secret(SECRET | {"sslmode": "on"}, variable="DATABASE_SECRET_ARN")

    assert caught.value.variable == "DATABASE_SECRET_ARN"
    assert "sslmode='on'" in str(caught.value)


def test_database_sslrootcert_reaches_the_secret_path(ca_file: str) -> None:
    result = parse_settings(
        ENV
        | {
            "DATABASE_URL": "",
            "DATABASE_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db",
            "DATABASE_SSLROOTCERT": ca_file,
        }
    )

    assert result.database_sslrootcert == ca_file


# --- libpq URL parameters --------------------------------------------------------------------


def test_query_parameters_override_the_rest_of_the_url_as_in_libpq() -> None:
    result = parse_database_url(
        "postgresql://a:b@h1:1111/d1?host=h2&port=2222&dbname=d2&user=u2&password=p2"
    )

    assert (result.host, result.port, result.database, result.user, result.password) == (
        "h2",
        2222,
        "d2",
        "u2",
        "p2",
    )


def test_a_plus_in_a_query_value_is_a_plus() -> None:
    assert parse_database_url("postgresql://u@db/q?password=a+b%2Bc").password == "a+b+c"


def test_an_ipv6_host_in_brackets() -> None:
    result = parse_database_url("postgresql://u@[::1]:6543/q")

    assert (result.host, result.port) == ("::1", 6543)
    assert result.describe() == "u@[::1]:6543/q"


def test_a_socket_folder_percent_encoded_in_the_host_part() -> None:
    result = parse_database_url("postgresql://u@%2Frun%2Fpostgresql/q")

    assert result.unix_socket == "/run/postgresql/.s.PGSQL.5432"


def test_options_go_to_the_server() -> None:
    result = parse_database_url("postgresql://u@db/q?options=-c%20search_path%3Dqueue")

    assert result.options == "-c search_path=queue"


@pytest.mark.parametrize(("value", "expected"), [("5", 5.0), ("1", 2.0), ("0", None), ("-3", None)])
def test_connect_timeout_means_what_it_means_to_libpq(value: str, expected: float | None) -> None:
    # whole seconds, at least 2, and zero or less for no limit
    result = parse_database_url(f"postgresql://u@db/q?connect_timeout={value}")

    assert result.connect_timeout == expected


def test_connect_timeout_defaults_to_ten_seconds() -> None:
    assert parse_database_url("postgresql://u@db/q").connect_timeout == 10.0


def test_keepalive_defaults_notice_a_dead_peer_within_two_minutes() -> None:
    result = parse_database_url("postgresql://u@db/q")

    assert result.keepalives is True
    assert (result.keepalives_idle, result.keepalives_interval, result.keepalives_count) == (
        60,
        10,
        6,
    )
    assert result.tcp_user_timeout == 120_000
    assert result.keepalives_idle + result.keepalives_interval * result.keepalives_count == 120


def test_keepalive_parameters_are_honoured() -> None:
    result = parse_database_url(
        "postgresql://u@db/q?keepalives=0&keepalives_idle=5&keepalives_interval=2"
        "&keepalives_count=3&tcp_user_timeout=9000"
    )

    assert result.keepalives is False
    assert (result.keepalives_idle, result.keepalives_interval, result.keepalives_count) == (
        5,
        2,
        3,
    )
    assert result.tcp_user_timeout == 9000


@pytest.mark.parametrize(
    ("parameter", "value", "message"),
    [
        ("keepalives_idle", "soon", "keepalives_idle='soon', which is not a whole number"),
        ("keepalives_count", "-1", "keepalives_count=-1, which must not be negative"),
        ("tcp_user_timeout", "1.5", "tcp_user_timeout='1.5', which is not a whole number"),
    ],
)
def test_a_malformed_keepalive_parameter_is_named(parameter: str, value: str, message: str) -> None:
    error = url_error(f"postgresql://worker:{PASSWORD}@db/q?{parameter}={value}")

    assert message in str(error)


def test_an_unknown_parameter_is_refused_by_name() -> None:
    error = url_error(f"postgresql://worker:{PASSWORD}@db/q?sslcert=client.crt")

    assert "has a query parameter 'sslcert' queue-worker does not take" in str(error)
    assert "sslrootcert" in str(error)  # what it takes instead


def test_several_hosts_are_refused() -> None:
    error = url_error(f"postgresql://worker:{PASSWORD}@db1:5432,db2:5432/q")

    assert "lists several hosts" in str(error)


# --- URLs that cannot be what was meant: refused without quoting a piece of them -------------


@pytest.mark.parametrize(
    "url",
    [
        # an unescaped '/', '?', '#' or '@' in the password
        "postgresql://worker:hunter2/rest@db.example.com/queue",
        "postgresql://worker:1234/rest@db.example.com/queue",
        "postgresql://worker:1234?rest@db.example.com/queue",
        "postgresql://worker:1234#rest@db.example.com/queue",
        "postgresql://worker:hun@ter2@db.example.com/queue",
        "postgresql://worker:12?ab&cd@db.example.com/queue",
        # a host that does not parse
        "postgresql://worker:hunter2@db.exa mple.com/queue",
        "postgresql://worker:hunter2@[db.example.com]/queue",
        "postgresql://worker:hunter2@db.example.com:rest/queue",
        "postgresql://hunter2/rest@db.example.com/queue",
    ],
)
def test_a_url_that_cannot_be_what_was_meant_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_database_url(url)

    message = str(caught.value)
    assert caught.value.variable == "DATABASE_URL"
    for piece in ("hunter2", "1234", "rest", "ter2", "ab", "cd", "example", "queue", "worker"):
        assert piece not in message.replace("DATABASE_URL", "")
    assert "percent-encoded" in message


def test_a_database_name_holding_a_slash_is_refused() -> None:
    error = url_error("postgresql://worker@db.example.com/queue/extra")

    assert "the database name holds a '/'" in str(error)
    assert "extra" not in str(error)


def test_a_percent_encoded_password_with_every_special_character_is_fine() -> None:
    result = parse_database_url("postgresql://worker:a%2Fb%3Fc%23d%40e%3Af@db.example.com/queue")

    assert result.password == "a/b?c#d@e:f"
    assert (result.host, result.database) == ("db.example.com", "queue")


def test_the_settings_error_carries_no_piece_of_a_broken_url() -> None:
    error = env_error(DATABASE_URL="postgresql://worker:1234/secret-part@db.example.com/queue")

    assert error.variable == "DATABASE_URL"
    assert "secret-part" not in str(error)
    assert "1234" not in str(error)


def test_the_verifying_contexts_are_cached_per_root(ca_file: str) -> None:
    first = connection._verifying_context(ca_file, True)

    assert connection._verifying_context(ca_file, True) is first
    assert connection._verifying_context(ca_file, False) is not first
    assert first.check_hostname is True
    assert connection._verifying_context(ca_file, False).check_hostname is False
