"""PostgresPersistenceLayer on a real PostgreSQL, driven through Powertools' idempotent_function.

Every test builds its own layer: Powertools' configure() keeps the first config a layer is given.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pg8000.native
import pytest
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyValidationError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord

from handler.dispatch.idempotency import (
    PostgresPersistenceLayer,
    build_persistence_layer,
    idempotency_config,
)

Job = dict[str, Any]


class FakeContext:
    """The one LambdaContext method Powertools' idempotency reads."""

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


class CountingProvider:
    """A connection provider that remembers the connections it opened."""

    def __init__(self, connect: Callable[[], pg8000.native.Connection]) -> None:
        self._connect = connect
        self.opened: list[pg8000.native.Connection] = []
        self._lock = threading.Lock()

    def __call__(self) -> pg8000.native.Connection:
        conn = self._connect()
        with self._lock:
            self.opened.append(conn)
        return conn


@pytest.fixture
def provider(conn: pg8000.native.Connection, connect: Any) -> CountingProvider:
    # `conn` empties queue_idempotency before the test.
    return CountingProvider(connect)


@pytest.fixture
def layer(provider: CountingProvider) -> Iterator[PostgresPersistenceLayer]:
    store = PostgresPersistenceLayer(provider)
    yield store
    store.close()


@pytest.fixture
def config() -> IdempotencyConfig:
    cfg = idempotency_config()
    cfg.register_lambda_context(FakeContext())  # type: ignore[arg-type]
    return cfg


def make_dispatch(
    layer: PostgresPersistenceLayer,
    config: IdempotencyConfig,
    body: Callable[[Job], Any] | None = None,
) -> tuple[Callable[..., Any], list[str]]:
    """An idempotent stand-in for a dispatch, and the list of job ids its body ran for."""
    calls: list[str] = []
    lock = threading.Lock()

    @idempotent_function(data_keyword_argument="job", persistence_store=layer, config=config)
    def dispatch(job: Job) -> Any:
        with lock:
            calls.append(job["job_id"])
        if body is not None:
            return body(job)
        return {"status": 200, "job_id": job["job_id"], "run": len(calls)}

    return dispatch, calls


def rows(conn: pg8000.native.Connection) -> list[dict[str, Any]]:
    result = conn.run(
        "SELECT id, status, expiration, in_progress_expiration, data, validation"
        " FROM queue_idempotency ORDER BY id"
    )
    names = ("id", "status", "expiration", "in_progress_expiration", "data", "validation")
    return [dict(zip(names, row, strict=True)) for row in result]


def now_ms() -> int:
    return int(time.time() * 1000)


