"""Builds the Powertools idempotency store and config that guard dispatch (DESIGN section 6).

The store is chosen by `IDEMPOTENCY_STORE`: `dynamodb` (the SAM default; the table is in
template.yaml, with TTL on `expiration`) or `postgres` (`queue_idempotency` on the queue's own
database). The config keys records by the job id and has no local cache, which has no lock and
dispatch runs in threads.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import boto3
from aws_lambda_powertools.utilities.idempotency import (
    BasePersistenceLayer,
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
)

from handler.errors import ConfigurationError
from handler.idempotency_store import ConnectionProvider, PostgresPersistenceLayer

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

__all__ = ["build_persistence_layer", "idempotency_config"]

StoreKind = Literal["dynamodb", "postgres"]


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
