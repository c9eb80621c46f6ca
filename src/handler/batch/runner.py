"""One bounded batch: claim, dispatch concurrently within the time budget, settle, summarise.

Plain Python, no Lambda in here. The claimed jobs go into one queue that MAX_CONCURRENCY
dispatch threads ("lanes") drain; each delivery goes through `DeliveryGuard`; outcomes through
`Settler`, which the batch's own thread flushes while the lanes work. Only that thread talks to
the queue's database, so one connection serves the whole batch.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from handler.batch.budget import TimeBudget
from handler.batch.settlement import SETTLE_INTERVAL_SECONDS, Settler
from handler.dispatch.guard import DeliveryGuard, DeliveryReport
from handler.dispatch.routes import Route
from handler.operate.observability import active_tracer, logger
from handler.queue.store import ClaimedJob, QueueStore, Settlement


@dataclass(frozen=True)
class BatchLimits:
    max_jobs: int
    max_per_tenant: int
    max_concurrency: int
    http_timeout: float
    lease_seconds: int
    tenant_id: UUID | None = None
    shard: int = 0
    shards: int = 1


@dataclass
class Summary:
    """The invocation's return value (DESIGN section 5), plus what an operator wants to see."""

    worker_id: str
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    stale: int = 0  # outcomes not recorded: the job was no longer ours (lease lost)
    unsettled: int = (
        0  # outcomes not recorded: the settle statement failed (leases bring them back)
    )
    rescued: int = 0  # claimed from a worker whose lease had expired
    replayed: int = 0  # completed from the idempotency record, without a second call
    duration_ms: int = 0
    settle_statements: int = 0
    fan_out_copies: int = 0  # asynchronous copies this run started for a large backlog
    pruned: int = 0  # rows of old history deleted by this run's maintenance
    scheduled_jobs_created: int = 0  # jobs this run created from due recurring schedules
    latency_ms: dict[str, list[float]] = field(default_factory=dict, repr=False)
    responses: Counter[tuple[str, str]] = field(default_factory=Counter, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["latency_ms"], data["responses"]
        return data


class BatchRunner:
    def __init__(
        self,
        store: QueueStore,
        guard: DeliveryGuard,
        routes: Mapping[str, Route],
        dispatch_pool: ThreadPoolExecutor,
    ) -> None:
        self._store = store
        self._guard = guard
        self._routes = routes
        self._pool = dispatch_pool
        # A function's cap; two job types routed to one function share it (the lower one wins).
        self._route_limits: dict[str, int] = {}
        for route in routes.values():
            if route.max_in_flight:
                known = self._route_limits.get(route.function, route.max_in_flight)
                self._route_limits[route.function] = min(known, route.max_in_flight)

    def run(self, worker_id: str, limits: BatchLimits, budget: TimeBudget) -> Summary:
        summary = Summary(worker_id=worker_id)
        parent = _trace_parent()  # before the claim: nothing may fail between claim and dispatch
        jobs = self._store.claim(
            worker_id,
            lease_seconds=limits.lease_seconds,
            max_jobs=limits.max_jobs,
            max_per_tenant=limits.max_per_tenant,
            tenant_id=limits.tenant_id,
            shard=limits.shard,
            shards=limits.shards,
        )
        summary.claimed = len(jobs)
        summary.rescued = sum(job.rescued for job in jobs)
        if jobs:
            self._dispatch_all(worker_id, jobs, limits, budget, summary, parent=parent)
        summary.duration_ms = budget.elapsed_ms()
        return summary

    def _dispatch_all(
        self,
        worker_id: str,
        jobs: list[ClaimedJob],
        limits: BatchLimits,
        budget: TimeBudget,
        summary: Summary,
        *,
        parent: Any,
    ) -> None:
        settler = Settler(lambda batch: self._store.settle(worker_id, batch))
        batch = _Batch(
            queue=deque(jobs),
            settler=settler,
            budget=budget,
            limits=limits,
            slots={fn: threading.BoundedSemaphore(n) for fn, n in self._route_limits.items()},
            parent=parent,
            summary=summary,
        )
        lanes = [
            self._pool.submit(self._lane, batch)
            for _ in range(min(limits.max_concurrency, len(jobs)))
        ]
        try:
            while True:
                _, running = wait(
                    lanes, timeout=SETTLE_INTERVAL_SECONDS, return_when=FIRST_EXCEPTION
                )
                if not running:
                    break
                settler.flush()
        finally:
            settler.flush()
        for lane in lanes:
            lane.result()  # a lane's own failure (never a job's: those are settled) surfaces here
        summary.completed = settler.results["completed"]
        summary.retried = settler.results["retry"]
        summary.dead_lettered = settler.results["dead"]
        summary.released = settler.results["released"]
        summary.stale = settler.results["stale"]
        summary.unsettled = len(jobs) - sum(settler.results.values())
        summary.settle_statements = settler.statements
        for failure in settler.failures:
            logger.error(
                "Settlement failed; the leases will bring these jobs back",
                extra={"error": str(failure)},
            )

    def _lane(self, batch: _Batch) -> None:
        """One dispatch thread: takes jobs until none is left."""
        while True:
            try:
                job = batch.queue.popleft()
            except IndexError:
                return
            self._start(job, batch)

    def _start(self, job: ClaimedJob, batch: _Batch) -> None:
        route = self._routes.get(job.job_type)
        if route is None:
            error = f"No route for job type '{job.job_type}'"
            _log_job(logging.WARNING, "Job dead-lettered: no route", job, error=error)
            batch.settler.add(Settlement(job.id, job.attempt, "dead", error=error))
            return
        slot = batch.slots.get(route.function)
        if slot is None:
            self._send(job, route, batch)
            return
        # A function with its own cap: a job that finds every slot taken waits in the function's
        # queue, and whoever frees a slot (or queued a job) sends what is waiting.
        waiting = batch.waiting[route.function]
        waiting.append(job)
        while waiting and slot.acquire(blocking=False):
            try:
                try:
                    next_job = waiting.popleft()
                except IndexError:
                    continue
                self._send(next_job, route, batch)
            finally:
                slot.release()

    def _send(self, job: ClaimedJob, route: Route, batch: _Batch) -> None:
        if route.function in batch.open_circuits:
            batch.settler.add(Settlement(job.id, job.attempt, "released"))
            return
        timeout = batch.budget.call_timeout(batch.limits.http_timeout)
        if timeout is None:
            batch.settler.add(Settlement(job.id, job.attempt, "released"))
            return
        try:
            report = self._guard.deliver(job, route, timeout, batch.parent)
        except Exception as exc:
            _log_job(
                logging.ERROR, "Delivery failed unexpectedly; job released", job, error=repr(exc)
            )
            batch.settler.add(Settlement(job.id, job.attempt, "released"))
            return
        batch.settler.add(self._settlement(job, route, report, batch))

    def _settlement(
        self, job: ClaimedJob, route: Route, report: DeliveryReport, batch: _Batch
    ) -> Settlement:
        if report.kind == "replayed":
            with batch.lock:
                batch.summary.replayed += 1
            _log_job(
                logging.INFO,
                "Already delivered (idempotency record): completed without a call",
                job,
            )
            return Settlement(job.id, job.attempt, "completed")
        if report.kind != "sent" or report.delivery is None:
            _log_job(logging.WARNING, "Job released", job, reason=report.kind, error=report.error)
            return Settlement(job.id, job.attempt, "released", retry_at=report.retry_at)
        outcome = report.delivery.outcome
        with batch.lock:
            batch.summary.latency_ms.setdefault(route.function, []).append(
                report.delivery.latency_ms
            )
            batch.summary.responses[(route.function, outcome.status_class)] += 1
            opened = outcome.opens_circuit and route.function not in batch.open_circuits
            if opened:
                batch.open_circuits.add(route.function)
        if opened:
            _log_job(
                logging.ERROR,
                "Circuit opened: no more jobs to this function in this batch",
                job,
                error=outcome.error,
            )
        if outcome.kind == "completed":
            _log_job(
                logging.DEBUG,
                "Job completed",
                job,
                status=outcome.status,
                latency_ms=report.delivery.latency_ms,
            )
        else:
            _log_job(
                logging.WARNING,
                "Job not completed",
                job,
                outcome=outcome.kind,
                status=outcome.status,
                error=outcome.error,
            )
        return Settlement(
            job.id, job.attempt, outcome.kind, outcome.error, outcome.status, outcome.retry_at
        )


@dataclass
class _Batch:
    """What one batch's dispatch threads share."""

    queue: deque[ClaimedJob]
    settler: Settler
    budget: TimeBudget
    limits: BatchLimits
    slots: dict[str, threading.BoundedSemaphore]  # per-function caps on calls in flight
    parent: Any  # the trace entity deliveries nest under (None: tracing off)
    summary: Summary
    open_circuits: set[str] = field(default_factory=set)
    waiting: defaultdict[str, deque[ClaimedJob]] = field(default_factory=lambda: defaultdict(deque))
    lock: threading.Lock = field(default_factory=threading.Lock)


def _trace_parent() -> Any:
    """The trace entity each dispatch's subsegment nests under; None when there is none."""
    tracer = active_tracer()
    if tracer is None:
        return None
    try:
        return tracer.provider.get_trace_entity()  # type: ignore[attr-defined]
    except Exception:
        return None


_LOG_METHODS = {
    logging.DEBUG: logger.debug,
    logging.INFO: logger.info,
    logging.WARNING: logger.warning,
    logging.ERROR: logger.error,
}


def _log_job(level: int, message: str, job: ClaimedJob, **fields: Any) -> None:
    if level < logger.log_level:
        return  # a batch may log a line per job: skip building what nobody reads
    extra = {
        "job_id": str(job.id),
        "tenant_id": str(job.tenant_id),
        "job_type": job.job_type,
        "attempt": job.attempt,
        **{k: v for k, v in fields.items() if v is not None},
    }
    _LOG_METHODS[level](message, extra=extra, stacklevel=3)
