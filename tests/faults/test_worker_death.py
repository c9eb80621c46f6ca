"""A worker that dies mid-batch, and one whose invocation runs out of time mid-call.

A dead worker's jobs stay `processing` until their leases run out; the next claim takes them
over. A job whose call had answered before the death is completed from its idempotency record
without a second call; a job whose call was still in flight is sent again, with the same
Idempotency-Key, once the dead invocation's deadline has passed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pg8000.native
import pytest

from handler.local.standin import ReceivedRequest, StandIn

from .accounting import (
    account,
    attempts_sent,
    dispatches,
    enqueue_many,
    expire_in_progress_records,
    expire_leases,
    idempotency_records,
    make_due,
    sent,
    statuses,
)
from .conftest import RunBatch

HUNG = 10
FAST = 30


def run_and_kill_once_all_sent(
    worker_env: dict[str, str], standin: StandIn, tmp_path: Path, count: int, **env: str
) -> list[ReceivedRequest]:
    """`queue-worker run` in a process of its own, SIGKILLed once the stand-in has received
    `count` calls; the calls it received."""
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "handler.local.cli", "run", "--budget", "60"],
            env=os.environ | worker_env | {"HTTP_TIMEOUT_SECONDS": "30"} | env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            received = standin.wait_for_requests(count, timeout=60)
        except TimeoutError:
            worker.kill()
            worker.wait()
            pytest.fail(f"the worker did not send every job:\n{log.read_text()[-3000:]}")
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
    return received


@pytest.mark.parametrize("run_mode", ["batch", "rounds"])
def test_a_worker_killed_mid_batch_loses_nothing_and_repeats_only_calls_in_flight(
    conn: pg8000.native.Connection,
    standin: StandIn,
    worker_env: dict[str, str],
    run_batch: RunBatch,
    tmp_path: Path,
    run_mode: str,
) -> None:
    # Given 40 due jobs, 10 of them for a function that never answers
    tenant = uuid.uuid4()
    fast = enqueue_many(conn, tenant, "process_embeddings", FAST)
    hung = enqueue_many(conn, tenant, "ingest_slack", HUNG)
    jobs = fast + hung
    standin.configure("ingest-slack", {"hang": True})

    # When `queue-worker run` has sent all 40 and is SIGKILLed while 10 calls hang
    first_run = run_and_kill_once_all_sent(
        worker_env, standin, tmp_path, len(jobs), MAX_JOBS_PER_TENANT="100", RUN_MODE=run_mode
    )

    # Then nothing is lost: what was not settled before the kill is still `processing`
    at_kill = statuses(conn, jobs)
    assert set(account(conn, jobs)) <= {"completed", "processing"}
    assert {at_kill[j] for j in hung} == {"processing"}
    assert dispatches(first_run) == dict.fromkeys(jobs, 1)
    # ... and each call's fate is in its idempotency record: COMPLETED once it answered 200 and
    # the worker recorded it, INPROGRESS while in flight (the hung ones, and any fast one whose
    # answer the worker had not recorded yet when it died)
    records = idempotency_records(conn, jobs)
    assert set(records) == set(jobs)
    assert {records[j] for j in hung} == {"INPROGRESS"}
    assert all(records[j] == "COMPLETED" for j in jobs if at_kill[j] == "completed")
    answered = [j for j in jobs if records[j] == "COMPLETED"]
    in_flight = [j for j in jobs if records[j] == "INPROGRESS"]
    unsettled_answered = [j for j in answered if at_kill[j] == "processing"]

    # When the leases run out and the next batch runs, while the dead invocation's in-progress
    # records still stand (its deadline has not passed)
    standin.configure("ingest-slack", None)
    assert expire_leases(conn) == len(unsettled_answered) + len(in_flight)
    second, _ = run_batch()

    # Then the answered ones are completed from their records, without a call, and the ones
    # that may still be in flight are released, not sent twice at once
    assert second.claimed == second.rescued == len(unsettled_answered) + len(in_flight)
    assert second.replayed == second.completed == len(unsettled_answered)
    assert second.released == len(in_flight)
    assert (second.retried, second.dead_lettered, second.stale, second.unsettled) == (0, 0, 0, 0)
    assert len(standin.requests()) == len(jobs)  # no call at all
    assert account(conn, jobs) == +Counter(completed=len(answered), pending=len(in_flight))

    # When the dead invocation's deadline has passed
    assert expire_in_progress_records(conn) == len(in_flight)
    make_due(conn, in_flight)
    third, _ = run_batch()

    # Then the calls that were in flight are made again, with the same Idempotency-Key
    assert third.claimed == third.completed == len(in_flight)
    assert (third.rescued, third.replayed, third.unsettled) == (0, 0, 0)
    assert account(conn, jobs) == {"completed": len(jobs)}
    requests = standin.requests()
    assert dispatches(requests) == {j: 2 if j in in_flight else 1 for j in jobs}
    for job in in_flight:
        assert attempts_sent(requests, job) == [1, 2]  # the rescue counted the lost attempt


def test_a_last_attempt_still_in_flight_when_its_worker_died_waits_for_its_record_to_expire(
    conn: pg8000.native.Connection,
    standin: StandIn,
    worker_env: dict[str, str],
    run_batch: RunBatch,
    tmp_path: Path,
) -> None:
    # Given 4 jobs with one attempt each, for a function that never answers, and a worker
    # SIGKILLed while the 4 calls hang: their idempotency records say INPROGRESS
    tenant = uuid.uuid4()
    jobs = enqueue_many(conn, tenant, "ingest_slack", 4)
    conn.run(
        "UPDATE queue_jobs SET max_attempts = 1 WHERE id = ANY (CAST(:ids AS uuid[]))", ids=jobs
    )
    standin.configure("ingest-slack", {"hang": True})
    run_and_kill_once_all_sent(worker_env, standin, tmp_path, len(jobs))
    assert set(idempotency_records(conn, jobs).values()) == {"INPROGRESS"}

    # When their leases run out (during their last attempt) while the dead invocation's
    # in-progress records still stand, and the next batch finds them
    standin.configure("ingest-slack", None)
    assert expire_leases(conn) == len(jobs)
    second, _ = run_batch()

    # Then none is dead-lettered nor sent again: each is left for a later check
    assert second.claimed == len(jobs)
    assert (second.dead_lettered, second.completed, second.unsettled) == (0, 0, 0)
    assert len(standin.requests()) == len(jobs)
    assert account(conn, jobs) == {"processing": len(jobs)}

    # When the dead invocation's deadline has passed and the check comes round again
    assert expire_in_progress_records(conn) == len(jobs)
    expire_leases(conn)
    third, _ = run_batch()

    # Then, their last attempt having never answered, they are dead-lettered, without a call
    assert (third.claimed, third.dead_lettered) == (len(jobs), len(jobs))
    assert len(standin.requests()) == len(jobs)
    assert account(conn, jobs) == {"dead": len(jobs)}


def test_the_deadline_passing_mid_call_ends_the_batch_in_time_with_every_job_back(
    conn: pg8000.native.Connection,
    standin: StandIn,
    run_batch: RunBatch,
) -> None:
    # Given 8 jobs for a function that takes 30 s, and 5 calls in flight at most
    tenant = uuid.uuid4()
    jobs = enqueue_many(conn, tenant, "process_embeddings", 8)
    standin.configure("process-embeddings", {"delay_ms": 30_000})

    # When an invocation with 6 s left runs them (3 s of it kept back as the safety margin)
    started = time.monotonic()
    summary, _ = run_batch(remaining=6, max_concurrency="5", http_timeout_seconds="30")
    elapsed = time.monotonic() - started

    # Then it returns before its deadline: the 5 calls it started were cut at the margin and
    # are retried (the attempt counts), the 3 it had no time left to start are released
    assert elapsed < 6
    assert (summary.claimed, summary.retried, summary.released) == (8, 5, 3)
    assert (summary.completed, summary.stale, summary.unsettled) == (0, 0, 0)
    assert account(conn, jobs) == {"pending": 8}  # nothing left `processing`
    calls = sent(standin)
    assert sorted(calls.values()) == [1] * 5  # no job sent twice
    rows = conn.run(
        "SELECT id::text, attempts, last_error FROM queue_jobs WHERE id = ANY (CAST(:ids AS uuid[]))",
        ids=jobs,
    )
    for job_id, attempts, last_error in rows:
        if job_id in calls:
            assert attempts == 1
            assert last_error.startswith("Network error calling process-embeddings")
        else:
            assert (attempts, last_error) == (0, None)
    # A call cut short was a failure: its in-progress record is gone, so a retry calls again
    assert idempotency_records(conn, jobs) == {}


def test_with_less_time_left_than_a_call_needs_nothing_is_sent(
    conn: pg8000.native.Connection,
    standin: StandIn,
    run_batch: RunBatch,
) -> None:
    tenant = uuid.uuid4()
    jobs = enqueue_many(conn, tenant, "process_embeddings", 8)
    standin.configure("process-embeddings", {"delay_ms": 30_000})

    summary, _ = run_batch(remaining=4)  # 3 s margin: less than the 1 s a call needs is left

    # (nothing is claimed either: a lease taken only to be released is churn)
    assert (summary.claimed, summary.released) == (0, 0)
    assert account(conn, jobs) == {"pending": 8}
    assert sent(standin) == {}
    assert conn.run(
        "SELECT DISTINCT attempts, last_error FROM queue_jobs WHERE id = ANY (CAST(:ids AS uuid[]))",
        ids=jobs,
    ) == [[0, None]]
