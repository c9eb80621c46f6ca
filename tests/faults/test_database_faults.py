"""The database goes away under a batch: a server restart, or the worker's connections killed,
while the calls are in flight; and a settlement that never gets through.

The stand-in holds every call (`hold`) until the fault has happened, so the fault falls between
dispatch and settle every time, not by luck of timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

from handler.batch.runner import Summary
from handler.local import embedded
from handler.local.standin import StandIn
from handler.queue import connection
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker
from tests.conftest import TEST_SEARCH_PATH, migrations

from .accounting import account, enqueue_many, expire_leases, idempotency_records, sent
from .conftest import RunBatch, settings_for

BATCH_TIMEOUT_S = 60


def run_while_held(
    worker: Worker, standin: StandIn, calls: int, fault: Callable[[], None]
) -> Summary:
    """Runs one batch whose calls the stand-in holds; once all `calls` have arrived, injects
    `fault`, then lets the calls answer and returns the batch's summary."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        batch = pool.submit(
            worker.run, parse_event({}), remaining_seconds=BATCH_TIMEOUT_S, request_id="fault"
        )
        try:
            standin.wait_for_requests(calls)
            fault()
        finally:
            standin.release()
        summary, _ = batch.result(timeout=BATCH_TIMEOUT_S)
    return summary


# -- PostgreSQL restarted mid-batch ----------------------------------------------------------


