"""Every ordinary mistake ends in one line that names the fix, a non-zero exit, no traceback, and
nothing half-written: a run directory that held a finished run still holds exactly that run.

The table runs the command in this process (click's runner: an exception that escapes the command
is ``result.exception`` and fails the test); a few cases also run the real console script in a
subprocess, where a traceback would be printed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from influencer.app.commands.cli import cli
from influencer.app.run import store as store_module

TESTS = Path(__file__).parent
OUTPUTS = ("scores.npy", "test_ids.npy", "config.json", "report.html", "summary.json")
GOOD = ["--task", "robust_jobs:build"]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, ["explain", "--quiet", *args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run of the good job."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = invoke([*GOOD, "--out", str(run), "--test-ids", "0,1"])
    assert result.exit_code == 0, result.output
    return run


def outputs(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in OUTPUTS if (run / name).exists()}


def assert_one_clear_line(result, message: str, usage: bool = False) -> str:
    """Exit code != 0 through SystemExit (an escaped exception would be result.exception itself),
    exactly one ``Error:`` line matching ``message``, nothing else but click's usage lines."""
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    if usage:
        assert result.exit_code == 2 and all(
            line.startswith(("Usage:", "Try ", "Error:")) or not line.strip() for line in lines
        ), result.output
    else:
        assert lines == errors, result.output
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.output
    return errors[0]


def assert_nothing_half_written(run: Path, before: dict[str, bytes]) -> None:
    if not run.exists():
        return
    assert outputs(run) == before
    leftovers = [
        p.name for p in run.iterdir() if p.name in (".staging", ".commit.json") or p.suffix == ".tmp"
    ]
    assert not leftovers