def test_first_call_runs_and_stores_completed_second_returns_stored(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1", "payload": {"a": 1}}

    first = dispatch(job=job)
    second = dispatch(job=job)

    assert calls == ["job-1"]
    assert first == {"status": 200, "job_id": "job-1", "run": 1}
    assert second == first
    [row] = rows(conn)
    assert row["status"] == "COMPLETED"
    assert json.loads(row["data"]) == first
    assert abs(row["expiration"] - (time.time() + 3600)) < 10
    assert row["id"].endswith("#" + layer._generate_hash("job-1"))


def test_the_key_is_the_job_id_alone(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)

    dispatch(job={"job_id": "job-1", "attempt": 1})
    dispatch(job={"job_id": "job-1", "attempt": 2})  # a retry of the same job
    dispatch(job={"job_id": "job-2", "attempt": 1})

    assert calls == ["job-1", "job-2"]
    assert len(rows(conn)) == 2


def test_a_job_without_job_id_is_refused(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig
) -> None:
    from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyKeyError

    dispatch, calls = make_dispatch(layer, config)
    with pytest.raises(IdempotencyKeyError):
        dispatch(job={"payload": {}})
    assert calls == []


def test_a_function_that_raises_leaves_no_record_and_runs_again(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    outcomes = iter([RuntimeError("HTTP 503"), {"status": 200}])

    def body(job: Job) -> Any:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    dispatch, calls = make_dispatch(layer, config, body)
    job = {"job_id": "job-1"}

    with pytest.raises(RuntimeError, match="HTTP 503"):
        dispatch(job=job)
    assert rows(conn) == []

    assert dispatch(job=job) == {"status": 200}
    assert calls == ["job-1", "job-1"]
    assert [r["status"] for r in rows(conn)] == ["COMPLETED"]


def test_an_in_progress_record_that_has_not_timed_out_blocks_a_second_call(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1"}
    dispatch(job=job)
    conn.run(
        "UPDATE queue_idempotency"
        " SET status = 'INPROGRESS', data = NULL, in_progress_expiration = :ms",
        ms=now_ms() + 60_000,
    )

    with pytest.raises(IdempotencyAlreadyInProgressError):
        dispatch(job=job)
    assert calls == ["job-1"]
    assert [r["status"] for r in rows(conn)] == ["INPROGRESS"]


def test_an_in_progress_record_without_in_progress_expiry_is_not_taken_over(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1"}
    dispatch(job=job)
    conn.run(
        "UPDATE queue_idempotency"
        " SET status = 'INPROGRESS', data = NULL, in_progress_expiration = NULL"
    )

    with pytest.raises(IdempotencyAlreadyInProgressError):
        dispatch(job=job)
    assert calls == ["job-1"]


def test_an_in_progress_record_whose_invocation_timed_out_is_taken_over(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1"}
    dispatch(job=job)
    conn.run(
        "UPDATE queue_idempotency"
        " SET status = 'INPROGRESS', data = NULL, in_progress_expiration = :ms",
        ms=now_ms() - 1_000,
    )

    assert dispatch(job=job) == {"status": 200, "job_id": "job-1", "run": 2}
    assert calls == ["job-1", "job-1"]
    [row] = rows(conn)
    assert row["status"] == "COMPLETED"
    assert json.loads(row["data"])["run"] == 2


def test_an_expired_completed_record_is_taken_over(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1"}
    dispatch(job=job)
    conn.run("UPDATE queue_idempotency SET expiration = :s", s=int(time.time()) - 5)

    assert dispatch(job=job) == {"status": 200, "job_id": "job-1", "run": 2}
    assert calls == ["job-1", "job-1"]
    [row] = rows(conn)
    assert row["status"] == "COMPLETED"
    assert row["expiration"] > time.time() + 3000


def test_an_expired_in_progress_record_is_taken_over_even_before_its_in_progress_expiry(
    layer: PostgresPersistenceLayer, config: IdempotencyConfig, conn: pg8000.native.Connection
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1"}
    dispatch(job=job)
    conn.run(
        "UPDATE queue_idempotency SET status = 'INPROGRESS', data = NULL,"
        " expiration = :s, in_progress_expiration = :ms",
        s=int(time.time()) - 5,
        ms=now_ms() + 60_000,
    )

    dispatch(job=job)
    assert calls == ["job-1", "job-1"]


def test_sixteen_threads_with_the_same_key_run_the_body_once(
    layer: PostgresPersistenceLayer,
    config: IdempotencyConfig,
    provider: CountingProvider,
    conn: pg8000.native.Connection,
) -> None:
    threads = 16
    start = threading.Barrier(threads)
    inside = threading.Event()  # the first call is in the body
    release = threading.Event()  # lets it finish
    finished = threading.Semaphore(0)  # one per call that returned or raised

    def body(job: Job) -> Any:
        inside.set()
        assert release.wait(timeout=60), "never released"
        return {"status": 200}

    dispatch, calls = make_dispatch(layer, config, body)

    def call() -> Any:
        start.wait(timeout=60)
        try:
            return dispatch(job={"job_id": "job-1"})
        finally:
            finished.release()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(call) for _ in range(threads)]
        try:
            assert inside.wait(timeout=60)
            # Every other call must come back while the first is still inside the body.
            for _ in range(threads - 1):
                assert finished.acquire(timeout=60), "a second call got into the body"
            assert [r["status"] for r in rows(conn)] == ["INPROGRESS"]
        finally:
            release.set()
        outcomes = []
        for future in futures:
            error = future.exception(timeout=60)
            outcomes.append(type(error).__name__ if error else future.result())

    assert calls == ["job-1"]
    assert outcomes.count({"status": 200}) == 1
    assert outcomes.count("IdempotencyAlreadyInProgressError") == threads - 1
    assert len(provider.opened) <= 8  # the pool's default cap
    assert [r["status"] for r in rows(conn)] == ["COMPLETED"]
    # And afterwards the stored result comes back without running the body.
    assert dispatch(job={"job_id": "job-1"}) == {"status": 200}
    assert calls == ["job-1"]


def test_the_registered_lambda_context_sets_the_in_progress_expiry(
    layer: PostgresPersistenceLayer, connect: Any
) -> None:
    config = idempotency_config()
    config.register_lambda_context(FakeContext(remaining_ms=123_000))  # type: ignore[arg-type]
    observer = connect()
    seen: list[dict[str, Any]] = []

    def body(job: Job) -> Any:
        seen.extend(rows(observer))
        return {"status": 200}

    dispatch, _ = make_dispatch(layer, config, body)
    before = now_ms()
    dispatch(job={"job_id": "job-1"})
    after = now_ms()

    [row] = seen
    assert row["status"] == "INPROGRESS"
    assert before + 123_000 <= row["in_progress_expiration"] <= after + 123_000
    assert row["data"] is None


def test_payload_validation_is_checked_against_the_record_in_the_way(
    provider: CountingProvider,
) -> None:
    layer = PostgresPersistenceLayer(provider)
    config = IdempotencyConfig(
        event_key_jmespath="job_id",
        payload_validation_jmespath="payload",
        raise_on_no_idempotency_key=True,
    )
    config.register_lambda_context(FakeContext())  # type: ignore[arg-type]
    dispatch, calls = make_dispatch(layer, config)

    dispatch(job={"job_id": "job-1", "payload": {"a": 1}})
    assert dispatch(job={"job_id": "job-1", "payload": {"a": 1}})["run"] == 1
    with pytest.raises(IdempotencyValidationError):
        dispatch(job={"job_id": "job-1", "payload": {"a": 2}})
    assert calls == ["job-1"]
    layer.close()


@pytest.mark.parametrize("existing", ["none", "expired"])
def test_a_record_committed_while_a_put_waits_for_it_is_read_again_not_missed(
    layer: PostgresPersistenceLayer, conn: pg8000.native.Connection, connect: Any, existing: str
) -> None:
    # The put's snapshot predates the competing record (or shows an expired version of it):
    # it must report "exists" without a stale record, so that Powertools reads it again.
    key = "test-func.race#k"
    if existing == "expired":
        conn.run(
            "INSERT INTO queue_idempotency (id, status, expiration) VALUES (:k, 'COMPLETED', :e)",
            k=key,
            e=int(time.time()) - 5,
        )
    rival = connect()
    rival.run("BEGIN")
    rival.run(
        "INSERT INTO queue_idempotency (id, status, expiration, in_progress_expiration)"
        " VALUES (:k, 'INPROGRESS', :e, :ms)"
        " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
        " expiration = excluded.expiration, in_progress_expiration = excluded.in_progress_expiration",
        k=key,
        e=int(time.time()) + 3600,
        ms=now_ms() + 60_000,
    )
    record = DataRecord(
        idempotency_key=key,
        status="INPROGRESS",
        expiry_timestamp=int(time.time()) + 3600,
        in_progress_expiry_timestamp=now_ms() + 60_000,
    )
    errors: list[BaseException] = []

    def put() -> None:
        try:
            layer._put_record(record)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not conn.run(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%idempotency_put%'"
        )[0][0]:
            assert time.monotonic() < deadline, "the put never waited for the rival"
            assert thread.is_alive(), errors
    finally:
        rival.run("COMMIT")
        thread.join(timeout=30)

    [error] = errors
    assert isinstance(error, IdempotencyItemAlreadyExistsError)
    assert error.old_data_record is None
    assert layer._get_record(key).status == "INPROGRESS"


def test_get_record_of_an_unknown_key_raises_not_found(layer: PostgresPersistenceLayer) -> None:
    with pytest.raises(IdempotencyItemNotFoundError):
        layer._get_record("test-func.x#nothing")


def test_a_connection_killed_by_the_server_is_dropped_and_the_call_retried(
    layer: PostgresPersistenceLayer,
    config: IdempotencyConfig,
    provider: CountingProvider,
    conn: pg8000.native.Connection,
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    dispatch(job={"job_id": "job-1"})
    [pooled] = provider.opened
    pid = pooled.run("SELECT pg_backend_pid()")[0][0]
    conn.run("SELECT pg_terminate_backend(:pid, 5000)", pid=pid)

    assert dispatch(job={"job_id": "job-1"})["run"] == 1  # read back on a new connection
    assert dispatch(job={"job_id": "job-2"})["run"] == 2
    assert calls == ["job-1", "job-2"]
    assert len(provider.opened) == 2  # the dead one was replaced once, then reused


def test_the_pool_never_opens_more_than_max_connections(
    provider: CountingProvider, config: IdempotencyConfig
) -> None:
    layer = PostgresPersistenceLayer(provider, max_connections=2)
    dispatch, calls = make_dispatch(layer, config)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: dispatch(job={"job_id": f"job-{i}"}), range(40)))
    assert len(results) == 40
    assert sorted(calls) == sorted(f"job-{i}" for i in range(40))
    assert 1 <= len(provider.opened) <= 2
    layer.close()


def test_a_statement_error_keeps_the_connection(
    layer: PostgresPersistenceLayer, provider: CountingProvider
) -> None:
    with layer._pool.store() as store:
        with pytest.raises(pg8000.native.DatabaseError):
            store._run("SELECT 1/0", idempotent=True)
        assert store._run("SELECT 2", idempotent=True) == [[2]]
    assert len(provider.opened) == 1


def test_build_persistence_layer_postgres(provider: CountingProvider) -> None:
    store = build_persistence_layer("postgres", table=None, connection_provider=provider)
    assert isinstance(store, PostgresPersistenceLayer)
    with pytest.raises(ValueError, match="connection_provider"):
        build_persistence_layer("postgres", table=None, connection_provider=None)


def test_idempotency_config_defaults() -> None:
    cfg = idempotency_config()
    assert cfg.event_key_jmespath == "job_id"
    assert cfg.use_local_cache is False
    assert cfg.raise_on_no_idempotency_key is True
    assert cfg.expires_after_seconds == 3600
    assert idempotency_config(60).expires_after_seconds == 60


def test_the_guard_configures_its_store_before_any_dispatch_thread_can_use_it(
    layer: PostgresPersistenceLayer,
) -> None:
    # Powertools marks a store configured before it compiles the key's expression: threads that
    # configured it lazily, at once, saw it half done ("'NoneType' object has no attribute
    # 'search'"). The guard configures it when it is built, in the building thread.
    from handler.dispatch.client import Dispatcher
    from handler.dispatch.guard import IDEMPOTENCY_KEY_PREFIX, DeliveryGuard

    assert not layer.configured
    DeliveryGuard(Dispatcher("http://127.0.0.1:9", "key"), layer, idempotency_config())
    assert layer.configured
    assert layer.event_key_compiled_jmespath.search({"job_id": "j"}) == "j"
    assert layer.function_name == IDEMPOTENCY_KEY_PREFIX
