"""`influencer index`, `influencer query` and `influencer explain --store`: a gradient store on the
command line, checked against the library's GradientIndex on the same store."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from explain_support import TASK_MODULE
from influencer import Influence
from influencer.app.commands.cli import cli
from influencer.index import GradientIndex, NoPreconditioner, ProjectedFisher
from influencer.index.results import QueryResult

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "store_job"  # softmax regression on 90 digit images, 20 test images (TASK_MODULE)
MOVED = "store_job_retrained"  # the same job trained one epoch longer: other weights
BUILD = ["--projector", "kronecker", "--k-in", "16", "--k-out", "8", "--chunk", "32", "--no-progress"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The job modules, importable while this module's tests run."""
    folder = tmp_path_factory.mktemp("jobs")
    (folder / f"{MODULE}.py").write_text(TASK_MODULE)
    (folder / f"{MOVED}.py").write_text(TASK_MODULE.replace("epochs=4", "epochs=5"))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in (MODULE, MOVED):
        sys.modules.pop(name, None)


def _invoke(*args: str, own_task: bool = True):
    """Run a command; one that reads a store names the store's code itself (``--task``), as a
    user must: a store never chooses what code runs (``own_task=False`` leaves it out)."""
    args = tuple(str(a) for a in args)
    if own_task and "--store" in args and "--task" not in args:
        args = (*args, "--task", f"{MODULE}:build")
    return CliRunner().invoke(cli, list(args))


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _error_line(result) -> str:
    """The one "Error:" line of a refused command (no traceback)."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    others = [line for line in result.output.splitlines() if line and line not in errors]
    assert all(line.startswith(("Usage:", "Try ")) for line in others), result.output
    return errors[0]


@pytest.fixture(scope="module")
def store(jobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "store"
    _ok(_invoke("index", "--task", f"{MODULE}:build", "--out", root, *BUILD, "--quiet"))
    return root


def _library_index(root, module: str = MODULE) -> tuple[GradientIndex, object]:
    """The same store opened by the library, on the job built again in Python."""
    task, model, train, test = importlib.import_module(module).build()
    inf = Influence(model, task, train, dtype=torch.float32, progress=False)
    return GradientIndex.open(root / "index", inf), test


def test_query_top_k_equals_the_librarys_on_the_same_store(store, tmp_path):
    out = tmp_path / "query"
    result = _invoke("query", "--store", store, "--test", "all", "--top-k", "5", "--block", "8", "--out", out)
    _ok(result)
    assert "Most helpful IDs" in result.output and "Most harmful IDs" in result.output
    index, test = _library_index(store)
    pre = ProjectedFisher(relative_damping=0.1)  # the store's default preconditioner
    want = index.top_k(test, 5, preconditioner=pre, progress=False)
    assert np.load(out / "test_ids.npy").tolist() == list(range(20))
    for name in ("helpful_ids", "harmful_ids"):
        assert np.array_equal(np.load(out / f"{name}.npy"), getattr(want, name).numpy()), name
    for name in ("helpful_scores", "harmful_scores"):
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), getattr(want, name).numpy(), rtol=1e-6)
    # ... which are the extremes of the dense score matrix, largest helpful score first
    dense = index.scores(test, preconditioner=pre)
    np.testing.assert_allclose(want.helpful_scores[:, 0], dense.max(1).values, rtol=1e-6)
    np.testing.assert_allclose(want.harmful_scores[:, 0], dense.min(1).values, rtol=1e-6)
    summary = json.loads((out / "top_k.json").read_text())
    assert [t["test_id"] for t in summary["tests"]] == list(range(20))
    assert summary["tests"][3]["helpful_ids"] == want.helpful_ids[3].tolist()
    assert summary["scores_from_store"]["projector"]["kind"] == "kronecker"
    assert summary["scores_from_store"]["preconditioner"]["relative_damping"] == 0.1
    # another preconditioner changes the answer (and is said so)
    none = tmp_path / "none"
    _ok(
        _invoke(
            "query", "--store", store, "--test", "2,5", "--preconditioner", "none", "--out", none, "--quiet"
        )
    )
    got = json.loads((none / "top_k.json").read_text())
    assert got["scores_from_store"]["preconditioner"] == {"kind": "none"}
    two = (test[0][[2, 5]], test[1][[2, 5]])
    top1 = np.load(none / "helpful_scores.npy")[:, 0]
    np.testing.assert_allclose(
        top1, index.scores(two, preconditioner=NoPreconditioner()).max(1).values, rtol=1e-6
    )
    assert not np.allclose(top1, index.scores(two, preconditioner=pre).max(1).values, rtol=1e-3)
    # --score-dtype bfloat16: the library's bfloat16 lists, recorded in the settings
    low = tmp_path / "bf16"
    _ok(_invoke("query", "--store", store, "--test", "all", "--top-k", "5", "--score-dtype", "bfloat16",
                "--out", low, "--quiet"))  # fmt: skip
    want_low = index.top_k(test, 5, preconditioner=pre, progress=False, score_dtype=torch.bfloat16)
    for name in ("helpful_ids", "harmful_ids"):
        assert np.array_equal(np.load(low / f"{name}.npy"), getattr(want_low, name).numpy()), name
    assert json.loads((low / "top_k.json").read_text())["settings"]["score_dtype"] == "bfloat16"
    refused = _invoke("query", "--store", store, "--score-dtype", "float8", "--out", tmp_path / "no")
    assert refused.exit_code != 0 and "float8" in refused.output


def test_explain_with_a_store_writes_the_report_and_summary_from_it(store, tmp_path):
    out = tmp_path / "explain"
    result = _invoke(
        "explain", "--store", store, "--test-ids", "1,4", "--top-k", "3", "--out", out, "--quiet"
    )
    _ok(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores_from_store"]["store"] == str(store)
    assert summary["scores_from_store"]["projector"]["kind"] == "kronecker"
    assert summary["estimator"] is None  # no estimator computed these scores
    report = (out / "report.html").read_text()
    assert f"gradient store {store}" in report and "Kronecker, k = 128 of p = 650" in report
    assert "PCA basis" in report
    index, test = _library_index(store)
    want = index.scores(
        (test[0][[1, 4]], test[1][[1, 4]]), preconditioner=ProjectedFisher(relative_damping=0.1)
    )
    np.testing.assert_allclose(np.load(out / "scores.npy"), want.double().numpy(), rtol=1e-5, atol=1e-9)
    assert [t["test_id"] for t in summary["tests"]] == [1, 4]
    assert summary["tests"][1]["helpful_ids"] == want[1].topk(3).indices.tolist()


def test_an_interrupted_build_resumes_and_a_finished_one_is_left_alone(jobs, tmp_path, monkeypatch):
    root = tmp_path / "store"
    original = GradientIndex._project_chunk
    computed: list[int] = []

    def project(influence, projection, first, rows, buffer=None, stop_at=None):
        if stop_at is not None and len(computed) == stop_at:
            raise KeyboardInterrupt  # Ctrl-C during the second chunk
        computed.append(first)
        return original(influence, projection, first, rows, buffer)

    build = ["index", "--task", f"{MODULE}:build", "--out", root, *BUILD, "--quiet"]
    monkeypatch.setattr(GradientIndex, "_project_chunk", staticmethod(lambda *a: project(*a, stop_at=1)))
    assert _invoke(*build).exit_code != 0
    assert computed == [0] and not (root / "index.json").exists()
    monkeypatch.setattr(GradientIndex, "_project_chunk", staticmethod(project))
    _ok(_invoke(*build))
    assert computed == [0, 32, 64]  # only the chunks that were missing
    assert "resuming the build: 1 of 3 chunks" in (root / "index.log").read_text()
    chunks = {p.name: p.stat().st_mtime_ns for p in (root / "index" / "chunks").iterdir()}
    _ok(_invoke(*build))
    assert computed == [0, 32, 64]  # nothing to compute
    assert chunks == {p.name: p.stat().st_mtime_ns for p in (root / "index" / "chunks").iterdir()}
    # a resumed store holds exactly what a fresh build writes
    fresh = tmp_path / "fresh"
    _ok(_invoke("index", "--task", f"{MODULE}:build", "--out", fresh, *BUILD, "--quiet"))
    resumed, built = (sorted((r / "index" / "chunks").glob("*.npy")) for r in (root, fresh))
    assert len(resumed) == len(built) == 3
    for a, b in zip(resumed, built, strict=True):
        assert np.array_equal(np.load(a), np.load(b)), a.name
    assert np.array_equal(np.load(root / "index" / "fisher.npy"), np.load(fresh / "index" / "fisher.npy"))


def test_an_interrupted_query_resumes_from_its_finished_blocks(store, tmp_path, monkeypatch):
    out = tmp_path / "query"
    args = [
        "query",
        "--store",
        store,
        "--test",
        "all",
        "--top-k",
        "4",
        "--block",
        "6",
        "--out",
        out,
        "--quiet",
    ]
    original = QueryResult.save_block
    saved: list[int] = []

    def save(self, b, top):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(b)
        original(self, b, top)

    monkeypatch.setattr(QueryResult, "save_block", save)
    assert _invoke(*args).exit_code != 0
    assert not (out / "top_k.json").exists()
    monkeypatch.setattr(
        QueryResult, "save_block", lambda self, b, top: (saved.append(b), original(self, b, top))
    )
    _ok(_invoke(*args))
    assert saved == [0, 1, 2, 3]  # blocks 0 and 1 were reused
    assert "test blocks: 2 of 4 reused" in (out / "query.log").read_text()
    fresh = tmp_path / "fresh"
    _ok(_invoke(*[a if a != out else fresh for a in args]))
    for name in ("helpful_ids", "harmful_ids", "helpful_scores", "harmful_scores"):
        assert np.array_equal(np.load(out / f"{name}.npy"), np.load(fresh / f"{name}.npy")), name


def test_a_store_never_chooses_the_code_that_runs(store, tmp_path):
    for command in ("query", "explain"):
        line = _error_line(_invoke(command, "--store", store, "--out", tmp_path / command, own_task=False))
        assert (
            f"was built for --task {MODULE}:build; a store is data and never chooses which code runs" in line
        )
        assert f"pass --task {MODULE}:build yourself" in line
        assert not (tmp_path / command / "top_k.json").exists()


def test_a_store_of_another_model_or_settings_is_refused_in_one_line(store, tmp_path):
    moved = ["--task", f"{MOVED}:build"]  # the store's job, trained one epoch longer
    line = _error_line(_invoke("query", "--store", store, *moved, "--out", tmp_path / "q", "--quiet"))
    assert (
        f"the gradient store {store} does not match this model and data: the model's weights changed" in line
    )
    line = _error_line(_invoke("explain", "--store", store, *moved, "--out", tmp_path / "e", "--quiet"))
    assert "the model's weights changed" in line
    line = _error_line(_invoke("index", "--out", store, *moved, *BUILD, "--quiet"))
    assert "built from other inputs: the model's weights changed. Pass --overwrite" in line
    changed = [a if a != "8" else "4" for a in BUILD]
    line = _error_line(_invoke("index", "--task", f"{MODULE}:build", "--out", store, *changed, "--quiet"))
    assert "the projector changed (k_out 8 -> 4)" in line
    # the store is untouched and still answers for its own model
    _ok(_invoke("query", "--store", store, "--test", "0", "--out", tmp_path / "q2", "--quiet"))
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    _ok(_invoke("index", "--out", copy, *moved, *BUILD, "--overwrite", "--quiet"))
    _ok(_invoke("query", "--store", copy, *moved, "--test", "0", "--out", tmp_path / "q3", "--quiet"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["index", "--projector", "gaussian", "--k-in", "4"], "the gaussian projector takes --k"),
        (["index", "--projector", "identity", "--k", "4"], "identity projector stores exact gradients"),
        (["index", "--k", "0"], "k must be >= 1"),
        (["index", "--k", "9999"], "--k 9999 is more than the 650 chosen parameters"),
        (["index", "--chunk", "0"], "chunk must be >= 1"),
        (["index", "--preconditioner", "none", "--damping", "0.1"], "takes no --damping"),
        (["index", "--damping", "-1"], "damping must be a finite number >= 0"),
        (["index", "--projector", "pca"], "'pca' is not one of"),
        (["index", "--projector", "gaussian", "--basis", "random"], "is random and takes no --basis"),
        (["index", "--basis", "svd"], "'svd' is not one of"),
        (["index", "--fisher-dtype", "int8"], "'int8' is not one of"),
        (["query"], "--store DIR is required"),
        (["query", "--store", "{tmp}/nothing"], "does not exist: build it with influencer index"),
        (["query", "--store", "{store}", "--test", "1,x"], "expected 'all' or comma-separated test ids"),
        (
            ["query", "--store", "{store}", "--test", "1", "--num-test", "2"],
            "choose the test examples one way",
        ),
        (["query", "--store", "{store}", "--test", "99"], "out of range"),
        (["query", "--store", "{store}", "--top-k", "0"], "top_k must be >= 1"),
        (["query", "--store", "{store}", "--out", "{store}"], "is the store itself"),
        (
            ["explain", "--store", "{store}", "--estimator", "lissa"],
            "--estimator does not apply with --store",
        ),
        (["explain", "--preconditioner", "none"], "give --store DIR as well"),
    ],
)
def test_bad_flags_are_one_line_errors(store, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{store}", str(store)) for a in args]
    if args[0] == "index":
        args += ["--task", f"{MODULE}:build", "--out", str(tmp_path / "new")]
    elif "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    line = _error_line(_invoke(*args, "--quiet"))
    assert message in line, line


def test_index_fisher_dtype_is_the_librarys_and_a_change_of_it_is_named(store, tmp_path):
    """``--fisher-dtype bfloat16``: the store the library builds with ``fisher_dtype``; building
    into it again with the default dtype is refused, naming the change."""
    out = tmp_path / "low"
    flags = ["--task", f"{MODULE}:build", "--out", out, *BUILD, "--quiet"]
    _ok(_invoke("index", *flags, "--fisher-dtype", "bfloat16"))
    index, _ = _library_index(out)
    assert index.header["fisher_dtype"] == "bfloat16"
    full, _ = _library_index(store)
    assert torch.equal(index.gradients(), full.gradients())  # only the Fisher's products differ
    gap = float((index.fisher() - full.fisher()).norm() / full.fisher().norm())
    assert 0 < gap < 1e-2
    line = _error_line(_invoke("index", *flags))
    assert "the Fisher's product dtype changed (bfloat16 -> the store's)" in line


def test_index_records_the_kronecker_basis(jobs, tmp_path, caplog):
    """The Kronecker store is PCA-based unless --basis random; the manifest says which."""
    for basis in ("pca", "random"):
        flags = [] if basis == "pca" else ["--basis", "random"]
        out = tmp_path / basis
        _ok(_invoke("index", "--task", f"{MODULE}:build", "--out", out, *BUILD, *flags, "--quiet"))
        manifest = json.loads((out / "index" / "manifest.json").read_text())
        assert manifest["header"]["projector"]["basis"] == basis
        assert (out / "index" / "basis.npy").exists() == (basis == "pca")
    # 10 classes and --k-out 16: the output side is kept whole, and the log says so
    flags = [f if f != "8" else "16" for f in BUILD]
    with caplog.at_level(logging.INFO, logger="influencer"):
        _ok(_invoke("index", "--task", f"{MODULE}:build", "--out", tmp_path / "whole", *flags, "--quiet"))
    assert "kept whole (exact) for 1 (10x16: it has 10 outputs, 65 inputs)" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "nan"])
def test_a_damaged_chunk_is_refused_by_every_command_that_reads_the_store(store, tmp_path, damage):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    chunk = sorted((copy / "index" / "chunks").glob("*.npy"))[1]
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[-40:-8] = bytes(b ^ 0xFF for b in data[-40:-8])  # same size, valid header
    elif damage == "truncate":
        del data[-64:]
    else:  # a NaN written where a value was, as float32
        data[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    chunk.write_bytes(bytes(data))
    for command in (["query", "--test", "0,1"], ["explain", "--test-ids", "0,1"]):
        out = tmp_path / command[0]
        line = _error_line(_invoke(*command, "--store", copy, "--out", out, "--quiet"))
        assert "chunk" in line, line  # names the damaged chunk
        assert not (out / "top_k.json").exists() and not (out / "summary.json").exists()


def test_no_run_writes_into_a_gradient_store(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    before = (copy / "index.json").read_bytes()
    for command in (["explain", "--task", f"{MODULE}:build"], ["evaluate", "--task", f"{MODULE}:build"]):
        line = _error_line(_invoke(*command, "--out", copy, "--quiet"))
        assert f"--out {copy} holds a gradient store" in line
    assert (copy / "index.json").read_bytes() == before


def _checkpoint_stores(root, lrs=(0.1, 0.05), k_in=8):
    """Checkpoint stores of a short SGD run of the store job's model (one epoch per checkpoint),
    written by the library's TrainingStore: the directory layout a training loop leaves."""
    from influencer.index import KroneckerProjector, TrainingStore, TrainingStoreSettings

    task, model, train, _ = importlib.import_module(MODULE).build()
    x, y = train
    settings = TrainingStoreSettings(
        checkpoints=(0, 3), projector=KroneckerProjector(k_in=k_in, k_out=5, basis="random"), chunk=32
    )
    store = TrainingStore(model, task, train, root, settings)
    for lr in lrs:  # three batches of 30 per epoch
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for ids in torch.arange(90).split(30):
            with store.step(ids, lr=lr):
                opt.zero_grad()
                loss = task.loss(model, (x[ids], y[ids])).mean()
                (loss + task.regularizer(dict(model.named_parameters()))).backward()
            opt.step()
    return store.finish()


