"""Fan-out: a scheduled run with a backlog larger than one batch starts asynchronous copies of
itself, each claiming a disjoint shard of tenants.

The Lambda API is never called: every `invoke` goes to botocore's Stubber, attached to a real
`boto3.client("lambda", region_name="eu-west-1")`. The stubbed client checks each call against the
Lambda API model (parameter names and types) and answers with the response queued for it; the
parameters each call carried are captured from the client's own `provide-client-params` event.
The database is a real PostgreSQL and the functions are the stand-in (a real HTTP server).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import boto3
import pg8000.native
import pytest
from botocore.stub import Stubber

from handler.local.standin import StandIn
from handler.operate import fanout
from handler.operate.fanout import FanOutPlan
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker

from .conftest import FakeLambdaContext

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient

ARN = FakeLambdaContext().invoked_function_arn
SCHEDULED = "2026-11-29T12:07:00+00:00"  # minute 7: with 4 shards the run keeps shard 3
TENANT_NAMESPACE = uuid.UUID("6f7d2c1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f")


def tenant(n: int) -> uuid.UUID:
    """The same tenant ids on every run, so that which shard each falls in never changes."""
    return uuid.uuid5(TENANT_NAMESPACE, f"tenant-{n}")


# --------------------------------------------------------------------------------------------
# plan(): the decision, pure
# --------------------------------------------------------------------------------------------


def make_plan(
    due: int,
    *,
    per_invocation: int = 10,
    fan_out_max: int = 5,
    reserved: int | None = None,
    minute: int = 0,
) -> FanOutPlan:
    return fanout.plan(
        due_now=due,
        per_invocation=per_invocation,
        fan_out_max=fan_out_max,
        reserved_concurrency=reserved,
        minute=minute,
    )


@pytest.mark.parametrize("due", [0, 1, 9, 10])
def test_no_fan_out_while_one_invocation_can_take_the_whole_backlog(due: int) -> None:
    # Given a backlog of at most MAX_JOBS_PER_RUN (10) due jobs
    # When the scheduled run plans
    plan = make_plan(due, per_invocation=10, fan_out_max=5)
    # Then it keeps everything to itself: one shard, no copies
    assert plan.shards == 1
    assert plan.copies == []


def test_no_fan_out_when_fan_out_max_is_zero_however_large_the_backlog() -> None:
    # Given FAN_OUT_MAX=0 and a backlog a hundred batches long
    # When the scheduled run plans
    plan = make_plan(1000, per_invocation=10, fan_out_max=0)
    # Then there are no copies
    assert plan.shards == 1
    assert plan.copies == []


@pytest.mark.parametrize(
    ("due", "per_invocation", "fan_out_max", "reserved", "copies"),
    [
        (11, 10, 5, None, 1),  # just over one batch: one copy
        (20, 10, 5, None, 1),  # exactly two batches: one copy
        (21, 10, 5, None, 2),
        (35, 10, 3, None, 3),  # ceil(35/10) - 1 = 3 = FAN_OUT_MAX
        (35, 10, 2, None, 2),  # FAN_OUT_MAX binds
        (1000, 10, 5, None, 5),  # FAN_OUT_MAX binds
        (35, 10, 10, 3, 2),  # reserved concurrency less one binds
        (35, 10, 10, 4, 3),  # reserved - 1 == ceil - 1: both bind
        (1000, 10, 10, 100, 10),  # reserved concurrency is ample: FAN_OUT_MAX binds
        (35, 10, 10, 1, 0),  # reserved concurrency 1: the next scheduled run needs it
    ],
)
def test_copies_are_the_least_of_fan_out_max_the_batches_needed_less_one_and_reserved_less_one(
    due: int, per_invocation: int, fan_out_max: int, reserved: int | None, copies: int
) -> None:
    # Given a backlog, MAX_JOBS_PER_RUN, FAN_OUT_MAX and the reserved concurrency
    # When the scheduled run plans
    plan = make_plan(due, per_invocation=per_invocation, fan_out_max=fan_out_max, reserved=reserved)
    # Then copies = min(FAN_OUT_MAX, ceil(due / per_invocation) - 1, reserved - 1)
    bounds = [fan_out_max, math.ceil(due / per_invocation) - 1]
    if reserved is not None:
        bounds.append(reserved - 1)
    assert len(plan.copies) == copies == min(bounds)
    assert plan.shards == copies + 1


def test_the_shard_the_scheduled_run_keeps_turns_with_the_minute() -> None:
    # Given a backlog that needs four shards
    # When the scheduled run plans at minutes 0..7
    own = [make_plan(35, fan_out_max=3, minute=minute).own_shard for minute in range(8)]
    # Then it keeps shard (minute mod 4): each shard in turn, so none waits more than 4 minutes
    assert own == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("minute", [0, 1, 7, 59])
def test_the_copies_are_every_shard_but_the_one_the_run_keeps(minute: int) -> None:
    # Given a backlog that needs four shards
    # When the scheduled run plans
    plan = make_plan(35, fan_out_max=3, minute=minute)
    # Then the copies take the three other shards, in order
    assert plan.own_shard == minute % 4
    assert plan.own_shard not in plan.copies
    assert plan.copies == [shard for shard in range(4) if shard != minute % 4]


@pytest.mark.parametrize("fan_out_max", [1, 2, 3, 5, 9])
def test_own_shard_and_copies_cover_every_shard_exactly_once_at_every_minute(
    fan_out_max: int,
) -> None:
    for minute in range(60):
        # Given a backlog large enough for FAN_OUT_MAX copies
        # When the scheduled run plans at this minute
        plan = make_plan(10_000, fan_out_max=fan_out_max, minute=minute)
        # Then own + copies is 0..n-1, each once
        assert plan.shards == fan_out_max + 1
        assert sorted([plan.own_shard, *plan.copies]) == list(range(plan.shards))


# --------------------------------------------------------------------------------------------
# start_copies(): the asynchronous invokes, against botocore's Stubber
# --------------------------------------------------------------------------------------------


class StubbedLambda:
    """A real Lambda client whose calls go to a Stubber; records each call's parameters."""

    def __init__(self) -> None:
        self.client: LambdaClient = boto3.client("lambda", region_name="eu-west-1")
        self.stubber = Stubber(self.client)
        self.calls: list[dict[str, Any]] = []
        self.client.meta.events.register(
            "provide-client-params.lambda.Invoke", self._record, unique_id="record-invoke"
        )

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        self.calls.append(dict(params))

    def answer(self, *status_codes: int) -> None:
        for status in status_codes:
            self.stubber.add_response("invoke", {"StatusCode": status})

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(call["Payload"]) for call in self.calls]


