"""Two runs on one directory: exactly one proceeds, every other one is told in one line who holds
it, and neither reads or writes the other's files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from influencer.app.run.store import RunStore, StoreError

TESTS = Path(__file__).parent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the racing processes are forked (POSIX)")
def test_racing_processes_on_a_new_directory(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "ROBUST_JOBS_SLEEP": "1.5",  # the winner holds the directory this long while building its job
    }
    args = ["explain", "--quiet", "--out", "run", "--task", "robust_jobs:slow_build", "--test-ids", "0,1"]
    done = subprocess.run(
        [sys.executable, str(TESTS / "race.py"), "4", "--", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    codes = dict(line.split() for line in done.stdout.splitlines() if re.fullmatch(r"\d+ -?\d+", line))
    assert sorted(codes.values()) == ["0", "1", "1", "1"], done.stdout
    winner = next(i for i, code in codes.items() if code == "0")
    for i, code in codes.items():
        err = (tmp_path / f"child{i}.err").read_text()
        if code == "1":
            assert len(err.strip().splitlines()) == 1, err
            assert re.fullmatch(
                r"Error: another influencer run( \(process \d+\))? is using run; wait for it to finish or "
                r"choose another output directory\n",
                err,
            ), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [t["test_id"] for t in summary["tests"]] == [0, 1]
    assert (
        "Report: run/report.html" in done.stdout
        and "Traceback" not in (tmp_path / f"child{winner}.err").read_text()
    )
    with RunStore(tmp_path / "run"):  # released by the winner
        pass


def _race(root: Path, openers: int = 6) -> tuple[int, int, list[str]]:
    """``openers`` threads open ``root`` at once; the one that gets it holds it until all have
    tried. Returns (how many got it, how many were told another run holds it, other messages)."""
    start, tried = threading.Barrier(openers), threading.Barrier(openers)
    won, refused, other = [], [], []

    def open_store() -> None:
        start.wait()
        try:
            store = RunStore(root)
        except StoreError as exc:
            (refused if "another influencer run" in str(exc) else other).append(str(exc))
            tried.wait()
            return
        won.append(store)
        tried.wait()
        store.close()

    threads = [threading.Thread(target=open_store) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(won), len(refused), other


def test_the_lock_is_exclusive_under_racing_threads(tmp_path):
    """30 races of 6 openers on a new directory: each time exactly one holds it, and the others
    are told so (never "not an influencer run directory", as a half-created one once looked)."""
    for round_ in range(30):
        assert _race(tmp_path / f"run{round_}") == (1, 5, []), round_
    assert _race(tmp_path / "run0") == (1, 5, [])  # and on an existing run directory
