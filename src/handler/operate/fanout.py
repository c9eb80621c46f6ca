"""Fan-out: when the backlog is more than one invocation can take, the scheduled invocation
starts asynchronous copies of itself, each claiming a disjoint shard of tenants.

Tenants are split by a hash of their id into `shards` parts (the SQL does it, in claim_jobs);
the copies and the scheduled invocation together cover every shard, so the union is every
tenant. Which shard the scheduled invocation keeps for itself turns with the minute: were the
copies throttled or failing every time, no shard's tenants would wait more than `shards`
minutes, and within a shard the per-tenant cap keeps one tenant from crowding out the others.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from handler.operate.observability import logger

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient


class FanOutPlan(NamedTuple):
    shards: int  # 1: no fan-out
    own_shard: int

    @property
    def copies(self) -> list[int]:
        return [shard for shard in range(self.shards) if shard != self.own_shard]


def plan(
    *,
    due_now: int,
    per_invocation: int,
    fan_out_max: int,
    reserved_concurrency: int | None,
    minute: int,
) -> FanOutPlan:
    """How many shards for this backlog. `per_invocation` is what one batch can take
    (MAX_JOBS_PER_RUN); copies never exceed FAN_OUT_MAX nor the reserved concurrency less one
    (kept for the next scheduled run)."""
    if fan_out_max < 1 or per_invocation < 1 or due_now <= per_invocation:
        return FanOutPlan(1, 0)
    copies = min(fan_out_max, math.ceil(due_now / per_invocation) - 1)
    if reserved_concurrency is not None:
        copies = min(copies, max(0, reserved_concurrency - 1))
    shards = copies + 1
    return FanOutPlan(shards, minute % shards)


def start_copies(
    client: LambdaClient,
    function_arn: str,
    fan_out: FanOutPlan,
    *,
    scheduled_time: datetime | None,
) -> list[int]:
    """Invokes one asynchronous copy per shard but our own; returns the shards started.

    A copy that cannot be started (throttled, refused, a network error) is logged and skipped:
    it does not stop the copies after it, and the shards already started are still reported.
    """
    started = []
    for shard in fan_out.copies:
        event: dict[str, Any] = {"shard": shard, "shards": fan_out.shards}
        if scheduled_time is not None:
            event["scheduled_time"] = scheduled_time.isoformat()
        try:
            response = client.invoke(
                FunctionName=function_arn,
                InvocationType="Event",
                Payload=json.dumps(event).encode(),
            )
        except Exception as exc:  # botocore's errors; imported lazily, like boto3 itself
            logger.warning(
                "Fan-out copy not started",
                extra={"shard": shard, "shards": fan_out.shards, "error": str(exc)},
            )
            continue
        if response.get("StatusCode") == 202:
            started.append(shard)
        else:
            logger.warning(
                "Fan-out copy not accepted",
                extra={
                    "shard": shard,
                    "shards": fan_out.shards,
                    "status": response.get("StatusCode"),
                },
            )
    return started