@pytest.fixture
def stubbed_lambda() -> Iterator[StubbedLambda]:
    stubbed = StubbedLambda()
    with stubbed.stubber:
        yield stubbed


def test_each_copy_is_one_asynchronous_invoke_of_this_function_with_its_shard(
    stubbed_lambda: StubbedLambda,
) -> None:
    # Given a plan of four shards in which the scheduled run keeps shard 3
    plan = make_plan(35, fan_out_max=3, minute=7)
    stubbed_lambda.answer(202, 202, 202)
    scheduled = datetime.fromisoformat(SCHEDULED)
    # When the copies are started
    started = fanout.start_copies(stubbed_lambda.client, ARN, plan, scheduled_time=scheduled)
    # Then there is one Event invoke of this very function per copy, and all were started
    assert started == [0, 1, 2]
    stubbed_lambda.stubber.assert_no_pending_responses()
    assert [(c["FunctionName"], c["InvocationType"]) for c in stubbed_lambda.calls] == [
        (ARN, "Event")
    ] * 3
    # And each payload is an event the handler accepts, naming the copy's shard of 4
    invocations = [parse_event(payload) for payload in stubbed_lambda.payloads()]
    assert [(i.shard, i.shards) for i in invocations] == [(0, 4), (1, 4), (2, 4)]
    assert all(i.is_fan_out_copy for i in invocations)
    assert all(i.scheduled_time == scheduled for i in invocations)
    assert all(i.tenant_id is None for i in invocations)


