"""One invocation's work: claim, dispatch concurrently within the time budget, settle.

Plain Python, no Lambda in here. The invocation's claimed jobs go into one queue that
MAX_CONCURRENCY dispatch threads ("lanes") drain; each call goes through `DeliveryGuard`, under
its function's adaptive limit of calls in flight (dispatch/concurrency.py); outcomes go into the
`SettlementBuffer`, which the invocation's own thread flushes. Only that thread talks to the
queue's database, so one connection serves the whole invocation.

Two modes (docs/architecture.md):
- batch (the default): one claim, its jobs dispatched, settled every few seconds and at the end:
  one claim and one settle statement for a batch that ends within SETTLE_INTERVAL_SECONDS. A
  batch of more than two jobs per lane is claimed in two statements, the first small, so that
  calls start sooner, and settles once more when its last jobs are in the lanes, so that the
  settle at its end holds only theirs (docs/adr/0009-statements-per-batch.md).
- rounds: as lanes free up the thread claims the next round (each round keyed by the worker and
  its number, each within MAX_JOBS_PER_TENANT and the fair shares), settles every
  ROUND_SETTLE_SECONDS so that a released dependent is claimed in the same invocation, until the
  time budget or MAX_JOBS_PER_INVOCATION; when nothing is due, a scheduled invocation lingers for
  new work (batch/linger.py).
"""

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from handler.batch.budget import TimeBudget
from handler.batch.settlement import SettlementBuffer
from handler.dispatch.concurrency import FunctionLimits
from handler.dispatch.guard import DeliveryGuard, DeliveryReport
from handler.dispatch.routes import Route
from handler.dispatch.tracecontext import TraceRoot, batch_root
from handler.operate.observability import active_tracer, logger
from handler.queue.store import ClaimedJob, QueueStore, Settlement

if TYPE_CHECKING:
    from handler.batch.linger import Linger  # rounds only: imported when one lingers

# A single batch settles this often while it runs (and at its end).
SETTLE_INTERVAL_SECONDS = 5.0
# A single batch larger than this many jobs per lane is claimed in two statements: first this
# many per lane (each tenant the same fraction of its share), so that calls start while the rest
# is claimed, instead of after a claim of the whole batch (docs/adr/0009-statements-per-batch.md).
FIRST_CLAIM_JOBS_PER_LANE = 2
# Rounds settle this often: soon enough for a chain's next link, few enough statements.
ROUND_SETTLE_SECONDS = 0.05
# Rounds keep up to this many jobs per lane claimed (in flight, or queued for the next free lane),
# and claim again once a third of that is free: a lane that finishes finds its next job already
# there instead of waiting for a claim, and each claim is large enough that its fixed cost (a
# statement, the tenants it reads) is shared by many jobs (bench/results/rounds.md).
ROUND_JOBS_PER_LANE = 2
ROUND_CLAIM_SHARE = 1 / 3
# After a claim that found nothing while calls are in flight, the next one waits for a settle
# that completed something (it may have released a dependent), or this long.
EMPTY_CLAIM_RETRY_SECONDS = 0.5
# Function limits are written back this often in rounds (and at the end).
FUNCTION_STATES_SECONDS = 2.0
# A function's queue of jobs waiting for a slot holds at most this many times its limit; the
# rest are released, due when a slot is likely free (no attempt counted).
WAITING_PER_SLOT = 2
WAITING_RELEASE_DELAY = timedelta(seconds=1)


class BatchLimits(NamedTuple):
    max_jobs: int  # per claim
    max_per_tenant: int
    max_concurrency: int
    http_timeout: float
    lease_seconds: int | None  # None: the invocation's remaining time plus a margin
    tenant_id: UUID | None = None
    shard: int = 0
    shards: int = 1
    rounds: bool = False
    max_total: int = 100_000  # jobs one invocation takes in rounds
    defer_exhausted: bool = False  # ask the idempotency store about expired last attempts


