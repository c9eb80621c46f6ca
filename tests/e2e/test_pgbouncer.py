"""The worker, its PostgreSQL idempotency store, the command line and migrate, through a real
PgBouncer in `pool_mode = transaction` (tests/pgbouncer.py), as Supabase's transaction pooler
(port 6543) would serve them: no statement, prepared statement, lock or setting may outlive its
transaction, since the next one may run on another server connection.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pg8000.native
import pytest

from handler.batch.runner import Summary
from handler.local.cli import main
from handler.local.standin import StandIn
from handler.queue import connection
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker
from tests.faults.accounting import account, enqueue_many, idempotency_records, sent
from tests.pgbouncer import PgBouncer

INVOCATIONS = 4
POOL_SIZE = 2  # server connections: fewer than the invocations, let alone their stores


@pytest.fixture(scope="module")
def bouncer(server_url: str) -> Iterator[PgBouncer]:
    with PgBouncer(server_url, pool_size=POOL_SIZE) as running:
        yield running


def test_a_batch_with_the_postgres_idempotency_store_runs_through_pgbouncer(
    bouncer: PgBouncer,
    database_url: str,
    conn: pg8000.native.Connection,
    standin: StandIn,
    make_worker: Callable[..., Worker],
) -> None:
    # Given 60 due jobs, and a worker whose database (and idempotency store) is PgBouncer
    jobs = enqueue_many(conn, uuid.uuid4(), "process_embeddings", 60)
    worker = make_worker(database_url=bouncer.url_like(database_url), idempotency_store="postgres")

    # When it runs one batch
    summary, backlog = worker.run(parse_event({}), remaining_seconds=60, request_id="pooled")

    # Then every job is sent once, recorded in the idempotency store, and completed
    assert (summary.claimed, summary.completed, summary.unsettled) == (60, 60, 0)
    assert backlog.due_now == 0
    assert account(conn, jobs) == {"completed": 60}
    assert idempotency_records(conn, jobs) == dict.fromkeys(jobs, "COMPLETED")
    assert sent(standin) == dict.fromkeys(jobs, 1)


def test_concurrent_invocations_share_a_pool_smaller_than_their_number(
    bouncer: PgBouncer,
    database_url: str,
    conn: pg8000.native.Connection,
    standin: StandIn,
    make_worker: Callable[..., Worker],
) -> None:
    # Given 400 due jobs of 8 tenants, and 4 invocations through a pool of 2 server connections
    jobs = [job for _ in range(8) for job in enqueue_many(conn, uuid.uuid4(), "ingest_slack", 50)]
    url = bouncer.url_like(database_url)
    workers = [
        make_worker(database_url=url, max_jobs_per_run="25", idempotency_store="postgres")
        for _ in range(INVOCATIONS)
    ]
    start = threading.Barrier(INVOCATIONS)
    results: list[list[Summary] | BaseException] = [RuntimeError("did not run")] * INVOCATIONS

    def invoke(n: int) -> None:
        try:
            start.wait()
            summaries = []
            while True:  # batches until one finds nothing
                summary, _ = workers[n].run(
                    parse_event({}), remaining_seconds=60, request_id=f"pooled-{n}"
                )
                summaries.append(summary)
                if summary.claimed == 0:
                    break
            results[n] = summaries
        except BaseException as exc:
            results[n] = exc

    # When they all drain the queue at once
    threads = [threading.Thread(target=invoke, args=(n,)) for n in range(INVOCATIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then none failed, and every job was claimed once, sent once and completed
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    summaries = [s for r in results if isinstance(r, list) for s in r]
    assert sum(s.claimed for s in summaries) == len(jobs)
    assert all(s.completed == s.claimed and s.unsettled == 0 for s in summaries)
    assert account(conn, jobs) == {"completed": len(jobs)}
    assert sent(standin) == dict.fromkeys(jobs, 1)


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"queue_worker_pooled_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(connection.parse_database_url(server_url))
    admin.run(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        admin.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_migrate_and_the_command_line_work_through_pgbouncer(
    bouncer: PgBouncer,
    fresh_database: str,
    standin: StandIn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given an empty database reached only through PgBouncer
    monkeypatch.setenv("DATABASE_URL", bouncer.url_like(fresh_database))
    monkeypatch.setenv("FUNCTIONS_BASE_URL", standin.base_url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "pooled-key")
    monkeypatch.setenv("IDEMPOTENCY_STORE", "postgres")
    tenant = str(uuid.uuid4())

    # When an operator migrates it, twice, and uses every kind of command
    assert cli(capsys, "migrate")[0] == 0
    assert cli(capsys, "migrate") == (0, "up to date: nothing to apply\n", "")
    assert cli(capsys, "migrate", "--check")[0] == 0
    status, job_id, _ = cli(capsys, "enqueue", tenant, "ingest_slack", '{"n": 1}')
    assert status == 0
    assert (
        cli(capsys, "schedules", "set", tenant, "nightly", "generate_digest", "0 6 * * *")[0] == 0
    )
    assert cli(capsys, "schedules", "list")[0] == 0
    status, out, _ = cli(capsys, "run", "--budget", "30")

    # Then each worked as it does on a direct connection
    assert status == 0
    assert '"completed": 1' in out
    assert [r.body["job_id"] for r in standin.requests()] == [job_id.strip()]
    status, out, _ = cli(capsys, "stats")
    assert status == 0
    assert '"completed": 1' in out
    assert cli(capsys, "dead-letters", "list")[0] == 0
