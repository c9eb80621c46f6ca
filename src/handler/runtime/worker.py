"""The worker: what lives once per container (HTTP clients, database connection, dispatch
threads, idempotency store) and one invocation's run through it. The Lambda handler and the
command line both call `Worker.run`, so a local run takes the same code path as the Lambda.
"""

import functools
import gc
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from aws_lambda_powertools.metrics import MetricUnit

from handler.batch.budget import TimeBudget
from handler.batch.runner import BatchLimits, BatchRunner, Summary
from handler.dispatch.affinity import one_cpu
from handler.dispatch.client import Dispatcher
from handler.dispatch.guard import DeliveryGuard
from handler.operate.maintenance import PruneReport, prune
from handler.operate.observability import SERVICE, emit_counts, emit_per_function, logger
from handler.operate.schedules import FireReport, fire_due_schedules
from handler.queue import connection
from handler.queue.store import QueueStore
from handler.runtime.events import Invocation
from handler.runtime.settings import Settings

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig
    from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
    from mypy_boto3_lambda import LambdaClient

    from handler.batch.linger import Linger
    from handler.operate.fanout import FanOutPlan

MAINTENANCE_SECONDS = 2.0
SCHEDULES_SECONDS = 2.0


@functools.cache
def _freeze_long_lived_objects() -> None:
    """Once per process, when its first worker is made: what is loaded by then (modules,
    settings, clients) lives as long as the container, so the garbage collector is told never
    to traverse it again. A batch allocates enough (httpx makes dozens of objects per request)
    to set off a full collection now and then; over everything a container has loaded, that took
    100-170 ms with every dispatch thread stopped, in a 1.3 s batch of the throughput benchmark."""
    gc.freeze()


class Backlog(NamedTuple):
    due_now: int
    oldest_age_seconds: float


