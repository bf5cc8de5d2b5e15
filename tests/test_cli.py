"""The `influencer` command: the README's job end to end, TOML + flag overrides, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from explain_support import TASK_MODULE
from influencer.app.commands.cli import cli

TINY_DIGITS = ["--train-size", "120", "--epochs", "1", "--num-test", "2", "--top-k", "3", "--no-progress"]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "influencer"
    if script.exists():
        return [str(script)]
    found = shutil.which("influencer")
    return [found] if found else [sys.executable, "-m", "influencer.app.commands.cli"]


def test_explain_end_to_end_on_the_digits_cnn(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*_command(), "explain", "--out", str(out), *TINY_DIGITS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Report: {out / 'report.html'}" in proc.stdout
    log = proc.stderr
    for line in (
        "training SmallCNN on 120 digit images",
        "test accuracy:",
        "Most helpful IDs:",
        "Most harmful IDs:",
    ):
        assert line in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == "SmallCNN on scikit-learn digits" and summary["n_train"] == 120
    assert summary["parameters"] == ["head.weight", "head.bias"]
    assert len(summary["tests"]) == 2 and all(len(t["helpful_ids"]) == 3 for t in summary["tests"])
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 2 * (1 + 2 * 3) + 1
    assert (out / "explain.log").read_text().count("Most helpful IDs:") == 2

    # The same command again: the trained model, the gradients and the solves all come from the cache.
    again = CliRunner().invoke(cli, ["explain", "--out", str(out), *TINY_DIGITS, "--quiet"])
    assert again.exit_code == 0, again.output
    second = (out / "explain.log").read_text().split("influencer explain: run directory")[-1]
    assert "loaded the trained SmallCNN from the cache" in second and "training SmallCNN" not in second
    assert "training gradients: 1 of 1 chunks reused" in second and "test directions: 2 of 2 reused" in second
    assert json.loads((out / "summary.json").read_text())["tests"] == summary["tests"]


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_job.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_job:build"


def test_toml_config_with_flag_overrides(tmp_path, task_module):
    config = tmp_path / "job.toml"
    config.write_text(
        f'task = "{task_module}"\nout = "{tmp_path / "run"}"\ntop_k = 2\n'
        'estimator = "cg"\ndamping = 0.01\ntest_ids = [1, 2]\n'
        "progress = false\n\n[estimator_options]\ntol = 1e-7\n"
    )
    result = CliRunner().invoke(
        cli, ["explain", "--config", str(config), "--top-k", "4", "-o", "max_iter=300", "--test-ids", "3,1"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [t["test_id"] for t in summary["tests"]] == [3, 1]  # flag beats file
    assert all(len(t["harmful_ids"]) == 4 for t in summary["tests"])
    assert summary["estimator"] == {
        "estimator": "cg",
        "damping": 0.01,
        "tol": 1e-7,
        "max_iter": 300,
        "on_unconverged": "raise",
        "block": True,
    }
    assert summary["job"] == task_module


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{tmp}/bad.toml"], "unknown setting 'dampng' (did you mean 'damping'?)"),
        (["--estimator", "cgg"], "unknown estimator 'cgg'"),
        (["--estimator", "cg", "-o", "depth=3"], "estimator 'cg' has no option 'depth'"),
        (["-o", "depth=3"], "-o depth=... sets an option of a chosen estimator: give --estimator too"),
        (["--task", "no_such_module:build"], "no module named 'no_such_module'"),
        (["--test-ids", "1,x"], "expected comma-separated integers"),
        (["--test-ids", "999"], "out of range: the test set has 20"),
        (["--curvature", "fisher"], "'fisher' is not one of 'hessian', 'gauss_newton'"),
        (["--head", "clasifier"], "the model has no module named 'clasifier'"),
        (["--epochs", "3"], "--epochs sets the training of the built-in digits job; a --task job trains"),
        (["--train-size", "50"], "--train-size sets the training of the built-in digits job"),
        (["--damping", "-1"], "damping must be a finite number >= 0, got -1.0 (--damping)"),
        (["--preconditioner", "fisher"], "--preconditioner applies to scores from a gradient store"),
    ],
)
def test_clear_errors(tmp_path, task_module, args, message):
    (tmp_path / "bad.toml").write_text("dampng = 0.1\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["explain", "--task", task_module, "--out", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(cli, [*base, *args])
    # click's runner catches every exception: one that escaped the command (a traceback for the
    # user) is result.exception itself; a clear error is a SystemExit with one "Error:" line.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    # Errors of the command itself are that one line; click's usage errors add only its usage lines.
    others = [line for line in result.output.splitlines() if line and line not in errors]
    assert all(line.startswith(("Usage:", "Try ")) for line in others), result.output


def test_cuda_when_there_is_none(tmp_path, task_module):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(
        cli, ["explain", "--task", task_module, "--out", str(tmp_path / "r"), "--device", "cuda"]
    )
    assert (
        result.exit_code == 1
        and "torch sees no CUDA GPU" in result.output
        and "--device cpu" in result.output
    )


def test_help_lists_the_options():
    result = CliRunner().invoke(cli, ["explain", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--task",
        "--estimator",
        "--damping",
        "--test-ids",
        "--top-k",
        "--device",
        "--out",
        "--config",
        "--hessian-size",
        "--hessian-sampler",
    ):
        assert flag in result.output
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("influencer, version")


def test_head_flag_computes_influence_over_the_head_on_cached_features(tmp_path, task_module):
    base = ["explain", "--task", task_module, "--quiet", "--test-ids", "0,3", "--estimator", "exact"]
    head = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "head"), "--head", "1"])
    full = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "full"), "--params", "1"])
    assert head.exit_code == 0 and full.exit_code == 0, head.output + full.output
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("head", "full"))
    assert (
        a["head"] == "1"
        and b["head"] is None
        and a["parameters"] == b["parameters"] == ["1.weight", "1.bias"]
    )
    for x, y in zip(a["tests"], b["tests"], strict=True):
        assert x["helpful_ids"] == y["helpful_ids"] and x["harmful_ids"] == y["harmful_ids"]
        assert x["helpful_scores"] == pytest.approx(y["helpful_scores"], rel=1e-8)
    assert "features: the network ran once" in (tmp_path / "head" / "explain.log").read_text()


def test_library_errors_are_said_in_flags():
    from influencer.app.commands.options import as_flags

    assert as_flags("One-line fix: Influence(..., estimator=CG(damping=0.02)) or more") == (
        "One-line fix: --estimator cg --damping 0.02 or more"
    )
    assert as_flags("use curvature='gauss_newton', or train") == "use --curvature gauss_newton, or train"
    assert as_flags("pass damping > 6.2e-15 (e.g. damping=5.3e-05)") == (
        "pass damping > 6.2e-15 (e.g. --damping 5.3e-05)"
    )
    assert as_flags("EKFAC(relative_damping=0.1)") == "EKFAC(--relative-damping 0.1)"
    assert as_flags("estimator=EKFAC(relative_damping=0.1)") == "--estimator ekfac --relative-damping 0.1"


def test_explain_index_and_evaluate_train_the_builtin_job_once(tmp_path):
    """One job cache behind every command: the built-in CNN is trained by the first command only,
    and evaluate checks the parameters explain explained (the head), with the same estimator."""
    job = ["--train-size", "60", "--epochs", "1", "--quiet"]
    runs = {
        "explain": ["explain", *job, "--test-ids", "0,1", "--out", str(tmp_path / "e")],
        "index": ["index", *job, "--out", str(tmp_path / "i")],
        "evaluate": ["evaluate", *job, "--check", "loo", "--loo-k", "2", "--test-ids", "0",
                     "--out", str(tmp_path / "v")],
    }  # fmt: skip
    logs = {}
    for name, args in runs.items():
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        log_file = {"explain": "e/explain.log", "index": "i/index.log", "evaluate": "v/explain.log"}[name]
        logs[name] = (tmp_path / log_file).read_text()
    assert "training SmallCNN" in logs["explain"]
    for name in ("index", "evaluate"):
        assert "training SmallCNN" not in logs[name]
        assert "loaded the trained SmallCNN from the cache" in logs[name]
    explained = json.loads((tmp_path / "e" / "summary.json").read_text())
    evaluated = json.loads((tmp_path / "v" / "evaluation.json").read_text())
    assert evaluated["ran"]["parameters"] == explained["ran"]["parameters"]  # the head's 2,570
    assert evaluated["ran"]["estimator"] == explained["ran"]["estimator"]
    assert evaluated["ran"]["curvature"] == explained["ran"]["curvature"] == "gauss_newton"


def test_output_into_a_closed_pipe_stops_quietly_and_leaves_the_run_reusable(tmp_path):
    """``influencer explain 2>&1 | head -2``: once the reader has gone, the command stops with
    status 141 (as a tool killed by SIGPIPE), not an error about the pipe; the next run works."""
    out = tmp_path / "run"
    command = [*_command(), "explain", "--out", str(out), *TINY_DIGITS]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    assert proc.wait(timeout=300) == 141, first
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
