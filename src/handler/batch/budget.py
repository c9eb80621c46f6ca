"""The invocation's time budget: when to stop sending, how long a call may take, how long a lease."""

from __future__ import annotations

import math
import time

# Time kept back at the end of an invocation for the last settlement and the return.
MIN_SAFETY_MARGIN_SECONDS = 3.0
SAFETY_MARGIN_FRACTION = 0.05
# A call is not started with less than this left: it would only time out.
MIN_CALL_SECONDS = 1.0
# How far a lease reaches past the invocation's end (its own clock may lag a little).
LEASE_MARGIN_SECONDS = 30


class TimeBudget:
    """Deadlines on the monotonic clock, from the invocation's remaining time."""

    __slots__ = ("remaining_at_start", "started")

    def __init__(self, remaining_at_start: float, started: float | None = None) -> None:
        self.remaining_at_start = remaining_at_start  # seconds
        self.started = time.monotonic() if started is None else started

    @property
    def deadline(self) -> float:
        return self.started + self.remaining_at_start

    @property
    def safety_margin(self) -> float:
        return max(MIN_SAFETY_MARGIN_SECONDS, self.remaining_at_start * SAFETY_MARGIN_FRACTION)

    @property
    def send_until(self) -> float:
        """No call may still be running after this moment."""
        return self.deadline - self.safety_margin

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call_timeout(self, http_timeout: float) -> float | None:
        """The timeout for a call starting now, or None when there is no time left to start one."""
        available = self.send_until - time.monotonic()
        if available < MIN_CALL_SECONDS:
            return None
        return min(http_timeout, available)

    def lease_seconds(self, configured: int | None) -> int:
        """The lease of a claim made now: JOB_LEASE_SECONDS, or what is left of the invocation
        plus a margin (a claim never outlives its invocation by much)."""
        if configured is not None:
            return configured
        return math.ceil(max(self.remaining(), 0.0)) + LEASE_MARGIN_SECONDS

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)