# (arguments after --quiet, the message the one line must match)
CASES = [
    # data and model
    (
        ["--task", "robust_jobs:labels_out_of_range"],
        r"training data: label 7 of example\(s\) \[3\] is out of range: the model has 3 outputs, "
        r"so labels must be 0\.\.2",
    ),
    (
        ["--task", "robust_jobs:labels_out_of_range_in_test_data"],
        r"test data: label 3 of example\(s\) \[5\] is out of range",
    ),
    (
        ["--task", "robust_jobs:float_labels"],
        r"needs integer class labels \(0\.\.C-1\), got torch\.float64 labels .*labels\.long\(\)",
    ),
    (
        ["--task", "robust_jobs:ignored_label"],
        r"label -100 of example\(s\) \[3\] is negative: .*pass ClassificationTask\(ignore_index=-100\)",
    ),
    (["--task", "robust_jobs:hinge_with_01_labels"], r"SmoothHingeTask needs labels -1 or \+1"),
    (
        ["--task", "robust_jobs:negative_label_late"],
        r"label -1 of example\(s\) \[100\] is negative",
    ),
    (
        ["--task", "robust_jobs:forward_returns_tuple"],
        r"the model returned a tuple, not a tensor",
    ),
    (
        ["--task", "robust_jobs:forward_calls_item"],
        r"calls \.item\(\), or branches on a tensor's value .*vmap cannot trace",
    ),
    (
        ["--task", "robust_jobs:wrong_test_shape"],
        r"the test examples are not shaped like the training examples: "
        r".*\[\(6,\) float64, \(\) int64\].*\[\(5,\) float64",
    ),
    (
        ["--task", "robust_jobs:wrong_output_shape"],
        r"needs logits of shape \(B, C\) .* returned shape \(2, 3, 1\)",
    ),
    (
        ["--task", "robust_jobs:regression_output_mismatch"],
        r"RegressionTask compares outputs with targets value by value",
    ),
    (
        ["--task", "robust_jobs:model_fails_on_inputs"],
        r"fails on the first training examples \(RuntimeError: mat1 and mat2 shapes",
    ),
    (["--task", "robust_jobs:no_trainable_parameters"], r"no trainable parameters .*--params"),
    (["--task", "robust_jobs:nan_test_example"], r"NaN or infinite on test example\(s\) \[9\]"),
    # what to explain
    (
        [*GOOD, "--top-k", "100"],
        r"top_k 100 is more than the 48 training examples: choose --top-k 48 or less",
    ),
    ([*GOOD, "--test-ids", "3,12"], r"test_ids \[12\] are out of range: the test set has 12 examples"),
    ([*GOOD, "--test-ids", "3,3"], r"test_ids has duplicates"),
    ([*GOOD, "--num-test", "0"], r"num_test must be >= 1"),
    ([*GOOD, "--params", "encoder"], r"no parameter or module named 'encoder'; the model has: weight, bias"),
    # the --task function
    (["--task", "os:system"], r"os:system is a built-in function, not a function that builds a job"),
    (["--task", "collections:OrderedDict"], r"is a class, not a function that builds a job"),
    (["--task", "robust_jobs:needs_arguments"], r"robust_jobs:needs_arguments\(size\) needs arguments"),
    (["--task", "robust_jobs:NOT_CALLABLE"], r"robust_jobs:NOT_CALLABLE is not callable"),
    (
        ["--task", "robust_jobs:returns_wrong"],
        r"must return \(task, model, train, test\).*got tuple of length 2",
    ),
    (
        ["--task", "robust_jobs:raises"],
        r"robust_jobs:raises\(\) raised ValueError: the data file .* \(the traceback is in explain\.log",
    ),
    (["--task", "robust_jobs:no_such_function"], r"module 'robust_jobs' has no attribute 'no_such_function'"),
    (["--task", "no_such_module:build"], r"no module named 'no_such_module'"),
    (["--task", "os.system"], r"task must look like 'package\.module:function'"),
    # numerics
    (
        [*GOOD, "--estimator", "cg", "-o", "max_iter=1"],
        r"CG did not converge: after max_iter=1 .*raise max_iter.*--on-unconverged warn",
    ),
    (
        [*GOOD, "--estimator", "lissa", "-o", "depth=1", "-o", "tol=0.001"],
        r"LiSSA did not converge: its series is too short for its answer: after depth=1 steps "
        r".*raise depth to at least \d+",
    ),
    (
        ["--task", "robust_jobs:singular", "--estimator", "exact", "--damping", "0"],
        r"is singular: .* pass damping > .*e\.g\. --damping ",
    ),
    # settings
    ([*GOOD, "--estimator", "cgg"], r"unknown estimator 'cgg'"),
    ([*GOOD, "--estimator", "cg", "-o", "depth=3"], r"estimator 'cg' has no option 'depth'"),
    ([*GOOD, "--estimator", "cg", "-o", "max_iter=0"], r"CG\.max_iter must be a finite number > 0"),
    ([*GOOD, "--damping", "-1"], r"damping must be a finite number >= 0"),
    ([*GOOD, "--config", "{tmp}/typo.toml"], r"unknown setting 'dampng' \(did you mean 'damping'\?\)"),
    ([*GOOD, "--config", "{tmp}/broken.toml"], r"is not valid TOML"),
    ([*GOOD, "--config", "{tmp}/missing.toml"], r"config file .*missing\.toml does not exist"),
    ([*GOOD, "--config", "{tmp}/binary.toml"], r"config file .*binary\.toml is not text \(not UTF-8\)"),
    (
        ["--task", "broken_syntax:build"],
        r"cannot import 'broken_syntax' .*syntax error in .*broken_syntax\.py, line 2",
    ),
    (
        ["--task", "raises_on_import:build"],
        r"importing the module of --task raises_on_import:build raised KeyError",
    ),
    ([*GOOD, "--epochs", "3"], r"--epochs sets the training of the built-in digits job; a --task job trains"),
    (["--config", "{tmp}/system.toml"], r"os:system is a built-in function"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a)[-60:] for a, _ in CASES])
