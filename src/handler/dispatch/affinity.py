"""One CPU for all of the process's threads while a batch runs (docs/adr/0014-one-cpu-per-batch.md).

Fifty dispatch threads take turns at one interpreter lock, several times per call (each socket
operation releases it). When those threads are spread over two or more CPUs, every hand-over
wakes a thread on another CPU: the lock's cache line moves, the waking costs a cross-CPU
interrupt, and the waiting threads wake more often for nothing. On one CPU the same hand-overs
are plain context switches. In the throughput benchmark (bench/throughput.py) that took a call's
CPU from about 1.05 ms to 0.84 ms, and the batch from about 75 % to 83 % of the concurrency bound.
Nothing of the worker runs in parallel anyway: pg8000 and httpx hold the lock but for their
socket calls.

Linux only (`os.sched_setaffinity`); elsewhere, with one CPU allowed, or when the kernel refuses,
nothing changes. Every thread's own mask is put back afterwards, and threads started during the
batch (they inherit the pinned mask from the thread that started them) get the mask the process
had, so nothing outside a batch (a subprocess, a test run, a command line's other work) is held
on one CPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_TASKS = "/proc/self/task"


def _threads() -> list[int]:
    """The kernel ids of the process's threads now (empty where /proc is not there)."""
    try:
        return [int(name) for name in os.listdir(_TASKS)]
    except OSError:
        return []


def _set(thread: int, cpus: set[int]) -> bool:
    try:
        os.sched_setaffinity(thread, cpus)
    except OSError:  # the thread ended meanwhile, or the kernel refuses
        return False
    return True


def chosen_cpu(allowed: set[int], pid: int) -> int:
    """One of the allowed CPUs, a different one for processes side by side (a command line's
    concurrent runs, a benchmark's contenders), the same one for every batch of a process."""
    cpus = sorted(allowed)
    return cpus[pid % len(cpus)]


class _Pin:
    """The process's one pin: the first batch to start pins, the last to end puts every mask
    back (a process may run batches side by side, as the tests' concurrent invocations do)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._cpu: int | None = None
        self._saved: dict[int, set[int]] = {}
        self._process_mask: set[int] = set()

    def acquire(self) -> int | None:
        with self._lock:
            if self._holders == 0:
                self._cpu = self._pin()  # counted only once it returned
            self._holders += 1
            return self._cpu

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._cpu is not None:
                for thread in _threads():
                    _set(thread, self._saved.get(thread, self._process_mask))
                self._cpu = None
                self._saved = {}

    def _pin(self) -> int | None:
        if not hasattr(os, "sched_setaffinity"):
            return None
        try:
            process_mask = os.sched_getaffinity(0)
        except OSError:
            return None
        if len(process_mask) < 2:
            return None
        cpu = chosen_cpu(process_mask, os.getpid())
        saved: dict[int, set[int]] = {}
        for thread in _threads():
            with contextlib.suppress(OSError):
                saved[thread] = os.sched_getaffinity(thread)
        pinned = {thread for thread in saved if _set(thread, {cpu})}
        if threading.get_native_id() not in pinned:
            # The calling thread kept its mask: the threads it starts would not be pinned.
            for thread in pinned:
                _set(thread, saved[thread])
            return None
        self._saved = saved
        self._process_mask = process_mask
        return cpu


_PIN = _Pin()


@contextlib.contextmanager
def one_cpu() -> Iterator[int | None]:
    """Holds every thread of the process on one CPU until the block ends (the last of several
    overlapping blocks); yields that CPU, or None when nothing was changed."""
    cpu = _PIN.acquire()
    try:
        yield cpu
    finally:
        _PIN.release()
