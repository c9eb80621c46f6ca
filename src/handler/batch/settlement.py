"""Settlement of an invocation's outcomes: buffered, written in one statement per flush.

Dispatch threads add outcomes; the batch's own thread flushes them (every few seconds in a single
batch, every few tens of milliseconds in rounds, and once at the end), so that a short batch costs
one settle statement whatever its size and finished outcomes are never held for long. Only jobs
this worker still holds are settled (the SQL checks the lease).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

from handler.queue.store import Settlement, SettleResult

SettleFn = Callable[[Sequence[Settlement]], dict[SettleResult, int]]


class SettlementBuffer:
    def __init__(self, settle: SettleFn) -> None:
        self._settle = settle
        self._pending: list[Settlement] = []
        self._lock = threading.Lock()
        self.results: Counter[SettleResult] = Counter()
        self.statements = 0
        self.failures: list[BaseException] = []
        self.added = 0

    def add(self, settlement: Settlement) -> None:
        with self._lock:
            self._pending.append(settlement)
            self.added += 1

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def flush(self) -> dict[SettleResult, int]:
        """Writes what is buffered (one statement); returns what it recorded. A failure is kept
        for the summary: the jobs stay leased, and the next claim after their lease takes them
        back."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return {}
        self.statements += 1
        try:
            results = self._settle(batch)
        except Exception as exc:
            self.failures.append(exc)
            return {}
        self.results.update(results)
        return results
