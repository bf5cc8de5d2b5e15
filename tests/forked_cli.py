"""Runs ``influencer`` commands sent on stdin, each in a child process forked from this interpreter
(which has imported everything once): one JSON line ``{"cwd": ..., "args": [...]}`` per command,
answered by one line ``exit CODE`` (the command's own output goes to stderr). For tests that run
the real command several times with changes between the runs (e.g. an edited source file): each
child imports the user's code afresh.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import influencer.app.commands.cli
import influencer.app.commands.explain  # noqa: F401
from influencer.app.entry import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.chdir(request["cwd"])
            os.dup2(2, 1)  # this process's stdout carries the answers
            sys.argv = ["influencer", *request["args"]]
            try:
                main()
            except SystemExit as exc:
                sys.stdout.flush()
                os._exit(exc.code if isinstance(exc.code, int) else 1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