class _BudgetContext:
    """Stands in for the Lambda context outside Lambda: the idempotency store asks it how long
    an in-progress record may live."""

    def __init__(self, budget: TimeBudget) -> None:
        self._budget = budget

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._budget.remaining() * 1000))


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = QueueStore(lambda: connection.connect(settings.database_settings()))
        self._may_prune: bool | None = None  # asked once per container
        self.dispatch_pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="dispatch"
        )
        self._dispatcher: Dispatcher | None = None
        self._runner: BatchRunner | None = None
        self._idempotency_store: BasePersistenceLayer | None = None
        self._lambda: LambdaClient | None = None
        self._idempotency: IdempotencyConfig | None = None
        if settings.idempotency_store != "off":
            # Only then: Powertools' idempotency package imports boto3 whichever store is used.
            from handler.dispatch.idempotency import idempotency_config

            self._idempotency = idempotency_config()
        _freeze_long_lived_objects()

    def run(
        self,
        invocation: Invocation,
        *,
        remaining_seconds: float,
        request_id: str,
        lambda_context: Any = None,
    ) -> tuple[Summary, Backlog]:
        """One invocation: fan out if the backlog needs it, one batch, maintenance, the backlog."""
        budget = TimeBudget(remaining_seconds)
        if self._idempotency is not None:
            # Before the first idempotent call, so in-progress records expire with this invocation.
            self._idempotency.register_lambda_context(lambda_context or _BudgetContext(budget))  # type: ignore[arg-type]  # duck-typed: only get_remaining_time_in_millis is read
        # Every statement of this invocation ends before the invocation must return.
        self.store.limit_statements(budget.deadline - budget.safety_margin)
        runner = self._get_runner()
        scheduled = self._fire_schedules(budget)
        shard, shards = invocation.shard, invocation.shards
        fan_out = self._fan_out(invocation, lambda_context)
        copies_started = 0
        if fan_out is not None:
            plan, copies_started = fan_out
            shard, shards = plan.own_shard, plan.shards
        rounds = self.settings.run_mode == "rounds"
        limits = BatchLimits(
            max_jobs=self.settings.max_jobs_per_run,
            max_per_tenant=invocation.max_jobs_per_tenant or self.settings.max_jobs_per_tenant,
            max_concurrency=self.settings.max_concurrency,
            http_timeout=self.settings.http_timeout_seconds,
            lease_seconds=self.settings.job_lease_seconds,
            tenant_id=invocation.tenant_id,
            shard=shard,
            shards=shards,
            rounds=rounds,
            max_total=self.settings.max_jobs_per_invocation
            if rounds
            else self.settings.max_jobs_per_run,
            defer_exhausted=self._idempotency is not None,
        )
        worker_id = f"{SERVICE}:{request_id}:{uuid.uuid4().hex[:8]}"
        linger = self._linger(invocation, worker_id, shards) if rounds else None
        try:
            with one_cpu():  # the dispatch threads' lock hand-overs stay on one CPU
                summary = runner.run(worker_id, limits, budget, linger=linger)
        finally:
            if linger is not None:
                linger.release()
        summary.fan_out_copies = copies_started
        summary.scheduled_jobs_created = scheduled.jobs_created
        summary.pruned = self._maintain(budget).total
        due, oldest = self.store.backlog()
        summary.duration_ms = budget.elapsed_ms()
        return summary, Backlog(due, oldest)

    def _linger(self, invocation: Invocation, worker_id: str, shards: int) -> "Linger | None":
        """Only a scheduled invocation of all tenants lingers (not a direct one, a tenant's, nor a
        fan-out copy or a run that fanned out): the next tick takes over from it."""
        if (
            not self.settings.linger
            or invocation.source == "direct"
            or invocation.tenant_id is not None
            or shards > 1
        ):
            return None
        from handler.batch.linger import Linger  # rounds only: not at every cold start

        return Linger(
            self.store,
            worker_id,
            datetime.now(UTC),
            listen=self.settings.database_pool_mode == "session",
        )

    def _fire_schedules(self, budget: TimeBudget) -> FireReport:
        """Turns due recurring schedules into jobs before the claim, so they can run at once."""
        limit = min(SCHEDULES_SECONDS, max(0.0, budget.remaining() / 10))
        report = fire_due_schedules(self.store, time_limit_s=limit)
        if report.errors:
            logger.error("Some schedules could not fire", extra={"schedules": report.as_dict()})
        return report

    def _fan_out(
        self, invocation: Invocation, lambda_context: Any
    ) -> "tuple[FanOutPlan, int] | None":
        """Starts asynchronous copies when the backlog is larger than one batch can take.
        Only a scheduled, unfiltered run in Lambda fans out; the copies never do."""
        arn = getattr(lambda_context, "invoked_function_arn", None)
        if (
            self.settings.fan_out_max < 1
            or arn is None
            or invocation.source == "direct"
            or invocation.tenant_id is not None
            or invocation.is_fan_out_copy
        ):
            return None
        from handler.operate import fanout  # FAN_OUT_MAX only: not at every cold start

        due, _ = self.store.backlog()
        plan = fanout.plan(
            due_now=due,
            per_invocation=self.settings.max_jobs_per_run,
            fan_out_max=self.settings.fan_out_max,
            reserved_concurrency=self.settings.reserved_concurrency,
            minute=(invocation.scheduled_time or datetime.now(UTC)).minute,
        )
        if plan.shards == 1:
            return None
        try:
            started = fanout.start_copies(
                self._lambda_client(), arn, plan, scheduled_time=invocation.scheduled_time
            )
        except Exception as exc:
            logger.error("Fan-out failed", extra={"error": str(exc)})
            started = []
        logger.info(
            "Fanned out",
            extra={
                "due_now": due,
                "shards": plan.shards,
                "own_shard": plan.own_shard,
                "started": started,
            },
        )
        return plan, len(started)

    def _maintain(self, budget: TimeBudget) -> PruneReport:
        """Prunes old history with the time the batch left over (at most 2 s). A failure here
        is logged, not raised: the batch before it has been settled and its summary stands."""
        time_left = budget.remaining() - budget.safety_margin - 1.0
        if time_left <= 0:
            return PruneReport()
        try:
            return self._prune(time_left)
        except Exception as exc:
            logger.error("Maintenance failed", extra={"error": str(exc)})
            return PruneReport()

    def _prune(self, time_left: float) -> PruneReport:
        if self._may_prune is None:
            self._may_prune = self.store.may_prune()
            if not self._may_prune:
                logger.info(
                    "Pruning is left to an operator: the role this worker connects as may not "
                    "prune (grant it EXECUTE on queue_worker.queue_prune to prune here)"
                )
        if not self._may_prune:
            return PruneReport()
        return prune(
            self.store,
            completed_retention=self.settings.completed_retention,
            dead_letter_retention=self.settings.dead_letter_retention,
            time_limit_s=min(MAINTENANCE_SECONDS, time_left),
        )

    def _lambda_client(self) -> "LambdaClient":
        if self._lambda is None:
            import boto3  # only the fan-out needs it

            self._lambda = boto3.client("lambda")
        return self._lambda

    def _get_runner(self) -> BatchRunner:
        key = self.settings.service_role_key_value()  # cached by Powertools Parameters
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.settings.functions_base_url, key)
        else:
            self._dispatcher.set_service_role_key(key)
        if self._runner is None:
            if self.settings.idempotency_store != "off":
                from handler.dispatch.idempotency import build_persistence_layer

                self._idempotency_store = build_persistence_layer(
                    self.settings.idempotency_store,
                    table=self.settings.idempotency_table,
                    connection_provider=lambda: connection.connect(
                        self.settings.database_settings()
                    ),
                )
            guard = DeliveryGuard(self._dispatcher, self._idempotency_store, self._idempotency)
            # The routes, for the functions' rate limits (taken by the claim) and for
            # explain_job: once per container.
            self.store.record_routes(
                {job_type: route.as_json() for job_type, route in self.settings.routes.items()}
            )
            self._runner = BatchRunner(self.store, guard, self.settings.routes, self.dispatch_pool)
        limit = getattr(self._idempotency_store, "limit_statements", None)
        if limit is not None:  # the PostgreSQL store's statements end with the invocation too
            limit(self.store.deadline)
        return self._runner

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
        self.store.close()
        close_store = getattr(self._idempotency_store, "close", None)
        if close_store is not None:
            close_store()
        self.dispatch_pool.shutdown(wait=False)


