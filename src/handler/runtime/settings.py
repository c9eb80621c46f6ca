"""Configuration from the environment (the README's configuration table), read and validated once per container.

`parse_settings` is a pure function of the environment mapping, so every rule is unit-tested;
secrets named by *_SECRET_ARN are fetched later, on first use, through Powertools Parameters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from handler.dispatch.routes import Route, parse_routes
from handler.errors import ConfigurationError
from handler.frozen import Frozen
from handler.queue.connection import (
    ConnectionSettings,
    check_root_certificate,
    parse_database_url,
    settings_from_rds_secret,
)

IdempotencyStoreKind = Literal["dynamodb", "postgres", "off"]
RunMode = Literal["batch", "rounds"]
PoolMode = Literal["session", "transaction"]
# Supabase's transaction pooler listens here (its session pooler on 5432).
SUPABASE_TRANSACTION_POOLER_PORT = 6543
_Getter = Callable[[str], str | None]
N = TypeVar("N", int, float)

# How long a fetched secret is trusted before it is fetched again (rotation picks up within this).
SECRET_MAX_AGE_SECONDS = 300

_WEEK = timedelta(days=7)
_MONTH = timedelta(days=30)


# A plain read-only class, not a dataclass: that would compile its methods at every cold start
# (docs/adr/0012-value-classes.md). Two settings are equal only when they are the same object.
class Settings(Frozen):
    __slots__ = (
        "completed_retention",
        "database",
        "database_pool_mode",
        "database_secret_arn",
        "database_sslrootcert",
        "dead_letter_retention",
        "fan_out_max",
        "functions_base_url",
        "http_timeout_seconds",
        "idempotency_store",
        "idempotency_table",
        "job_lease_seconds",
        "linger",
        "max_concurrency",
        "max_jobs_per_invocation",
        "max_jobs_per_run",
        "max_jobs_per_tenant",
        "reserved_concurrency",
        "routes",
        "run_mode",
        "service_role_key",
        "service_role_key_secret_arn",
    )
    _hidden = frozenset({"database", "service_role_key"})

    functions_base_url: str
    # Exactly one of each pair is set; the secrets never appear in repr().
    database: ConnectionSettings | None
    database_secret_arn: str | None
    # DATABASE_SSLROOTCERT: the CA file (or "system") the database's certificate is verified
    # against, for the secret, and for DATABASE_URL when it names no sslrootcert of its own.
    database_sslrootcert: str | None
    service_role_key: str | None
    service_role_key_secret_arn: str | None
    max_jobs_per_tenant: int
    max_jobs_per_run: int
    max_concurrency: int
    http_timeout_seconds: float
    job_lease_seconds: int | None  # None: the invocation's remaining time plus a margin
    routes: Mapping[str, Route]
    idempotency_store: IdempotencyStoreKind
    idempotency_table: str | None
    fan_out_max: int  # asynchronous copies a scheduled run may start for a large backlog
    reserved_concurrency: int | None  # the function's reserved concurrency, if any
    completed_retention: timedelta
    dead_letter_retention: timedelta
    # batch: one batch per invocation; rounds: claim again as lanes free up, until the budget
    # or max_jobs_per_invocation, and (linger) wait for new work when nothing is due.
    run_mode: RunMode
    linger: bool
    max_jobs_per_invocation: int
    # transaction: the connection is a transaction pooler's (Supabase's port 6543), which
    # delivers no notifications: a lingering invocation polls.
    database_pool_mode: PoolMode

    def __init__(
        self,
        *,
        functions_base_url: str,
        database: ConnectionSettings | None = None,
        database_secret_arn: str | None = None,
        database_sslrootcert: str | None = None,
        service_role_key: str | None = None,
        service_role_key_secret_arn: str | None = None,
        max_jobs_per_tenant: int = 10,
        max_jobs_per_run: int = 1000,
        max_concurrency: int = 50,
        http_timeout_seconds: float = 30.0,
        job_lease_seconds: int | None = None,
        routes: Mapping[str, Route] | None = None,  # None: the default routes
        idempotency_store: IdempotencyStoreKind = "postgres",
        idempotency_table: str | None = None,
        fan_out_max: int = 0,
        reserved_concurrency: int | None = None,
        completed_retention: timedelta = _WEEK,
        dead_letter_retention: timedelta = _MONTH,
        run_mode: RunMode = "batch",
        linger: bool = True,
        max_jobs_per_invocation: int = 100_000,
        database_pool_mode: PoolMode = "session",
    ) -> None:
        if routes is None:  # the defaults, made per Settings: nothing shares a mutable one
            routes = parse_routes(None)
        self._fill(locals())

    def database_settings(self) -> ConnectionSettings:
        return DatabaseConfig(
            self.database, self.database_secret_arn, self.database_sslrootcert
        ).connection_settings()

    def service_role_key_value(self) -> str:
        if self.service_role_key is not None:
            return self.service_role_key
        assert self.service_role_key_secret_arn is not None
        return _check_header_safe(
            _service_key_from_secret(
                _fetch_secret(
                    self.service_role_key_secret_arn, "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN"
                )
            ),
            "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN",
        )


def parse_settings(env: Mapping[str, str]) -> Settings:
    """Validates the environment; raises ConfigurationError naming the first bad variable."""

    get = _getter(env)
    where = parse_database_settings(env)
    if where is None:
        raise ConfigurationError(
            "DATABASE_URL", "is not set (nor DATABASE_SECRET_ARN): where is the queue?"
        )

    key, key_arn = get("SUPABASE_SERVICE_ROLE_KEY"), get("SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN")
    if key is None and key_arn is None:
        raise ConfigurationError(
            "SUPABASE_SERVICE_ROLE_KEY", "is not set (nor SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN)"
        )
    if key is not None:
        _check_header_safe(key, "SUPABASE_SERVICE_ROLE_KEY")
    if key_arn is not None and key is None:
        _check_arn(key_arn, "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN")

    store = get("IDEMPOTENCY_STORE") or "postgres"
    if store not in ("dynamodb", "postgres", "off"):
        raise ConfigurationError(
            "IDEMPOTENCY_STORE", f"is {store!r}; use dynamodb, postgres or off"
        )
    table = get("IDEMPOTENCY_TABLE")
    if store == "dynamodb" and table is None:
        raise ConfigurationError(
            "IDEMPOTENCY_TABLE", "must name the DynamoDB table when IDEMPOTENCY_STORE=dynamodb"
        )

    lease = get("JOB_LEASE_SECONDS")
    run_mode = _choice(get, "RUN_MODE", ("batch", "rounds"), "batch")
    database = where.url_settings
    pool_default = (
        "transaction"
        if database is not None and database.port == SUPABASE_TRANSACTION_POOLER_PORT
        else "session"
    )
    pool_mode = _choice(get, "DATABASE_POOL_MODE", ("session", "transaction"), pool_default)
    return Settings(
        functions_base_url=_functions_base_url(get("FUNCTIONS_BASE_URL"), get("SUPABASE_URL")),
        database=database,
        database_secret_arn=where.secret_arn,
        database_sslrootcert=where.sslrootcert,
        service_role_key=key,
        service_role_key_secret_arn=None if key else key_arn,
        max_jobs_per_tenant=_int(get, "MAX_JOBS_PER_TENANT", 10, low=1, high=100_000),
        max_jobs_per_run=_int(get, "MAX_JOBS_PER_RUN", 1000, low=1, high=100_000),
        max_concurrency=_int(get, "MAX_CONCURRENCY", 50, low=1, high=1000),
        http_timeout_seconds=_float(get, "HTTP_TIMEOUT_SECONDS", 30.0, low=0.1, high=900.0),
        job_lease_seconds=_int(get, "JOB_LEASE_SECONDS", 0, low=1, high=86_400) if lease else None,
        routes=parse_routes(get("JOB_ROUTES")),
        idempotency_store=store,  # type: ignore[arg-type]  # checked above
        idempotency_table=table,
        fan_out_max=_int(get, "FAN_OUT_MAX", 0, low=0, high=1000),
        reserved_concurrency=_int(get, "RESERVED_CONCURRENCY", 0, low=0, high=100_000) or None,
        completed_retention=_duration(get, "COMPLETED_RETENTION", _WEEK),
        dead_letter_retention=_duration(get, "DEAD_LETTER_RETENTION", _MONTH),
        run_mode=run_mode,  # type: ignore[arg-type]  # one of the choices
        linger=_choice(get, "LINGER", ("true", "false"), "true") == "true",
        max_jobs_per_invocation=_int(
            get, "MAX_JOBS_PER_INVOCATION", 100_000, low=1, high=10_000_000
        ),
        database_pool_mode=pool_mode,  # type: ignore[arg-type]  # one of the choices
    )


class DatabaseConfig(Frozen):  # as Settings
    """Where the queue's database is: DATABASE_URL parsed, or DATABASE_SECRET_ARN, whose secret
    is read (through Powertools Parameters, cached) when the settings are asked for."""

    __slots__ = ("secret_arn", "sslrootcert", "url_settings")
    _hidden = frozenset({"url_settings"})

    url_settings: ConnectionSettings | None
    secret_arn: str | None  # only when there is no DATABASE_URL
    sslrootcert: str | None  # DATABASE_SSLROOTCERT, checked

    def __init__(
        self,
        url_settings: ConnectionSettings | None = None,
        secret_arn: str | None = None,
        sslrootcert: str | None = None,
    ) -> None:
        self._fill(locals())

    def connection_settings(self) -> ConnectionSettings:
        if self.url_settings is not None:
            return self.url_settings
        assert self.secret_arn is not None  # parse_database_settings guarantees one of the two
        return settings_from_rds_secret(
            _fetch_secret_json(self.secret_arn, "DATABASE_SECRET_ARN"),
            variable="DATABASE_SECRET_ARN",
            sslrootcert=self.sslrootcert,
        )


def parse_database_settings(env: Mapping[str, str]) -> DatabaseConfig | None:
    """The database part of the environment alone (DATABASE_URL, DATABASE_SECRET_ARN,
    DATABASE_SSLROOTCERT), validated as parse_settings validates it; None when neither
    DATABASE_URL nor DATABASE_SECRET_ARN is set. For the command line, which needs no
    functions to reach the database."""
    get = _getter(env)
    database_url, database_arn = get("DATABASE_URL"), get("DATABASE_SECRET_ARN")
    if database_url is None and database_arn is None:
        return None
    if database_arn is not None:
        _check_arn(database_arn, "DATABASE_SECRET_ARN")
    root = get("DATABASE_SSLROOTCERT")
    if root is not None:  # checked even when the URL names its own: a wrong path is a mistake
        root = check_root_certificate(root, "DATABASE_SSLROOTCERT")
    if database_url is not None:
        return DatabaseConfig(parse_database_url(database_url, sslrootcert=root), None, root)
    return DatabaseConfig(None, database_arn, root)


def _getter(env: Mapping[str, str]) -> _Getter:
    """A variable's value, stripped; None when unset or blank."""

    def get(name: str) -> str | None:
        value = env.get(name)
        return value.strip() if value is not None and value.strip() else None

    return get


