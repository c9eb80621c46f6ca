"""The worker's connection to the queue: one pg8000 connection, used by the batch's thread.

A call that fails because the connection broke (a restarted server, a dropped socket)
reconnects and is tried once more: every queue call is safe to repeat (a settle is fenced by
the lease, a claim takes only free jobs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import pg8000.native

from handler.queue import connection
from handler.queue.store import QueueStore

T = TypeVar("T")

_BROKEN = (pg8000.native.InterfaceError, OSError, connection.DatabaseUnavailableError)


def is_connection_lost(exc: BaseException) -> bool:
    """True when the connection is gone (not when the SQL was refused)."""
    if isinstance(exc, _BROKEN):
        return True
    if isinstance(exc, pg8000.native.DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        # 08: connection exception; 57: operator intervention (server shutting down, restarted).
        return str(exc.args[0].get("C", ""))[:2] in ("08", "57")
    return False


class Database:
    def __init__(self, settings_provider: Callable[[], connection.ConnectionSettings]) -> None:
        self._settings_provider = settings_provider
        self._store: QueueStore | None = None

    def connect(self) -> pg8000.native.Connection:
        """A new connection (for other users of the same database, e.g. the idempotency store)."""
        return connection.connect(self._settings_provider())

    def call(self, fn: Callable[[QueueStore], T]) -> T:
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
