"""A single batch's claims and settles (RUN_MODE=batch): a batch of more than two jobs a lane is
claimed in two statements, the first small, without any tenant getting more than one claim of the
whole batch would give it; and what is done when the last jobs are in flight is settled before
they answer.

Nothing here waits for time to pass: the claims are watched as the store makes them, and the
held calls answer only when the test has seen what it waits for.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pg8000.native
import pytest

from handler.batch import runner
from handler.local.standin import StandIn
from handler.queue.store import ClaimedJob, QueueStore, Settlement
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker
from tests.faults.accounting import enqueue_many


class ClaimWatch:
    """Every claim a worker's store makes: (max_jobs, max_per_tenant, jobs per tenant)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.claims: list[tuple[int, int, Counter[str]]] = []
        original = QueueStore.claim
        watch = self

        def claim(store: QueueStore, worker_id: str, **kwargs: Any) -> list[ClaimedJob]:
            jobs = original(store, worker_id, **kwargs)
            per_tenant = Counter(str(job.tenant_id) for job in jobs)
            watch.claims.append((kwargs["max_jobs"], kwargs["max_per_tenant"], per_tenant))
            return jobs

        monkeypatch.setattr(QueueStore, "claim", claim)

    def taken(self) -> Counter[str]:
        """Jobs per tenant over every claim."""
        total: Counter[str] = Counter()
        for _, _, per_tenant in self.claims:
            total.update(per_tenant)
        return total


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> ClaimWatch:
    return ClaimWatch(monkeypatch)


def test_a_large_batch_is_claimed_in_two_and_each_tenant_gets_what_one_claim_would_give(
    conn: pg8000.native.Connection,
    store: QueueStore,
    make_worker: Callable[..., Worker],
    claims: ClaimWatch,
) -> None:
    # Given two tenants with more jobs than their share, and one with fewer, for a worker of
    # 2 lanes (a first claim of 4 jobs) taking 10 jobs per tenant and 40 in all
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    enqueue_many(conn, a, "ingest_slack", 15)
    enqueue_many(conn, b, "ingest_slack", 15)
    enqueue_many(conn, c, "ingest_slack", 2)
    worker = make_worker(max_concurrency="2", max_jobs_per_tenant="10", max_jobs_per_run="40")

    # When one batch runs
    summary, _ = worker.run(parse_event({}), remaining_seconds=60, request_id="two-claims")

    # Then the first claim asked for 4 jobs at 1 per tenant (10 * 4 / 40), the second for the
    # rest at 9 per tenant (10 less the most a tenant got), and the tenants got what one claim
    # of the batch gives them: 10, 10 and 2
    assert [(size, share) for size, share, _ in claims.claims] == [(4, 1), (37, 9)]
    assert claims.claims[0][2] == {a: 1, b: 1, c: 1}
    assert claims.taken() == {a: 10, b: 10, c: 2}
    assert (summary.rounds, summary.claimed, summary.completed) == (2, 22, 22)


def test_a_batch_claimed_in_two_gives_no_weighted_tenant_more_than_one_claim_would(
    conn: pg8000.native.Connection,
    store: QueueStore,
    make_worker: Callable[..., Worker],
    claims: ClaimWatch,
) -> None:
    # Given tenants of weights 3 and 1 with plenty of jobs each, claimed by one batch of the
    # whole (64 lanes: the first claim would be larger than the batch) and, after it is reset,
    # by one batch in two claims (2 lanes)
    heavy, light = uuid.uuid4(), uuid.uuid4()
    store.set_tenant_limits(heavy, weight=3)
    outcome: list[Counter[str]] = []
    for lanes in ("64", "2"):
        conn.run("TRUNCATE queue_jobs, queue_tenants")
        enqueue_many(conn, heavy, "ingest_slack", 40)
        enqueue_many(conn, light, "ingest_slack", 40)
        claims.claims.clear()
        worker = make_worker(
            max_concurrency=lanes, max_jobs_per_tenant="10", max_jobs_per_run="100"
        )
        worker.run(parse_event({}), remaining_seconds=60, request_id=f"weights-{lanes}")
        outcome.append(claims.taken())
        assert len(claims.claims) == (1 if lanes == "64" else 2)

    # Then one claim gives them 30 and 10, and the two claims no more to either
    whole, staged = outcome
    assert whole == {str(heavy): 30, str(light): 10}
    assert staged[str(heavy)] <= 30
    assert staged[str(light)] <= 10
    assert staged[str(heavy)] > staged[str(light)] > 0


