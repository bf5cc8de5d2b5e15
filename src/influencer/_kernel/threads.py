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
"""

from __future__ import annotations

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
