"""Settlement of a batch's outcomes: buffered, written in one statement per flush.

A flush happens every SETTLE_INTERVAL_SECONDS while dispatches run and once at the end, so a
short batch costs one settle statement whatever its size, and a long one never holds finished
outcomes for long. Only the jobs this worker still holds are settled (the SQL checks the lease).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID

from handler.store import Settlement, SettleResult

SETTLE_INTERVAL_SECONDS = 5.0

SettleFn = Callable[[Sequence[Settlement]], Awaitable[dict[UUID, SettleResult]]]


class Settler:
    def __init__(self, settle: SettleFn, *, interval: float = SETTLE_INTERVAL_SECONDS) -> None:
        self._settle = settle
        self._interval = interval
        self._pending: list[Settlement] = []
        self._lock = asyncio.Lock()  # one flush at a time: outcomes stay in order
        self.results: Counter[SettleResult] = Counter()
        self.by_job: dict[UUID, SettleResult] = {}
        self.statements = 0
        self.failures: list[BaseException] = []

    def add(self, settlement: Settlement) -> None:
        self._pending.append(settlement)

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            self.statements += 1
            try:
                results = await self._settle(batch)
            except Exception as exc:
                self.failures.append(exc)
                return
            self.by_job.update(results)
            self.results.update(results.values())

    async def run_periodically(self, stop: asyncio.Event) -> None:
        """Flushes every interval until `stop` is set (the caller then flushes once more)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._interval)
            except TimeoutError:
                await self.flush()

    @property
    def unsettled(self) -> int:
        return len(self._pending)
