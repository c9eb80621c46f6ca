"""The adaptive limit of calls in flight (handler.dispatch.concurrency), driven by a simulated
function and a simulated clock: nothing here waits for real time."""

from __future__ import annotations

import itertools
import math

from handler.dispatch.concurrency import AdaptiveLimit, FunctionLimits, signal_of
from handler.dispatch.outcomes import Outcome

OK = Outcome("completed", 200)
TOO_MANY = Outcome("rate_limited", 429, "Rate limited by f")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    limit: AdaptiveLimit,
    clock: Clock,
    *,
    seconds: float,
    pushes_back_above: int | None,
    limits_seen: list[tuple[float, float]] | None = None,
) -> list[tuple[float, int, bool]]:
    """Calls of 50 ms each, as many in flight as the limit allows, to a function that answers
    429 to the calls beyond `pushes_back_above` in flight. Returns, per call, when it ended, how
    many calls were in flight with it, and whether it was refused; `limits_seen` gets the limit
    after each round."""
    calls = []
    end = clock.now + seconds
    while clock.now < end:
        slots = []
        while slot := limit.try_acquire():
            slots.append(slot)
        clock.now += 0.05
        for n, slot in enumerate(slots):
            refused = pushes_back_above is not None and n >= pushes_back_above
            limit.release(TOO_MANY if refused else OK, 50.0, probe=slot == "probe")
            calls.append((clock.now, len(slots), refused))
        if limits_seen is not None:
            limits_seen.append((clock.now, limit.limit))
    return calls


def test_a_function_that_refuses_more_than_8_in_flight_settles_the_limit_at_8() -> None:
    # Given a function that answers 429 to a ninth call in flight, and a limit starting at 50
    clock = Clock()
    limit = AdaptiveLimit(50, clock=clock)
    # When calls run for 40 s
    limits_seen: list[tuple[float, float]] = []
    calls = simulate(limit, clock, seconds=40, pushes_back_above=8, limits_seen=limits_seen)
    # Then from the first second on, fewer than 5 % of the calls are refused
    after_first = [c for c in calls if c[0] >= 1.0]
    assert sum(refused for _, _, refused in after_first) / len(after_first) < 0.05
    # and from 10 s on the limit stays at 8 calls: only the probes of a ninth call go past it,
    # one call each, ever less often (5 s after the ceiling is found, then 10 s, then 20 s)
    assert max(math.floor(value) for t, value in limits_seen if t >= 10.0) == 8
    settled = [c for c in calls if c[0] >= 10.0]
    refused = [t for t, _, r in settled if r]
    assert len(refused) <= 2, refused
    assert all(in_flight <= 9 for _, in_flight, _ in settled)


def test_a_refused_probe_leaves_the_limit_and_doubles_the_wait_for_the_next() -> None:
    clock = Clock()
    limit = AdaptiveLimit(50, clock=clock)
    limits_seen: list[tuple[float, float]] = []
    calls = simulate(limit, clock, seconds=60, pushes_back_above=8, limits_seen=limits_seen)
    # The probes: the rounds with a ninth call in flight, once the ceiling of 8 is found
    found = next(t for t, value in limits_seen if math.floor(value) == 8)
    probes = sorted({t for t, in_flight, _ in calls if in_flight == 9 and t > found})
    gaps = [round(b - a) for a, b in itertools.pairwise(probes)]
    assert gaps == [10, 20], probes  # 5 s after the ceiling, then 10 s, then 20 s
    # and none of them moved the limit off 8 calls
    assert {math.floor(value) for t, value in limits_seen if t > probes[0]} == {8}


def test_when_the_function_stops_refusing_the_limit_climbs_back_to_its_cap() -> None:
    clock = Clock()
    limit = AdaptiveLimit(50, clock=clock)
    simulate(limit, clock, seconds=10, pushes_back_above=8)
    assert limit.limit < 10
    simulate(limit, clock, seconds=30, pushes_back_above=None)
    assert limit.limit == 50


def test_a_burst_of_refusals_cuts_the_limit_once_per_calls_latency() -> None:
    clock = Clock()
    limit = AdaptiveLimit(40, clock=clock)
    for _ in range(20):
        assert limit.try_acquire()
    for _ in range(20):
        limit.release(TOO_MANY, 200.0)
    assert limit.limit == 28.0  # 40 x 0.7, once
    clock.now += 0.2
    assert limit.try_acquire()
    limit.release(TOO_MANY, 200.0)
    assert limit.limit == 28.0 * 0.7


def test_the_limit_is_never_below_one_nor_above_its_cap() -> None:
    clock = Clock()
    limit = AdaptiveLimit(3, start=10, clock=clock)
    assert limit.limit == 3
    for _ in range(50):
        clock.now += 1
        assert limit.try_acquire()
        limit.release(TOO_MANY, 10.0)
    assert limit.limit == 1.0
    assert limit.try_acquire()  # one call is always allowed
    assert not limit.try_acquire()


def test_a_success_much_slower_than_usual_counts_as_congestion() -> None:
    clock = Clock()
    limit = AdaptiveLimit(10, clock=clock)
    for _ in range(5):
        assert limit.try_acquire()
        limit.release(OK, 40.0)
    assert limit.limit == 10
    assert limit.try_acquire()
    limit.release(OK, 500.0)
    assert limit.limit == 7.0


def test_timeouts_and_503s_are_congestion_other_failures_are_not() -> None:
    assert signal_of(Outcome("failed", None, "x", timed_out=True)) == "congested"
    assert signal_of(Outcome("failed", 503, "x")) == "congested"
    assert signal_of(Outcome("failed", 500, "x")) == "neutral"
    assert signal_of(Outcome("failed", None, "refused")) == "neutral"
    assert signal_of(Outcome("dead", 422, "x")) == "neutral"


def test_an_invocation_starts_from_the_limits_the_last_one_left_within_the_cap() -> None:
    limits = FunctionLimits({"slack": 5}, default_cap=50, start={"slack": 3.5, "mail": 80})
    assert limits.of("slack").limit == 3.5
    assert limits.of("mail").limit == 50  # clamped to its cap
    assert limits.of("other").limit == 50
    assert [s.function for s in limits.states()] == ["mail", "other", "slack"]
