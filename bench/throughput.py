"""Throughput: draining N jobs into HTTP functions, ours against the seed's design and two peers.

Contenders (each run in a fresh child process, so imports, pools and clients never leak):

1. ``ours``: one batch through the worker's real code path,
   ``handler.worker.Worker(parse_settings(env)).run(parse_event({}), remaining_seconds=600, ...)``
   with ``MAX_JOBS_PER_TENANT=100000``, ``MAX_JOBS_PER_RUN=N``, ``MAX_CONCURRENCY=50``,
   ``IDEMPOTENCY_STORE=off``;
2. ``ours + PostgreSQL idempotency store``: the same with ``IDEMPOTENCY_STORE=postgres``;
3. the seed's design: claim one job (``claim_next_job``), POST it, settle it (``complete_job``),
   one at a time, over pg8000 and a synchronous ``httpx.Client``;
4. PgQueuer and 5. procrastinate, each POSTing every job from an entrypoint/task per job type
   with an async HTTP client (50 requests in flight), at the settings ``--tune`` found best
   (``PEER_SETTINGS`` below; ``bench/results/peer_tuning.md``), twice over: with
   ``httpx.AsyncClient`` 0.28 (the httpx API, as ours: "the best peer" of the targets), and
   with ``aiohttp.ClientSession`` (outside the httpx API).

Workloads: ``--jobs 5000 --delay-ms 0`` and ``--jobs 1000 --delay-ms 50`` (default: both).
The jobs (10 tenants, the 5 job types of the default routes, payload ``{"seq": i}``) are
inserted in bulk before each run (ours and the seed: one ``INSERT ... SELECT generate_series``;
the peers: their own bulk enqueue), then ``VACUUM ANALYZE`` and ``CHECKPOINT``. Every contender
has a database of its own on the same server. The functions are ``handler.local.standin`` (its own
process) answering 200 after the delay; it records every request, so each run is checked: every
``seq`` delivered exactly once, and every job finished in the contender's own tables. A
contender that loses or repeats jobs is reported as such.

Time: from the start of the run (before the contender opens its first connection; its imports
are done) to the end of its last settle statement. Repetitions are interleaved, the order of
contenders rotated each time; medians (min-max).

A last phase counts the SQL statements one batch of ``ours`` sends, by kind, for N = 100, 1000
and 5000, with and without the idempotency store.

Run (about 20 minutes; writes ``bench/results/throughput.md``)::

    python bench/throughput.py --database-url postgresql://postgres@localhost:5432/postgres

Without ``--database-url`` an embedded PostgreSQL in a temporary folder is used. ``--quick``
is a smoke test of the script (few jobs, one repetition). ``--tune`` measures the peers'
settings instead and writes ``bench/results/peer_tuning.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import benchlib

CONCURRENCY = 50
WORKLOADS = ((5000, 0.0), (1000, 50.0))
STATEMENT_COUNT_JOBS = (100, 1000, 5000)
REPETITIONS = 3
CHILD_TIMEOUT_S = 900.0
HTTP_TIMEOUT_S = 30.0
DATABASE_PREFIX = "qw_bench_"

CONTENDERS = {
    "ours": "ours",
    "ours-warm": "ours, warm container",
    "ours-idem": "ours + PostgreSQL idempotency store",
    "seed": "the seed's design (claim one, POST, settle)",
    "pgqueuer": "PgQueuer (aiohttp)",
    "procrastinate": "procrastinate (aiohttp)",
    "pgqueuer-httpx": "PgQueuer (httpx 0.28)",
    "procrastinate-httpx": "procrastinate (httpx 0.28)",
    "floor": "httpx alone, no queue (the floor)",
}
# Not a queue: 50 threads POSTing the same requests as ours through httpx.HTTPTransport, one
# connection each, on one CPU as ours dispatches, with no database at all. What any worker
# sending through httpx from 50 threads could reach on this machine; ours is shown as a share
# of it.
FLOOR = "floor"
PEERS = ("pgqueuer", "procrastinate")
# The comparison the targets are about: the peers POSTing through the same package as ours
# (httpx 0.28, the client the figures for the peers were taken with). The aiohttp rows
# show how far a client outside that API takes them.
SAME_API_PEERS = ("pgqueuer-httpx", "procrastinate-httpx")
PEER_FAMILIES = {
    "httpx.AsyncClient 0.28": SAME_API_PEERS,
    "aiohttp (not the httpx API)": ("pgqueuer", "procrastinate"),
}
OURS = ("ours", "ours-warm", "ours-idem")

# The peers' best settings, from `--tune` (bench/results/peer_tuning.md): for each peer and
# HTTP client, the variant with the best geometric mean of its medians over both workloads
# (several are within the noise of each other). 50 connections everywhere.
_PGQUEUER = {"concurrency_limit": 0, "driver": "connection"}
PEER_SETTINGS: dict[str, dict[str, Any]] = {
    "pgqueuer": _PGQUEUER | {"batch_size": 100, "http": "aiohttp"},
    # httpx 0.28's pool costs more per request the more requests are in flight: small batches.
    "pgqueuer-httpx": _PGQUEUER | {"batch_size": 10, "http": "httpx"},
    "procrastinate": {"concurrency": 50, "pool_size": 4, "http": "aiohttp"},
    "procrastinate-httpx": {
        "concurrency": 50,
        "pool_size": 10,
        "listen_notify": False,
        "http": "httpx",
    },
}
TUNING: dict[str, dict[str, dict[str, Any]]] = {
    "pgqueuer": {
        "batch 10": {"batch_size": 10, "concurrency_limit": 0, "driver": "connection"},
        "batch 25": {"batch_size": 25, "concurrency_limit": 0, "driver": "connection"},
        "batch 50": {"batch_size": 50, "concurrency_limit": 0, "driver": "connection"},
        "batch 100": {"batch_size": 100, "concurrency_limit": 0, "driver": "connection"},
        "batch 10, 10 per entrypoint": {
            "batch_size": 10,
            "concurrency_limit": 10,
            "driver": "connection",
        },
        "batch 50, pool of 10": {"batch_size": 50, "concurrency_limit": 0, "driver": "pool"},
        "batch 10, httpx": {
            "batch_size": 10,
            "concurrency_limit": 0,
            "driver": "connection",
            "http": "httpx",
        },
        "batch 100, httpx": {
            "batch_size": 100,
            "concurrency_limit": 0,
            "driver": "connection",
            "http": "httpx",
        },
    },
    "procrastinate": {
        "pool 4 (default)": {"concurrency": 50, "pool_size": 4},
        "pool 10": {"concurrency": 50, "pool_size": 10},
        "pool 25": {"concurrency": 50, "pool_size": 25},
        "pool 50": {"concurrency": 50, "pool_size": 50},
        "pool 10, no LISTEN": {"concurrency": 50, "pool_size": 10, "listen_notify": False},
        "pool 10, httpx": {"concurrency": 50, "pool_size": 10, "http": "httpx"},
        "pool 10, no LISTEN, httpx": {
            "concurrency": 50,
            "pool_size": 10,
            "listen_notify": False,
            "http": "httpx",
        },
    },
}
PACKAGES = (
    "pg8000",
    "aws-lambda-powertools",
    "httpx",
    "pgqueuer",
    "asyncpg",
    "procrastinate",
    "psycopg",
    "psycopg-pool",
    "aiohttp",
)


# --------------------------------------------------------------------------------------------
# In the child: what every contender reports
# --------------------------------------------------------------------------------------------


class Clock:
    """The run's start, and the end of its last settle statement."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Nothing counted yet (the statements before the run's start are not the run's)."""
        self.start = 0.0
        self.cpu0 = 0.0
        self.last_settle = 0.0
        self.claims = 0
        self.settles = 0
        self.statements = 0
        self.kinds: Counter[str] = Counter()

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.cpu0 = time.process_time()

    def claimed(self) -> None:
        self.claims += 1

    def settled(self) -> None:
        self.settles += 1
        self.last_settle = time.perf_counter()

    def result(self, **extra: Any) -> dict[str, Any]:
        end = time.perf_counter()
        return {
            "to_last_settle_s": self.last_settle - self.start,
            "total_s": end - self.start,
            "cpu_s": time.process_time() - self.cpu0,
            "max_rss_mib": benchlib.peak_rss_mib(),
            "claims": self.claims,
            "settles": self.settles,
            "statements": self.statements,
            "kinds": dict(self.kinds),
            **extra,
        }


