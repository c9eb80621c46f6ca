"""The worker's database access from async code: one thread owns the connection.

pg8000 is synchronous and a connection is not thread-safe, so every queue call runs in a single
dedicated thread; the event loop keeps dispatching meanwhile. A call that fails because the
connection broke (a restarted server, a dropped socket) reconnects and is tried once more:
every queue call is safe to repeat (the settle is fenced by the lease, the claim takes only
free jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pg8000.native

from handler import db
from handler.store import QueueStore

T = TypeVar("T")

_BROKEN = (pg8000.native.InterfaceError, OSError, db.DatabaseUnavailableError)


def is_connection_lost(exc: BaseException) -> bool:
    """True when the connection is gone (not when the SQL was refused)."""
    if isinstance(exc, _BROKEN):
        return True
    if isinstance(exc, pg8000.native.DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        # 08: connection exception; 57: operator intervention (server shutting down, restarted).
        return str(exc.args[0].get("C", ""))[:2] in ("08", "57")
    return False


class Database:
    def __init__(self, settings_provider: Callable[[], db.ConnectionSettings]) -> None:
        self._settings_provider = settings_provider
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-db")
        self._store: QueueStore | None = None
        self.statements = 0  # calls made, for the benchmark's statement count

    def connect(self) -> pg8000.native.Connection:
        """A new connection (for other users of the same database, e.g. the idempotency store)."""
        return db.connect(self._settings_provider())

    async def call(self, fn: Callable[[QueueStore], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.call_sync, fn)

    def call_sync(self, fn: Callable[[QueueStore], T]) -> T:
        """Runs fn with the store in the calling thread (the CLI's path, and the executor's)."""
        self.statements += 1
        try:
            return fn(self._get_store())
        except Exception as exc:
            if not is_connection_lost(exc):
                raise
            self._discard()
            return fn(self._get_store())

    def _get_store(self) -> QueueStore:
        if self._store is None:
            self._store = QueueStore(self.connect())
        return self._store

    def _discard(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):  # it is broken already
                self._store.conn.close()
            self._store = None

    def close(self) -> None:
        self._discard()
        self._executor.shutdown(wait=False)
