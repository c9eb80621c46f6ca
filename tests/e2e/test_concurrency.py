"""Many invocations at once: each job is delivered exactly once."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable

import pg8000.native
import pytest

from handler.local.standin import StandIn
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker

JOB_TYPES = [
    "ingest_microsoft",
    "ingest_slack",
    "process_embeddings",
    "generate_digest",
    "prioritize_activities",
]


def run_at_once(workers: list[Worker]) -> list[object]:
    """Runs one batch on each worker, all released together by a barrier."""
    barrier = threading.Barrier(len(workers))
    results: list[object] = [None] * len(workers)

    def run(index: int, worker: Worker) -> None:
        barrier.wait()
        try:
            results[index] = worker.run(
                parse_event({}), remaining_seconds=60, request_id=f"w{index}"
            )
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.slow
def test_four_invocations_at_once_over_300_jobs_deliver_each_job_exactly_once(
    queue: QueueStore,
    make_worker: Callable[..., Worker],
    standin: StandIn,
    conn: pg8000.native.Connection,
) -> None:
    # Given 300 due jobs over 10 tenants and 5 job types
    tenants = [uuid.uuid4() for _ in range(10)]
    jobs = {queue.enqueue(tenants[n % 10], JOB_TYPES[n % 5], {"n": n}) for n in range(300)}
    # When four workers run a batch at the same moment
    results = run_at_once([make_worker(max_jobs_per_tenant="10") for _ in range(4)])
    # Then none failed, each job was POSTed exactly once, and all are completed
    assert not [r for r in results if isinstance(r, BaseException)]
    delivered = Counter(r.headers["idempotency-key"] for r in standin.requests())
    assert set(delivered) <= {str(j) for j in jobs}
    assert [key for key, n in delivered.items() if n > 1] == []
    claimed = sum(r[0].claimed for r in results)  # type: ignore[index]
    completed = sum(r[0].completed for r in results)  # type: ignore[index]
    assert claimed == completed == len(delivered)
    # The per-tenant cap (10) bounds each batch: 4 batches take at most 4 x 100; drain the rest.
    while conn.run("SELECT count(*) FROM queue_jobs WHERE status = 'pending'")[0][0]:
        extra = make_worker(max_jobs_per_tenant="10").run(
            parse_event({}), remaining_seconds=60, request_id="drain"
        )
        assert extra[0].claimed > 0
    delivered = Counter(r.headers["idempotency-key"] for r in standin.requests())
    assert sorted(delivered) == sorted(str(j) for j in jobs)
    assert set(delivered.values()) == {1}
    assert conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY status") == [
        ["completed", 300]
    ]
