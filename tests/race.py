"""Concurrency for test_concurrent_runs.py: ``influencer explain`` in N processes started at once
(forked from this interpreter, which has imported everything), all on the same run directory.

    python race.py N -- explain ARGS...

Child i writes its stderr to ``child<i>.err`` in the current directory; prints ``<i> <exit code>``
per child.
"""

from __future__ import annotations

import os
import sys

import torch

import influencer.app.commands.cli
import influencer.app.commands.explain  # noqa: F401
import robust_jobs
from influencer.app.entry import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    robust_jobs.build()  # the model fitted once, before the children exist
    cut = sys.argv.index("--")
    n, command = int(sys.argv[1]), sys.argv[cut + 1 :]
    read, write = os.pipe()
    children = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(write)
            os.read(read, 1)  # wait until every child exists, then all start together
            err = os.open(f"child{i}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(err, 2)
            sys.argv = ["influencer", *command]
            try:
                main()
            except SystemExit as exc:
                sys.stderr.flush()
                os._exit(exc.code if isinstance(exc.code, int) else 1)
            os._exit(0)
        children.append(pid)
    os.close(read)
    os.write(write, b"x" * n)  # the starting gun
    os.close(write)
    for i, pid in enumerate(children):
        _, status = os.waitpid(pid, 0)
        print(i, os.waitstatus_to_exitcode(status), flush=True)
