"""Flow control end to end: a function's rate shared by concurrent invocations, and the adaptive
limit of calls in flight against a function that pushes back. The figures over longer runs are
bench/flow_control.py's; these check the behaviour.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable

import pg8000.native

from handler.batch.runner import Summary
from handler.local.standin import StandIn
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker
from tests.faults.accounting import account, enqueue_many

RATE = 10.0
BURST = 5


def test_four_invocations_share_a_functions_rate(
    conn: pg8000.native.Connection,
    connect: Callable[[], pg8000.native.Connection],
    standin: StandIn,
    make_worker: Callable[..., Worker],
) -> None:
    # Given 30 jobs of a function limited to 10 calls/s (a bucket of 5), and four invocations
    jobs = enqueue_many(conn, uuid.uuid4(), "ingest_slack", 30)
    routes = json.dumps({"ingest_slack": {"function": "ingest-slack", "rate": "10/s", "burst": 5}})
    workers = [make_worker(run_mode="rounds", job_routes=routes, linger="false") for _ in range(4)]
    start = threading.Barrier(4)
    summaries: list[Summary | BaseException] = [RuntimeError("did not run")] * 4

    def invoke(n: int) -> None:
        try:
            start.wait()
            # Each runs its rounds, then once more until every job is done
            while True:
                summary, _ = workers[n].run(
                    parse_event({}), remaining_seconds=30, request_id=f"rate-{n}"
                )
                summaries[n] = summary
                [[left]] = connections[n].run(
                    "SELECT count(*) FROM queue_worker.queue_jobs WHERE status <> 'completed'"
                )
                if left == 0:
                    return
        except BaseException as exc:
            summaries[n] = exc

    connections = [connect() for _ in range(4)]  # threads must not share a connection

    # When they all run at once
    threads = [threading.Thread(target=invoke, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [s for s in summaries if isinstance(s, BaseException)] == []

    # Then every job was sent once and completed, and the function never saw more than its rate
    # (plus its bucket) in any second
    assert account(conn, jobs) == {"completed": 30}
    times = sorted(r.received_at for r in standin.requests())
    assert len(times) == 30
    for i, t in enumerate(times):
        in_a_second = sum(1 for u in times[i:] if u < t + 1.0)
        assert in_a_second <= RATE + BURST, (i, in_a_second)


def test_the_adaptive_limit_settles_under_a_function_that_refuses_more_than_8_in_flight(
    conn: pg8000.native.Connection, standin: StandIn, make_worker: Callable[..., Worker]
) -> None:
    # Given a function that answers 429 beyond 8 calls in flight (20 ms each; a refused job is
    # due again at once: Retry-After 0), 300 jobs for it, and invocations of 50 lanes in rounds
    standin.configure(
        "ingest-slack", {"max_in_flight": 8, "delay_ms": 20, "headers": {"Retry-After": "0"}}
    )
    jobs = enqueue_many(conn, uuid.uuid4(), "ingest_slack", 300)

    def invoke(name: str) -> Summary:
        worker = make_worker(run_mode="rounds", linger="false", idempotency_store="off")
        summary, _ = worker.run(parse_event({}), remaining_seconds=60, request_id=name)
        return summary

    # When one invocation runs (its first round overshoots: 50 at once), then a second
    first = invoke("first")
    second = invoke("second")

    # Then the first brought its limit for the function down to about 8, the second started
    # from it (it is kept in the database), and its refused calls were a small share
    assert first.concurrency_limits["ingest-slack"] <= 9.5
    assert second.rounds > 0
    assert second.concurrency_limits["ingest-slack"] <= 9.5
    [[stored]] = conn.run(
        "SELECT concurrency_limit FROM queue_worker.queue_functions WHERE function = 'ingest-slack'"
    )
    assert stored == round(second.concurrency_limits["ingest-slack"], 3)
    assert second.retried <= 0.1 * max(1, second.completed + second.retried)
    # And no job was lost: each completed, or waits for its retry (no attempt counted)
    counts = account(conn, jobs)
    assert counts["completed"] + counts["pending"] == 300
