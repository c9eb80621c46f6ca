"""The idempotency guard's stores and config: Powertools idempotency around each dispatch.

The store is chosen by `IDEMPOTENCY_STORE`: `dynamodb` (the SAM default; the table is in
template.yaml, with TTL on `expiration`) or `postgres` (`PostgresPersistenceLayer` below, over the
`queue_idempotency` table of the queue's own database). The config keys records by the job id and
has no local cache, which has no lock, and dispatch runs in threads.

`PostgresPersistenceLayer` is a Powertools 3.x `BasePersistenceLayer`, the PostgreSQL twin of
`DynamoDBPersistenceLayer`, for local runs and for users who want no extra AWS table. Each of its
four operations is one call of a SQL function (queue_worker.idempotency_get/put/update/delete,
migration 0005) through a `QueueStore`.

Taking a key (`_put_record`) follows the DynamoDB layer's condition exactly: a new key is
inserted; an existing record is taken over only when it has expired (`expiration` < now, in
seconds) or when it is INPROGRESS and its `in_progress_expiration` (milliseconds, set from the
Lambda's remaining time) has passed, i.e. the invocation that wrote it has timed out. Anything
else raises `IdempotencyItemAlreadyExistsError` carrying the record that is in the way.

Times are taken from this process's clock, as Powertools computes the stored timestamps from
it too (and as the DynamoDB layer does).

Dispatch calls the layer from many threads, and a pg8000 connection must not be shared between
threads: the layer keeps a small pool of stores, each with its own connection.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import pg8000.native
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import (
    DataRecord,
)

from handler.errors import ConfigurationError
from handler.queue.store import QueueStore

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

__all__ = [
    "ConnectionProvider",
    "PostgresPersistenceLayer",
    "build_persistence_layer",
    "idempotency_config",
]

StoreKind = Literal["dynamodb", "postgres"]

logger = logging.getLogger(__name__)

ConnectionProvider = Callable[[], pg8000.native.Connection]
"""Opens a new connection each time it is called (e.g. `lambda: connection.connect(settings)`)."""


class _StorePool:
    """At most `max_connections` stores (one connection each), each used by one thread at a time.

    A caller takes a slot (blocking while all are taken), then the most recently used idle
    store, or a new one. A store reconnects by itself after a lost connection."""

    def __init__(
        self, provider: ConnectionProvider, max_connections: int, acquire_timeout: float | None
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._provider = provider
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: queue.LifoQueue[QueueStore] = queue.LifoQueue()
        self._all: list[QueueStore] = []
        self._lock = threading.Lock()
        self._acquire_timeout = acquire_timeout
        self._deadline: float | None = None

    @contextmanager
    def store(self) -> Iterator[QueueStore]:
        if not self._slots.acquire(timeout=self._acquire_timeout):
            raise TimeoutError("no idempotency store connection became free in time")
        try:
            try:
                store = self._idle.get_nowait()
            except queue.Empty:
                store = QueueStore(self._provider)
                with self._lock:
                    self._all.append(store)
            store.limit_statements(self._deadline)
            try:
                yield store
            finally:
                self._idle.put(store)
        finally:
            self._slots.release()

    def limit_statements(self, deadline: float | None) -> None:
        self._deadline = deadline

    def close(self) -> None:
        with self._lock:
            stores = list(self._all)
        for store in stores:
            store.close()


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
        self._pool = _StorePool(connection_provider, max_connections, acquire_timeout)
        super().__init__()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated

    def limit_statements(self, deadline: float | None) -> None:
        """Every statement from now on ends by `deadline` (time.monotonic()), as the queue's."""
        self._pool.limit_statements(deadline)

    def close(self) -> None:
        """Closes the pooled connections."""
        self._pool.close()

    def _get_record(self, idempotency_key: str) -> DataRecord:
        with self._pool.store() as store:
            row = store.idempotency_get(idempotency_key)
        if row is None:
            raise IdempotencyItemNotFoundError
        return _to_record(row)

    def _put_record(self, data_record: DataRecord) -> None:
        now = time.time()
        validation = data_record.payload_hash if self.payload_validation_enabled else None
        logger.debug(f"Putting record for idempotency key: {data_record.idempotency_key}")
        with self._pool.store() as store:
            rows = store.idempotency_put(
                data_record.idempotency_key,
                status=data_record.status,
                expiration=data_record.expiry_timestamp,
                in_progress_expiration=data_record.in_progress_expiry_timestamp,
                validation=validation or None,
                now=int(now),
                now_ms=int(now * 1000),
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
        with self._pool.store() as store:
            store.idempotency_update(
                data_record.idempotency_key,
                status=data_record.status,
                expiration=data_record.expiry_timestamp,
                data=data_record.response_data,
                validation=validation or None,
            )

    def _delete_record(self, data_record: DataRecord) -> None:
        logger.debug(f"Deleting record for idempotency key: {data_record.idempotency_key}")
        with self._pool.store() as store:
            store.idempotency_delete(data_record.idempotency_key)


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


# Choosing and configuring the store ------------------------------------------------------------


@functools.cache
def _dynamodb_client() -> DynamoDBClient:
    """One client per container (creating one is slow, and not thread-safe on the default
    session). Region, credentials and endpoint come from the usual AWS environment variables."""
    import boto3

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
