"""The batch's one CPU (handler.dispatch.affinity), on this machine's real kernel: no mock of
sched_setaffinity. Linux with two CPUs or more allowed, or skipped (what the module does
elsewhere is nothing, tested below with one CPU allowed)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from handler.dispatch.affinity import chosen_cpu, one_cpu

T = TypeVar("T")

needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux with two CPUs or more allowed",
)


def masks() -> dict[int, set[int]]:
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}


class Idle:
    """A thread that waits until told to end, and can report its own mask."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        self._ready.set()
        self._stop.wait()

    @property
    def tid(self) -> int:
        assert self.thread.native_id is not None
        return self.thread.native_id

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


@pytest.fixture
def idle() -> Iterator[Callable[[], Idle]]:
    made: list[Idle] = []

    def _make() -> Idle:
        made.append(Idle())
        return made[-1]

    yield _make
    for thread in made:
        thread.stop()


def in_thread(fn: Callable[[], T]) -> T:
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(fn()))
    thread.start()
    thread.join()
    return results[0]


def test_the_cpu_is_one_of_those_allowed_and_differs_between_neighbouring_processes() -> None:
    assert chosen_cpu({3, 1, 7}, 0) == 1
    assert chosen_cpu({3, 1, 7}, 1) == 3
    assert chosen_cpu({3, 1, 7}, 2) == 7
    assert chosen_cpu({5}, 12345) == 5


@needs_two_cpus
def test_every_thread_is_on_one_cpu_inside_and_gets_its_own_mask_back_after(
    idle: Callable[[], Idle],
) -> None:
    # Given a thread with the process's mask and one with a mask of its own
    process_mask = os.sched_getaffinity(0)
    before = idle()
    own = idle()
    own_mask = set(sorted(process_mask)[-1:])
    os.sched_setaffinity(own.tid, own_mask)
    # When a block holds the process on one CPU, and a thread starts inside it
    with one_cpu() as cpu:
        inside = idle()
        during = masks()
        # Then every thread, the new one too, is on that CPU only
        assert cpu in process_mask
        assert {frozenset(mask) for mask in during.values()} == {frozenset({cpu})}
        assert during[inside.tid] == {cpu}
    # And afterwards each has its mask again; the one started inside gets the process's
    after = masks()
    assert after[threading.get_native_id()] == process_mask
    assert after[before.tid] == process_mask
    assert after[own.tid] == own_mask
    assert after[inside.tid] == process_mask


@needs_two_cpus
def test_overlapping_blocks_keep_the_pin_until_the_last_one_ends() -> None:
    # Given two batches of one process that overlap (the first ends while the second runs)
    process_mask = os.sched_getaffinity(0)
    first = one_cpu()
    second = one_cpu()
    cpu = first.__enter__()
    assert second.__enter__() == cpu
    # When the first ends, the second is still on one CPU
    first.__exit__(None, None, None)
    assert os.sched_getaffinity(0) == {cpu}
    # And when the second ends too, the process has its mask again (not the pinned one the
    # second would have seen, had it saved masks of its own)
    second.__exit__(None, None, None)
    assert os.sched_getaffinity(0) == process_mask
    assert {frozenset(mask) for mask in masks().values()} == {frozenset(process_mask)}


@needs_two_cpus
def test_a_thread_allowed_one_cpu_changes_nothing(idle: Callable[[], Idle]) -> None:
    other = idle()
    process_mask = os.sched_getaffinity(0)

    def pin_from_a_thread_on_one_cpu() -> tuple[int | None, set[int]]:
        os.sched_setaffinity(0, {max(process_mask)})
        with one_cpu() as cpu:
            return cpu, os.sched_getaffinity(other.tid)

    cpu, other_mask = in_thread(pin_from_a_thread_on_one_cpu)
    assert cpu is None
    assert other_mask == process_mask
