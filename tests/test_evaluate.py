"""`influencer evaluate`: leave-one-out and LDS against real retraining, end to end on tiny jobs."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from influencer import ClassificationTask
from influencer.app.commands.cli import cli
from influencer.app.commands.evaluate import EvaluateConfig, run_evaluation
from influencer.app.job.job import Job
from influencer.app.job.recipe import recipe, reinitialised
from influencer.app.settings.explain import ExplainConfig
from influencer.datasets import load_digits
from influencer.errors import ConfigError
from influencer.retraining import AdamRetrainer, LBFGSRetrainer

PNG = b"\x89PNG\r\n\x1a\n"

# A user's job: softmax regression on 90 digit images, trained to the optimum (as influence assumes).
TASK_MODULE = textwrap.dedent(
    """
    import torch
    from influencer import ClassificationTask
    from influencer.datasets import load_digits
    from influencer.training import train_lbfgs


    def build():
        split = load_digits(dtype=torch.float64)
        train = (split.x_train[:90], split.y_train[:90])
        test = (split.x_test[:20], split.y_test[:20])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = torch.nn.Linear(64, 10).double()
        task = ClassificationTask(weight_decay=1e-2)
        return task, train_lbfgs(model, task, train), train, test
    """
)


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    (tmp_path / "optimal_job.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "optimal_job:build"


def _refits(run=None) -> dict[str, float]:
    """The refits in the job cache (shared by every run directory)."""
    root = Path(os.environ["INFLUENCER_CACHE"]) / "retrained"
    return {p.name: p.stat().st_mtime_ns for p in root.glob("*.npy")}


def test_evaluate_command_end_to_end_on_a_linear_job(tmp_path, task_module):
    run = tmp_path / "run"
    args = ["evaluate", "--task", task_module, "--out", str(run), "--test-ids", "1,2", "--loo-k", "5"]
    args += ["--subsets", "6", "--lds-tests", "8", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"Summary: {run / 'evaluation.json'}" in result.output
    summary = json.loads((run / "evaluation.json").read_text())
    assert summary["retraining"].startswith("L-BFGS to the optimum")
    # a convex model refitted to its optimum: influence predicts the retrained changes closely
    assert [t["test_id"] for t in summary["loo"]["tests"]] == [1, 2]
    assert all(len(t["predicted"]) == 5 == len(t["actual"]) for t in summary["loo"]["tests"])
    assert summary["loo"]["pearson"] > 0.9, summary["loo"]
    assert "away from the optimum" not in (run / "explain.log").read_text()
    lds = summary["lds"]
    assert lds["subsets"] == 6 and lds["test_examples"] == 8 and len(lds["correlations"]) == 8
    assert lds["lds"] > 0.8 and lds["interval"][0] <= lds["lds"] <= lds["interval"][1]
    for name in ("loo.png", "lds.png"):
        assert (run / name).read_bytes()[:8] == PNG
    assert summary["files"] == {"loo": "loo.png", "lds": "lds.png", "summary": "evaluation.json"}
    refits = _refits(run)
    removed = {i for t in summary["loo"]["tests"] for i in t["train_ids"]}
    # the optimum, each LOO removal once (shared by both test examples), the LDS subsets, and the
    # refits timed for the estimate: without the first or the last example (unless LOO removed them
    # anyway), and on a random half
    assert len(refits) == 1 + len(removed | {0, 89}) + 6 + 1
    log = (run / "explain.log").read_text()
    said = r"evaluate: about 17 retrainings \(leave-one-out 10 x [\d.]+ s, LDS 7 x [\d.]+ s"
    assert re.search(said, log), log

    # Another estimator on the same job: every refit is read back, none is computed again.
    again = CliRunner().invoke(cli, [*args, "--estimator", "identity", "--method", "lds"])
    assert again.exit_code == 0, again.output
    assert _refits(run) == refits
    other = json.loads((run / "evaluation.json").read_text())
    assert "loo" not in other and other["estimator"]["estimator"] == "identity"
    assert other["lds"]["lds"] < lds["lds"]  # the gradient dot product is less faithful here


def _mlp_job(**fields) -> Job:
    split = load_digits(dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    train = (split.x_train[:80], split.y_train[:80])
    test = (split.x_test[:10], split.y_test[:10])
    return Job(ClassificationTask(weight_decay=1e-2), model, train, test, name="tiny mlp", **fields)


def test_a_network_is_retrained_from_scratch_with_adam(tmp_path):
    config = ExplainConfig(out=str(tmp_path / "run"), epochs=2, progress=False, curvature="gauss_newton")
    settings = EvaluateConfig(methods=("lds",), subsets=3, seeds=2, lds_tests=5)
    result = run_evaluation(config, settings, _mlp_job(), console=False)
    assert result.summary["retraining"].startswith("Adam, 2 epochs")
    assert result.lds is not None and result.lds.actual.shape == (3, 5)
    assert result.lds.seeds == (0, 1) and result.loo == []
    assert len(_refits(result.run_dir)) == 2 * (1 + 3)
    assert (result.run_dir / "lds.png").read_bytes()[:8] == PNG


def test_the_recipe_follows_the_job():
    config = ExplainConfig(epochs=7)
    retrainer, start, text = recipe(_mlp_job(), config)
    assert retrainer == AdamRetrainer(
        epochs=7, lr=config.digits("lr"), batch_size=config.digits("train_batch_size")
    )
    fresh = start(3)
    assert not torch.equal(fresh[0].weight, _mlp_job().model[0].weight)
    assert torch.equal(fresh[0].weight, reinitialised(_mlp_job().model, 3)[0].weight)  # seeded
    own = LBFGSRetrainer(max_iter=50)
    retrainer, start, text = recipe(_mlp_job(retrain=own), config)
    assert retrainer is own and start is None and "warm-started" in text
    made = recipe(_mlp_job(retrain=own, make_model=lambda s: nn.Linear(2, 2)), config)[1]
    assert isinstance(made(0), nn.Linear)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(64, dtype=torch.float64))

        def forward(self, x):
            return x * self.w

    job = _mlp_job()
    job.model = nn.Sequential(Scale(), nn.Linear(64, 10).double())
    with pytest.raises(ConfigError, match="Scale has no reset_parameters"):
        recipe(job, config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ("lds", "shapley")}, "methods must be one or both of loo, lds"),
        ({"subsets": 2}, "subsets must be an integer >= 3"),
        ({"alpha": 1.0}, "alpha"),
        ({"loo_select": "best"}, "loo_select must be one of"),
        ({"seeds": 0}, "seeds must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**kwargs)


def test_command_errors_are_one_line(tmp_path, task_module):
    base = ["evaluate", "--task", task_module, "--out", str(tmp_path / "r"), "--quiet"]
    result = CliRunner().invoke(cli, [*base, "--method", "loo,shapley"])
    assert result.exit_code != 0 and "methods must be one or both of loo, lds" in result.output
    assert "Traceback" not in result.output
    help_text = CliRunner().invoke(cli, ["evaluate", "--help"]).output
    for flag in ("--subsets", "--alpha", "--seeds", "--loo-k", "--estimator", "--damping", "--task"):
        assert flag in help_text
