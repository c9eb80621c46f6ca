"""Applies the versioned SQL files in handler/sql/migrations, once each, in order.

Each file runs in its own transaction together with its row in `queue_worker_migrations`; a
session-level advisory lock serialises concurrent runs, so running it twice (or twice at once)
is safe. A file already applied whose text has changed since is reported, not re-run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import pg8000.native

# Any constant will do; it only has to be the same for every queue-worker.
_LOCK_KEY = 7_261_400_917_338_129


@dataclass(frozen=True)
class Migration:
    version: str  # the file name without .sql, e.g. "0001_queue"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    folder = resources.files("handler.queue") / "sql" / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [Migration(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def migrate(conn: pg8000.native.Connection) -> list[str]:
    """Applies what is missing; returns the versions it applied (empty: nothing to do)."""
    conn.run("SELECT pg_advisory_lock(:key)", key=_LOCK_KEY)
    try:
        conn.run(
            "CREATE TABLE IF NOT EXISTS queue_worker_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.run("SELECT version FROM queue_worker_migrations")}
        applied = []
        for migration in available():
            if migration.version in done:
                continue
            conn.run("BEGIN")
            try:
                conn.execute_simple(migration.sql)
                conn.run(
                    "INSERT INTO queue_worker_migrations (version, checksum) VALUES (:v, :c)",
                    v=migration.version,
                    c=migration.checksum,
                )
                conn.run("COMMIT")
            except Exception:
                conn.run("ROLLBACK")
                raise
            applied.append(migration.version)
        return applied
    finally:
        conn.run("SELECT pg_advisory_unlock(:key)", key=_LOCK_KEY)


def changed_since_applied(conn: pg8000.native.Connection) -> list[str]:
    """Applied versions whose file no longer matches what was applied (never re-run: a
    migration is changed by a new one, not by editing an old one)."""
    exists = conn.run("SELECT to_regclass('queue_worker_migrations') IS NOT NULL")[0][0]
    if not exists:
        return []
    applied = dict(conn.run("SELECT version, checksum FROM queue_worker_migrations"))
    return [
        m.version for m in available() if m.version in applied and applied[m.version] != m.checksum
    ]


def pending(conn: pg8000.native.Connection) -> list[str]:
    """Versions not applied yet (all of them on an empty database)."""
    exists = conn.run("SELECT to_regclass('queue_worker_migrations') IS NOT NULL")[0][0]
    done = set()
    if exists:
        done = {row[0] for row in conn.run("SELECT version FROM queue_worker_migrations")}
    return [m.version for m in available() if m.version not in done]
