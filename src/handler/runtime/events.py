"""The invocation events we accept (the README's "Invocation events"), parsed before any job is touched.

- an EventBridge rule event ("detail-type": "Scheduled Event"): overrides may sit in `detail`;
- an EventBridge Scheduler input or a direct invoke: a JSON object with optional keys.

Anything else raises EventError naming the field.
"""

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, NamedTuple
from uuid import UUID

from handler.errors import EventError

EventSource = Literal["rule", "scheduler", "direct"]

# Keys of the direct form (and of a rule event's detail). shard/shards are what a fan-out
# invocation carries: the scheduled run splits tenants by a hash into `shards` parts.
_DIRECT_KEYS = frozenset({"tenant_id", "max_jobs", "scheduled_time", "shard", "shards"})
_RULE_KEYS = frozenset(
    {"version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"}
)
MAX_SHARDS = 1000
# As MAX_JOBS_PER_TENANT's bound: the claim's limits are 32-bit integers in SQL.
MAX_JOBS = 100_000
# The canonical 8-4-4-4-12 form, or the same 32 hex digits without hyphens (as PostgreSQL takes).
_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}",
    re.ASCII,
)


class Invocation(NamedTuple):
    """What one invocation is asked to do."""

    source: EventSource
    tenant_id: UUID | None = None
    max_jobs_per_tenant: int | None = None  # overrides MAX_JOBS_PER_TENANT
    scheduled_time: datetime | None = None
    shard: int = 0
    shards: int = 1
    event_id: str | None = None

    @property
    def is_fan_out_copy(self) -> bool:
        return self.shards > 1


def parse_event(event: Any) -> Invocation:
    if not isinstance(event, Mapping):
        raise EventError("(event)", f"must be a JSON object, not {type(event).__name__}")
    if event.get("detail-type") == "Scheduled Event" or "detail-type" in event:
        return _parse_rule_event(event)
    unknown = sorted(set(event) - _DIRECT_KEYS)
    if unknown:
        raise EventError(
            unknown[0],
            f"is not accepted; a direct or Scheduler event may carry only {sorted(_DIRECT_KEYS)}",
        )
    source: EventSource = "scheduler" if "scheduled_time" in event else "direct"
    return _parse_overrides(event, source=source, event_id=None, prefix="")


def _parse_rule_event(event: Mapping[str, Any]) -> Invocation:
    if event.get("detail-type") != "Scheduled Event":
        raise EventError(
            "detail-type", f"must be 'Scheduled Event', not {event.get('detail-type')!r}"
        )
    unknown = sorted(set(event) - _RULE_KEYS)
    if unknown:
        raise EventError(unknown[0], "is not a field of an EventBridge event")
    detail = event.get("detail")
    if detail is None:
        detail = {}
    if not isinstance(detail, Mapping):
        raise EventError("detail", "must be a JSON object")
    unknown = sorted(set(detail) - _DIRECT_KEYS)
    if unknown:
        raise EventError(
            f"detail.{unknown[0]}", f"is not accepted; detail may carry only {sorted(_DIRECT_KEYS)}"
        )
    event_id = event.get("id")
    invocation = _parse_overrides(
        detail,
        source="rule",
        event_id=event_id if isinstance(event_id, str) else None,
        prefix="detail.",
    )
    if invocation.scheduled_time is None and event.get("time") is not None:
        # The rule's own `time` is the scheduled time unless detail names one; a bad one is
        # reported under its own name, not as a detail field the user never wrote.
        return invocation._replace(scheduled_time=_timestamp(event["time"], "time"))
    return invocation


def _parse_overrides(
    values: Mapping[str, Any], *, source: EventSource, event_id: str | None, prefix: str
) -> Invocation:
    tenant_id = _uuid(values.get("tenant_id"), f"{prefix}tenant_id")
    max_jobs = _positive_int(values.get("max_jobs"), f"{prefix}max_jobs")
    if max_jobs is not None and max_jobs > MAX_JOBS:
        raise EventError(f"{prefix}max_jobs", f"must be at most {MAX_JOBS}, not {max_jobs}")
    shards = _positive_int(values.get("shards"), f"{prefix}shards") or 1
    if shards > MAX_SHARDS:
        raise EventError(f"{prefix}shards", f"must be at most {MAX_SHARDS}")
    shard = values.get("shard", 0)
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shards:
        raise EventError(
            f"{prefix}shard", f"must be a JSON integer from 0 to shards-1 ({shards - 1})"
        )
    if tenant_id is not None and shards > 1:
        raise EventError(f"{prefix}shards", "cannot be combined with tenant_id")
    return Invocation(
        source=source,
        tenant_id=tenant_id,
        max_jobs_per_tenant=max_jobs,
        scheduled_time=_timestamp(values.get("scheduled_time"), f"{prefix}scheduled_time"),
        shard=shard,
        shards=shards,
        event_id=event_id,
    )


def _uuid(value: Any, field: str) -> UUID | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError(field, f"must be a uuid string, not {type(value).__name__}")
    # UUID() alone also takes "urn:uuid:" prefixes, underscores and non-ASCII digits.
    if not _UUID_TEXT.fullmatch(value):
        raise EventError(field, f"is not a valid uuid: {value[:64]!r}")
    try:
        return UUID(value)
    except ValueError:
        raise EventError(field, f"is not a valid uuid: {value[:64]!r}") from None


def _positive_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    # bool is an int in Python, and "5" is not a JSON integer: both are mistakes worth naming.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(
            field, f"must be a JSON integer >= 1, not {type(value).__name__} {value!r}"[:200]
        )
    if value < 1:
        raise EventError(field, f"must be >= 1, not {value}")
    return value


def _timestamp(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError(field, f"must be an ISO-8601 string, not {type(value).__name__}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise EventError(field, f"is not an ISO-8601 timestamp: {value[:64]!r}") from None
