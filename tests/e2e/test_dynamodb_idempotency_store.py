"""The DynamoDB idempotency store, as build_persistence_layer("dynamodb", ...) makes it.

These tests talk HTTP to moto in server mode (`moto.server.ThreadedMotoServer` on a free local
port), not to AWS and not through moto's in-process mocks: boto3 is pointed at it with
AWS_ENDPOINT_URL_DYNAMODB and dummy credentials. The table has the shape of the one in
template.yaml (hash key `id`, TTL on `expiration`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import (
    BasePersistenceLayer,
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
)

from handler.dispatch import idempotency
from handler.dispatch.idempotency import build_persistence_layer, idempotency_config
from handler.errors import ConfigurationError
from tests.conftest import use_fake_aws

Job = dict[str, Any]
REGION = "us-east-1"


class FakeContext:
    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Dummy credentials and the moto endpoint, for every boto3 client made in the test."""
    use_fake_aws(monkeypatch, tmp_path, REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto_endpoint)
    idempotency._dynamodb_client.cache_clear()  # the cached client predates this env
    yield
    idempotency._dynamodb_client.cache_clear()


@pytest.fixture
def dynamodb(aws_env: None, moto_endpoint: str) -> Any:
    return boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_endpoint)


@pytest.fixture
def table(dynamodb: Any) -> str:
    """A fresh table shaped like the SAM one."""
    name = f"idempotency-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.update_time_to_live(
        TableName=name,
        TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"},
    )
    return name


@pytest.fixture
def layer(table: str) -> BasePersistenceLayer:
    return build_persistence_layer("dynamodb", table=table, connection_provider=None)


@pytest.fixture
def config() -> IdempotencyConfig:
    cfg = idempotency_config()
    cfg.register_lambda_context(FakeContext())  # type: ignore[arg-type]
    return cfg


def make_dispatch(
    layer: BasePersistenceLayer,
    config: IdempotencyConfig,
    body: Callable[[Job], Any] | None = None,
) -> tuple[Callable[..., Any], list[str]]:
    calls: list[str] = []

    @idempotent_function(data_keyword_argument="job", persistence_store=layer, config=config)
    def dispatch(job: Job) -> Any:
        calls.append(job["job_id"])
        if body is not None:
            return body(job)
        return {"status": 200, "job_id": job["job_id"], "run": len(calls)}

    return dispatch, calls


def items(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    return list(dynamodb.scan(TableName=table, ConsistentRead=True)["Items"])


def test_the_layer_is_dynamodb_with_the_sam_table_attributes(layer: BasePersistenceLayer) -> None:
    assert isinstance(layer, DynamoDBPersistenceLayer)
    assert layer.key_attr == "id"
    assert layer.expiry_attr == "expiration"
    assert layer.sort_key_attr is None


def test_the_boto3_client_is_created_once(table: str, moto_endpoint: str) -> None:
    first = build_persistence_layer("dynamodb", table=table, connection_provider=None)
    second = build_persistence_layer("dynamodb", table=table, connection_provider=None)
    assert isinstance(first, DynamoDBPersistenceLayer)
    assert isinstance(second, DynamoDBPersistenceLayer)
    assert first.client is second.client
    assert first.client.meta.endpoint_url == moto_endpoint


def test_first_call_runs_and_stores_completed_second_returns_stored(
    layer: BasePersistenceLayer, config: IdempotencyConfig, dynamodb: Any, table: str
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1", "payload": {"a": 1}}

    first = dispatch(job=job)
    second = dispatch(job=job)

    assert calls == ["job-1"]
    assert second == first == {"status": 200, "job_id": "job-1", "run": 1}
    [item] = items(dynamodb, table)
    assert item["status"] == {"S": "COMPLETED"}
    assert json.loads(item["data"]["S"]) == first
    assert abs(int(item["expiration"]["N"]) - (time.time() + 3600)) < 10


def test_a_function_that_raises_leaves_no_record_and_runs_again(
    layer: BasePersistenceLayer, config: IdempotencyConfig, dynamodb: Any, table: str
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
    assert items(dynamodb, table) == []

    assert dispatch(job=job) == {"status": 200}
    assert calls == ["job-1", "job-1"]
    assert [i["status"]["S"] for i in items(dynamodb, table)] == ["COMPLETED"]


@pytest.mark.parametrize(("offset_ms", "blocked"), [(60_000, True), (-1_000, False)])
def test_an_in_progress_record_blocks_until_its_invocation_times_out(
    layer: BasePersistenceLayer,
    config: IdempotencyConfig,
    dynamodb: Any,
    table: str,
    offset_ms: int,
    blocked: bool,
) -> None:
    dispatch, calls = make_dispatch(layer, config)
    job = {"job_id": "job-1"}
    dispatch(job=job)
    [item] = items(dynamodb, table)
    dynamodb.update_item(
        TableName=table,
        Key={"id": item["id"]},
        UpdateExpression="SET #s = :s, in_progress_expiration = :ms REMOVE #d",
        ExpressionAttributeNames={"#s": "status", "#d": "data"},
        ExpressionAttributeValues={
            ":s": {"S": "INPROGRESS"},
            ":ms": {"N": str(int(time.time() * 1000) + offset_ms)},
        },
    )

    if blocked:
        with pytest.raises(IdempotencyAlreadyInProgressError):
            dispatch(job=job)
        assert calls == ["job-1"]
    else:
        assert dispatch(job=job)["run"] == 2
        assert calls == ["job-1", "job-1"]


def test_dynamodb_without_a_table_names_the_variable(aws_env: None) -> None:
    with pytest.raises(ConfigurationError, match="IDEMPOTENCY_TABLE"):
        build_persistence_layer("dynamodb", table=None, connection_provider=None)
    with pytest.raises(ConfigurationError, match="IDEMPOTENCY_TABLE"):
        build_persistence_layer("dynamodb", table="", connection_provider=None)
