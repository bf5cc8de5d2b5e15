"""The explain pipeline: its numbers equal the direct API's, and its cache is reused, invalidated
and resumed exactly when it should be (counted by spying on gradient computations, not timed)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explain_support import TASK_MODULE, tiny_job
from influencer import CG, ClassificationTask, Exact, Influence, RegressionTask, top_k
from influencer._kernel.fingerprint import hash_module
from influencer._kernel.functional import ModelFunction
from influencer.app.commands.explain import explain
from influencer.app.job.digits import digits_job
from influencer.app.job.evaluation import Evaluation, choose_test_ids
from influencer.app.job.features import influence_job
from influencer.app.job.job import Job, as_job, load_job
from influencer.app.run.cached import cache_key
from influencer.app.run.store import MANIFEST, RunStore
from influencer.app.settings.explain import ExplainConfig
from influencer.datasets import load_tabular
from influencer.errors import ConfigError, TaskError
from influencer.samplers import SamplerContext, make_sampler

CHUNK = 32  # 120 training examples -> chunks of 32, 32, 32, 24
N_CHUNKS = 4


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """One finished run of the tiny job with the default settings, and its scores."""
    root = tmp_path_factory.mktemp("template")
    result = explain(config(root), tiny_job(), console=False)
    return root / "run", result.scores


@pytest.fixture
def finished(tmp_path, template) -> np.ndarray:
    """``tmp_path/run`` holds a copy of the finished template run; returns its scores."""
    shutil.copytree(template[0], tmp_path / "run")
    return template[1]


def config(tmp_path, **changes) -> ExplainConfig:
    # Exact (a dense 650 x 650 Hessian) is the cheapest estimator for this model, and its answer is
    # reproducible to the last bit; the cache works the same for every estimator.
    values = {
        "out": str(tmp_path / "run"),
        "test_ids": (0, 7),
        "top_k": 3,
        "batch_size": CHUNK,
        "progress": False,
        "estimator": "exact",
        "damping": 1e-3,
    }
    return ExplainConfig(**{**values, **changes})


class Spy:
    """Counts per-example training-gradient chunks and inverse-HVP solves."""

    def __init__(self, monkeypatch, fail_at: int | None = None) -> None:
        self.grad_chunks = 0
        self.solves = 0
        self.fail_at = fail_at
        loss_grads, inverse_hvp = ModelFunction.loss_grads, Influence.inverse_hvp
        spy = self

        def counted_grads(fn, theta, batch):
            spy.grad_chunks += 1
            if spy.fail_at is not None and spy.grad_chunks == spy.fail_at:
                raise RuntimeError("killed mid-run")
            return loss_grads(fn, theta, batch)

        def counted_solves(inf, vectors):
            spy.solves += len(vectors)
            return inverse_hvp(inf, vectors)

        monkeypatch.setattr(ModelFunction, "loss_grads", counted_grads)
        monkeypatch.setattr(Influence, "inverse_hvp", counted_solves)


def test_scores_and_summary_match_the_direct_api(tmp_path):
    job = tiny_job()
    result = explain(config(tmp_path), job, console=False)
    inf = Influence(job.model, job.task, job.train, estimator=Exact(damping=1e-3), dtype=torch.float64).fit()
    expected = inf.scores(job.test.take(torch.tensor([0, 7]))).numpy()  # (2, 120)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-12, atol=1e-18)

    run = tmp_path / "run"
    saved = np.load(run / "scores.npy", allow_pickle=False)
    np.testing.assert_array_equal(saved, result.scores)
    np.testing.assert_array_equal(np.load(run / "test_ids.npy", allow_pickle=False), [0, 7])
    summary = json.loads((run / "summary.json").read_text())
    top = top_k(torch.from_numpy(expected), 3)
    labels = job.test.take(torch.tensor([0, 7]))[1].tolist()
    with torch.no_grad():
        preds = job.model(job.test.take(torch.tensor([0, 7]))[0]).argmax(1).tolist()
    for j, entry in enumerate(summary["tests"]):
        assert entry["test_id"] == [0, 7][j]
        assert entry["label"] == labels[j] and entry["prediction"] == preds[j]
        assert entry["correct"] == (labels[j] == preds[j])
        assert entry["helpful_ids"] == top.helpful_ids[j].tolist()
        assert entry["harmful_ids"] == top.harmful_ids[j].tolist()
        np.testing.assert_allclose(entry["helpful_scores"], top.helpful_scores[j].numpy(), rtol=1e-9)
        assert entry["helpful_scores"][0] > 0 > entry["harmful_scores"][0]
    assert summary["n_train"] == 120 and summary["num_parameters"] == 650
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert "positive = helpful" in summary["sign_convention"]
    log = (run / "explain.log").read_text()
    assert "Most helpful IDs: " + str(top.helpful_ids[0].tolist()) in log
    assert "Most harmful IDs: " + str(top.harmful_ids[1].tolist()) in log
    for name in ("report.html", "influence_vs_distance.png", "config.json", MANIFEST):
        assert (run / name).is_file()
    recorded = json.loads((run / "config.json").read_text())
    assert ExplainConfig.from_dict(recorded["requested"]) == result.config
    # what ran, resolved: the estimator with its damping, the parameters, the curvature
    assert recorded["ran"]["estimator"]["estimator"] == "exact"
    assert recorded["ran"]["damping"] == {"absolute": 1e-3, "kind": "absolute"}
    assert recorded["ran"]["parameters"]["count"] == 650 and recorded["ran"]["curvature"] == "hessian"
    assert summary["ran"] == recorded["ran"]


def test_first_run_computes_everything_once(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    explain(config(tmp_path), tiny_job(), console=False)
    assert spy.grad_chunks == N_CHUNKS and spy.solves == 2


def test_second_run_reuses_every_gradient_and_solve(tmp_path, monkeypatch, caplog, finished):
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="influencer"):
        second = explain(config(tmp_path), tiny_job(), console=False)
    assert spy.grad_chunks == 0 and spy.solves == 0
    np.testing.assert_array_equal(second.scores, finished)
    assert f"training gradients: {N_CHUNKS} of {N_CHUNKS} chunks reused" in caplog.text
    assert "test directions: 2 of 2 reused" in caplog.text
    # A new test id needs one new solve, and no training gradient.
    spy.grad_chunks = spy.solves = 0
    third = explain(config(tmp_path, test_ids=(0, 7, 9)), tiny_job(), console=False)
    assert spy.grad_chunks == 0 and spy.solves == 1
    np.testing.assert_array_equal(third.scores[:2], finished)


def test_changed_damping_resolves_but_keeps_the_gradients(tmp_path, monkeypatch, caplog, finished):
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="influencer"):
        explain(config(tmp_path, damping=0.01), tiny_job(), console=False)
    assert spy.grad_chunks == 0 and spy.solves == 2
    assert "directions: inputs changed (settings: estimator.damping 0.001 -> 0.01)" in caplog.text
    assert f"training gradients: {N_CHUNKS} of {N_CHUNKS} chunks reused" in caplog.text


def test_hessian_subset_matches_the_api_and_only_resolves(tmp_path, monkeypatch, caplog, finished):
    job = tiny_job()
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="influencer"):
        result = explain(config(tmp_path, hessian_size=40, hessian_sampler="logit"), job, console=False)
    assert spy.grad_chunks == 0 and spy.solves == 2  # gradients reused; curvature changed
    assert "curvature estimated on 40 of 120 training examples (logit sampler, seed 0)" in caplog.text
    assert "directions: inputs changed (settings: hessian_examples" in caplog.text

    context = SamplerContext(job.model, job.task, job.train, batch_size=CHUNK)
    ids = make_sampler("logit").select(context, 40, seed=0)
    exact = Exact(damping=1e-3)
    inf = Influence(job.model, job.task, job.train, estimator=exact, hessian_indices=ids, dtype=torch.float64)
    inf.fit()
    expected = inf.scores(job.test.take(torch.tensor([0, 7]))).numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-12, atol=1e-18)
    assert not np.allclose(result.scores, finished, rtol=1e-3)  # a different curvature really was used
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["hessian_examples"] == 40 and summary["hessian_sampler"] == "logit"
    report = (tmp_path / "run" / "report.html").read_text()
    assert "estimated on 40 of 120 training examples (logit sampler)" in report

    # Another seed draws another subset: solved again, never served from the first subset's cache.
    spy.solves = 0
    explain(config(tmp_path, hessian_size=40, hessian_sampler="logit", seed=1), job, console=False)
    assert spy.solves == 2


def test_hessian_subset_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="hessian_size 500 is more than the 120 training examples"):
        explain(config(tmp_path, hessian_size=500), tiny_job(), console=False)


@pytest.mark.parametrize("change", ["weights", "training data"])
def test_changed_weights_or_data_recompute_everything(tmp_path, monkeypatch, caplog, change, finished):
    job = tiny_job()
    if change == "weights":
        with torch.no_grad():
            job.model[1].bias[0] += 1e-9
        reason = "model weights"
    else:
        x, y = job.train.tree
        y = y.clone()
        y[5] = (y[5] + 1) % 10  # one label flipped
        job = Job(job.task, job.model, (x, y), job.test, name=job.name)
        reason = "training data"
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="influencer"):
        explain(config(tmp_path), job, console=False)
    assert spy.grad_chunks == N_CHUNKS and spy.solves == 2
    assert f"gradients: inputs changed ({reason})" in caplog.text
    assert f"directions: inputs changed ({reason})" in caplog.text


class LabelSmoothingTask(ClassificationTask):
    """A hyperparameter held as an attribute, with ``settings()`` not overridden."""

    def __init__(self, smoothing: float) -> None:
        super().__init__(weight_decay=1e-2)
        self.smoothing = smoothing

    def output_loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none", label_smoothing=self.smoothing)


def test_cache_is_keyed_by_influence_settings(tmp_path, monkeypatch, caplog):
    job = tiny_job()
    explain(config(tmp_path), Job(LabelSmoothingTask(0.0), job.model, job.train, job.test), console=False)
    spy = Spy(monkeypatch)
    task = LabelSmoothingTask(0.1)
    with caplog.at_level(logging.INFO, logger="influencer"):
        result = explain(config(tmp_path), Job(task, job.model, job.train, job.test), console=False)
    assert spy.grad_chunks == N_CHUNKS and spy.solves == 2
    why = "inputs changed (settings: task.attributes.smoothing 0.0 -> 0.1)"
    assert f"gradients: {why}" in caplog.text and f"directions: {why}" in caplog.text
    assert f"gradients: {why}" in (tmp_path / "run" / "explain.log").read_text()

    # The recorded fingerprints are those of Influence.settings(), and so are the scores.
    inf = Influence(job.model, task, job.train, estimator=Exact(damping=1e-3), dtype=torch.float64)
    sections = json.loads((tmp_path / "run" / MANIFEST).read_text())["sections"]
    assert sections["directions"]["components"] == cache_key(inf.settings())[0]
    gradients = cache_key({"gradients": inf.settings()["gradients"]}, chunk=CHUNK)[0]
    assert sections["gradients"]["components"] == gradients
    expected = inf.fit().scores(job.test.take(torch.tensor([0, 7]))).numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-12, atol=1e-18)
    assert "cannot read the source code" not in caplog.text


def test_unreadable_model_code_is_never_served_from_the_cache(tmp_path, monkeypatch):
    namespace = {"nn": torch.nn, "__name__": "generated"}
    exec(
        "class Wrapped(nn.Module):\n"
        "    def __init__(self, inner):\n"
        "        super().__init__()\n"
        "        self.inner = inner\n"
        "    def forward(self, x):\n"
        "        return self.inner(x)\n",
        namespace,
    )
    job = tiny_job()
    model = namespace["Wrapped"](job.model)
    explain(config(tmp_path), Job(job.task, model, job.train, job.test), console=False)
    spy = Spy(monkeypatch)
    explain(config(tmp_path), Job(job.task, model, job.train, job.test), console=False)
    assert spy.grad_chunks == N_CHUNKS and spy.solves == 2  # recomputed: the code may have changed
    log = (tmp_path / "run" / "explain.log").read_text().split("influencer explain: run directory")[-1]
    assert "WARNING influencer.explain: not reusing cached gradients or solves: the cache cannot tell " in log
    assert (
        "whether generated.Wrapped changed since they were computed (source code that Python cannot read"
        in log
    )


def test_changed_test_example_is_solved_again(tmp_path, monkeypatch, finished):
    job = tiny_job()
    x, y = job.test.tree
    x = x.clone()
    x[7] = x[7].flip(-1)  # same id, different image
    spy = Spy(monkeypatch)
    explain(config(tmp_path), Job(job.task, job.model, job.train, (x, y)), console=False)
    # test 7's group (ids 0-7) is solved again whole (the same group as a fresh run: same bytes)
    assert spy.solves == 2 and spy.grad_chunks == 0


def test_killed_run_resumes_without_redoing_finished_chunks(tmp_path, monkeypatch, template):
    spy = Spy(monkeypatch, fail_at=3)  # dies inside the third chunk
    with pytest.raises(RuntimeError, match="killed mid-run"):
        explain(config(tmp_path), tiny_job(), console=False)
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert sorted(manifest["sections"]["gradients"]["entries"]) == ["c000000", "c000001"]
    assert not (tmp_path / "run" / ".lock").exists()
    assert not (tmp_path / "run" / "scores.npy").exists()
    spy.grad_chunks, spy.solves, spy.fail_at = 0, 0, None
    resumed = explain(config(tmp_path), tiny_job(), console=False)
    assert spy.grad_chunks == N_CHUNKS - 2 and spy.solves == 0  # the directions were finished too
    np.testing.assert_allclose(resumed.scores, template[1], rtol=1e-12, atol=1e-18)


def test_choice_of_test_examples():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    preds = np.array([0, 1, 2, 0, 0, 2, 2, 3, 0, 1])  # ids 3 and 5 are wrong
    losses = np.array([0.1, 0.1, 0.1, 2.0, 0.1, 3.0, 0.1, 0.1, 0.1, 0.1])
    ev = Evaluation(labels, preds, losses, 0.8, True)
    ids = choose_test_ids(ExplainConfig(num_test=6), ev, 10)
    assert list(ids[:2]) == [5, 3]  # wrong ones first, highest loss first
    assert len(set(ids.tolist())) == 6 and all(labels[i] == preds[i] for i in ids[2:])
    assert {int(labels[i]) for i in ids[2:4]} == {0, 2}  # labels not yet shown come first
    assert list(choose_test_ids(ExplainConfig(test_ids=(9, 4)), ev, 10)) == [9, 4]
    with pytest.raises(ConfigError, match=r"test_ids \[12\] are out of range: the test set has 10"):
        choose_test_ids(ExplainConfig(test_ids=(1, 12)), ev, 10)


def test_default_test_examples_include_wrong_and_right_predictions(tmp_path):
    result = explain(config(tmp_path, test_ids=None, num_test=4), tiny_job(), console=False)
    correct = [t["correct"] for t in result.summary["tests"]]
    assert len(correct) == 4 and correct.count(False) == 2 and correct.count(True) == 2


def test_tabular_regression_job(tmp_path):
    data = load_tabular("iris", dtype=torch.float64)
    x, y = data.x_train[:, :3], data.x_train[:, 3]  # predict petal width from the rest
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1).double()
    task = RegressionTask(weight_decay=1e-3)
    job = Job(
        task, model, (x, y), (data.x_test[:, :3], data.x_test[:, 3]), feature_names=data.feature_names[:3]
    )
    result = explain(config(tmp_path, test_ids=(0, 1), estimator="exact"), job, console=False)
    assert result.accuracy is None and result.scores.shape == (2, len(x))
    entry = result.summary["tests"][0]
    assert isinstance(entry["prediction"], float) and entry["correct"] is None
    page = (tmp_path / "run" / "report.html").read_text()
    assert "sepal length (cm)" in page and '<table class="feat">' in page


def test_cuda_that_is_not_there_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        explain(config(tmp_path, device="cuda"), tiny_job(), console=False)
    assert not (tmp_path / "run").exists()


def test_build_results_in_every_form(tmp_path, monkeypatch):
    job = tiny_job()
    parts = (job.task, job.model, job.train, job.test)
    assert as_job(parts).model is job.model
    assert (
        as_job({"task": job.task, "model": job.model, "train": job.train, "test": job.test}).task is job.task
    )
    with pytest.raises(ConfigError, match="missing keys"):
        as_job({"task": job.task})
    with pytest.raises(ConfigError, match="unknown keys"):
        as_job({"task": job.task, "model": job.model, "train": job.train, "test": job.test, "colour": 1})
    with pytest.raises(TaskError, match=r"must be an influencer\.Task"):
        as_job(("not a task", job.model, job.train, job.test))
    (tmp_path / "tiny_job.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_job("tiny_job:build").name == "tiny_job:build"
    assert load_job("tiny_job:build_dict").name == "dict job"
    with pytest.raises(ConfigError, match=r"must return \(task, model, train, test\)"):
        load_job("tiny_job:build_wrong")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_job("tiny_job:nope")
    with pytest.raises(ConfigError, match="no module named 'no_such_module'"):
        load_job("no_such_module:build")


def test_digits_job_trains_once_and_its_head_view_equals_the_network_head(tmp_path, monkeypatch):
    import influencer.app.job.digits as jobs
    from influencer.heads import Head

    trainings, extractions = [], []
    real_train, real_extract = jobs.train_minibatch, Head.extract
    monkeypatch.setattr(jobs, "train_minibatch", lambda *a, **k: trainings.append(1) or real_train(*a, **k))
    monkeypatch.setattr(Head, "extract", lambda *a, **k: extractions.append(1) or real_extract(*a, **k))
    cfg = ExplainConfig(out=str(tmp_path), train_size=60, epochs=1, progress=False)
    cpu = torch.device("cpu")
    with RunStore(tmp_path) as store:
        job = digits_job(cfg, store, cpu)
        again = digits_job(cfg, store, cpu)  # from the cache
        fits = len(extractions)  # the head's L-BFGS fit ran on features once
        view = influence_job(job, cfg, store, cpu)  # default: the head on the network's features
        assert len(extractions) == fits + 2  # training and test features, one pass each
        influence_job(job, cfg, store, cpu)
        assert len(extractions) == fits + 2  # then read from the job cache
        assert influence_job(job, cfg.replace(params=("head",)), store, cpu) is job  # params: whole network
    assert len(trainings) == 1 and hash_module(job.model) == hash_module(again.model)
    assert job.head == "head" and view.model.head is job.model.head
    ids = torch.tensor([0, 5, 9])
    with torch.no_grad():
        np.testing.assert_allclose(
            view.model(view.test.take(ids)["features"]), job.model(job.test.take(ids)[0].double()), rtol=1e-12
        )
    solve = CG(damping=1e-3, tol=1e-12, max_iter=1000)
    a = Influence(view.model, view.task, view.train, estimator=solve).fit().scores(view.test.take(ids))
    b = Influence(job.model, job.task, job.train, estimator=solve, params=["head"]).fit()
    np.testing.assert_allclose(a, b.scores(job.test.take(ids)), rtol=1e-7, atol=1e-12)


def test_unrolled_method_replays_the_jobs_recipe_and_reports_its_reach(tmp_path):
    import copy

    from influencer import Identity, Influence, Unrolled
    from influencer.retraining import AdamRetrainer

    base = tiny_job(n_train=60, n_test=12)
    torch.manual_seed(1)
    start = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    recipe = AdamRetrainer(epochs=2, lr=1e-2, batch_size=20, seed=0)
    model = copy.deepcopy(start)
    inf = Influence(model, base.task, base.train, estimator=Identity())
    inf.fn.load_into(recipe.refit(inf, None, inf.theta))  # the training run, by the recipe
    job = Job(base.task, model, base.train, base.test, name="recipe digits", retrain=recipe, start=start)
    result = explain(config(tmp_path, method="unrolled", estimator="auto", damping=None), job, console=False)
    expected = Unrolled(model, base.task, base.train, recipe=recipe, start=start).fit()
    np.testing.assert_allclose(
        result.scores, expected.scores(base.test.take(torch.tensor([0, 7]))).numpy(), rtol=1e-9, atol=1e-15
    )
    summary = result.summary
    assert summary["method"] == "unrolled" and summary["estimator"]["estimator"] == "unrolled"
    assert summary["estimator"]["replay_difference"] == 0.0
    assert summary["estimator"]["extrapolation"]["strengths"] == [0.001, 0.1, 1.0]
    assert "the exact derivative of the test loss through every step" in result.files["report"].read_text()
    # a job without its recipe, and settings that do not apply, are refused in one line
    with pytest.raises(ConfigError, match="--method unrolled needs the job's training recipe"):
        explain(
            config(tmp_path / "b", method="unrolled", estimator="auto", damping=None), base, console=False
        )
    with pytest.raises(ConfigError, match="--estimator does not apply with --method unrolled"):
        explain(config(tmp_path / "c", method="unrolled"), job, console=False)
