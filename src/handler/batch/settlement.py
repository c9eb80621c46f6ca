"""Settlement of a batch's outcomes: buffered, written in one statement per flush.

Dispatch threads add outcomes; the batch's own thread flushes every SETTLE_INTERVAL_SECONDS
while dispatches run, and once at the end, so a short batch costs one settle statement whatever
its size and a long one never holds finished outcomes for long. Only jobs this worker still
holds are settled (the SQL checks the lease).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

from handler.queue.store import Settlement, SettleResult

SETTLE_INTERVAL_SECONDS = 5.0

SettleFn = Callable[[Sequence[Settlement]], dict[SettleResult, int]]


class Settler:
    def __init__(self, settle: SettleFn) -> None:
        self._settle = settle
        self._pending: list[Settlement] = []
        self._lock = threading.Lock()
        self.results: Counter[SettleResult] = Counter()
        self.statements = 0
        self.failures: list[BaseException] = []

    def add(self, settlement: Settlement) -> None:
        with self._lock:
            self._pending.append(settlement)

    def flush(self) -> None:
        """Writes what is buffered (one statement). A failure is kept for the summary: the jobs
        stay leased, and the next claim after their lease takes them back."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        self.statements += 1
        try:
            results = self._settle(batch)
        except Exception as exc:
            self.failures.append(exc)
            return
        self.results.update(results)
