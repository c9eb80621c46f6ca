"""QueueStore's statements: limited by the server, per transaction; sent again after a lost
connection only when that is safe.

Each test holds a lock on queue_jobs in another session, so the store's statement waits for it
until the test lets it go or the server cancels it: nothing depends on how fast anything runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pg8000.native
import pytest

from handler.errors import DatabaseUnavailableError
from handler.queue.store import QueueStore
from tests.sql.conftest import wait_until_blocked

T = TypeVar("T")


def _pid(conn: pg8000.native.Connection) -> int:
    return int(conn.run("SELECT pg_backend_pid()")[0][0])


@pytest.fixture
def locker(connect: Callable[[], pg8000.native.Connection]) -> Iterator[pg8000.native.Connection]:
    """A session that holds queue_jobs locked (ACCESS EXCLUSIVE) until it rolls back."""
    session = connect()
    session.run("BEGIN")
    session.run("LOCK TABLE queue_worker.queue_jobs IN ACCESS EXCLUSIVE MODE")
    yield session
    session.run("ROLLBACK")


def test_a_statement_past_the_deadline_is_cancelled_by_the_server_and_leaves_no_limit_behind(
    conn: pg8000.native.Connection, locker: pg8000.native.Connection
) -> None:
    # Given a store whose statements must end within 0.3 s, and queue_jobs locked elsewhere
    store = QueueStore(conn)
    conn.run("SET lock_timeout = '20s'")  # without a statement limit, the test fails, not hangs
    store.limit_statements(time.monotonic() + 0.3)

    # When it reads the backlog, which waits for that lock
    with pytest.raises(DatabaseUnavailableError, match="statement_timeout"):
        store.backlog()

    # Then the server cancelled it; and once the lock is gone the next read goes through, and
    # its limit ends with its transaction: the connection (which a pooler would hand to someone
    # else) keeps the server's default
    locker.run("ROLLBACK")
    locker.run("BEGIN")
    store.limit_statements(time.monotonic() + 30)
    assert store.backlog()[0] == 0
    assert conn.run("SHOW statement_timeout") == [["0"]]


def _lose_connection_under(
    store: QueueStore,
    call: Callable[[], T],
    observer: pg8000.native.Connection,
    locker: pg8000.native.Connection,
) -> T:
    """Runs `call` (one statement of `store`, which waits for the locker's lock), kills the
    store's backend while the statement is on the server, lets the lock go, and returns what
    `call` returned (or raises what it raised)."""
    pid = _pid(store.conn)
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(call)
        wait_until_blocked(observer, pid)
        observer.run("SELECT pg_terminate_backend(:pid)", pid=pid)
        locker.run("ROLLBACK")
        locker.run("BEGIN")
        return running.result(timeout=30)


def test_a_statement_that_may_have_run_is_not_sent_again_after_a_lost_connection(
    connect: Callable[[], pg8000.native.Connection],
    conn: pg8000.native.Connection,
    locker: pg8000.native.Connection,
) -> None:
    # Given a store that opens its connections itself
    store = QueueStore(connect)

    # When its connection is lost while its enqueue is on the server (waiting for the lock),
    # then it reports the loss and does not guess: the enqueue is not sent again
    with pytest.raises(DatabaseUnavailableError, match="may or may not have been applied"):
        _lose_connection_under(
            store, lambda: store.enqueue(uuid.uuid4(), "ingest_slack", {}), conn, locker
        )
    assert conn.run("SELECT count(*) FROM queue_worker.queue_jobs") == [[0]]


def test_a_read_is_sent_again_on_a_new_connection_after_a_lost_one(
    connect: Callable[[], pg8000.native.Connection],
    conn: pg8000.native.Connection,
    locker: pg8000.native.Connection,
) -> None:
    # Given a store that opens its connections itself
    store = QueueStore(connect)
    pid = _pid(store.conn)

    # When its connection is lost while its backlog read is on the server, then the read, safe
    # to repeat, is sent again on a new connection and answers
    assert _lose_connection_under(store, store.backlog, conn, locker)[0] == 0
    assert _pid(store.conn) != pid
    store.close()