def test_a_copy_of_a_run_without_scheduled_time_is_still_a_copy(
    stubbed_lambda: StubbedLambda,
) -> None:
    # Given a plan of two shards and no scheduled time
    plan = make_plan(15, fan_out_max=1, minute=0)
    stubbed_lambda.answer(202)
    # When the copy is started
    started = fanout.start_copies(stubbed_lambda.client, ARN, plan, scheduled_time=None)
    # Then its event names shard 1 of 2, and a copy never fans out again
    assert started == [1]
    (payload,) = stubbed_lambda.payloads()
    invocation = parse_event(payload)
    assert (invocation.shard, invocation.shards) == (1, 2)
    assert invocation.is_fan_out_copy


def test_a_copy_lambda_did_not_accept_with_202_is_not_counted_as_started(
    stubbed_lambda: StubbedLambda,
) -> None:
    # Given a plan of three copies, and Lambda answering the second one with 200, not 202
    plan = make_plan(35, fan_out_max=3, minute=3)
    stubbed_lambda.answer(202, 200, 202)
    # When the copies are started
    started = fanout.start_copies(stubbed_lambda.client, ARN, plan, scheduled_time=None)
    # Then all three were asked for, and only the two accepted ones are reported started
    assert [p["shard"] for p in stubbed_lambda.payloads()] == [0, 1, 2]
    assert started == [0, 2]


def test_a_throttled_copy_does_not_stop_the_copies_after_it(
    stubbed_lambda: StubbedLambda,
) -> None:
    # Given a plan of three copies, and Lambda throttling the first invoke
    plan = make_plan(35, fan_out_max=3, minute=0)
    stubbed_lambda.stubber.add_client_error(
        "invoke", service_error_code="TooManyRequestsException", http_status_code=429
    )
    stubbed_lambda.answer(202, 202)
    # When the copies are started
    started = fanout.start_copies(stubbed_lambda.client, ARN, plan, scheduled_time=None)
    # Then the other two are still invoked and reported started
    stubbed_lambda.stubber.assert_no_pending_responses()
    assert [p["shard"] for p in stubbed_lambda.payloads()] == [1, 2, 3]
    assert started == [2, 3]


# --------------------------------------------------------------------------------------------
# Worker.run: when a run fans out, and what it then claims
# --------------------------------------------------------------------------------------------


def shard_of_each_tenant(
    connect: Callable[[], pg8000.native.Connection], shards: int
) -> dict[uuid.UUID, int]:
    """Which shard claim_jobs puts each tenant with a due job in, read by claiming every shard
    inside a transaction that is rolled back (nothing changes)."""
    conn = connect()
    store = QueueStore(conn)
    conn.run("BEGIN")
    try:
        found: dict[uuid.UUID, int] = {}
        for shard in range(shards):
            for job in store.claim(
                f"oracle-{shard}",
                lease_seconds=60,
                max_jobs=100_000,
                max_per_tenant=100_000,
                shard=shard,
                shards=shards,
            ):
                assert found.setdefault(job.tenant_id, shard) == shard
        return found
    finally:
        conn.run("ROLLBACK")


@pytest.fixture
def backlog_of_35(queue: QueueStore) -> dict[uuid.UUID, uuid.UUID]:
    """35 due jobs over 20 tenants (tenants 0..14 have two, 15..19 one): job id -> tenant."""
    return {
        queue.enqueue(tenant(n % 20), "process_embeddings", {"n": n}): tenant(n % 20)
        for n in range(35)
    }


@pytest.fixture
def fan_out_worker(make_worker: Callable[..., Worker], stubbed_lambda: StubbedLambda) -> Worker:
    """FAN_OUT_MAX=3, MAX_JOBS_PER_RUN=10; its Lambda client is the stubbed one."""
    worker = make_worker(fan_out_max="3", max_jobs_per_run="10")
    worker._lambda = stubbed_lambda.client
    return worker


