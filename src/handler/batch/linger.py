"""Lingering: in rounds, a scheduled invocation with nothing due waits for new work instead of
returning, so that a job enqueued a moment later is picked up in milliseconds, not at the next
tick.

At most one invocation lingers at a time: the one that started last (queue_linger_take; the next
tick takes over, the previous one sees so at its next poll and returns). While it lingers, each
wake costs one cheap query (queue_linger_poll: still lingering? when is the next job due?). It is
woken by a notification when the connection can LISTEN (enqueue_job, a dependency released, a
retry made pending earlier: every change that makes a tenant due sends NOTIFY queue_worker_due),
at the next due time it computed (a retry or a schedule coming due), and otherwise by a short
poll that backs off while nothing happens (through a transaction pooler, which delivers no
notifications). docs/adr/0008-rounds-and-lingering.md.
"""

from __future__ import annotations

import time
from datetime import datetime

from handler.batch.budget import MIN_CALL_SECONDS, TimeBudget
from handler.queue.store import QueueStore

CHANNEL = "queue_worker_due"
FIRST_POLL_SECONDS = 0.05  # without LISTEN, the first poll after activity
MAX_POLL_SECONDS = 0.5  # ... backing off to this while nothing happens
LISTEN_SAFETY_SECONDS = 5.0  # with LISTEN, a poll at least this often all the same


class Linger:
    """One invocation's lingering."""

    def __init__(
        self, store: QueueStore, worker_id: str, started_at: datetime, *, listen: bool
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._started_at = started_at
        self._listen = listen
        self._holding = False

    def wait(self, budget: TimeBudget) -> bool:
        """Waits for work to come due; True when it has (claim now), False when this invocation
        should return: out of time, or another invocation lingers now."""
        if not self._holding:
            if not self._store.take_linger(self._worker_id, self._started_at, budget.remaining()):
                return False  # a newer invocation lingers
            self._holding = True
        if self._listen:
            self._store.listen(CHANNEL)
        interval = FIRST_POLL_SECONDS
        while True:
            left = budget.remaining() - budget.safety_margin - MIN_CALL_SECONDS
            if left <= 0:
                return False
            lingering, due_in = self._store.linger_poll(self._worker_id)
            notified = self._store.take_notifications() > 0
            if not lingering:
                self._holding = False
                return False
            if notified or (due_in is not None and due_in <= 0):
                return True
            timeout = min(left, LISTEN_SAFETY_SECONDS if self._listen else interval)
            if due_in is not None:
                timeout = min(timeout, due_in)
            if self._listen:
                self._store.wait_for_notification(timeout)
            else:
                time.sleep(timeout)  # the poll's own pace: there is nothing to be woken by
                interval = min(MAX_POLL_SECONDS, interval * 2)

    def release(self) -> None:
        """Lets go of the linger (when the invocation returns)."""
        if self._holding:
            self._holding = False
            self._store.release_linger(self._worker_id)
