"""Background threads that run torch operations beside the caller without slowing it down.

PyTorch's CPU operations run on an OpenMP team of ``torch.get_num_threads()`` threads, one team
per calling thread. A second thread that runs a parallel operation gets a team of its own, and
from then on, while that thread lives, the process has more OpenMP threads than cores: GNU OpenMP
then spins only briefly before a waiting thread sleeps, so every small operation of the caller's
training loop pays a wake-up. On a 2-core machine a small CNN's epoch went from 35 ms to 65 ms
after one tensor sum in a helper thread (timed by hand), and a training run collecting a store
took 2.1 times a plain one (``benchmarks/bench_training_store.py --threads 2``).

So the library's helper threads (file writers, chunk readers) run their torch operations on one
thread: they copy, convert and hash, which a second core does at memory speed anyway.

Even on one thread, a helper that works while the caller's team fills every core takes a core
from one of the team's threads, and each of the caller's parallel operations then waits for the
thread it displaced: a 2-thread training loop on 2 cores lost about the helper's CPU time (a few
steps 4-5 ms slower each) while a gradient store's files were written. :class:`SpareCore` runs
the caller on one thread fewer while its helper works: such a small model's step is about 0.4 ms
slower on one thread than on two, far less than a displaced thread costs it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_LOCK = threading.Lock()


def _one_thread() -> None:
    torch.set_num_threads(1)
    # read once, so this thread's own setting is fixed now: a thread takes the process-wide number
    # at its first parallel operation, and the caller restores that number below
    torch.get_num_threads()


def background_pool(name: str) -> ThreadPoolExecutor:
    """One worker thread whose torch operations run single-threaded; the caller's number of
    threads, and that of threads started later, are left as they were."""
    with _LOCK:
        caller = torch.get_num_threads()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_one_thread)
        try:
            pool.submit(lambda: None).result()  # starts the thread: its initializer has run
        finally:
            # torch.set_num_threads sets the process-wide number too (the one new threads take):
            # put back the caller's, which is that number unless the caller set its own
            torch.set_num_threads(caller)
    return pool


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class SpareCore:
    """The caller's torch threads one fewer while a helper thread of its works, when they fill every
    usable core (see the module docstring); called from the caller's thread only.

    :meth:`update` with ``busy`` lowers ``torch.get_num_threads()`` from ``n`` to ``n - 1`` (once,
    ``n > 1`` and ``n >= usable_cores()``), without it puts ``n`` back; :meth:`restore` puts it back
    now. A number the caller set in between is its own and is kept.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._set: tuple[int, int] | None = None  # (the caller's number, the one set)

    def update(self, busy: bool) -> None:
        if not busy:
            self.restore()
        elif self._set is None and self.enabled:
            n = torch.get_num_threads()
            if n > 1 and n >= usable_cores():
                torch.set_num_threads(n - 1)
                self._set = (n, n - 1)

    def restore(self) -> None:
        if self._set is not None:
            before, lowered = self._set
            self._set = None
            if torch.get_num_threads() == lowered:
                torch.set_num_threads(before)
