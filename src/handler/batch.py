"""One bounded batch: claim, dispatch concurrently within the time budget, settle, summarise.

Plain asyncio and plain Python: no Lambda in here. The database calls go through `Database`
(a single thread that owns the connection); each delivery through `DeliveryGuard` in a
dispatch thread; settlement through `Settler`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from handler.budget import TimeBudget
from handler.database import Database
from handler.delivery import DeliveryGuard, DeliveryReport
from handler.observability import logger, tracer
from handler.routes import Route
from handler.settle import Settler
from handler.store import ClaimedJob, Settlement


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
        database: Database,
        guard: DeliveryGuard,
        routes: Mapping[str, Route],
        dispatch_pool: ThreadPoolExecutor,
    ) -> None:
        self._db = database
        self._guard = guard
        self._routes = routes
        self._pool = dispatch_pool
        self._route_limits = {
            route.function: route.max_in_flight for route in routes.values() if route.max_in_flight
        }

    async def run(self, worker_id: str, limits: BatchLimits, budget: TimeBudget) -> Summary:
        summary = Summary(worker_id=worker_id)
        jobs = await self._db.call(
            lambda store: store.claim(
                worker_id,
                lease_seconds=limits.lease_seconds,
                max_jobs=limits.max_jobs,
                max_per_tenant=limits.max_per_tenant,
                tenant_id=limits.tenant_id,
                shard=limits.shard,
                shards=limits.shards,
            )
        )
        summary.claimed = len(jobs)
        summary.rescued = sum(job.rescued for job in jobs)
        if jobs:
            await self._dispatch_all(worker_id, jobs, limits, budget, summary)
        summary.duration_ms = budget.elapsed_ms()
        return summary

    async def _dispatch_all(
        self,
        worker_id: str,
        jobs: list[ClaimedJob],
        limits: BatchLimits,
        budget: TimeBudget,
        summary: Summary,
    ) -> None:
        settler = Settler(lambda batch: self._db.call(lambda store: store.settle(worker_id, batch)))
        batch = _Batch(
            settler=settler,
            budget=budget,
            limits=limits,
            in_flight=asyncio.Semaphore(limits.max_concurrency),
            per_function={fn: asyncio.Semaphore(n) for fn, n in self._route_limits.items()},
            parent=None if tracer.disabled else tracer.provider.get_trace_entity(),  # type: ignore[attr-defined]
            summary=summary,
        )
        stop = asyncio.Event()
        flusher = asyncio.create_task(settler.run_periodically(stop))
        try:
            await asyncio.gather(*(self._process(job, batch) for job in jobs))
        finally:
            stop.set()
            await flusher
            await settler.flush()
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

    async def _process(self, job: ClaimedJob, batch: _Batch) -> None:
        route = self._routes.get(job.job_type)
        if route is None:
            error = f"No route for job type '{job.job_type}'"
            _log_job("warning", "Job dead-lettered: no route", job, error=error)
            batch.settler.add(Settlement(job.id, job.attempt, "dead", error=error))
            return
        limit = batch.per_function.get(route.function)
        if limit is not None:
            async with limit, batch.in_flight:
                await self._send(job, route, batch)
        else:
            async with batch.in_flight:
                await self._send(job, route, batch)

    async def _send(self, job: ClaimedJob, route: Route, batch: _Batch) -> None:
        if route.function in batch.open_circuits:
            batch.settler.add(Settlement(job.id, job.attempt, "released"))
            return
        timeout = batch.budget.call_timeout(batch.limits.http_timeout)
        if timeout is None:
            batch.settler.add(Settlement(job.id, job.attempt, "released"))
            return
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(
                self._pool, self._guard.deliver, job, route, timeout, batch.parent
            )
        except Exception as exc:
            _log_job(
                "exception", "Delivery failed unexpectedly; job released", job, error=repr(exc)
            )
            batch.settler.add(Settlement(job.id, job.attempt, "released"))
            return
        batch.settler.add(self._settlement(job, route, report, batch))

    def _settlement(
        self, job: ClaimedJob, route: Route, report: DeliveryReport, batch: _Batch
    ) -> Settlement:
        if report.kind == "replayed":
            batch.summary.replayed += 1
            _log_job(
                "info", "Already delivered (idempotency record): completed without a call", job
            )
            return Settlement(job.id, job.attempt, "completed")
        if report.kind != "sent" or report.delivery is None:
            _log_job("warning", "Job released", job, reason=report.kind, error=report.error)
            return Settlement(job.id, job.attempt, "released", retry_at=report.retry_at)
        outcome = report.delivery.outcome
        batch.summary.latency_ms.setdefault(route.function, []).append(report.delivery.latency_ms)
        batch.summary.responses[(route.function, outcome.status_class)] += 1
        if outcome.opens_circuit and route.function not in batch.open_circuits:
            batch.open_circuits.add(route.function)
            _log_job(
                "error",
                "Circuit opened: no more jobs to this function in this batch",
                job,
                error=outcome.error,
            )
        if outcome.kind == "completed":
            _log_job(
                "debug",
                "Job completed",
                job,
                status=outcome.status,
                latency_ms=report.delivery.latency_ms,
            )
        else:
            _log_job(
                "warning",
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
    """The state one batch's tasks share (all on the event loop's thread)."""

    settler: Settler
    budget: TimeBudget
    limits: BatchLimits
    in_flight: asyncio.Semaphore
    per_function: dict[str, asyncio.Semaphore]
    parent: Any
    summary: Summary
    open_circuits: set[str] = field(default_factory=set)


def _log_job(level: str, message: str, job: ClaimedJob, **fields: Any) -> None:
    extra = {
        "job_id": str(job.id),
        "tenant_id": str(job.tenant_id),
        "job_type": job.job_type,
        "attempt": job.attempt,
        **{k: v for k, v in fields.items() if v is not None},
    }
    getattr(logger, level)(message, extra=extra)