def test_bad_input_gets_one_clear_line_and_keeps_the_previous_run(
    tmp_path, finished, args, message, monkeypatch
):
    (tmp_path / "typo.toml").write_text("dampng = 0.1\n")
    (tmp_path / "broken.toml").write_text("damping = [0.1\n")
    (tmp_path / "system.toml").write_text('task = "os:system"\n')
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    (tmp_path / "broken_syntax.py").write_text("def build():\n    return (\n")
    (tmp_path / "raises_on_import.py").write_text("import os\nos.environ['NO_SUCH_VARIABLE_AT_ALL']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = outputs(run)
    assert set(before) == set(OUTPUTS)
    result = invoke([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(run)])
    assert_one_clear_line(result, message)
    assert_nothing_half_written(run, before)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*GOOD, "--on-unconverged", "maybe"], r"'maybe' is not one of 'raise', 'warn'"),
        ([*GOOD, "--test-ids", "1,x"], r"expected comma-separated integers"),
        ([*GOOD, "--curvature", "fisher"], r"'fisher' is not one of 'hessian', 'gauss_newton'"),
    ],
)
def test_bad_flags_get_click_usage_and_one_error(tmp_path, args, message):
    assert_one_clear_line(invoke([*args, "--out", str(tmp_path / "run")]), message, usage=True)
    assert not (tmp_path / "run").exists()


# ---- the output directory ------------------------------------------------------------------------


def _out_dangling(tmp_path: Path) -> str:
    (tmp_path / "link").symlink_to(tmp_path / "gone" / "dir")
    return str(tmp_path / "link")


def _out_too_long(tmp_path: Path) -> str:
    return str(tmp_path / ("r" * 300))


def _out_under_a_file(tmp_path: Path) -> str:
    (tmp_path / "notes.txt").write_text("mine")
    return str(tmp_path / "notes.txt" / "run")


def _out_is_a_file(tmp_path: Path) -> str:
    (tmp_path / "notes.txt").write_text("mine")
    return str(tmp_path / "notes.txt")


def _out_not_a_run(tmp_path: Path) -> str:
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    return str(tmp_path / "thesis")


