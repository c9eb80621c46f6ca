"""parse_settings: the environment of the README's configuration table, validated once, every error naming its
variable and never showing a secret; and the libpq URL forms DATABASE_URL takes."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from handler.dispatch.routes import DEFAULT_ROUTES, Route
from handler.errors import ConfigurationError
from handler.queue.connection import ConnectionSettings, parse_database_url
from handler.runtime.settings import Settings, parse_database_settings, parse_settings

PASSWORD = "Pa55-word-that-must-not-leak"
SERVICE_KEY = "service-role-key-that-must-not-leak"
ENV = {
    "DATABASE_URL": f"postgresql://worker:{PASSWORD}@db.example.com:6543/queue",
    "SUPABASE_URL": "https://xyz.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
}


def settings(**changes: str | None) -> Settings:
    """The minimal valid environment, with some variables changed (None: removed)."""
    env = {**ENV, **changes}
    return parse_settings({k: v for k, v in env.items() if v is not None})


def config_error(**changes: str | None) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        settings(**changes)
    error = caught.value
    assert PASSWORD not in str(error)
    assert SERVICE_KEY not in str(error)
    return error


# --- defaults --------------------------------------------------------------------------------


def test_defaults_when_only_the_required_variables_are_set() -> None:
    result = settings()

    assert result.max_jobs_per_tenant == 10
    assert result.max_jobs_per_run == 1000
    assert result.max_concurrency == 50
    assert result.http_timeout_seconds == 30.0
    assert result.idempotency_store == "postgres"
    assert result.idempotency_table is None
    assert result.job_lease_seconds is None
    assert {t: r.function for t, r in result.routes.items()} == dict(DEFAULT_ROUTES)


def test_functions_base_url_defaults_to_the_supabase_functions_path() -> None:
    assert settings().functions_base_url == "https://xyz.supabase.co/functions/v1"


def test_trailing_slash_on_supabase_url_does_not_double() -> None:
    result = settings(SUPABASE_URL="https://xyz.supabase.co/")

    assert result.functions_base_url == "https://xyz.supabase.co/functions/v1"


def test_functions_base_url_replaces_supabase_url_when_set() -> None:
    result = settings(SUPABASE_URL=None, FUNCTIONS_BASE_URL="http://localhost:8787/")

    assert result.functions_base_url == "http://localhost:8787"


def test_every_limit_can_be_set() -> None:
    result = settings(
        MAX_JOBS_PER_TENANT="3",
        MAX_JOBS_PER_RUN="40",
        MAX_CONCURRENCY="7",
        HTTP_TIMEOUT_SECONDS="2.5",
        JOB_LEASE_SECONDS="120",
    )

    assert (result.max_jobs_per_tenant, result.max_jobs_per_run, result.max_concurrency) == (
        3,
        40,
        7,
    )
    assert result.http_timeout_seconds == 2.5
    assert result.job_lease_seconds == 120


def test_blank_variables_count_as_unset() -> None:
    result = settings(MAX_CONCURRENCY="  ", JOB_LEASE_SECONDS="", IDEMPOTENCY_STORE=" ")

    assert result.max_concurrency == 50
    assert result.job_lease_seconds is None
    assert result.idempotency_store == "postgres"


def test_dynamodb_store_with_its_table() -> None:
    result = settings(IDEMPOTENCY_STORE="dynamodb", IDEMPOTENCY_TABLE="queue-idempotency")

    assert result.idempotency_store == "dynamodb"
    assert result.idempotency_table == "queue-idempotency"


def test_job_routes_add_and_override_routes() -> None:
    routes = settings(JOB_ROUTES='{"ingest_slack": "slack-v2", "send_mail": "mailer"}').routes

    assert routes["ingest_slack"] == Route("slack-v2")
    assert routes["send_mail"] == Route("mailer")
    assert routes["generate_digest"] == Route("daily-digest")


def test_secret_arns_stand_in_for_url_and_key() -> None:
    database_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf"
    key_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:key-AbCdEf"

    result = settings(
        DATABASE_URL=None,
        DATABASE_SECRET_ARN=database_arn,
        SUPABASE_SERVICE_ROLE_KEY=None,
        SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN=key_arn,
    )

    assert (result.database, result.database_secret_arn) == (None, database_arn)
    assert (result.service_role_key, result.service_role_key_secret_arn) == (None, key_arn)


# --- each missing or malformed variable is named ---------------------------------------------


def test_missing_database_url_is_named() -> None:
    error = config_error(DATABASE_URL=None)

    assert error.variable == "DATABASE_URL"
    assert str(error).startswith("DATABASE_URL is not set")


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://worker:{PASSWORD}@db.example.com/queue",
        f"https://worker:{PASSWORD}@db.example.com/queue",
        "db.example.com:5432",
    ],
)
def test_database_url_with_another_scheme_is_named(url: str) -> None:
    error = config_error(DATABASE_URL=url)

    assert error.variable == "DATABASE_URL"
    assert str(error).startswith("DATABASE_URL must start with postgresql://")


def test_database_url_with_unknown_sslmode_is_named() -> None:
    error = config_error(DATABASE_URL=f"postgresql://worker:{PASSWORD}@db/queue?sslmode=always")

    assert error.variable == "DATABASE_URL"
    assert "sslmode='always'" in str(error)
    assert "verify-full" in str(error)


def test_database_url_with_non_numeric_port_is_named() -> None:
    error = config_error(DATABASE_URL=f"postgresql://worker:{PASSWORD}@db:port/queue")

    assert error.variable == "DATABASE_URL"
    assert str(error).startswith("DATABASE_URL is not a valid URL")


def test_database_secret_arn_that_is_not_an_arn_is_named() -> None:
    error = config_error(DATABASE_URL=None, DATABASE_SECRET_ARN="my-db-secret")

    assert error.variable == "DATABASE_SECRET_ARN"
    assert "must be a Secrets Manager ARN" in str(error)


def test_missing_supabase_url_is_named() -> None:
    error = config_error(SUPABASE_URL=None)

    assert error.variable == "SUPABASE_URL"
    assert str(error).startswith("SUPABASE_URL is not set")


@pytest.mark.parametrize("url", ["xyz.supabase.co", "ftp://xyz.supabase.co", "https://"])
def test_supabase_url_that_is_not_http_is_named(url: str) -> None:
    error = config_error(SUPABASE_URL=url)

    assert error.variable == "SUPABASE_URL"
    assert "must be an http(s) URL" in str(error)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("FUNCTIONS_BASE_URL", f"https://svc:{PASSWORD}@fn.example.com/v1"),
        ("FUNCTIONS_BASE_URL", f"https://{PASSWORD}@fn.example.com"),
        ("SUPABASE_URL", f"https://svc:{PASSWORD}@xyz.supabase.co"),
        # A '/' in the password ends the host part early: the rest still holds an '@'.
        ("FUNCTIONS_BASE_URL", f"https://svc:12/{PASSWORD}@fn.example.com"),
    ],
)
def test_a_functions_url_with_credentials_is_refused_without_showing_them(
    variable: str, url: str
) -> None:
    other = "SUPABASE_URL" if variable == "FUNCTIONS_BASE_URL" else "FUNCTIONS_BASE_URL"
    error = config_error(**{variable: url, other: None})

    assert error.variable == variable
    assert "must not carry a user name or password" in str(error)
    assert "Authorization header" in str(error)
    assert "svc" not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://{PASSWORD}.example.com",
        f"https://fn.example.com:{PASSWORD}/v1",
        f"{PASSWORD}",  # the key pasted into the wrong variable
        f"https://[{PASSWORD}/v1",
    ],
)
def test_a_malformed_functions_base_url_is_not_quoted(url: str) -> None:
    error = config_error(FUNCTIONS_BASE_URL=url)

    assert error.variable == "FUNCTIONS_BASE_URL"
    assert "must be an http(s) URL" in str(error)
    assert "example.com" not in str(error)


def test_functions_base_url_with_a_query_is_named() -> None:
    error = config_error(FUNCTIONS_BASE_URL="https://fn.example.com/v1?x=1")

    assert error.variable == "FUNCTIONS_BASE_URL"
    assert "query string" in str(error)


@pytest.mark.parametrize("key", ["clé-secrète", "key with spaces", "key\r\nX-Evil: 1", "k\x00"])
def test_a_service_role_key_no_header_can_carry_is_refused_without_showing_it(key: str) -> None:
    error = config_error(SUPABASE_SERVICE_ROLE_KEY=key)

    assert error.variable == "SUPABASE_SERVICE_ROLE_KEY"
    assert "characters an HTTP header cannot carry" in str(error)
    assert key not in str(error)


def test_missing_service_role_key_is_named() -> None:
    error = config_error(SUPABASE_SERVICE_ROLE_KEY=None)

    assert error.variable == "SUPABASE_SERVICE_ROLE_KEY"
    assert str(error).startswith("SUPABASE_SERVICE_ROLE_KEY is not set")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "MAX_CONCURRENCY must be a whole number, not 'abc'"),
        ("0", "MAX_CONCURRENCY must be between 1 and 1000, not 0"),
        ("-5", "MAX_CONCURRENCY must be between 1 and 1000, not -5"),
        ("2.5", "MAX_CONCURRENCY must be a whole number, not '2.5'"),
        ("1001", "MAX_CONCURRENCY must be between 1 and 1000, not 1001"),
    ],
)
def test_malformed_max_concurrency_is_named(value: str, message: str) -> None:
    error = config_error(MAX_CONCURRENCY=value)

    assert error.variable == "MAX_CONCURRENCY"
    assert str(error) == message


@pytest.mark.parametrize(
    "variable", ["MAX_JOBS_PER_TENANT", "MAX_JOBS_PER_RUN", "JOB_LEASE_SECONDS", "FAN_OUT_MAX"]
)
def test_other_whole_numbers_reject_text(variable: str) -> None:
    error = config_error(**{variable: "ten"})

    assert error.variable == variable
    assert str(error) == f"{variable} must be a whole number, not 'ten'"


@pytest.mark.parametrize("value", ["soon", "0", "nan", "inf", "-1"])
def test_malformed_http_timeout_is_named(value: str) -> None:
    error = config_error(HTTP_TIMEOUT_SECONDS=value)

    assert error.variable == "HTTP_TIMEOUT_SECONDS"
    assert str(error).startswith("HTTP_TIMEOUT_SECONDS must be")


def test_unknown_idempotency_store_is_named() -> None:
    error = config_error(IDEMPOTENCY_STORE="redis")

    assert error.variable == "IDEMPOTENCY_STORE"
    assert str(error) == "IDEMPOTENCY_STORE is 'redis'; use dynamodb, postgres or off"


def test_dynamodb_store_without_a_table_names_the_table_variable() -> None:
    error = config_error(IDEMPOTENCY_STORE="dynamodb")

    assert error.variable == "IDEMPOTENCY_TABLE"
    assert "IDEMPOTENCY_STORE=dynamodb" in str(error)


def test_job_routes_that_are_not_json_are_named() -> None:
    error = config_error(JOB_ROUTES="{ingest_slack: slack}")

    assert error.variable == "JOB_ROUTES"
    assert str(error).startswith("JOB_ROUTES is not valid JSON")


@pytest.mark.parametrize("raw", ['["ingest-slack"]', '"ingest-slack"', "42", "null"])
def test_job_routes_that_are_not_an_object_are_named(raw: str) -> None:
    error = config_error(JOB_ROUTES=raw)

    assert error.variable == "JOB_ROUTES"
    assert "must be a JSON object" in str(error)


@pytest.mark.parametrize(
    "function", ["ingest/slack", "..", "http://evil", "%2e%2e", "../admin", "-rf", ""]
)
def test_job_routes_with_a_function_that_is_not_a_path_segment_are_named(function: str) -> None:
    error = config_error(JOB_ROUTES=json.dumps({"ingest_slack": function}))

    assert error.variable == "JOB_ROUTES['ingest_slack']"
    assert str(error).startswith("JOB_ROUTES['ingest_slack'] must be a plain function name")
    assert repr(function) in str(error)


@pytest.mark.parametrize("limit", ["0", "-1", '"2"', "1.5", "true"])
def test_job_routes_with_a_bad_max_concurrency_are_named(limit: str) -> None:
    raw = f'{{"ingest_slack": {{"function": "ingest-slack", "max_concurrency": {limit}}}}}'

    error = config_error(JOB_ROUTES=raw)

    assert error.variable == "JOB_ROUTES['ingest_slack'].max_concurrency"
    assert str(error).startswith("JOB_ROUTES['ingest_slack'].max_concurrency must be")


# --- secrets stay out of repr and messages ---------------------------------------------------


def test_repr_of_settings_shows_neither_password_nor_service_key() -> None:
    result = settings()

    assert result.database is not None
    assert result.database.password == PASSWORD
    assert result.service_role_key == SERVICE_KEY
    assert PASSWORD not in repr(result)
    assert SERVICE_KEY not in repr(result)
    assert PASSWORD not in repr(result.database)
    assert PASSWORD not in str(result.database)


def test_settings_logged_by_powertools_show_neither_password_nor_service_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A JSON encoder writes a tuple out field by field: the records that hold a secret are not
    # tuples, so the logger falls back on their repr (docs/adr/0012-value-classes.md).
    from aws_lambda_powertools import Logger

    result = settings()
    logger = Logger(service="test-secrets")
    logger.info("settings", settings=result, database=result.database)

    line = json.loads(capsys.readouterr().out)
    assert line["settings"].startswith("Settings(")  # it was written, as its repr
    assert PASSWORD not in json.dumps(line)
    assert SERVICE_KEY not in json.dumps(line)


def test_settings_are_read_only_and_copied_with_replace() -> None:
    result = settings()
    assert result.database is not None

    with pytest.raises(AttributeError, match="read-only"):
        result.max_concurrency = 1  # type: ignore[misc]
    copy = result.database.replace(database="other")

    assert (copy.database, copy.password) == ("other", PASSWORD)
    assert result.database.database == "queue"
    assert copy != result.database
    assert copy.replace(database="queue") == result.database
    assert copy.replace(database="queue", source="elsewhere") == result.database  # not compared


@pytest.mark.parametrize(
    "changes",
    [
        {"DATABASE_URL": f"mysql://worker:{PASSWORD}@db/queue"},
        {"DATABASE_URL": f"postgresql://worker:{PASSWORD}@db/queue?sslmode=bogus"},
        {"DATABASE_URL": f"postgresql://worker:{PASSWORD}@db:99999/queue"},
        {"DATABASE_URL": f"postgresql://worker:{PASSWORD}@[db/queue"},
        {"DATABASE_URL": f"postgresql://worker:{PASSWORD}@db/queue?connect_timeout=x"},
        {"SUPABASE_URL": None},
        {"MAX_CONCURRENCY": "abc"},
        {"IDEMPOTENCY_STORE": "redis"},
        {"JOB_ROUTES": '{"a": "http://evil"}'},
    ],
)
def test_no_configuration_error_shows_a_secret(changes: dict[str, str | None]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings(**changes)

    assert PASSWORD not in str(caught.value)
    assert SERVICE_KEY not in str(caught.value)
    assert PASSWORD not in repr(caught.value)


@pytest.mark.parametrize("separator", ["/", "?", "#"])
def test_no_part_of_an_unescaped_password_shows_in_the_error(separator: str) -> None:
    url = f"postgresql://worker:hunter2{separator}rest@db.example.com/queue"

    with pytest.raises(ConfigurationError) as caught:
        settings(DATABASE_URL=url)

    assert "hunter2" not in str(caught.value)


# --- libpq URL forms -------------------------------------------------------------------------


def test_url_with_everything_spelled_out() -> None:
    result = parse_database_url(
        "postgresql://worker:secret@db.example.com:6543/queue?sslmode=require"
        "&connect_timeout=4&application_name=qw"
    )

    assert result == ConnectionSettings(
        host="db.example.com",
        port=6543,
        database="queue",
        user="worker",
        password="secret",
        sslmode="require",
        connect_timeout=4.0,
        application_name="qw",
    )


def test_user_and_password_are_percent_decoded() -> None:
    result = parse_database_url("postgresql://us%40er:p%40ss%3Aw%2Ford%23@db/queue")

    assert result.user == "us@er"
    assert result.password == "p@ss:w/ord#"


def test_host_without_port_uses_5432_and_database_defaults_to_postgres() -> None:
    result = parse_database_url("postgresql://worker@db.example.com")

    assert (result.host, result.port, result.database) == ("db.example.com", 5432, "postgres")
    assert result.password is None
    assert result.unix_socket is None


def test_unix_socket_from_host_parameter() -> None:
    result = parse_database_url("postgresql://worker@/queue?host=/run/postgresql")

    assert result.host is None
    assert result.unix_socket == "/run/postgresql/.s.PGSQL.5432"
    assert (result.user, result.database) == ("worker", "queue")


def test_unix_socket_uses_the_port_in_its_file_name() -> None:
    result = parse_database_url("postgresql://user@/db?host=/tmp&port=5433")

    assert result.unix_socket == "/tmp/.s.PGSQL.5433"  # noqa: S108 - a name compared, no file
    assert result.port == 5433
    assert (result.user, result.database) == ("user", "db")


def test_unix_socket_needs_no_tls() -> None:
    result = parse_database_url("postgresql://user@/db?host=/tmp&sslmode=require")

    assert result.sslmode == "disable"


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require"])
def test_every_libpq_sslmode_that_verifies_nothing_is_accepted_alone(mode: str) -> None:
    # (verify-ca and verify-full need a root certificate: tests/unit/test_database_url.py)
    assert parse_database_url(f"postgresql://u@db/q?sslmode={mode}").sslmode == mode


def test_sslmode_defaults_to_prefer() -> None:
    assert parse_database_url("postgresql://u@db/q").sslmode == "prefer"


def test_postgres_scheme_is_the_same_as_postgresql() -> None:
    assert parse_database_url("postgres://u:p@db:5433/q") == parse_database_url(
        "postgresql://u:p@db:5433/q"
    )


def test_describe_names_where_without_the_password() -> None:
    result = parse_database_url(f"postgresql://worker:{PASSWORD}@db.example.com:6543/queue")

    assert result.describe() == "worker@db.example.com:6543/queue"
    assert PASSWORD not in result.describe()


def test_describe_of_a_socket_names_the_socket() -> None:
    result = parse_database_url(f"postgresql://worker:{PASSWORD}@/queue?host=/tmp")

    assert result.describe() == "worker@/tmp/.s.PGSQL.5432/queue"


# --- retention durations ---------------------------------------------------------------------


def test_retentions_default_to_seven_and_thirty_days() -> None:
    result = settings()
    assert result.completed_retention == timedelta(days=7)
    assert result.dead_letter_retention == timedelta(days=30)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("36h", timedelta(hours=36)),
        ("90m", timedelta(minutes=90)),
        ("3600s", timedelta(hours=1)),
        ("2", timedelta(days=2)),
        ("0.5d", timedelta(hours=12)),
    ],
)
def test_a_retention_is_a_duration_with_a_unit(raw: str, expected: timedelta) -> None:
    assert settings(COMPLETED_RETENTION=raw).completed_retention == expected
    assert settings(DEAD_LETTER_RETENTION=raw).dead_letter_retention == expected


@pytest.mark.parametrize("raw", ["a week", "7w", "-1d", "P7D", "1e9d", "99999d"])
def test_a_malformed_retention_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings(COMPLETED_RETENTION=raw)
    assert caught.value.variable == "COMPLETED_RETENTION"


# --- the database part alone (the command line's) ----------------------------------------------


def test_parse_database_settings_reads_only_the_database_variables() -> None:
    result = parse_database_settings({"DATABASE_URL": ENV["DATABASE_URL"]})
    assert result is not None
    assert result.url_settings == parse_database_url(ENV["DATABASE_URL"])
    assert result.connection_settings() == settings().database


def test_parse_database_settings_is_none_without_url_or_secret() -> None:
    assert parse_database_settings({"SUPABASE_URL": "https://xyz.supabase.co"}) is None
    assert parse_database_settings({"DATABASE_URL": "  "}) is None


def test_parse_database_settings_takes_the_secret_when_there_is_no_url() -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf"
    result = parse_database_settings({"DATABASE_SECRET_ARN": arn})
    assert result is not None
    assert (result.url_settings, result.secret_arn) == (None, arn)
    assert parse_database_settings(
        {"DATABASE_SECRET_ARN": arn, "DATABASE_URL": ENV["DATABASE_URL"]}
    )
    with pytest.raises(ConfigurationError) as caught:
        parse_database_settings({"DATABASE_SECRET_ARN": "db-secret"})
    assert caught.value.variable == "DATABASE_SECRET_ARN"


def test_parse_database_settings_is_what_parse_settings_uses() -> None:
    """The same rules (one function): an error in DATABASE_URL is the same error either way."""
    bad = {"DATABASE_URL": "postgresql://u:p@h:99999/d"}
    with pytest.raises(ConfigurationError) as alone:
        parse_database_settings(bad)
    with pytest.raises(ConfigurationError) as whole:
        settings(**bad)
    assert str(alone.value) == str(whole.value)
