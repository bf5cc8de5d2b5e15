"""Fault injection for test_crash_resume.py: ``influencer explain`` killed with SIGKILL at chosen
points, each in a child process forked from this interpreter (which imports everything once and
computes nothing itself, so each child starts in about the time the job takes).

    python kill_points.py DIR POINT [DIR POINT ...] -- explain ARGS...

Each child works in its own directory DIR and is killed at POINT:

* ``replace:GLOB:N:before`` / ``replace:GLOB:N:after``: around the N-th ``os.replace`` onto a file
  whose name matches GLOB (every atomic write and every move of an output ends in one);
* ``write:NAME``: half-way through writing the staged output file NAME.

Prints one line per child, ``DIR killed`` or ``DIR exit CODE`` (a point never reached).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
from pathlib import Path

import torch

import influencer.app.commands.cli
import influencer.app.commands.explain  # noqa: F401
import robust_jobs
from influencer.app.entry import main
from influencer.app.run import store


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, rest = point.partition(":")
    if kind == "replace":
        pattern, n, when = rest.split(":")
        real, seen = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            hit = fnmatch.fnmatch(os.path.basename(os.fspath(dst)), pattern)
            seen[0] += hit
            if hit and seen[0] == int(n) and when == "before":
                die()
            real(src, dst, *args, **kwargs)
            if hit and seen[0] == int(n) and when == "after":
                die()

        os.replace = replace
    elif kind == "write":
        real_write = store.write_durable

        def write(path: Path, data: bytes) -> None:
            if path.name == rest and path.parent.name == ".staging":
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
            real_write(path, data)

        store.write_durable = write
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def run(directory: str, point: str, args: list[str]) -> str:
    pid = os.fork()
    if pid == 0:  # the child: run the command until the kill point
        os.chdir(directory)
        install(point)
        sys.argv = ["influencer", *args]
        try:
            main()
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return f"{directory} killed"
    return f"{directory} exit {os.waitstatus_to_exitcode(status)}"


if __name__ == "__main__":
    # The job's model is fitted here once, on one thread (no thread pool for the children to inherit).
    torch.set_num_threads(1)
    robust_jobs.build()
    cut = sys.argv.index("--")
    pairs, command = sys.argv[1:cut], sys.argv[cut + 1 :]
    for directory, point in zip(pairs[::2], pairs[1::2], strict=True):
        print(run(directory, point, command), flush=True)
