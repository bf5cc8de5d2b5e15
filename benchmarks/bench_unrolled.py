"""Unrolled attribution (exact metagradients through the training run): cost, memory and LDS.

``cost``: for the MNIST-1D MLP (40-64-10 tanh, 1,600 training signals) and the digits CNN
(``SmallCNN``, 1,347 8x8 images), each trained in float32 by Adam (lr 3e-3, batch 64) from a
seeded initialisation, the seconds of one training run, of ``Unrolled.fit`` (the replay that
verifies the model and keeps the checkpoints) and of ``Unrolled.scores`` for a block of m = 1, 10,
100 test examples in one reverse pass, in trainings (seconds / seconds of one training run); and
the peak resident memory of a process that trains, or trains and attributes, above one that only
loads the data and the model (each measured in a fresh process), beside the same with every
state kept (``segment=1``, no recomputation).

``magic``: bergson's MAGIC (``bergson.magic.Trainer``: ``train`` with checkpoints, then one
``backward`` per test example) against ``Unrolled`` (``fit`` + ``scores``) on the MNIST-1D MLP and
the recipe of ``cost``, the same run in both (same start, batches, Adam and objective): agreement
of the two metagradients (Pearson r, max relative difference) and seconds in trainings, for
m = 1 and 10 test examples, in float64 and float32 (``BergsonMagic`` says how the two are aligned).

``lds``: the linear datamodeling score on the MNIST-1D MLP (float64, the first ``--n-test`` test
signals) of the unrolled scores beside influence estimators (CG and EK-FAC on the Gauss-Newton
curvature, damping 1e-3, and the gradient dot product) and, with ``--peers``, the peers' (as
``bench_lds.py`` races them, same damping), for three recipes, the default (Adam lr 3e-3), the
default with a one-epoch warmup and a smoother one (lr 1e-3), in two settings of the ground truth
(``influencer.validation.lds``): single-model (the same run re-weighted: 10% of the examples
down-weighted by eps = 0.001 or 0.0001, and 10% and 50% removed) and seed-averaged (retrained from scratch on
half of the data, two seeds averaged); and the extrapolation diagnostic
(``Unrolled.extrapolation``: slopes of the actual on the predicted change). Refits are cached
(``--cache``). Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_unrolled.py cost --json out/unrolled_cost.json
    PYTHONPATH=src python benchmarks/bench_unrolled.py lds --json out/unrolled_lds.json --cache out/unrolled
    PYTHONPATH=src .venv-bench/bin/python benchmarks/bench_unrolled.py magic --test-counts 1 10
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import format_table, machine, write_json
from torch import Tensor, nn

from influencer import CG, EKFAC, ClassificationTask, Identity, Influence, Unrolled
from influencer.datasets import load_digits, load_mnist1d
from influencer.models import MLP, SmallCNN
from influencer.retraining import AdamRetrainer
from influencer.retraining_cache import CachedRetrainer
from influencer.validation import linear_datamodeling_score, retrain_on_subsets

WEIGHT_DECAY = 1e-2
PROBLEMS = ("mlp-mnist1d", "cnn-digits")


def problem(name: str, dtype: torch.dtype, n_test: int) -> tuple[nn.Module, Any, Any]:
    """A seeded initial model, the training data and ``n_test`` test examples."""
    if name == "mlp-mnist1d":
        split = load_mnist1d(2000, seed=0, dtype=dtype)
        torch.manual_seed(0)
        init: nn.Module = MLP(split.x_train.shape[1], (64,), split.num_classes)
    elif name == "cnn-digits":
        split = load_digits(images=True, dtype=dtype)
        torch.manual_seed(0)
        init = SmallCNN(split.num_classes)
    else:
        raise SystemExit(f"unknown problem {name!r}; choose from {PROBLEMS}")
    return init.to(dtype), split.train, (split.x_test[:n_test], split.y_test[:n_test])


def train(recipe: AdamRetrainer, init: nn.Module, data: Any) -> tuple[nn.Module, float]:
    """The model ``recipe`` trains from ``init`` and the seconds it took."""
    inf = Influence(init, ClassificationTask(weight_decay=WEIGHT_DECAY), data)
    start = time.perf_counter()
    theta = recipe.refit(inf, start=inf.parameters_of(init))
    return inf.model_at(theta), time.perf_counter() - start


# ---- cost ----------------------------------------------------------------------------------------


def measure_memory(mode: str, name: str, epochs: int) -> dict[str, Any]:
    """Run in a fresh process: ``baseline`` (load only), ``train``, or ``unrolled-<m>[-every]``;
    ``bergson-baseline`` (load and import bergson.magic) or ``bergson-<m>`` (its training run
    and ``m`` backward passes)."""
    init, data, test = problem(name, torch.float32, 100)
    recipe = AdamRetrainer(epochs=epochs, lr=3e-3, batch_size=64)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    Influence(init, task, data).losses()  # touch the model and data as every mode does
    out: dict[str, Any] = {}
    if mode.startswith("bergson"):
        import bergson.magic.trainer  # its imports: transformers, datasets, torchopt

        if mode != "bergson-baseline":
            m = int(mode.split("-")[1])
            bergson = BergsonMagic(init, data, recipe)
            bergson.train()
            bergson.scores((test[0][:m], test[1][:m]))
            out["checkpoint_bytes"] = bergson.checkpoint_bytes()
            bergson.close()
    elif mode != "baseline":
        model, _ = train(recipe, init, data)
        if mode.startswith("unrolled"):
            m = int(mode.split("-")[1])
            segment = 1 if mode.endswith("every") else None
            unrolled = Unrolled(model, task, data, recipe=recipe, start=init, test_batch=m, segment=segment)
            unrolled.fit().scores((test[0][:m], test[1][:m]))
            out["stats"] = unrolled.reverse_stats.__dict__
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def peak(mode: str, name: str, epochs: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, __file__, "memory", "--mode", mode, "--problem", name, "--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for name in args.problems:
        init, data, test = problem(name, torch.float32, 100)
        task = ClassificationTask(weight_decay=WEIGHT_DECAY)
        recipe = AdamRetrainer(epochs=args.epochs, lr=3e-3, batch_size=64)
        model, _ = train(recipe, init, data)
        unrolled = Unrolled(model, task, data, recipe=recipe, start=init)
        start = time.perf_counter()
        unrolled.fit()
        fit_seconds = time.perf_counter() - start
        p = unrolled.p
        # Peak resident memory of fresh processes: loading only, training, training + attributing.
        base = peak("baseline", name, args.epochs)["max_rss_mib"]
        trained = peak("train", name, args.epochs)["max_rss_mib"]
        for m in args.test_counts:
            unrolled.test_batch = m
            # The machine is shared: a training run right before and right after each measurement,
            # their mean the unit, so that a change of load between them shows rather than skews.
            before = train(recipe, init, data)[1]
            start = time.perf_counter()
            unrolled.scores((test[0][:m], test[1][:m]))
            s = time.perf_counter() - start
            after = train(recipe, init, data)[1]
            seconds = (before + after) / 2
            stats = unrolled.reverse_stats
            rss = every = None  # each costs a fresh process that trains and attributes again
            if m in args.memory_counts:
                rss = peak(f"unrolled-{m}", name, args.epochs)["max_rss_mib"]
                every = peak(f"unrolled-{m}-every", name, args.epochs)["max_rss_mib"]
            rows.append({
                "problem": name, "p": p, "n": unrolled.n, "steps": stats.steps, "m": m,
                "train_s": seconds, "train_before_s": before, "train_after_s": after,
                "load": os.getloadavg()[0], "fit_s": fit_seconds, "scores_s": s, "trainings": s / seconds,
                "fit_trainings": fit_seconds / seconds, "segment": stats.segment,
                "checkpoints": stats.checkpoints, "max_states_held": stats.max_states_held,
                "baseline_rss_mib": base, "train_rss_mib": trained, "unrolled_rss_mib": rss,
                "every_state_rss_mib": every,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    table = format_table(
        [
            (
                r["problem"],
                r["p"],
                r["steps"],
                r["m"],
                r["train_s"],
                r["scores_s"],
                r["trainings"],
                r["fit_trainings"],
                f"{r['checkpoints']}+{r['segment']}",
                r["baseline_rss_mib"],
                r["train_rss_mib"],
                r["unrolled_rss_mib"],
                r["every_state_rss_mib"],
            )
            for r in rows
        ],
        [
            "problem",
            "p",
            "T",
            "m",
            "train s",
            "scores s",
            "trainings",
            "fit (trainings)",
            "held",
            "load MiB",
            "train MiB",
            "unrolled MiB",
            "every state MiB",
        ],
    )
    return {"rows": rows, "table": table}


# ---- bergson's MAGIC ------------------------------------------------------------------------------


class _WeightedObjective(nn.Module):
    """The smallest adapter ``bergson.magic.Trainer`` needs: a module whose forward takes a batch
    dict as keywords and returns the step's loss, here ours, ``(1/B) sum_b w_b (CE_b + Omega)``.

    The signals travel as ``input_ids`` because bergson's loss normaliser (``loss_denom``) reads
    that key (its length only; with one micro-batch the normaliser's ratio is 1); ``example_weight``
    is the batch's slice of the data weights that bergson differentiates."""

    def __init__(self, net: nn.Module, weight_decay: float) -> None:
        super().__init__()
        self.net = net
        self.weight_decay = weight_decay

    def forward(self, input_ids: Tensor, targets: Tensor, example_weight: Tensor) -> Tensor:
        ce = nn.functional.cross_entropy(self.net(input_ids), targets, reduction="none")  # (B,)
        omega = 0.5 * self.weight_decay * sum((p * p).sum() for p in self.net.parameters())
        return (example_weight * (ce + omega)).sum() / len(targets)


class _Stream:
    """What ``Trainer.train`` / ``Trainer.backward`` read of a ``bergson.magic.DataStream``: batch
    ``i`` of the run as a dict, the data weights ``(n,)`` and their ``requires_grad``. Its own
    ``DataStream`` tokenises text; this one serves our recipe's batches (``recipe.plan``), so both
    libraries visit the same examples in the same order."""

    def __init__(self, x: Tensor, y: Tensor, plan: list[Tensor]) -> None:
        self.x, self.y, self.plan = x, y, plan
        self.device = x.device
        self.weights = nn.Parameter(torch.ones(len(x), dtype=x.dtype, device=x.device))

    @property
    def requires_grad(self) -> bool:
        return self.weights.requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.weights.requires_grad = value

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.plan[i]
        return {"input_ids": self.x[ids], "targets": self.y[ids], "example_weight": self.weights[ids]}


class BergsonMagic:
    """``bergson.magic``'s metagradients of the same run: ``Trainer.train`` with checkpoints
    (``save_mode="sqrt"``), then one ``Trainer.backward`` per test example, the query gradient as
    its cotangent (``compute_per_query_magic_scores``' documented mode; a backward pass takes one
    query gradient, and bergson's CLI otherwise averages the queries into one). Optimiser:
    ``torchopt.adam`` with our recipe's betas and eps, ``eps_root=0`` and no decoupled decay (the
    L2 term is in the weighted objective, coupled, as ours and ``torch.optim.Adam``'s); bergson's
    CLI builds ``torchopt.adamw`` instead.

    ``default_dtype``: torch's default dtype while bergson runs. torchopt computes Adam's bias
    corrections ``1 - beta**t`` as a Python float raised to its int64 step counter, a tensor of the
    default dtype: in float32 unless the default is float64, so a float64 run matches ours to
    rounding only with the default set to float64."""

    def __init__(
        self, init: nn.Module, data: Any, recipe: AdamRetrainer, default_dtype: torch.dtype = torch.float32
    ) -> None:
        import torchopt
        from bergson.magic import Trainer

        x, y = data
        self.stream = _Stream(x, y, recipe.plan(torch.arange(len(x))))
        self.adapter = _WeightedObjective(copy.deepcopy(init), WEIGHT_DECAY)
        opt = torchopt.adam(recipe.lr, betas=recipe.betas, eps=recipe.eps, eps_root=0.0)
        self.trainer, self.start = Trainer.initialize(self.adapter, opt)
        self.start = self.start.to("cpu").detach_()
        self.directory = tempfile.mkdtemp(prefix="bergson-magic-")
        self.default_dtype = default_dtype
        self.final: Any = None

    @contextlib.contextmanager
    def _running(self) -> Any:
        """bergson's progress bars (tqdm, on for the main rank) to /dev/null; the default dtype set."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.default_dtype)
        try:
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                yield
        finally:
            torch.set_default_dtype(previous)

    def train(self, save: bool = True) -> float:
        """Seconds of the run from the initial state (with checkpoints on disk when ``save``)."""
        state = self.start.to("cpu").detach_()
        if save:  # a fresh run's checkpoints only
            shutil.rmtree(self.directory, ignore_errors=True)
        with self._running():
            start = time.perf_counter()
            final = self.trainer.train(state, self.stream, save_dir=self.directory if save else None)
            seconds = time.perf_counter() - start
        if save:
            self.final = final
        return seconds

    @property
    def theta(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.final.params.values()])

    def checkpoint_bytes(self) -> int:
        return sum(f.stat().st_size for f in Path(self.directory).rglob("*") if f.is_file())

    def scores(self, test: Any) -> Tensor:
        """``-d CE(test_j) / d w_i`` ``(m, n)`` (our sign), one backward pass per test example."""
        from bergson.magic import BackwardState
        from torchopt.pytree import tree_iter

        final, adapter = self.final, self.adapter
        snapshot = final.to("cpu").detach_()
        rows = []
        for j in range(len(test[0])):
            final.detach_()
            final.copy_(snapshot)  # each backward walks the state back down the run
            with final.activate(adapter) as params:
                loss = nn.functional.cross_entropy(adapter.net(test[0][j : j + 1]), test[1][j : j + 1])
                grads = torch.autograd.grad(loss, list(params.values()))
            opt_state = [
                t for t in tree_iter(final.opt_state) if isinstance(t, Tensor) and t.is_floating_point()
            ]
            cotangent = BackwardState(
                {k: g.detach() for k, g in zip(final.params, grads, strict=True)},
                [torch.zeros_like(t) for t in opt_state],
                torch.zeros_like(self.stream.weights.detach()),
            )
            with self._running():
                out = self.trainer.backward(self.directory, self.stream, cotangent, final, cleanup=False)
            rows.append(-out.weight_grads.detach())
        final.detach_()
        final.copy_(snapshot)
        return torch.stack(rows)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def agreement(ours: Tensor, theirs: Tensor) -> dict[str, float]:
    """Pearson r of the flattened score matrices and max |theirs - ours| / max |ours|."""
    r = float(np.corrcoef(ours.flatten().double().numpy(), theirs.flatten().double().numpy())[0, 1])
    rel = float((theirs - ours).abs().max() / ours.abs().max())
    return {"pearson": r, "max_rel_diff": rel}


def magic_bench(args: argparse.Namespace) -> dict[str, Any]:
    """bergson.magic against Unrolled on the MNIST-1D MLP, the recipe of ``cost``."""
    rows = []
    recipe = AdamRetrainer(epochs=args.epochs, lr=3e-3, batch_size=64)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    # (dtype, torch's default dtype while bergson runs, test counts): float64 aligned (torchopt's
    # bias corrections in float64 too), as it comes (in float32), and the float32 run of ``cost``.
    largest = max(args.test_counts)
    configs = (
        (torch.float64, torch.float64, args.test_counts),
        (torch.float64, torch.float32, [largest]),
        (torch.float32, torch.float32, args.test_counts),
    )
    for dtype, default, counts in configs:
        init, data, test = problem("mlp-mnist1d", dtype, largest)
        model, _ = train(recipe, init, data)
        bergson = BergsonMagic(init, data, recipe, default_dtype=default)
        for m in counts:
            block = (test[0][:m], test[1][:m])
            # The unit: our plain training run, right before and right after each measurement; the
            # two libraries alternate inside it, so a change of load shows rather than skews.
            before = train(recipe, init, data)[1]
            start = time.perf_counter()
            unrolled = Unrolled(model, task, data, recipe=recipe, start=init, test_batch=m).fit()
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            ours = unrolled.scores(block)
            scores_s = time.perf_counter() - start
            plain_s = bergson.train(save=False)
            forward_s = bergson.train()
            start = time.perf_counter()
            theirs = bergson.scores(block)
            backward_s = time.perf_counter() - start
            after = train(recipe, init, data)[1]
            unit = (before + after) / 2
            rows.append({
                "dtype": str(dtype).removeprefix("torch."), "m": m, "steps": unrolled.steps,
                "bergson_default_dtype": str(default).removeprefix("torch."),
                "load": os.getloadavg()[0], "train_s": unit, "train_before_s": before, "train_after_s": after,
                "ours_fit_s": fit_s, "ours_scores_s": scores_s,
                "ours_trainings": (fit_s + scores_s) / unit,
                "bergson_train_s": plain_s, "bergson_forward_s": forward_s, "bergson_backward_s": backward_s,
                "bergson_trainings": (forward_s + backward_s) / unit,
                "bergson_checkpoints": len(list(Path(bergson.directory).glob("step_*.ckpt"))),
                "bergson_checkpoint_bytes": bergson.checkpoint_bytes(),
                "final_param_diff": float((bergson.theta - unrolled.theta).abs().max()),
                **agreement(ours, theirs),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        bergson.close()
    table = format_table(
        [
            (
                f"{r['dtype']} ({r['bergson_default_dtype']})",
                r["m"],
                r["train_s"],
                f"{r['ours_fit_s']:.2f} + {r['ours_scores_s']:.2f}",
                r["ours_trainings"],
                f"{r['bergson_forward_s']:.2f} + {r['bergson_backward_s']:.2f}",
                r["bergson_trainings"],
                r["bergson_trainings"] / r["ours_trainings"],
                f"{r['pearson']:.12f}",
                f"{r['max_rel_diff']:.2e}",
                f"{r['final_param_diff']:.1e}",
            )
            for r in rows
        ],
        [
            "dtype (bergson's default)",
            "m",
            "training (s)",
            "ours: fit + scores (s)",
            "ours (trainings)",
            "bergson: forward + backward (s)",
            "bergson (trainings)",
            "bergson / ours",
            "Pearson r",
            "max rel. diff",
            "max |theta diff|",
        ],
    )
    return {"rows": rows, "table": table}


# ---- LDS -----------------------------------------------------------------------------------------


# Adam's first steps are close to the sign of the gradient (m / sqrt(v) with v from one or two
# batches), which a tiny re-weighting can flip; a one-epoch warmup (25 steps) keeps them small.
RECIPES: dict[str, dict[str, Any]] = {
    "default (lr 3e-3)": {"lr": 3e-3},
    "default + warmup (lr 3e-3, warmup 1 epoch)": {"lr": 3e-3, "warmup": 25},
    "smoother (lr 1e-3)": {"lr": 1e-3},
}

# Peers beside ours, as bench_lds.py races them (peers.py adapters, damping 1e-3). Their exact and
# CG methods offer the Hessian only, which is indefinite at Adam's end point (bench_lds.py: pyDVL's
# CG and dattri's exact fall to LDS 0.0-0.3 there); one exact row shows it, the EK-FACs are among
# each library's best there.
PEER_ROWS = (
    ("kronfluence EK-FAC (damping 1e-3)", "kronfluence", "ekfac"),
    ("pyDVL EK-FAC (damping 1e-3)", "pydvl", "ekfac"),
    ("dattri EK-FAC, empirical Fisher (damping 1e-3)", "dattri", "ekfac-emp"),
    ("captum exact (Hessian, damping 1e-3)", "captum", "exact"),
)


def influence_scores(model: nn.Module, data: Any, test: Any) -> dict[str, Tensor]:
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    out = {}
    for label, estimator in (
        ("influence CG (GN, damping 1e-3)", CG(damping=1e-3)),
        ("influence EK-FAC (damping 1e-3)", EKFAC(damping=1e-3)),
        ("gradient dot product", Identity()),
    ):
        curvature = "gauss_newton" if label.startswith("influence CG") else "hessian"
        out[label] = Influence(model, task, data, estimator=estimator, curvature=curvature).fit().scores(test)
    return out


def peer_scores(model: nn.Module, data: Any, test: Any, libraries: list[str]) -> dict[str, Tensor]:
    """The peers' scores ``(m, n)`` of the same model, in our convention (see peers.py); a library
    that fails is reported and left out."""
    from common import Problem, ProblemSpec
    from peers import LIBRARIES, Resolved, Settings, preload

    preload(libraries)
    spec = ProblemSpec(
        "mlp-mnist1d", hidden=(64,), dataset="mnist1d", weight_decay=WEIGHT_DECAY, n_test=len(test[0])
    )
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    problem = Problem(spec, model, task, data[0], data[1], test[0], test[1], torch.device("cpu"), 0.0)
    settings = Settings(damping=1e-3)
    resolved = Resolved(settings, lissa_scale=1.0, cg_iterations=settings.cg_max_iter)
    out = {}
    for label, lib, method in PEER_ROWS:
        if lib not in libraries:
            continue
        try:
            run = LIBRARIES[lib]().run(method, problem, resolved)
            out[label] = run.scores.detach().cpu()
            print(f"{label}: {run.seconds:.1f} s", flush=True)
        except Exception as exc:  # a library failing is a result, not a reason to stop
            print(f"{label}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr, flush=True)
    return out


def lds_bench(args: argparse.Namespace) -> dict[str, Any]:
    init, data, test = problem("mlp-mnist1d", torch.float64, args.n_test)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    cache = args.cache or tempfile.mkdtemp(prefix="unrolled-lds-")
    Path(cache).mkdir(parents=True, exist_ok=True)
    rows, diagnostics = [], {}
    for label in args.recipes:
        settings_ = RECIPES[label]
        recipe = AdamRetrainer(epochs=args.epochs, batch_size=64, **settings_)
        model, _ = train(recipe, init, data)
        unrolled = Unrolled(model, task, data, recipe=recipe, start=init, test_batch=args.n_test).fit()
        warmup = f"-w{settings_['warmup']}" if settings_.get("warmup") else ""
        kept = (
            Path(cache) / f"unrolled-scores-lr{settings_['lr']:g}{warmup}-e{args.epochs}-m{args.n_test}.npy"
        )
        start = time.perf_counter()
        if kept.exists():  # a resumed run: the scores of the same model and test examples
            methods = {"unrolled": torch.from_numpy(np.load(kept, allow_pickle=False))}
        else:
            methods = {"unrolled": unrolled.scores(test)}
            np.save(kept, methods["unrolled"].numpy(), allow_pickle=False)
        unrolled_seconds = time.perf_counter() - start
        methods.update(influence_scores(model, data, test))
        if args.peers:
            methods.update(peer_scores(model, data, test, args.peers))
        diagnostics[label] = {}
        if not args.no_diagnostic:
            diag = unrolled.extrapolation(
                test, methods["unrolled"], fraction=0.1, strengths=(1e-3, 1e-1, 1.0)
            )
            diagnostics[label] = diag.summary()
        reference = unrolled.influence
        cached = CachedRetrainer(recipe, cache)
        settings = {
            "eps1e-3": ("single-model", 0.9, 1e-3, None, init),
            "eps1e-4": ("single-model", 0.9, 1e-4, None, init),
            "removal10": ("single-model", 0.9, 1.0, None, init),
            "removal50": ("single-model", 0.5, 1.0, None, init),
            "seed-averaged": ("seed-averaged", 0.5, 1.0, (100, 101), _init),
        }
        for setting, alpha, eps, seeds, start_ in (settings[name] for name in args.settings):
            retraining = retrain_on_subsets(
                reference, test, subsets=args.subsets, alpha=alpha, retrain=cached, start=start_,
                seeds=seeds, setting=setting, eps=eps,
            )  # fmt: skip
            for method, scores in methods.items():
                result = linear_datamodeling_score(scores, retraining)
                rows.append({
                    "recipe": label, "setting": setting, "dropped": 1 - alpha, "eps": eps, "method": method,
                    "lds": result.mean, "low": result.interval[0], "high": result.interval[1],
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        diagnostics[label]["unrolled_seconds"] = unrolled_seconds
        diagnostics[label]["steps"] = unrolled.steps
    table = format_table(
        [
            (
                r["recipe"],
                r["setting"],
                f"{r['dropped']:.0%}",
                r["eps"],
                r["method"],
                r["lds"],
                f"[{r['low']:.2f}, {r['high']:.2f}]",
            )
            for r in rows
        ],
        ["recipe", "setting", "dropped", "eps", "method", "LDS", "95% interval"],
    )
    markdown = lds_markdown(rows)
    diagnostics = {k: d for k, d in diagnostics.items() if "slopes" in d}
    diag_table = format_table(
        [
            (
                label,
                *(f"{s:.3g} ({c:.2f})" for s, c in zip(d["slopes"], d["correlations"], strict=True)),
                d["reach"],
            )
            for label, d in diagnostics.items()
        ],
        ["recipe", "slope (r) eps 1e-3", "eps 0.1", "removal", "reach"],
    )
    return {
        "rows": rows,
        "diagnostics": diagnostics,
        "table": table + "\n\n" + markdown,
        "markdown": markdown,
        "diagnostics_table": diag_table,
    }


SETTING_COLUMNS = (
    ("single-model", 0.1, 1e-4, "single-model, 10% at eps 1e-4"),
    ("single-model", 0.1, 1e-3, "single-model, 10% at eps 1e-3"),
    ("single-model", 0.1, 1.0, "single-model, 10% removed"),
    ("single-model", 0.5, 1.0, "single-model, 50% removed"),
    ("seed-averaged", 0.5, 1.0, "seed-averaged, 50% removed"),
)


def lds_markdown(rows: list[dict[str, Any]]) -> str:
    """The LDS rows as the README's table: one line per recipe and method, one column per setting."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        for setting, dropped, eps, column in SETTING_COLUMNS:
            if r["setting"] == setting and abs(r["dropped"] - dropped) < 1e-9 and r["eps"] == eps:
                cells.setdefault((r["recipe"], r["method"]), {})[column] = r["lds"]
    columns = [c for *_, c in SETTING_COLUMNS if any(c in v for v in cells.values())]
    lines = ["| recipe | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (recipe, method), values in cells.items():
        shown = [f"{values[c]:.3f}" if c in values else "" for c in columns]
        lines.append(f"| {recipe} | {method} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _init(seed: int) -> nn.Module:
    """A fresh MNIST-1D MLP initialisation (seed 0 is the attributed model's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(40, (64,), 10).to(torch.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("cost", "magic", "lds", "memory"))
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--problem", default="mlp-mnist1d", choices=PROBLEMS, help="(memory: one process)")
    parser.add_argument("--mode", default="baseline", help="(memory: baseline, train, unrolled-M[-every])")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (cost: 10, lds: 20)")
    parser.add_argument("--test-counts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument(
        "--memory-counts", type=int, nargs="*", default=[1, 10], help="(cost) m to measure memory at"
    )
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["eps1e-3", "eps1e-4", "removal10", "removal50", "seed-averaged"],
        help="(lds) single-model 10%% at eps 1e-3 or 1e-4, 10%% or 50%% removed; seed-averaged",
    )
    parser.add_argument("--no-diagnostic", action="store_true", help="(lds) skip Unrolled.extrapolation")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="(lds)")
    parser.add_argument(
        "--peers",
        nargs="*",
        default=[],
        choices=sorted({lib for _, lib, _ in PEER_ROWS}),
        help="(lds) peer libraries to score the same models with (bench venv)",
    )
    parser.add_argument("--cache", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.epochs is None:
        args.epochs = 20 if args.what == "lds" else 10
    if args.what == "memory":
        print(json.dumps(measure_memory(args.mode, args.problem, args.epochs)))
        return 0
    header = {
        "machine": machine(torch.device("cpu")),
        "load_average": os.getloadavg(),
        "args": vars(args),
        "torch": torch.__version__,
    }
    result = {"cost": cost, "magic": magic_bench, "lds": lds_bench}[args.what](args)
    print(result["table"])
    if "diagnostics_table" in result:
        print(result["diagnostics_table"])
    header["load_average_after"] = os.getloadavg()
    if args.json:
        write_json(args.json, {**header, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