def delivered_tenants(standin: StandIn) -> set[uuid.UUID]:
    return {uuid.UUID(r.body["tenant_id"]) for r in standin.requests()}


def test_a_scheduled_run_over_a_large_backlog_starts_three_copies_and_claims_only_its_shard(
    fan_out_worker: Worker,
    stubbed_lambda: StubbedLambda,
    backlog_of_35: dict[uuid.UUID, uuid.UUID],
    connect: Callable[[], pg8000.native.Connection],
    conn: pg8000.native.Connection,
    standin: StandIn,
) -> None:
    # Given 35 due jobs over 20 tenants, FAN_OUT_MAX=3 and MAX_JOBS_PER_RUN=10: 4 shards
    shard_of = shard_of_each_tenant(connect, 4)
    assert set(shard_of) == set(backlog_of_35.values())
    own = [t for t, s in shard_of.items() if s == 3]  # minute 7 mod 4
    own_jobs = {job for job, t in backlog_of_35.items() if t in own}
    assert own_jobs, "the fixed tenants leave shard 3 empty: pick other names"
    stubbed_lambda.answer(202, 202, 202)
    # When the Scheduler invokes it at 12:07
    summary, _ = fan_out_worker.run(
        parse_event({"scheduled_time": SCHEDULED}),
        remaining_seconds=30,
        request_id="scheduled",
        lambda_context=FakeLambdaContext(),
    )
    # Then exactly three copies were invoked, for shards 0, 1 and 2 of 4, and counted
    stubbed_lambda.stubber.assert_no_pending_responses()
    assert [(c["FunctionName"], c["InvocationType"]) for c in stubbed_lambda.calls] == [
        (ARN, "Event")
    ] * 3
    assert [(p["shard"], p["shards"]) for p in stubbed_lambda.payloads()] == [
        (0, 4),
        (1, 4),
        (2, 4),
    ]
    assert summary.fan_out_copies == 3
    # And the run itself claimed only its own shard's tenants (at most MAX_JOBS_PER_RUN jobs)
    assert summary.claimed == summary.completed == min(10, len(own_jobs))
    assert delivered_tenants(standin) <= set(own)
    others_pending = conn.run(
        "SELECT count(*) FROM queue_jobs WHERE status = 'pending'"
        " AND NOT (tenant_id = ANY (CAST(:own AS uuid[])))",
        own=[str(t) for t in own],
    )[0][0]
    assert others_pending == len(backlog_of_35) - len(own_jobs)


def test_a_copy_lambda_refused_is_not_counted_in_the_summary(
    fan_out_worker: Worker,
    stubbed_lambda: StubbedLambda,
    backlog_of_35: dict[uuid.UUID, uuid.UUID],
) -> None:
    # Given a backlog that needs four shards, and Lambda throttling one of the three copies
    stubbed_lambda.answer(202)
    stubbed_lambda.stubber.add_client_error(
        "invoke", service_error_code="TooManyRequestsException", http_status_code=429
    )
    stubbed_lambda.answer(202)
    # When the Scheduler invokes it
    summary, _ = fan_out_worker.run(
        parse_event({"scheduled_time": SCHEDULED}),
        remaining_seconds=30,
        request_id="scheduled",
        lambda_context=FakeLambdaContext(),
    )
    # Then three invokes were made, and the summary (FanOutInvocations) counts the two started
    assert len(stubbed_lambda.calls) == 3
    assert summary.fan_out_copies == 2


