"""An embedded PostgreSQL for local runs and tests: no server to install, no port to pick.

It lives in one data folder per user, the platform's user data folder (`default_data_dir`):
`~/.local/share/queue-worker/pgdata` on Linux (under `$XDG_DATA_HOME` when that is set),
`~/Library/Application Support/queue-worker/pgdata` on macOS, `%LOCALAPPDATA%\\queue-worker\\pgdata`
on Windows; whichever folder a command is started from, it finds the same jobs.
QUEUE_WORKER_DATA_DIR (or the command line's --data-dir) moves it. The server listens on a unix
socket inside that folder. pgserver (PostgreSQL 16) serves Python up to 3.12, pgembed
(PostgreSQL 17, the same API) from 3.13 on; both are in the `local` extra, with platformdirs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.errors import ConfigurationError, DatabaseUnavailableError

APP_NAME = "queue-worker"
DATA_DIR_VARIABLE = "QUEUE_WORKER_DATA_DIR"

_started: list[Any] = []  # the servers this process opened, for release_all


@dataclass(frozen=True)
class Embedded:
    """A running embedded server."""

    url: str  # postgresql:// URL of its `postgres` database (unix socket, no password)
    data_dir: Path  # absolute
    created: bool  # the cluster was initialised by this start: it is new and empty


def default_data_dir() -> Path:
    """The platform's per-user data folder for queue-worker, plus `pgdata`."""
    import platformdirs  # with the embedded server's packages (the `local` extra)

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "pgdata"


def data_dir(explicit: Path | None = None, env: Mapping[str, str] = os.environ) -> tuple[Path, str]:
    """Where the embedded database lives, and what said so: the given folder (--data-dir),
    QUEUE_WORKER_DATA_DIR, or the default. The folder is absolute; `~` is expanded."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve(), "--data-dir"
    configured = env.get(DATA_DIR_VARIABLE, "").strip()
    if configured:
        return Path(configured).expanduser().resolve(), DATA_DIR_VARIABLE
    return default_data_dir().resolve(), "the default"


def _server_module() -> Any:
    for name in ("pgembed", "pgserver"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeError(
        "No DATABASE_URL is set and no embedded PostgreSQL is installed. Either set DATABASE_URL "
        "or install the local extra: pip install 'queue-worker[local]'."
    )


def open_server(
    folder: Path | None = None,
    *,
    keep_running: bool = False,
    temporary: bool = False,
    source: str = DATA_DIR_VARIABLE,
) -> Embedded:
    """Starts (or reuses) the embedded server in `folder` (default: `data_dir()`).

    Unless keep_running, the server stops when the last process using it exits; a temporary
    one is deleted then too. `source` names where the folder came from, for errors. Raises
    ConfigurationError (no embedded server installed, or a folder that cannot hold a cluster)
    or DatabaseUnavailableError (the server did not start: its log says why).
    """
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
            warnings.simplefilter("ignore")
            module = _server_module()
    except RuntimeError:
        raise ConfigurationError(
            "DATABASE_URL",
            "is not set, and no embedded PostgreSQL is installed to stand in for it: set "
            "DATABASE_URL, or install the local extra (pip install 'queue-worker[local]')",
        ) from None
    if folder is None:
        folder, source = data_dir()
    folder = folder.resolve()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "not a folder")
    except OSError as exc:
        raise ConfigurationError(
            source, f"names {str(folder)!r}, which cannot hold a database: {exc.strerror}"
        ) from None
    created = not (folder / "PG_VERSION").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as above
        mode = "delete" if temporary else None if keep_running else "stop"
        try:
            server = module.get_server(folder, cleanup_mode=mode)
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            # initdb or pg_ctl failed (a folder that is not a cluster, a cluster of another
            # PostgreSQL version, no room): the server's log has the story.
            raise DatabaseUnavailableError(
                f"the embedded PostgreSQL in {folder} did not start ({type(exc).__name__}); its "
                f"log is {folder / 'log'}"
            ) from None
    _started.append(server)
    return Embedded(str(server.get_uri("postgres")), folder, created)


def release_all() -> None:
    """Lets go of the servers this process opened, now rather than at exit (each stops, as at
    exit, when no other process uses it): for a process about to end without running its exit
    handlers."""
    while _started:
        server = _started.pop()
        with contextlib.suppress(Exception):  # stopping what may be half gone already
            server.cleanup()


def start(
    data_dir: Path | None = None, *, keep_running: bool = False, temporary: bool = False
) -> str:
    """Starts (or reuses) the embedded server in data_dir; returns its postgresql:// URL.

    Unless keep_running, the server stops when the last process using it exits; a temporary
    one is deleted then too.
    """
    return open_server(data_dir, keep_running=keep_running, temporary=temporary).url
