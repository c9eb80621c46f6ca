"""A batch holds the worker's threads on one CPU while its calls are in flight, and lets them go
when it ends (handler.dispatch.affinity; docs/adr/0014-one-cpu-per-batch.md)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable

import pytest

from handler.local.standin import StandIn
from handler.queue.store import QueueStore
from handler.runtime.events import parse_event
from handler.runtime.worker import Worker

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux with two CPUs or more allowed",
)


def new_threads(before: set[threading.Thread]) -> dict[str, int]:
    return {
        t.name: t.native_id
        for t in threading.enumerate()
        if t not in before and t.native_id is not None
    }


def test_dispatch_threads_are_on_one_cpu_during_a_batch_and_free_after_it(
    queue: QueueStore, make_worker: Callable[..., Worker], standin: StandIn
) -> None:
    process_mask = os.sched_getaffinity(0)
    tenant = uuid.uuid4()
    for n in range(3):
        queue.enqueue(tenant, "ingest_slack", {"n": n})
    standin.configure("ingest-slack", {"hold": True})
    worker = make_worker(idempotency_store="off")
    before = set(threading.enumerate())
    results: list[object] = []
    runner = threading.Thread(
        target=lambda: results.append(
            worker.run(parse_event({}), remaining_seconds=30, request_id="cpu")
        )
    )
    runner.start()
    try:
        # While the three calls are held by the function
        standin.wait_for_requests(3)
        threads = new_threads(before)
        during = {name: os.sched_getaffinity(tid) for name, tid in threads.items()}
    finally:
        standin.release()
        runner.join()
    # Then the thread running the batch, its three lanes and the deadline watchdog were on one
    # CPU, the same
    assert sorted(name for name in during if name.startswith("dispatch_")) == [
        "dispatch_0",
        "dispatch_1",
        "dispatch_2",
    ]
    assert runner.name in during
    assert len(during) == 5
    cpus = {frozenset(mask) for mask in during.values()}
    assert len(cpus) == 1
    assert len(next(iter(cpus))) == 1
    # And once the batch ended (every job completed) they have the process's mask again
    summary, _ = results[0]  # type: ignore[misc]
    assert summary.completed == 3
    lanes = {name: tid for name, tid in threads.items() if name != runner.name}
    assert {name: os.sched_getaffinity(tid) for name, tid in lanes.items()} == dict.fromkeys(
        lanes, process_mask
    )
