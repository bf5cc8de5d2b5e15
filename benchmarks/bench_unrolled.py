"""Unrolled attribution (exact metagradients through the training run): cost, memory and LDS.

``cost``: for the MNIST-1D MLP (40-64-10 tanh, 1,600 training signals) and the digits CNN
(``SmallCNN``, 1,347 8x8 images), each trained in float32 by Adam (lr 3e-3, batch 64) from a
seeded initialisation, the seconds of one training run, of ``Unrolled.fit`` (the replay that
verifies the model and keeps the checkpoints) and of ``Unrolled.scores`` for a block of m = 1, 10,
100 test examples in one reverse pass, in trainings (seconds / seconds of one training run); and
the peak resident memory of a process that trains, or trains and attributes, above one that only
loads the data and the model (each measured in a fresh process), beside the same with every
state kept (``segment=1``, no recomputation).

``lds``: the linear datamodeling score on the MNIST-1D MLP (float64, the first ``--n-test`` test
signals) of the unrolled scores beside influence estimators (CG and EK-FAC on the Gauss-Newton
curvature, damping 1e-3, and the gradient dot product), for two recipes, the default (Adam lr
3e-3) and a smoother one (lr 1e-3), in two settings of the ground truth
(``influencer.validation.lds``): single-model (the same run re-weighted: 10% of the examples
down-weighted by eps = 0.001 or 0.0001, and 10% and 50% removed) and seed-averaged (retrained from scratch on
half of the data, two seeds averaged); and the extrapolation diagnostic
(``Unrolled.extrapolation``: slopes of the actual on the predicted change). Refits are cached
(``--cache``). Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_unrolled.py cost --json out/unrolled_cost.json
    PYTHONPATH=src python benchmarks/bench_unrolled.py lds --json out/unrolled_lds.json --cache out/unrolled
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    """Run in a fresh process: ``baseline`` (load only), ``train``, or ``unrolled-<m>[-every]``."""
    init, data, test = problem(name, torch.float32, 100)
    recipe = AdamRetrainer(epochs=epochs, lr=3e-3, batch_size=64)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    Influence(init, task, data).losses()  # touch the model and data as every mode does
    out: dict[str, Any] = {}
    if mode != "baseline":
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


# ---- LDS -----------------------------------------------------------------------------------------


RECIPES = {"default (lr 3e-3)": 3e-3, "smoother (lr 1e-3)": 1e-3}


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


def lds_bench(args: argparse.Namespace) -> dict[str, Any]:
    init, data, test = problem("mlp-mnist1d", torch.float64, args.n_test)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    cache = args.cache or tempfile.mkdtemp(prefix="unrolled-lds-")
    rows, diagnostics = [], {}
    for label, lr in RECIPES.items():
        recipe = AdamRetrainer(epochs=args.epochs, lr=lr, batch_size=64)
        model, _ = train(recipe, init, data)
        unrolled = Unrolled(model, task, data, recipe=recipe, start=init, test_batch=args.n_test).fit()
        kept = Path(cache) / f"unrolled-scores-lr{lr:g}-e{args.epochs}-m{args.n_test}.npy"
        start = time.perf_counter()
        if kept.exists():  # a resumed run: the scores of the same model and test examples
            methods = {"unrolled": torch.from_numpy(np.load(kept, allow_pickle=False))}
        else:
            methods = {"unrolled": unrolled.scores(test)}
            np.save(kept, methods["unrolled"].numpy(), allow_pickle=False)
        unrolled_seconds = time.perf_counter() - start
        methods.update(influence_scores(model, data, test))
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
    return {"rows": rows, "diagnostics": diagnostics, "table": table, "diagnostics_table": diag_table}


def _init(seed: int) -> nn.Module:
    """A fresh MNIST-1D MLP initialisation (seed 0 is the attributed model's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(40, (64,), 10).to(torch.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("cost", "lds", "memory"))
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
    result = cost(args) if args.what == "cost" else lds_bench(args)
    print(result["table"])
    if "diagnostics_table" in result:
        print(result["diagnostics_table"])
    header["load_average_after"] = os.getloadavg()
    if args.json:
        write_json(args.json, {**header, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