class Summary:
    """The invocation's return value (README, "Events and the summary"), plus what an
    operator wants to see. (A plain class: a dataclass costs a compile at import, on every cold
    start: docs/adr/0012-value-classes.md.)"""

    # The return value's keys, in order.
    FIELDS = (
        "worker_id",
        "claimed",
        "completed",
        "retried",
        "dead_lettered",
        "released",
        "stale",
        "unsettled",
        "rescued",
        "replayed",
        "duration_ms",
        "settle_statements",
        "rounds",
        "lingered_ms",
        "fan_out_copies",
        "pruned",
        "scheduled_jobs_created",
    )
    __slots__ = (*FIELDS, "latency_ms", "responses", "concurrency_limits")

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.claimed = 0
        self.completed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.released = 0
        self.stale = 0  # outcomes not recorded: the job was no longer ours (lease lost)
        self.unsettled = 0  # outcomes not recorded: the settle failed (leases bring them back)
        self.rescued = 0  # claimed from a worker whose lease had expired
        self.replayed = 0  # completed from the idempotency record, without a second call
        self.duration_ms = 0
        self.settle_statements = 0
        self.rounds = 0  # claim statements
        self.lingered_ms = 0  # time spent waiting for new work
        self.fan_out_copies = 0  # asynchronous copies this run started for a large backlog
        self.pruned = 0  # rows of old history deleted by this run's maintenance
        self.scheduled_jobs_created = 0  # jobs this run created from due recurring schedules
        self.latency_ms: dict[str, list[float]] = {}
        self.responses: Counter[tuple[str, str]] = Counter()
        self.concurrency_limits: dict[str, float] = {}

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        return f"Summary({self.as_dict()})"