@pytest.mark.parametrize(
    ("event", "shard"),
    [
        pytest.param({}, None, id="direct"),
        pytest.param({"shard": 1, "shards": 4}, 1, id="copy"),
        pytest.param(
            {"shard": 2, "shards": 4, "scheduled_time": SCHEDULED}, 2, id="copy-of-scheduled"
        ),
    ],
)
def test_a_direct_invoke_or_a_copy_never_fans_out(
    event: dict[str, Any],
    shard: int | None,
    fan_out_worker: Worker,
    stubbed_lambda: StubbedLambda,
    backlog_of_35: dict[uuid.UUID, uuid.UUID],
    connect: Callable[[], pg8000.native.Connection],
    standin: StandIn,
) -> None:
    # Given the same large backlog, FAN_OUT_MAX=3 and MAX_JOBS_PER_RUN=10
    shard_of = shard_of_each_tenant(connect, 4)
    # When it is invoked directly, or as a copy for one shard, in Lambda
    summary, _ = fan_out_worker.run(
        parse_event(event),
        remaining_seconds=30,
        request_id="not-scheduled",
        lambda_context=FakeLambdaContext(),
    )
    # Then no copy was invoked and none counted
    assert stubbed_lambda.calls == []
    assert summary.fan_out_copies == 0
    # And the run claimed a full batch from every tenant (direct) or from its shard only (copy)
    tenants = delivered_tenants(standin)
    assert summary.claimed == summary.completed == len(standin.requests())
    if shard is None:
        assert summary.claimed == 10
        assert len({shard_of[t] for t in tenants}) > 1
    else:
        in_shard = [job for job, t in backlog_of_35.items() if shard_of[t] == shard]
        assert summary.claimed == min(10, len(in_shard))
        assert {shard_of[t] for t in tenants} == {shard}


# --------------------------------------------------------------------------------------------
# Sharded claims on a real PostgreSQL
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_sharded_claims_split_2000_jobs_over_200_tenants_into_disjoint_whole_tenants(
    store: QueueStore, conn: pg8000.native.Connection
) -> None:
    # Given 2,000 due jobs over 200 tenants (10 each)
    tenants = [str(tenant(n)) for n in range(200)]
    conn.run(
        "SELECT enqueue_job(p_tenant_id => t, p_job_type => 'ingest_slack')"
        " FROM unnest(CAST(:tenants AS uuid[])) AS t, generate_series(1, 10)",
        tenants=tenants,
    )
    all_jobs = {row[0]: row[1] for row in conn.run("SELECT id, tenant_id FROM queue_jobs")}
    assert len(all_jobs) == 2000
    # When four workers each claim shard k of 4, with caps higher than the backlog
    claimed = [
        store.claim(
            f"shard-worker-{k}",
            lease_seconds=300,
            max_jobs=10_000,
            max_per_tenant=10_000,
            shard=k,
            shards=4,
        )
        for k in range(4)
    ]
    ids = [{job.id for job in jobs} for jobs in claimed]
    # Then no job is in two shards, and together they are every job
    assert sum(len(s) for s in ids) == len(set().union(*ids)) == 2000
    assert set().union(*ids) == set(all_jobs)
    assert all(ids), "a shard took nothing: the split is not a split"
    # And every tenant's ten jobs all went to one shard
    shards_of_tenant: dict[uuid.UUID, set[int]] = {}
    for k, jobs in enumerate(claimed):
        for job in jobs:
            shards_of_tenant.setdefault(job.tenant_id, set()).add(k)
    assert len(shards_of_tenant) == 200
    assert all(len(s) == 1 for s in shards_of_tenant.values())
    # And each job is leased to the worker of its shard
    lease = dict(conn.run("SELECT id, locked_by FROM queue_jobs"))
    for k, taken in enumerate(ids):
        assert {lease[j] for j in taken} == {f"shard-worker-{k}"}


def test_a_sharded_claim_ignores_jobs_not_yet_due_like_any_claim(
    store: QueueStore,
) -> None:
    # Given one tenant with a due job and a job due far in the future
    owner = tenant(0)
    due = store.enqueue(owner, "ingest_slack")
    store.enqueue(owner, "ingest_slack", scheduled_at=datetime.now(UTC).replace(year=2999))
    # When each of two shards is claimed
    claimed = [
        store.claim(f"w{k}", lease_seconds=60, max_jobs=10, max_per_tenant=10, shard=k, shards=2)
        for k in range(2)
    ]
    # Then only the due job was taken, by exactly one shard
    assert sorted(len(jobs) for jobs in claimed) == [0, 1]
    assert [job.id for jobs in claimed for job in jobs] == [due]