def statement_kind(sql: str) -> str:
    """Which part of the worker sent a statement (for the statements-per-batch table)."""
    if "claim_jobs" in sql or "claim_next_job" in sql:
        return "claim"
    if "settle_jobs" in sql or "complete_job" in sql or "fail_job" in sql:
        return "settle"
    if "queue_idempotency" in sql:
        return "idempotency"
    if "queue_schedules" in sql or "fire_schedule" in sql:
        return "schedules"
    if "queue_prune" in sql:
        return "maintenance"
    if "count(*)" in sql and "scheduled_at <= now()" in sql:
        return "backlog"
    return "other"


def count_pg8000_statements(clock: Clock) -> None:
    """Counts every statement any pg8000 connection of this process sends, by kind, and times
    the claims and settles by the statements themselves (whichever code sends them)."""
    import pg8000.native

    run = pg8000.native.Connection.run

    def counted(self: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
        kind = statement_kind(sql)
        clock.statements += 1
        clock.kinds[kind] += 1
        if kind == "claim":
            clock.claimed()
        try:
            return run(self, sql, *args, **kwargs)
        finally:
            if kind == "settle":
                clock.settled()

    pg8000.native.Connection.run = counted  # type: ignore[method-assign]

    # Statements prepared once and run many times (the idempotency store's) count at each run.
    prepared_run = pg8000.native.PreparedStatement.run

    def counted_prepared(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock.statements += 1
        clock.kinds[statement_kind(self.statement)] += 1
        return prepared_run(self, *args, **kwargs)

    pg8000.native.PreparedStatement.run = counted_prepared  # type: ignore[method-assign]


def body_bytes(job_id: str, tenant: str, job_type: str, attempt: int, payload: Any) -> bytes:
    """The worker's request body, for every contender alike."""
    return json.dumps(
        {
            "job_id": job_id,
            "tenant_id": tenant,
            "job_type": job_type,
            "attempt": attempt,
            "payload": payload,
        },
        separators=(",", ":"),
    ).encode()


def headers_for(job_id: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {benchlib.SERVICE_ROLE_KEY}",
        "Content-Type": "application/json",
        "Idempotency-Key": job_id,
    }


# -- ours -------------------------------------------------------------------------------------


def run_ours(
    url: str, functions: str, jobs: int, store: str, *, warm: bool = False
) -> dict[str, Any]:
    """One batch of `jobs` through the Lambda's code path. `warm`: in a container that has
    served an invocation before, as every invocation but a container's first: the worker made
    (its connection open, the schema checked, its routes recorded), one batch of WARMUP_JOBS
    sent (claim_jobs compiled in the session, the lanes' threads and transports made), then
    KEEPALIVE_S and a little more idle, so that the lanes' connections to the functions have
    expired as they would have a minute later."""
    from handler.dispatch.client import KEEPALIVE_S
    from handler.runtime.events import parse_event
    from handler.runtime.settings import parse_settings
    from handler.runtime.worker import Worker

    clock = Clock()
    count_pg8000_statements(clock)
    env = {
        "DATABASE_URL": url,
        "FUNCTIONS_BASE_URL": functions,
        "SUPABASE_SERVICE_ROLE_KEY": benchlib.SERVICE_ROLE_KEY,
        "MAX_JOBS_PER_TENANT": "100000",
        "MAX_JOBS_PER_RUN": str(jobs),
        "MAX_CONCURRENCY": str(CONCURRENCY),
        "IDEMPOTENCY_STORE": store,
    }
    invocation = parse_event({})
    worker = None
    if warm:
        worker = Worker(parse_settings(env))
        warmup(worker, url)
        time.sleep(KEEPALIVE_S + 0.5)
        clock.reset()
    clock.begin()
    if worker is None:
        worker = Worker(parse_settings(env))
    summary, _ = worker.run(invocation, remaining_seconds=600, request_id=f"bench-{os.getpid()}")
    result = clock.result(summary=summary.as_dict())
    worker.close()
    return result


WARMUP_JOBS = CONCURRENCY


def warmup(worker: Any, url: str) -> None:
    """The container's earlier invocation: WARMUP_JOBS jobs of a tenant of their own (no `seq`,
    so the delivery check leaves them out), one batch of that tenant's jobs (the event's
    `tenant_id`), then their rows deleted: the run finds the queue as a cold one does."""
    from handler.runtime.events import parse_event

    tenant = "00000000-0000-4000-8000-0000000000ff"
    conn = benchlib.connect(url)
    try:
        conn.run(
            "INSERT INTO queue_jobs (tenant_id, job_type, payload)"
            " SELECT CAST(:tenant AS uuid), :job_type, jsonb_build_object('warmup', i)"
            " FROM generate_series(1, :n) AS i",
            tenant=tenant,
            job_type=benchlib.JOB_TYPES[0],
            n=WARMUP_JOBS,
        )
        summary, _ = worker.run(
            parse_event({"tenant_id": tenant}), remaining_seconds=600, request_id="warmup"
        )
        if summary.completed != WARMUP_JOBS:
            raise RuntimeError(f"warm-up: {summary!r}")
        conn.run("DELETE FROM queue_jobs WHERE payload ? 'warmup'")
    finally:
        conn.close()


# -- the floor: httpx alone --------------------------------------------------------------------


def run_floor(functions: str, jobs: int) -> dict[str, Any]:
    """The jobs' requests (built before the clock starts, as ours has them in the database)
    POSTed from CONCURRENCY threads, each through an httpx.HTTPTransport of its own (one
    connection), with the headers ours sends (Host, Content-Length, Authorization,
    Content-Type, Idempotency-Key, User-Agent, traceparent) and its answer read whole. The
    threads are started after the clock, as ours starts its lanes, and held on one CPU, as ours
    holds them."""
    import queue
    import random
    import ssl
    import threading
    import uuid

    import httpx

    from handler.dispatch.affinity import one_cpu

    requests: queue.SimpleQueue[tuple[httpx.URL, bytes, bytes] | None] = queue.SimpleQueue()
    urls = {t: httpx.URL(f"{functions}/{benchlib.ROUTES[t]}") for t in benchlib.JOB_TYPES}
    for i in range(jobs):
        job_id = str(uuid.uuid4())
        job_type = benchlib.JOB_TYPES[(i // 10) % 5]
        tenant = f"00000000-0000-4000-8000-{i % 10:012d}"
        body = body_bytes(job_id, tenant, job_type, 1, {"seq": i})
        requests.put((urls[job_type], body, job_id.encode()))
    authorization = f"Bearer {benchlib.SERVICE_ROLE_KEY}".encode()
    trace_id = f"{random.getrandbits(128):032x}"
    timeouts = dict.fromkeys(("connect", "read", "write", "pool"), HTTP_TIMEOUT_S)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # plain HTTP: never used
    clock = Clock()
    failures: list[str] = []

    def lane() -> None:
        transport = httpx.HTTPTransport(
            verify=context, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        with transport:
            while (item := requests.get()) is not None:
                url, body, job_id = item
                span = f"{random.getrandbits(64) or 1:016x}"
                request = httpx.Request(
                    "POST",
                    url,
                    stream=httpx.ByteStream(body),
                    headers=[
                        (b"Host", url.netloc),
                        (b"Content-Length", b"%d" % len(body)),
                        (b"Authorization", authorization),
                        (b"Content-Type", b"application/json"),
                        (b"Idempotency-Key", job_id),
                        (b"User-Agent", b"queue-worker"),
                        (b"traceparent", f"00-{trace_id}-{span}-00".encode()),
                    ],
                    extensions={"timeout": timeouts},
                )
                response = transport.handle_request(request)
                try:
                    for _ in response.iter_raw():
                        pass
                finally:
                    response.close()
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code}")

    clock.begin()
    with one_cpu():  # as ours holds its dispatch threads on one CPU
        threads = [threading.Thread(target=lane) for _ in range(CONCURRENCY)]
        for thread in threads:
            thread.start()
            requests.put(None)
        for thread in threads:
            thread.join()
    clock.settled()  # the last answer read: where ours would settle
    return clock.result(failures=failures[:5])


# -- the seed's design ------------------------------------------------------------------------


def run_seed(url: str, functions: str) -> dict[str, Any]:
    import httpx

    clock = Clock()
    count_pg8000_statements(clock)
    worker = f"seed-{os.getpid()}"
    clock.begin()
    conn = benchlib.connect(url)
    with httpx.Client(timeout=HTTP_TIMEOUT_S, follow_redirects=False) as client:
        while True:
            rows = conn.run(
                "SELECT id, tenant_id, job_type, payload, attempts"
                " FROM claim_next_job(p_lease_seconds => 300, p_worker_id => :worker)",
                worker=worker,
            )
            if not rows:
                break
            job_id, tenant, job_type, payload, attempt = rows[0]
            job_id = str(job_id)
            response = client.post(
                f"{functions}/{benchlib.ROUTES[job_type]}",
                content=body_bytes(job_id, str(tenant), job_type, attempt, payload),
                headers=headers_for(job_id),
            )
            if response.is_success:
                conn.run(
                    "SELECT complete_job(CAST(:id AS uuid), :worker)", id=job_id, worker=worker
                )
            else:
                conn.run(
                    "SELECT fail_job(CAST(:id AS uuid), :error, true, NULL, :worker)",
                    id=job_id,
                    error=f"HTTP {response.status_code}",
                    worker=worker,
                )
    conn.close()
    return clock.result()


# -- the peers' HTTP client -------------------------------------------------------------------


class PeerHttp:
    """One async client per process, 50 connections: aiohttp.ClientSession or httpx.AsyncClient."""

    def __init__(self, base_url: str, kind: str) -> None:
        self.base_url = base_url
        self.kind = kind
        self._client: Any = None

    async def open(self) -> None:
        if self.kind == "aiohttp":
            import aiohttp

            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONCURRENCY, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
            )
        else:
            import httpx

            self._client = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY
                ),
                timeout=HTTP_TIMEOUT_S,
            )

    async def close(self) -> None:
        if self.kind == "aiohttp":
            await self._client.close()
        else:
            await self._client.aclose()

    async def post(self, function: str, job_id: str, body: bytes) -> None:
        """Raises unless the function answered 2xx, so the queue records a failure."""
        url = f"{self.base_url}/{function}"
        if self.kind == "aiohttp":
            async with self._client.post(url, data=body, headers=headers_for(job_id)) as response:
                await response.read()
                status = response.status
        else:
            status = (
                await self._client.post(url, content=body, headers=headers_for(job_id))
            ).status_code
        if not 200 <= status < 300:
            raise RuntimeError(f"{function} answered {status}")


# -- PgQueuer ---------------------------------------------------------------------------------


def run_pgqueuer(url: str, functions: str, settings: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_run_pgqueuer(url, functions, settings))


async def _run_pgqueuer(url: str, functions: str, settings: dict[str, Any]) -> dict[str, Any]:
    from datetime import timedelta

    import asyncpg
    from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    clock = Clock()
    for driver_class in (AsyncpgDriver, AsyncpgPoolDriver):
        _count_async(driver_class, ("fetch", "execute"), clock)
    dequeue, log_jobs = Queries.dequeue, Queries.log_jobs

    async def counted_dequeue(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock.claimed()
        return await dequeue(self, *args, **kwargs)

    async def timed_log_jobs(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await log_jobs(self, *args, **kwargs)
        finally:
            clock.settled()

    Queries.dequeue = counted_dequeue  # type: ignore[method-assign]
    Queries.log_jobs = timed_log_jobs  # type: ignore[method-assign]
    http = PeerHttp(functions, settings.get("http", "aiohttp"))

    def entrypoint(function: str) -> Callable[[Job], Any]:
        async def post(job: Job) -> None:
            data = json.loads(job.payload or b"{}")
            job_id = str(job.id)
            body = body_bytes(job_id, data["tenant_id"], data["job_type"], 1, data["payload"])
            await http.post(function, job_id, body)

        return post

    clock.begin()
    pool = None
    if settings["driver"] == "pool":
        pool = await asyncpg.create_pool(url, min_size=2, max_size=10)
        driver: Any = AsyncpgPoolDriver(pool)
    else:
        connection = await asyncpg.connect(url)
        driver = AsyncpgDriver(connection)
    await http.open()
    qm = QueueManager(Queries(driver))
    for job_type, function in benchlib.ROUTES.items():
        qm.entrypoint(job_type, concurrency_limit=settings["concurrency_limit"])(
            entrypoint(function)
        )
    await qm.run(
        # Only bounds the idle wait at the very end of the drain.
        dequeue_timeout=timedelta(seconds=1),
        batch_size=settings["batch_size"],
        mode=QueueExecutionMode.drain,
    )
    result = clock.result()
    await http.close()
    if pool is not None:
        await pool.close()
    else:
        await connection.close()
    return result


def _count_async(cls: Any, names: Sequence[str], clock: Clock) -> None:
    for name in names:
        original = getattr(cls, name)

        async def counted(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            clock.statements += 1
            return await _original(self, *args, **kwargs)

        setattr(cls, name, counted)


# -- procrastinate ----------------------------------------------------------------------------


def run_procrastinate(url: str, functions: str, settings: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_run_procrastinate(url, functions, settings))


async def _run_procrastinate(url: str, functions: str, settings: dict[str, Any]) -> dict[str, Any]:
    import procrastinate
    from procrastinate.manager import JobManager

    clock = Clock()
    _count_async(
        procrastinate.PsycopgConnector,
        ("execute_query_async", "execute_query_one_async", "execute_query_all_async"),
        clock,
    )
    fetch_job, finish_job = JobManager.fetch_job, JobManager.finish_job

    async def counted_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock.claimed()
        return await fetch_job(self, *args, **kwargs)

    async def timed_finish(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await finish_job(self, *args, **kwargs)
        finally:
            clock.settled()

    JobManager.fetch_job = counted_fetch  # type: ignore[method-assign]
    JobManager.finish_job = timed_finish  # type: ignore[method-assign]
    http = PeerHttp(functions, settings.get("http", "aiohttp"))
    size = settings["pool_size"]
    app = procrastinate_app(url, min_size=size, max_size=size)
    for job_type, function in benchlib.ROUTES.items():
        app.task(name=job_type, queue="jobs", pass_context=True)(
            _procrastinate_task(http, function)
        )
    clock.begin()
    await http.open()
    async with app.open_async():
        await app.run_worker_async(
            concurrency=settings["concurrency"],
            wait=False,
            install_signal_handlers=False,
            listen_notify=settings.get("listen_notify", True),
        )
    result = clock.result()
    await http.close()
    return result


def procrastinate_app(url: str, **pool: Any) -> Any:
    import logging

    import procrastinate

    # It warns that an app made in __main__ cannot be imported by a separate worker process;
    # here the worker runs in this very process, with the tasks registered below.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url, **pool))


def _procrastinate_task(http: PeerHttp, function: str) -> Callable[..., Any]:
    async def post(context: Any, tenant_id: str, job_type: str, payload: Any) -> None:
        job_id = str(context.job.id)
        body = body_bytes(job_id, tenant_id, job_type, context.job.attempts + 1, payload)
        await http.post(function, job_id, body)

    return post


def child(args: argparse.Namespace) -> None:
    settings = json.loads(args.settings) if args.settings else {}
    if args.run == "ours":
        result = run_ours(args.url, args.functions, args.jobs, "off")
    elif args.run == "ours-warm":
        result = run_ours(args.url, args.functions, args.jobs, "off", warm=True)
    elif args.run == "ours-idem":
        result = run_ours(args.url, args.functions, args.jobs, "postgres")
    elif args.run == "seed":
        result = run_seed(args.url, args.functions)
    elif args.run == FLOOR:
        result = run_floor(args.functions, args.jobs)
    elif args.run.startswith("pgqueuer"):
        result = run_pgqueuer(args.url, args.functions, settings)
    else:
        result = run_procrastinate(args.url, args.functions, settings)
    sys.stdout.flush()
    print("\n" + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# In the driver: databases, jobs, checks
# --------------------------------------------------------------------------------------------


def install(contender: str, url: str) -> None:
    if contender == FLOOR:
        return
    if contender in (*OURS, "seed"):
        benchlib.install_queue_schema(url)
    elif contender.startswith("pgqueuer"):
        asyncio.run(_pgqueuer_install(url))
    else:
        asyncio.run(_procrastinate_install(url))


async def _pgqueuer_install(url: str) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(url)
    try:
        await Queries(AsyncpgDriver(connection)).install()
    finally:
        await connection.close()


async def _procrastinate_install(url: str) -> None:

    app = procrastinate_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


def prepare(contender: str, url: str, jobs: int) -> None:
    """Empties the contender's tables, enqueues the jobs in bulk, VACUUM ANALYZE, CHECKPOINT."""
    if contender == FLOOR:
        return
    conn = benchlib.connect(url, timeout=300)
    try:
        if contender in (*OURS, "seed"):
            # queue_functions too: each run starts from the functions' caps, as a new
            # deployment does, not from the limits the run before it left (a 0 ms run under
            # a saturated CPU sees latency jumps and leaves limits of 4-11 calls).
            conn.run(
                "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies,"
                " queue_idempotency, queue_functions"
            )
            conn.run(benchlib.INSERT_JOBS_SQL, job_types=list(benchlib.JOB_TYPES), n=jobs)
            tables = ("queue_jobs", "queue_idempotency")
        elif contender.startswith("pgqueuer"):
            conn.run("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")
            asyncio.run(_pgqueuer_enqueue(url, jobs))
            tables = ("pgqueuer", "pgqueuer_log")
        else:
            conn.run("TRUNCATE procrastinate_jobs, procrastinate_workers CASCADE")
            asyncio.run(_procrastinate_enqueue(url, jobs))
            tables = ("procrastinate_jobs", "procrastinate_events")
        for table in tables:
            conn.run(f"VACUUM ANALYZE {table}")
        conn.run("CHECKPOINT")
    finally:
        conn.close()


def _job_document(seq: int) -> dict[str, Any]:
    return {
        "tenant_id": benchlib.tenant_id(seq),
        "job_type": benchlib.job_type(seq),
        "payload": {"seq": seq},
    }


async def _pgqueuer_enqueue(url: str, jobs: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(url)
    try:
        documents = [_job_document(seq) for seq in range(jobs)]
        await Queries(AsyncpgDriver(connection)).enqueue(
            [d["job_type"] for d in documents],
            [json.dumps(d).encode() for d in documents],
            [0] * jobs,
        )
    finally:
        await connection.close()


async def _procrastinate_enqueue(url: str, jobs: int) -> None:

    app = procrastinate_app(url)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for seq in range(jobs):
        document = _job_document(seq)
        by_type.setdefault(document["job_type"], []).append(document)
    for job_type in benchlib.JOB_TYPES:
        app.task(name=job_type, queue="jobs", pass_context=True)(_no_op)
    async with app.open_async():
        for job_type, documents in by_type.items():
            await app.tasks[job_type].batch_defer_async(*documents)


async def _no_op(*_: Any, **__: Any) -> None:
    """Stands for the tasks when only deferring (the worker's child defines the real ones)."""


def finished_in_database(contender: str, url: str) -> tuple[int, int]:
    """(jobs finished successfully, jobs not finished) as the contender's own tables say."""
    if contender == FLOOR:
        return 0, 0  # no tables: the stand-in's record is the check
    conn = benchlib.connect(url)
    try:
        if contender in (*OURS, "seed"):
            rows = dict(conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY status"))
            dead = int(conn.run("SELECT count(*) FROM queue_jobs_dead_letter")[0][0])
            done = int(rows.pop("completed", 0))
            return done, sum(int(v) for v in rows.values()) + dead
        if contender.startswith("pgqueuer"):
            done = int(
                conn.run(
                    "SELECT count(DISTINCT job_id) FROM pgqueuer_log WHERE status = 'successful'"
                )[0][0]
            )
            return done, int(conn.run("SELECT count(*) FROM pgqueuer")[0][0])
        rows = dict(conn.run("SELECT status, count(*) FROM procrastinate_jobs GROUP BY status"))
        done = int(rows.pop("succeeded", 0))
        return done, sum(int(v) for v in rows.values())
    finally:
        conn.close()


def run_one(
    contender: str,
    url: str,
    standin: Any,
    jobs: int,
    *,
    postmaster: int | None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    prepare(contender, url, jobs)
    standin.reset()
    command = [
        sys.executable,
        __file__,
        "--run",
        contender,
        "--url",
        url,
        "--functions",
        standin.base_url,
        "--jobs",
        str(jobs),
    ]
    if settings is not None:
        command += ["--settings", json.dumps(settings)]
    standin0 = benchlib.cpu_seconds(standin.pid)
    db0 = benchlib.cpu_seconds(postmaster, children=True) if postmaster else None
    load = benchlib.load_average()
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"contender": contender, "failed": f"no result within {CHILD_TIMEOUT_S:.0f} s"}
    time.sleep(0.3)  # the child's backends exit and are reaped by the server
    standin1 = benchlib.cpu_seconds(standin.pid)
    db1 = benchlib.cpu_seconds(postmaster, children=True) if postmaster else None
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        return {"contender": contender, "failed": f"exit code {out.returncode}"}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["settles"] == 0:
        return {"contender": contender, "failed": "no settle statement seen"}
    done, unfinished = finished_in_database(contender, url)
    bodies = [r.body for r in standin.requests()]
    if contender == "ours-warm":  # the warm-up's own jobs, before the clock started
        bodies = [b for b in bodies if "warmup" not in (b.get("payload") or {})]
    check = benchlib.delivery_check(bodies, jobs)
    result.update(
        contender=contender,
        load=load,
        finished=done,
        unfinished=unfinished,
        standin_cpu_s=None if standin0 is None or standin1 is None else standin1 - standin0,
        db_cpu_s=None if db0 is None or db1 is None else db1 - db0,
        **check,
    )
    result["ok"] = (
        (done == jobs or contender == FLOOR)
        and not result.get("failures")
        and unfinished == 0
        and check["undelivered"] == 0
        and check["repeats"] == 0
        and check["foreign"] == 0
    )
    return result


def verdict(run: dict[str, Any], jobs: int) -> str:
    if "failed" in run:
        return f"failed: {run['failed']}"
    if run["ok"]:
        return (
            "all delivered once"
            if run["contender"] == FLOOR
            else "all delivered once, all finished"
        )
    problems = []
    if run["undelivered"]:
        problems.append(f"{run['undelivered']} never delivered")
    if run["repeats"]:
        problems.append(f"{run['repeats']} delivered twice or more")
    if run["finished"] != jobs:
        problems.append(f"{jobs - run['finished']} not finished")
    if run["unfinished"]:
        problems.append(f"{run['unfinished']} left in the queue")
    return ", ".join(problems) or "?"


def rate(run: dict[str, Any], jobs: int) -> float:
    return jobs / run["to_last_settle_s"]


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def drive(args: argparse.Namespace) -> None:
    from handler.local.standin import StandIn

    workloads = [(args.jobs, args.delay_ms)] if args.jobs else list(WORKLOADS)
    if args.quick:
        workloads = [(300, 0.0), (100, 50.0)]
    contenders = args.contenders or list(CONTENDERS)
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    runs: list[dict[str, Any]] = []
    statement_runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with benchlib.postgres(args.database_url) as admin_url:
        info["postgres"] = benchlib.server_version(admin_url)
        info["postgres_settings"] = benchlib.server_settings(admin_url)
        info["server"] = "given by --database-url" if args.database_url else "embedded"
        postmaster = benchlib.postmaster_pid(admin_url)
        urls = {}
        for contender in contenders:
            name = DATABASE_PREFIX + contender.replace("-", "_")
            urls[contender] = benchlib.recreate_database(admin_url, name)
            install(contender, urls[contender])
        try:
            for jobs, delay in workloads:
                with StandIn(delay_ms=delay, record=True) as standin:
                    for rep in range(1, args.repetitions + 1):
                        shift = (rep - 1) % len(contenders)
                        for contender in contenders[shift:] + contenders[:shift]:
                            settings = PEER_SETTINGS.get(contender)
                            run = run_one(
                                contender,
                                urls[contender],
                                standin,
                                jobs,
                                postmaster=postmaster,
                                settings=settings,
                            )
                            run.update(rep=rep, jobs=jobs, delay_ms=delay)
                            runs.append(run)
                            show(run)
            counted = [c for c in ("ours", "ours-idem") if c in contenders]
            if not args.no_statements and counted:
                counts = (300,) if args.quick else STATEMENT_COUNT_JOBS
                with StandIn(delay_ms=0, record=True) as standin:
                    for jobs in counts:
                        for contender in counted:
                            run = run_one(
                                contender, urls[contender], standin, jobs, postmaster=postmaster
                            )
                            run.update(rep=1, jobs=jobs, delay_ms=0.0)
                            statement_runs.append(run)
                            show(run)
        finally:
            for contender in contenders:
                benchlib.drop_database(admin_url, DATABASE_PREFIX + contender.replace("-", "_"))
    info["load_after"] = benchlib.load_average()
    info["source_after"] = benchlib.source_version()
    text = report(runs, statement_runs, info, args, workloads=workloads, contenders=contenders)
    out_path = Path(args.output) if args.output else benchlib.RESULTS / "throughput.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {out_path.name})")


def show(run: dict[str, Any]) -> None:
    if "failed" in run:
        print(
            f"rep {run['rep']} {run['jobs']:>5} jobs {run['delay_ms']:>2.0f} ms "
            f"{run['contender']:<14} FAILED {run['failed']}",
            flush=True,
        )
        return
    print(
        f"rep {run['rep']} {run['jobs']:>5} jobs {run['delay_ms']:>2.0f} ms "
        f"{run['contender']:<14} {rate(run, run['jobs']):>7,.0f} jobs/s "
        f"cpu {1000 * run['cpu_s'] / run['jobs']:.2f} ms/job "
        f"claims {run['claims']} settles {run['settles']} statements {run['statements']} "
        f"{'ok' if run['ok'] else verdict(run, run['jobs'])} load {run['load']}",
        flush=True,
    )


def tune(args: argparse.Namespace) -> None:
    """Measures each peer's settings variants on both workloads; writes peer_tuning.md."""
    from handler.local.standin import StandIn

    reps = 1 if args.quick else args.repetitions
    workloads = [(300, 0.0), (100, 50.0)] if args.quick else list(WORKLOADS)
    peers = [p for p in (args.contenders or PEERS) if p in PEERS]
    runs = []
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    with benchlib.postgres(args.database_url) as admin_url:
        info["postgres"] = benchlib.server_version(admin_url)
        urls = {}
        for peer in peers:
            name = DATABASE_PREFIX + "tune_" + peer
            urls[peer] = benchlib.recreate_database(admin_url, name)
            install(peer, urls[peer])
        try:
            for jobs, delay in workloads:
                with StandIn(delay_ms=delay, record=True) as standin:
                    for rep in range(1, reps + 1):
                        for peer in peers:
                            for variant, settings in TUNING[peer].items():
                                run = run_one(
                                    peer,
                                    urls[peer],
                                    standin,
                                    jobs,
                                    postmaster=None,
                                    settings=settings,
                                )
                                run.update(rep=rep, jobs=jobs, delay_ms=delay, variant=variant)
                                runs.append(run)
                                show(run)
        finally:
            for peer in peers:
                benchlib.drop_database(admin_url, DATABASE_PREFIX + "tune_" + peer)
    info["load_after"] = benchlib.load_average()
    command = "python bench/throughput.py --tune"
    if args.quick:
        command += " --quick"
    elif args.repetitions != REPETITIONS:
        command += f" --repeat {args.repetitions}"
    if args.database_url:
        command += " --database-url <PostgreSQL URL>"
    lines = [
        "# Peer settings: PgQueuer and procrastinate at their best",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}; {reps} repetition(s), "
        "variants interleaved.",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']}); {info['python']}; "
        f"PostgreSQL {info['postgres']}",
        f"- {info['packages']}",
        f"- load average (1 min) before / after: {info['load_before']} / {info['load_after']}",
        "- Every variant POSTs with aiohttp (50 connections) unless it says httpx "
        "(`httpx.AsyncClient` 0.28, 50 connections too). Same workload, stand-in and checks as "
        "the throughput benchmark.",
        "",
        "| peer | variant | settings | jobs | delay | jobs/s | CPU ms/job | check |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for jobs, delay in workloads:
        for peer in peers:
            for variant, settings in TUNING[peer].items():
                mine = [
                    r
                    for r in runs
                    if r.get("variant") == variant and r["jobs"] == jobs and r["contender"] == peer
                ]
                good = [r for r in mine if "failed" not in r]
                rates = [rate(r, jobs) for r in good]
                cpu = [1000 * r["cpu_s"] / jobs for r in good]
                lines.append(
                    f"| {peer} | {variant} | `{json.dumps(settings)}` | {jobs:,} | {delay:.0f} ms "
                    f"| {benchlib.fmt(rates, 0) if rates else 'n/a'} "
                    f"| {benchlib.fmt(cpu, 2) if cpu else 'n/a'} "
                    f"| {'; '.join(sorted({verdict(r, jobs) for r in mine}))} |"
                )
    lines += [
        "",
        "The throughput benchmark uses, for each peer and HTTP client, the variant with the "
        "best geometric mean of its two medians: "
        + "; ".join(
            f"{CONTENDERS[name]} `{json.dumps(settings)}`"
            for name, settings in PEER_SETTINGS.items()
            if name.split("-")[0] in peers
        )
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    out_path = Path(args.output) if args.output else benchlib.RESULTS / "peer_tuning.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"\n{text}")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def ratio_text(mine: list[dict[str, Any]], theirs: list[dict[str, Any]], jobs: int) -> str:
    """Ratio of the medians, and the min-max of the per-repetition ratios."""
    if not mine or not theirs:
        return "n/a"
    median = statistics.median(rate(r, jobs) for r in mine) / statistics.median(
        rate(r, jobs) for r in theirs
    )
    theirs_by_rep = {r["rep"]: rate(r, jobs) for r in theirs}
    paired = [rate(r, jobs) / theirs_by_rep[r["rep"]] for r in mine if r["rep"] in theirs_by_rep]
    spread = f" ({min(paired):.2f}-{max(paired):.2f})" if len(paired) > 1 else ""
    return f"{median:.2f}×{spread}"


def report(
    runs: list[dict[str, Any]],
    statement_runs: list[dict[str, Any]],
    info: dict[str, str],
    args: argparse.Namespace,
    *,
    workloads: list[tuple[int, float]],
    contenders: list[str],
) -> str:
    command = "python bench/throughput.py"
    if args.quick:
        command += " --quick"
    if args.database_url:
        command += " --database-url <PostgreSQL URL>"
    lines = [
        "# Throughput: ours against the seed's design, PgQueuer and procrastinate",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        "## Machine",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']}), {info['memory']} RAM",
        f"- {info['python']} on {info['os']}",
        f"- queue-worker at commit {info['source']}"
        + (
            f" (at the end: {info['source_after']})"
            if info["source_after"] != info["source"]
            else ""
        ),
        f"- {info['packages']}",
        f"- PostgreSQL {info['postgres']} ({info['server']}, on this machine): "
        f"{info['postgres_settings']}",
        f"- load average (1 min) before / after the run: {info['load_before']} / "
        f"{info['load_after']}; per run in the last table. Other work shares this machine: "
        "wall-clock figures are noisy, CPU figures less so.",
        "",
        "## Method",
        "",
        "- Workload: N jobs over 10 tenants and the 5 job types of the default routes "
        '(payload `{"seq": i}`), each POSTed to `handler.local.standin` (its own process, one '
        "server for all contenders) which answers 200 after the delay. Jobs are inserted in "
        "bulk before each run (ours and the seed: one `INSERT ... SELECT generate_series`; the "
        "peers: their own bulk enqueue), then `VACUUM ANALYZE` and `CHECKPOINT`.",
        "- Each contender has a database of its own on the same server, emptied before each "
        "run, and runs in a fresh process. Time: from the start of the run (imports done, no "
        "connection open yet) to the end of the contender's last settle statement. jobs/s = "
        "N / that time.",
        f"- ours: `Worker(parse_settings(env)).run(parse_event({{}}), remaining_seconds=600, "
        f"...)` with `MAX_JOBS_PER_TENANT=100000`, `MAX_JOBS_PER_RUN=N`, "
        f"`MAX_CONCURRENCY={CONCURRENCY}`, `IDEMPOTENCY_STORE=off` (ours) or `postgres` "
        "(ours + PostgreSQL idempotency store): one batch through the Lambda's code path, "
        "starting from the functions' caps (the adaptive limits earlier runs left in "
        "`queue_functions` are emptied with the jobs). ours, warm container: the same batch "
        "in a process that has served an invocation before, as every invocation of a "
        "container but its first: the worker made, one batch of 50 jobs of its own sent "
        "(claim_jobs compiled in the session, the lanes' threads and transports made), those "
        "jobs deleted, then 4.5 s idle so that the connections to the functions have expired "
        "(keep-alive 4 s) as they would have a minute later; the clock starts after that.",
        "- the seed's design: `claim_next_job`, POST, `complete_job`, one job at a time, "
        "pg8000 and a synchronous `httpx.Client` (0.28).",
        f"- httpx alone (the floor): not a queue. The same requests as ours (its seven "
        f"headers, its body), built before the clock starts, POSTed from {CONCURRENCY} threads "
        "started after it, each through an `httpx.HTTPTransport` of its own (one connection), "
        "the answer read whole, the threads held on one CPU as ours holds its lanes "
        "(docs/adr/0014-one-cpu-per-batch.md); no database. What a worker sending through "
        f"httpx from {CONCURRENCY} threads could reach on this machine: the bound less the "
        "stand-in's own time and the HTTP stack's CPU under one interpreter lock.",
        "- PgQueuer: `QueueManager` in drain mode, one entrypoint per job type. procrastinate: "
        "`run_worker_async(wait=False)`, one task per job type. Each peer runs twice, with "
        "each HTTP client it could POST with: `httpx.AsyncClient` 0.28 (the httpx package, as "
        "ours, and the release the issue's figures for the peers come from: the comparison "
        'the targets are about, "vs best peer"); `aiohttp.ClientSession` (a client outside the '
        "httpx API, for reference). 50 connections, so at most 50 requests in flight, everywhere. Each at the "
        "settings `--tune` found best for it with that client (`peer_tuning.md`): "
        + "; ".join(
            f"{CONTENDERS[name]} `{json.dumps(settings)}`"
            for name, settings in PEER_SETTINGS.items()
        )
        + ".",
        "- Checks: the stand-in records every request; each `seq` must arrive exactly once, "
        "and the contender's own tables must show every job finished (ours and the seed: "
        "`completed`; PgQueuer: a `successful` log entry, queue empty; procrastinate: "
        "`succeeded`).",
        "- Client CPU: the contender process's CPU time per job. Stand-in CPU: the server's "
        "CPU over the run's wall time. DB CPU: CPU time of the server processes that served "
        "the run (backends, reaped at exit), per job. Statements: every SQL statement the "
        "contender's process sent (ours and the seed: pg8000 `Connection.run`; PgQueuer: its "
        "driver's `fetch`/`execute`; procrastinate: its connector's `execute_query*`), "
        "heartbeats and bookkeeping included. Peak RSS: the process's high-water mark "
        "(`VmHWM`).",
        f"- {args.repetitions} repetitions, contenders interleaved, order rotated each "
        "repetition; median (min-max). Ratios: of the medians, with the min-max of the "
        "ratios within each repetition.",
        "",
        "## Results",
        "",
    ]
    targets: list[str] = []
    for jobs, delay in workloads:
        mine = [r for r in runs if r["jobs"] == jobs and r["delay_ms"] == delay]
        good = {
            c: [r for r in mine if r["contender"] == c and "failed" not in r] for c in contenders
        }
        peer_medians = {
            p: statistics.median(rate(r, jobs) for r in good[p])
            for p in SAME_API_PEERS
            if good.get(p)
        }
        best_peer = max(peer_medians, key=lambda p: peer_medians[p]) if peer_medians else None
        bound = CONCURRENCY / (delay / 1000) if delay else None
        lines += [
            f"### {jobs:,} jobs, {delay:.0f} ms per request",
            "",
            "| contender | jobs/s | vs best peer"
            + (f" ({CONTENDERS[best_peer]})" if best_peer else "")
            + " | vs seed"
            + (" | % of 1,000/s bound" if bound else "")
            + " | client CPU ms/job | DB CPU ms/job | stand-in CPU | statements | peak RSS MiB "
            "| check |",
            "|---|---:|---:|---:|" + ("---:|" if bound else "") + "---:|---:|---:|---:|---:|---|",
        ]
        for contender in contenders:
            ok = good[contender]
            if not ok:
                lines.append(f"| {CONTENDERS[contender]} | failed |")
                continue
            rates = [rate(r, jobs) for r in ok]
            cpu = [1000 * r["cpu_s"] / jobs for r in ok]
            db = [1000 * r["db_cpu_s"] / jobs for r in ok if r["db_cpu_s"] is not None]
            standin = [
                r["standin_cpu_s"] / r["total_s"] for r in ok if r["standin_cpu_s"] is not None
            ]
            statements = [r["statements"] for r in ok]
            rss = [r["max_rss_mib"] for r in ok]
            checks = sorted({verdict(r, jobs) for r in mine if r["contender"] == contender})
            row = (
                f"| {CONTENDERS[contender]} | {benchlib.fmt(rates, 0)} "
                f"| {ratio_text(ok, good[best_peer], jobs) if best_peer else 'n/a'} "
                f"| {ratio_text(ok, good.get('seed', []), jobs)} "
            )
            if bound:
                row += f"| {100 * statistics.median(rates) / bound:.0f}% "
            standin_text = f"{100 * statistics.median(standin):.0f}%" if standin else "n/a"
            row += (
                f"| {benchlib.fmt(cpu, 2)} | {benchlib.fmt(db, 2) if db else 'n/a'} "
                f"| {standin_text} | {statistics.median(statements):,.0f} "
                f"| {statistics.median(rss):,.0f} "
                f"| {'; '.join(checks)} |"
            )
            lines.append(row)
        lines.append("")
        if best_peer and good.get("ours"):
            targets += target_lines(good, jobs, delay, bound)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    if statement_runs:
        lines += statement_section(statement_runs)
    lines += [
        "## Every run",
        "",
        "| rep | jobs | delay | contender | s to last settle | s in all | jobs/s | client CPU s "
        "| claims | settles | statements | check | load |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in runs:
        if "failed" in r:
            lines.append(
                f"| {r['rep']} | {r['jobs']:,} | {r['delay_ms']:.0f} ms "
                f"| {CONTENDERS[r['contender']]} | | | | | | | | {verdict(r, r['jobs'])} | |"
            )
            continue
        lines.append(
            f"| {r['rep']} | {r['jobs']:,} | {r['delay_ms']:.0f} ms | {CONTENDERS[r['contender']]} "
            f"| {r['to_last_settle_s']:.3f} | {r['total_s']:.3f} | {rate(r, r['jobs']):,.0f} "
            f"| {r['cpu_s']:.2f} | {r['claims']:,} | {r['settles']:,} | {r['statements']:,} "
            f"| {'ok' if r['ok'] else verdict(r, r['jobs'])} | {r['load']} |"
        )
    return "\n".join(lines) + "\n"


BOUND_TARGET = 0.85  # one batch of 1,000 jobs at 50 ms: this share of the concurrency bound


def target_lines(
    good: dict[str, list[dict[str, Any]]], jobs: int, delay: float, bound: float | None
) -> list[str]:
    """The issue's targets for one workload: against the best peer on the httpx API, and, for
    the record, against the best peer with each of the other clients."""
    ours = statistics.median(rate(r, jobs) for r in good["ours"])
    needed = 3.0 if bound else 2.0
    lines = [f"- {jobs:,} jobs, {delay:.0f} ms:"]
    if bound:
        lines.append(
            f"  - ours at {100 * ours / bound:.0f}% of the bound (target ≥ 85%: "
            f"{'met' if ours / bound >= BOUND_TARGET else 'NOT met'})"
        )
        warm = good.get("ours-warm")
        warm_rate = statistics.median(rate(r, jobs) for r in warm) if warm else None
        if warm_rate is not None:
            lines.append(
                f"  - ours in a warm container at {100 * warm_rate / bound:.0f}% of the bound "
                f"(target ≥ 85%: {'met' if warm_rate / bound >= BOUND_TARGET else 'NOT met'})"
            )
        if good.get(FLOOR):
            floor = statistics.median(rate(r, jobs) for r in good[FLOOR])
            line = (
                f"  - httpx alone (no queue) at {100 * floor / bound:.0f}% of the bound; ours "
                f"at {100 * ours / floor:.0f}% of it"
            )
            if warm_rate is not None:
                line += f", in a warm container {100 * warm_rate / floor:.0f}%"
            lines.append(line)
    else:
        seed = good.get("seed")
        if seed:
            vs_seed = ours / statistics.median(rate(r, jobs) for r in seed)
            lines.append(
                f"  - ours {vs_seed:.2f}× the seed's design (target ≥ 3×: "
                f"{'met' if vs_seed >= 3 else 'NOT met'})"
            )
    for family, peers in PEER_FAMILIES.items():
        medians = {
            p: statistics.median(rate(r, jobs) for r in good[p]) for p in peers if good.get(p)
        }
        if not medians:
            continue
        best = max(medians, key=lambda p: medians[p])
        ratio = ours / medians[best]
        line = (
            f"  - ours {ratio:.2f}× the best peer on {family}, {CONTENDERS[best]} at "
            f"{medians[best]:,.0f} jobs/s (target ≥ {needed:.0f}×: "
            f"{'met' if ratio >= needed else 'NOT met'})"
        )
        if bound and medians[best] * needed > bound:
            line += (
                f": {needed:.0f}× of it would be {medians[best] * needed:,.0f} jobs/s, over "
                f"the bound of {bound:,.0f}, which no worker with {CONCURRENCY} requests in "
                "flight can pass"
            )
        lines.append(line)
    return lines


def statement_section(statement_runs: list[dict[str, Any]]) -> list[str]:
    kinds = ("claim", "settle", "backlog", "schedules", "maintenance", "other", "idempotency")
    lines = [
        "## SQL statements per batch (ours)",
        "",
        "Every statement any connection of the worker's process sent during one batch, by what "
        "sent it (pg8000 `Connection.run` counted), at 0 ms per request. A batch of more than "
        "two jobs a lane is claimed in two statements, the first of two jobs a lane. The settle "
        "is buffered and written every 5 s while a batch runs, once when its last jobs are in "
        "flight (a batch of more jobs than lanes), and once at its end: a batch that takes "
        "longer than 5 s sends one more settle per 5 s (docs/adr/0009-statements-per-batch.md).",
        "",
        "| jobs | idempotency store | s to last settle | claim | settle | claim + settle "
        "| backlog | schedules | maintenance | other | idempotency store (per job) | all |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in statement_runs:
        if "failed" in r:
            continue
        k = {kind: r["kinds"].get(kind, 0) for kind in kinds}
        store = "postgres" if r["contender"] == "ours-idem" else "off"
        lines.append(
            f"| {r['jobs']:,} | {store} | {r['to_last_settle_s']:.2f} | {k['claim']} "
            f"| {k['settle']} | {k['claim'] + k['settle']} | {k['backlog']} | {k['schedules']} "
            f"| {k['maintenance']} | {k['other']} | {k['idempotency']:,} "
            f"({k['idempotency'] / r['jobs']:.1f}) | {r['statements']:,} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, help="one workload: this many jobs (with --delay-ms)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the stand-in's delay")
    parser.add_argument(
        "--repeat", "--repetitions", dest="repetitions", type=int, default=REPETITIONS
    )
    parser.add_argument("--contenders", nargs="*", choices=list(CONTENDERS))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL admin URL (default: an embedded server)",
    )
    parser.add_argument(
        "--no-statements", action="store_true", help="skip the statements-per-batch phase"
    )
    parser.add_argument("--quick", action="store_true", help="few jobs, 1 repetition")
    parser.add_argument("--tune", action="store_true", help="measure the peers' settings")
    parser.add_argument("--output", help="where to write the report (default bench/results/)")
    # Internal: one contender's run in this (child) process.
    parser.add_argument("--run", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--functions", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return
    if args.quick:
        args.repetitions = 1
    if args.tune:
        tune(args)
        return
    drive(args)


if __name__ == "__main__":
    main()