def test_a_small_batch_and_a_tenant_share_of_one_are_claimed_in_one_statement(
    conn: pg8000.native.Connection,
    make_worker: Callable[..., Worker],
    claims: ClaimWatch,
) -> None:
    # Given work for one tenant
    tenant = str(uuid.uuid4())
    enqueue_many(conn, tenant, "ingest_slack", 12)

    # When a batch of at most two jobs a lane runs, one whose tenants take one job each, and
    # one whose first claim would take a tenant's whole share (2 of 2: 2 * 4 / 6 rounded up)
    make_worker(max_concurrency="4", max_jobs_per_run="8").run(
        parse_event({}), remaining_seconds=60, request_id="small"
    )
    make_worker(max_concurrency="2", max_jobs_per_tenant="1", max_jobs_per_run="40").run(
        parse_event({}), remaining_seconds=60, request_id="share-of-one"
    )
    make_worker(max_concurrency="2", max_jobs_per_tenant="2", max_jobs_per_run="6").run(
        parse_event({}), remaining_seconds=60, request_id="whole-share"
    )

    # Then each made one claim, of the whole batch
    assert [(size, share) for size, share, _ in claims.claims] == [(8, 1000), (40, 1), (6, 2)]


class SettleWatch:
    """Every settle statement's job ids, and an event set at the first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[set[str]] = []
        self.first = threading.Event()
        original = QueueStore.settle
        watch = self

        def settle(store: QueueStore, worker_id: str | None, batch: Sequence[Settlement]) -> Any:
            result = original(store, worker_id, batch)
            watch.batches.append({str(s.job_id) for s in batch})
            watch.first.set()
            return result

        monkeypatch.setattr(QueueStore, "settle", settle)


def test_what_is_done_when_the_last_jobs_are_in_flight_is_settled_before_they_answer(
    store: QueueStore,
    standin: StandIn,
    make_worker: Callable[..., Worker],
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given two quick jobs and, after them, two whose calls the stand-in holds, for a worker of
    # 2 lanes that would otherwise settle only every hour (and at the end)
    monkeypatch.setattr(runner, "SETTLE_INTERVAL_SECONDS", 3600.0)
    settles = SettleWatch(monkeypatch)
    tenant = uuid.uuid4()
    quick = [store.enqueue(tenant, "ingest_slack", {"n": n}, priority=9) for n in range(2)]
    held = [store.enqueue(tenant, "ingest_slack", {"simulate": {"hold": True}}) for _ in range(2)]
    store.enqueue(tenant, "ingest_slack", {"next": "batch"})
    worker = make_worker(max_concurrency="2", max_jobs_per_run="4", max_jobs_per_tenant="10")

    # When a batch of four runs (the fifth job is left to the next)
    running = pool.submit(
        worker.run, parse_event({}), remaining_seconds=60, request_id="settle-early"
    )
    try:
        # Then, while the held calls are still held, the quick ones are settled
        assert settles.first.wait(30), "nothing was settled while the last calls were held"
        assert not running.done()
        assert settles.batches[0] == {str(job) for job in quick}
    finally:
        standin.release()
    summary, _ = running.result(timeout=60)

    # And the settle at the end holds only the last calls' outcomes
    assert settles.batches[1:] == [{str(job) for job in held}]
    assert (summary.claimed, summary.completed, summary.settle_statements) == (4, 4, 2)
