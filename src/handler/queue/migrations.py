"""Applies the versioned SQL files in handler/queue/sql/migrations, once each, in order.

The missing files run in one transaction, each with its row in
`queue_worker.queue_worker_migrations`, under a transaction-level advisory lock taken before the
applied versions are read: concurrent runs take turns, none applies a file twice, and a failure
applies nothing. Nothing outlives the transaction (no session lock, no session setting), so
migrate works through a transaction pooler too. A file already applied whose text has changed since is reported, never
re-run: a released file is never edited, a change is a new file.

The queue's objects live in the schema `queue_worker` (docs/adr/0004-schema-and-grants.md).
Every file runs with `SET LOCAL search_path = queue_worker`, so the first files, written before
that schema existed, create their objects there; and from 0005 on `queue_lock_down()` runs after
each file. A database migrated by an earlier version keeps its migrations table in the schema it
was migrated into: it is moved into `queue_worker` first, and 0005 moves the rest.

Only `migrate` changes the schema. Every other entry point checks the version with
`check_schema` (one cheap query) and refuses a database that is not migrated or is behind.
"""

import contextlib
import hashlib
from importlib import resources
from importlib.resources.abc import Traversable
from typing import NamedTuple

import pg8000.native

from handler.errors import SchemaError

SCHEMA = "queue_worker"
# Any constant will do; it only has to be the same for every queue-worker.
_LOCK_KEY = 7_261_400_917_338_129
_TABLE = f"{SCHEMA}.queue_worker_migrations"


class Migration(NamedTuple):
    version: str  # the file name without .sql, e.g. "0001_queue"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _files() -> list[Traversable]:
    folder = resources.files("handler.queue") / "sql" / "migrations"
    return sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)


def available() -> list[Migration]:
    return [Migration(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in _files()]


def latest_version() -> str:
    """From the file names alone: every invocation checks it, and the files are large."""
    return _files()[-1].name.removesuffix(".sql")


def migrate(conn: pg8000.native.Connection) -> list[str]:
    """Applies what is missing, all in one transaction; returns the versions it applied
    (empty: nothing to do). A failure applies nothing."""
    conn.run("BEGIN")
    try:
        conn.run("SELECT pg_advisory_xact_lock(:key)", key=_LOCK_KEY)
        _prepare(conn)
        done = {row[0] for row in conn.run(f"SELECT version FROM {_TABLE}")}
        applied = []
        for migration in available():
            if migration.version in done:
                continue
            conn.run(f"SET LOCAL search_path = {SCHEMA}")
            conn.execute_simple(migration.sql)
            conn.run(
                f"INSERT INTO {_TABLE} (version, checksum) VALUES (:v, :c)",
                v=migration.version,
                c=migration.checksum,
            )
            if conn.run(f"SELECT to_regprocedure('{SCHEMA}.queue_lock_down()') IS NOT NULL")[0][0]:
                conn.run(f"SELECT {SCHEMA}.queue_lock_down()")
            applied.append(migration.version)
        conn.run("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return applied


def _prepare(conn: pg8000.native.Connection) -> None:
    """The schema and the migrations table, created (or moved from an earlier version's
    schema) inside the locked transaction."""
    conn.run(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    if conn.run(f"SELECT to_regclass('{_TABLE}') IS NOT NULL")[0][0]:
        return
    legacy = _legacy_schema(conn)
    if legacy is not None:
        conn.run(
            f"ALTER TABLE {pg8000.native.identifier(legacy)}.queue_worker_migrations"
            f" SET SCHEMA {SCHEMA}"
        )
        return
    conn.run(
        f"CREATE TABLE {_TABLE} ("
        " version text PRIMARY KEY, checksum text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )


def _legacy_schema(conn: pg8000.native.Connection) -> str | None:
    """The schema an earlier version (before 0005) kept its migrations table in, if any."""
    rows = conn.run(
        "SELECT n.nspname FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = 'queue_worker_migrations' AND c.relkind = 'r'"
        " AND n.nspname <> :schema ORDER BY n.nspname",
        schema=SCHEMA,
    )
    if len(rows) > 1:
        raise SchemaError(
            "more than one queue_worker_migrations table in this database "
            f"({', '.join(r[0] for r in rows)}): two installations; keep one"
        )
    return str(rows[0][0]) if rows else None


def _rollback(conn: pg8000.native.Connection) -> None:
    # When this fails the connection is broken; the error being raised says why.
    with contextlib.suppress(Exception):
        conn.run("ROLLBACK")


def applied_versions(conn: pg8000.native.Connection) -> dict[str, str]:
    """Applied version -> checksum (empty on a database never migrated)."""
    if not conn.run(f"SELECT to_regclass('{_TABLE}') IS NOT NULL")[0][0]:
        legacy = _legacy_schema(conn)
        if legacy is None:
            return {}
        table = f"{pg8000.native.identifier(legacy)}.queue_worker_migrations"
        return dict(conn.run(f"SELECT version, checksum FROM {table}"))
    return dict(conn.run(f"SELECT version, checksum FROM {_TABLE}"))


def changed_since_applied(conn: pg8000.native.Connection) -> list[str]:
    """Applied versions whose file no longer matches what was applied (never re-run: a
    migration is changed by a new one, not by editing an old one)."""
    applied = applied_versions(conn)
    return [
        m.version for m in available() if m.version in applied and applied[m.version] != m.checksum
    ]


def pending(conn: pg8000.native.Connection) -> list[str]:
    """Versions not applied yet (all of them on an empty database)."""
    done = applied_versions(conn)
    return [m.version for m in available() if m.version not in done]


def check_schema(conn: pg8000.native.Connection) -> str:
    """Refuses, with one line naming `queue-worker migrate`, a database whose queue schema is
    missing or older than this code; returns the version found. One query when all is well."""
    try:
        found = conn.run(f"SELECT {SCHEMA}.queue_schema_version()")[0][0]
    except pg8000.native.DatabaseError as exc:
        code = exc.args[0].get("C") if exc.args and isinstance(exc.args[0], dict) else None
        if code not in ("3F000", "42883", "42P01"):  # no schema, no function, no table
            raise
        _rollback_if_needed(conn)
        raise SchemaError(_missing_schema_message(conn)) from None
    expected = latest_version()
    if found is None or _number(str(found)) < _number(expected):
        raise SchemaError(
            f"the queue's schema is at {found or 'no version'} and this version of queue-worker "
            f"needs {expected}: run `queue-worker migrate` first"
        )
    return str(found)


def _missing_schema_message(conn: pg8000.native.Connection) -> str:
    try:
        legacy = _legacy_schema(conn)
    except Exception:
        legacy = None
    if legacy is not None:
        return (
            f"the queue's schema is from an earlier version (its tables are in {legacy}): "
            "run `queue-worker migrate` to upgrade it in place"
        )
    return "this database has no queue schema yet: run `queue-worker migrate` first"


def _rollback_if_needed(conn: pg8000.native.Connection) -> None:
    # Inside an explicit transaction the failed statement aborted it; outside, this is a no-op.
    _rollback(conn)


def _number(version: str) -> int:
    prefix = version.split("_", 1)[0]
    return int(prefix) if prefix.isdigit() else -1