_cached: Settings | None = None


def load_settings() -> Settings:
    """The container's settings: parsed from os.environ on first call, then reused."""
    global _cached  # noqa: PLW0603 - one parse per container is the point
    if _cached is None:
        _cached = parse_settings(os.environ)
    return _cached


def reset_settings_cache() -> None:
    """For tests and for the command line, which may change the environment between runs."""
    global _cached  # noqa: PLW0603
    _cached = None


def _functions_base_url(base: str | None, supabase: str | None) -> str:
    variable = "FUNCTIONS_BASE_URL" if base else "SUPABASE_URL"
    url = base or (f"{supabase.rstrip('/')}/functions/v1" if supabase else None)
    if url is None:
        raise ConfigurationError(
            "SUPABASE_URL", "is not set (nor FUNCTIONS_BASE_URL): where do jobs go?"
        )
    # The value is never quoted back: a key pasted into the wrong variable, or a URL with
    # credentials in it, would otherwise end up in the logs.
    if "@" in url:  # in the host part, or past a '/' in a password that cut it short
        raise ConfigurationError(
            variable,
            "must not carry a user name or password (user:password@host): the service role "
            "key travels in the Authorization header, from SUPABASE_SERVICE_ROLE_KEY",
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(
            variable,
            "must be an http(s) URL such as https://xyz.supabase.co (the value is not shown: "
            "check that it is the project's URL and nothing else)",
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(variable, "must not carry a query string or fragment")
    return url.rstrip("/")


def _choice(get: _Getter, name: str, choices: tuple[str, ...], default: str) -> str:
    raw = get(name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise ConfigurationError(name, f"is {raw!r}; use {' or '.join(choices)}")
    return raw.lower()


def _int(get: _Getter, name: str, default: int, *, low: int, high: int) -> int:
    return _number(get, name, default, int, what="a whole number", low=low, high=high)


def _float(get: _Getter, name: str, default: float, *, low: float, high: float) -> float:
    return _number(get, name, default, float, what="a number", low=low, high=high)


def _number(
    get: _Getter, name: str, default: N, kind: Callable[[str], N], *, what: str, low: N, high: N
) -> N:
    raw = get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigurationError(name, f"must be {what}, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigurationError(name, f"must be between {low} and {high}, not {value}")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)?", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}


def _duration(get: _Getter, name: str, default: timedelta) -> timedelta:
    """A duration such as 7d, 36h, 90m or 3600s; a bare number is days. At most 10 years."""
    raw = get(name)
    if raw is None:
        return default
    match = _DURATION.fullmatch(raw)
    if match is None:
        raise ConfigurationError(
            name, f"must be a duration such as 7d, 36h, 90m or 3600s, not {raw!r}"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "d").lower()]
    if seconds > 10 * 365 * 86_400:
        raise ConfigurationError(name, f"must be at most 10 years, not {raw!r}")
    return timedelta(seconds=seconds)


def _check_arn(value: str, variable: str) -> None:
    if not value.startswith("arn:") or ":secretsmanager:" not in value:
        raise ConfigurationError(
            variable, "must be a Secrets Manager ARN (arn:aws:secretsmanager:...)"
        )


def _fetch_secret(arn: str, variable: str) -> str:
    from aws_lambda_powertools.utilities import parameters  # only when a secret is used

    try:
        value = parameters.get_secret(arn, max_age=SECRET_MAX_AGE_SECONDS)
    except parameters.exceptions.GetParameterError as exc:
        # The ARN is not a secret; the SDK's message holds no secret value.
        raise ConfigurationError(
            variable, f"could not be read from Secrets Manager: {exc}"
        ) from None
    return value.decode() if isinstance(value, bytes) else str(value)  # type: ignore[unreachable]


def _fetch_secret_json(arn: str, variable: str) -> dict[str, object]:
    try:
        value = json.loads(_fetch_secret(arn, variable))
    except json.JSONDecodeError:
        raise ConfigurationError(
            variable, "secret is not JSON (expected the RDS secret shape)"
        ) from None
    if not isinstance(value, dict):
        raise ConfigurationError(
            variable, "secret is not a JSON object (expected the RDS secret shape)"
        )
    return value


def _check_header_safe(key: str, variable: str) -> str:
    """The key goes into the Authorization header: printable ASCII, no spaces. The message
    never quotes it."""
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ConfigurationError(
            variable,
            "holds a key with characters an HTTP header cannot carry (only printable ASCII "
            "without spaces): check that the whole key, and only the key, was pasted",
        )
    return key


def _service_key_from_secret(raw: str) -> str:
    """The secret may hold the key itself or a JSON object with one field holding it."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw.strip()
    if isinstance(value, dict):
        for name in ("SUPABASE_SERVICE_ROLE_KEY", "service_role_key", "key"):
            if isinstance(value.get(name), str):
                return str(value[name])
        raise ConfigurationError(
            "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN",
            "secret is JSON without a SUPABASE_SERVICE_ROLE_KEY, service_role_key or key field",
        )
    return raw.strip()
