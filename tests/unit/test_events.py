"""parse_event: the three invocation shapes, and an error naming the field
for anything else, raised before any job is touched."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.errors import EventError
from handler.runtime.events import MAX_SHARDS, Invocation, parse_event

EVENTS_DIR = Path(__file__).resolve().parents[2] / "events"
TENANT = "6f1c2a7e-3b9d-4c1e-9a57-2d8e4b0f9c31"


def rule_event(**overrides: Any) -> dict[str, Any]:
    """An EventBridge rule event as the schedule sends it."""
    event: dict[str, Any] = {
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-11-29T12:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/every-minute"],
        "detail": {},
    }
    event.update(overrides)
    return event


def field_error(event: Any) -> EventError:
    with pytest.raises(EventError) as caught:
        parse_event(event)
    return caught.value


# --- the accepted shapes -------------------------------------------------------------------


def test_rule_event_runs_all_tenants_with_its_time_and_id() -> None:
    invocation = parse_event(rule_event())

    assert invocation == Invocation(
        source="rule",
        scheduled_time=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
        event_id="53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
    )
    assert invocation.tenant_id is None
    assert not invocation.is_fan_out_copy


def test_rule_event_takes_tenant_and_max_jobs_from_detail() -> None:
    invocation = parse_event(rule_event(detail={"tenant_id": TENANT, "max_jobs": 3}))

    assert invocation.source == "rule"
    assert invocation.tenant_id == UUID(TENANT)
    assert invocation.max_jobs_per_tenant == 3


def test_rule_event_scheduled_time_in_detail_wins_over_the_event_time() -> None:
    event = rule_event(detail={"scheduled_time": "2030-01-02T03:04:05+00:00"})

    assert parse_event(event).scheduled_time == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_rule_event_without_detail_is_all_tenants() -> None:
    event = rule_event()
    del event["detail"]

    assert parse_event(event).tenant_id is None


def test_scheduler_input_with_tenant_and_max_jobs() -> None:
    invocation = parse_event(
        {"tenant_id": TENANT, "max_jobs": 5, "scheduled_time": "2026-11-29T12:00:00Z"}
    )

    assert invocation == Invocation(
        source="scheduler",
        tenant_id=UUID(TENANT),
        max_jobs_per_tenant=5,
        scheduled_time=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
    )


def test_empty_direct_invoke_runs_all_tenants_with_configured_limits() -> None:
    assert parse_event({}) == Invocation(source="direct")


def test_direct_invoke_with_tenant_only() -> None:
    invocation = parse_event({"tenant_id": TENANT.upper()})

    assert invocation.source == "direct"
    assert invocation.tenant_id == UUID(TENANT)
    assert invocation.max_jobs_per_tenant is None


def test_null_values_in_direct_form_mean_absent() -> None:
    assert parse_event({"tenant_id": None, "max_jobs": None}) == Invocation(source="direct")


def test_fan_out_copy_carries_its_shard() -> None:
    invocation = parse_event({"shard": 2, "shards": 4})

    assert (invocation.shard, invocation.shards) == (2, 4)
    assert invocation.is_fan_out_copy


# --- errors name the field -------------------------------------------------------------------


@pytest.mark.parametrize("event", [[], "run", 42, None, True, [{"max_jobs": 1}]])
def test_event_that_is_not_an_object_is_refused(event: Any) -> None:
    error = field_error(event)

    assert error.field == "(event)"
    assert "must be a JSON object" in str(error)
    assert type(event).__name__ in str(error)


def test_unknown_key_in_direct_form_is_named() -> None:
    error = field_error({"tenant": TENANT})

    assert error.field == "tenant"
    assert str(error).startswith("event field 'tenant' is not accepted")


def test_unknown_key_in_detail_is_named_with_its_path() -> None:
    error = field_error(rule_event(detail={"tenantId": TENANT}))

    assert error.field == "detail.tenantId"
    assert "event field 'detail.tenantId' is not accepted" in str(error)


def test_unknown_top_level_key_in_rule_event_is_named() -> None:
    error = field_error(rule_event(extra=1))

    assert error.field == "extra"
    assert "is not a field of an EventBridge event" in str(error)


def test_rule_event_of_another_detail_type_is_refused() -> None:
    error = field_error(rule_event(**{"detail-type": "Object Created"}))

    assert error.field == "detail-type"
    assert "'Object Created'" in str(error)


@pytest.mark.parametrize("detail", [[], "tenant", 0, False, [TENANT]])
def test_rule_event_detail_that_is_not_an_object_is_refused(detail: Any) -> None:
    error = field_error(rule_event(detail=detail))

    assert error.field == "detail"
    assert "must be a JSON object" in str(error)


@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        "6f1c2a7e-3b9d-4c1e-9a57-2d8e4b0f9c3",  # one digit short
        "6f1c2a7e-3b9d-4c1e-9a57-2d8e4b0f9c3g",
        "urn:uuid:6f1c2a7e-3b9d-4c1e-9a57-2d8e4b0f9c31",
        "6f1c2a7e_3b9d_4c1e_9a57_2d8e4b0f9c31",
        "٦f1c2a7e-3b9d-4c1e-9a57-2d8e4b0f9c31",  # a non-ASCII digit
        "",
    ],
)
def test_malformed_tenant_uuid_is_named(value: str) -> None:
    error = field_error({"tenant_id": value})

    assert error.field == "tenant_id"
    assert "is not a valid uuid" in str(error)


def test_malformed_tenant_uuid_in_detail_is_named_with_its_path() -> None:
    error = field_error(rule_event(detail={"tenant_id": "nope"}))

    assert error.field == "detail.tenant_id"
    assert "is not a valid uuid: 'nope'" in str(error)


def test_tenant_uuid_of_wrong_type_is_named() -> None:
    error = field_error({"tenant_id": 12345})

    assert error.field == "tenant_id"
    assert "must be a uuid string, not int" in str(error)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5", "must be a JSON integer >= 1, not str '5'"),
        (True, "must be a JSON integer >= 1, not bool True"),
        (1.5, "must be a JSON integer >= 1, not float 1.5"),
        (5.0, "must be a JSON integer >= 1, not float 5.0"),
        ([5], "must be a JSON integer >= 1, not list [5]"),
        (0, "must be >= 1, not 0"),
        (-1, "must be >= 1, not -1"),
        (100_001, "must be at most 100000, not 100001"),
        (2**31, "must be at most 100000, not 2147483648"),
    ],
)
def test_max_jobs_that_is_not_a_positive_json_integer_is_named(value: Any, message: str) -> None:
    error = field_error({"max_jobs": value})

    assert error.field == "max_jobs"
    assert str(error) == f"event field 'max_jobs' {message}"


def test_max_jobs_error_in_detail_is_named_with_its_path() -> None:
    error = field_error(rule_event(detail={"max_jobs": "5"}))

    assert error.field == "detail.max_jobs"


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00Z", "12:00", ""])
def test_scheduled_time_not_iso_is_named(value: str) -> None:
    error = field_error({"scheduled_time": value})

    assert error.field == "scheduled_time"
    assert "is not an ISO-8601 timestamp" in str(error)


def test_scheduled_time_of_wrong_type_is_named() -> None:
    error = field_error({"scheduled_time": 1767225600})

    assert error.field == "scheduled_time"
    assert "must be an ISO-8601 string, not int" in str(error)


def test_rule_event_with_malformed_time_names_time_not_a_detail_field() -> None:
    error = field_error(rule_event(time="at noon"))

    assert error.field == "time"
    assert str(error).startswith("event field 'time' is not an ISO-8601 timestamp")


@pytest.mark.parametrize(
    ("event", "field", "message"),
    [
        ({"shards": 0}, "shards", "must be >= 1"),
        ({"shards": "2"}, "shards", "must be a JSON integer >= 1"),
        ({"shards": MAX_SHARDS + 1}, "shards", f"must be at most {MAX_SHARDS}"),
        ({"shard": 1}, "shard", "must be a JSON integer from 0 to shards-1 (0)"),
        ({"shard": 4, "shards": 4}, "shard", "from 0 to shards-1 (3)"),
        ({"shard": -1, "shards": 4}, "shard", "from 0 to shards-1 (3)"),
        ({"shard": True, "shards": 4}, "shard", "must be a JSON integer"),
        ({"shard": 1.0, "shards": 4}, "shard", "must be a JSON integer"),
        ({"tenant_id": TENANT, "shards": 2}, "shards", "cannot be combined with tenant_id"),
    ],
)
def test_shard_rules_are_named(event: dict[str, Any], field: str, message: str) -> None:
    error = field_error(event)

    assert error.field == field
    assert message in str(error)


def test_shard_rules_apply_inside_detail_too() -> None:
    error = field_error(rule_event(detail={"shard": 3, "shards": 2}))

    assert error.field == "detail.shard"


def test_the_largest_shard_count_is_accepted() -> None:
    invocation = parse_event({"shard": MAX_SHARDS - 1, "shards": MAX_SHARDS})

    assert invocation.shard == MAX_SHARDS - 1


# --- the shipped sample events ----------------------------------------------------------------


def sample_events() -> list[Path]:
    return sorted(p for p in EVENTS_DIR.glob("*.json") if p.name != "env.json")


def test_there_are_sample_events_for_every_shape() -> None:
    assert len(sample_events()) >= 3


@pytest.mark.parametrize("path", sample_events(), ids=lambda p: p.name)
def test_every_sample_event_is_a_valid_invocation(path: Path) -> None:
    event = json.loads(path.read_text(encoding="utf-8"))

    assert isinstance(parse_event(event), Invocation)


# --- no other exception, whatever arrives ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
interesting_keys = st.sampled_from(
    [
        *["tenant_id", "max_jobs", "scheduled_time", "shard", "shards"],
        *["detail-type", "detail", "time", "id", "version", "source"],
    ]
)
interesting_values = st.one_of(
    json_values,
    st.just("Scheduled Event"),
    st.just(TENANT),
    st.just("2026-11-29T12:00:00Z"),
    st.integers(min_value=-2, max_value=MAX_SHARDS + 2),
    st.dictionaries(interesting_keys, json_values, max_size=4),
)
events = st.dictionaries(
    st.one_of(interesting_keys, st.text(max_size=12)),
    st.one_of(interesting_values, json_values),
    max_size=6,
)


def parse_or_error(event: Any) -> Invocation | EventError:
    try:
        return parse_event(event)
    except EventError as error:
        return error


@given(events)
def test_any_json_object_gives_an_invocation_or_an_event_error(event: dict[str, Any]) -> None:
    result = parse_or_error(event)

    assert isinstance(result, Invocation | EventError)
    if isinstance(result, EventError):
        assert str(result).startswith(f"event field '{result.field}' ")


@given(json_values)
def test_any_json_value_gives_an_invocation_or_an_event_error(event: Any) -> None:
    result = parse_or_error(event)

    assert isinstance(result, Invocation | EventError)
    if isinstance(result, EventError):
        assert str(result).startswith(f"event field '{result.field}' ")


def test_the_largest_max_jobs_is_accepted() -> None:
    assert parse_event({"max_jobs": 100_000}).max_jobs_per_tenant == 100_000
