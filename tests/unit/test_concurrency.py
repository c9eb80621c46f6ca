"""The adaptive limit of calls in flight (handler.dispatch.concurrency), driven by a simulated
function and a simulated clock: nothing here waits for real time."""

from __future__ import annotations

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
    limit: AdaptiveLimit, clock: Clock, *, seconds: float, pushes_back_above: int | None
) -> list[tuple[float, bool]]:
    """Calls of 50 ms each, as many in flight as the limit allows, to a function that answers
    429 to the calls beyond `pushes_back_above` in flight. Returns (limit, refused) per call."""
    calls = []
    end = clock.now + seconds
    while clock.now < end:
        started = 0
        while limit.try_acquire():
            started += 1
        clock.now += 0.05
        for n in range(started):
            refused = pushes_back_above is not None and n >= pushes_back_above
            limit.release(TOO_MANY if refused else OK, 50.0)
            calls.append((limit.limit, refused))
    return calls


def test_a_function_that_refuses_more_than_8_in_flight_settles_the_limit_at_8_or_less() -> None:
    clock = Clock()
    limit = AdaptiveLimit(50, clock=clock)
    calls = simulate(limit, clock, seconds=10, pushes_back_above=8)
    last = calls[len(calls) // 2 :]  # the last 5 seconds
    refused = sum(1 for _, r in last if r) / len(last)
    average = sum(min(lim, 50) for lim, _ in last) / len(last)
    assert refused < 0.05, refused
    assert average <= 8.5, average


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
