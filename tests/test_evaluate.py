"""`influencer evaluate`: leave-one-out and LDS against real retraining, end to end on tiny jobs."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import numpy as np
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
    again = CliRunner().invoke(cli, [*args, "--estimator", "identity", "--check", "lds"])
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
    settings = EvaluateConfig(checks=("lds",), subsets=3, seeds=2, lds_tests=5)
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
        ({"checks": ("lds", "shapley")}, "--check must be one or both of loo, lds"),
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
    result = CliRunner().invoke(cli, [*base, "--check", "loo,shapley"])
    assert result.exit_code != 0 and "--check must be one or both of loo, lds" in result.output
    assert "Traceback" not in result.output
    help_text = CliRunner().invoke(cli, ["evaluate", "--help"]).output
    flags = ("--subsets", "--alpha", "--seeds", "--loo-k", "--estimator", "--damping", "--task", "--method")
    for flag in (*flags, "--check", "--setting", "--eps", "--drop"):
        assert flag in help_text


def test_single_model_lds_of_influence_reweights_the_optimum(tmp_path, task_module):
    run = tmp_path / "run"
    args = ["evaluate", "--task", task_module, "--out", str(run), "--check", "lds", "--quiet"]
    args += [
        "--setting",
        "single-model",
        "--eps",
        "0.001",
        "--drop",
        "0.2",
        "--subsets",
        "5",
        "--lds-tests",
        "6",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "evaluation.json").read_text())
    lds = summary["lds"]
    assert (lds["setting"], lds["eps"], lds["drop"], lds["alpha"]) == ("single-model", 0.001, 0.2, 0.8)
    recorded = summary["settings"]["evaluate"]
    assert (recorded["setting"], recorded["eps"], recorded["drop"], recorded["checks"]) == (
        "single-model", 0.001, 0.2, ["lds"],
    )  # fmt: skip
    assert "re-weighted (one optimum)" in summary["retraining"]
    # a convex model at its optimum, re-weighted by 0.001: the first-order prediction is all but exact
    assert lds["lds"] > 0.95, lds
    log = (run / "explain.log").read_text()
    assert "the replay with every weight 1 reproduces the model" in log
    assert re.search(r"evaluate: about 6 retrainings \(LDS 6 x [\d.]+ s", log), log


def _recipe_job(n_train: int = 60) -> tuple[Job, AdamRetrainer, nn.Module]:
    """A job trained by its own recipe from a seeded start (as `--method unrolled` needs)."""
    import copy

    from influencer import Identity, Influence

    split = load_digits(dtype=torch.float64)
    train, test = (split.x_train[:n_train], split.y_train[:n_train]), (split.x_test[:8], split.y_test[:8])
    torch.manual_seed(1)
    start = nn.Linear(64, 10).double()
    task, recipe_ = ClassificationTask(weight_decay=1e-2), AdamRetrainer(epochs=2, lr=1e-2, batch_size=20)
    model = copy.deepcopy(start)
    inf = Influence(model, task, train, estimator=Identity())
    inf.fn.load_into(recipe_.refit(inf, None, inf.theta))  # the training run, by the recipe
    job = Job(task, model, train, test, name="recipe digits", retrain=recipe_, start=start)
    return job, recipe_, start


def test_unrolled_scores_against_the_single_model_replay(tmp_path):
    from influencer import Unrolled
    from influencer.validation import lds

    job, recipe_, start = _recipe_job()
    config = ExplainConfig(out=str(tmp_path / "run"), method="unrolled", progress=False)
    settings = EvaluateConfig(setting="single-model", eps=1e-3, subsets=4, lds_tests=5)
    result = run_evaluation(config, settings, job, console=False)
    assert result.loo == [] and result.lds is not None  # LDS alone: no optimum to leave one out of
    summary = result.summary
    assert summary["method"] == "unrolled" and summary["lds"]["setting"] == "single-model"
    assert summary["unrolled"]["replay_difference"] == 0.0
    assert summary["unrolled"]["extrapolation"]["strengths"] == [0.001, 0.1, 1.0]
    assert "the job's recipe replayed from its start (seed 0" in summary["retraining"]
    # the library's own check on the same run: the same subsets, the same replays, the same LDS
    unrolled = Unrolled(job.model, job.task, job.train, recipe=recipe_, start=start).fit()
    test = job.test.take(torch.from_numpy(result.lds_test_ids))
    expected = lds(
        unrolled.influence, test, scores=unrolled.scores(test), subsets=4, alpha=0.9, retrain=recipe_,
        start=start, setting="single-model", eps=1e-3,
    )  # fmt: skip
    np.testing.assert_allclose(result.lds.actual, expected.actual, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(result.lds.correlations, expected.correlations)
    assert result.lds.mean > 0.9  # the exact derivative, checked on a re-weighting it is exact for
    log = (result.run_dir / "explain.log").read_text()
    assert re.search(r"LDS 5 x [\d.]+ s, extrapolation 3 x [\d.]+ s", log), log


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        (
            "influence",
            {"eps": 0.1},
            "--eps re-weights the one training run: use it with --setting single-model",
        ),
        (
            "influence",
            {"setting": "single-model", "seeds": 2},
            "--seeds does not apply with --setting single",
        ),
        ("influence", {"alpha": 0.5, "drop": 0.5}, "give --alpha .* or --drop .*, not both"),
        ("influence", {"checks": ("loo",), "drop": 0.1}, "--drop applies to the LDS: add lds to --check"),
        ("unrolled", {"checks": ("loo", "lds")}, "--check loo does not apply with --method unrolled"),
    ],
)
def test_meaningless_combinations_are_refused(method, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**kwargs).checks_for(method)


def test_single_model_needs_the_run_that_made_the_model(tmp_path, task_module):
    base = ["evaluate", "--out", str(tmp_path / "r"), "--quiet", "--check", "lds"]
    config = ExplainConfig(out=str(tmp_path / "run"), epochs=2, progress=False)
    settings = EvaluateConfig(setting="single-model", subsets=3)
    with pytest.raises(ConfigError, match="--setting single-model replays the run that trained the model"):
        run_evaluation(config, settings, _mlp_job(), console=False)  # retrained by a default Adam
    job, _, _ = _recipe_job()
    job.start = None
    with pytest.raises(ConfigError, match="give the Job start=<the initial model>"):
        run_evaluation(config, settings, job, console=False)
    result = CliRunner().invoke(cli, [*base, "--eps", "0.5"])
    assert result.exit_code != 0 and "--eps re-weights the one training run" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, [*base, "--task", task_module, "--method", "unrolled"])
    assert result.exit_code != 0 and "--method unrolled needs the job's training recipe" in result.output


def test_method_with_check_names_points_to_check(tmp_path):
    """`evaluate --method loo,lds` (the checks' flag before `--check`) is refused with the fix."""
    from click.testing import CliRunner

    from influencer.app.commands.cli import cli

    result = CliRunner().invoke(cli, ["evaluate", "--out", str(tmp_path / "r"), "--method", "loo,lds"])
    assert result.exit_code == 2
    assert "names checks, not scores: use `influencer evaluate --check loo,lds`" in result.output
    assert "Traceback" not in result.output