class RestartableServer:
    """An embedded PostgreSQL of this test's own: restarting the session's server (or a shared
    one at DATABASE_URL) would cut every other test's connections."""

    def __init__(self) -> None:
        try:
            self._module = embedded._server_module()
        except RuntimeError as exc:
            pytest.skip(f"no embedded PostgreSQL to restart: {exc}")
        self._root = Path(tempfile.mkdtemp(prefix="queue-worker-restart-"))
        self.data_dir = (self._root / "pgdata").resolve()
        self.url = embedded.start(self.data_dir, temporary=True)
        self._server = self._module.get_server(self.data_dir)

    def pg_ctl(self, *args: str) -> None:
        """Runs the embedded installation's pg_ctl as the server's own system user (the
        embedded server runs as a user of its own when the tests run as root)."""
        pg_ctl = Path(self._module.__file__).parent / "pginstall" / "bin" / "pg_ctl"
        result = subprocess.run(
            [str(pg_ctl), "-D", str(self.data_dir), "-w", *args],
            user=self._server.system_user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # a pipe would be inherited by the server: pg_ctl hangs
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            log = self.data_dir / "log"
            pytest.fail(f"pg_ctl {' '.join(args)} failed:\n{log.read_text()[-3000:]}")

    def restart(self) -> None:
        """A fast restart: every session is terminated, then the server starts again with the
        options it was started with."""
        self.pg_ctl("-m", "fast", "-l", str(self.data_dir / "log"), "restart")
        # The embedded package stops the postmaster it knows of at cleanup: the new one now.
        info = self._server._postmaster_info
        self._server._postmaster_info = type(info).read_from_pgdata(self.data_dir)

    def close(self) -> None:
        """Stops the server and deletes its data folder."""
        try:
            self._server.cleanup()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


@pytest.fixture
def restartable_server() -> Iterator[RestartableServer]:
    server = RestartableServer()
    try:
        conn = connection.connect(connection.parse_database_url(server.url))
        migrations.migrate(conn)
        conn.close()
        yield server
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.parametrize("run_mode", ["batch", "rounds"])
def test_postgresql_restarted_mid_batch(
    restartable_server: RestartableServer,
    standin: StandIn,
    worker_env: dict[str, str],
    run_mode: str,
) -> None:
    url = restartable_server.url
    settings = connection.parse_database_url(url)
    conn = connection.connect(settings)
    conn.run(TEST_SEARCH_PATH)
    jobs = enqueue_many(conn, uuid.uuid4(), "process_embeddings", 20)
    [[started_before]] = conn.run("SELECT pg_postmaster_start_time()")
    conn.close()
    standin.configure("process-embeddings", {"hold": True})
    worker = Worker(
        settings_for(worker_env, database_url=url, http_timeout_seconds="30", run_mode=run_mode)
    )
    try:
        # When the server restarts while all 20 calls are in flight
        summary = run_while_held(worker, standin, len(jobs), restartable_server.restart)
    finally:
        worker.close()

    conn = connection.connect(settings)

    conn.run(TEST_SEARCH_PATH)
    try:
        [[started_after]] = conn.run("SELECT pg_postmaster_start_time()")
        assert started_after > started_before  # it did restart: every old session is gone
        # Then the worker reconnects, records the answers and settles every job
        assert (summary.claimed, summary.completed) == (20, 20)
        assert (summary.unsettled, summary.stale, summary.released) == (0, 0, 0)
        assert account(conn, jobs) == {"completed": 20}
        assert idempotency_records(conn, jobs) == dict.fromkeys(jobs, "COMPLETED")
    finally:
        conn.close()
    assert sent(standin) == dict.fromkeys(jobs, 1)


# -- the worker's connections killed between dispatch and settle -----------------------------


def terminate_worker_connections(conn: pg8000.native.Connection, since: Any) -> list[int]:
    """Kills every queue-worker session on this database opened since `since` (the worker's
    queue connection and its idempotency store's pool), not this one, nor older sessions of
    other tests."""
    rows = conn.run(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'queue-worker' AND datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_start >= :since",
        since=since,
    )
    assert all(terminated for _, terminated in rows)
    return [pid for pid, _ in rows]


def test_connections_dropped_between_dispatch_and_settle(
    conn: pg8000.native.Connection,
    standin: StandIn,
    make_worker: Callable[..., Worker],
) -> None:
    jobs = enqueue_many(conn, uuid.uuid4(), "process_embeddings", 12)
    standin.configure("process-embeddings", {"hold": True})
    [[since]] = conn.run("SELECT now()")
    worker = make_worker(http_timeout_seconds="30")
    queue_pid = worker.store.conn.run("SELECT pg_backend_pid()")[0][0]
    killed: list[int] = []

    # When every connection of the worker is killed while all 12 calls are in flight
    summary = run_while_held(
        worker, standin, len(jobs), lambda: killed.extend(terminate_worker_connections(conn, since))
    )

    # (its queue connection, and the idempotency store's connections that took the records)
    assert queue_pid in killed
    assert len(killed) >= 2
    # Then the answers are recorded and settled on new connections, and nothing is sent twice
    assert (summary.claimed, summary.completed) == (12, 12)
    assert (summary.unsettled, summary.stale, summary.replayed) == (0, 0, 0)
    assert account(conn, jobs) == {"completed": 12}
    assert idempotency_records(conn, jobs) == dict.fromkeys(jobs, "COMPLETED")
    assert sent(standin) == dict.fromkeys(jobs, 1)


def test_a_settlement_that_never_gets_through_is_completed_later_without_a_second_call(
    conn: pg8000.native.Connection,
    standin: StandIn,
    run_batch: RunBatch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = enqueue_many(conn, uuid.uuid4(), "process_embeddings", 12)
    attempts: list[int] = []

    attempt = QueueStore._attempt

    def fail_settles(self: QueueStore, sql: str, params: dict[str, Any]) -> Any:
        if "settle_jobs" not in sql:
            return attempt(self, sql, params)
        attempts.append(len(json.loads(params["outcomes"])))
        # A connection that breaks at every settle: the reconnect and retry fail too.
        raise ConnectionResetError("server closed the connection unexpectedly")

    # When every settle of a batch fails, on the first connection and on the new one
    with monkeypatch.context() as patch:
        patch.setattr(QueueStore, "_attempt", fail_settles)
        first, _ = run_batch()
    assert (first.claimed, first.completed, first.unsettled) == (12, 0, 12)
    assert len(attempts) >= 2  # the reconnect was tried, and failed too
    assert account(conn, jobs) == {"processing": 12}
    assert sent(standin) == dict.fromkeys(jobs, 1)
    assert idempotency_records(conn, jobs) == dict.fromkeys(jobs, "COMPLETED")

    # Then, once the leases run out, the next batch completes them from their idempotency
    # records, without calling the function again
    assert expire_leases(conn) == 12
    second, _ = run_batch()
    assert (second.claimed, second.rescued, second.replayed, second.completed) == (12, 12, 12, 12)
    assert (second.unsettled, second.stale) == (0, 0)
    assert account(conn, jobs) == {"completed": 12}
    assert sent(standin) == dict.fromkeys(jobs, 1)
