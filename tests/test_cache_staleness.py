"""A cached result is reused only when everything that defines it is unchanged: a task's attribute,
a model class's code (nested modules included), a helper function in its module, the code as
loaded; what cannot be fingerprinted is never reused. Each case compares with a fresh run."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from influencer.app.commands.explain import explain
from influencer.app.settings.explain import ExplainConfig

TESTS = Path(__file__).parent

# A user's job module: a model with a nested block, a module-level helper, a task with a
# hyperparameter held as an attribute (settings() not overridden).
MODULE = textwrap.dedent(
    """
    import os

    import torch
    from torch import nn

    from influencer import ClassificationTask


    def helper(x):
        return {helper}


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 4)

        def forward(self, x):
            return {block}


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(helper(self.block(x)))


    class SmoothedTask(ClassificationTask):
        def __init__(self, smoothing):
            super().__init__(weight_decay=0.05)
            self.smoothing = smoothing
            self.extra = {extra}

        def output_loss(self, outputs, batch):
            return torch.nn.functional.cross_entropy(
                outputs, batch[1], reduction="none", label_smoothing=self.smoothing
            )


    def build():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (40,), generator=gen)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Net().double()
        task = SmoothedTask(float(os.environ.get("STALE_SMOOTHING", "0.0")))
        return task, model, (x[:30], y[:30]), (x[30:], y[30:])
    """
)
ORIGINAL = {"helper": "torch.tanh(x)", "block": "self.lin(x)", "extra": "None"}


def write(folder: Path, name: str, **changes: str) -> None:
    (folder / f"{name}.py").write_text(MODULE.format(**{**ORIGINAL, **changes}))


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A fresh module name in ``tmp_path/src`` on sys.path, without bytecode caches."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    src = tmp_path / "src"
    src.mkdir()
    monkeypatch.syspath_prepend(str(src))
    name = f"stale_{uuid.uuid4().hex[:8]}"
    write(src, name)
    yield src, name
    sys.modules.pop(name, None)


def run(out: Path, name: str):
    # The head only ("out"): its Hessian is positive definite whatever the block computes.
    config = ExplainConfig(
        task=f"{name}:build", out=str(out), estimator="exact", params=("out",), test_ids=(0, 1, 2),
        top_k=3, batch_size=16, progress=False,
    )  # fmt: skip
    return explain(config, console=False)


def last_log(out: Path) -> str:
    return (out / "explain.log").read_text().split("influencer explain: run directory")[-1]


def reload(name: str) -> None:
    importlib.invalidate_caches()
    importlib.reload(sys.modules[name])


def test_a_changed_task_attribute_is_recomputed(tmp_path, module, monkeypatch):
    _, name = module
    first = run(tmp_path / "run", name)
    monkeypatch.setenv("STALE_SMOOTHING", "0.2")
    second = run(tmp_path / "run", name)
    log = last_log(tmp_path / "run")
    assert "gradients: inputs changed (settings: task.attributes.smoothing 0.0 -> 0.2)" in log
    assert "reused from the cache" not in log
    fresh = run(tmp_path / "fresh", name)
    np.testing.assert_array_equal(second.scores, fresh.scores)
    assert np.abs(second.scores - first.scores).max() > 1e-3


@pytest.mark.parametrize(
    "edit",
    [
        {"block": "2.0 * self.lin(x)"},  # forward() of a nested module class
        {"helper": "torch.sigmoid(x)"},  # a function of the module that forward() calls
    ],
)
def test_edited_model_code_is_recomputed(tmp_path, module, edit):
    src, name = module
    first = run(tmp_path / "run", name)
    write(src, name, **edit)
    reload(name)
    second = run(tmp_path / "run", name)
    log = last_log(tmp_path / "run")
    assert "directions: inputs changed (model code" in log and "gradients: inputs changed (model code" in log
    assert "reused from the cache" not in log
    fresh = run(tmp_path / "fresh", name)
    np.testing.assert_array_equal(second.scores, fresh.scores)
    assert second.accuracy == fresh.accuracy
    assert np.abs(second.scores - first.scores).max() > 1e-3


def test_a_file_edited_but_not_reloaded_does_not_poison_the_cache(tmp_path, module):
    """Results computed by the old code while the file already holds the new one are keyed by the
    code as loaded too, so a process that runs the new code never reuses them."""
    src, name = module
    run(tmp_path / "run", name)
    write(src, name, block="2.0 * self.lin(x)")  # on disk only: this process still runs the old code
    stale = run(tmp_path / "run", name)
    reload(name)
    current = run(tmp_path / "run", name)
    assert "reused from the cache" not in last_log(tmp_path / "run")
    fresh = run(tmp_path / "fresh", name)
    np.testing.assert_array_equal(current.scores, fresh.scores)
    assert np.abs(current.scores - stale.scores).max() > 1e-3


def test_what_cannot_be_fingerprinted_is_never_reused(tmp_path, module):
    src, name = module
    write(src, name, extra="object()")  # a value whose repr is only its address
    run(tmp_path / "run", name)
    run(tmp_path / "run", name)
    log = last_log(tmp_path / "run")
    assert (
        "not reusing cached gradients or solves: the cache cannot tell whether task attribute 'extra'" in log
    )
    assert "reused from the cache" not in log


def test_an_edited_forward_between_two_real_runs_of_the_command(tmp_path):
    """End to end: the command, a model module edited between two processes, a fresh run to compare."""
    src = tmp_path / "src"
    src.mkdir()
    write(src, "user_model")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
    }
    server = subprocess.Popen(
        [sys.executable, str(TESTS / "forked_cli.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    args = ["explain", "--quiet", "--task", "user_model:build", "--estimator", "exact", "--params", "out"]
    args += ["--test-ids", "0,1,2", "--batch-size", "16"]

    def command(out: str) -> None:
        server.stdin.write(json.dumps({"cwd": str(tmp_path), "args": [*args, "--out", out]}) + "\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "exit 0"

    try:
        command("run")
        first = np.load(tmp_path / "run" / "scores.npy")
        write(src, "user_model", block="self.lin(x).relu()")
        command("run")
        command("fresh")
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    log = last_log(tmp_path / "run")
    assert "gradients: inputs changed (model code" in log and "reused from the cache" not in log
    second = np.load(tmp_path / "run" / "scores.npy")
    np.testing.assert_array_equal(second, np.load(tmp_path / "fresh" / "scores.npy"))
    assert np.abs(second - first).max() > 1e-3
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("run", "fresh")]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