class _Run:
    """What one invocation's thread and its lanes share."""

    def __init__(
        self,
        *,
        worker_id: str,
        limits: BatchLimits,
        budget: TimeBudget,
        buffer: SettlementBuffer,
        functions: FunctionLimits,
        trace: TraceRoot,  # the batch's trace, and the X-Ray entity deliveries nest under
        summary: Summary,
    ) -> None:
        self.worker_id = worker_id
        self.limits = limits
        self.budget = budget
        self.buffer = buffer
        self.functions = functions
        self.trace = trace
        self.summary = summary
        self.work: queue.SimpleQueue[ClaimedJob | None] = queue.SimpleQueue()
        self.lanes: list[Future[None]] = []
        self.lanes_failed = False
        self.open_circuits: set[str] = set()
        self.circuits: list[tuple[str, int, str]] = []  # (function, status, error)
        self.waiting: defaultdict[str, deque[ClaimedJob]] = defaultdict(deque)
        self.lock = threading.Lock()
        self.second_claim_per_tenant = 0  # a single batch's second claim, when it makes one
        self._handed_out = 0
        self._settled = 0
        # A single batch's thread is woken when its jobs in flight fall to this (its last ones
        # are in the lanes), to settle what is done so far.
        self.settle_early_at = 0 if limits.rounds else limits.max_concurrency
        self._generation = 0  # counts changes, so that a wait never misses one just before
        self._changed = threading.Condition()

    @property
    def outstanding(self) -> int:
        """Jobs handed to the lanes whose outcome is not in the buffer yet."""
        return self._handed_out - self._settled

    @property
    def generation(self) -> int:
        return self._generation

    def handed_out(self) -> None:
        self._handed_out += 1

    def settle(self, settlement: Settlement) -> None:
        """A lane's outcome. The invocation's thread is woken for it in rounds (a free lane is a
        reason to claim); a single batch wakes it when its last jobs are in flight and when its
        last job is done."""
        self.buffer.add(settlement)
        with self._changed:
            self._settled += 1
            outstanding = self._handed_out - self._settled
            if self.limits.rounds or outstanding in (0, self.settle_early_at):
                self._generation += 1
                self._changed.notify_all()

    def changed(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait_for_change(self, timeout: float, seen: int | None = None) -> None:
        """Waits up to `timeout` for a change after generation `seen` (default: now)."""
        with self._changed:
            if seen is None or seen == self._generation:
                self._changed.wait(timeout)


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
        self._caps: dict[str, int] = {}
        for route in routes.values():
            if route.max_in_flight:
                known = self._caps.get(route.function, route.max_in_flight)
                self._caps[route.function] = min(known, route.max_in_flight)

    def run(
        self,
        worker_id: str,
        limits: BatchLimits,
        budget: TimeBudget,
        *,
        linger: "Linger | None" = None,
    ) -> Summary:
        summary = Summary(worker_id=worker_id)
        trace = _trace_root()  # before the claim: nothing may fail between claim and dispatch
        caps = {fn: min(cap, limits.max_concurrency) for fn, cap in self._caps.items()}
        functions = FunctionLimits(caps, limits.max_concurrency, self._store.function_states())
        run = _Run(
            worker_id=worker_id,
            limits=limits,
            budget=budget,
            buffer=SettlementBuffer(lambda batch: self._store.settle(worker_id, batch)),
            functions=functions,
            trace=trace,
            summary=summary,
        )
        try:
            self._loop(run, linger)
        finally:
            self._finish(run)
        summary.duration_ms = budget.elapsed_ms()
        return summary

    # The invocation's thread -------------------------------------------------------------------

    def _loop(self, run: _Run, linger: "Linger | None") -> None:
        limits = run.limits
        interval = ROUND_SETTLE_SECONDS if limits.rounds else SETTLE_INTERVAL_SECONDS
        last_flush = last_states = time.monotonic()
        last_empty_claim = -1e9
        claim_wanted = True
        settled_early = False
        while True:
            seen = run.generation
            now = time.monotonic()
            outstanding = run.outstanding
            batch_claim = None if limits.rounds else self._next_batch_claim(run)
            # 1. Settle what is due (all of it once nothing is in flight; a single batch's also
            # once its claims are made and its last jobs are in flight).
            early = (
                not settled_early
                and batch_claim is None
                and not limits.rounds
                and run.summary.claimed > run.settle_early_at >= outstanding
            )
            if run.buffer.buffered and (now - last_flush >= interval or outstanding == 0 or early):
                recorded = run.buffer.flush()
                last_flush = now
                settled_early = settled_early or early
                if recorded.get("completed"):
                    claim_wanted = True  # a completed job may have released its dependents
                continue
            if limits.rounds and now - last_states >= FUNCTION_STATES_SECONDS:
                self._save_function_states(run)
                last_states = now
            # 2. Claim: a single batch's one or two claims; in rounds, when lanes are free and
            # there may be something to claim (the last claim found jobs, a settle completed
            # some, or a while has passed since a claim found nothing).
            can_start = run.budget.call_timeout(limits.http_timeout) is not None
            taken = run.summary.claimed
            if batch_claim is not None and can_start and not run.lanes_failed:
                jobs = self._claim(run, *batch_claim)
                if run.summary.rounds == 1:
                    run.second_claim_per_tenant = _second_claim_share(limits, *batch_claim, jobs)
                continue
            held = limits.max_concurrency * ROUND_JOBS_PER_LANE
            free = held - outstanding
            if (
                limits.rounds
                and can_start
                and not run.lanes_failed
                and taken < limits.max_total
                and free > 0
                and (claim_wanted or now - last_empty_claim >= EMPTY_CLAIM_RETRY_SECONDS)
                and (free >= held * ROUND_CLAIM_SHARE or outstanding == 0)
            ):
                size = min(free, limits.max_jobs, limits.max_total - taken)
                got = len(self._claim(run, size, limits.max_per_tenant))
                claim_wanted = got > 0
                if not got:
                    last_empty_claim = now
                continue
            # 3. Nothing in flight and nothing to settle: done, or (rounds) linger for new work.
            if outstanding == 0 and not run.buffer.buffered:
                if not limits.rounds or not can_start or taken >= limits.max_total:
                    return
                if linger is None:
                    return
                started = time.monotonic()
                due = linger.wait(run.budget)
                run.summary.lingered_ms += int((time.monotonic() - started) * 1000)
                if not due:
                    return
                claim_wanted = True
                continue
            # 4. Wait for a lane to finish something (or for the next flush).
            if limits.rounds:
                timeout = ROUND_SETTLE_SECONDS
            else:
                timeout = max(0.001, interval - (time.monotonic() - last_flush))
            run.wait_for_change(timeout, seen)

    def _room(self, run: _Run) -> dict[str, int]:
        """How many more jobs each routed function can take soon: up to WAITING_PER_SLOT times
        its limit in flight or waiting. A round claims no more of a function than that, so that
        jobs of a function at its limit are not claimed only to wait."""
        room = {}
        with run.lock:
            for function in {route.function for route in self._routes.values()}:
                limit = run.functions.of(function)
                busy = limit.in_flight + len(run.waiting.get(function, ()))
                room[function] = max(0, int(limit.limit) * WAITING_PER_SLOT - busy)
        return room

    def _next_batch_claim(self, run: _Run) -> tuple[int, int] | None:
        """(jobs, per tenant) for a single batch's next claim; None once it has made them.

        A batch of more than FIRST_CLAIM_JOBS_PER_LANE jobs a lane is claimed in two, so that
        calls start before the whole batch is claimed. The first takes that many jobs, each
        tenant at most the same share of its MAX_JOBS_PER_TENANT (rounded up); the second the
        rest of the batch, each tenant at most MAX_JOBS_PER_TENANT less the most any tenant got
        in the first. Whatever the tenants' weights, none gets more in the two than one claim
        of the whole batch would have given it; one may get fewer, left to the next claim."""
        limits = run.limits
        first = FIRST_CLAIM_JOBS_PER_LANE * limits.max_concurrency
        if run.summary.rounds == 0:
            share = -(-limits.max_per_tenant * first // limits.max_jobs)  # rounded up
            if limits.max_jobs <= first or share >= limits.max_per_tenant:
                return limits.max_jobs, limits.max_per_tenant  # one claim of the whole batch
            return first, share
        if run.summary.rounds == 1 and run.second_claim_per_tenant > 0:
            return limits.max_jobs - run.summary.claimed, run.second_claim_per_tenant
        return None

    def _claim(self, run: _Run, size: int, per_tenant: int) -> list[ClaimedJob]:
        limits = run.limits
        jobs = self._store.claim(
            run.worker_id,
            lease_seconds=run.budget.lease_seconds(limits.lease_seconds),
            max_jobs=max(1, size),
            max_per_tenant=per_tenant,
            tenant_id=limits.tenant_id,
            shard=limits.shard,
            shards=limits.shards,
            claim_round=run.summary.rounds,
            defer_exhausted=limits.defer_exhausted,
            room=self._room(run) if limits.rounds else None,
        )
        run.summary.rounds += 1
        run.summary.claimed += len(jobs)
        run.summary.rescued += sum(job.rescued for job in jobs)
        # The lanes first, then their jobs: a thread started while other lanes are busy waits
        # for the interpreter's lock at each step, and this thread (which has a second claim to
        # send) with it; a first batch in a container would lose a tenth of a second so.
        self._start_lanes(run)
        for job in jobs:
            run.handed_out()
            run.work.put(job)
        return jobs

    def _start_lanes(self, run: _Run) -> None:
        """Lanes start with the first jobs and live for the invocation; never more than
        MAX_CONCURRENCY, nor more than jobs handed out."""
        wanted = min(run.limits.max_concurrency, run.summary.claimed)
        while len(run.lanes) < wanted:
            run.lanes.append(self._pool.submit(self._lane, run))

    def _finish(self, run: _Run) -> None:
        """Lanes stopped (each finishes its job first), every outcome settled, the functions'
        limits written back, the summary filled in."""
        for _ in run.lanes:
            run.work.put(None)
        for lane in run.lanes:
            while not lane.done():
                run.buffer.flush()
                with contextlib.suppress(TimeoutError):
                    lane.exception(timeout=SETTLE_INTERVAL_SECONDS)
        run.buffer.flush()
        self._save_function_states(run)
        summary, results = run.summary, run.buffer.results
        summary.completed = results["completed"]
        summary.retried = results["retry"]
        summary.dead_lettered = results["dead"]
        summary.released = results["released"]
        summary.stale = results["stale"]
        summary.unsettled = summary.claimed - sum(results.values())
        summary.settle_statements = run.buffer.statements
        summary.concurrency_limits = run.functions.current()
        for failure in run.buffer.failures:
            logger.error(
                "Settlement failed; the leases will bring these jobs back",
                extra={"error": str(failure)},
            )
        for lane in run.lanes:
            lane.result()  # a lane's own failure (never a job's: those are settled) surfaces here

    def _save_function_states(self, run: _Run) -> None:
        states = run.functions.states(run.circuits)
        try:
            self._store.record_function_states([state.as_json() for state in states])
        except Exception as exc:  # the limits are a hint for the next invocation, not a result
            logger.warning("Function limits not saved", extra={"error": str(exc)})

    # The lanes -----------------------------------------------------------------------------------

    def _lane(self, run: _Run) -> None:
        """One dispatch thread: takes jobs until it is told to stop."""
        while True:
            job = run.work.get()
            if job is None:
                return
            try:
                self._start(job, run)
            except BaseException:
                run.lanes_failed = True
                run.changed()
                raise

    def _start(self, job: ClaimedJob, run: _Run) -> None:
        if job.exhausted:
            self._check(job, run)
            return
        route = self._routes.get(job.job_type)
        if route is None:
            error = f"No route for job type '{job.job_type}'"
            _log_job(logging.WARNING, "Job dead-lettered: no route", job, error=error)
            run.settle(Settlement(job.id, job.attempt, "dead", error=error))
            return
        limit = run.functions.of(route.function)
        waiting = run.waiting[route.function]
        with run.lock:
            # In rounds a function at its limit with jobs enough waiting sends the rest back to
            # the queue (a round claims up to two jobs a lane, and these would keep
            # other functions' jobs out); a single batch keeps what it claimed.
            overflow = (
                run.limits.rounds and len(waiting) >= max(1, int(limit.limit)) * WAITING_PER_SLOT
            )
            if not overflow:
                waiting.append(job)
        if overflow:
            # Due when a slot is likely free, no attempt counted.
            run.settle(
                Settlement(
                    job.id,
                    job.attempt,
                    "released",
                    retry_at=datetime.now(UTC) + WAITING_RELEASE_DELAY,
                )
            )
            return
        # Whoever frees a slot of this function (or queued a job for it) sends what is waiting.
        while slot := limit.try_acquire():
            probe = slot == "probe"
            with run.lock:
                next_job = waiting.popleft() if waiting else None
            if next_job is None:
                limit.release(None, None, probe=probe)
                return
            outcome, latency = None, None
            try:
                outcome, latency = self._send(next_job, route, run)
            finally:
                limit.release(outcome, latency, probe=probe)

    def _check(self, job: ClaimedJob, run: _Run) -> None:
        """An expired last attempt: its idempotency record decides, the function is not called."""
        report = self._guard.check(job)
        if report.kind == "completed":
            with run.lock:
                run.summary.replayed += 1
            _log_job(
                logging.INFO, "Last attempt had succeeded (idempotency record): completed", job
            )
            run.settle(Settlement(job.id, job.attempt, "completed"))
        elif report.kind == "in_flight":
            _log_job(logging.WARNING, "Last attempt may still be running: asking again later", job)
            run.settle(Settlement(job.id, job.attempt, "deferred", retry_at=report.retry_at))
        else:
            _log_job(
                logging.WARNING, "Job dead-lettered: the lease expired during its last attempt", job
            )
            run.settle(Settlement(job.id, job.attempt, "expired"))

    def _send(self, job: ClaimedJob, route: Route, run: _Run) -> tuple[Any, float | None]:
        """Sends one job and settles it; (the outcome, its latency) for the function's limit."""
        if route.function in run.open_circuits:
            run.settle(Settlement(job.id, job.attempt, "released"))
            return None, None
        timeout = run.budget.call_timeout(run.limits.http_timeout)
        if timeout is None:
            run.settle(Settlement(job.id, job.attempt, "released"))
            return None, None
        try:
            report = self._guard.deliver(job, route, timeout, run.trace)
        except Exception as exc:
            _log_job(
                logging.ERROR, "Delivery failed unexpectedly; job released", job, error=repr(exc)
            )
            run.settle(Settlement(job.id, job.attempt, "released"))
            return None, None
        run.settle(self._settlement(job, route, report, run))
        if report.delivery is None:
            return None, None
        return report.delivery.outcome, report.delivery.latency_ms

    def _settlement(
        self, job: ClaimedJob, route: Route, report: DeliveryReport, run: _Run
    ) -> Settlement:
        if report.kind == "replayed":
            with run.lock:
                run.summary.replayed += 1
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
        with run.lock:
            run.summary.latency_ms.setdefault(route.function, []).append(report.delivery.latency_ms)
            run.summary.responses[(route.function, outcome.status_class)] += 1
            opened = outcome.opens_circuit and route.function not in run.open_circuits
            if opened:
                run.open_circuits.add(route.function)
                run.circuits.append((route.function, outcome.status or 0, outcome.error or ""))
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


def _second_claim_share(limits: BatchLimits, size: int, share: int, first: list[ClaimedJob]) -> int:
    """A single batch's second claim's share of each tenant, from what its first claim (of
    `size` jobs at `share` a tenant) took; 0 (no second claim) when the first was the whole
    batch, or the second could find no more (the first not full, no tenant at its share).
    Rescued jobs count for no tenant's share, in a claim as here."""
    if share >= limits.max_per_tenant:
        return 0
    fresh = Counter(job.tenant_id for job in first if not (job.rescued or job.exhausted))
    most = max(fresh.values(), default=0)
    if len(first) < size and most < share:
        return 0
    return max(0, limits.max_per_tenant - most)


def _trace_root() -> TraceRoot:
    """The batch's trace, with the X-Ray entity each dispatch's subsegment nests under (None
    when tracing is off or no trace is open)."""
    tracer = active_tracer()
    parent = None
    if tracer is not None:
        try:
            parent = tracer.provider.get_trace_entity()  # type: ignore[attr-defined]
        except Exception:
            parent = None
    return batch_root(parent)


_LOG_METHODS = {
    logging.DEBUG: logger.debug,
    logging.INFO: logger.info,
    logging.WARNING: logger.warning,
    logging.ERROR: logger.error,
}


def _log_job(level: int, message: str, job: ClaimedJob, **fields: Any) -> None:
    if level < logger.log_level:
        return  # an invocation may log a line per job: skip building what nobody reads
    extra = {
        "job_id": str(job.id),
        "tenant_id": str(job.tenant_id),
        "job_type": job.job_type,
        "attempt": job.attempt,
        **{k: v for k, v in fields.items() if v is not None},
    }
    _LOG_METHODS[level](message, extra=extra, stacklevel=3)
