"""The idempotency guard's stores and config: Powertools idempotency around each dispatch.

The store is chosen by `IDEMPOTENCY_STORE`: `dynamodb` (the SAM default; the table is in
template.yaml, with TTL on `expiration`) or `postgres` (`PostgresPersistenceLayer` below, over the
`queue_idempotency` table of the queue's own database, migration 0002). The config keys records by
the job id and has no local cache, which has no lock, and dispatch runs in threads.

`PostgresPersistenceLayer` is a Powertools 3.x `BasePersistenceLayer`, the PostgreSQL twin of
`DynamoDBPersistenceLayer`, for local runs and for users who want no extra AWS table.

Taking a key (`_put_record`) follows the DynamoDB layer's condition exactly: a new key is
inserted; an existing record is taken over only when it has expired (`expiration` < now, in
seconds) or when it is INPROGRESS and its `in_progress_expiration` (milliseconds, set from the
Lambda's remaining time) has passed, i.e. the invocation that wrote it has timed out. Anything
else raises `IdempotencyItemAlreadyExistsError` carrying the record that is in the way.

Times are taken from this process's clock, as Powertools computes the stored timestamps from
it too (and as the DynamoDB layer does).

Dispatch calls the layer from many threads, and a pg8000 connection must not be shared between
threads: the layer keeps a small pool of connections made by the provider it is given.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

import boto3
import pg8000.native
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import (
    STATUS_CONSTANTS,
    DataRecord,
)

from handler.errors import ConfigurationError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

__all__ = [
    "ConnectionProvider",
    "PostgresPersistenceLayer",
    "build_persistence_layer",
    "idempotency_config",
    "prune_expired",
]

StoreKind = Literal["dynamodb", "postgres"]

logger = logging.getLogger(__name__)

ConnectionProvider = Callable[[], pg8000.native.Connection]
"""Opens a new connection each time it is called (e.g. `lambda: db.connect(settings)`)."""

# Errors after which a connection cannot be trusted: the socket broke, the protocol state is
# unknown, or the server said it is closing this session (SQLSTATE class 08, or 57P01-57P03:
# terminated by an administrator, a crash, a restart). Any other DatabaseError (the server
# refused the statement) leaves the connection usable.
_BROKEN_SQLSTATES: Final = ("08", "57P01", "57P02", "57P03")


def _is_broken(exc: BaseException) -> bool:
    if isinstance(exc, (pg8000.native.InterfaceError, OSError)):
        return True
    if isinstance(exc, pg8000.native.DatabaseError) and exc.args:
        fields = exc.args[0]
        code = str(fields.get("C", "")) if isinstance(fields, dict) else ""
        return code.startswith(_BROKEN_SQLSTATES)
    return not isinstance(exc, Exception)  # interrupted mid-protocol: what comes next is unknown


_COLUMNS: Final = "id, status, expiration, in_progress_expiration, data, validation"

_GET_SQL: Final = f"SELECT {_COLUMNS} FROM queue_idempotency WHERE id = :id"

# Insert, or take over a record that no longer counts; when neither happened, the same
# statement returns the record in the way. Its last part reads the statement's snapshot, which
# may predate a record that a concurrent call committed a moment ago (INSERT ... ON CONFLICT
# sees it, a plain SELECT does not), or show an older version of one. Versions that would have
# been taken over are therefore not returned: they are stale, since the ON CONFLICT clause, which
# does see the latest version, refused to take it over. Zero rows means "it exists, read it again".
_PUT_SQL: Final = f"""
WITH taken AS (
    INSERT INTO queue_idempotency AS r ({_COLUMNS})
    VALUES (:id, :status, :expiration, :in_progress_expiration, NULL, :validation)
    ON CONFLICT (id) DO UPDATE
    SET status = excluded.status,
        expiration = excluded.expiration,
        in_progress_expiration = excluded.in_progress_expiration,
        data = NULL,
        validation = excluded.validation,
        created_at = now()
    WHERE r.expiration < :now
       OR (r.status = :inprogress AND r.in_progress_expiration < :now_ms)
    RETURNING r.id
)
SELECT true, NULL::text, NULL::bigint, NULL::bigint, NULL::text, NULL::text FROM taken
UNION ALL
SELECT false, e.status, e.expiration, e.in_progress_expiration, e.data, e.validation
FROM queue_idempotency e
WHERE e.id = :id
  AND NOT EXISTS (SELECT FROM taken)
  AND e.expiration >= :now
  AND NOT (e.status = :inprogress AND coalesce(e.in_progress_expiration < :now_ms, false))
"""

# Like DynamoDB's UpdateItem, this writes the record even if it has vanished meanwhile. The
# validation hash is only written when payload validation is on (otherwise it is kept).
_UPDATE_SQL: Final = f"""
INSERT INTO queue_idempotency AS r ({_COLUMNS})
VALUES (:id, :status, :expiration, NULL, :data, :validation)
ON CONFLICT (id) DO UPDATE
SET status = excluded.status,
    expiration = excluded.expiration,
    data = excluded.data,
    validation = coalesce(excluded.validation, r.validation)