def test_query_combines_checkpoint_stores_as_the_library_does(jobs, tmp_path):
    from influencer.index import CheckpointStores

    root = tmp_path / "checkpoints"
    written = _checkpoint_stores(root)
    assert [p.name for p in written] == ["step-00000000", "step-00000003"]
    out = tmp_path / "query"
    result = _invoke("query", "--store", root, "--test", "all", "--top-k", "4", "--block", "8", "--out", out)
    _ok(result)
    task, model, train, test = importlib.import_module(f"{MODULE}").build()
    want = CheckpointStores.open(root, model, task, train).top_k(test, 4)
    for name in ("helpful_ids", "harmful_ids"):
        assert np.array_equal(np.load(out / f"{name}.npy"), getattr(want, name).numpy()), name
    for name in ("helpful_scores", "harmful_scores"):
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), getattr(want, name).numpy(), rtol=1e-9)
    # products in bfloat16: the same extremes to bfloat16's precision
    low = CheckpointStores.open(root, model, task, train).top_k(test, 4, score_dtype=torch.bfloat16)
    torch.testing.assert_close(low.helpful_scores[:, 0], want.helpful_scores[:, 0], rtol=2e-2, atol=0)
    summary = json.loads((out / "top_k.json").read_text())
    scoring = summary["scores_from_store"]
    assert [(c["step"], c["lr"]) for c in scoring["checkpoints"]] == [(0, 0.1), (3, 0.05)]
    assert scoring["preconditioner"] == {"kind": "none"}
    said = (
        "TracIn over 2 checkpoints, summed with their learning rates as weights (step 0: 0.1, step 3: 0.05)"
    )
    assert said in summary["preconditioner"] and said in (out / "query.log").read_text()

    # explain --store: the report of the same scores, saying how they were combined
    run = tmp_path / "explain"
    _ok(_invoke("explain", "--store", root, "--test-ids", "3,7", "--out", run, "--quiet"))
    explained = json.loads((run / "summary.json").read_text())
    dense = CheckpointStores.open(root, model, task, train).scores((test[0][[3, 7]], test[1][[3, 7]]))
    np.testing.assert_allclose(np.load(run / "scores.npy"), dense.numpy(), rtol=1e-9)
    assert explained["scores_from_store"]["checkpoints"] == scoring["checkpoints"]
    assert said in (run / "report.html").read_text()

    # a directory that is not the complete stores of one run is refused in one line
    line = _error_line(_invoke("query", "--store", root, "--preconditioner", "fisher", "--out", out))
    assert "--preconditioner does not apply to checkpoint stores" in line
    mixed = tmp_path / "mixed"
    shutil.copytree(root, mixed)
    (mixed / "step-00000009").mkdir()  # a checkpoint whose window never closed
    assert "is incomplete" in _error_line(_invoke("query", "--store", mixed, "--out", out, "--quiet"))
    shutil.rmtree(mixed / "step-00000009")
    other = _checkpoint_stores(tmp_path / "other", k_in=6)  # another run's checkpoint, put beside
    shutil.copytree(other[1], mixed / "step-00000006")
    line = _error_line(_invoke("query", "--store", mixed, "--out", out, "--quiet"))
    assert "mixes checkpoint stores of different runs" in line and "projector" in line, line
    shutil.rmtree(mixed / "step-00000006")
    (mixed / "index.json").write_text("{}")
    assert "mixes an influencer index store" in _error_line(_invoke("query", "--store", mixed, "--out", out))
