"""Rounds and lingering (RUN_MODE=rounds): an invocation that keeps claiming while there is work,
runs chains through, and waits for new work when there is none, one invocation at a time.

Nothing here waits for time to pass: each test waits for what the stand-in receives, or for the
worker to take the linger (the store call is watched).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pg8000.native
import pytest

from handler.batch.runner import Summary
from handler.local.standin import StandIn
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.worker import Backlog, Worker
from tests.faults.accounting import account, enqueue_many, sent

SCHEDULED = {"scheduled_time": "2026-12-01T12:00:00Z"}


class LingerWatch:
    """Tells when a worker has taken the linger (its store's take_linger returned True)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.taken: list[str] = []
        self._any = threading.Event()
        original = QueueStore.take_linger
        watch = self

        def take_linger(store: QueueStore, worker_id: str, *args: Any) -> bool:
            result = original(store, worker_id, *args)
            if result:
                watch.taken.append(worker_id)
                watch._any.set()
            return result

        monkeypatch.setattr(QueueStore, "take_linger", take_linger)

    def wait_for_first(self, timeout: float = 30) -> str:
        assert self._any.wait(timeout), "no worker took the linger"
        return self.taken[0]


def run_in(
    pool: ThreadPoolExecutor, worker: Worker, event: dict[str, Any], remaining: float
) -> Future[tuple[Summary, Backlog]]:
    return pool.submit(
        worker.run, parse_event(event), remaining_seconds=remaining, request_id=uuid.uuid4().hex
    )


def test_rounds_claim_again_while_earlier_calls_are_still_in_flight(
    store: QueueStore,
    standin: StandIn,
    make_worker: Callable[..., Worker],
    pool: ThreadPoolExecutor,
) -> None:
    # Given a job whose call the stand-in holds, and 10 quick ones, for a worker of 2 lanes
    # (a function of this test's own, so that the stand-in's counts of it are this test's)
    tenant = uuid.uuid4()
    held = store.enqueue(tenant, "process_embeddings", {"simulate": {"hold": True}}, priority=9)
    quick = [store.enqueue(tenant, "quick_job", {"n": n}) for n in range(10)]
    worker = make_worker(
        run_mode="rounds",
        max_concurrency="2",
        linger="false",
        job_routes='{"quick_job": "quick-in-rounds"}',
    )

    # When it runs, the quick jobs go through the other lane, round after round, while the held
    # call is still waiting
    running = run_in(pool, worker, {}, 30)
    standin.wait_for_requests(11)
    standin.release()
    summary, _ = running.result(timeout=60)

    # Then it claimed in several rounds, everything completed, no more than 2 calls at once
    assert summary.rounds >= 3
    assert (summary.claimed, summary.completed) == (11, 11)
    assert standin.stats()["quick-in-rounds"].peak_in_flight <= 1
    assert sent(standin) == dict.fromkeys([str(held), *map(str, quick)], 1)


def test_rounds_never_run_past_the_time_budget(
    store: QueueStore,
    conn: pg8000.native.Connection,
    standin: StandIn,
    make_worker: Callable[..., Worker],
) -> None:
    # Given more work than fits in the budget: calls that hang, and many quick ones
    tenant = uuid.uuid4()
    hung = [store.enqueue(tenant, "ingest_slack", {"simulate": {"hang": True}}) for _ in range(3)]
    quick = enqueue_many(conn, tenant, "process_embeddings", 300)
    worker = make_worker(run_mode="rounds", http_timeout_seconds="60", max_jobs_per_tenant="20")

    # When a rounds invocation with 8 s left runs
    summary, _ = worker.run(parse_event({}), remaining_seconds=8, request_id="budget")

    # Then it returns within its budget, every job it took is settled, none is lost
    assert summary.duration_ms < 8000
    assert summary.unsettled == 0
    assert summary.claimed == summary.completed + summary.retried + summary.released
    counts = account(conn, [*map(str, hung), *quick])
    assert counts["completed"] == summary.completed


def test_a_chain_of_five_jobs_runs_through_in_one_invocation(
    store: QueueStore, standin: StandIn, make_worker: Callable[..., Worker]
) -> None:
    # Given five jobs, each depending on the one before, with 50 ms functions
    standin.configure_default({"delay_ms": 50})
    tenant = uuid.uuid4()
    chain = [store.enqueue(tenant, "ingest_slack", {"link": 0})]
    for link in range(1, 5):
        chain.append(store.enqueue(tenant, "ingest_slack", {"link": link}, depends_on=[chain[-1]]))

    # When one rounds invocation runs (not lingering: it ends when nothing is left)
    summary, _ = make_worker(run_mode="rounds").run(
        parse_event({}), remaining_seconds=60, request_id="chain"
    )

    # Then it dispatched every link, in order, each once
    assert (summary.claimed, summary.completed) == (5, 5)
    assert [r.body["payload"]["link"] for r in standin.requests()] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_a_job_enqueued_while_an_invocation_lingers_is_dispatched_by_it(
    store: QueueStore,
    standin: StandIn,
    make_worker: Callable[..., Worker],
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
    pool_mode: str,
) -> None:
    # Given a scheduled rounds invocation with nothing to do, lingering (woken by NOTIFY on a
    # session, by its poll through a transaction pooler)
    watch = LingerWatch(monkeypatch)
    worker = make_worker(run_mode="rounds", database_pool_mode=pool_mode)
    running = run_in(pool, worker, SCHEDULED, 60)
    lingerer = watch.wait_for_first()

    # When a job is enqueued, then the lingering invocation dispatches it
    job = store.enqueue(uuid.uuid4(), "ingest_slack", {"late": True})
    standin.wait_for_requests(1)

    # And when the next tick takes the linger over, it returns, having done that job
    assert store.take_linger("the-next-tick", store.now(), 60)
    summary, _ = running.result(timeout=60)
    assert lingerer == summary.worker_id
    assert (summary.claimed, summary.completed) == (1, 1)
    assert summary.lingered_ms > 0
    assert [r.body["job_id"] for r in standin.requests()] == [str(job)]


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_a_job_that_comes_due_while_an_invocation_lingers_is_dispatched_by_it(
    store: QueueStore,
    standin: StandIn,
    make_worker: Callable[..., Worker],
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
    pool_mode: str,
) -> None:
    # Given a scheduled rounds invocation lingering, and then a job due a second later (its
    # enqueue wakes nobody: the tenant is not due yet), as a retry or a delayed job would be
    watch = LingerWatch(monkeypatch)
    worker = make_worker(run_mode="rounds", database_pool_mode=pool_mode)
    running = run_in(pool, worker, SCHEDULED, 60)
    lingerer = watch.wait_for_first()
    job = store.enqueue(
        uuid.uuid4(), "ingest_slack", scheduled_at=store.now() + timedelta(seconds=1)
    )

    # When it comes due, then the lingering invocation dispatches it
    standin.wait_for_requests(1)
    assert store.take_linger("the-next-tick", store.now(), 60)
    summary, _ = running.result(timeout=60)
    assert lingerer == summary.worker_id
    assert (summary.claimed, summary.completed) == (1, 1)
    assert [r.body["job_id"] for r in standin.requests()] == [str(job)]


def test_two_lingering_candidates_never_both_linger(
    store: QueueStore,
    standin: StandIn,
    make_worker: Callable[..., Worker],
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given one scheduled rounds invocation lingering
    watch = LingerWatch(monkeypatch)
    first = run_in(pool, make_worker(run_mode="rounds"), SCHEDULED, 60)
    older = watch.wait_for_first()

    # When the next tick's invocation starts and has nothing to do either
    second = run_in(pool, make_worker(run_mode="rounds"), SCHEDULED, 60)

    # Then it takes the linger over and the first returns: one lingers at a time
    first_summary, _ = first.result(timeout=60)
    assert first_summary.worker_id == older
    assert not second.done()
    [[holder]] = store.conn.run("SELECT worker_id FROM queue_worker.queue_linger")
    assert holder != older
    assert holder in watch.taken
    assert store.take_linger("the-tick-after", store.now(), 60)
    second.result(timeout=60)