"""

_DELETE_SQL: Final = "DELETE FROM queue_idempotency WHERE id = :id"

_PRUNE_SQL: Final = """
DELETE FROM queue_idempotency
WHERE id IN (
    SELECT id FROM queue_idempotency
    WHERE expiration < floor(extract(epoch FROM now()))::bigint
    ORDER BY expiration
    LIMIT :limit
    FOR UPDATE SKIP LOCKED)
"""


class _ConnectionPool:
    """At most `max_connections` connections from `provider`, each used by one thread at a time.

    A caller takes a slot (blocking while all are taken), then the most recently used idle
    connection, or a new one. A connection that failed with a broken-connection error is closed
    and never returned; the statement is retried once on a fresh connection.
    """

    def __init__(
        self,
        provider: ConnectionProvider,
        max_connections: int,
        acquire_timeout: float | None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._provider = provider
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._acquire_timeout = acquire_timeout

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        """Runs one statement (autocommit) and returns its rows."""
        if not self._slots.acquire(timeout=self._acquire_timeout):
            raise TimeoutError("no idempotency store connection became free in time")
        conn: Any = None
        try:
            conn = self._take()
            try:
                return _rows(_execute(conn, sql, params))
            except Exception as exc:
                if not _is_broken(exc):
                    raise
                logger.warning(
                    "Idempotency store connection lost (%s); retrying on a new connection",
                    type(exc).__name__,
                )
                _close_quietly(conn)
                conn = None
                conn = self._provider()
                return _rows(_execute(conn, sql, params))
        except BaseException as exc:
            if _is_broken(exc):
                _close_quietly(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        """Closes the idle connections (those in use are closed when they come back broken)."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            _close_quietly(conn)

    def _take(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._provider()


def _execute(conn: Any, sql: str, params: dict[str, Any]) -> Any:
    """Runs a statement prepared once per connection: pg8000 would otherwise parse the SQL text
    again on every call, which was half the store's CPU in the benchmark."""
    prepared: dict[str, Any] | None = getattr(conn, "_queue_worker_prepared", None)
    if prepared is None:
        prepared = {}
        conn._queue_worker_prepared = prepared
    statement = prepared.get(sql)
    if statement is None:
        statement = prepared[sql] = conn.prepare(sql)
    return statement.run(**params)


def _rows(result: Any) -> list[list[Any]]:
    return list(result) if result is not None else []


def _close_quietly(conn: Any) -> None:
    if conn is None:
        return
    # pg8000's close() writes a Terminate message first; on a dead socket that fails and leaves
    # its buffered socket file open (a leaked descriptor), so that file is closed here too.
    sock_file = getattr(conn, "_sock", None)
    with contextlib.suppress(Exception):  # it is being thrown away because it is broken
        conn.close()
    if sock_file is not None:
        with contextlib.suppress(Exception):
            sock_file.close()


class PostgresPersistenceLayer(BasePersistenceLayer):
    """Idempotency records in the `queue_idempotency` table.

    `connection_provider` opens a new `pg8000.native.Connection` each time it is called; the
    layer keeps up to `max_connections` of them open and blocks callers while all are in use
    (for at most `acquire_timeout` seconds, when given). Safe to call from many threads.
    """

    def __init__(
        self,
        connection_provider: ConnectionProvider,
        *,
        max_connections: int = 8,
        acquire_timeout: float | None = None,
    ) -> None:
        self._pool = _ConnectionPool(connection_provider, max_connections, acquire_timeout)
        super().__init__()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated

    def close(self) -> None:
        """Closes the pooled connections that are idle."""
        self._pool.close()

    def _get_record(self, idempotency_key: str) -> DataRecord:
        rows = self._pool.run(_GET_SQL, id=idempotency_key)
        if not rows:
            raise IdempotencyItemNotFoundError
        return _to_record(rows[0])

    def _put_record(self, data_record: DataRecord) -> None:
        now = time.time()
        validation = data_record.payload_hash if self.payload_validation_enabled else None
        logger.debug(f"Putting record for idempotency key: {data_record.idempotency_key}")
        rows = self._pool.run(
            _PUT_SQL,
            id=data_record.idempotency_key,
            status=data_record.status,
            expiration=data_record.expiry_timestamp,
            in_progress_expiration=data_record.in_progress_expiry_timestamp,
            validation=validation or None,
            now=int(now),
            now_ms=int(now * 1000),
            inprogress=STATUS_CONSTANTS["INPROGRESS"],
        )
        if rows and rows[0][0]:
            return
        if not rows:
            # A concurrent call committed the record after this statement's snapshot was taken:
            # Powertools reads it with _get_record (a new snapshot), as it does for DynamoDB
            # when the failed write returns no item.
            logger.debug(
                f"Failed to put record for already existing idempotency key: "
                f"{data_record.idempotency_key} (not visible yet)"
            )
            raise IdempotencyItemAlreadyExistsError
        old_data_record = _to_record(rows[0][1:], key=data_record.idempotency_key)
        logger.debug(
            f"Failed to put record for already existing idempotency key: "
            f"{data_record.idempotency_key} with status: {old_data_record.status}, "
            f"expiry_timestamp: {old_data_record.expiry_timestamp}, "
            f"and in_progress_expiry_timestamp: {old_data_record.in_progress_expiry_timestamp}",
        )
        # As DynamoDBPersistenceLayer does: a payload that does not match the stored hash raises
        # IdempotencyValidationError instead.
        self._validate_payload(data_payload=data_record, stored_data_record=old_data_record)
        self._save_to_cache(data_record=old_data_record)
        raise IdempotencyItemAlreadyExistsError(old_data_record=old_data_record)

    def _update_record(self, data_record: DataRecord) -> None:
        logger.debug(f"Updating record for idempotency key: {data_record.idempotency_key}")
        validation = data_record.payload_hash if self.payload_validation_enabled else None
        self._pool.run(
            _UPDATE_SQL,
            id=data_record.idempotency_key,
            status=data_record.status,
            expiration=data_record.expiry_timestamp,
            data=data_record.response_data,
            validation=validation or None,
        )

    def _delete_record(self, data_record: DataRecord) -> None:
        logger.debug(f"Deleting record for idempotency key: {data_record.idempotency_key}")
        self._pool.run(_DELETE_SQL, id=data_record.idempotency_key)


def _to_record(row: list[Any], *, key: str | None = None) -> DataRecord:
    """A row of (id, status, expiration, in_progress_expiration, data, validation), or the same
    without its id when `key` is given."""
    if key is None:
        key, *row = row
    status, expiration, in_progress_expiration, data, validation = row
    return DataRecord(
        idempotency_key=str(key),
        status=str(status),
        expiry_timestamp=int(expiration),
        in_progress_expiry_timestamp=(
            int(in_progress_expiration) if in_progress_expiration is not None else None
        ),
        response_data=str(data) if data is not None else "",
        payload_hash=str(validation) if validation is not None else "",
    )


def prune_expired(conn: pg8000.native.Connection, *, limit: int = 1000) -> int:
    """Deletes up to `limit` expired idempotency records, oldest first; returns how many.

    One bounded statement (call it again while it returns `limit`). Rows locked by a concurrent
    put are skipped, not waited for.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    conn.run(_PRUNE_SQL, limit=limit)
    return int(conn.row_count)


# Choosing and configuring the store ------------------------------------------------------------


@functools.cache
def _dynamodb_client() -> DynamoDBClient:
    """One client per container (creating one is slow, and not thread-safe on the default
    session). Region, credentials and endpoint come from the usual AWS environment variables."""
    return boto3.session.Session().client("dynamodb")


def build_persistence_layer(
    kind: StoreKind,
    *,
    table: str | None,
    connection_provider: ConnectionProvider | None,
    max_connections: int = 8,
) -> BasePersistenceLayer:
    """The idempotency store of `kind`.

    `dynamodb` needs `table` (IDEMPOTENCY_TABLE); `postgres` needs `connection_provider`, a
    zero-argument callable that opens a new pg8000 connection (up to `max_connections` are kept).
    Build a new store for each `IdempotencyConfig`: Powertools keeps the first config it is given.
    """
    if kind == "dynamodb":
        if not table:
            raise ConfigurationError(
                "IDEMPOTENCY_TABLE", "must be set when IDEMPOTENCY_STORE=dynamodb"
            )
        return DynamoDBPersistenceLayer(
            table_name=table,
            key_attr="id",
            expiry_attr="expiration",
            boto3_client=_dynamodb_client(),
        )
    if kind == "postgres":
        if connection_provider is None:
            raise ValueError("the postgres idempotency store needs a connection_provider")
        return PostgresPersistenceLayer(connection_provider, max_connections=max_connections)
    raise ConfigurationError("IDEMPOTENCY_STORE", f"is {kind!r}; use dynamodb, postgres or off")


def idempotency_config(expires_after_seconds: int = 3600) -> IdempotencyConfig:
    """Records keyed by the `job_id` of the function's `job` argument, kept for an hour by
    default. Register the Lambda context on it (`config.register_lambda_context(context)`) before
    the first call, so that an in-progress record expires with the invocation."""
    if expires_after_seconds < 1:
        raise ValueError("expires_after_seconds must be at least 1")
    return IdempotencyConfig(
        event_key_jmespath="job_id",
        raise_on_no_idempotency_key=True,
        expires_after_seconds=expires_after_seconds,
        use_local_cache=False,
    )