def _out_corrupt_manifest(tmp_path: Path) -> str:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{half a manif")
    return str(tmp_path / "run")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_out_dangling, r"link is a symbolic link to .*gone/dir, which does not exist; create the target"),
        (_out_too_long, r"File name too long; choose a shorter output directory name \(--out\)"),
        (_out_under_a_file, r"Not a directory; a part of the output directory's path is a file"),
        (_out_is_a_file, r"notes\.txt exists and is not a directory"),
        (_out_not_a_run, r"is not empty and has no manifest\.json, so it is not an influencer run directory"),
        (_out_corrupt_manifest, r"manifest\.json is not readable JSON .*delete .* or choose another output"),
    ],
)
def test_unusable_output_directories(tmp_path, make, message):
    out = make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert_one_clear_line(invoke([*GOOD, "--out", out]), message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` when this process may (root on Linux); False otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_output_directory(tmp_path, monkeypatch):
    place = tmp_path / "ro"
    mounted = _mount_tmpfs(place, "ro,size=1m")
    try:
        if not mounted:
            if os.name == "posix" and os.geteuid() != 0:
                place.chmod(0o555)
            else:  # root without mount: the file system refuses as a read-only one would
                real = os.mkdir

                def refuse(path, *args, **kwargs):
                    if str(path).startswith(str(place)):
                        raise OSError(errno.EROFS, "Read-only file system", str(path))
                    return real(path, *args, **kwargs)

                monkeypatch.setattr(os, "mkdir", refuse)
        result = invoke([*GOOD, "--out", str(place / "run")])
        assert_one_clear_line(
            result,
            r"ro/run: (Read-only file system; the file system is read-only: choose a writable output "
            r"directory|Permission denied; choose an output directory you can write to)",
        )
    finally:
        if mounted:
            _unmount(place)
        else:
            place.chmod(0o755)


def test_full_disk_while_writing_outputs_keeps_the_previous_run(tmp_path, finished, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = outputs(run)
    real = store_module.write_durable

    def full(path, data):
        if ".staging" in str(path) and path.name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_module, "write_durable", full)
    result = invoke([*GOOD, "--out", str(run), "--top-k", "4"])
    assert_one_clear_line(
        result, r"No space left on device while writing to .*run; the disk is full: free some space"
    )
    assert_nothing_half_written(run, before)


def test_a_really_full_disk(tmp_path):
    place = tmp_path / "tiny"
    if not _mount_tmpfs(place, "size=48k"):
        pytest.skip("mounting a tmpfs needs root on Linux (the monkeypatched full disk is tested above)")
    try:
        result = invoke([*GOOD, "--out", str(place / "run")])
        assert_one_clear_line(result, r"No space left on device.*the disk is full")
        assert not any((place / "run" / name).exists() for name in OUTPUTS)
    finally:
        _unmount(place)


# ---- what is not an error ------------------------------------------------------------------------


def test_class_names_with_dollar_signs_are_shown_as_written(tmp_path):
    result = invoke(["--task", "robust_jobs:dollar_classes", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "cost $5" in (tmp_path / "run" / "report.html").read_text()
    assert (tmp_path / "run" / "influence_vs_distance.png").stat().st_size > 0


def test_an_ignored_label_is_accepted_when_the_task_says_so(tmp_path):
    import robust_jobs
    from influencer import Influence

    result = invoke(["--task", "robust_jobs:ignored_label_opted_in", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    # Left out of the loss: its gradient is the regulariser's alone (weight decay 0.05 * theta).
    task, model, train, _ = robust_jobs.ignored_label_opted_in()
    inf = Influence(model, task, train)
    _, g = next(inf.train_gradients(torch.tensor([3, 4])))
    torch.testing.assert_close(g[0], 0.05 * inf.theta)
    assert float((g[1] - 0.05 * inf.theta).norm()) > 1e-3


def test_top_k_equal_to_n_and_more_test_examples_than_there_are(tmp_path):
    result = invoke([*GOOD, "--out", str(tmp_path / "run"), "--top-k", "48", "--num-test", "50"])
    assert result.exit_code == 0, result.output
    assert (
        "num_test 50 is more than the 12 test examples: explaining all of them"
        in (tmp_path / "run" / "explain.log").read_text()
    )
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())["tests"]) == 12


def test_accepted_unconverged_solve_and_a_model_far_from_a_minimum_are_in_the_summary(tmp_path):
    run = tmp_path / "run"
    result = invoke(
        [
            "--task",
            "robust_jobs:untrained",
            "--out",
            str(run),
            "--estimator",
            "cg",
            "-o",
            "max_iter=1",
            "--on-unconverged",
            "warn",
        ]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["solver"]["converged"] is False
    warnings = "\n".join(summary["warnings"])
    assert "CG did not converge: after max_iter=1" in warnings and "the scores are approximate" in warnings
    assert "the model is far from a minimum of its training objective" in warnings
    assert summary["optimality"]["ratio"] > 0.1
    log = (run / "explain.log").read_text()
    assert "WARNING influencer.explain: RuntimeWarning: CG did not converge" in log
    # Reused, the approximate solves are flagged again, never passed off as converged.
    again = invoke(
        [
            "--task",
            "robust_jobs:untrained",
            "--out",
            str(run),
            "--estimator",
            "cg",
            "-o",
            "max_iter=1",
            "--on-unconverged",
            "warn",
        ]
    )
    assert again.exit_code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert any("come from a solve that did not converge" in w for w in summary["warnings"])
    trained = invoke([*GOOD, "--out", str(tmp_path / "trained")])
    assert trained.exit_code == 0
    assert json.loads((tmp_path / "trained" / "summary.json").read_text())["warnings"] == []


# ---- the real console script ---------------------------------------------------------------------


def _script() -> list[str]:
    script = Path(sys.executable).parent / "influencer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "influencer.app.entry"]


def test_the_console_script_prints_one_line_and_no_traceback(tmp_path):
    """Mistakes through the installed command: stderr is one line, the traceback of the user's
    build function is in explain.log (the table above checks every case in this process)."""
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    cases = {  # two at once: an import of torch per process is most of the time
        "raises": (["--task", "robust_jobs:raises"], "raised ValueError"),
        "dangling": ([*GOOD, "--out", str(tmp_path / "link")], "which does not exist"),
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    procs = {
        name: subprocess.Popen(
            [*_script(), "explain", "--quiet", "--out", str(tmp_path / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, err)
        assert out == "" and len(err.strip().splitlines()) == 1, (name, err)
        assert err.startswith("Error: ") and cases[name][1] in err, (name, err)
    log = (tmp_path / "raises" / "explain.log").read_text()
    assert "Traceback" in log and "ValueError: the data file data/train.csv" in log  # kept for the user


def test_library_checks_labels_chunk_by_chunk(tmp_path):
    """The Influence API refuses the same labels, naming training ids, for data in any form."""
    from torch.utils.data import Dataset

    import robust_jobs
    from influencer import ClassificationTask, Influence
    from influencer.errors import DataError

    (x, y), _ = robust_jobs.data()
    y = y.clone()
    y[40] = -1

    class Items(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    inf = Influence(robust_jobs.linear(), ClassificationTask(weight_decay=0.05), Items(), batch_size=16)
    with pytest.raises(DataError, match=r"label -1 of example\(s\) \[40\] is negative"):
        list(inf.train_gradients())
    torch.testing.assert_close(len(list(inf.train_gradients(torch.arange(32)))), 2)


def test_a_non_finite_test_gradient_is_named_by_test_id(tmp_path, monkeypatch):
    """A finite loss with a NaN gradient (here: made so for test example 9, the 2nd one explained)
    is reported by its test id, not by its position among the examples solved together."""
    import robust_jobs
    from influencer._kernel.functional import ModelFunction

    xt = robust_jobs.data()[1][0]
    real = ModelFunction.measurement_grads

    def nan_for_example_9(fn, theta, batch):
        g = real(fn, theta, batch)
        hit = (batch[0] == xt[9].to(batch[0])).all(dim=1)
        return torch.where(hit[:, None], torch.full_like(g, float("nan")), g)

    monkeypatch.setattr(ModelFunction, "measurement_grads", nan_for_example_9)
    result = invoke([*GOOD, "--out", str(tmp_path / "run"), "--test-ids", "4,9,2"])
    assert_one_clear_line(result, r"NaN or infinite for test example\(s\) \[9\]")


# ---- the library: every mistake is one line, an influencer error, never a traceback from torch ----


def _library_model():
    import robust_jobs

    model = robust_jobs.linear()
    model.load_state_dict(robust_jobs._fitted_state())
    return model


class _Wrapped(torch.nn.Module):
    """The good linear model inside a forward of the user's own."""

    def __init__(self, forward) -> None:
        super().__init__()
        self.linear = _library_model()
        self.user_forward = forward

    def forward(self, x):
        return self.user_forward(self.linear, x)


def _branch(linear, x):
    if x.sum() > 0:  # a data-dependent branch: vmap cannot trace it
        return linear(x)
    return -linear(x)


def _library_case(train_label=None, test_label=None, model=None, **options):
    """Influence on the good data, with one thing changed; scores of the test set."""
    import robust_jobs
    from influencer import ClassificationTask, Influence

    (x, y), (xt, yt) = robust_jobs.data()
    y, yt = y.clone(), yt.clone()
    if train_label is not None:
        y[40] = train_label
    if test_label is not None:
        yt[5] = test_label
    task = ClassificationTask(weight_decay=0.05)
    inf = Influence(_library_model() if model is None else model, task, (x, y), batch_size=16, **options)
    return inf.fit().scores((xt, yt))


def _corrupt_store_fingerprint(tmp_path: Path):
    import robust_jobs
    from influencer import ClassificationTask, Influence
    from influencer.index import GaussianProjector, GradientIndex

    inf = Influence(_library_model(), ClassificationTask(weight_decay=0.05), robust_jobs.data()[0])
    GradientIndex.build(inf, tmp_path / "store", GaussianProjector(k=4), chunk=16)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    manifest["header"]["fingerprint"] = "0" * 64
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    return GradientIndex.open(tmp_path / "store", inf)


def _no_cuda_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return _library_case(device="cuda")


# (id, what to run given tmp_path, the error class's name, the message the one line must match)
LIBRARY_CASES = [
    (
        "training label -1 after the first batch",
        lambda _: _library_case(train_label=-1),
        "DataError",
        r"label -1 of example\(s\) \[40\] is negative: ClassificationTask takes class indices 0\.\.C-1",
    ),
    (
        "training label C after the first batch",
        lambda _: _library_case(train_label=3),
        "DataError",
        r"label 3 of example\(s\) \[40\] is out of range: the model has 3 outputs, so labels must be 0\.\.2",
    ),
    (
        "test label C",
        lambda _: _library_case(test_label=3),
        "DataError",
        r"label 3 of example\(s\) \[5\] is out of range",
    ),
    ("params=[]", lambda _: _library_case(params=[]), "ConfigError", r"params is empty.*params=None"),
    (
        "device tpu",
        lambda _: _library_case(device="tpu"),
        "ConfigError",
        r"device 'tpu' is not a torch device",
    ),
    (
        "device cuda without CUDA",
        lambda _: _no_cuda_device(),
        "ConfigError",
        r"device 'cuda' is not available",
    ),
    (
        "dtype int64",
        lambda _: _library_case(dtype=torch.int64),
        "ConfigError",
        r"dtype must be a floating torch dtype .*got torch\.int64",
    ),
    (
        "forward returns a tuple",
        lambda _: _library_case(model=_Wrapped(lambda linear, x: (linear(x), x))),
        "TaskError",
        r"the model returned a tuple, not a tensor: .*override Task\.outputs",
    ),
    (
        ".item() in forward",
        lambda _: _library_case(model=_Wrapped(lambda linear, x: linear(x) * (x.abs().max().item() > 0))),
        "TaskError",
        r"calls \.item\(\), or branches on a tensor's value .*vmap cannot trace.*vectorize = False",
    ),
    (
        "data-dependent branch in forward",
        lambda _: _library_case(model=_Wrapped(_branch)),
        "TaskError",
        r"vmap cannot trace for per-example gradients: remove \.item\(\)",
    ),
    (
        "bfloat16 with EK-FAC",
        lambda _: _library_case(dtype=torch.bfloat16, estimator=__import__("influencer").EKFAC(damping=1e-3)),
        "ConfigError",
        r"EK-FAC needs eigendecompositions \(torch\.linalg\.eigh\), which have no bfloat16 kernels",
    ),
    (
        "float16 CG",
        lambda _: _library_case(dtype=torch.float16, estimator=__import__("influencer").CG(damping=1e-3)),
        "IndefiniteHessianError",
        r"in float16, whose 3 significant digits .*the cause is likely the precision, not the Hessian",
    ),
    (
        "store fingerprint of the wrong type",
        _corrupt_store_fingerprint,
        "IndexStoreError",
        r"manifest\.json is damaged: header\.fingerprint is \"0000.*, not an object",
    ),
]


@pytest.mark.parametrize(
    ("make", "kind", "message"), [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES]
)
def test_library_mistakes_get_one_clear_line(tmp_path, make, kind, message):
    from influencer.errors import InfluencerError

    with pytest.raises(InfluencerError) as caught:
        make(tmp_path)
    assert type(caught.value).__name__ == kind, f"{type(caught.value).__name__}: {caught.value}"
    text = str(caught.value)
    assert "\n" not in text and re.search(message, text), text


def test_a_compiled_model_gives_the_uncompiled_scores_or_one_line():
    """torch.compile'd modules run through torch.func (eagerly): gradients give the same answer;
    a curvature needs the double backward, which compiled graphs may refuse: then in one line."""
    from influencer import Identity
    from influencer.errors import TaskError

    compiled = torch.compile(_library_model())
    torch.testing.assert_close(
        _library_case(model=compiled, estimator=Identity()), _library_case(estimator=Identity())
    )
    try:
        scores = _library_case(model=torch.compile(_library_model()))
    except TaskError as exc:
        assert "torch.compile'd" in str(exc) and "pass the uncompiled module" in str(exc)
        assert len(str(exc).splitlines()) == 1
    else:
        torch.testing.assert_close(scores, _library_case())


def test_double_backward_refused_by_a_compiled_graph_is_one_line():
    from influencer._kernel.functional import traceable
    from influencer.errors import TaskError

    with pytest.raises(TaskError, match=r"torch\.compile'd.*pass the uncompiled module"), traceable():
        raise RuntimeError("torch.compile does not currently support double backward")
    with pytest.raises(RuntimeError, match="unrelated"), traceable():  # other failures pass through
        raise RuntimeError("unrelated")
