"""A dispatch that succeeded but whose settlement was lost is not sent again (docs/adr/0003-idempotency-guard.md)."""

from __future__ import annotations

import uuid
from collections import Counter

import pg8000.native
import pytest

from handler.local.standin import StandIn
from handler.queue.store import QueueStore

from .conftest import RunBatch


class SettlementLostError(RuntimeError):
    """Stands for a settle statement that never reached the database."""


@pytest.fixture
def lose_first_settlement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the first settle of the test fails after every dispatch has been made."""
    original = QueueStore.settle
    calls = Counter[str]()

    def settle(self: QueueStore, worker_id: str | None, settlements: object) -> object:
        calls["settle"] += 1
        if calls["settle"] == 1:
            raise SettlementLostError("connection dropped between dispatch and settle")
        return original(self, worker_id, settlements)  # type: ignore[arg-type]

    monkeypatch.setattr(QueueStore, "settle", settle)


def expire_leases(conn: pg8000.native.Connection) -> None:
    conn.run(
        "UPDATE queue_jobs SET locked_until = now() - interval '1 second' WHERE status = 'processing'"
    )


@pytest.mark.usefixtures("lose_first_settlement")
def test_a_delivered_job_whose_settlement_was_lost_is_completed_without_a_second_call(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn, conn: pg8000.native.Connection
) -> None:
    # Given jobs that were delivered, but whose settlement never reached the database
    tenant = uuid.uuid4()
    ok = [queue.enqueue(tenant, "ingest_slack", {"n": n}) for n in range(5)]
    failing = queue.enqueue(tenant, "ingest_slack", {"simulate": {"status": 500, "fail_times": 1}})
    first, _ = run_batch()
    assert (first.claimed, first.unsettled) == (6, 6)
    assert conn.run("SELECT count(*) FROM queue_jobs WHERE status = 'processing'")[0][0] == 6
    # When their leases expire and the next batch takes them over
    expire_leases(conn)
    second, _ = run_batch()
    # Then the delivered ones are completed from their idempotency records, without a call,
    # and the one whose call had failed is called again (and now succeeds)
    assert second.rescued == 6
    assert second.replayed == 5
    assert second.completed == 6
    calls = Counter(r.headers["idempotency-key"] for r in standin.requests())
    assert {str(j): calls[str(j)] for j in ok} == {str(j): 1 for j in ok}
    assert calls[str(failing)] == 2
    assert conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY 1") == [["completed", 6]]


def test_with_idempotency_off_a_lost_settlement_means_a_second_delivery(
    queue: QueueStore,
    run_batch: RunBatch,
    standin: StandIn,
    conn: pg8000.native.Connection,
    lose_first_settlement: None,
) -> None:
    # The contrast that shows what the guard is for: the function sees the job twice, with the
    # same Idempotency-Key header so that it can drop the repeat itself.
    job = queue.enqueue(uuid.uuid4(), "ingest_slack", {})
    run_batch(idempotency_store="off")
    expire_leases(conn)
    second, _ = run_batch(idempotency_store="off")
    assert second.replayed == 0
    assert [r.headers["idempotency-key"] for r in standin.requests()] == [str(job), str(job)]


@pytest.mark.usefixtures("lose_first_settlement")
def test_a_last_attempt_that_was_answered_2xx_is_completed_not_dead_lettered(
    queue: QueueStore, run_batch: RunBatch, standin: StandIn, conn: pg8000.native.Connection
) -> None:
    # Given jobs on their last attempt whose functions answered 2xx (one of them 500), and whose
    # settlement never reached the database: as if the worker had died right after the calls
    tenant = uuid.uuid4()
    answered = [queue.enqueue(tenant, "ingest_slack", {"n": n}, max_attempts=1) for n in range(3)]
    failed = queue.enqueue(tenant, "ingest_slack", {"simulate": {"status": 500}}, max_attempts=1)
    first, _ = run_batch()
    assert (first.claimed, first.unsettled) == (4, 4)

    # When their leases expire and the next batch finds them (the lease expired during their
    # last attempt)
    expire_leases(conn)
    second, _ = run_batch()

    # Then the answered ones are completed from their idempotency records, without a call, and
    # only the one that had failed (no record) is dead-lettered
    assert (second.claimed, second.replayed, second.completed, second.dead_lettered) == (4, 3, 3, 1)
    assert len(standin.requests()) == 4  # no second call
    assert conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY 1") == [["completed", 3]]
    [[reason]] = conn.run("SELECT reason FROM queue_jobs_dead_letter")
    assert reason == "Exhausted 1 attempts: the lease expired during the last one"
    assert failed not in answered
