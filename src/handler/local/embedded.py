"""An embedded PostgreSQL for local runs and tests: no server to install, no port to pick.

It lives in a data folder (by default `.queue-worker/pgdata` under the current directory) and
listens on a unix socket inside it. pgserver (PostgreSQL 16) serves Python up to 3.12, pgembed
(PostgreSQL 17, the same API) from 3.12 on; both are in the `local` extra.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(".queue-worker") / "pgdata"


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


def start(
    data_dir: Path | None = None, *, keep_running: bool = False, temporary: bool = False
) -> str:
    """Starts (or reuses) the embedded server in data_dir; returns its postgresql:// URL.

    Unless keep_running, the server stops when the last process using it exits; a temporary
    one is deleted then too.
    """
    folder = (data_dir or Path(os.environ.get("QUEUE_WORKER_DATA_DIR", DEFAULT_DATA_DIR))).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
        warnings.simplefilter("ignore")
        module = _server_module()
        mode = "delete" if temporary else None if keep_running else "stop"
        server = module.get_server(folder, cleanup_mode=mode)
    return str(server.get_uri("postgres"))
