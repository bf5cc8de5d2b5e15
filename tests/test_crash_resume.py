"""A run killed with SIGKILL at any point leaves a directory a reader can trust, and the next run
resumes from it to outputs byte-identical to an uninterrupted run's.

The killed runs are real processes (forked by ``kill_points.py`` from one interpreter that has
imported everything, so each costs only the job's own time) killed by the operating system, with
no chance to clean up. The directory already holds an earlier run with other settings, whose
outputs must never be seen mixed with the new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from influencer.app.commands.cli import cli

TESTS = Path(__file__).parent
OUTPUTS = (
    "scores.npy",
    "test_ids.npy",
    "config.json",
    "influence_vs_distance.png",
    "report.html",
    "summary.json",
)
EARLIER = ["--task", "robust_jobs:build", "--test-ids", "0,1", "--top-k", "3"]
# Other test examples and gradient chunks: the resumed run has every kind of entry to write (the
# directions are solved in groups by test id and reused only whole, so any solver resumes to the
# same bytes; the default here is Exact).
NEW = ["--task", "robust_jobs:build", "--test-ids", "2,5,7", "--top-k", "4", "--batch-size", "16"]
KILL_POINTS = {
    "first gradient chunk written": "replace:c000000.npy:1:after",
    "second gradient chunk half written": "replace:c000001.npy:1:before",
    "second direction written, not yet listed": "replace:t*.npy:2:after",
    "report half staged": "write:report.html",
    "journal written": "replace:.commit.json:1:after",
    "outputs half moved": "replace:config.json:1:after",
    "all moved but the summary": "replace:summary.json:1:before",
}

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill points fork (POSIX)")


def run_here(directory: Path, args: list[str], monkeypatch) -> None:
    monkeypatch.chdir(directory)
    result = CliRunner().invoke(cli, ["explain", "--quiet", "--out", "run", *args])
    assert result.exit_code == 0, result.output


def comparable(run: Path) -> dict[str, bytes]:
    """The outputs' bytes; the summary without its timings (the one thing that differs per run)."""
    out = {name: (run / name).read_bytes() for name in OUTPUTS if (run / name).exists()}
    if "summary.json" in out:
        summary = json.loads(out["summary.json"])
        summary.pop("timings_s")
        out["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return out


def consistent(run: Path) -> bool:
    """What a reader sees is one run's outputs: a summary whose checksums match every file it lists
    (or no summary at all, while the next run's outputs are moved into place)."""
    if not (run / "summary.json").exists():
        return True
    listed = json.loads((run / "summary.json").read_text())["sha256"]
    return all(
        hashlib.sha256((run / name).read_bytes()).hexdigest() == digest for name, digest in listed.items()
    )


@pytest.fixture
def one_thread_here():
    """The in-process runs compute with the one thread the killed processes use (the same bytes are
    promised on the same machine with the same settings; a thread count changes summation order)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_runs_leave_a_trustworthy_directory_and_resume_byte_identically(
    tmp_path, monkeypatch, one_thread_here
):
    (tmp_path / "earlier").mkdir()
    run_here(tmp_path / "earlier", EARLIER, monkeypatch)
    earlier = comparable(tmp_path / "earlier" / "run")
    (tmp_path / "fresh").mkdir()
    run_here(tmp_path / "fresh", NEW, monkeypatch)
    expected = comparable(tmp_path / "fresh" / "run")
    assert (
        expected["scores.npy"] != earlier["scores.npy"] and expected["report.html"] != earlier["report.html"]
    )

    cases = {}
    for i, name in enumerate(KILL_POINTS):
        cases[name] = tmp_path / f"case{i}"
        shutil.copytree(tmp_path / "earlier", cases[name])
    pairs = [str(x) for name, point in KILL_POINTS.items() for x in (cases[name], point)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        str(TESTS / "kill_points.py"),
        *pairs,
        "--",
        "explain",
        "--quiet",
        "--out",
        "run",
    ]
    done = subprocess.run([*command, *NEW], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [w for name in KILL_POINTS for w in (str(cases[name]), "killed")], (
        done.stdout
    )

    for name, directory in cases.items():
        run = directory / "run"
        assert consistent(run), name
        if name != "all moved but the summary" and name != "outputs half moved":
            assert comparable(run) == earlier, name  # the earlier run, untouched until the commit
        run_here(directory, NEW, monkeypatch)
        assert comparable(run) == expected, name
        assert consistent(run) and not (run / ".commit.json").exists() and not (run / ".staging").exists()
        leftovers = [p.name for p in run.rglob("*.tmp")]
        assert not leftovers, (name, leftovers)

    # The resumed runs reused what the killed ones had finished.
    log = (
        (cases["second direction written, not yet listed"] / "run" / "explain.log")
        .read_text()
        .split("influencer explain:")[-1]
    )
    # an interrupted group of solves is solved again whole: the same group, so the same bytes
    assert "test directions: solved 3 with" in log and "directions: 1 of 3 reused" not in log
    log = (cases["second gradient chunk half written"] / "run" / "explain.log").read_text()
    assert "training gradients: 1 of 3 chunks reused from the cache" in log.split("influencer explain:")[-1]
