"""Adaptive limits of calls in flight, one per function.

Additive increase while calls succeed within their usual latency (about one more call in flight
per limit's worth of successes), multiplicative decrease on congestion: a 429, a 503, a timeout,
or a success three times slower than usual (and 100 ms slower at least), at most once per call's
latency so that a burst of refusals counts once. Never above the function's cap (its route's
max_concurrency, or MAX_CONCURRENCY), never below 1.

Congestion at N calls in flight makes N - 1 the function's ceiling: the limit climbs to it and
no further (calls in flight are floor(limit)). Now and then, with every slot busy, one call more
is let through: a probe, 5 s after the ceiling was found. A refused probe costs that call a retry
and doubles the wait before the next one (10 s, 20 s, ... up to a minute), and leaves the limit
as it is; a probe that succeeds forgets the ceiling, and the limit climbs on to its cap. An
invocation starts from the limits the last ones left in the database (queue_functions) and leaves
its own; docs/adr/0007-flow-control.md.
"""

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple

from handler.dispatch.outcomes import Outcome

Signal = Literal["ok", "congested", "neutral"]
Acquired = Literal["slot", "probe"]  # a slot within the limit, or the one call past a ceiling

DECREASE_FACTOR = 0.7
LATENCY_JUMP = 3.0
LATENCY_JUMP_MIN_MS = 100.0
CEILING_MEMORY_SECONDS = 5.0  # how long the limit stays at a new ceiling before probing it
CEILING_MEMORY_MAX_SECONDS = 60.0  # ... doubled after each refused probe, up to this
# Just under the next whole call: at the ceiling, floor(limit) admits no call more.
_BELOW_NEXT_CALL = 0.999


def signal_of(outcome: Outcome) -> Signal:
    """What an answer says about the function's load."""
    if outcome.kind == "completed":
        return "ok"
    if outcome.kind == "rate_limited" or outcome.status == 503 or outcome.timed_out:
        return "congested"
    return "neutral"


class AdaptiveLimit:
    """One function's limit of calls in flight; safe to use from many threads."""

    def __init__(
        self, cap: int, start: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cap = max(1, cap)
        self._clock = clock
        self._limit = float(self.cap if start is None else min(max(start, 1.0), self.cap))
        self._in_flight = 0
        self._peak = 0  # the most calls in flight since the last decrease
        self._base_ms: float | None = None  # the usual latency of a success
        self._ceiling: float | None = None
        self._ceiling_at = 0.0  # when the ceiling was found, met again or last probed
        self._memory = CEILING_MEMORY_SECONDS
        self._probing = False
        self._last_decrease = -math.inf
        self._lock = threading.Lock()

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> Acquired | None:
        """Takes a slot if one is free, or the probe's when one is due; None: neither."""
        with self._lock:
            allowed = max(1, math.floor(self._limit))
            kind: Acquired
            if self._in_flight < allowed:
                kind = "slot"
            elif self._in_flight == allowed and self._probe_due(allowed):
                kind = "probe"
                self._probing = True
            else:
                return None
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            return kind

    def release(
        self, outcome: Outcome | None, latency_ms: float | None, *, probe: bool = False
    ) -> None:
        """Gives the slot back, learning from how the call went (None: it was never sent);
        `probe`: the slot was the probe's."""
        now = self._clock()
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if probe:
                self._probing = False
            if outcome is None:
                return  # never sent (a probe's slot too: the next call may probe)
            signal = signal_of(outcome)
            if signal == "ok" and latency_ms is not None and self._jumped(latency_ms):
                signal = "congested"
            if signal == "ok":
                self._learn_latency(latency_ms)
            if probe:
                self._probed(now, signal)
            elif signal == "ok":
                self._increase()
            elif signal == "congested":
                self._decrease(now, latency_ms)

    def _probe_due(self, allowed: int) -> bool:
        ceiling = self._ceiling
        return (
            ceiling is not None
            and not self._probing
            and ceiling <= allowed < self.cap
            and self._clock() - self._ceiling_at >= self._memory
        )

    def _probed(self, now: float, signal: Signal) -> None:
        if signal == "ok":
            # The function took one call more than the ceiling: it takes more now.
            self._ceiling = None
            self._memory = CEILING_MEMORY_SECONDS
            self._increase()
            return
        if signal == "congested":
            self._memory = min(CEILING_MEMORY_MAX_SECONDS, self._memory * 2)
        self._ceiling_at = now  # refused (or inconclusive): the limit stays as it is

    def _jumped(self, latency_ms: float) -> bool:
        base = self._base_ms
        return (
            base is not None
            and latency_ms > LATENCY_JUMP * base
            and latency_ms - base > LATENCY_JUMP_MIN_MS
        )

    def _learn_latency(self, latency_ms: float | None) -> None:
        if latency_ms is None:
            return
        if self._base_ms is None or latency_ms < self._base_ms:
            self._base_ms = latency_ms
        else:  # drifts up slowly, so that one fast call does not make every other one a jump
            self._base_ms += 0.05 * (latency_ms - self._base_ms)

    def _increase(self) -> None:
        step = 1.0 / self._limit
        if self._ceiling is not None:
            # Up to the ceiling, not past it: floor(limit) admits no call more.
            self._limit = max(
                self._limit, min(self._limit + step, self._ceiling + _BELOW_NEXT_CALL)
            )
            return
        self._limit = min(float(self.cap), self._limit + step)

    def _decrease(self, now: float, latency_ms: float | None) -> None:
        # The refused call was sent with at most the peak in flight: one fewer is the ceiling.
        ceiling = max(1.0, self._peak - 1.0)
        if self._ceiling is None or ceiling < self._ceiling:
            self._ceiling = ceiling
            self._memory = CEILING_MEMORY_SECONDS
        self._ceiling_at = now  # pushed back at (or below) the ceiling: the probe waits
        window = (latency_ms or 0.0) / 1000
        if now - self._last_decrease < window:
            return  # the same burst of refusals
        self._last_decrease = now
        self._limit = max(1.0, self._limit * DECREASE_FACTOR)
        self._peak = self._in_flight


class FunctionState(NamedTuple):
    """What an invocation leaves in the database for one function."""

    function: str
    concurrency_limit: float
    circuit_status: int | None = None
    circuit_error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "function": self.function,
            "concurrency_limit": round(self.concurrency_limit, 3),
            "circuit_status": self.circuit_status,
            "circuit_error": self.circuit_error,
        }


class FunctionLimits:
    """The adaptive limits of one invocation, by function."""

    def __init__(
        self, caps: Mapping[str, int], default_cap: int, start: Mapping[str, float]
    ) -> None:
        self._default_cap = default_cap
        self._start = dict(start)
        self._limits = {
            function: AdaptiveLimit(cap, self._start.get(function))
            for function, cap in caps.items()
        }
        self._lock = threading.Lock()

    def of(self, function: str) -> AdaptiveLimit:
        limit = self._limits.get(function)
        if limit is None:
            with self._lock:
                limit = self._limits.setdefault(
                    function, AdaptiveLimit(self._default_cap, self._start.get(function))
                )
        return limit

    def current(self) -> dict[str, float]:
        return {function: limit.limit for function, limit in self._limits.items()}

    def states(self, circuits: Iterable[tuple[str, int, str]] = ()) -> list[FunctionState]:
        opened = {function: (status, error) for function, status, error in circuits}
        return [
            FunctionState(function, limit.limit, *opened.get(function, (None, None)))
            for function, limit in sorted(self._limits.items())
        ]
