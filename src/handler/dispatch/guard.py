"""One job's delivery, run in a dispatch thread: a trace subsegment, the idempotency guard, the POST.

Powertools' `idempotent_function` wraps synchronous functions only, so each delivery runs in a
thread of a pool sized MAX_CONCURRENCY, with the synchronous HTTP client (which is also the
cheapest per request of the httpx stacks measured).

The guard, keyed by job id: a dispatch that succeeded is recorded; if its settlement is lost, the
next attempt finds the record and settles the job without calling the function again. A failed
dispatch raises, so Powertools deletes the record and a retry calls again.
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from handler.dispatch.client import Delivery, Dispatcher
from handler.dispatch.routes import Route
from handler.dispatch.tracecontext import TraceContext, TraceRoot, call_context
from handler.operate.observability import get_tracer, logger
from handler.queue.store import ClaimedJob

if TYPE_CHECKING:
    # Powertools' idempotency is imported only when a store is configured (IDEMPOTENCY_STORE not
    # off): its package imports boto3 and the DynamoDB store whichever store is used.
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig
    from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer

# Records of a successful dispatch outlive any retry schedule of the job they guard.
IDEMPOTENCY_KEY_PREFIX = "queue-worker.dispatch"
# When the store cannot answer a check, the job is looked at again this much later.
CHECK_AGAIN_AFTER = timedelta(seconds=30)

DeliveryKind = Literal["sent", "replayed", "in_flight_elsewhere", "not_sent"]


class DeliveryReport(NamedTuple):
    """What happened to one job's delivery.

    sent: the function was called (`delivery` says how it answered);
    replayed: an earlier dispatch of this job succeeded: settle it as completed, nothing sent;
    in_flight_elsewhere: another dispatch of this job may still be running: release it until
      `retry_at`; not_sent: the guard's store failed before the call: release it.
    """

    kind: DeliveryKind
    delivery: Delivery | None = None
    retry_at: datetime | None = None
    error: str | None = None


class DispatchFailedError(Exception):
    """Raised inside the guarded function so that Powertools deletes the in-progress record."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__(delivery.outcome.error or "dispatch failed")
        self.delivery = delivery


class _Call:
    """One delivery's inputs and, once the POST returns, its result (read even when the guard fails)."""

    __slots__ = ("delivery", "job", "route", "timeout", "trace")

    def __init__(self, job: ClaimedJob, route: Route, timeout: float, trace: TraceContext) -> None:
        self.job = job
        self.route = route
        self.timeout = timeout
        self.trace = trace
        self.delivery: Delivery | None = None


