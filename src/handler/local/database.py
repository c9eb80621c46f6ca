"""Which database a `queue-worker` command works on.

DATABASE_URL or DATABASE_SECRET_ARN (with DATABASE_SSLROOTCERT), read by the Lambda's own rules
(`parse_database_settings`), so that an operator's command reaches the database the function
uses. With neither set: the embedded PostgreSQL in the user's data folder (see embedded.py),
started for the command, which says so in one line on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pg8000.native

from handler.errors import UsageError
from handler.local import embedded
from handler.queue import connection, migrations
from handler.queue.connection import ConnectionSettings
from handler.runtime.settings import DatabaseConfig, parse_database_settings

# Where the embedded database was before it moved to the user's data folder: relative to the
# folder a command was started from.
_OLD_DEFAULT = Path(".queue-worker") / "pgdata"


@dataclass(frozen=True)
class CommandDatabase:
    """The database of one command: the user's, or the embedded one (`embedded` set)."""

    config: DatabaseConfig
    embedded: embedded.Embedded | None = None

    def connection_settings(self) -> ConnectionSettings:
        """Where to connect (a DATABASE_SECRET_ARN secret is read now, cached)."""
        return self.config.connection_settings()

    def connect(self) -> pg8000.native.Connection:
        return connection.connect(self.connection_settings())


def resolve(
    data_dir: Path | None,
    *,
    migrate_new: bool = True,
    env: Mapping[str, str] = os.environ,
) -> CommandDatabase:
    """The database the environment names, or the embedded one in `data_dir` (--data-dir),
    QUEUE_WORKER_DATA_DIR or the default folder.

    migrate_new: a cluster this call has just created is migrated at once. Only `migrate`
    changes the schema of a database the user pointed us at (DATABASE_URL, the secret, or an
    embedded cluster that already existed: one that is behind is refused like any other, so an
    upgrade stays a step the user takes). A cluster created a moment ago by this very command
    is ours, empty, and of no use without the schema: a newcomer who runs `queue-worker
    enqueue` or `queue-worker run` first expects it to work, not to be told to migrate a
    database they never asked for.
    """
    config = parse_database_settings(env)
    if config is not None:
        if data_dir is not None:
            raise UsageError(
                "--data-dir names the embedded database, but DATABASE_URL (or "
                "DATABASE_SECRET_ARN) is set and names the database to use: drop one of them"
            )
        return CommandDatabase(config)
    folder, source = embedded.data_dir(data_dir, env)
    server = embedded.open_server(folder, source=source)
    url_config = parse_database_settings({"DATABASE_URL": server.url})
    assert url_config is not None  # a URL was given
    database = CommandDatabase(url_config, server)
    if server.created and migrate_new:
        conn = database.connect()
        try:
            migrations.migrate(conn)
        finally:
            conn.close()
    line = embedded_line(server, migrated=server.created and migrate_new)
    if server.created and source == "the default" and _OLD_DEFAULT.joinpath("PG_VERSION").exists():
        line += f"; an older one is in ./{_OLD_DEFAULT}: --data-dir {_OLD_DEFAULT} opens it"
    say(line)
    return database


def embedded_line(server: embedded.Embedded, *, migrated: bool = False, what: str = "") -> str:
    """The one line that tells where the embedded database is (and how to choose another)."""
    if server.created:
        state = "created an embedded PostgreSQL" + (" and migrated it" if migrated else "")
    else:
        state = "using the embedded PostgreSQL"
    return (
        f"{state}{what} in {server.data_dir} (DATABASE_URL picks another database, --data-dir"
        " another folder)"
    )


def say(message: str) -> None:
    """One line on stderr, as every message of the command line."""
    print(f"queue-worker: {message}", file=sys.stderr, flush=True)