def report(summary: Summary, backlog: Backlog) -> None:
    """The batch's metrics (EMF) and one summary log line."""
    emit_counts(
        {
            "JobsClaimed": summary.claimed,
            "JobsCompleted": summary.completed,
            "JobsRetried": summary.retried,
            "JobsDeadLettered": summary.dead_lettered,
            "JobsReleased": summary.released,
            "JobsRescued": summary.rescued,
            "JobsPruned": summary.pruned,
            "ScheduledJobsCreated": summary.scheduled_jobs_created,
            "FanOutInvocations": summary.fan_out_copies,
            "ClaimRounds": summary.rounds,
            "QueueDepth": backlog.due_now,
        }
    )
    emit_counts({"BatchDuration": summary.duration_ms}, unit=MetricUnit.Milliseconds)
    emit_counts({"OldestJobAgeSeconds": backlog.oldest_age_seconds}, unit=MetricUnit.Seconds)
    emit_per_function(summary.latency_ms, summary.responses, summary.concurrency_limits)
    logger.info(
        "Batch finished",
        extra={
            "summary": summary.as_dict(),
            "queue_depth": backlog.due_now,
            "oldest_job_age_seconds": round(backlog.oldest_age_seconds, 3),
        },
    )


def local_request_id() -> str:
    """A request id for runs outside Lambda: host and process, so two runs never share one."""
    return f"{socket.gethostname()}-{os.getpid()}"
