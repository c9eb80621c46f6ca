"""Pruning of finished history, inside invocations, bounded in time and rows.

One chunk is one short transaction under a transaction-level advisory lock (see queue_prune in
the SQL): only one invocation prunes at a time, and a claim is never blocked by it.
"""

import time
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from handler.queue.store import QueueStore

CHUNK_ROWS = 500
MAX_CHUNKS = 20  # at most 10,000 rows of each kind per invocation


class PruneReport(NamedTuple):
    jobs: int = 0
    dead_letters: int = 0
    idempotency_records: int = 0
    locked_elsewhere: bool = False  # another invocation was pruning

    @property
    def total(self) -> int:
        return self.jobs + self.dead_letters + self.idempotency_records


def prune(
    store: QueueStore,
    *,
    completed_retention: timedelta,
    dead_letter_retention: timedelta,
    time_limit_s: float,
    chunk: int = CHUNK_ROWS,
    max_chunks: int = MAX_CHUNKS,
    now: datetime | None = None,
) -> PruneReport:
    now = now or datetime.now(UTC)
    stop_at = time.monotonic() + time_limit_s
    jobs = dead = idempotency = 0
    for _ in range(max_chunks):
        if time.monotonic() >= stop_at:
            break
        result = store.prune_chunk(
            completed_before=now - completed_retention,
            dead_before=now - dead_letter_retention,
            chunk=chunk,
        )
        if result is None:
            return PruneReport(jobs, dead, idempotency, locked_elsewhere=True)
        jobs, dead, idempotency = jobs + result[0], dead + result[1], idempotency + result[2]
        if max(result) < chunk:
            break  # nothing left that is old enough
    return PruneReport(jobs, dead, idempotency)
