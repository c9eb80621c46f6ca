"""Secrets from AWS Secrets Manager: DATABASE_SECRET_ARN (the RDS JSON shape) and
SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN (the key itself, or JSON holding it), fetched through
Powertools Parameters, cached, and never shown.

These tests talk HTTP to moto in server mode (`moto.server.ThreadedMotoServer` on a free local
port), not to AWS and not through moto's in-process mocks: boto3 is pointed at it with
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SECRETSMANAGER, dummy credentials and a region. Requests are
counted with moto's request recorder, driven through its `/moto-api/recorder/` endpoints.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pg8000.native
import pytest
from aws_lambda_powertools.utilities import parameters
from moto.moto_api import recorder

from handler import app
from handler.errors import EXIT_STATUS, ConfigurationError
from handler.local import cli
from handler.local.standin import StandIn
from handler.queue.connection import ConnectionSettings, parse_database_url
from handler.queue.store import QueueStore
from handler.runtime.settings import parse_settings
from tests.conftest import use_fake_aws

from .conftest import FakeLambdaContext

REGION = "eu-west-1"
SECRET_KEY = "sk-from-secrets-manager-8d02e6"
DB_PASSWORD = "rds-secret-password-41c7f0"
BASE = {"FUNCTIONS_BASE_URL": "https://functions.example.test"}


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Dummy credentials and the moto endpoint for every boto3 client made in the test, and an
    empty Powertools parameter cache (its providers keep the client of the first call too)."""
    use_fake_aws(monkeypatch, tmp_path, REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETSMANAGER", moto_endpoint)
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    yield
    parameters.clear_caches()  # type: ignore[no-untyped-call]


@pytest.fixture
def secretsmanager(aws_env: None) -> Any:
    return boto3.client("secretsmanager")


@pytest.fixture
def create_secret(secretsmanager: Any) -> Callable[[str | dict[str, Any]], str]:
    """Stores a secret (a dict is stored as JSON); returns its ARN."""

    def _create(value: str | dict[str, Any]) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        name = f"queue-worker/test/{uuid.uuid4().hex[:8]}"
        return str(secretsmanager.create_secret(Name=name, SecretString=text)["ARN"])

    return _create


@pytest.fixture
def secret_reads(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[[], int]]:
    """Counts GetSecretValue requests that reach moto, from the start of the test."""
    monkeypatch.setattr(recorder, "_location", str(tmp_path / "moto-requests.jsonl"))

    def moto_api(action: str) -> str:
        request = urllib.request.Request(  # noqa: S310 - the local moto server
            f"{moto_endpoint}/moto-api/recorder/{action}",
            method="GET" if action.startswith("download") else "POST",
        )
        with urllib.request.urlopen(request) as response:  # noqa: S310
            return str(response.read().decode())

    moto_api("reset-recording")
    moto_api("start-recording")

    def count() -> int:
        recorded = [json.loads(line) for line in moto_api("download-recording").splitlines()]
        return sum(
            1
            for entry in recorded
            if entry["headers"].get("X-Amz-Target") == "secretsmanager.GetSecretValue"
        )

    yield count
    moto_api("stop-recording")


def rds_secret(database_url: str) -> dict[str, Any]:
    """The test database in the RDS secret shape. A unix-socket URL has no TCP host: the secret
    then names a host that is never connected to (only the resolution is checked)."""
    where = parse_database_url(database_url)
    return {
        "engine": "postgres",
        "host": where.host or "queue-db.cluster-abc.eu-west-1.rds.amazonaws.com",
        "port": where.port,
        "username": where.user,
        "password": DB_PASSWORD,
        "dbname": where.database,
    }


# Resolution -----------------------------------------------------------------------------------


@pytest.fixture
def rds_ca_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A CA file standing in for the RDS bundle, and a home folder without libpq's default
    root file (~/.postgresql/root.crt), which would count too."""
    import trustme

    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "global-bundle.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_database_settings_resolve_from_an_rds_secret(
    create_secret: Callable[..., str], database_url: str, rds_ca_file: str
) -> None:
    # Given an RDS-shaped secret and its ARN in the environment, with the RDS CA bundle
    secret = rds_secret(database_url)
    arn = create_secret(secret)
    settings = parse_settings(
        BASE
        | {
            "DATABASE_SECRET_ARN": arn,
            "DATABASE_SSLROOTCERT": rds_ca_file,
            "SUPABASE_SERVICE_ROLE_KEY": "k",
        }
    )
    # When the database settings are needed
    resolved = settings.database_settings()
    # Then they are the secret's, with TLS verified against the bundle (verify-full)
    assert resolved == ConnectionSettings(
        host=secret["host"],
        port=secret["port"],
        database=secret["dbname"],
        user=secret["username"],
        password=DB_PASSWORD,
        sslmode="verify-full",
        sslrootcert=rds_ca_file,
    )
    assert settings.database is None
    assert DB_PASSWORD not in repr(settings) + repr(resolved) + resolved.describe()


def test_an_rds_secret_without_a_root_certificate_names_database_sslrootcert(
    create_secret: Callable[..., str], database_url: str, rds_ca_file: str
) -> None:
    # Given the secret's ARN and no DATABASE_SSLROOTCERT
    arn = create_secret(rds_secret(database_url))
    settings = parse_settings(BASE | {"DATABASE_SECRET_ARN": arn, "SUPABASE_SERVICE_ROLE_KEY": "k"})
    # When the database settings are needed, Then the variable to set is named
    with pytest.raises(ConfigurationError) as caught:
        settings.database_settings()
    assert caught.value.variable == "DATABASE_SSLROOTCERT"
    assert "global-bundle.pem" in str(caught.value)
    assert DB_PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "stored",
    [
        SECRET_KEY,
        {"SUPABASE_SERVICE_ROLE_KEY": SECRET_KEY},
        {"service_role_key": SECRET_KEY, "note": "rotated monthly"},
    ],
    ids=["plain-string", "json-with-the-variable-name", "json-with-service_role_key"],
)
def test_the_service_role_key_resolves_from_a_plain_or_json_secret(
    stored: str | dict[str, Any], create_secret: Callable[..., str], database_url: str
) -> None:
    # Given a secret holding the key, and only its ARN in the environment
    arn = create_secret(stored)
    settings = parse_settings(
        BASE | {"DATABASE_URL": database_url, "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN": arn}
    )
    # When the key is needed, then it is the stored key itself
    assert settings.service_role_key_value() == SECRET_KEY
    assert SECRET_KEY not in repr(settings)


# Errors ---------------------------------------------------------------------------------------


def test_a_key_secret_holding_more_than_a_key_fails_without_showing_it(
    create_secret: Callable[..., str], database_url: str
) -> None:
    arn = create_secret(f"{SECRET_KEY}\nsomething pasted along with it")
    settings = parse_settings(
        BASE | {"DATABASE_URL": database_url, "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN": arn}
    )
    with pytest.raises(ConfigurationError, match="characters an HTTP header cannot carry") as e:
        settings.service_role_key_value()
    assert e.value.variable == "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"
    assert SECRET_KEY not in str(e.value)


@pytest.mark.parametrize(
    "variable", ["DATABASE_SECRET_ARN", "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"]
)
def test_an_arn_naming_no_secret_fails_naming_the_variable(
    variable: str, aws_env: None, create_secret: Callable[..., str], database_url: str
) -> None:
    # Given an ARN of the right form that names no secret (a real secret exists beside it)
    create_secret(SECRET_KEY)
    missing = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:queue-worker/nope-AbCdEf"
    env = BASE | {"DATABASE_URL": database_url, "SUPABASE_SERVICE_ROLE_KEY": "k", variable: missing}
    env.pop("DATABASE_URL" if variable == "DATABASE_SECRET_ARN" else "SUPABASE_SERVICE_ROLE_KEY")
    settings = parse_settings(env)
    read = (
        settings.database_settings
        if variable == "DATABASE_SECRET_ARN"
        else settings.service_role_key_value
    )
    # When the secret is needed
    with pytest.raises(ConfigurationError) as raised:
        read()
    # Then the error names the variable, says Secrets Manager could not read it, and holds no
    # secret value
    assert raised.value.variable == variable
    assert str(raised.value).startswith(f"{variable} could not be read from Secrets Manager")
    assert SECRET_KEY not in str(raised.value)


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        (SECRET_KEY, "secret is not JSON"),
        (["not", "an", "object", SECRET_KEY], "secret is not a JSON object"),
        (
            {"host": "db.internal", "username": "app", "dbname": SECRET_KEY},
            "secret lacks password",
        ),
        (
            {"host": "db", "username": "u", "password": SECRET_KEY, "port": "fivefourthreetwo"},
            "secret has a port that is not a number",
        ),
    ],
    ids=["plain-string", "json-array", "no-password", "bad-port"],
)
def test_a_database_secret_of_the_wrong_shape_fails_naming_the_variable_not_the_value(
    stored: Any, problem: str, create_secret: Callable[..., str]
) -> None:
    # Given DATABASE_SECRET_ARN naming a secret that is not an RDS secret
    text = stored if isinstance(stored, str) else json.dumps(stored)
    arn = create_secret(text)
    settings = parse_settings(BASE | {"DATABASE_SECRET_ARN": arn, "SUPABASE_SERVICE_ROLE_KEY": "k"})
    # When the database settings are needed
    with pytest.raises(ConfigurationError) as raised:
        settings.database_settings()
    # Then the error names the variable and the problem, and never the secret's content
    assert raised.value.variable == "DATABASE_SECRET_ARN"
    assert problem in str(raised.value)
    assert SECRET_KEY not in str(raised.value)


def test_a_key_secret_that_is_json_without_a_known_field_fails_without_showing_it(
    create_secret: Callable[..., str], database_url: str
) -> None:
    arn = create_secret({"anon_key": SECRET_KEY})
    settings = parse_settings(
        BASE | {"DATABASE_URL": database_url, "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN": arn}
    )
    with pytest.raises(ConfigurationError) as raised:
        settings.service_role_key_value()
    assert raised.value.variable == "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"
    assert SECRET_KEY not in str(raised.value)


@pytest.mark.parametrize(
    "variable", ["DATABASE_SECRET_ARN", "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"]
)
def test_a_value_that_is_not_a_secrets_manager_arn_is_refused_at_parse_time(
    variable: str, database_url: str
) -> None:
    env = BASE | {"DATABASE_URL": database_url, "SUPABASE_SERVICE_ROLE_KEY": "k"}
    env.pop("DATABASE_URL" if variable == "DATABASE_SECRET_ARN" else "SUPABASE_SERVICE_ROLE_KEY")
    with pytest.raises(ConfigurationError) as raised:
        parse_settings(env | {variable: "queue-worker/prod/db"})
    assert raised.value.variable == variable


# Caching --------------------------------------------------------------------------------------


def test_each_secret_is_fetched_once_then_served_from_the_powertools_cache(
    create_secret: Callable[..., str],
    secretsmanager: Any,
    secret_reads: Callable[[], int],
    database_url: str,
    rds_ca_file: str,
) -> None:
    # Given both secrets, named by ARN
    db_arn = create_secret(rds_secret(database_url))
    key_arn = create_secret({"SUPABASE_SERVICE_ROLE_KEY": SECRET_KEY})
    settings = parse_settings(
        BASE
        | {
            "DATABASE_SECRET_ARN": db_arn,
            "DATABASE_SSLROOTCERT": rds_ca_file,
            "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN": key_arn,
        }
    )
    assert secret_reads() == 0
    # When each is read three times, and then deleted from Secrets Manager
    for _ in range(3):
        database = settings.database_settings()
        key = settings.service_role_key_value()
    # Then Secrets Manager was asked once for each
    assert secret_reads() == 2
    for arn in (db_arn, key_arn):
        secretsmanager.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
    # and the cached values are still served (until the cache's max age passes)
    assert settings.database_settings() == database
    assert settings.service_role_key_value() == key == SECRET_KEY
    assert secret_reads() == 2
    # while a cleared cache goes back to Secrets Manager, which no longer has them
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    with pytest.raises(ConfigurationError, match="SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"):
        settings.service_role_key_value()
    assert secret_reads() == 3


# A real batch ---------------------------------------------------------------------------------


def test_the_fetched_key_is_the_one_sent_in_authorization_and_is_never_logged(
    lambda_env: dict[str, str],
    create_secret: Callable[..., str],
    secret_reads: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
    queue: QueueStore,
    standin: StandIn,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given the Lambda configured with the key's ARN only, and two due jobs, one echoing the
    # Authorization header back in its error
    arn = create_secret({"SUPABASE_SERVICE_ROLE_KEY": SECRET_KEY})
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN", arn)
    caplog.set_level(logging.DEBUG, logger="queue-worker")  # everything the worker logs
    tenant = uuid.uuid4()
    queue.enqueue(tenant, "ingest_slack", {})
    queue.enqueue(tenant, "ingest_slack", {"simulate": {"status": 500, "body": SECRET_KEY}})
    # When two invocations run on the same container
    first = app.lambda_handler({}, FakeLambdaContext())
    queue.enqueue(tenant, "send_fax", {})  # an unknown type: no call
    queue.enqueue(tenant, "generate_digest", {})
    second = app.lambda_handler({}, FakeLambdaContext())
    # Then every call carried the key from Secrets Manager, fetched once for both invocations
    assert (first["completed"], first["retried"]) == (1, 1)
    assert (second["completed"], second["dead_lettered"]) == (1, 1)
    requests = standin.requests()
    assert len(requests) == 3
    assert {r.headers["authorization"] for r in requests} == {f"Bearer {SECRET_KEY}"}
    assert secret_reads() == 1
    # and the key shows nowhere: not in logs, not in the stored error
    out = capsys.readouterr()
    assert "Job not completed" in caplog.text  # the worker's lines were captured
    assert SECRET_KEY not in out.out + out.err + caplog.text + json.dumps([first, second])
    [stored_error] = queue.conn.run("SELECT last_error FROM queue_jobs WHERE status = 'pending'")
    assert SECRET_KEY not in stored_error[0]


def test_a_batch_reaches_the_database_named_by_an_rds_secret(
    lambda_env: dict[str, str],
    database_url: str,
    create_secret: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if parse_database_url(database_url).host is None:
        pytest.skip(
            "the test database is on a unix socket, which an RDS secret (a TCP host) cannot name;"
            " run with DATABASE_URL=postgresql://...@host:port/... to connect through the secret"
        )
    # Given the Lambda configured with the database's secret ARN only (the test server offers no
    # TLS, so the secret says so; an RDS secret carries no sslmode and gets "verify-full")
    secret = rds_secret(database_url) | {"sslmode": "disable"}
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DATABASE_SECRET_ARN", create_secret(secret))
    job = queue.enqueue(uuid.uuid4(), "process_embeddings", {})
    # When the handler runs a batch
    result = app.lambda_handler({}, FakeLambdaContext())
    # Then it claimed and completed the job in that database, and never showed the password
    assert (result["claimed"], result["completed"]) == (1, 1)
    [[status]] = conn.run("SELECT status FROM queue_jobs WHERE id = :id", id=str(job))
    assert status == "completed"
    out = capsys.readouterr()
    assert DB_PASSWORD not in out.out + out.err


# The command line: an operator's commands reach the database the secret names ----------------


@pytest.fixture
def cli_secret_env(
    create_secret: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> Callable[[dict[str, Any]], str]:
    """Points the command line at an RDS secret only (no DATABASE_URL); returns its ARN."""

    def _point(secret: dict[str, Any]) -> str:
        arn = create_secret(secret)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        monkeypatch.delenv("DATABASE_SSLROOTCERT", raising=False)
        monkeypatch.setenv("DATABASE_SECRET_ARN", arn)
        return arn

    return _point


def test_the_command_line_connects_where_the_secret_says_and_never_shows_the_password(
    cli_secret_env: Callable[[dict[str, Any]], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a secret naming a host and port where nothing listens (any test server will do)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli_secret_env(
        {
            "host": "127.0.0.1",
            "port": port,
            "username": "ops_from_secret",
            "password": DB_PASSWORD,
            "dbname": "queue_from_secret",
            "sslmode": "disable",
        }
    )
    for command in (["stats"], ["migrate"]):
        # When a command runs, Then it tried exactly the secret's database (exit 3: unreachable)
        assert cli.main(command) == EXIT_STATUS["unreachable"]
        err = capsys.readouterr().err
        assert f"ops_from_secret@127.0.0.1:{port}/queue_from_secret" in err
        assert err.count("\n") == 1
        assert DB_PASSWORD not in err


def test_the_command_line_takes_database_sslrootcert_for_the_secret(
    cli_secret_env: Callable[[dict[str, Any]], str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given an RDS secret (verify-full by default) and no root certificate
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt either
    cli_secret_env(rds_secret("postgresql://ops@queue-db.example.test:5432/queue"))
    # When a command runs, Then it names DATABASE_SSLROOTCERT (the configuration to fix)
    assert cli.main(["stats"]) == EXIT_STATUS["configuration"]
    assert "DATABASE_SSLROOTCERT" in capsys.readouterr().err


def test_the_command_line_works_on_the_database_an_rds_secret_names(
    cli_secret_env: Callable[[dict[str, Any]], str],
    database_url: str,
    queue: QueueStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if parse_database_url(database_url).host is None:
        pytest.skip(
            "the test database is on a unix socket, which an RDS secret (a TCP host) cannot name;"
            " run with DATABASE_URL=postgresql://...@host:port/... to connect through the secret"
        )
    # Given the test database named by a secret only
    cli_secret_env(rds_secret(database_url) | {"sslmode": "disable"})
    # When an operator enqueues, looks at the stats and checks the migrations
    assert cli.main(["enqueue", str(uuid.uuid4()), "ingest_slack"]) == 0
    job = uuid.UUID(capsys.readouterr().out.strip())
    assert cli.main(["stats"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert cli.main(["migrate", "--check"]) == 0
    # Then each worked on that database
    assert queue.get_job(job) is not None
    assert stats["by_status"] == {"pending": 1}
    assert capsys.readouterr().out == "up to date: nothing to apply\n"