class DeliveryGuard:
    def __init__(
        self,
        dispatcher: Dispatcher,
        persistence_store: "BasePersistenceLayer | None",
        config: "IdempotencyConfig | None",
    ) -> None:
        self._dispatcher = dispatcher
        self._store = persistence_store
        self._guarded: Callable[..., dict[str, Any]] | None = None
        if persistence_store is not None:
            from aws_lambda_powertools.utilities.idempotency import (
                IdempotencyConfig,
                idempotent_function,
            )

            # Powertools configures a store on its first call, marking it configured before it
            # has compiled the key's expression: dispatch threads racing through that call saw a
            # half-configured store. Configured here, once, before any thread uses it.
            persistence_store.configure(
                config or IdempotencyConfig(), key_prefix=IDEMPOTENCY_KEY_PREFIX
            )
            self._guarded = idempotent_function(
                data_keyword_argument="job",
                persistence_store=persistence_store,
                config=config,
                key_prefix=IDEMPOTENCY_KEY_PREFIX,
            )(self._send)

    def deliver(
        self, call_job: ClaimedJob, route: Route, timeout: float, trace: TraceRoot
    ) -> DeliveryReport:
        """Runs in a dispatch thread. `trace` is the batch's trace; its `parent`, the X-Ray
        entity the call's subsegment nests under (None: tracing off, or no open trace)."""
        parent = trace.parent
        if parent is None:
            # Tracing is off, or the batch had no open trace. A subsegment begun here would have
            # no parent (the SDK hands back None) or hang on the entity this pool thread held
            # last: a finished trace, which refuses it. Neither may cost the delivery.
            return self._deliver(_Call(call_job, route, timeout, call_context(trace)))
        # Tracing is on (a parent was found), so the tracer exists already.
        provider: Any = get_tracer().provider
        # A new thread has no trace context; without this the subsegment loses its parent.
        provider.set_trace_entity(parent)
        try:
            with provider.in_subsegment(name=f"## dispatch {route.function}") as subsegment:
                call = _Call(call_job, route, timeout, call_context(trace, subsegment))
                subsegment.put_annotation("function", route.function)
                subsegment.put_annotation("job_type", call_job.job_type)
                subsegment.put_annotation("attempt", str(call_job.attempt))
                report = self._deliver(call)
                subsegment.put_annotation("delivery", report.kind)
                if report.delivery is not None and report.delivery.outcome.status is not None:
                    subsegment.put_annotation("status", str(report.delivery.outcome.status))
                return report
        finally:
            # The pool thread outlives this invocation: let go of its trace.
            provider.clear_trace_entities()

    def _deliver(self, call: _Call) -> DeliveryReport:
        if self._guarded is None:
            # No store: the call itself (the guarded function raises for a failed answer, so
            # that Powertools forgets it; unguarded, that answer is the outcome).
            delivery = self._dispatcher.post(call.job, call.route, call.timeout, call.trace)
            return DeliveryReport("sent", delivery)
        return self._deliver_guarded(self._guarded, call)

    def _deliver_guarded(
        self, guarded: Callable[..., dict[str, Any]], call: _Call
    ) -> DeliveryReport:
        # Loaded already (the guard made `guarded` with it): a lookup, not an import.
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyAlreadyInProgressError,
            IdempotencyPersistenceLayerError,
        )

        try:
            guarded(job=_idempotency_data(call.job), call=call)
        except DispatchFailedError as failed:
            return DeliveryReport("sent", failed.delivery)
        except IdempotencyAlreadyInProgressError:
            return DeliveryReport("in_flight_elsewhere", retry_at=self._in_progress_until(call.job))
        except IdempotencyPersistenceLayerError as exc:
            if call.delivery is not None:
                # The call was made; only recording its success failed. Its answer stands.
                logger.warning(
                    "Idempotency record not saved after dispatch",
                    extra=_job_fields(call.job) | {"error": str(exc)},
                )
                return DeliveryReport("sent", call.delivery)
            logger.error(
                "Idempotency store failed before dispatch; job released",
                extra=_job_fields(call.job) | {"error": str(exc)},
            )
            return DeliveryReport("not_sent", error=f"Idempotency store unavailable: {exc}")
        if call.delivery is None:
            return DeliveryReport("replayed")
        return DeliveryReport("sent", call.delivery)

    def _send(self, *, job: dict[str, Any], call: _Call) -> dict[str, Any]:
        """The guarded function: the POST. Raises unless the function succeeded."""
        del job  # the idempotency key material; the call carries everything else
        call.delivery = self._dispatcher.post(call.job, call.route, call.timeout, call.trace)
        if call.delivery.outcome.kind != "completed":
            raise DispatchFailedError(call.delivery)
        return {"status": call.delivery.outcome.status}

    def check(self, job: ClaimedJob) -> "CheckReport":
        """Reads the job's idempotency record (no call to the function). A store that cannot
        answer defers the decision: a job whose function answered 2xx is never dead-lettered."""
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyItemNotFoundError,
        )

        if self._store is None:
            return CheckReport("expired")
        try:
            record = self._store.get_record(_idempotency_data(job))
        except IdempotencyItemNotFoundError:
            return CheckReport("expired")
        except Exception as exc:
            logger.warning(
                "Idempotency store unavailable for the check of an expired last attempt; asking again later",
                extra=_job_fields(job) | {"error": str(exc)},
            )
            return CheckReport("in_flight", datetime.now(UTC) + CHECK_AGAIN_AFTER)
        if record is None:
            return CheckReport("expired")
        if record.status == "COMPLETED":
            return CheckReport("completed")
        if record.status == "INPROGRESS" and record.in_progress_expiry_timestamp is not None:
            until = datetime.fromtimestamp(record.in_progress_expiry_timestamp / 1000, UTC)
            if until > datetime.now(UTC):
                return CheckReport("in_flight", until + timedelta(seconds=1))
        return CheckReport("expired")

    def _in_progress_until(self, job: ClaimedJob) -> datetime:
        """When the other dispatch's in-progress record expires (its invocation's deadline)."""
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyItemNotFoundError,
            IdempotencyPersistenceLayerError,
        )

        fallback = datetime.now(UTC) + timedelta(minutes=1)
        if self._store is None:
            return fallback
        try:
            record = self._store.get_record(_idempotency_data(job))
        except (IdempotencyItemNotFoundError, IdempotencyPersistenceLayerError):
            return datetime.now(UTC)
        except Exception:
            return fallback
        if record is None or record.in_progress_expiry_timestamp is None:
            return fallback
        return datetime.fromtimestamp(record.in_progress_expiry_timestamp / 1000, UTC) + timedelta(
            seconds=1
        )


class CheckReport(NamedTuple):
    """What the idempotency record says of a job whose last attempt's lease expired.

    completed: that attempt succeeded (settle the job as completed, nothing sent);
    in_flight: a dispatch of it may still be running (ask again at `retry_at`);
    expired: no record says it succeeded (dead-letter it, as without a store)."""

    kind: Literal["completed", "in_flight", "expired"]
    retry_at: datetime | None = None


def _idempotency_data(job: ClaimedJob) -> dict[str, Any]:
    return {"job_id": str(job.id)}


def _job_fields(job: ClaimedJob) -> dict[str, Any]:
    """What every log line about a job carries (docs/architecture.md, Observability), as the runner's lines do."""
    return {
        "job_id": str(job.id),
        "tenant_id": str(job.tenant_id),
        "job_type": job.job_type,
        "attempt": job.attempt,
    }
